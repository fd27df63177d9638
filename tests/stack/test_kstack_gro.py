"""GRO (kstack.gro, napi_gro_receive / napi_gro_flush): frames built byte by byte here (fixed
addresses, ports, sequence numbers, IDs and payloads, checksums from wire.checksum), handed
to a device's napi_gro_receive; what reaches netif_receive_skb is compared byte for byte with
the frame a merge must give (built the same way), and the frames that must not merge must
come up alone and unchanged, in their flow's order. Every case runs on both implementations
(the compiled kstack._gro.Gro and its twin kstack.gro.GroRef), and random bursts hold the two
equal: the same frames up, in the same order, the same counters and pool counts."""
from __future__ import annotations

import os
import random
import struct

import pytest

from kstack import gro as gro_mod
from kstack.netdevice import NetdevFeatures
from kstack.skbuff import CHECKSUM_NONE, CHECKSUM_UNNECESSARY, SkbPool
from kstack_fakes import FakeDevice
from wire.checksum import checksum_ok, fold, ones_sum, pseudo_header_sum

DST_MAC = bytes.fromhex("02000000000b")
SRC_MAC = bytes.fromhex("02000000000a")
SRC = bytes([198, 18, 0, 1])
DST = bytes([198, 18, 0, 2])
ACK, PSH, FIN, SYN, RST, URG, ECE, CWR = 0x10, 0x08, 0x01, 0x02, 0x04, 0x20, 0x40, 0x80
TS = b"\x01\x01\x08\x0a" + struct.pack("!II", 1000, 2000)  # NOP NOP TS(1000, 2000)
SEQ0 = 0xFFFFF000  # close to the wrap: the merge must carry sequence numbers mod 2^32


def frame(seq: int, payload: bytes, flags: int = ACK, ipid: int = 100, opts: bytes = TS,
          ack: int = 5000, sport: int = 40000, dport: int = 5001, ttl: int = 64,
          df: bool = True, ip_opts: bytes = b"", frag: int = 0, window: int = 1024,
          bad_csum: bool = False) -> bytes:
    """Ethernet + IPv4 + TCP with valid checksums (or a TCP checksum off by one)."""
    th = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack,
                     ((20 + len(opts)) // 4) << 4, flags, window, 0, 0) + opts
    seg = bytearray(th + payload)
    c = ~fold(ones_sum(seg, pseudo_header_sum(SRC, DST, 6, len(seg)))) & 0xFFFF
    if bad_csum:
        c ^= 1
    struct.pack_into("!H", seg, 16, c)
    ihl = 5 + len(ip_opts) // 4
    iph = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(seg), ipid,
                                (0x4000 if df else 0) | frag, ttl, 6, 0, SRC, DST) + ip_opts)
    struct.pack_into("!H", iph, 10, ~fold(ones_sum(iph)) & 0xFFFF)
    return DST_MAC + SRC_MAC + b"\x08\x00" + bytes(iph) + bytes(seg)


def payload(i: int, n: int = 1448) -> bytes:
    return bytes((i * 7 + k) & 0xFF for k in range(n))


class RecDev(FakeDevice):
    """A device whose stack records what netif_receive_skb gets."""

    def __init__(self, gro: bool = True) -> None:
        super().__init__("eth0", "02:00:00:00:00:0b")
        if gro:
            self.features |= NetdevFeatures.GRO
        self.pool = SkbPool()
        self.up: list[tuple[bytes, int, dict]] = []

    def netif_receive_skb(self, skb) -> None:
        self.up.append((skb.tobytes(), skb.ip_summed, dict(skb.cb)))
        skb.consume()

    def rx(self, f: bytes, csum_ok: bool = True) -> None:
        skb = self.pool.alloc(len(f), 66)
        skb.put_data(f)
        skb.protocol = 0x0800
        skb.ip_summed = CHECKSUM_UNNECESSARY if csum_ok else CHECKSUM_NONE
        self.napi_gro_receive(skb)

    def frames(self) -> list[bytes]:
        out = [f for f, _, _ in self.up]
        self.up = []
        return out


def valid(f: bytes) -> bool:
    ip = f[14:34]
    seg = f[34:]
    return checksum_ok(ip) and checksum_ok(seg, pseudo_header_sum(SRC, DST, 6, len(seg)))


try:
    from kstack._gro import Gro as CompiledGro
except ImportError:  # not built: the compiled cases say so
    CompiledGro = None

IMPLS = [pytest.param(gro_mod.GroRef, id="python"),
         pytest.param(CompiledGro, id="cython",
                      marks=pytest.mark.skipif(CompiledGro is None, reason="kstack._gro not built"))]


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


@pytest.fixture
def dev(impl):
    d = RecDev()
    d.gro = impl(d)
    yield d
    assert d.gro is None or not d.gro.held
    assert d.pool.live == 0  # every sk_buff GRO took was freed or handed up


def test_in_order_segments_merge_into_one_until_the_poll_ends(dev):
    ps = [payload(i) for i in range(4)]
    seq = SEQ0
    for i, p in enumerate(ps):
        dev.rx(frame(seq, p, ipid=100 + i))
        seq += len(p)
    assert dev.up == []  # held until napi_gro_flush
    dev.napi_gro_flush()
    (f, summed, cb), = dev.up
    want = frame(SEQ0, b"".join(ps), ipid=100)
    assert f == want  # byte-identical: headers of the first, payloads in order, checksums
    assert valid(f)
    assert summed == CHECKSUM_UNNECESSARY and cb == {"gso_segs": 4, "gso_size": 1448}
    c = dev.counters
    assert (c["gro_held"], c["gro_merged"], c["gro_normal"], c["gro_flush"]) == (1, 3, 0, 1)
    assert (c["gro_packets"], c["gro_wire_packets"], c["gro_bytes"]) == (1, 4, 4 * 1448)


def test_psh_on_the_last_segment_merges_and_delivers_at_once(dev):
    dev.rx(frame(SEQ0, payload(0), ipid=1))
    dev.rx(frame(SEQ0 + 1448, payload(1), ipid=2, flags=ACK | PSH))
    assert dev.frames() == [frame(SEQ0, payload(0) + payload(1), ipid=1, flags=ACK | PSH)]
    dev.napi_gro_flush()
    assert dev.up == [] and dev.counters["gro_flush"] == 0  # nothing left to flush


def test_fin_on_the_last_segment_merges_and_delivers_at_once(dev):
    dev.rx(frame(SEQ0, payload(0), ipid=1))
    dev.rx(frame(SEQ0 + 1448, b"end", ipid=2, flags=ACK | FIN | PSH))
    assert dev.frames() == [frame(SEQ0, payload(0) + b"end", ipid=1, flags=ACK | FIN | PSH)]


def test_a_short_segment_ends_the_merge(dev):
    dev.rx(frame(SEQ0, payload(0), ipid=1))
    dev.rx(frame(SEQ0 + 1448, payload(1, 100), ipid=2))
    assert dev.frames() == [frame(SEQ0, payload(0) + payload(1, 100), ipid=1)]


def test_odd_sized_segments_merge_with_a_valid_checksum(dev):
    ps = [payload(i, 1001) for i in range(5)]
    for i, p in enumerate(ps):
        dev.rx(frame(SEQ0 + 1001 * i, p, ipid=7 + i))
    dev.napi_gro_flush()
    f, = dev.frames()
    assert f == frame(SEQ0, b"".join(ps), ipid=7) and valid(f)


def test_checksum_verified_here_when_the_device_did_not(dev):
    dev.rx(frame(SEQ0, payload(0), ipid=1), csum_ok=False)
    dev.rx(frame(SEQ0 + 1448, payload(1), ipid=2), csum_ok=False)
    dev.napi_gro_flush()
    assert dev.frames() == [frame(SEQ0, payload(0) + payload(1), ipid=1)]


def test_a_bad_checksum_is_delivered_alone_after_its_flow(dev):
    a = frame(SEQ0, payload(0), ipid=1)
    bad = frame(SEQ0 + 1448, payload(1), ipid=2, bad_csum=True)
    dev.rx(a)
    dev.rx(bad, csum_ok=False)
    assert dev.up[1][1] == CHECKSUM_NONE  # TCP verifies it again and counts it
    assert dev.frames() == [a, bad]
    assert dev.counters["gro_csum_bad"] == 1 and dev.counters["gro_merged"] == 0


def test_out_of_order_flushes_the_held_packet_and_starts_anew(dev):
    f1 = frame(SEQ0, payload(0), ipid=1)
    f3 = frame(SEQ0 + 2 * 1448, payload(2), ipid=3)
    f2 = frame(SEQ0 + 1448, payload(1), ipid=2)
    dev.rx(f1)
    dev.rx(f3)
    assert dev.frames() == [f1]  # f1 goes up as it came
    dev.rx(f2)
    assert dev.frames() == [f3]
    dev.napi_gro_flush()
    assert dev.frames() == [f2]
    assert dev.counters["gro_merged"] == 0


@pytest.mark.parametrize("kw", [
    dict(flags=ACK | ECE), dict(flags=ACK | URG), dict(flags=ACK | CWR),
    dict(opts=b"\x01\x01\x08\x0a" + struct.pack("!II", 1001, 2000)),  # TSval differs
    dict(opts=b"\x01\x01\x08\x0a" + struct.pack("!II", 1000, 2001)),  # TSecr differs
    dict(opts=b"\x01\x01\x05\x0a" + struct.pack("!II", 1, 2) + TS),  # a SACK block added
    dict(ack=5001), dict(ttl=63), dict(df=False), dict(ipid=9),
])
def test_a_segment_that_differs_is_not_merged(dev, kw):
    f1 = frame(SEQ0, payload(0), ipid=1)
    f2 = frame(SEQ0 + 1448, payload(1), **{"ipid": 2, **kw})
    dev.rx(f1)
    dev.rx(f2)
    dev.napi_gro_flush()
    assert dev.frames() == [f1, f2]
    assert dev.counters["gro_merged"] == 0


@pytest.mark.parametrize("kw", [
    dict(ip_opts=b"\x01\x01\x01\x00"),  # IP options (IHL 6)
    dict(frag=0x2000, df=False),  # MF: a first fragment
    dict(frag=10, df=False),  # a later fragment
    dict(flags=ACK | PSH), dict(flags=SYN | ACK), dict(flags=ACK | RST), dict(flags=ACK | FIN),
])
def test_a_segment_that_must_not_merge_is_delivered_alone(dev, kw):
    f = frame(SEQ0, payload(0), ipid=1, **kw)
    dev.rx(f)
    assert dev.frames() == [f]
    assert dev.counters["gro_normal"] == 1 and dev.counters["gro_held"] == 0


def test_a_pure_ack_flushes_its_flow_first(dev):
    f1 = frame(SEQ0, payload(0), ipid=1)
    f2 = frame(SEQ0 + 1448, payload(1), ipid=2)
    pure = frame(SEQ0 + 2 * 1448, b"", ipid=3)
    for f in (f1, f2, pure):
        dev.rx(f)
    assert dev.frames() == [frame(SEQ0, payload(0) + payload(1), ipid=1), pure]


def test_flows_are_held_apart_and_other_protocols_pass(dev):
    a1, a2 = frame(SEQ0, payload(0), ipid=1), frame(SEQ0 + 1448, payload(1), ipid=2)
    b1 = frame(7, payload(5), ipid=50, sport=40001)
    b2 = frame(7 + 1448, payload(6), ipid=51, sport=40001)
    arp = DST_MAC + SRC_MAC + b"\x08\x06" + bytes(46)
    for f in (a1, b1, arp, a2, b2):
        dev.rx(f)
    assert dev.frames() == [arp]  # not TCP: up at once, nothing flushed
    dev.napi_gro_flush()
    assert dev.frames() == [frame(SEQ0, payload(0) + payload(1), ipid=1),
                            frame(7, payload(5) + payload(6), ipid=50, sport=40001)]


def test_at_most_max_gro_skbs_flows_are_held(dev):
    from kstack.gro import MAX_GRO_SKBS
    fs = [frame(1, payload(i), ipid=i, sport=1000 + i) for i in range(MAX_GRO_SKBS + 1)]
    for f in fs:
        dev.rx(f)
    assert dev.frames() == [fs[0]]  # the oldest went up to make room
    dev.napi_gro_flush()
    assert dev.frames() == fs[1:]


def test_the_merged_packet_stays_within_64k(dev):
    n = 60
    for i in range(n):
        dev.rx(frame(SEQ0 + 1448 * i, payload(i), ipid=i))
    dev.napi_gro_flush()
    out = dev.frames()
    per = (65535 - 20 - 32) // 1448  # 45 segments fit one IP packet
    assert [len(f) - 66 for f in out] == [per * 1448, (n - per) * 1448]
    assert out[0] == frame(SEQ0, b"".join(payload(i) for i in range(per)), ipid=0)
    assert out[1] == frame(SEQ0 + per * 1448, b"".join(payload(i) for i in range(per, n)), ipid=per)
    assert all(valid(f) for f in out)


def test_gro_off_delivers_every_frame_as_it_came():
    dev = RecDev(gro=False)
    fs = [frame(SEQ0 + 1448 * i, payload(i), ipid=i) for i in range(3)]
    for f in fs:
        dev.rx(f)
    assert dev.frames() == fs and dev.gro is None


def test_turning_gro_off_flushes_what_is_held_first(dev):
    f1, f2 = frame(SEQ0, payload(0), ipid=1), frame(SEQ0 + 1448, payload(1), ipid=2)
    dev.rx(f1)
    dev.features &= ~NetdevFeatures.GRO
    dev.rx(f2)
    assert dev.frames() == [f1, f2]


def test_the_selected_gro_is_the_compiled_one_when_built():
    compiled = CompiledGro if os.environ.get("NICEMU_PY_GRO") != "1" else None  # NICEMU_PY_GRO=1 forces the twin
    assert gro_mod.Gro is (compiled or gro_mod.GroRef)
    assert gro_mod.KIND == ("cython" if compiled is not None else "python")


# --- the compiled GRO against its twin -----------------------------------------------------------

def _burst(rng: random.Random, n: int) -> list[tuple[bytes, bool] | None]:
    """A random burst of frames of three flows (None: a napi_gro_flush): mostly in order and
    mergeable, with what must not merge mixed in (flags, options, TTL, DF, IDs, gaps, sizes
    odd and short, bad checksums, IP options, fragments, other protocols), SEQ and IP ID near
    their wrap."""
    seqs = {40000: 0xFFFFFFFF - rng.randrange(20000), 40001: rng.randrange(1 << 32), 40002: 5}
    ids = {40000: 0xFFFF - rng.randrange(30), 40001: rng.randrange(1 << 16), 40002: 0}
    mss = {40000: 1448, 40001: 1001, 40002: rng.randrange(1, 1460)}
    out: list[tuple[bytes, bool] | None] = []
    for k in range(n):
        r = rng.random()
        if r < 0.04:
            out.append(None)
            continue
        if r < 0.06:
            out.append((DST_MAC + SRC_MAC + b"\x08\x06" + bytes(46), True))
            continue
        sport = rng.choice((40000, 40000, 40000, 40001, 40002))
        size = mss[sport] if rng.random() < 0.8 else rng.randrange(0, mss[sport] + 2)
        kw: dict = {}
        x = rng.random()
        if x < 0.03:
            kw["flags"] = rng.choice((ACK | PSH, ACK | FIN, ACK | FIN | PSH, ACK | CWR, ACK | ECE,
                                      ACK | URG, ACK | RST, SYN | ACK))
        elif x < 0.05:
            kw["opts"] = rng.choice((b"", b"\x01\x01\x08\x0a" + struct.pack("!II", 1001, 2000),
                                     b"\x01\x01\x05\x0a" + struct.pack("!II", 1, 2) + TS))
        elif x < 0.06:
            kw["ttl"] = 63
        elif x < 0.07:
            kw["df"] = False
        elif x < 0.08:
            kw["ip_opts"] = b"\x01\x01\x01\x00"
        elif x < 0.09:
            kw["frag"] = rng.choice((0x2000, 10))
            kw["df"] = False
        elif x < 0.10:
            kw["ack"] = 5001
        elif x < 0.11:
            kw["bad_csum"] = True
        elif x < 0.13:
            seqs[sport] = (seqs[sport] + rng.choice((-1448, 1448, 1))) & 0xFFFFFFFF  # a gap
        elif x < 0.14:
            ids[sport] = (ids[sport] + 5) & 0xFFFF
        f = frame(seqs[sport], payload(k, size), ipid=ids[sport], sport=sport, **kw)
        out.append((f, not kw.get("bad_csum") and rng.random() < 0.9))  # a device flags bad ones
        seqs[sport] = (seqs[sport] + size) & 0xFFFFFFFF
        ids[sport] = (ids[sport] + 1) & 0xFFFF
    return out


def _run(impl, burst) -> tuple:
    d = RecDev()
    d.gro = impl(d)
    for item in burst:
        if item is None:
            d.napi_gro_flush()
        else:
            d.rx(*item)
    d.napi_gro_flush()
    pool = d.pool
    return (d.up, {k: d.counters[k] for k in gro_mod.GRO_COUNTERS},
            (pool.allocs, pool.frees, pool.live, pool.bytes_copied, pool.cache_hits))


@pytest.mark.skipif(CompiledGro is None, reason="kstack._gro not built")
@pytest.mark.parametrize("seed", range(12))
def test_compiled_gro_equals_its_twin_on_random_bursts(seed):
    burst = _burst(random.Random(seed), 400)
    want = _run(gro_mod.GroRef, burst)
    got = _run(CompiledGro, burst)
    assert got[0] == want[0]  # the same sk_buffs up: bytes, ip_summed, gso_segs/gso_size
    assert got[1:] == want[1:]  # every counter, and the pool's
    assert want[1]["gro_merged"] > 0 and want[1]["gro_normal"] > 0  # both paths were taken
    assert all(valid(f) for f, _, cb in want[0] if cb)  # merged ones carry good checksums


# --- the kernel's --device gro= / gso= (ethtool -K DEV gro/gso) ---------------------------------

@pytest.mark.parametrize("env", [None, "0", "1"])
def test_the_device_option_sets_gro_and_gso_over_the_environment(monkeypatch, env):
    from driver.e1000 import E1000Config
    from kstack.kernel import OptionError, parse_device
    for var in ("NICEMU_GRO", "NICEMU_GSO"):
        if env is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, env)
    default = env != "0"
    spec = parse_device("/tmp/x.sock,name=eth1", 0)
    cfg = E1000Config(mode=spec.mode, **spec.config)
    assert (cfg.gro, cfg.gso) == (default, default)  # left out: NICEMU_GRO / NICEMU_GSO decide
    for gro, gso in (("off", "on"), ("on", "off"), ("0", "1")):
        spec = parse_device(f"/tmp/x.sock,gro={gro},gso={gso}", 0)
        cfg = E1000Config(mode=spec.mode, **spec.config)
        assert (cfg.gro, cfg.gso) == (gro in ("on", "1"), gso in ("on", "1"))
    for bad in ("gro=maybe", "gso=", "gso=2"):
        with pytest.raises(OptionError):
            parse_device(f"/tmp/x.sock,{bad}", 0)
