"""kstack.udp: bind and ephemeral ports, demux in Linux's scoring order, checksums in software
and offloaded, the receive buffer limit, ICMP errors to connected sockets, sizes."""
import errno

import pytest

from kstack.sock import POLLERR, POLLIN, POLLOUT, SO_RCVBUF, SO_REUSEADDR, SOCK_DGRAM, SOL_SOCKET
from kstack_fakes import frames_of, ip_frame, udp_payload
from kstack_fakes import net, pair  # noqa: F401 (fixtures)
from test_wire_ipv4 import naive_csum


def inject(a, b, sport, dport, data, csum=True, src="198.18.0.1", dst="198.18.0.2"):
    b.dev.receive(ip_frame(b.dev.dev_addr, a.dev.dev_addr, src, dst, 17,
                           udp_payload(src, dst, sport, dport, data, csum)))


def test_ephemeral_and_eaddrinuse(net, pair):
    a, b = pair
    s1 = b.socket(SOCK_DGRAM)
    s1.bind(("0.0.0.0", 0))
    lo, hi = b.stack.sysctl.ip_local_port_range
    assert lo <= s1.getsockname()[1] <= hi
    s2 = b.socket(SOCK_DGRAM)
    s2.bind(("0.0.0.0", 5000))
    s3 = b.socket(SOCK_DGRAM)
    with pytest.raises(OSError) as e:
        s3.bind(("198.18.0.2", 5000))
    assert e.value.errno == errno.EADDRINUSE
    with pytest.raises(OSError) as e:
        s3.bind(("198.18.9.9", 5001))
    assert e.value.errno == errno.EADDRNOTAVAIL
    # SO_REUSEADDR on both lets them share
    s4, s5 = b.socket(SOCK_DGRAM), b.socket(SOCK_DGRAM)
    for s in (s4, s5):
        s.setsockopt(SOL_SOCKET, SO_REUSEADDR, 1)
    s4.bind(("0.0.0.0", 6000))
    s5.bind(("0.0.0.0", 6000))
    with pytest.raises(OSError):
        s1.bind(("0.0.0.0", 7000))  # already bound: EINVAL
    for s in (s1, s2, s3, s4, s5):
        s.close()
    s6 = b.socket(SOCK_DGRAM)
    s6.bind(("0.0.0.0", 5000))  # closed sockets give their ports back
    s6.close()


def test_demux_scoring(net, pair):
    a, b = pair
    wild = b.socket(SOCK_DGRAM)
    wild.setsockopt(SOL_SOCKET, SO_REUSEADDR, 1)
    wild.bind(("0.0.0.0", 53))
    bound = b.socket(SOCK_DGRAM)
    bound.setsockopt(SOL_SOCKET, SO_REUSEADDR, 1)
    bound.bind(("198.18.0.2", 53))
    conn = b.socket(SOCK_DGRAM)
    conn.setsockopt(SOL_SOCKET, SO_REUSEADDR, 1)
    conn.bind(("198.18.0.2", 53))
    conn.connect(("198.18.0.1", 1111))
    inject(a, b, 1111, 53, b"to connected")
    inject(a, b, 2222, 53, b"to bound")
    b.inet.add_address(b.dev, "198.18.0.3/24")
    inject(a, b, 2222, 53, b"to wildcard", dst="198.18.0.3")
    assert conn.recvmsg(100)[0] == b"to connected"
    assert bound.recvmsg(100)[0] == b"to bound"
    assert wild.recvmsg(100)[0] == b"to wildcard"
    for s in (wild, bound, conn):
        assert not s.poll() & POLLIN
        s.close()
    net.settle()


def test_checksums_software_zero_and_bad(net, pair):
    a, b = pair
    s = b.socket(SOCK_DGRAM)
    s.bind(("0.0.0.0", 7))
    inject(a, b, 1, 7, b"no checksum", csum=False)
    assert s.recvmsg(100)[0] == b"no checksum"
    f = bytearray(ip_frame(b.dev.dev_addr, a.dev.dev_addr, "198.18.0.1", "198.18.0.2", 17,
                           udp_payload("198.18.0.1", "198.18.0.2", 1, 7, b"corrupt")))
    f[-1] ^= 0xFF
    b.dev.receive(bytes(f))
    assert b.stack.snmp["UdpInCsumErrors"] == 1 and b.stack.snmp["UdpInErrors"] == 1
    assert b.stack.pool.drops["UDP_CSUM"] == 1
    with pytest.raises(BlockingIOError):
        s.recvmsg(100)
    s.close()


def test_rx_checksum_offload_skips_software(net):
    a = net.host("a", "198.18.0.1/24")
    b = net.host("b", "198.18.0.2/24", rx_csum=True)
    net.settle()
    s = b.socket(SOCK_DGRAM)
    s.bind(("0.0.0.0", 7))
    f = bytearray(ip_frame(b.dev.dev_addr, a.dev.dev_addr, "198.18.0.1", "198.18.0.2", 17,
                           udp_payload("198.18.0.1", "198.18.0.2", 1, 7, b"trusted")))
    f[-1] ^= 0xFF  # the "device" said good: the stack does not look again
    b.dev.receive(bytes(f))
    assert s.recvmsg(100)[0] == b"trustee"[:6] + bytes([ord("d") ^ 0xFF])
    assert b.stack.snmp["UdpInCsumErrors"] == 0
    s.close()


def test_tx_checksum_offload(net):
    a = net.host("a", "198.18.0.1/24", tx_csum=True)
    b = net.host("b", "198.18.0.2/24")
    net.settle()
    s = b.socket(SOCK_DGRAM)
    s.bind(("0.0.0.0", 7))
    c = a.socket(SOCK_DGRAM)
    c.sendmsg(b"offloaded", ("198.18.0.2", 7))
    c.sendmsg(b"L" * 3000, ("198.18.0.2", 7))  # fragmented: summed in software first
    net.settle()
    assert a.dev.partial_sent == 1
    assert s.recvmsg(100)[0] == b"offloaded"
    assert s.recvmsg(4000)[0] == b"L" * 3000
    udp = [f for f in frames_of(net.hub("lan")) if f[23] == 17 and f[:6] == b.dev.dev_addr][0]
    pseudo = udp[26:34] + bytes([0, 17]) + udp[38:40]
    assert naive_csum(pseudo + udp[34:]) == 0
    assert b.stack.snmp["UdpInCsumErrors"] == 0
    s.close()
    c.close()


def test_rcvbuf_limit(net, pair):
    a, b = pair
    s = b.socket(SOCK_DGRAM)
    s.setsockopt(SOL_SOCKET, SO_RCVBUF, 4096)  # doubled: 8192, about 3 skbs of truesize
    s.bind(("0.0.0.0", 7))
    for i in range(20):
        inject(a, b, 1, 7, bytes([i]))
    got = 0
    while s.poll() & POLLIN:
        s.recvmsg(10)
        got += 1
    assert 2 <= got < 20
    assert b.stack.snmp["UdpRcvbufErrors"] == 20 - got
    assert b.stack.snmp["UdpInErrors"] == 20 - got
    assert b.stack.pool.drops["SOCKET_RCVBUFF"] == 20 - got
    assert b.stack.snmp["UdpInDatagrams"] == got
    s.close()


def test_port_unreachable_and_connected_error(net, pair):
    a, b = pair
    c = a.socket(SOCK_DGRAM)
    c.connect(("198.18.0.2", 9999))
    wakes = []
    c.add_wakeup(lambda sk: wakes.append(sk.err))
    c.sendmsg(b"anyone?", None)
    net.settle()
    assert b.stack.snmp["UdpNoPorts"] == 1 and b.stack.snmp["IcmpOutDestUnreachs"] == 1
    assert c.poll() & POLLERR and wakes
    with pytest.raises(OSError) as e:
        c.recvmsg(10)
    assert e.value.errno == errno.ECONNREFUSED
    assert c.poll() == POLLOUT
    # an unconnected socket is not told (no IP_RECVERR)
    u = a.socket(SOCK_DGRAM)
    u.sendmsg(b"x", ("198.18.0.2", 9998))
    net.settle()
    assert not u.poll() & POLLERR
    c.close()
    u.close()


def test_sizes_and_addresses(net, pair):
    a, b = pair
    c = a.socket(SOCK_DGRAM)
    with pytest.raises(OSError) as e:
        c.sendmsg(b"x" * 65508, ("198.18.0.2", 7))
    assert e.value.errno == errno.EMSGSIZE
    with pytest.raises(OSError) as e:
        c.sendmsg(b"x", None)
    assert e.value.errno == errno.EDESTADDRREQ
    with pytest.raises(OSError) as e:
        c.sendmsg(b"x", ("203.0.113.1", 7))
    assert e.value.errno == errno.ENETUNREACH
    assert a.stack.snmp["IpOutNoRoutes"] == 1
    with pytest.raises(OSError) as e:
        c.sendmsg(b"x", ("198.18.0.255", 7))
    assert e.value.errno == errno.EACCES
    s = b.socket(SOCK_DGRAM)
    s.bind(("0.0.0.0", 7))
    c.sendmsg(b"B" * 65507, ("198.18.0.2", 7))  # the largest: 45 fragments
    net.settle()
    assert s.recvmsg(70000)[0] == b"B" * 65507
    s.close()
    c.close()


def test_broadcast_reaches_every_socket(net, pair):
    a, b = pair
    s1, s2 = b.socket(SOCK_DGRAM), b.socket(SOCK_DGRAM)
    for s in (s1, s2):
        s.setsockopt(SOL_SOCKET, SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", 67))
    c = a.socket(SOCK_DGRAM)
    c.setsockopt(SOL_SOCKET, 6, 1)  # SO_BROADCAST
    c.sendmsg(b"all", ("198.18.0.255", 67))
    c.sendmsg(b"nobody", ("198.18.0.255", 68))
    net.settle()
    assert s1.recvmsg(10)[0] == b"all" and s2.recvmsg(10)[0] == b"all"
    assert b.stack.snmp["UdpNoPorts"] == 1 and b.stack.snmp["IcmpOutMsgs"] == 0
    for s in (s1, s2, c):
        s.close()


def test_close_frees_queue(net, pair):
    a, b = pair
    s = b.socket(SOCK_DGRAM)
    s.bind(("0.0.0.0", 7))
    inject(a, b, 1, 7, b"left behind")
    s.close()
    assert b.stack.pool.drops["SOCKET_CLOSE"] == 1
    with pytest.raises(OSError):
        s.sendmsg(b"x", ("198.18.0.1", 7))


@pytest.mark.parametrize("seg", [
    b"\x00\x01\x00\x07",  # shorter than the header
    b"\x00\x01\x00\x07\x00\x04\x00\x00",  # length below 8
    b"\x00\x01\x00\x07\x01\x00\x00\x00abc",  # length past the datagram
])
def test_bad_headers(net, pair, seg):
    a, b = pair
    b.dev.receive(ip_frame(b.dev.dev_addr, a.dev.dev_addr, "198.18.0.1", "198.18.0.2", 17, seg))
    assert b.stack.snmp["UdpInErrors"] == 1 and b.stack.pool.drops["PKT_TOO_SMALL"] == 1


def test_limited_broadcast_and_own_broadcast_looped_back(net, pair):
    a, b = pair
    listen_b = b.socket(SOCK_DGRAM)
    listen_b.bind(("0.0.0.0", 67))
    listen_a = a.socket(SOCK_DGRAM)
    listen_a.bind(("0.0.0.0", 67))
    c = a.socket(SOCK_DGRAM)
    c.setsockopt(SOL_SOCKET, 6, 1)  # SO_BROADCAST
    c.sendmsg(b"everyone", ("255.255.255.255", 67))
    net.settle()
    assert listen_b.recvmsg(10)[0] == b"everyone"
    assert listen_a.recvmsg(10)[0] == b"everyone"  # our own broadcast comes back to us
    f = [f for f in frames_of(net.hub("lan")) if f[23] == 17][-1]
    assert f[:6] == b"\xff" * 6 and f[30:34] == b"\xff" * 4
    for s in (listen_a, listen_b, c):
        s.close()
