"""TCP closes and resets: FIN in each state, half-close, simultaneous close, TIME_WAIT,
close with unread data, and every RST case of RFC 9293 and RFC 5961 (with challenge ACKs,
their rate limit, ACK acceptability and PAWS)."""
import errno

import pytest

from kstack.tcp import SHUT_WR, TcpConfig, TcpEvent, TcpState
from test_tcp_link import MS, established_pair, transfer
from wire.tcp import TH_ACK, TH_FIN, TH_RST, TH_SYN, TcpSegment

S = 1_000_000_000
TW = TcpConfig(time_wait=2 * S)


def fast_pair(**kw):
    return established_pair(cfg_a=TcpConfig(time_wait=2 * S), cfg_b=TcpConfig(time_wait=2 * S), **kw)


def inject(link, to, seq, ack=None, flags=TH_ACK, payload=b"", window=1000, **kw):
    """A segment from the peer of `to`, straight into it (the link's clock)."""
    peer = link.peer(to)
    seg = TcpSegment(to.rport, to.lport, seq & 0xFFFFFFFF, (peer.rcv_nxt if ack is None else ack) & 0xFFFFFFFF,
                     flags, window, payload, **kw)
    if to.ts_ok and "tsval" not in kw:
        seg.tsval, seg.tsecr = to.ts_recent + 1, 0
    return to.segment_arrives(seg, link.now)


def test_orderly_close_and_time_wait():
    link, counters = fast_pair()
    a, b = link.a, link.b
    a.close(link.now)
    assert a.state == TcpState.FIN_WAIT_1
    link.run(until=lambda: b.state == TcpState.CLOSE_WAIT and a.state == TcpState.FIN_WAIT_2)
    assert b.recv(10) == b"" and b.take_events() & TcpEvent.READABLE
    b.close(link.now)
    assert b.state == TcpState.LAST_ACK
    link.run(until=lambda: a.state == TcpState.TIME_WAIT)
    link.run(until=lambda: b.state == TcpState.CLOSED)
    assert a.state == TcpState.TIME_WAIT
    t = link.now
    link.run(until=lambda: a.state == TcpState.CLOSED)
    assert link.now - t >= 1 * S and a.error == b.error == 0
    assert counters["TcpEstabResets"] == 0


def test_time_wait_reacks_a_retransmitted_fin_and_restarts():
    link, _ = fast_pair()
    a, b = link.a, link.b
    a.close(link.now)
    link.run(until=lambda: a.state == TcpState.FIN_WAIT_2)
    b.close(link.now)
    link.drop = lambda s, f: f == "a" and s.flags == TH_ACK  # a's ACK of the FIN is lost
    link.run(until=lambda: a.state == TcpState.TIME_WAIT)
    deadline = a.next_deadline()
    link.run(until=lambda: sum(1 for f, s in link.log if f == "b" and s.flags & TH_FIN) >= 2)
    link.drop = lambda s, f: False
    link.run(until=lambda: b.state == TcpState.CLOSED)
    assert a.state == TcpState.TIME_WAIT and a.next_deadline() > deadline  # restarted 2 MSL


def test_simultaneous_close_goes_through_closing():
    link, _ = fast_pair()
    a, b = link.a, link.b
    a.close(link.now)
    b.close(link.now)
    link.flush()
    states = set()
    link.run(until=lambda: (states.update((a.state, b.state)) or False)
             or a.state == b.state == TcpState.TIME_WAIT)
    assert TcpState.CLOSING in states
    link.run(until=lambda: a.state == b.state == TcpState.CLOSED)


def test_half_close_peer_keeps_sending():
    link, _ = fast_pair()
    a, b = link.a, link.b
    a.shutdown(SHUT_WR, link.now)
    link.run(until=lambda: b.state == TcpState.CLOSE_WAIT)
    with pytest.raises(BrokenPipeError):
        a.send(b"no", link.now)
    assert transfer(link, b, b"still talking" * 1000) == b"still talking" * 1000
    b.close(link.now)
    link.run(until=lambda: a.fin_received)
    assert a.recv(10) == b"" and a.state == TcpState.TIME_WAIT


def test_fin_with_data_and_fin_before_its_hole():
    link, _ = fast_pair()
    a, b = link.a, link.b
    first = a.snd_nxt
    link.drop = lambda s, f: f == "a" and s.seq == first and s.payload and not getattr(link, "_x", 0) \
        and setattr(link, "_x", 1) is None
    a.send(b"1" * 3000, link.now)
    a.close(link.now)
    link.run(until=lambda: b.state == TcpState.CLOSE_WAIT)
    assert b.recv(10000) == b"1" * 3000 and b.recv(1) == b""


def test_close_with_unread_data_sends_rst():
    link, counters = fast_pair()
    a, b = link.a, link.b
    a.send(b"unread", link.now)
    link.run(until=lambda: len(b.rcvq) == 6)
    b.close(link.now)
    assert b.state == TcpState.CLOSED and counters["TcpExtTCPAbortOnClose"] == 1
    link.run(until=lambda: a.state == TcpState.CLOSED)
    assert a.error == errno.ECONNRESET and counters["TcpOutRsts"] == 1
    with pytest.raises(ConnectionResetError):
        a.send(b"x", link.now)


def test_rst_exact_sequence_resets():
    link, counters = fast_pair()
    a = link.a
    assert inject(link, a, a.rcv_nxt, flags=TH_RST) is not None
    assert a.state == TcpState.CLOSED and a.error == errno.ECONNRESET
    assert counters["TcpEstabResets"] == 1
    assert a.segments_to_send(link.now) == []  # never a RST for a RST


def test_rst_in_window_gets_a_challenge_ack_rate_limited():
    link, counters = fast_pair()
    a = link.a
    inject(link, a, a.rcv_nxt + 100, flags=TH_RST)
    assert a.state == TcpState.ESTABLISHED and counters["TcpExtTCPChallengeACK"] == 1
    out = a.segments_to_send(link.now)
    assert len(out) == 1 and out[0].flags == TH_ACK and out[0].ack == a.rcv_nxt
    inject(link, a, a.rcv_nxt + 200, flags=TH_RST)  # within 500 ms: skipped
    assert counters["TcpExtTCPChallengeACK"] == 1 and a.segments_to_send(link.now) == []
    link.now += 600 * MS
    inject(link, a, a.rcv_nxt + 300, flags=TH_RST)
    assert counters["TcpExtTCPChallengeACK"] == 2


def test_rst_out_of_window_dropped_silently():
    link, _ = fast_pair()
    a = link.a
    inject(link, a, a.rcv_nxt + 10_000_000, flags=TH_RST)
    inject(link, a, a.rcv_nxt - 10, flags=TH_RST)
    assert a.state == TcpState.ESTABLISHED and a.segments_to_send(link.now) == []


def test_syn_in_established_gets_challenge_ack():
    link, counters = fast_pair()
    a = link.a
    inject(link, a, a.rcv_nxt + 5, flags=TH_SYN)
    assert a.state == TcpState.ESTABLISHED and counters["TcpExtTCPChallengeACK"] == 1
    link.now += 1 * S
    inject(link, a, 12345, flags=TH_SYN)  # out of window too (RFC 5961 4.2)
    assert counters["TcpExtTCPChallengeACK"] == 2


def test_ack_acceptability():
    link, counters = fast_pair()
    a = link.a
    r = inject(link, a, a.rcv_nxt, ack=a.snd_nxt + 1000, payload=b"data")
    assert r.name == "TCP_ACK_UNSENT_DATA" and not a.rcvq
    assert a.segments_to_send(link.now)[0].flags == TH_ACK
    link.now += 1 * S
    r = inject(link, a, a.rcv_nxt, ack=a.snd_una - 0x40000000, payload=b"data")
    assert r.name == "TCP_TOO_OLD_ACK" and counters["TcpExtTCPChallengeACK"] == 1
    assert inject(link, a, a.rcv_nxt, ack=a.snd_una, payload=b"good") is None and bytes(a.rcvq) == b"good"


def test_paws_drops_an_old_timestamp():
    link, counters = fast_pair()
    a = link.a
    r = inject(link, a, a.rcv_nxt, payload=b"old", tsval=(a.ts_recent - 10) & 0xFFFFFFFF, tsecr=0)
    assert r.name == "TCP_RFC7323_PAWS" and counters["TcpExtPAWSEstab"] == 1 and not a.rcvq


def test_rst_in_closing_states_just_closes():
    link, _ = fast_pair()
    a, b = link.a, link.b
    a.close(link.now)
    link.run(until=lambda: a.state == TcpState.FIN_WAIT_2)
    inject(link, a, a.rcv_nxt, flags=TH_RST)
    assert a.state == TcpState.CLOSED
    inject(link, b, b.rcv_nxt, flags=TH_RST)  # CLOSE_WAIT: connection reset
    assert b.state == TcpState.CLOSED and b.error == errno.ECONNRESET


def test_orphan_data_after_close_resets():
    link, counters = fast_pair()
    a = link.a
    a.close(link.now)
    link.flush()
    inject(link, a, a.rcv_nxt, payload=b"late")
    assert a.state == TcpState.CLOSED and counters["TcpExtTCPAbortOnData"] == 1


def test_keepalive_probes_then_etimedout():
    cfg = TcpConfig(keepalive=True, keepalive_time=10 * S, keepalive_intvl=1 * S, keepalive_probes=3)
    link, _ = established_pair(cfg_a=cfg)
    a = link.a
    link.run(horizon=link.now + 15 * S)
    assert a.state == TcpState.ESTABLISHED  # b answers the probes
    probes = [s for f, s in link.log if f == "a" and s.seq == (a.snd_una - 1) & 0xFFFFFFFF]
    assert probes
    link.drop = lambda s, f: True
    link.run(horizon=link.now + 60 * S)
    assert a.state == TcpState.CLOSED and a.error == errno.ETIMEDOUT
