"""kstack TCP sockets in-process: two NetStacks joined by the fake wire (tests/kstack_fakes.py)
with a fake clock, driving TcpSock's non-blocking calls as the syscall layer does.

Covers: connect/accept and data both ways, half-close and close, TIME_WAIT (kept, bounded,
gone after 2 MSL), a RST for a closed port (ECONNREFUSED) and none for a RST, the listen
backlog's overflow counted, a SYN flood that fills the SYN queue while the listener keeps
serving, EADDRINUSE and SO_REUSEADDR, SO_LINGER 0 (a RST, ECONNRESET at the peer),
checksums (a bad one dropped and counted; offload both ways), poll() through a non-blocking
connect, the ss listing. Every test ends with no sk_buff held."""
from __future__ import annotations

import errno

import pytest

from kstack.sock import (IPPROTO_TCP, POLLERR, POLLIN, POLLOUT, SHUT_WR, SO_LINGER,
                         SO_REUSEADDR, SOCK_STREAM, SOL_SOCKET, TCP_NODELAY)
from kstack.tcp import TcpState
from kstack.tcp_sock import ss
from kstack_fakes import MS, S, FakeNet, ip_frame
from kstack_fakes import net  # noqa: F401 (fixtures)
from wire.ipv4 import addr_to_int
from wire.tcp import TH_ACK, TH_RST, TH_SYN, TcpSegment

A, B = "198.18.0.1", "198.18.0.2"


def hosts(net: FakeNet, **kw):
    return net.host("a", A + "/24", **kw), net.host("b", B + "/24", **kw)


def listen(h, port: int = 80, backlog: int = 8, addr: str = "0.0.0.0"):
    L = h.socket(SOCK_STREAM)
    L.bind((addr, port))
    L.listen(backlog)
    return L


def connect(net, h, dst: str, port: int = 80):
    c = h.socket(SOCK_STREAM)
    with pytest.raises(BlockingIOError) as ei:
        c.connect((dst, port))
    assert ei.value.errno == errno.EINPROGRESS
    net.settle()
    return c


def established_pair(net, a, b, port: int = 80):
    L = listen(b, port)
    c = connect(net, a, B, port)
    c.connect((B, port))  # completed: 0 once
    with pytest.raises(OSError) as ei:
        c.connect((B, port))
    assert ei.value.errno == errno.EISCONN
    s, peer = L.accept()
    assert peer == c.getsockname() and c.getpeername() == (B, port)
    return L, c, s


def transfer(net, src, dst, data: bytes, step: int = 10 * MS) -> bytes:
    """Send all of `data` from src while dst reads, moving the fake clock."""
    got = bytearray()
    off = 0
    for _ in range(10000):
        if off < len(data):
            try:
                off += src.sendmsg(data[off:off + 65536], None)
            except BlockingIOError:
                pass
        net.advance(step)
        while True:
            try:
                b = dst.recvmsg(1 << 20)[0]
            except BlockingIOError:
                break
            if not b:
                break
            got += b
        if len(got) >= len(data):
            return bytes(got)
    raise AssertionError(f"transfer stalled at {len(got)} of {len(data)}")


def test_connect_accept_data_both_ways_and_ss(net):
    a, b = hosts(net)
    L, c, s = established_pair(net, a, b)
    assert a.stack.snmp["TcpCurrEstab"] == 1 and b.stack.snmp["TcpCurrEstab"] == 1
    assert a.stack.snmp["TcpActiveOpens"] == 1 and b.stack.snmp["TcpPassiveOpens"] == 1
    up = bytes(range(256)) * 4000  # 1 MB
    down = bytes(reversed(range(256))) * 1500
    assert transfer(net, c, s, up) == up
    assert transfer(net, s, c, down) == down
    rows = ss(a.stack)
    assert len(rows) == 1 and rows[0]["state"] == "ESTABLISHED"
    assert rows[0]["local"] == f"{A}:{c.getsockname()[1]}" and rows[0]["remote"] == f"{B}:80"
    assert {"cwnd", "ssthresh", "srtt_us", "rto_ms", "bytes_in_flight", "retrans"} <= set(rows[0])
    listing = ss(b.stack)
    assert [r["state"] for r in listing] == ["LISTEN", "ESTABLISHED"]
    for sk in (c, s, L):
        sk.close()
    net.advance(70 * S)
    assert a.stack.snmp["TcpCurrEstab"] == 0 and b.stack.snmp["TcpCurrEstab"] == 0
    assert ss(a.stack) == [] and ss(b.stack) == []


def test_half_close_then_close_and_time_wait(net):
    a, b = hosts(net)
    L, c, s = established_pair(net, a, b)
    c.shutdown(SHUT_WR)
    net.advance(10 * MS)
    assert s.recvmsg(100) == (b"", None)  # EOF
    assert s.poll() & POLLIN
    with pytest.raises(BrokenPipeError):
        c.sendmsg(b"x", None)
    assert transfer(net, s, c, b"still talking") == b"still talking"  # the other way still works
    s.close()
    net.advance(10 * MS)
    assert c.recvmsg(10) == (b"", None)
    c.close()
    net.advance(10 * MS)
    tab = a.stack.protocols["tcp"]
    assert tab.counters()["time_wait"] == 1  # the active closer keeps TIME_WAIT
    assert [r["state"] for r in ss(a.stack)] == ["TIME_WAIT"]
    assert ss(b.stack)[-1]["state"] == "LISTEN" and len(ss(b.stack)) == 1
    net.advance(61 * S)  # 2 MSL as Linux counts it
    assert tab.counters() == {"established_hash": 0, "listeners": 0, "bound": 0, "orphans": 0,
                              "time_wait": 0}
    L.close()


def test_time_wait_bounded(net):
    a, b = hosts(net)
    L = listen(b)
    a.stack.protocols["tcp"].sysctl.tcp_max_tw_buckets = 1
    for _ in range(3):
        c = connect(net, a, B)
        s, _ = L.accept()
        c.close()
        net.advance(10 * MS)
        s.close()
        net.advance(10 * MS)
    assert a.stack.protocols["tcp"].counters()["time_wait"] == 1
    assert a.stack.snmp["TcpExtTCPTimeWaitOverflow"] == 2
    L.close()


def test_rst_for_a_closed_port_is_econnrefused_and_no_rst_answers_a_rst(net):
    a, b = hosts(net)
    c = connect(net, a, B, 81)
    with pytest.raises(ConnectionRefusedError):
        c.connect((B, 81))
    assert b.stack.snmp["TcpOutRsts"] == 1 and b.stack.snmp["TcpInSegs"] == 1
    assert a.stack.snmp["TcpAttemptFails"] == 1
    assert c.poll() & POLLIN  # closed: readable (EOF), the error was reported
    c.close()
    # a RST to a closed port gets nothing back
    hub = net.hubs["lan"]
    before = len(hub.log)
    rst = TcpSegment(4000, 81, 1234, 0, TH_RST, 0).emit(addr_to_int(A), addr_to_int(B))
    b.dev.receive(ip_frame(b.dev.dev_addr, a.dev.dev_addr, A, B, 6, rst))
    net.settle()
    assert len(hub.log) == before and b.stack.snmp["TcpOutRsts"] == 1


def test_bad_checksum_dropped_and_counted(net):
    a, b = hosts(net)
    L = listen(b)
    seg = bytearray(TcpSegment(4000, 80, 1, 0, TH_SYN, 65535).emit(addr_to_int(A), addr_to_int(B)))
    seg[16] ^= 0xFF
    b.dev.receive(ip_frame(b.dev.dev_addr, a.dev.dev_addr, A, B, 6, bytes(seg)))
    net.settle()
    assert b.stack.snmp["TcpInCsumErrors"] == 1 and b.stack.snmp["TcpInErrs"] == 1
    assert b.stack.pool.drops["TCP_CSUM"] == 1 and not L.synq
    L.close()


def test_checksum_offload_both_ways(net):
    a, b = hosts(net, tx_csum=True, rx_csum=True)
    L, c, s = established_pair(net, a, b)
    data = b"offloaded" * 20000
    assert transfer(net, c, s, data) == data
    assert a.dev.partial_sent > 0 and b.dev.partial_sent > 0
    assert a.stack.snmp.get("TcpInCsumErrors", 0) == b.stack.snmp.get("TcpInCsumErrors", 0) == 0
    for sk in (c, s, L):
        sk.close()
    net.advance(70 * S)


def test_listen_backlog_overflow_counted(net):
    a, b = hosts(net)
    L = listen(b, backlog=1)
    clients = [connect(net, a, B) for _ in range(3)]
    # the accept queue holds backlog + 1 (Linux's sk_acceptq_is_full is ">"); the third
    # handshake's ACK finds it full and is dropped (the SYN-ACK will be retransmitted)
    assert len(L.acceptq) == 2
    assert b.stack.snmp["TcpExtListenOverflows"] >= 1 and b.stack.snmp["TcpExtListenDrops"] >= 1
    accepted = [L.accept()[0] for _ in range(2)]
    net.advance(5 * S)  # the SYN-ACK retransmission completes the third
    accepted.append(L.accept()[0])
    for c, s in zip(clients, accepted):
        assert transfer(net, c, s, b"hello") == b"hello"
    for sk in clients + accepted + [L]:
        sk.close()
    net.advance(70 * S)


def test_syn_flood_fills_the_syn_queue_and_the_listener_keeps_serving(net):
    a, b = hosts(net)
    L = listen(b, backlog=4)
    L.config.synack_retries = 2
    c, s = connect(net, a, B), None
    s, _ = L.accept()
    mac = a.dev.dev_addr
    for i in range(200):  # SYNs from spoofed hosts that never answer the SYN-ACK
        src = f"198.18.0.{10 + i % 200}"
        syn = TcpSegment(1024 + i, 80, 1000 * i, 0, TH_SYN, 65535, mss=1460).emit(
            addr_to_int(src), addr_to_int(B))
        b.dev.receive(ip_frame(b.dev.dev_addr, mac, src, B, 6, syn))
    net.settle()
    assert len(L.synq) == 4
    assert b.stack.snmp["TcpExtListenDrops"] == 196
    assert transfer(net, c, s, b"served during the flood") == b"served during the flood"
    # a new client during the flood: its SYN is dropped until the half-open ones time out
    late = connect(net, a, B)
    assert not L.acceptq
    net.advance(20 * S)
    assert not L.synq or all(x.conn.state == TcpState.SYN_RECEIVED for x in L.synq)
    assert len(L.acceptq) == 1 and late.poll() & POLLOUT
    s2, _ = L.accept()
    assert transfer(net, late, s2, b"after") == b"after"
    assert b.stack.snmp["TcpAttemptFails"] >= 4  # the flood's half-open connections gave up
    for sk in (c, s, late, s2, L):
        sk.close()
    net.advance(70 * S)


def test_eaddrinuse_and_reuseaddr(net):
    a, b = hosts(net)
    L = listen(b)
    other = b.socket(SOCK_STREAM)
    with pytest.raises(OSError) as ei:
        other.bind(("0.0.0.0", 80))
    assert ei.value.errno == errno.EADDRINUSE
    other.setsockopt(SOL_SOCKET, SO_REUSEADDR, 1)
    L.setsockopt(SOL_SOCKET, SO_REUSEADDR, 1)
    with pytest.raises(OSError) as ei:  # never beside a listener
        other.bind((B, 80))
    assert ei.value.errno == errno.EADDRINUSE
    other.close()
    # the server side closes first: its TIME_WAIT holds the port
    c = connect(net, a, B)
    s, _ = L.accept()
    L.close()
    s.close()
    net.advance(10 * MS)
    c.close()
    net.advance(10 * MS)
    assert b.stack.protocols["tcp"].counters()["time_wait"] == 1
    plain = b.socket(SOCK_STREAM)
    with pytest.raises(OSError) as ei:
        plain.bind(("0.0.0.0", 80))
    assert ei.value.errno == errno.EADDRINUSE
    plain.close()
    again = b.socket(SOCK_STREAM)
    again.setsockopt(SOL_SOCKET, SO_REUSEADDR, 1)
    again.bind(("0.0.0.0", 80))  # SO_REUSEADDR beside TIME_WAIT, as a restarted server does
    again.listen(4)
    again.close()
    net.advance(70 * S)


def test_so_linger_zero_sends_rst(net):
    a, b = hosts(net)
    L, c, s = established_pair(net, a, b)
    c.setsockopt(SOL_SOCKET, SO_LINGER, 0)
    rsts = a.stack.snmp.get("TcpOutRsts", 0)
    c.close()
    net.settle()
    assert a.stack.snmp["TcpOutRsts"] == rsts + 1 and a.stack.snmp["TcpExtTCPAbortOnData"] == 1
    assert s.poll() & POLLERR
    with pytest.raises(ConnectionResetError):
        s.recvmsg(10)
    assert a.stack.protocols["tcp"].counters()["time_wait"] == 0  # no TIME_WAIT after an abort
    assert b.stack.snmp["TcpEstabResets"] == 1
    s.close()
    L.close()


def test_nonblocking_connect_poll_and_options(net):
    a, b = hosts(net)
    L = listen(b)
    c = a.socket(SOCK_STREAM)
    c.setsockopt(IPPROTO_TCP, TCP_NODELAY, 1)
    assert c.getsockopt(IPPROTO_TCP, TCP_NODELAY) == 1
    with pytest.raises(BlockingIOError):
        c.connect((B, 80))
    assert c.poll() == 0  # SYN-SENT: neither readable nor writable
    with pytest.raises(BlockingIOError) as ei:
        c.connect((B, 80))
    assert ei.value.errno == errno.EALREADY
    with pytest.raises(BlockingIOError):
        c.recvmsg(10)
    net.settle()
    assert c.poll() & POLLOUT and not c.poll() & POLLIN
    s, _ = L.accept()
    assert s.getsockopt(IPPROTO_TCP, TCP_NODELAY) == 0  # from the listener, not the client
    for sk in (c, s, L):
        sk.close()
    net.advance(70 * S)


def test_close_with_unread_data_resets(net):
    a, b = hosts(net)
    L, c, s = established_pair(net, a, b)
    c.sendmsg(b"unread", None)
    net.advance(10 * MS)
    s.close()  # RFC 2525 2.17: data not read -> RST
    net.settle()
    assert b.stack.snmp["TcpExtTCPAbortOnClose"] == 1
    with pytest.raises(ConnectionResetError):
        c.recvmsg(10)
    c.close()
    L.close()
