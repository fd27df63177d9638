"""Fault injection: the sans-IO FaultLine with a fake clock (exact outcomes), the FaultyEnd
adapter around a cable, and the fault matrix through real Nics joined by a PairCable."""
from __future__ import annotations

import random
import select

import pytest
from conftest import PEER_MAC, FakeClock, RxRing, TxRing, make_frame, with_fcs

from nicemu import regs as R
from nicemu.cable.pair import PairCable, pipe
from nicemu.cable.faults import FaultConfig, FaultLine, FaultyEnd
from nicemu.fcs import check_fcs

MS = 1_000_000
SEED = 1234


def frames(n: int, size: int = 64) -> list[bytes]:
    return [make_frame(payload=i.to_bytes(4, "big"), size=size) for i in range(n)]


def run_line(cfg: dict, fs: list[bytes], now: int = 0) -> tuple[list[bytes], FaultLine]:
    line = FaultLine(cfg)
    out: list[bytes] = []
    for f in fs:
        assert line.push(f, now)
        out += line.pop_due(now)
    return out, line


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg, key",
    [
        ({"drop": 1.5}, "faults.drop"),
        ({"corrupt": -0.1}, "faults.corrupt"),
        ({"duplicate": "x"}, "faults.duplicate"),
        ({"delay_ms": -1}, "faults.delay_ms"),
        ({"rate_bps": 0}, "faults.rate_bps"),
        ({"limit": 0}, "faults.limit"),
        ({"corrupt_bits": 0}, "faults.corrupt_bits"),
        ({"seed": "abc"}, "faults.seed"),
        ({"dorp": 0.1}, "faults.dorp: unknown key"),
    ],
)
def test_bad_config_names_the_key(cfg: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        FaultConfig.from_dict(cfg)


def test_inactive_config_changes_nothing() -> None:
    assert not FaultConfig().active
    assert not FaultConfig(seed=5, limit=3).active
    fs = frames(50)
    out, line = run_line({}, fs)
    assert out == fs and line.next_release() is None


# --- the matrix, each fault alone, exact outcomes ---------------------------------------------


def test_drop_is_exact_and_repeatable() -> None:
    fs = frames(1000)
    out1, line = run_line({"drop": 0.5, "seed": SEED}, fs)
    out2, _ = run_line({"drop": 0.5, "seed": SEED}, fs)
    assert out1 == out2
    # one uniform draw per frame, dropped when below the probability
    rng = random.Random(SEED)
    expected = [f for f in fs if not rng.random() < 0.5]
    assert out1 == expected
    assert line.stats.dropped == 1000 - len(expected)
    assert 400 < len(expected) < 600
    out3, _ = run_line({"drop": 0.5, "seed": SEED + 1}, fs)
    assert out3 != out1


def test_drop_all_and_none() -> None:
    fs = frames(20)
    assert run_line({"drop": 1.0, "seed": 1}, fs)[0] == []
    assert run_line({"drop": 0.0, "seed": 1}, fs)[0] == fs


def test_corrupt_flips_exactly_the_configured_bits() -> None:
    fs = frames(200)
    out, line = run_line({"corrupt": 0.3, "corrupt_bits": 2, "seed": SEED}, fs)
    assert len(out) == 200
    changed = 0
    for a, b in zip(fs, out):
        diff = sum(bin(x ^ y).count("1") for x, y in zip(a, b))
        assert diff in (0, 2)
        changed += diff == 2
    assert changed == line.stats.corrupted > 0
    assert run_line({"corrupt": 0.3, "corrupt_bits": 2, "seed": SEED}, fs)[0] == out


def test_duplicate_counts_and_places_copies_right_after() -> None:
    fs = frames(300)
    out, line = run_line({"duplicate": 0.25, "seed": SEED}, fs)
    assert len(out) == 300 + line.stats.duplicated
    assert line.stats.duplicated > 0
    rng = random.Random(SEED)
    expected: list[bytes] = []
    for f in fs:
        expected += [f, f] if rng.random() < 0.25 else [f]
    assert out == expected


def test_reorder_changes_order_but_delivers_everything() -> None:
    fs = frames(300)
    line = FaultLine({"reorder": 0.2, "seed": SEED})
    out: list[bytes] = []
    for f in fs:
        line.push(f, 0)
        out += line.pop_due(0)
    out += line.pop_due(10**12)  # a frame still held back goes after its timeout
    assert sorted(out) == sorted(fs)
    assert out != fs
    assert line.stats.reordered > 0
    # exact: a frame drawn for reordering is held back and overtaken by the next frame
    rng = random.Random(SEED)
    expected: list[bytes] = []
    held = None
    for f in fs:
        if rng.random() < 0.2 and held is None:
            held = f
            continue
        expected.append(f)
        if held is not None:
            expected.append(held)
            held = None
    if held is not None:
        expected.append(held)
    assert out == expected


def test_reorder_timeout_releases_a_lonely_held_frame() -> None:
    line = FaultLine({"reorder": 1.0, "reorder_timeout_ms": 5, "seed": 1})
    f = frames(1)[0]
    line.push(f, 0)
    assert line.pop_due(0) == []
    assert line.next_release() == 5 * MS
    assert line.pop_due(5 * MS - 1) == []
    assert line.pop_due(5 * MS) == [f]


def test_delay_release_times_with_a_fake_clock() -> None:
    line = FaultLine({"delay_ms": 2.5, "seed": 1})
    fs = frames(3)
    t0 = 1_000 * MS
    line.push(fs[0], t0)
    line.push(fs[1], t0 + 1 * MS)
    assert line.next_release() == t0 + 2_500_000
    assert line.pop_due(t0 + 2_499_999) == []
    assert line.pop_due(t0 + 2_500_000) == [fs[0]]
    assert line.next_release() == t0 + 3_500_000
    line.push(fs[2], t0 + 3 * MS)
    assert line.pop_due(t0 + 10 * MS) == [fs[1], fs[2]]
    assert line.next_release() is None


def test_rate_limit_release_times_are_bits_over_rate() -> None:
    rate = 1_000_000  # 1 Mb/s: a 1000-byte frame takes 8 ms on the line
    line = FaultLine({"rate_bps": rate})
    fs = frames(3, size=1000)
    for f in fs:
        assert line.push(f, 0)
    assert line.pop_due(0) == []
    for k in (1, 2, 3):
        t = k * 8000 * 1_000_000_000 // rate
        assert line.next_release() == t
        assert line.pop_due(t - 1) == []
        assert line.pop_due(t) == [fs[k - 1]]
    # an idle line starts serialising at arrival time; overhead_bytes counts extra bits
    line2 = FaultLine({"rate_bps": rate, "overhead_bytes": 20})
    line2.push(fs[0], 50 * MS)
    assert line2.next_release() == 50 * MS + (1020 * 8 * 1000)


def test_rate_then_delay() -> None:
    line = FaultLine({"rate_bps": 8_000_000, "delay_ms": 1})  # 1 byte per us
    f = frames(1, size=100)[0]
    line.push(f, 0)
    assert line.next_release() == 100_000 + MS


def test_limit_refuses_on_tx_and_drops_on_rx() -> None:
    line = FaultLine({"delay_ms": 1, "limit": 2})
    fs = frames(3)
    assert line.push(fs[0], 0) and line.push(fs[1], 0)
    assert not line.push(fs[2], 0)
    assert line.stats.refused == 1
    out, nxt = line.transfer([fs[2]], 0)  # rx semantics: overflow is a drop
    assert out == [] and nxt == MS and line.stats.overflow == 1
    assert line.pop_due(MS) == fs[:2]


# --- FaultyEnd around a cable -----------------------------------------------------------------


def test_faulty_end_tx_delay_with_fake_clock_and_backpressure() -> None:
    clock = FakeClock(0)
    a, b = pipe()
    fa = FaultyEnd(a, tx={"delay_ms": 1, "limit": 2}, clock=clock, use_timer=False)
    fs = frames(3)
    assert fa.send(fs[0]) and fa.send(fs[1])
    assert not fa.send(fs[2]) and not fa.writable()
    assert b.recv_frames() == []
    assert fa.next_deadline() == MS
    clock.advance(MS)
    fa.run_timers()
    assert b.recv_frames() == fs[:2]
    assert fa.writable() and fa.send(fs[2])
    fa.close()
    b.close()


def test_faulty_end_rx_faults_apply_to_received_frames() -> None:
    clock = FakeClock(0)
    a, b = pipe()
    fb = FaultyEnd(b, rx={"drop": 1.0, "seed": 3}, clock=clock, use_timer=False)
    a.send(frames(1)[0])
    assert fb.recv_frames() == []
    assert fb.rx.stats.dropped == 1
    fb.close()
    a.close()


def test_faulty_end_timerfd_wakes_a_select_loop() -> None:
    """Real clock: a delayed frame makes fileno() readable when it is due."""
    a, b = pipe()
    fb = FaultyEnd(b, rx={"delay_ms": 20}, use_timer=True)
    f = frames(1)[0]
    a.send(f)
    got: list[bytes] = []
    for _ in range(50):  # the pipe doorbell first, then the timer
        r, _, _ = select.select([fb.fileno()], [], [], 5)
        assert r, "the end never became readable"
        got += fb.recv_frames()
        if got:
            break
    assert got == [f]
    # nothing held: the descriptor is quiet again
    assert select.select([fb.fileno()], [], [], 0)[0] == []
    fb.close()
    a.close()


# --- the matrix through real devices ----------------------------------------------------------


def nic_pair(make_nic, clock, n_rx: int = 64, **faults):
    a = make_nic()
    b = make_nic(mac=PEER_MAC)
    cable = PairCable(a, b, clock=clock, **faults)
    tx = TxRing(a, n=64).setup()
    rx = RxRing(b, n=n_rx).setup()
    return a, b, cable, tx, rx


def peer_frames(n: int) -> list[bytes]:
    dst = bytes.fromhex(PEER_MAC.replace(":", ""))
    return [make_frame(dst=dst, payload=i.to_bytes(4, "big"), size=64, fcs=False)[:60] for i in range(n)]


def received(b, rx: RxRing, n: int) -> list[bytes]:
    out = []
    for k in range(n):
        _, length, _, status, errors, _ = rx.desc(k)
        if not status & R.RxdStatus.DD:
            break
        out.append(rx.data(k))
    return out


def test_bit_flips_are_counted_in_crcerrs(make_nic, clock) -> None:
    a, b, cable, tx, rx = nic_pair(make_nic, clock, faults_ab={"corrupt": 0.3, "seed": SEED})
    tx.send(peer_frames(40))
    corrupted = cable.end_a.tx.stats.corrupted
    assert 0 < corrupted < 40
    assert b.read32(R.CRCERRS) == corrupted
    assert b.read32(R.GPRC) == 40 - corrupted
    assert len(received(b, rx, 63)) == 40 - corrupted
    cable.close()


def test_drop_through_devices_is_exact(make_nic, clock) -> None:
    a, b, cable, tx, rx = nic_pair(make_nic, clock, faults_ab={"drop": 0.5, "seed": SEED})
    sent = peer_frames(40)
    tx.send(sent)
    rng = random.Random(SEED)
    kept = [f for f in sent if not rng.random() < 0.5]
    got = received(b, rx, 63)
    assert [g[:60] for g in got] == kept
    assert b.read32(R.GPRC) == len(kept)
    cable.close()


def test_duplicate_through_devices(make_nic, clock) -> None:
    a, b, cable, tx, rx = nic_pair(make_nic, clock, faults_ab={"duplicate": 0.5, "seed": SEED})
    tx.send(peer_frames(20))
    dups = cable.end_a.tx.stats.duplicated
    assert dups > 0
    assert b.read32(R.GPRC) == 20 + dups
    cable.close()


def test_delay_and_rate_limit_through_devices_with_fake_clock(make_nic, clock) -> None:
    # 64-byte frames at 512 kb/s: 1 ms each on the line, then 2 ms of propagation
    a, b, cable, tx, rx = nic_pair(
        make_nic, clock, faults_ab={"rate_bps": 512_000, "delay_ms": 2, "limit": 4}
    )
    t0 = clock.now
    sent = peer_frames(10)
    tx.send(sent)
    assert b.read32(R.GPRC) == 0
    # only `limit` frames are on the line; the rest wait in a's TX packet buffer
    assert cable.end_a.tx.held() == 4
    assert cable.next_deadline() == t0 + 3 * MS
    delivered = 0
    steps = 0
    while delivered < 10:
        nd = cable.next_deadline()
        assert nd is not None
        clock.now = nd
        cable.run_timers()
        delivered += b.read32(R.GPRC)
        steps += 1
        assert steps < 100
    got = received(b, rx, 63)
    assert [g[:60] for g in got] == sent  # in order, none lost
    cable.close()


def test_reorder_through_devices_delivers_all(make_nic, clock) -> None:
    a, b, cable, tx, rx = nic_pair(make_nic, clock, faults_ab={"reorder": 0.3, "seed": SEED})
    sent = peer_frames(30)
    tx.send(sent)
    clock.advance(20 * MS)
    cable.run_timers()
    got = [g[:60] for g in received(b, rx, 63)]
    assert sorted(got) == sorted(sent) and got != sent
    cable.close()


def test_a_busy_inner_end_does_not_make_a_due_deadline() -> None:
    """A due tx frame the inner cable refuses waits for the inner end's descriptor, not for a
    timer that is already due (which would spin the event loop)."""
    clock = FakeClock(0)
    a, b = pipe(limit=1)
    fa = FaultyEnd(a, tx={"delay_ms": 1}, clock=clock, use_timer=False)
    fs = frames(3)
    for f in fs:
        assert fa.send(f)
    clock.advance(MS)
    fa.run_timers()  # the first goes into the pipe, the second is refused
    assert fa.next_deadline() is None
    assert b.recv_frames() == fs[:1]  # space: a's pipe end becomes readable
    assert select.select([a.fileno()], [], [], 0)[0]
    assert fa.recv_frames() == []  # serviced: the next frame goes
    assert b.recv_frames() == fs[1:2]
    fa.recv_frames()
    assert b.recv_frames() == fs[2:]
    assert fa.next_deadline() is None
    fa.close()
    b.close()


# --- the matrix per direction: each fault on one direction of two real devices ----------------

MATRIX = {
    "drop": {"drop": 0.4},
    "corrupt": {"corrupt": 0.4, "corrupt_bits": 3},
    "duplicate": {"duplicate": 0.4},
    "reorder": {"reorder": 0.4},
    "delay": {"delay_ms": 5},
    "rate": {"rate_bps": 1_000_000},
}
N_MATRIX = 24


def frames_to(mac: str, n: int, tag: bytes) -> list[bytes]:
    """n distinct 60-byte frames to `mac` (the device adds the FCS)."""
    dst = bytes.fromhex(mac.replace(":", ""))
    return [make_frame(dst=dst, payload=tag + i.to_bytes(2, "big"), size=64, fcs=False)[:60] for i in range(n)]


def reference_deliveries(cfg: dict, frames: list[bytes], t0: int) -> list[tuple[int, bytes]]:
    """(time, frame) a FaultLine of `cfg` delivers for `frames` offered at t0, FCS-bad ones left
    out (the receiving MAC drops them): what the faulty direction must show, exactly."""
    line = FaultLine(cfg)
    for f in frames:
        assert line.push(with_fcs(f), t0)
    out, now = [], t0
    while True:
        out += [(now, f) for f in line.pop_due(now)]
        now = line.next_release()
        if now is None:
            return [(t, f) for t, f in out if check_fcs(f)]


@pytest.mark.parametrize("direction", ["ab", "ba"])
@pytest.mark.parametrize("kind", list(MATRIX))
def test_fault_matrix_per_direction(make_nic, clock, kind: str, direction: str) -> None:
    """One fault, seeded, on one direction: that direction delivers exactly what the seed says
    at exactly the times it says; the other direction of the same cable is untouched."""
    cfg = {**MATRIX[kind], "seed": SEED}
    a, b = make_nic(), make_nic(mac=PEER_MAC)
    cable = PairCable(a, b, clock=clock, **{f"faults_{direction}": cfg})
    rings = {id(n): (TxRing(n, n=64).setup(), RxRing(n, n=64).setup()) for n in (a, b)}
    src, dst = (a, b) if direction == "ab" else (b, a)
    line = (cable.end_a if direction == "ab" else cable.end_b).tx
    faulty, clean = frames_to(dst.mac, N_MATRIX, b"F"), frames_to(src.mac, N_MATRIX, b"C")
    dst.read32(R.CRCERRS)  # clear on read
    t0 = clock.now
    rings[id(src)][0].send(faulty)
    rings[id(dst)][0].send(clean)
    # the other direction: everything, in order, at once
    src_rx = rings[id(src)][1]
    assert [src_rx.data(k) for k in range(N_MATRIX)] == [with_fcs(f) for f in clean]
    assert not src_rx.desc(N_MATRIX)[3] & R.RxdStatus.DD
    # the faulty one, driven by its timers like the event loop does
    rx, got, k = rings[id(dst)][1], [], 0
    while True:
        while rx.desc(k)[3] & R.RxdStatus.DD:
            got.append((clock.now, rx.data(k)))
            k += 1
        deadline = cable.next_deadline()
        if deadline is None:
            break
        clock.now = max(clock.now, deadline)
        cable.run_timers()
    assert got == reference_deliveries(cfg, faulty, t0)
    frames_got = [f for _, f in got]
    stats = line.stats
    if kind == "drop":
        assert 0 < stats.dropped == N_MATRIX - len(got)
    elif kind == "corrupt":
        assert 0 < stats.corrupted == dst.read32(R.CRCERRS) == N_MATRIX - len(got)
    elif kind == "duplicate":
        assert 0 < stats.duplicated == len(got) - N_MATRIX
    elif kind == "reorder":
        assert stats.reordered > 0 and sorted(frames_got) == sorted(map(with_fcs, faulty))
        assert frames_got != [with_fcs(f) for f in faulty]
    elif kind == "delay":
        assert {t for t, _ in got} == {t0 + 5 * MS} and frames_got == [with_fcs(f) for f in faulty]
    elif kind == "rate":  # 64 bytes at 1 Mb/s: 512 us each, back to back
        assert [t for t, _ in got] == [t0 + (i + 1) * 512_000 for i in range(N_MATRIX)]
    cable.close()
