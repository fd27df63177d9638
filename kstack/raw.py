"""Raw ICMP sockets (SOCK_RAW, IPPROTO_ICMP; Linux's net/ipv4/raw.c): what ping uses.

sendmsg takes an ICMP message (the application computes its checksum, as ping does) and the
kernel puts the IP header in front; recvmsg returns the whole IP datagram, header included,
as Linux gives raw sockets. Every ICMP datagram delivered locally reaches every raw ICMP
socket (a clone each, before the ICMP layer sees it), filtered by bound and connected
addresses; a socket over SO_RCVBUF drops (RawRcvbufErrors, SOCKET_RCVBUFF).
"""
from __future__ import annotations

import errno
from collections import deque
from typing import TYPE_CHECKING, Any

from kstack.dropreason import SkbDropReason
from kstack.neighbour import skb_truesize
from kstack.route import RTN_BROADCAST
from kstack.skbuff import MAX_HEADER, SkBuff
from kstack.sock import (IPPROTO_ICMP, MSG_PEEK, POLLERR, POLLIN, POLLNVAL, POLLOUT, SO_BROADCAST,
                         SOL_SOCKET, Address, Sock)
from wire.ipv4 import IP_MAXPACKET, IPV4_MIN_HLEN, aton, is_lbcast, ntoa

if TYPE_CHECKING:
    from kstack.inet import Inet

__all__ = ["RawSock", "RawTable", "MAX_RAW_SOCKETS", "raw_socket"]

MAX_RAW_SOCKETS = 1024


def _ip(addr: Any) -> int:
    try:
        host = addr[0] if isinstance(addr, tuple) else addr
        return 0 if host in ("", "0.0.0.0") else int.from_bytes(aton(host), "big")
    except (TypeError, ValueError, IndexError):
        raise OSError(errno.EINVAL, "bad address") from None


class RawSock(Sock):
    def __init__(self, stack: Any, family: int, type: int, protocol: int) -> None:
        super().__init__(stack, family, type, protocol)
        self.inet: "Inet" = stack.protocols["inet"]
        self.rcv_saddr = 0
        self.daddr = 0
        self.broadcast = False
        self.queue: deque[SkBuff] = deque()
        self.rmem = 0
        self.drops = 0
        self.inet.raw.add(self)

    def bind(self, addr: Address) -> None:
        ip = _ip(addr)
        if ip and not self.inet.is_local(ip):
            raise OSError(errno.EADDRNOTAVAIL, "cannot assign requested address")
        self.rcv_saddr = ip

    def connect(self, addr: Address) -> None:
        self.daddr = _ip(addr)

    def getsockname(self) -> Address:
        return (ntoa(self.rcv_saddr), 0)

    def setsockopt(self, level: int, option: int, value: int) -> None:
        if level == SOL_SOCKET and option == SO_BROADCAST:
            self.broadcast = bool(value)
            return
        super().setsockopt(level, option, value)

    def sendmsg(self, data: bytes, addr: Address | None, flags: int = 0) -> int:
        """raw_sendmsg without IP_HDRINCL: `data` is the ICMP message."""
        if self.closed:
            raise OSError(errno.EBADF, "closed")
        if self.err:
            err, self.err = self.err, 0
            raise OSError(err, errno.errorcode.get(err, "error"))
        if len(data) > IP_MAXPACKET - IPV4_MIN_HLEN:
            raise OSError(errno.EMSGSIZE, "message too long")
        if addr is not None:
            dst = _ip(addr)
        elif self.daddr:
            dst = self.daddr
        else:
            raise OSError(errno.EDESTADDRREQ, "destination address required")
        inet = self.inet
        res = inet.ip.route_output(dst)
        if res is None:
            raise OSError(errno.ENETUNREACH, "network is unreachable")
        if (res.type == RTN_BROADCAST or is_lbcast(dst)) and not self.broadcast:
            raise OSError(errno.EACCES, "permission denied (SO_BROADCAST)")
        src = self.rcv_saddr or res.src
        skb = self.stack.pool.alloc(len(data), MAX_HEADER)
        skb.put_data(data)
        if len(data) >= 1:
            inet.icmp.out_count(data[0])
        inet.ip.output(skb, src, dst, self.protocol, res, tos=self.tos, ttl=self.ttl)
        return len(data)

    def queue_rcv(self, skb: SkBuff) -> None:
        if self.rmem >= self.rcvbuf:
            self.drops += 1
            self.stack.snmp["RawRcvbufErrors"] += 1
            skb.drop(SkbDropReason.SOCKET_RCVBUFF)
            return
        self.rmem += skb_truesize(skb)
        self.queue.append(skb)
        self.wake()

    def recvmsg(self, bufsize: int, flags: int = 0) -> tuple[bytes, Address | None]:
        """The IP datagram, header included (truncated to bufsize)."""
        if self.closed:
            raise OSError(errno.EBADF, "closed")
        if self.err:
            err, self.err = self.err, 0
            raise OSError(err, errno.errorcode.get(err, "error"))
        if not self.queue:
            raise BlockingIOError(errno.EAGAIN, "no datagram")
        skb = self.queue[0]
        nh = skb.network_header
        buf = skb.shinfo.buf
        data = bytes(memoryview(buf)[nh:min(skb.tail, nh + max(bufsize, 0))])
        src = int.from_bytes(buf[nh + 12:nh + 16], "big")
        if not flags & MSG_PEEK:
            self.queue.popleft()
            self.rmem -= skb_truesize(skb)
            skb.consume()
        return data, (ntoa(src), 0)

    def poll(self) -> int:
        if self.closed:
            return POLLNVAL
        return POLLOUT | (POLLIN if self.queue else 0) | (POLLERR if self.err else 0)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.inet.raw.remove(self)
        while self.queue:
            self.queue.popleft().drop(SkbDropReason.SOCKET_CLOSE)
        self.rmem = 0
        self.wake()


class RawTable:
    def __init__(self, inet: "Inet") -> None:
        self.inet = inet
        self.socks: list[RawSock] = []

    def add(self, sk: RawSock) -> None:
        if len(self.socks) >= MAX_RAW_SOCKETS:
            raise OSError(errno.ENOBUFS, "too many raw sockets")
        self.socks.append(sk)

    def remove(self, sk: RawSock) -> None:
        if sk in self.socks:
            self.socks.remove(sk)

    def deliver(self, skb: SkBuff, proto: int) -> bool:
        """raw_local_deliver: a clone to each matching socket; True if any matched."""
        buf = skb.shinfo.buf
        nh = skb.network_header
        src = int.from_bytes(buf[nh + 12:nh + 16], "big")
        dst = int.from_bytes(buf[nh + 16:nh + 20], "big")
        hit = False
        for sk in self.socks:
            if sk.protocol != proto:
                continue
            if sk.rcv_saddr and sk.rcv_saddr != dst:
                continue
            if sk.daddr and sk.daddr != src:
                continue
            hit = True
            sk.queue_rcv(skb.clone())
        return hit

    def flush(self) -> None:
        for sk in list(self.socks):
            sk.close()


def raw_socket(stack: Any, family: int, type: int, protocol: int) -> RawSock:
    """The factory registered for (SOCK_RAW, IPPROTO_ICMP)."""
    if protocol != IPPROTO_ICMP:
        raise OSError(errno.EPROTONOSUPPORT, "only raw ICMP sockets")
    return RawSock(stack, family, type, protocol)
