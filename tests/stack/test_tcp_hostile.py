"""Hostile TCP input: random flags, sequence numbers, options and lengths into an established
connection (and random bytes into the parser): no exception, bounded memory, every drop named."""
import random

from kstack.dropreason import SkbDropReason
from kstack.tcp import TcpConfig, TcpState
from test_tcp_link import established_pair, transfer
from wire import MalformedPacket
from wire.tcp import TcpSegment


def random_segment(rng, c):
    near = [c.rcv_nxt, c.rcv_nxt + rng.randrange(1, 200000), c.rcv_nxt - rng.randrange(1, 5000),
            rng.getrandbits(32)]
    acks = [c.snd_una, c.snd_nxt, c.snd_nxt + rng.randrange(1, 100000), rng.getrandbits(32)]
    seg = TcpSegment(c.rport, c.lport, rng.choice(near) & 0xFFFFFFFF, rng.choice(acks) & 0xFFFFFFFF,
                     rng.getrandbits(8), rng.getrandbits(16), rng.randbytes(rng.choice([0, 1, 100, 1448, 3000])))
    if seg.flags & 0x04 and seg.seq == c.rcv_nxt:
        seg.flags &= ~0x04  # an exact RST ends the test (test_tcp_close covers it)
    if rng.random() < 0.5:
        seg.tsval, seg.tsecr = rng.choice([c.ts_recent + 1, rng.getrandbits(32)]) & 0xFFFFFFFF, rng.getrandbits(32)
    if rng.random() < 0.3:
        seg.sack = tuple((rng.getrandbits(32), rng.getrandbits(32)) for _ in range(rng.randrange(1, 4)))
    if rng.random() < 0.1:
        seg.mss, seg.wscale = rng.getrandbits(16), rng.getrandbits(8)
    return seg


def test_random_segments_no_crash_bounded_memory():
    rng = random.Random(9)
    cfg = TcpConfig(rcvbuf=65536)
    link, counters = established_pair(cfg_a=cfg)
    a = link.a
    drops = 0
    restarts = 0
    for i in range(20000):
        if a.state in (TcpState.CLOSED, TcpState.TIME_WAIT, TcpState.LAST_ACK, TcpState.CLOSING) \
                or (a.state != TcpState.ESTABLISHED and rng.random() < 0.01):
            link, counters = established_pair(cfg_a=cfg)  # a FIN or RST ended it: a new one
            a = link.a
            restarts += 1
        seg = random_segment(rng, a)
        r = a.segment_arrives(seg, link.now)
        if r is not None:
            drops += 1
        a.segments_to_send(link.now)
        assert a.ofo.charge <= cfg.rcvbuf
        assert len(a.rcvq) <= cfg.rcvbuf + (1 << a.rcv_wscale) + 3000
        assert len(a.sb.intervals) <= 64 and len(a.ctl) <= 8
        if len(a.rcvq) > 30000:
            a.recv(1 << 20)
        link.now += rng.randrange(0, 10_000_000)
        if a.next_deadline() is not None and a.next_deadline() <= link.now:
            a.timer_expired(link.now)
    assert restarts < 5000
    assert drops > 10000


def test_hostile_segments_then_peer_still_works():
    """Segments a blind attacker could send (no knowledge of the sequence numbers) leave the
    connection usable."""
    rng = random.Random(10)
    link, counters = established_pair()
    a = link.a
    for _ in range(5000):
        seg = TcpSegment(a.rport, a.lport, rng.getrandbits(32), rng.getrandbits(32),
                         rng.getrandbits(8), rng.getrandbits(16), rng.randbytes(rng.choice([0, 10])))
        a.segment_arrives(seg, link.now)
        link.now += 1_000_000
    assert a.state == TcpState.ESTABLISHED
    link.flush()
    assert transfer(link, link.b, b"z" * 50000) == b"z" * 50000


def test_parser_never_raises_anything_but_malformed():
    rng = random.Random(11)
    good = TcpSegment(1, 2, 3, 4, 0x10, 5, b"x", mss=1460, tsval=1, sack=((1, 2),)).emit()
    for _ in range(20000):
        b = bytearray(good if rng.random() < 0.7 else rng.randbytes(rng.randrange(0, 80)))
        for _ in range(rng.randrange(0, 4)):
            if b:
                b[rng.randrange(len(b))] = rng.getrandbits(8)
        try:
            TcpSegment.parse(bytes(b))
        except MalformedPacket:
            pass
