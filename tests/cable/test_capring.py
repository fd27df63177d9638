"""The capture ring (nicemu.cable.capring): the compiled CapRing against its pure-Python twin
CapRingRef (same pcap records for the same frames: snap length cuts, owed FCS written at the
drain, a full ring counting what it refused, the drain's limit), and RingCapture's file."""
from __future__ import annotations

import random
import zlib
from pathlib import Path

import pytest

from nicemu.cable.capring import CapRingRef
from nicemu.cable.capture import GLOBAL_HEADER, RingCapture, read_pcap

_capring = pytest.importorskip("nicemu.cable._capring")
CapRing = _capring.CapRing


def _frame(rng: random.Random) -> tuple[bytes, bool]:
    n = rng.choice([0, 1, 3, 4, 5, 60, 64, 65, 200, 1514, 1518, rng.randrange(1, 1600)])
    data = rng.randbytes(max(0, n - 4))
    owed = rng.random() < 0.4 and n >= 4
    fcs = rng.randbytes(4) if owed else zlib.crc32(data).to_bytes(4, "little")  # owed: garbage
    return (data + fcs)[:n], owed


@pytest.mark.parametrize("seed", range(12))
def test_compiled_ring_and_twin_give_the_same_records(seed: int) -> None:
    rng = random.Random(seed)
    capacity = rng.choice([24, 100, 1000, 5000, 1 << 16])
    snaplen = rng.choice([1, 4, 62, 64, 66, 128, 1518, 65535])
    cy, ref = CapRing(capacity, snaplen, 1000), CapRingRef(capacity, snaplen, 1000)
    for step in range(300):
        if rng.random() < 0.1:
            limit = rng.choice([-1, 0, 1, 3, 1000])
            a, b = cy.drain(limit), ref.drain(limit)
            assert a == b, (seed, step)
            assert cy.used == ref.used == 0 and len(cy) == len(ref) == 0
            continue
        frame, owed = _frame(rng)
        assert cy.push(frame, owed) == ref.push(frame, owed)
        assert (cy.used, len(cy), cy.captured, cy.not_captured) == (ref.used, len(ref), ref.captured, ref.not_captured)
    assert cy.drain() == ref.drain()
    if capacity < 5000:
        assert cy.not_captured > 0  # the full ring refused frames, counted


def test_records_are_pcap_records_with_the_owed_fcs_written() -> None:
    ring = CapRing(1 << 16, 66)
    payloads = [bytes(range(60)), bytes(100)]
    for p in payloads:
        ring.push(p + b"\xee\xee\xee\xee", True)  # FCS owed: its bytes are not written yet
    ring.push(payloads[0] + zlib.crc32(payloads[0]).to_bytes(4, "little"), False)
    blob, n, cut, dropped = ring.drain()
    assert (n, cut, dropped) == (3, 1, 0)
    _, recs = read_pcap(GLOBAL_HEADER.pack(0xA1B2C3D4, 2, 4, 0, 0, 66, 1) + blob)
    fcs0 = zlib.crc32(payloads[0]).to_bytes(4, "little")
    assert recs[0].data == payloads[0] + fcs0 and recs[0].orig_len == 64
    assert recs[1].data == payloads[1][:66] and recs[1].orig_len == 104  # cut: no FCS in it
    assert recs[2].data == payloads[0] + fcs0
    assert recs[0].ts_ns <= recs[1].ts_ns <= recs[2].ts_ns


def test_ring_never_grows_and_counts_what_it_refused() -> None:
    ring = CapRing(16 + 64, 64)
    assert ring.push(bytes(64)) and not ring.push(bytes(64)) and not ring.push(bytes(1))
    assert (ring.captured, ring.not_captured, ring.used) == (1, 2, 80)
    ring.drain()
    assert ring.push(bytes(64))


@pytest.mark.parametrize("compiled", [True, False])
def test_ring_capture_writes_a_bounded_pcap(tmp_path: Path, compiled: bool) -> None:
    cap = RingCapture(tmp_path / "c.pcap", snaplen=100, max_frames=5, capacity=4096, clock=lambda: 0)
    ring = cap._compiled if compiled else CapRingRef(4096, 100)
    if not compiled:
        cap._ref = ring
    assert cap.next_deadline() is None  # an empty ring asks for no wake-up
    for i in range(3):
        ring.push(bytes([i]) * 200)
    assert cap.next_deadline() == cap.interval_ns
    cap.run_timers()  # not due yet
    assert len(ring) == 3
    cap.drain()
    for i in range(30):
        ring.push(bytes([i]) * 64)  # 30 x 80 bytes: the ring (4096) takes them all
    cap.close()
    net, recs = read_pcap(tmp_path / "c.pcap")
    assert net == 0x24000001 and len(recs) == 5
    assert [len(r.data) for r in recs] == [100, 100, 100, 64, 64]
    rep = cap.report()
    assert rep["written"] == 5 and rep["not_written"] == 28 and rep["truncated"] == 3
