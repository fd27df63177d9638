"""The kernel side of a socket (Linux's struct sock and struct proto_ops), as the syscall
layer sees it.

Protocols (UDP, raw ICMP, TCP later) implement Sock; the syscall layer (kstack.syscall) turns
an application's calls into these methods. Every method is non-blocking: when a call cannot
complete now it raises BlockingIOError (EAGAIN), and the syscall layer parks the call until
the socket calls its wake-ups (sk_data_ready / sk_write_space / sk_state_change) or the call's
timeout expires. Errors are OSError with the errno Linux gives.

Addresses are (ip: str, port: int) for AF_INET, as Python's socket module has them; a raw
socket uses port 0.
"""
from __future__ import annotations

import abc
import errno
import socket as _pysocket
from typing import Any, Callable

from kstack.dstgen import dst_genid_bump
from wire.ipv4 import aton

__all__ = ["Sock", "POLLIN", "POLLOUT", "POLLERR", "POLLHUP", "POLLNVAL", "Address",
           "AF_INET", "SOCK_STREAM", "SOCK_DGRAM", "SOCK_RAW", "IPPROTO_ICMP", "IPPROTO_UDP",
           "IPPROTO_TCP", "SOL_SOCKET", "IPPROTO_IP", "SO_RCVBUF", "SO_SNDBUF", "SO_REUSEADDR",
           "SO_ERROR", "SO_KEEPALIVE", "SO_LINGER", "SO_BROADCAST", "IP_TOS", "IP_TTL",
           "TCP_NODELAY", "MSG_DONTWAIT", "MSG_PEEK", "SHUT_RD", "SHUT_WR", "SHUT_RDWR",
           "SK_RMEM_DEFAULT", "SK_WMEM_DEFAULT", "SK_RMEM_MAX", "SK_WMEM_MAX", "SOCK_MIN_RCVBUF"]

Address = tuple[str, int]

# the values Linux (and so Python's socket module on Linux) uses, so applications can pass either
AF_INET = 2
SOCK_STREAM = 1
SOCK_DGRAM = 2
SOCK_RAW = 3
IPPROTO_IP = 0
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
SOL_SOCKET = 1
SO_REUSEADDR = 2
SO_ERROR = 4
SO_BROADCAST = 6
SO_SNDBUF = 7
SO_RCVBUF = 8
SO_KEEPALIVE = 9
SO_LINGER = 13
IP_TOS = 1
IP_TTL = 2
TCP_NODELAY = 1
MSG_PEEK = 0x2
MSG_DONTWAIT = 0x40
SHUT_RD, SHUT_WR, SHUT_RDWR = 0, 1, 2

POLLIN = 0x001
POLLOUT = 0x004
POLLERR = 0x008
POLLHUP = 0x010
POLLNVAL = 0x020

# net.core.rmem_default / wmem_default / rmem_max / wmem_max (bytes); setsockopt doubles the
# value asked for (for bookkeeping overhead) and caps it at the max, as Linux does
SK_RMEM_DEFAULT = 212992
SK_WMEM_DEFAULT = 212992
SK_RMEM_MAX = 212992
SK_WMEM_MAX = 212992
SOCK_MIN_RCVBUF = 2304

assert _pysocket.SOCK_DGRAM == SOCK_DGRAM and _pysocket.SOL_SOCKET == SOL_SOCKET  # Linux values


def inet_addr(addr: Any) -> tuple[int, int]:
    """(ip int, port) from an (ip str, port) tuple, as TCP and UDP bind/connect/sendto take
    it; EINVAL for a malformed one and OverflowError for a port out of range, as Linux and
    Python's socket module answer."""
    try:
        host, port = addr
        ip = 0 if host in ("", "0.0.0.0") else int.from_bytes(aton(host), "big")
        port = int(port)
    except (TypeError, ValueError):
        raise OSError(errno.EINVAL, "bad address") from None
    if not 0 <= port <= 0xFFFF:
        raise OverflowError("port must be 0-65535")
    return ip, port


def pick_ephemeral(rng: Any, port_range: tuple[int, int], free: Callable[[int], bool],
                   err: int) -> int:
    """The first port p with free(p) from a random start in ip_local_port_range (wrapping);
    OSError(err) if none is free (TCP's connect answers EADDRNOTAVAIL, UDP's bind EAGAIN)."""
    lo, hi = port_range
    span = hi - lo + 1
    start = rng.randrange(span)
    for i in range(span):
        p = lo + (start + i) % span
        if free(p):
            return p
    raise OSError(err, "no ephemeral port free")


class Sock(abc.ABC):
    """One socket in the kernel. Subclasses implement the protocol's operations."""

    def __init__(self, stack: Any, family: int, type: int, protocol: int) -> None:
        self.stack = stack
        self.family = family
        self.type = type
        self.protocol = protocol
        self.rcvbuf = SK_RMEM_DEFAULT
        self.sndbuf = SK_WMEM_DEFAULT
        self.reuseaddr = False
        self.tos = 0
        self.ttl = 64
        self.err = 0  # sk_err: a pending error reported by the next call (SO_ERROR)
        self.closed = False
        self._wakeups: list[Callable[["Sock"], None]] = []

    # --- wake-ups (sk_data_ready, sk_write_space, sk_state_change) ---------------------------

    def add_wakeup(self, fn: Callable[["Sock"], None]) -> None:
        self._wakeups.append(fn)

    def remove_wakeup(self, fn: Callable[["Sock"], None]) -> None:
        try:
            self._wakeups.remove(fn)
        except ValueError:
            pass

    def wake(self) -> None:
        """Something changed (data arrived, room freed, an error): tell whoever waits."""
        for fn in list(self._wakeups):
            fn(self)

    # --- operations ----------------------------------------------------------------------------

    @abc.abstractmethod
    def bind(self, addr: Address) -> None: ...

    def connect(self, addr: Address) -> None:
        raise OSError(errno.EOPNOTSUPP, "connect")

    @abc.abstractmethod
    def sendmsg(self, data: bytes, addr: Address | None, flags: int = 0) -> int:
        """Send one datagram (or stream bytes): returns bytes taken; EAGAIN when full."""

    @abc.abstractmethod
    def recvmsg(self, bufsize: int, flags: int = 0) -> tuple[bytes, Address | None]:
        """Take received data (at most bufsize bytes; a datagram is truncated, the rest lost,
        as Linux does without MSG_TRUNC): EAGAIN when there is none."""

    @abc.abstractmethod
    def poll(self) -> int:
        """The POLL* mask of what a call could do now."""

    @abc.abstractmethod
    def getsockname(self) -> Address: ...

    def getpeername(self) -> Address:
        raise OSError(errno.ENOTCONN, "getpeername")

    def listen(self, backlog: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "listen")

    def accept(self) -> tuple["Sock", Address]:
        raise OSError(errno.EOPNOTSUPP, "accept")

    def shutdown(self, how: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "shutdown")

    def setsockopt(self, level: int, option: int, value: int) -> None:
        """The options every socket has; protocols extend this."""
        dst_genid_bump()  # SO_SNDBUF, IP_TOS, IP_TTL are in the socket's cached send state
        if level == SOL_SOCKET:
            if option == SO_RCVBUF:
                self.rcvbuf = max(SOCK_MIN_RCVBUF, min(int(value), SK_RMEM_MAX) * 2)
                return
            if option == SO_SNDBUF:
                self.sndbuf = max(SOCK_MIN_RCVBUF * 2, min(int(value), SK_WMEM_MAX) * 2)
                return
            if option == SO_REUSEADDR:
                self.reuseaddr = bool(value)
                return
        elif level == IPPROTO_IP:
            if option == IP_TOS:
                self.tos = int(value) & 0xFF
                return
            if option == IP_TTL:
                if not 1 <= int(value) <= 255:
                    raise OSError(errno.EINVAL, "IP_TTL")
                self.ttl = int(value)
                return
        raise OSError(errno.ENOPROTOOPT, "setsockopt")

    def getsockopt(self, level: int, option: int) -> int:
        if level == SOL_SOCKET:
            if option == SO_RCVBUF:
                return self.rcvbuf
            if option == SO_SNDBUF:
                return self.sndbuf
            if option == SO_REUSEADDR:
                return int(self.reuseaddr)
            if option == SO_ERROR:
                err, self.err = self.err, 0
                return err
        elif level == IPPROTO_IP:
            if option == IP_TOS:
                return self.tos
            if option == IP_TTL:
                return self.ttl
        raise OSError(errno.ENOPROTOOPT, "getsockopt")

    @abc.abstractmethod
    def close(self) -> None:
        """Release the socket: its queued packets are freed, its port unbound."""
