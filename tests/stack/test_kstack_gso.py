"""GSO (kstack.gso, skb_gso_segment at dev_queue_xmit): a large TCP segment built byte by
byte here is split into MSS-sized frames that must equal, byte for byte, the frames a sender
without GSO would have sent (sizes, SEQ, FIN/PSH only on the last, CWR only on the first, IP
IDs one apart, IP and TCP checksums by wire.checksum); and in-process TCP between two stacks
with NETIF_F_GSO on sends large segments that reach the device as frames within the MTU, the
data byte-exact, with loss too. The split cases run on both implementations (the compiled
kstack._gso.skb_gso_segment and its twin kstack.gso.skb_gso_segment_ref), and random large
segments hold the two equal: bytes, metadata, counters and pool counts."""
from __future__ import annotations

import os
import random

import pytest

from kstack import gso as gso_mod
from kstack.gso import TCP_GSO_MAX_PAYLOAD, skb_gso_segment_ref
from kstack.netdevice import NetdevFeatures
from kstack.skbuff import CHECKSUM_NONE, CHECKSUM_PARTIAL, SkbPool
from kstack.sock import SOCK_STREAM
from kstack_fakes import MS, FakeNet
from kstack_fakes import net  # noqa: F401 (fixtures)
from test_kstack_gro import ACK, CWR, ECE, FIN, PSH, DST, SRC, TS, frame, payload, valid
from test_kstack_tcp_sock import B, established_pair
from wire.checksum import fold, ones_sum, pseudo_header_sum

SEQ0 = 0xFFFFFF00  # the split wraps the sequence space

try:
    from kstack._gso import skb_gso_segment as compiled_segment
except ImportError:  # not built: the compiled cases say so
    compiled_segment = None

IMPLS = [pytest.param(skb_gso_segment_ref, id="python"),
         pytest.param(compiled_segment, id="cython",
                      marks=pytest.mark.skipif(compiled_segment is None, reason="kstack._gso not built"))]


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


class Dev:
    counters: dict

    def __init__(self) -> None:
        self.counters = {}


def gso_skb(data: bytes, mss: int, partial: bool = False):
    """The large frame as an sk_buff at dev_queue_xmit (Ethernet header at data)."""
    pool = SkbPool()
    skb = pool.alloc(len(data), 64)
    skb.put_data(data)
    skb.network_header = skb.data + 14
    skb.transport_header = skb.data + 34
    skb.protocol = 0x0800
    skb.cb["gso_size"] = mss
    skb.dev = Dev()
    if partial:
        skb.ip_summed = CHECKSUM_PARTIAL
        skb.csum_start = skb.transport_header
        skb.csum_offset = 16
    return pool, skb


def split(impl, big: bytes, mss: int, partial: bool = False):
    pool, skb = gso_skb(big, mss, partial)
    dev = skb.dev
    segs = impl(skb)
    out = [(s.tobytes(), s.ip_summed, s.csum_start - s.data) for s in segs]
    for s in segs:
        s.consume()
    assert pool.live == 0
    return out, dev.counters


def test_split_gives_the_frames_a_sender_without_gso_sends(impl):
    ps = [payload(i) for i in range(5)] + [payload(5, 300)]
    big = frame(SEQ0, b"".join(ps), flags=ACK | PSH | FIN, ipid=40)
    out, counters = split(impl, big, 1448)
    seq = SEQ0
    want = []
    for i, p in enumerate(ps):
        last = i == len(ps) - 1
        want.append(frame(seq, p, flags=ACK | PSH | FIN if last else ACK, ipid=40 + i))
        seq += len(p)
    assert [f for f, _, _ in out] == want
    assert [len(f) - 66 for f, _, _ in out] == [1448] * 5 + [300]
    assert all(valid(f) for f, _, _ in out) and all(s == CHECKSUM_NONE for _, s, _ in out)
    assert counters == {"gso_packets": 1, "gso_wire_packets": 6, "gso_bytes": 5 * 1448 + 300}


def test_cwr_only_on_the_first_segment(impl):
    ps = [payload(i, 1000) for i in range(3)]
    out, _ = split(impl, frame(1, b"".join(ps), flags=ACK | CWR, ipid=0xFFFF), 1000)
    assert [f for f, _, _ in out] == [frame(1, ps[0], flags=ACK | CWR, ipid=0xFFFF),
                                      frame(1001, ps[1], ipid=0), frame(2001, ps[2], ipid=1)]


def test_checksum_partial_is_left_to_the_device_with_each_pseudo_header(impl):
    ps = [payload(i) for i in range(3)]
    big = bytearray(frame(SEQ0, b"".join(ps), ipid=7))
    out, _ = split(impl, bytes(big), 1448, partial=True)
    for i, (f, summed, start) in enumerate(out):
        assert summed == CHECKSUM_PARTIAL and start == 34
        seg_len = len(f) - 34
        assert f[50:52] == fold(pseudo_header_sum(SRC, DST, 6, seg_len)).to_bytes(2, "big")
        # what the device inserts (the fake device's TX IC) gives the frame without GSO
        done = bytearray(f)
        done[50:52] = (~fold(ones_sum(done[34:])) & 0xFFFF).to_bytes(2, "big")
        assert bytes(done) == frame(SEQ0 + 1448 * i, ps[i], ipid=7 + i)


def test_an_exact_multiple_has_no_short_tail(impl):
    ps = [payload(i, 500) for i in range(4)]
    out, counters = split(impl, frame(10, b"".join(ps), flags=ACK | PSH, ipid=1), 500)
    assert [len(f) - 66 for f, _, _ in out] == [500] * 4
    assert [f[47] for f, _, _ in out] == [ACK, ACK, ACK, ACK | PSH]
    assert counters["gso_wire_packets"] == 4


def _hosts(net, gso: bool, **kw):
    a = net.host("a", "198.18.0.1/24", **kw)
    b = net.host("b", B + "/24", **kw)
    for h in (a, b):
        if gso:
            h.dev.features |= NetdevFeatures.GSO
        else:
            h.dev.features &= ~NetdevFeatures.GSO
    return a, b


def _send_all(net, c, s, data: bytes, drop=None) -> bytes:
    got = bytearray()
    off = 0
    for _ in range(20000):
        if off < len(data):
            try:
                off += c.sendmsg(data[off:off + 65536], None)
            except BlockingIOError:
                pass
        net.advance(2 * MS)
        while True:
            try:
                b = s.recvmsg(1 << 20)[0]
            except BlockingIOError:
                break
            if not b:
                break
            got += b
        if len(got) >= len(data):
            return bytes(got)
    raise AssertionError(f"transfer stalled at {len(got)} of {len(data)}")


@pytest.mark.parametrize("csum", ["offload", "software"])
def test_tcp_with_gso_sends_mtu_frames_and_the_same_bytes(net, csum):  # noqa: F811
    kw = dict(tx_csum=True, rx_csum=True) if csum == "offload" else {}
    a, b = _hosts(net, True, **kw)
    L, c, s = established_pair(net, a, b)
    assert c.conn.config.gso_max_size == TCP_GSO_MAX_PAYLOAD
    sent = []
    orig = a.dev.ndo_start_xmit

    def xmit(skb, xmit_more=False):
        sent.append(skb.len)
        return orig(skb, xmit_more)

    a.dev.ndo_start_xmit = xmit
    data = random.Random(1).randbytes(3_000_000)
    assert _send_all(net, c, s, data) == data
    assert max(sent) <= 1514
    ctr = a.dev.counters
    assert ctr["gso_packets"] > 0 and ctr["gso_wire_packets"] > 4 * ctr["gso_packets"]
    assert b.stack.snmp.get("TcpInCsumErrors", 0) == 0
    for x in (c, s, L):
        x.close()
    net.advance(200 * MS)


def test_tcp_with_gso_off_sends_no_gso_segment(net):  # noqa: F811
    a, b = _hosts(net, False)
    L, c, s = established_pair(net, a, b)
    assert c.conn.config.gso_max_size == 0
    data = random.Random(2).randbytes(500_000)
    assert _send_all(net, c, s, data) == data
    assert a.dev.counters.get("gso_packets", 0) == 0
    for x in (c, s, L):
        x.close()
    net.advance(200 * MS)


def test_tcp_with_gso_under_loss_is_byte_exact(net):  # noqa: F811
    a, b = _hosts(net, True, tx_csum=True, rx_csum=True)
    L, c, s = established_pair(net, a, b)
    rnd = random.Random(3)
    orig = a.dev.ndo_start_xmit

    def lossy(skb, xmit_more=False):
        if skb.len > 1000 and rnd.random() < 0.03:
            skb.consume()  # lost on the cable
            return 0
        return orig(skb, xmit_more)

    a.dev.ndo_start_xmit = lossy
    data = rnd.randbytes(2_000_000)
    assert _send_all(net, c, s, data) == data
    assert a.stack.snmp["TcpRetransSegs"] > 0
    for x in (c, s, L):
        x.close()
    net.advance(200 * MS)


def test_the_selected_gso_is_the_compiled_one_when_built():
    compiled = compiled_segment if os.environ.get("NICEMU_PY_GSO") != "1" else None  # NICEMU_PY_GSO=1 forces the twin
    assert gso_mod.skb_gso_segment is (compiled or skb_gso_segment_ref)
    assert gso_mod.KIND == ("cython" if compiled is not None else "python")


# --- the compiled GSO against its twin -----------------------------------------------------------

def _segment_all(impl, big: bytes, mss: int, partial: bool, at_ip: bool) -> tuple:
    """Split `big` with `impl`; what came out: each segment's bytes and metadata, the
    counters, the pool's counts. at_ip: skb.data at the IP header (ip_finish_output_gso)."""
    pool, skb = gso_skb(big, mss, partial)
    skb.priority, skb.mark, skb.tstamp, skb.pkt_type, skb.sk = 6, 0x55, 123456789, 4, object()
    if at_ip:
        skb.pull(14)
    dev, sk = skb.dev, skb.sk
    segs = impl(skb, skb.data) if at_ip else impl(skb)
    out = []
    for s in segs:
        assert s.dev is dev and s.sk is sk
        out.append((s.tobytes(), s.ip_summed, s.csum_start - s.data if s.csum_start else 0,
                    s.csum_offset, s.mac_header - s.data if s.mac_header >= 0 else -1,
                    s.network_header - s.data, s.transport_header - s.data, s.protocol,
                    s.priority, s.mark, s.tstamp, s.pkt_type))
        s.consume()
    return out, dev.counters, (pool.allocs, pool.frees, pool.live, pool.bytes_copied, pool.cache_hits)


@pytest.mark.skipif(compiled_segment is None, reason="kstack._gso not built")
@pytest.mark.parametrize("seed", range(40))
def test_compiled_gso_equals_its_twin_on_random_segments(seed):
    rng = random.Random(seed)
    mss = rng.choice((1448, 1460, 536, 1, 7, rng.randrange(1, 1461)))
    n = rng.choice((0, 1, mss - 1, mss, mss + 1, 3 * mss, rng.randrange(0, 64000 // max(mss, 40) * mss + 1)))
    n = max(0, min(n, 65000))
    flags = ACK | rng.choice((0, PSH, FIN, PSH | FIN, CWR, CWR | ECE | PSH))
    opts = rng.choice((b"", TS, b"\x01\x01\x05\x0a" + bytes(8) + TS))
    ip_opts = rng.choice((b"", b"\x01\x01\x01\x00"))
    big = frame(rng.choice((SEQ0, rng.randrange(1 << 32))), rng.randbytes(n), flags=flags,
                ipid=rng.choice((0xFFFF, 0xFFF0, rng.randrange(1 << 16))), opts=opts, ip_opts=ip_opts)
    partial, at_ip = rng.random() < 0.5, rng.random() < 0.3
    want = _segment_all(skb_gso_segment_ref, big, mss, partial, at_ip)
    got = _segment_all(compiled_segment, big, mss, partial, at_ip)
    assert got == want
    assert len(want[0]) == -(-n // mss)
    if not partial and not ip_opts and not at_ip:
        assert all(valid(f[0]) for f in want[0])
