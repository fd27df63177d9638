"""kstack.ip_fragment: reassembly in every order, duplicates and overlaps as Linux handles
them, the timeout with ICMP time exceeded (code 1), the memory limit, hostile floods."""
import itertools

import pytest

from kstack.sock import SOCK_DGRAM
from kstack.stack import Sysctl
from kstack_fakes import S, frames_of, ip_frame, udp_payload
from kstack_fakes import net  # noqa: F401 (fixtures)
from wire.icmp import ICMP_EXC_FRAGTIME, ICMP_TIME_EXCEEDED, IcmpMessage
from wire.ipv4 import IP_MF

A, B = "198.18.0.1", "198.18.0.2"
DATA = bytes(i * 7 & 0xFF for i in range(3000))
SEG = udp_payload(A, B, 1234, 7, DATA)  # 3008 bytes of UDP


def setup(net, **sysctl):
    a = net.host("a", A + "/24")
    b = net.host("b", B + "/24", sysctl=Sysctl(**sysctl))
    net.settle()
    s = b.socket(SOCK_DGRAM)
    s.bind(("0.0.0.0", 7))
    return a, b, s


def frag(a, b, start, end, last=False, ident=77, data=SEG, proto=17, src=A):
    ff = (start >> 3) | (0 if last else IP_MF)
    return ip_frame(b.dev.dev_addr, a.dev.dev_addr, src, B, proto, data[start:end], ident=ident,
                    flags_frag=ff)


CUTS = [(0, 800), (800, 1600), (1600, 2400), (2400, 3008)]


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_every_order(net, order):
    a, b, s = setup(net)
    for i in order:
        st, en = CUTS[i]
        b.dev.receive(frag(a, b, st, en, last=i == 3))
    assert s.recvmsg(5000)[0] == DATA
    snmp = b.stack.snmp
    assert snmp["IpReasmReqds"] == 4 and snmp["IpReasmOKs"] == 1 and snmp["IpReasmFails"] == 0
    assert b.inet.frags.mem == 0 and not b.inet.frags.queues
    s.close()


def test_duplicates_dropped_alone(net):
    a, b, s = setup(net)
    b.dev.receive(frag(a, b, 0, 1600))
    b.dev.receive(frag(a, b, 0, 800))  # inside what we hold
    b.dev.receive(frag(a, b, 800, 1600))  # exact duplicate
    b.dev.receive(frag(a, b, 1600, 3008, last=True))
    assert s.recvmsg(5000)[0] == DATA
    assert b.stack.pool.drops["DUP_FRAG"] == 2
    assert b.stack.snmp["IpReasmOKs"] == 1
    s.close()


def test_overlap_discards_the_datagram(net):
    a, b, s = setup(net)
    b.dev.receive(frag(a, b, 0, 800))
    b.dev.receive(frag(a, b, 1600, 3008, last=True))
    b.dev.receive(frag(a, b, 400, 1200))  # partly new, partly old: RFC 5722 says discard all
    assert b.stack.snmp["IpReasmOverlaps"] == 1 and b.stack.snmp["IpReasmFails"] == 1
    assert b.stack.pool.drops["IP_FRAG_OVERLAP"] == 3
    assert not b.inet.frags.queues and b.inet.frags.mem == 0
    # the rest arriving later starts a new queue that never completes
    b.dev.receive(frag(a, b, 800, 1600))
    assert s.poll() & 1 == 0
    s.close()


def test_inconsistent_ends(net):
    a, b, s = setup(net)
    b.dev.receive(frag(a, b, 2400, 3008, last=True))
    b.dev.receive(frag(a, b, 8, 2400 + 8, last=True))  # a second, different end
    assert b.stack.snmp["IpReasmFails"] == 1
    b.dev.receive(frag(a, b, 8, 800, ident=78, last=True))
    b.dev.receive(frag(a, b, 800, 1600, ident=78))  # bytes beyond the known end
    assert b.stack.snmp["IpReasmFails"] == 2
    assert not b.inet.frags.queues
    s.close()


def test_tiny_and_unaligned(net):
    a, b, s = setup(net)
    b.dev.receive(frag(a, b, 0, 5))  # MF with less than 8 bytes: nothing left after rounding
    assert b.stack.pool.drops["PKT_TOO_SMALL"] == 1
    b.dev.receive(frag(a, b, 0, 803, ident=9))  # rounded down to 800
    b.dev.receive(frag(a, b, 800, 3008, ident=9, last=True))
    assert s.recvmsg(5000)[0] == DATA
    s.close()


def test_too_far(net):
    a, b, s = setup(net)
    big = bytes(2000)
    b.dev.receive(ip_frame(b.dev.dev_addr, a.dev.dev_addr, A, B, 17, big, ident=5,
                           flags_frag=(65000 >> 3)))
    assert b.stack.pool.drops["IP_FRAG_TOO_FAR"] == 1 and b.stack.snmp["IpReasmFails"] == 1
    s.close()


def test_timeout_sends_time_exceeded_when_first_fragment_held(net):
    a, b, s = setup(net)
    b.dev.receive(frag(a, b, 0, 800))
    b.dev.receive(frag(a, b, 800, 1600, ident=78))  # no fragment 0 in this one
    net.advance(b.stack.sysctl.ipfrag_time_s * S + 1)
    snmp = b.stack.snmp
    assert snmp["IpReasmTimeout"] == 2 and snmp["IpReasmFails"] == 2
    assert snmp["IcmpOutTimeExcds"] == 1
    assert b.stack.pool.drops["IP_FRAG_REASM_TIMEOUT"] == 2
    icmp = [f for f in frames_of(net.hub("lan")) if f[23] == 1][-1]
    m = IcmpMessage.parse(icmp[34:])
    assert (m.type, m.code) == (ICMP_TIME_EXCEEDED, ICMP_EXC_FRAGTIME)
    assert m.data[4:6] == (77).to_bytes(2, "big")  # the quoted header is fragment 0's
    assert a.stack.snmp["IcmpInTimeExcds"] == 1
    s.close()


def test_memory_limit_evicts_oldest(net):
    a, b, s = setup(net, ipfrag_high_thresh=40_000, ipfrag_low_thresh=30_000)
    for ident in range(100):
        b.dev.receive(frag(a, b, 0, 800, ident=ident))
        assert b.inet.frags.mem <= 40_000
    assert b.stack.snmp["IpReasmFails"] > 0
    assert b.stack.pool.drops["FRAG_INCOMPLETE"] > 0
    # the newest survive: the last one can still complete
    b.dev.receive(frag(a, b, 800, 3008, ident=99, last=True))
    assert s.recvmsg(5000)[0] == DATA
    s.close()


def test_queue_count_bounded(net):
    a, b, s = setup(net, ipfrag_max_queues=16)
    for ident in range(50):
        b.dev.receive(frag(a, b, 8, 16, ident=ident))
    assert len(b.inet.frags.queues) == 16
    assert b.stack.pool.drops["IP_FRAG_QUEUES"] == 34
    s.close()


def test_flood_that_never_completes(net):
    """Thousands of tiny fragments, overlaps and lies: nothing escapes, memory stays bounded,
    every skb comes back."""
    import random
    rnd = random.Random(5)
    a, b, s = setup(net, ipfrag_high_thresh=200_000, ipfrag_low_thresh=150_000)
    peak = 0
    for i in range(3000):
        ident = rnd.randrange(40)
        start = rnd.randrange(0, 8192, 8)
        ln = rnd.choice((1, 8, 16, 24, 600))
        data = bytes(rnd.randrange(256) for _ in range(8)) * 80
        b.dev.receive(ip_frame(b.dev.dev_addr, a.dev.dev_addr, A, B, rnd.choice((17, 1, 99)),
                               data[:ln], ident=ident, flags_frag=(start >> 3) | (IP_MF if rnd.random() < 0.9 else 0)))
        peak = max(peak, b.inet.frags.mem)
        if i % 500 == 0:
            net.t[0] += 5 * S
            b.stack.run_timers(net.t[0])
    assert peak <= 200_000
    live_frags = sum(len(q.frags) for q in b.inet.frags.queues.values())
    assert b.stack.pool.live == live_frags
    net.advance(60 * S)
    assert not b.inet.frags.queues and b.inet.frags.mem == 0 and b.stack.pool.live == 0
    s.close()
