"""kstack.inet: the configuration API (addresses, routes, neighbours), the socket factories,
a device that answers BUSY, and a three-host topology with ping through a forwarding kernel."""
import pytest

from kstack.inet import install
from kstack.raw import RawSock
from kstack.sock import IPPROTO_ICMP, SOCK_DGRAM, SOCK_RAW, SOCK_STREAM
from kstack.stack import Sysctl
from kstack.udp import UdpSock
from kstack_fakes import FakeDevice
from kstack_fakes import net, pair  # noqa: F401 (fixtures)
from wire.icmp import ICMP_ECHOREPLY, ICMP_TIME_EXCEEDED, IcmpMessage


def test_api(net):
    a = net.host("a", "198.18.0.1/24")
    assert install(a.stack) is a.inet  # once per stack
    a.inet.add_route("0.0.0.0/0", via="198.18.0.254", metric=5)
    assert a.inet.addresses() == [{"dev": "eth0", "addr": "198.18.0.1/24", "broadcast": "198.18.0.255"}]
    assert a.inet.routes() == ["198.18.0.0/24 dev eth0 proto kernel scope link src 198.18.0.1",
                               "default via 198.18.0.254 dev eth0 metric 5"]
    with pytest.raises(FileExistsError):
        a.inet.add_address(a.dev, "198.18.0.1/24")
    assert isinstance(a.socket(SOCK_DGRAM), UdpSock)
    assert isinstance(a.socket(SOCK_DGRAM, 17), UdpSock)
    assert isinstance(a.socket(SOCK_RAW, IPPROTO_ICMP), RawSock)
    from kstack.tcp_sock import TcpSock
    assert isinstance(a.socket(SOCK_STREAM), TcpSock)  # issue 9: TCP registers with inet
    net.settle()
    assert a.inet.neighbours() == []
    assert set(a.inet.counters()) == {"neigh", "frag", "arp", "fib"}


def test_busy_device_requeues(net, pair):
    a, b = pair
    s = b.socket(SOCK_DGRAM)
    s.bind(("0.0.0.0", 7))
    c = a.socket(SOCK_DGRAM)
    c.sendmsg(b"first", ("198.18.0.2", 7))
    net.settle()
    a.dev.busy = True
    c.sendmsg(b"second", ("198.18.0.2", 7))
    c.sendmsg(b"third", ("198.18.0.2", 7))
    net.settle()
    assert a.dev.qdisc.stats()["requeues"] == 1 and a.dev.queue_stopped
    a.dev.busy = False
    a.dev.netif_wake_queue()
    net.settle()
    assert [s.recvmsg(10)[0] for _ in range(3)] == [b"first", b"second", b"third"]
    s.close()
    c.close()


def test_three_hosts_through_router(net):
    a = net.host("a", "198.18.0.1/24", hub="left")
    r = net.host("r", "198.18.0.254/24", hub="left", sysctl=Sysctl(ip_forward=True))
    r.add_dev(FakeDevice("eth1", net.mac()), net.hub("right"), "198.19.0.254/24")
    c = net.host("c", "198.19.0.1/24", hub="right")
    a.inet.add_route("0.0.0.0/0", via="198.18.0.254")
    c.inet.add_route("0.0.0.0/0", via="198.19.0.254")
    net.settle()
    p = a.socket(SOCK_RAW, IPPROTO_ICMP)
    p.sendmsg(IcmpMessage.echo(9, 1, b"x" * 4000).emit(), ("198.19.0.1", 0))
    net.settle()
    d, addr = p.recvmsg(9000)
    assert addr == ("198.19.0.1", 0) and IcmpMessage.parse(d[20:]).type == ICMP_ECHOREPLY
    assert d[8] == 63  # the reply crossed the router once
    # TTL 1 from a: the router answers time exceeded
    p.setsockopt(0, 2, 1)  # IP_TTL
    p.sendmsg(IcmpMessage.echo(9, 2, b"y").emit(), ("198.19.0.1", 0))
    net.settle()
    d, addr = p.recvmsg(9000)
    assert addr == ("198.18.0.254", 0) and IcmpMessage.parse(d[20:]).type == ICMP_TIME_EXCEEDED
    assert r.stack.snmp["IpForwDatagrams"] >= 2 and r.stack.snmp["IcmpOutTimeExcds"] == 1
    assert {n["dst"] for n in r.inet.neighbours()} == {"198.18.0.1", "198.19.0.1"}
    p.close()


def test_carrier_down_forgets_neighbours(net):
    a = net.host("a", "198.18.0.1/24")
    net.host("b", "198.18.0.2/24")
    net.settle()
    s = a.socket(SOCK_DGRAM)
    s.sendmsg(b"x", ("198.18.0.2", 7))
    net.settle()
    assert a.inet.neighbours()
    a.dev.netif_carrier_off()
    assert not a.inet.neighbours()
    s.close()


def test_output_for_protocols_and_neigh_stats(net):
    from kstack.skbuff import MAX_HEADER
    from wire.ipv4 import addr_to_int
    a = net.host("a", "198.18.0.1/24")
    b = net.host("b", "198.18.0.2/24")
    net.settle()
    seen = []
    b.inet.add_protocol(253, lambda skb: (seen.append(skb.tobytes()), skb.consume()))  # RFC 3692 experimental
    skb = a.stack.pool.alloc(4, MAX_HEADER)
    skb.put_data(b"exp!")
    assert a.inet.output(skb, addr_to_int("198.18.0.2"), 253)
    net.settle()
    assert seen == [b"exp!"] and b.stack.snmp["IpInDelivers"] == 1
    skb = a.stack.pool.alloc(4, MAX_HEADER)
    assert not a.inet.output(skb, addr_to_int("203.0.113.1"), 253)
    assert a.stack.pool.drops["IP_OUTNOROUTES"] == 1
    net.t[0] += 3 * 10**9
    row = a.inet.neighbours(stats=True)[0]
    assert row["used"] == "3/3/3" and row["state"] == "REACHABLE"
    with pytest.raises(ValueError):
        b.inet.add_protocol(253, lambda skb: None)
