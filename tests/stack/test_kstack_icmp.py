"""kstack.icmp and kstack.raw: ping through a raw socket, echo replies, the error rules of RFC
1122 3.2.2 and Linux's rate limits (per destination and global)."""
import errno

import pytest

from kstack.sock import IPPROTO_ICMP, POLLIN, SOCK_DGRAM, SOCK_RAW
from kstack.stack import Sysctl
from kstack_fakes import MS, S, frames_of, ip_frame, udp_payload
from kstack_fakes import net  # noqa: F401 (fixtures)
from test_wire_ipv4 import naive_csum
from wire.icmp import ICMP_DEST_UNREACH, ICMP_ECHOREPLY, ICMP_PORT_UNREACH, IcmpMessage
from wire.ipv4 import Ipv4Header


def pair(net, **sysctl):
    a = net.host("a", "198.18.0.1/24")
    b = net.host("b", "198.18.0.2/24", sysctl=Sysctl(**sysctl))
    net.settle()
    return a, b


@pytest.mark.parametrize("size", [56, 1472, 4000])
def test_ping(net, size):
    a, b = pair(net)
    r = a.socket(SOCK_RAW, IPPROTO_ICMP)
    payload = bytes(i & 0xFF for i in range(size))
    r.sendmsg(IcmpMessage.echo(0x4242, 7, payload).emit(), ("198.18.0.2", 0))
    net.settle()
    dgram, addr = r.recvmsg(70000)
    assert addr == ("198.18.0.2", 0)
    ip = Ipv4Header.parse(dgram)  # raw sockets get the whole datagram
    m = IcmpMessage.parse(dgram[ip.header_len:])
    assert (m.type, m.ident, m.sequence, m.data) == (ICMP_ECHOREPLY, 0x4242, 7, payload)
    assert b.stack.snmp["IcmpInEchos"] == 1 and b.stack.snmp["IcmpOutEchoReps"] == 1
    assert a.stack.snmp["IcmpOutEchos"] == 1 and a.stack.snmp["IcmpInEchoReps"] == 1
    for f in frames_of(net.hub("lan")):
        assert naive_csum(f[14:34]) == 0
    r.close()


def test_raw_socket_sees_requests_too_and_bad_checksum_counted(net):
    a, b = pair(net)
    r = b.socket(SOCK_RAW, IPPROTO_ICMP)
    msg = bytearray(IcmpMessage.echo(1, 1, b"abc").emit())
    b.dev.receive(ip_frame(b.dev.dev_addr, a.dev.dev_addr, "198.18.0.1", "198.18.0.2", 1, bytes(msg)))
    assert r.poll() & POLLIN
    r.recvmsg(100)
    msg[-1] ^= 1
    b.dev.receive(ip_frame(b.dev.dev_addr, a.dev.dev_addr, "198.18.0.1", "198.18.0.2", 1, bytes(msg)))
    assert b.stack.snmp["IcmpInCsumErrors"] == 1 and b.stack.snmp["IcmpInErrors"] == 1
    assert b.stack.pool.drops["ICMP_CSUM"] == 1
    b.dev.receive(ip_frame(b.dev.dev_addr, a.dev.dev_addr, "198.18.0.1", "198.18.0.2", 1, b"\x08\x00"))
    assert b.stack.snmp["IcmpInErrors"] == 2
    net.settle()
    r.close()


def test_broadcast_ping_ignored(net):
    a, b = pair(net)
    b.dev.receive(ip_frame(b"\xff" * 6, a.dev.dev_addr, "198.18.0.1", "198.18.0.255", 1,
                           IcmpMessage.echo(1, 1, b"x").emit()))
    net.settle()
    assert b.stack.snmp["IcmpInEchos"] == 1 and b.stack.snmp["IcmpOutEchoReps"] == 0


def test_no_error_about_error_fragment_or_broadcast(net):
    a, b = pair(net)
    src = "198.18.0.1"
    mac = (b.dev.dev_addr, a.dev.dev_addr)
    # an ICMP error to an unknown protocol handler is impossible; use a UDP datagram to a
    # closed port sent as a non-first fragment: no port unreachable
    seg = udp_payload(src, "198.18.0.2", 1, 9, b"x" * 8)
    b.dev.receive(ip_frame(*mac, src, "198.18.0.2", 99, b"y" * 16, flags_frag=3))  # proto 99, frag 3
    net.settle()
    b.stack.run_timers(net.t[0] + 31 * S)  # its queue expires: no fragment 0, no ICMP
    # UDP to a closed port at the subnet broadcast: no ICMP
    b.dev.receive(ip_frame(b"\xff" * 6, a.dev.dev_addr, src, "198.18.0.255", 17, seg))
    # from a broadcast source: no ICMP
    b.dev.receive(ip_frame(*mac, "0.0.0.0", "198.18.0.2", 17, seg))
    net.settle()
    assert b.stack.snmp["IcmpOutMsgs"] == 0
    # an ICMP error quoting an ICMP error is not answered even when it hits a closed "port"
    inner = ip_frame(b"", b"", "198.18.0.2", src, 1,
                     IcmpMessage(ICMP_DEST_UNREACH, 3, 0, b"q" * 28).emit())[2:]
    b.dev.receive(ip_frame(*mac, src, "198.18.0.2", 1, IcmpMessage(ICMP_DEST_UNREACH, 3, 0, inner).emit()))
    net.settle()
    assert b.stack.snmp["IcmpOutMsgs"] == 0


def test_per_destination_rate_limit(net):
    a, b = pair(net)
    mac = (b.dev.dev_addr, a.dev.dev_addr)
    seg = udp_payload("198.18.0.1", "198.18.0.2", 1, 9, b"x")
    for _ in range(20):
        b.dev.receive(ip_frame(*mac, "198.18.0.1", "198.18.0.2", 17, seg))
    net.settle()
    # a burst of 6 (XRLIM_BURST_FACTOR) per destination, then one per icmp_ratelimit
    assert b.stack.snmp["IcmpOutDestUnreachs"] == 6
    assert b.stack.snmp["IcmpOutRateLimitHost"] == 14
    assert b.stack.snmp["UdpNoPorts"] == 20
    net.t[0] += 1000 * MS
    b.dev.receive(ip_frame(*mac, "198.18.0.1", "198.18.0.2", 17, seg))
    b.dev.receive(ip_frame(*mac, "198.18.0.1", "198.18.0.2", 17, seg))
    net.settle()
    assert b.stack.snmp["IcmpOutDestUnreachs"] == 7
    # echo replies are not in icmp_ratemask: never limited
    r = a.socket(SOCK_RAW, IPPROTO_ICMP)
    for i in range(20):
        r.sendmsg(IcmpMessage.echo(1, i, b"p").emit(), ("198.18.0.2", 0))
    net.settle()
    assert b.stack.snmp["IcmpOutEchoReps"] == 20
    r.close()


def test_global_rate_limit(net):
    a, b = pair(net, icmp_msgs_per_sec=10, icmp_msgs_burst=3, icmp_ratelimit_ms=0)
    mac = (b.dev.dev_addr, a.dev.dev_addr)
    seg = udp_payload("198.18.0.1", "198.18.0.2", 1, 9, b"x")
    for _ in range(10):
        b.dev.receive(ip_frame(*mac, "198.18.0.1", "198.18.0.2", 17, seg))
    net.settle()
    assert b.stack.snmp["IcmpOutDestUnreachs"] == 3
    assert b.stack.snmp["IcmpOutRateLimitGlobal"] == 7
    net.t[0] += 500 * MS  # 10/s: five more tokens, capped at the burst of 3
    for _ in range(10):
        b.dev.receive(ip_frame(*mac, "198.18.0.1", "198.18.0.2", 17, seg))
    net.settle()
    assert b.stack.snmp["IcmpOutDestUnreachs"] == 6


def test_port_unreachable_quotes_the_datagram(net):
    a, b = pair(net)
    s = a.socket(SOCK_DGRAM)
    s.sendmsg(b"hello", ("198.18.0.2", 4444))
    net.settle()
    f = [f for f in frames_of(net.hub("lan")) if f[23] == 1][0]
    m = IcmpMessage.parse(f[34:])
    assert (m.type, m.code) == (ICMP_DEST_UNREACH, ICMP_PORT_UNREACH)
    inner = Ipv4Header.parse(m.data)
    assert inner.protocol == 17 and m.data[20 + 8:] == b"hello"
    s.close()


def test_raw_errors(net):
    a, _ = pair(net)
    r = a.socket(SOCK_RAW, IPPROTO_ICMP)
    with pytest.raises(OSError) as e:
        r.sendmsg(b"x", None)
    assert e.value.errno == errno.EDESTADDRREQ
    with pytest.raises(OSError) as e:
        r.sendmsg(b"x", ("203.0.113.5", 0))
    assert e.value.errno == errno.ENETUNREACH
    with pytest.raises(BlockingIOError):
        r.recvmsg(10)
    with pytest.raises(OSError):
        a.socket(SOCK_RAW, 17)
    r.close()
