"""TCP opens: both sides of the handshake, simultaneous open, option negotiation with and
without each option, SYN and SYN-ACK retries, refused connections, ISS near 2^32."""
import collections
import errno

import pytest

from kstack.tcp import TcpConfig, TcpConnection, TcpEvent, TcpState
from test_tcp_link import A_ADDR, B_ADDR, MS, Link, established_pair, pair, transfer
from wire.tcp import TH_ACK, TH_RST, TH_SYN, TcpSegment

S = 1_000_000_000


def active(cfg=None, iss=1000):
    counters = collections.Counter()
    c = TcpConnection((A_ADDR, 40000), (B_ADDR, 80), cfg or TcpConfig(), counters, iss)
    c.open_active(0)
    return c, counters


def test_handshake_both_sides_and_counters():
    link, counters = established_pair()
    a, b = link.a, link.b
    assert a.state == b.state == TcpState.ESTABLISHED
    assert counters["TcpActiveOpens"] == 1 and counters["TcpPassiveOpens"] == 1
    assert a.take_events() & TcpEvent.ESTABLISHED and b.take_events() & TcpEvent.ESTABLISHED
    syn, synack, ack = (s for _, s in link.log[:3])
    assert syn.flags == TH_SYN and synack.flags == TH_SYN | TH_ACK and ack.flags == TH_ACK
    assert synack.ack == syn.seq + 1 and ack.ack == synack.seq + 1
    assert a.info()["ts"] and a.info()["sack"] and a.info()["wscale"] == (2, 2)
    assert a.next_deadline() is None and b.next_deadline() is None


@pytest.mark.parametrize("opt", ["window_scaling", "timestamps", "sack"])
@pytest.mark.parametrize("side", ["a", "b"])
def test_negotiation_without_one_option(opt, side):
    cfg_a, cfg_b = TcpConfig(), TcpConfig()
    setattr(cfg_a if side == "a" else cfg_b, opt, False)
    link, _ = established_pair(cfg_a=cfg_a, cfg_b=cfg_b)
    synack = link.log[1][1]
    for c in (link.a, link.b):
        i = c.info()
        assert i["ts"] == (opt != "timestamps")
        assert i["sack"] == (opt != "sack")
        assert (i["wscale"] is not None) == (opt != "window_scaling")
        # timestamps cost 12 bytes of every segment
        assert i["mss"] == 1460 - (12 if opt != "timestamps" else 0)
    # the SYN-ACK carries only what the SYN offered
    if side == "a":
        assert {"window_scaling": synack.wscale, "timestamps": synack.tsval,
                "sack": synack.sack_permitted or None}[opt] is None
    assert transfer(link, link.a, b"x" * 100000) == b"x" * 100000


def test_mss_honoured_and_default_536_without_option():
    c, _ = active()
    c.segments_to_send(0)
    c.segment_arrives(TcpSegment(80, 40000, 9000, 1001, TH_SYN | TH_ACK, 65535), 1 * MS)
    assert c.state == TcpState.ESTABLISHED and c.mss == 536 and not c.ts_ok and not c.ws_ok
    c.send(b"y" * 2000, 1 * MS)
    segs = [s for s in c.segments_to_send(1 * MS) if s.payload]
    assert [len(s.payload) for s in segs] == [536, 536, 536, 392]
    d, _ = active()
    d.segments_to_send(0)
    d.segment_arrives(TcpSegment(80, 40000, 9000, 1001, TH_SYN | TH_ACK, 65535, mss=1000), 1 * MS)
    assert d.mss == 1000


def test_simultaneous_open():
    counters = collections.Counter()
    a = TcpConnection((A_ADDR, 1), (B_ADDR, 2), TcpConfig(), counters, 100)
    b = TcpConnection((B_ADDR, 2), (A_ADDR, 1), TcpConfig(), counters, 700)
    link = Link(a, b)
    a.open_active(0)
    b.open_active(0)
    link.run(until=lambda: a.state == b.state == TcpState.ESTABLISHED, horizon=5 * S)
    assert a.state == b.state == TcpState.ESTABLISHED
    assert any(s.flags == TH_SYN | TH_ACK for _, s in link.log)
    assert counters["TcpExtTCPChallengeACK"] == 0
    assert transfer(link, a, b"both") == b"both" and transfer(link, b, b"ways") == b"ways"


def test_syn_retries_back_off_then_etimedout():
    c, counters = active(TcpConfig(syn_retries=3))
    times = []
    now = 0
    while c.state != TcpState.CLOSED:
        if c.segments_to_send(now):
            times.append(now)
        now = c.next_deadline()
        c.timer_expired(now)
    assert [t // S for t in times] == [0, 1, 3, 7]  # 1 s, doubled each time
    assert c.error == errno.ETIMEDOUT and counters["TcpAttemptFails"] == 1
    with pytest.raises(OSError) as e:
        c.recv(10)
    assert e.value.errno == errno.ETIMEDOUT


def test_synack_retries_then_closed():
    link, counters = pair(cfg_b=TcpConfig(synack_retries=2))
    link.drop = lambda s, f: f == "b"
    link.run(horizon=60 * S)
    b = link.b
    assert b.state == TcpState.CLOSED and counters["TcpAttemptFails"] >= 1
    assert sum(1 for f, s in link.log if f == "b" and s.flags & TH_SYN) >= 3  # + answers to SYN retransmits


def test_retransmitted_syn_gets_the_synack_again():
    link, _ = pair()
    link.drop = lambda s, f: f == "b" and s.flags & TH_SYN and link.now < 500 * MS
    link.run(until=lambda: isinstance(link.b, TcpConnection) and link.b.state == TcpState.ESTABLISHED)
    assert link.a.state == TcpState.ESTABLISHED


def test_rst_to_syn_is_connection_refused():
    c, counters = active()
    syn = c.segments_to_send(0)[0]
    c.segment_arrives(TcpSegment(80, 40000, 0, syn.seq + 1, TH_RST | TH_ACK, 0), 1 * MS)
    assert c.state == TcpState.CLOSED and c.error == errno.ECONNREFUSED
    assert c.take_events() & TcpEvent.RESET and counters["TcpAttemptFails"] == 1


def test_syn_sent_ignores_rst_without_acceptable_ack_and_resets_bad_ack():
    c, counters = active()
    c.segments_to_send(0)
    assert c.segment_arrives(TcpSegment(80, 40000, 0, 0, TH_RST, 0), 1 * MS) is not None
    assert c.state == TcpState.SYN_SENT
    c.segment_arrives(TcpSegment(80, 40000, 5, 999, TH_ACK, 0), 1 * MS)  # ack <= ISS
    out = c.segments_to_send(1 * MS)
    assert out[0].flags == TH_RST and out[0].seq == 999 and c.state == TcpState.SYN_SENT
    # a RST with a bad ACK is dropped, not answered
    c.segment_arrives(TcpSegment(80, 40000, 5, 999, TH_ACK | TH_RST, 0), 1 * MS)
    assert c.segments_to_send(1 * MS) == [] and c.state == TcpState.SYN_SENT


def test_sequence_numbers_wrap_past_2_32():
    link, _ = established_pair(iss_a=0xFFFFFFFF - 3000, iss_b=0xFFFFFFFF - 10)
    data = bytes(range(256)) * 400
    assert transfer(link, link.a, data) == data
    assert transfer(link, link.b, data) == data
    assert link.a.snd_nxt < 0x10000000 and link.b.snd_nxt < 0x10000000  # both wrapped
