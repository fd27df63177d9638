"""UDP (RFC 768, RFC 1122 4.1; Linux's net/ipv4/udp.c): sockets, demux, checksums.

Receive (udp_rcv): a header of 8 bytes and a length field between 8 and the IP payload
(else UdpInErrors, PKT_TOO_SMALL; bytes after the UDP length are trimmed); the checksum
unless it is zero ("no checksum", RFC 768) or the device already verified it
(CHECKSUM_UNNECESSARY from RXCSUM): a bad one counts UdpInCsumErrors and UdpInErrors. The
socket is the best match in Linux's compute_score: a connected socket whose 4-tuple matches
beats one bound to the destination address, which beats a wildcard bind; among equals the
most recently bound wins. Broadcasts go to every matching socket. No socket: UdpNoPorts and
ICMP port unreachable (RFC 1122 4.1.3.1). A socket whose receive memory (skb truesize) is
above SO_RCVBUF drops (UdpRcvbufErrors, UdpInErrors, SOCKET_RCVBUFF). UdpInDatagrams counts
datagrams handed to the application by recvmsg, as Linux counts it.

Send (udp_sendmsg): autobind to an ephemeral port (ip_local_port_range), route, the checksum
computed here or left to the device (CHECKSUM_PARTIAL with the pseudo-header sum in the field)
when it offers NETIF_F_IP_CSUM and the datagram fits its MTU; larger datagrams go to IP to be
fragmented. More than 65507 bytes is EMSGSIZE.
"""
from __future__ import annotations

import errno
import struct
from collections import deque
from typing import TYPE_CHECKING, Any

from nicemu import tracepoint
from kstack.dropreason import SkbDropReason
from kstack.netdevice import NetdevFeatures
from kstack.route import RTN_BROADCAST, RTN_LOCAL, RTN_UNICAST
from kstack.rxfast import ms_deliver
from kstack.skbuff import CHECKSUM_PARTIAL, CHECKSUM_UNNECESSARY, MAX_HEADER, SkBuff
from kstack.txfast import (UdpDst, select as txfast_select, sendmmsg_connected as txfast_sendmmsg, sock_wfree,
                           udp_send as txfast_udp_send)
from kstack.sock import (IPPROTO_UDP, MSG_PEEK, POLLERR, POLLIN, POLLNVAL, POLLOUT,
                         SO_BROADCAST, SOL_SOCKET, Address, Sock, inet_addr, pick_ephemeral)
from wire.checksum import fold, ones_sum
from wire.icmp import (ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, ICMP_PORT_UNREACH, ICMP_TIME_EXCEEDED,
                       NR_ICMP_UNREACH)
from wire.ipv4 import IPV4_MIN_HLEN, is_lbcast, ntoa
from wire.udp import UDP_HLEN, UDP_MAX_PAYLOAD

try:  # the compiled send: udp_send and the connected case of sendmsg before it
    from kstack._txfast import (sendmmsg_connected as _c_sendmmsg_connected,
                                sendmsg_connected as _c_sendmsg_connected, udp_send as _c_udp_send)
except ImportError:
    _c_sendmmsg_connected = _c_sendmsg_connected = _c_udp_send = None

if TYPE_CHECKING:
    from kstack.inet import Inet

__all__ = ["UdpSock", "UdpTable", "MAX_UDP_SOCKETS", "ICMP_ERR_CONVERT"]

MAX_UDP_SOCKETS = 65536
_HDR = struct.Struct("!HHHH")
_ADDRS = struct.Struct("!II")
_U32 = struct.Struct("!I")

# icmp_err_convert: Destination Unreachable code -> (errno, fatal)
ICMP_ERR_CONVERT = (
    (errno.ENETUNREACH, False), (errno.EHOSTUNREACH, False), (errno.ENOPROTOOPT, True),
    (errno.ECONNREFUSED, True), (errno.EMSGSIZE, False), (errno.EOPNOTSUPP, False),
    (errno.ENETUNREACH, True), (errno.EHOSTDOWN, True), (errno.ENONET, True),
    (errno.ENETUNREACH, True), (errno.EHOSTUNREACH, True), (errno.ENETUNREACH, False),
    (errno.EHOSTUNREACH, False), (errno.EHOSTUNREACH, True), (errno.EHOSTUNREACH, True),
    (errno.EHOSTUNREACH, True),
)


_addr = inet_addr


def _never(sk: Any, d: Any, data: Any, dport: int) -> bool:
    return False  # no fast path (KSTACK_TXFAST=off): every datagram goes the layered way


class UdpSock(Sock):
    """A UDP socket (struct udp_sock)."""

    def __init__(self, stack: Any, family: int, type: int, protocol: int) -> None:
        super().__init__(stack, family, type, protocol or IPPROTO_UDP)
        self.inet: "Inet" = stack.protocols["inet"]
        self.table: UdpTable = self.inet.udp
        self.rcv_saddr = 0  # bound address (0: any)
        self.saddr = 0  # source address used on send
        self.sport = 0
        self.daddr = 0
        self.dport = 0
        self.connected = False
        self.broadcast = False
        self.queue: deque[SkBuff] = deque()
        self.rmem = 0  # sk_rmem_alloc: truesize of what is queued
        self.drops = 0  # sk_drops
        self.wmem = 0  # sk_wmem_alloc: truesize of sent skbs the driver has not freed yet
        self.nospace = False  # SOCK_NOSPACE: a sender found SO_SNDBUF full (wake on room)
        self._dst: UdpDst | None = None  # sk_dst_cache (connected sockets)
        self._tx_fast = txfast_select()  # the send fast path: compiled, its twin, or None
        self.ms: Any = None  # the syscall server's armed multishot receive (copy_to_user)

    # --- binding ------------------------------------------------------------------------------

    def bind(self, addr: Address) -> None:
        if self.closed:
            raise OSError(errno.EBADF, "closed")
        ip, port = _addr(addr)
        if self.sport:
            raise OSError(errno.EINVAL, "already bound")
        if ip and not (self.inet.is_local(ip) or is_lbcast(ip) or ip in self.inet.bcast_addrs):
            raise OSError(errno.EADDRNOTAVAIL, "cannot assign requested address")
        self.table.get_port(self, ip, port)

    def connect(self, addr: Address) -> None:
        """ip4_datagram_connect: fix the peer, pick the source address from the route."""
        if self.closed:
            raise OSError(errno.EBADF, "closed")
        ip, port = _addr(addr)
        if port == 0:
            raise OSError(errno.EINVAL, "port 0")  # Linux answers connect to port 0 so too
        res = self.inet.ip.route_output(ip)
        if res is None:
            raise OSError(errno.ENETUNREACH, "network is unreachable")
        if res.type == RTN_BROADCAST and not self.broadcast:
            raise OSError(errno.EACCES, "permission denied (SO_BROADCAST)")
        if not self.sport:
            self.table.get_port(self, 0, 0)
        if not self.rcv_saddr:
            self.rcv_saddr = res.src
        self.saddr = self.rcv_saddr
        self.daddr, self.dport = ip, port
        self.connected = True
        self._dst = None  # sk_dst_reset: the next send routes afresh

    def getsockname(self) -> Address:
        return (ntoa(self.rcv_saddr), self.sport)

    def getpeername(self) -> Address:
        if not self.connected:
            raise OSError(errno.ENOTCONN, "not connected")
        return (ntoa(self.daddr), self.dport)

    def setsockopt(self, level: int, option: int, value: int) -> None:
        if level == SOL_SOCKET and option == SO_BROADCAST:
            self.broadcast = bool(value)
            return
        super().setsockopt(level, option, value)

    def getsockopt(self, level: int, option: int) -> int:
        if level == SOL_SOCKET and option == SO_BROADCAST:
            return int(self.broadcast)
        return super().getsockopt(level, option)

    # --- send ---------------------------------------------------------------------------------

    def sendmsg(self, data: bytes, addr: Address | None, flags: int = 0) -> int:
        if addr is None and _c_udp_send is not None and self._tx_fast is _c_udp_send:
            n = _c_sendmsg_connected(self, data)  # the checks below, compiled, for the common case
            if n >= 0:
                return n
        if self.closed:
            raise OSError(errno.EBADF, "closed")
        if self.err:
            err, self.err = self.err, 0
            raise OSError(err, errno.errorcode.get(err, "error"))
        n = len(data)
        if n > UDP_MAX_PAYLOAD:
            raise OSError(errno.EMSGSIZE, "message too long")
        inet = self.inet
        d = None
        if addr is not None:
            dst, dport = _addr(addr)
            if dport == 0:
                raise OSError(errno.EINVAL, "port 0")
        elif self.connected:
            dst, dport = self.daddr, self.dport
            d = self._dst
            if d is not None and d.genid != inet.fib.genid:
                d = self._dst = None  # sk_dst_check: the routes changed
        else:
            raise OSError(errno.EDESTADDRREQ, "destination address required")
        if d is None:
            res = inet.ip.route_output(dst)
            if res is None:
                raise OSError(errno.ENETUNREACH, "network is unreachable")
            if (res.type == RTN_BROADCAST or is_lbcast(dst)) and not self.broadcast:
                raise OSError(errno.EACCES, "permission denied (SO_BROADCAST)")
            if not self.sport:
                self.table.get_port(self, 0, 0)
            src = self.saddr or self.rcv_saddr or res.src
            if not src:
                raise OSError(errno.EADDRNOTAVAIL, "no source address")
            if addr is None and res.type == RTN_UNICAST and not is_lbcast(res.nexthop):
                # sk_dst_set: a connected socket keeps its route (ip4_datagram_connect's)
                d = self._dst = UdpDst(inet.fib.genid, dst, res, src, inet)
        else:
            res, src = d.res, d.src
        if self.wmem >= self.sndbuf:
            # sock_alloc_send_skb: the send memory is full until the driver frees skbs; the
            # syscall layer parks the call (or answers EAGAIN to MSG_DONTWAIT)
            self.nospace = True
            raise BlockingIOError(errno.EAGAIN, "send buffer full")
        if d is not None:
            nb = d.neigh
            if nb is None or nb.dead:
                nb = d.neigh = inet.neigh.entries.get(d.key)
            if nb is not None and self._tx_fast is not None and self._tx_fast(self, d, data, dport):
                return n
        ulen = UDP_HLEN + n
        stack = self.stack
        skb = stack.pool.alloc(ulen, MAX_HEADER)
        skb.sk = self
        skb.destructor = sock_wfree  # skb_set_owner_w: charged until freed
        self.wmem += skb.truesize
        o = skb.put(ulen)
        buf = skb.shinfo.buf
        buf[o + UDP_HLEN:o + ulen] = data
        stack.pool.bytes_copied += n
        if tracepoint.enabled:
            tracepoint.emit("sock.copy_from_user", bytes=n, wmem=self.wmem, sndbuf=self.sndbuf)
        # pseudo-header (RFC 768): source, destination, zero, protocol, UDP length
        psum = (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF) + IPPROTO_UDP + ulen
        dev = res.dev
        if (res.type != RTN_LOCAL and dev.features & NetdevFeatures.IP_CSUM
                and ulen + IPV4_MIN_HLEN <= inet.ip.path_mtu(res, dst)):
            # udp4_hwcsum: the device sums from csum_start and stores at csum_offset; the
            # field starts as the folded pseudo-header sum
            _HDR.pack_into(buf, o, self.sport, dport, ulen, fold(psum))
            skb.ip_summed = CHECKSUM_PARTIAL
            skb.csum_start = o
            skb.csum_offset = 6
        else:
            _HDR.pack_into(buf, o, self.sport, dport, ulen, 0)
            c = ~fold(ones_sum(memoryview(buf)[o:o + ulen], psum)) & 0xFFFF
            c = c or 0xFFFF  # RFC 768: a computed zero is sent as all ones
            buf[o + 6] = c >> 8
            buf[o + 7] = c & 0xFF
        if tracepoint.enabled:
            tracepoint.emit("l4.udp_output", sport=self.sport, dport=dport, ulen=ulen, csum="offload" if skb.ip_summed == CHECKSUM_PARTIAL else "sw")
        stack.snmp["UdpOutDatagrams"] += 1
        inet.ip.output(skb, src, dst, IPPROTO_UDP, res, tos=self.tos, ttl=self.ttl)
        return n

    # UdpSock.sendmsg's compiled common case for callers that want no Python frame (the
    # syscall server's async sends): (sk, data) -> bytes sent, or -1 when the socket's fast
    # path is not the compiled one or any of its checks fails (then call sendmsg)
    sendmsg_c = staticmethod(_c_sendmsg_connected) if _c_sendmsg_connected is not None else None

    def sendmmsg_fast(self, payload: bytes, count: int, start: int = 0) -> int:
        """Datagrams `start`.. of a sendmmsg(2) batch (kstack.syscall.channel's SENDMMSG
        payload, checked whole first: ValueError) sent by the fast path of a connected socket:
        the index of the first not sent. The syscall layer sends that one with sendmsg
        (errors, SO_SNDBUF full) and comes back here for the rest."""
        fast = self._tx_fast
        if fast is not None and fast is _c_udp_send:
            return _c_sendmmsg_connected(self, payload, count, start)
        if fast is txfast_udp_send:  # the twin, with its one clock read per batch
            return txfast_sendmmsg(self, payload, count, start)
        return txfast_sendmmsg(self, payload, count, start, fast or _never)

    # --- receive ------------------------------------------------------------------------------

    def queue_rcv(self, skb: SkBuff) -> None:
        """__udp_enqueue_schedule_skb: queue unless the receive memory is over SO_RCVBUF."""
        if self.rmem > self.rcvbuf:
            snmp = self.stack.snmp
            snmp["UdpRcvbufErrors"] += 1
            snmp["UdpInErrors"] += 1
            self.drops += 1
            skb.drop(SkbDropReason.SOCKET_RCVBUFF)
            return
        ms = self.ms
        if ms is not None and not self.queue and not self.err:
            # an armed multishot receive with nothing queued before this datagram: copy it
            # to the user's completion ring now (softirq context), as kstack.rxfast does
            buf = skb.shinfo.buf
            d = skb.data
            if ms_deliver(ms, self, buf, d + UDP_HLEN, skb.tail - d - UDP_HLEN,
                          _U32.unpack_from(buf, skb.network_header + 12)[0],
                          buf[d] << 8 | buf[d + 1], skb.truesize):
                self.stack.snmp["UdpInDatagrams"] += 1
                skb.consume()
                return
        self.rmem += skb.truesize
        self.queue.append(skb)
        if self._wakeups:
            self.wake()
        if tracepoint.enabled:
            tracepoint.emit("sock.queue", qlen=len(self.queue), rmem=self.rmem, rcvbuf=self.rcvbuf)

    def recvmsg(self, bufsize: int, flags: int = 0) -> tuple[bytes, Address | None]:
        if self.err or self.closed:
            self._raise_pending()
        queue = self.queue
        if not queue:
            raise BlockingIOError(errno.EAGAIN, "no datagram")
        skb = queue[0]
        buf = skb.shinfo.buf
        d = skb.data
        o = d + UDP_HLEN
        data = bytes(memoryview(buf)[o:min(skb.tail, o + max(bufsize, 0))])  # the one copy out
        if tracepoint.enabled:
            tracepoint.emit("sock.copy_to_user", path="recvmsg", bytes=len(data), qlen=len(queue))
        src = _U32.unpack_from(buf, skb.network_header + 12)[0]
        sport = buf[d] << 8 | buf[d + 1]
        if not flags & MSG_PEEK:
            queue.popleft()
            self.rmem -= skb.truesize
            self.stack.snmp["UdpInDatagrams"] += 1
            skb.consume()
        name = self.table._names.get(src)
        return data, (name if name is not None else self.table.addr_str(src), sport)

    def _raise_pending(self) -> None:
        if self.closed:
            raise OSError(errno.EBADF, "closed")
        err, self.err = self.err, 0
        raise OSError(err, errno.errorcode.get(err, "error"))

    def poll(self) -> int:
        if self.closed:
            return POLLNVAL
        if self.wmem << 1 < self.sndbuf:  # sock_writeable: half of SO_SNDBUF free
            mask = POLLOUT
        else:
            mask = 0
            self.nospace = True  # sock_def_write_space wakes the poller when room comes
        if self.queue:
            mask |= POLLIN
        if self.err:
            mask |= POLLERR
        return mask

    def error_report(self, err: int) -> None:
        """sk_error_report."""
        self.err = err
        self.wake()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._dst = None
        self.table.unhash(self)
        while self.queue:
            self.queue.popleft().drop(SkbDropReason.SOCKET_CLOSE)
        self.rmem = 0
        self.wake()


class UdpTable:
    """udp_table: sockets by local port, and the protocol handlers."""

    def __init__(self, inet: "Inet") -> None:
        self.inet = inet
        self.stack = inet.stack
        self.snmp = inet.stack.snmp
        self.ports: dict[int, list[UdpSock]] = {}  # newest first
        self.count = 0
        self.rng = inet.rng
        self._names: dict[int, str] = {}

    def addr_str(self, addr: int) -> str:
        """ntoa with a small cache: recvmsg names the sender of every datagram."""
        s = self._names.get(addr)
        if s is None:
            if len(self._names) >= 1024:
                self._names.clear()
            s = self._names[addr] = ntoa(addr)
        return s

    # --- ports --------------------------------------------------------------------------------

    def get_port(self, sk: UdpSock, ip: int, port: int) -> None:
        """udp_lib_get_port: bind `sk` to (ip, port); port 0 picks a free ephemeral port from
        a random start in ip_local_port_range. EADDRINUSE unless both set SO_REUSEADDR."""
        if self.count >= MAX_UDP_SOCKETS:
            raise OSError(errno.ENOBUFS, "too many UDP sockets")
        if port == 0:
            port = pick_ephemeral(self.rng, self.stack.sysctl.ip_local_port_range,
                                  lambda p: not self._conflict(sk, ip, p), errno.EAGAIN)
        elif self._conflict(sk, ip, port):
            raise OSError(errno.EADDRINUSE, "address already in use")
        sk.rcv_saddr = ip
        sk.saddr = ip if self.inet.is_local(ip) else 0  # bound to a broadcast: send from the route's
        sk.sport = port
        self.ports.setdefault(port, []).insert(0, sk)
        self.count += 1

    def _conflict(self, sk: UdpSock, ip: int, port: int) -> bool:
        for o in self.ports.get(port, ()):
            if o is sk:
                continue
            if o.rcv_saddr and ip and o.rcv_saddr != ip:
                continue
            if o.reuseaddr and sk.reuseaddr:
                continue
            return True
        return False

    def unhash(self, sk: UdpSock) -> None:
        lst = self.ports.get(sk.sport)
        if lst and sk in lst:
            lst.remove(sk)
            self.count -= 1
            if not lst:
                del self.ports[sk.sport]

    # --- demux --------------------------------------------------------------------------------

    @staticmethod
    def _score(sk: UdpSock, saddr: int, sport: int, daddr: int) -> int:
        """compute_score: -1 no match; higher is more specific."""
        score = 2
        if sk.rcv_saddr:
            if sk.rcv_saddr != daddr:
                return -1
            score += 4
        if sk.connected:
            if sk.daddr != saddr or sk.dport != sport:
                return -1
            score += 8
        return score

    def lookup(self, saddr: int, sport: int, daddr: int, dport: int) -> UdpSock | None:
        """__udp4_lib_lookup: the best-scoring socket on dport."""
        lst = self.ports.get(dport)
        if not lst:
            return None
        if len(lst) == 1:
            sk = lst[0]
            return sk if self._score(sk, saddr, sport, daddr) >= 0 else None
        best, best_score = None, -1
        for sk in lst:
            s = self._score(sk, saddr, sport, daddr)
            if s > best_score:
                best, best_score = sk, s
        return best

    def rcv(self, skb: SkBuff) -> None:
        """udp_rcv: `skb.data` at the UDP header."""
        snmp = self.snmp
        off = skb.data
        n = skb.tail - off
        if n < UDP_HLEN:
            snmp["UdpInErrors"] += 1
            skb.drop(SkbDropReason.PKT_TOO_SMALL)
            return
        buf = skb.shinfo.buf
        sport, dport, ulen, check = _HDR.unpack_from(buf, off)
        if ulen > n or ulen < UDP_HLEN:
            snmp["UdpInErrors"] += 1
            skb.drop(SkbDropReason.PKT_TOO_SMALL)
            return
        if ulen < n:
            skb.trim(ulen)
        saddr, daddr = _ADDRS.unpack_from(buf, skb.network_header + 12)
        if check and skb.ip_summed != CHECKSUM_UNNECESSARY:
            # pseudo-header + segment must sum to 0xFFFF: 0 mod 0xFFFF (see ip_rcv); an odd
            # length is padded with a zero byte at the end
            v = int.from_bytes(memoryview(buf)[off:off + ulen], "big")
            if ulen & 1:
                v <<= 8
            if (v + (saddr >> 16) + (saddr & 0xFFFF) + (daddr >> 16) + (daddr & 0xFFFF)
                    + 17 + ulen) % 0xFFFF:
                snmp["UdpInCsumErrors"] += 1
                snmp["UdpInErrors"] += 1
                skb.drop(SkbDropReason.UDP_CSUM)
                return
        if skb.cb and skb.cb.get("rt_broadcast"):
            self._mcast_deliver(skb, saddr, sport, daddr, dport)
            return
        lst = self.ports.get(dport)
        if lst and len(lst) == 1 and not lst[0].connected and not lst[0].rcv_saddr:
            sk = lst[0]  # the common case: one wildcard socket on the port
        else:
            sk = self.lookup(saddr, sport, daddr, dport)
        if tracepoint.enabled:
            tracepoint.emit("l4.udp_rcv", dport=dport, ulen=ulen, socket=sk is not None, UdpNoPorts=snmp["UdpNoPorts"])
        if sk is None:
            snmp["UdpNoPorts"] += 1
            self.inet.icmp.send(skb, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0)
            skb.drop(SkbDropReason.NO_SOCKET)
            return
        sk.queue_rcv(skb)

    def _mcast_deliver(self, skb: SkBuff, saddr: int, sport: int, daddr: int, dport: int) -> None:
        """__udp4_lib_mcast_deliver: a clone to every socket that matches."""
        targets = [sk for sk in self.ports.get(dport, ())
                   if (not sk.rcv_saddr or sk.rcv_saddr == daddr or is_lbcast(sk.rcv_saddr)
                       or sk.rcv_saddr in self.inet.bcast_addrs)
                   and (not sk.connected or (sk.daddr == saddr and sk.dport == sport))]
        if not targets:
            self.snmp["UdpNoPorts"] += 1  # no ICMP about a broadcast (RFC 1122 3.2.2)
            skb.drop(SkbDropReason.NO_SOCKET)
            return
        for sk in targets[1:]:
            sk.queue_rcv(skb.clone())
        targets[0].queue_rcv(skb)

    def err(self, isrc: int, idst: int, quote: bytes, type: int, code: int, info: int) -> None:
        """__udp4_lib_err: an ICMP error about a datagram we sent (isrc is ours). Only a
        connected socket hears it (no IP_RECVERR), and only fatal errors."""
        sport, dport = struct.unpack_from("!HH", quote, 0)
        sk = self.lookup(idst, dport, isrc, sport)
        if sk is None:
            return
        if type == ICMP_DEST_UNREACH:
            if code == ICMP_FRAG_NEEDED:
                err, fatal = errno.EMSGSIZE, True
            elif code <= NR_ICMP_UNREACH:
                err, fatal = ICMP_ERR_CONVERT[code]
            else:
                return
        elif type == ICMP_TIME_EXCEEDED:
            err, fatal = errno.EHOSTUNREACH, False
        else:
            err, fatal = errno.EPROTO, True
        if fatal and sk.connected:
            sk.error_report(err)

    def flush(self) -> None:
        for lst in list(self.ports.values()):
            for sk in list(lst):
                sk.close()


def udp_socket(stack: Any, family: int, type: int, protocol: int) -> UdpSock:
    """The factory registered for (SOCK_DGRAM, IPPROTO_UDP)."""
    return UdpSock(stack, family, type, protocol)
