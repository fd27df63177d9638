"""TCP data transfer: both ways, loss and RTO backoff, fast retransmit on three duplicate
ACKs (NewReno), SACK recovery of several holes, out-of-order arrival, zero window and
persist probes, delayed ACK, and a megabyte through a lossy, reordering, duplicating link."""
import errno
import random

import pytest

from kstack.tcp import TcpConfig, TcpState
from test_tcp_link import MS, established_pair, transfer

S = 1_000_000_000


def data_segs(link, frm="a"):
    return [s for f, s in link.log if f == frm and s.payload]


def test_data_both_ways_and_delayed_ack():
    link, counters = established_pair()
    assert transfer(link, link.a, b"warm") == b"warm"  # the read opens the window past the SYN's 64K
    link.run(horizon=link.now + 1 * S)
    before = counters["TcpExtDelayedACKs"]
    assert transfer(link, link.a, b"ping") == b"ping"
    link.run(horizon=link.now + 1 * S)
    assert counters["TcpExtDelayedACKs"] == before + 1  # one small segment: ACKed by the timer
    assert transfer(link, link.b, b"pong" * 10000) == b"pong" * 10000
    # every second full-sized segment is ACKed at once
    acks = [s for f, s in link.log if f == "a" and not s.payload and s.ack > link.b.iss + 2]
    assert 5 <= len(acks) <= 20


def test_rto_retransmits_with_backoff_then_etimedout():
    link, counters = established_pair(cfg_a=TcpConfig(retries2=4))
    link.drop = lambda s, f: f == "a" and bool(s.payload)
    link.a.send(b"lost", link.now)
    link.run(horizon=link.now + 120 * S)
    times = [t for t in (None,)]  # noqa: F841
    segs = data_segs(link)
    assert len(segs) == 5 and all(bytes(s.payload) == b"lost" for s in segs)
    assert counters["TcpExtTCPTimeouts"] == 4 and counters["TcpRetransSegs"] == 4
    assert link.a.state == TcpState.CLOSED and link.a.error == errno.ETIMEDOUT


def test_rto_backoff_doubles():
    link, counters = established_pair()
    a = link.a
    link.drop = lambda s, f: f == "a" and bool(s.payload)
    a.send(b"x", link.now)
    link.flush()
    t0 = link.now
    deadlines = []
    for _ in range(4):
        d = a.next_deadline()
        deadlines.append(d - t0)
        link.now = d
        a.timer_expired(d)
        link.flush()
        t0 = d
    assert deadlines[1] == 2 * deadlines[0] and deadlines[2] == 4 * deadlines[0]
    assert a.info()["backoff"] == 4
    link.drop = lambda s, f: False
    link.run(until=lambda: a.snd_una == a.snd_nxt)
    assert a.info()["backoff"] == 0


def test_fast_retransmit_on_three_dupacks_newreno():
    cfg = TcpConfig(sack=False)
    link, counters = established_pair(cfg_a=cfg, cfg_b=TcpConfig(sack=False))
    a = link.a
    first = a.snd_nxt
    link.drop = lambda s, f: f == "a" and s.payload and s.seq == first and not getattr(link, "_d", 0) \
        and setattr(link, "_d", 1) is None
    data = bytes(random.Random(3).randbytes(20 * 1448))
    assert transfer(link, a, data) == data
    assert counters["TcpExtTCPRenoRecovery"] == 1 and counters["TcpExtTCPFastRetrans"] >= 1
    assert counters["TcpExtTCPTimeouts"] == 0


def test_sack_recovery_of_several_holes():
    link, counters = established_pair()
    a = link.a
    base = a.snd_nxt
    holes = {base + 2 * 1448, base + 5 * 1448, base + 9 * 1448}
    dropped = set()

    def drop(s, f):
        if f == "a" and s.seq in holes and s.seq not in dropped:
            dropped.add(s.seq)
            return True
        return False
    link.drop = drop
    data = random.Random(4).randbytes(30 * 1448)
    assert transfer(link, a, data) == data
    assert dropped == holes
    assert counters["TcpExtTCPSackRecovery"] == 1 and counters["TcpExtTCPTimeouts"] == 0
    assert counters["TcpRetransSegs"] == 3
    assert any(s.sack for f, s in link.log if f == "b")


def test_out_of_order_arrival_is_reassembled_and_sacked():
    link, counters = established_pair()
    rng = random.Random(5)
    link.extra_delay = lambda s, f: rng.choice([0, 2 * MS, 5 * MS]) if f == "a" else 0
    data = random.Random(6).randbytes(200 * 1448)
    assert transfer(link, link.a, data) == data
    assert counters["TcpExtTCPOFOQueue"] > 0
    assert link.b.ofo.bytes == 0


def test_window_full_and_zero_window_probes():
    link, counters = established_pair(cfg_b=TcpConfig(rcvbuf=16384))
    a, b = link.a, link.b
    data = random.Random(7).randbytes(100000)
    sent = a.send(data, link.now)
    link.run(horizon=link.now + 1 * S)
    sent += a.send(data[sent:], link.now)  # the peer's buffer took the first sndbuf; queue more
    link.run(horizon=link.now + 10 * S)
    assert b.info()["rcv_wnd"] == 0 and len(b.rcvq) >= 16384 - 1448
    assert a.snd_wnd == 0 and a.t_persist is not None
    assert counters["TcpExtTCPWinProbe"] >= 3  # probes keep going, backed off
    assert a.state == TcpState.ESTABLISHED
    got = bytearray()
    while len(got) < len(data):
        if sent < len(data):
            sent += a.send(data[sent:sent + 65536], link.now)
        try:
            got += b.recv(1 << 20)
        except BlockingIOError:
            pass
        link.step()
    assert bytes(got) == data


def test_nodelay_sends_small_segments_at_once():
    link, _ = established_pair(cfg_a=TcpConfig(nodelay=False))
    a = link.a
    a.send(b"1", link.now)
    a.send(b"2", link.now)
    link.flush()
    a.send(b"3", link.now)
    link.flush()
    assert [bytes(s.payload) for s in data_segs(link)] == [b"12"]  # Nagle holds "3"
    link2, _ = established_pair(cfg_a=TcpConfig(nodelay=True))
    link2.a.send(b"1", link2.now)
    link2.flush()
    link2.a.send(b"2", link2.now)
    link2.flush()
    assert [bytes(s.payload) for s in data_segs(link2)] == [b"1", b"2"]


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("sack", [True, False])
def test_megabyte_through_lossy_reordering_link(seed, sack):
    cfg = TcpConfig(sack=sack)
    link, counters = established_pair(cfg_a=cfg, cfg_b=TcpConfig(sack=sack))
    rng = random.Random(seed)
    link.drop = lambda s, f: rng.random() < 0.03
    link.extra_delay = lambda s, f: rng.choice([0, 0, 0, 3 * MS])
    link.dup = lambda s, f: rng.random() < 0.01
    data = random.Random(seed + 10).randbytes(1 << 20)
    assert transfer(link, link.a, data) == data
    back = random.Random(seed + 20).randbytes(100000)
    assert transfer(link, link.b, back) == back
    assert counters["TcpRetransSegs"] > 0
