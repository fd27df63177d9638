"""kstack.ipv4: ip_rcv's checks in Linux's order with their counters, local delivery by
protocol, forwarding through a middle stack (TTL, ICMP time exceeded, frag needed with DF),
fragmentation on output, hostile input."""
import pytest

from kstack.sock import SOCK_DGRAM
from kstack.stack import Sysctl
from kstack_fakes import FakeDevice, frames_of, ip_frame, udp_payload
from kstack_fakes import net, pair  # noqa: F401 (fixtures)
from test_wire_ipv4 import naive_csum
from wire.icmp import ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, ICMP_TIME_EXCEEDED, IcmpMessage
from wire.ipv4 import Ipv4Header, addr_to_int


def send_to_b(a, b, frame):
    b.dev.receive(frame)


def mk(a, b, payload=b"", **kw):
    kw.setdefault("proto", 17)
    return ip_frame(b.dev.dev_addr, a.dev.dev_addr, "198.18.0.1", "198.18.0.2", payload=payload, **kw)


def test_deliver_and_padding_trimmed(net, pair):
    a, b = pair
    s = b.socket(SOCK_DGRAM)
    s.bind(("0.0.0.0", 7))
    seg = udp_payload("198.18.0.1", "198.18.0.2", 1000, 7, b"hi")
    b.dev.receive(mk(a, b, seg) + bytes(20))  # Ethernet padding
    assert s.recvmsg(100) == (b"hi", ("198.18.0.1", 1000))
    snmp = b.stack.snmp
    assert snmp["IpInReceives"] == 1 and snmp["IpInDelivers"] == 1 and snmp["UdpInDatagrams"] == 1
    s.close()


@pytest.mark.parametrize("frame_fn, counter, reason", [
    (lambda a, b: mk(a, b)[:14 + 19], "IpInHdrErrors", "IP_INHDR"),
    (lambda a, b: (lambda f: f[:14] + bytes([0x65]) + f[15:])(mk(a, b, b"x" * 8)), "IpInHdrErrors", "IP_INHDR"),
    (lambda a, b: (lambda f: f[:14] + bytes([0x44]) + f[15:])(mk(a, b, b"x" * 8)), "IpInHdrErrors", "IP_INHDR"),
    (lambda a, b: (lambda f: f[:14] + bytes([0x4F]) + f[15:])(mk(a, b, b"x" * 8)), "IpInHdrErrors", "IP_INHDR"),
    (lambda a, b: (lambda f: f[:24] + b"\0\0" + f[26:])(mk(a, b, b"x" * 8)), "IpInCsumErrors", "IP_CSUM"),
    (lambda a, b: mk(a, b, b"x" * 8, total_length=200), "IpInTruncatedPkts", "PKT_TOO_SMALL"),
    (lambda a, b: mk(a, b, b"x" * 8, total_length=12), "IpInHdrErrors", "IP_INHDR"),
    (lambda a, b: mk(a, b, b"x" * 8, options=b"\x07\x09\x04\x00"), "IpInHdrErrors", "IP_INHDR"),
])
def test_header_errors(net, pair, frame_fn, counter, reason):
    a, b = pair
    b.dev.receive(frame_fn(a, b))
    net.settle()
    assert b.stack.snmp[counter] == 1
    assert b.stack.pool.drops[reason] == 1
    assert b.stack.snmp["IpInDelivers"] == 0


def test_not_ours_without_forwarding(net, pair):
    a, b = pair
    f = ip_frame(b.dev.dev_addr, a.dev.dev_addr, "198.18.0.1", "198.19.5.5", 17, b"x" * 8)
    b.dev.receive(f)
    assert b.stack.snmp["IpInAddrErrors"] == 1 and b.stack.pool.drops["IP_INADDRERRORS"] == 1


def test_martians(net, pair):
    a, b = pair
    for src in ("224.0.0.1", "127.0.0.1", "198.18.0.2", "255.255.255.255"):
        b.dev.receive(ip_frame(b.dev.dev_addr, a.dev.dev_addr, src, "198.18.0.2", 17, b"x" * 8))
    assert b.stack.pool.drops["IP_INVALID_SOURCE"] == 4
    b.dev.receive(ip_frame(b.dev.dev_addr, a.dev.dev_addr, "198.18.0.1", "127.0.0.1", 17, b"x" * 8))
    assert b.stack.pool.drops["IP_INVALID_DEST"] == 1


def test_unknown_protocol_gets_icmp(net, pair):
    a, b = pair
    b.dev.receive(mk(a, b, b"x" * 8, proto=99))
    net.settle()
    assert b.stack.snmp["IpInUnknownProtos"] == 1
    assert a.stack.snmp["IcmpInDestUnreachs"] == 1
    assert b.stack.snmp["IcmpMsgOutType3"] == 1


def test_fragmentation_on_output(net, pair):
    a, b = pair
    s = b.socket(SOCK_DGRAM)
    s.bind(("0.0.0.0", 7))
    c = a.socket(SOCK_DGRAM)
    data = bytes(range(256)) * 16  # 4096 bytes
    c.sendmsg(data, ("198.18.0.2", 7))
    net.settle()
    frags = [f for f in frames_of(net.hub("lan")) if f[:6] == b.dev.dev_addr]
    assert len(frags) == 3
    offs = []
    for f in frags:
        h = Ipv4Header.parse(f[14:])
        assert naive_csum(f[14:34]) == 0 and len(f) - 14 <= 1500 and not h.dont_fragment
        offs.append((h.frag_offset, h.more_fragments, h.total_length - 20))
    assert offs == [(0, True, 1480), (1480, True, 1480), (2960, False, 4104 - 2960)]
    assert a.stack.snmp["IpFragOKs"] == 1 and a.stack.snmp["IpFragCreates"] == 3
    assert s.recvmsg(9000)[0] == data
    assert b.stack.snmp["IpReasmOKs"] == 1
    s.close()
    c.close()


def test_small_datagram_has_df_and_ids_increase(net, pair):
    a, b = pair
    c = a.socket(SOCK_DGRAM)
    for _ in range(3):
        c.sendmsg(b"x", ("198.18.0.2", 9))
    net.settle()
    hs = [Ipv4Header.parse(f[14:]) for f in frames_of(net.hub("lan")) if f[:6] == b.dev.dev_addr
          and f[23] == 17]
    assert all(h.dont_fragment for h in hs)
    assert [h.ident for h in hs] == [hs[0].ident, hs[0].ident + 1, hs[0].ident + 2]
    c.close()


# --- forwarding through a router ------------------------------------------------------------

@pytest.fixture
def routed(net):
    """a (198.18.0.1/24) -- r (198.18.0.254 | 198.19.0.254, mtu 1000 on the right) -- c."""
    a = net.host("a", "198.18.0.1/24", hub="left")
    r = net.host("r", "198.18.0.254/24", hub="left", sysctl=Sysctl(ip_forward=True))
    r.add_dev(FakeDevice("eth1", net.mac(), mtu=1000), net.hub("right"), "198.19.0.254/24")
    c = net.host("c", "198.19.0.1/24", hub="right")
    a.inet.add_route("0.0.0.0/0", via="198.18.0.254")
    c.inet.add_route("default", via="198.19.0.254")
    net.settle()
    return a, r, c


def test_forward_udp_both_ways(net, routed):
    a, r, c = routed
    sc = c.socket(SOCK_DGRAM)
    sc.bind(("198.19.0.1", 5000))
    sa = a.socket(SOCK_DGRAM)
    sa.sendmsg(b"over the router", ("198.19.0.1", 5000))
    net.settle()
    data, addr = sc.recvmsg(100)
    assert data == b"over the router" and addr[0] == "198.18.0.1"
    sc.sendmsg(b"back", addr)
    net.settle()
    assert sa.recvmsg(100) == (b"back", ("198.19.0.1", 5000))
    assert r.stack.snmp["IpForwDatagrams"] == 2
    # the TTL went down by one, the checksum still right
    fwd = [f for f in frames_of(net.hub("right")) if f[23] == 17][0]
    assert fwd[22] == 63 and naive_csum(fwd[14:34]) == 0
    sa.close()
    sc.close()


def test_forward_fragments_when_mtu_smaller(net, routed):
    a, r, c = routed
    sc = c.socket(SOCK_DGRAM)
    sc.bind(("0.0.0.0", 5000))
    sa = a.socket(SOCK_DGRAM)
    sa.sendmsg(b"z" * 1400, ("198.19.0.1", 5000))  # fits a's 1500 (DF set) ... but not r's 1000
    net.settle()
    # DF was set (fits the first MTU): the router says frag needed with its MTU
    assert r.stack.snmp["IpFragFails"] == 1
    assert a.stack.snmp["IcmpInDestUnreachs"] == 1
    icmp = [f for f in frames_of(net.hub("left")) if f[23] == 1 and f[:6] == a.dev.dev_addr][-1]
    m = IcmpMessage.parse(icmp[34:])
    assert (m.type, m.code, m.rest & 0xFFFF) == (ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 1000)
    # RFC 1191: a learned the path MTU; the same datagram now leaves a in fragments of at
    # most 1000 bytes, which the router forwards as they are
    assert a.inet.ip.path_mtu(a.inet.route_get("198.19.0.1"), addr_to_int("198.19.0.1")) == 1000
    sa.sendmsg(b"z" * 1400, ("198.19.0.1", 5000))
    sa.sendmsg(b"y" * 3000, ("198.19.0.1", 5000))
    net.settle()
    assert sc.recvmsg(5000)[0] == b"z" * 1400
    assert sc.recvmsg(5000)[0] == b"y" * 3000
    assert a.stack.snmp["IpFragCreates"] == 2 + 4 and r.stack.snmp["IpFragCreates"] == 0
    assert all(len(f) - 14 <= 1000 for f in frames_of(net.hub("right")))
    # an absurd MTU is raised to min_pmtu (552)
    a.inet.ip.update_pmtu(addr_to_int("198.19.0.9"), 68, net.t[0])
    assert a.inet.ip.pmtu[addr_to_int("198.19.0.9")][0] == 552
    sa.close()
    sc.close()


def test_ttl_exceeded(net, routed):
    a, r, c = routed
    rmac = r.devs["eth0"].dev_addr
    a.dev.sent.append(ip_frame(rmac, a.dev.dev_addr, "198.18.0.1", "198.19.0.1", 17,
                               udp_payload("198.18.0.1", "198.19.0.1", 1, 2, b"x"), ttl=1))
    net.settle()
    assert r.stack.snmp["IpInHdrErrors"] == 1 and r.stack.snmp["IcmpOutTimeExcds"] == 1
    assert r.stack.pool.drops["IP_TTL_EXCEEDED"] == 1
    icmp = [f for f in frames_of(net.hub("left")) if f[23] == 1][-1]
    m = IcmpMessage.parse(icmp[34:])
    assert m.type == ICMP_TIME_EXCEEDED and m.code == 0
    assert Ipv4Header.parse(icmp[14:]).src == addr_to_int("198.18.0.254")
    assert icmp[15] & 0xC0 == 0xC0  # precedence internetwork control
    quoted = m.data  # the offending header, first
    assert quoted[12:20] == bytes([198, 18, 0, 1, 198, 19, 0, 1])
    assert c.stack.snmp["IpInReceives"] == 0


def test_forward_no_route(net, routed):
    a, r, c = routed
    rmac = r.devs["eth0"].dev_addr
    a.dev.sent.append(ip_frame(rmac, a.dev.dev_addr, "198.18.0.1", "203.0.113.9", 17, b"x" * 8))
    net.settle()
    assert r.stack.snmp["IpInNoRoutes"] == 1 and r.stack.pool.drops["IP_INNOROUTES"] == 1
    assert a.stack.snmp["IcmpInDestUnreachs"] == 1


def test_send_to_self_loops_back(net, pair):
    a, b = pair
    s = a.socket(SOCK_DGRAM)
    s.bind(("198.18.0.1", 7))
    c = a.socket(SOCK_DGRAM)
    c.sendmsg(b"me", ("198.18.0.1", 7))
    net.settle()
    assert s.recvmsg(10)[0] == b"me"
    assert not [f for _, f in net.hub("lan").log if f[23:24] == b"\x11" and f[:6] == a.dev.dev_addr]
    s.close()
    c.close()


def test_forwarded_options_and_fragments(net, routed):
    """A datagram with options, fragmented at the router: the copied option (0x94, router
    alert, copied flag set) stays in every fragment, a non-copied one (0x07, record route)
    becomes NOOPs after the first; every header checksum is right."""
    a, r, c = routed
    sc = c.socket(SOCK_DGRAM)
    sc.bind(("0.0.0.0", 5000))
    rmac = r.devs["eth0"].dev_addr
    opts = b"\x94\x04\x00\x00" + b"\x07\x07\x04" + bytes(4) + b"\x00"  # RA, RR (ptr 4), end
    seg = udp_payload("198.18.0.1", "198.19.0.1", 1, 5000, b"o" * 1400)
    a.dev.sent.append(ip_frame(rmac, a.dev.dev_addr, "198.18.0.1", "198.19.0.1", 17, seg, options=opts))
    net.settle()
    frs = [f for f in frames_of(net.hub("right")) if f[23] == 17]
    assert len(frs) == 2
    for i, f in enumerate(frs):
        ihl = (f[14] & 15) * 4
        assert ihl == 32 and naive_csum(f[14:14 + ihl]) == 0
        assert f[34:38] == b"\x94\x04\x00\x00"
        assert (f[38:45] == b"\x07\x07\x04" + bytes(4)) if i == 0 else (f[38:45] == b"\x01" * 7)
    assert sc.recvmsg(2000)[0] == b"o" * 1400
    sc.close()


def test_bad_options_parameter_problem_and_source_route(net, pair):
    a, b = pair
    b.dev.receive(mk(a, b, b"x" * 8, options=b"\x07\x09\x04\x00"))  # RR whose length runs past
    net.settle()
    assert b.stack.snmp["IpInHdrErrors"] == 1 and b.stack.snmp["IcmpOutParmProbs"] == 1
    icmp = [f for f in frames_of(net.hub("lan")) if f[23] == 1][-1]
    m = IcmpMessage.parse(icmp[34:])
    assert m.type == 12 and m.rest >> 24 == 21  # the length octet of the option at 20
    b.dev.receive(mk(a, b, b"x" * 8, options=b"\x89\x07\x04" + bytes(4) + b"\x00"))  # SSRR
    assert b.stack.pool.drops["IP_SOURCE_ROUTE"] == 1 and b.stack.snmp["IpInHdrErrors"] == 1
