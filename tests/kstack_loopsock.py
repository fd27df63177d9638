"""An in-memory kernel for the syscall channel's tests: loopback Socks and an event loop.

LoopUdpSock is a datagram socket whose sendto delivers straight into the receive queue of the
socket bound to the destination (any address: the "network" is one dict); a destination in
198.19.255.0/24 has no route (ENETUNREACH, an error met in the kernel). LoopRawIcmpSock
answers an ICMP echo request sent through it with an echo reply carrying an IPv4 header (TTL
64), as a raw socket receives it, so ping runs against it. Both follow the Sock contract:
non-blocking, EAGAIN as BlockingIOError, wake() when data arrives.

Run as a script (`python tests/kstack_loopsock.py PATH`) it serves a SyscallServer at PATH in
its own process until SIGTERM, for benchmarks.
"""
from __future__ import annotations

import errno
import os
import select
import signal
import struct
import sys
import threading
from collections import deque

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kstack.sock import (POLLIN, POLLOUT, SOCK_DGRAM, SOCK_RAW, IPPROTO_ICMP, IPPROTO_UDP,  # noqa: E402
                         Sock)
from kstack.stack import NetStack  # noqa: E402
from kstack.syscall.server import SyscallServer  # noqa: E402
from wire.checksum import internet_checksum  # noqa: E402

LOCAL_IP = "198.18.0.1"
UNREACHABLE = "198.19.255."  # destinations in 198.19.255.0/24 have no route


class LoopNet:
    """The bound ports of the loopback "network"."""

    def __init__(self) -> None:
        self.ports: dict[int, "LoopUdpSock"] = {}
        self.next_port = 32768
        self.drops = 0
        self.closed = 0


class LoopUdpSock(Sock):
    def __init__(self, stack, family, type, protocol, net: LoopNet) -> None:
        super().__init__(stack, family, type, protocol)
        self.net = net
        self.local: tuple[str, int] | None = None
        self.peer: tuple[str, int] | None = None
        self.queue: deque[tuple[bytes, tuple[str, int]]] = deque()
        self.queued = 0

    def bind(self, addr):
        if self.local is not None:
            raise OSError(errno.EINVAL, "already bound")
        ip, port = addr
        if port == 0:
            port = self._ephemeral()
        elif port in self.net.ports:
            raise OSError(errno.EADDRINUSE, "address in use")
        self.local = (ip or "0.0.0.0", port)
        self.net.ports[port] = self

    def _ephemeral(self) -> int:
        while self.net.next_port in self.net.ports:
            self.net.next_port += 1
        p = self.net.next_port
        self.net.next_port += 1
        return p

    def _autobind(self):
        if self.local is None:
            self.bind(("0.0.0.0", 0))

    def connect(self, addr):
        self._autobind()
        self.peer = (addr[0], addr[1])

    def getpeername(self):
        if self.peer is None:
            raise OSError(errno.ENOTCONN, "not connected")
        return self.peer

    def getsockname(self):
        return self.local or ("0.0.0.0", 0)

    def sendmsg(self, data, addr, flags=0):
        if addr is None:
            if self.peer is None:
                raise OSError(errno.EDESTADDRREQ, "destination address required")
            addr = self.peer
        if len(data) > 65507:
            raise OSError(errno.EMSGSIZE, "message too long")
        if addr[0].startswith(UNREACHABLE):  # no route: an error the sender meets in the kernel
            raise OSError(errno.ENETUNREACH, "network is unreachable")
        self._autobind()
        dst = self.net.ports.get(addr[1])
        src = (LOCAL_IP, self.local[1])
        if dst is None or dst.queued + len(data) > dst.rcvbuf:
            self.net.drops += 1
        else:
            dst.queue.append((bytes(data), src))
            dst.queued += len(data)
            dst.wake()
        return len(data)

    def recvmsg(self, bufsize, flags=0):
        if self.err:
            err, self.err = self.err, 0
            raise OSError(err, os.strerror(err))
        if not self.queue:
            raise BlockingIOError(errno.EAGAIN, "no data")
        data, src = self.queue.popleft()
        self.queued -= len(data)
        return data[:bufsize], src

    def poll(self):
        return (POLLIN if self.queue else 0) | POLLOUT

    def close(self):
        if self.local is not None and self.net.ports.get(self.local[1]) is self:
            del self.net.ports[self.local[1]]
        self.queue.clear()
        self.closed = True
        self.net.closed += 1


class LoopRawIcmpSock(Sock):
    """A raw ICMP socket whose echo requests come straight back as replies."""

    def __init__(self, stack, family, type, protocol, net: LoopNet) -> None:
        super().__init__(stack, family, type, protocol)
        self.net = net
        self.queue: deque[tuple[bytes, tuple[str, int]]] = deque()

    def bind(self, addr):
        pass

    def getsockname(self):
        return ("0.0.0.0", 0)

    def sendmsg(self, data, addr, flags=0):
        if addr is None:
            raise OSError(errno.EDESTADDRREQ, "destination address required")
        data = bytes(data)
        if len(data) >= 8 and data[0] == 8:
            icmp = bytearray(data)
            icmp[0] = 0
            icmp[2:4] = b"\0\0"
            icmp[2:4] = struct.pack("!H", internet_checksum(icmp))
            src = bytes(int(x) for x in addr[0].split("."))
            dst = bytes(int(x) for x in LOCAL_IP.split("."))
            ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0, 64, 1, 0, src, dst))
            ip[10:12] = struct.pack("!H", internet_checksum(ip))
            self.queue.append((bytes(ip) + bytes(icmp), (addr[0], 0)))
            self.wake()
        return len(data)

    def recvmsg(self, bufsize, flags=0):
        if not self.queue:
            raise BlockingIOError(errno.EAGAIN, "no data")
        data, src = self.queue.popleft()
        return data[:bufsize], src

    def poll(self):
        return (POLLIN if self.queue else 0) | POLLOUT

    def close(self):
        self.queue.clear()
        self.closed = True
        self.net.closed += 1


def make_stack() -> tuple[NetStack, LoopNet]:
    stack = NetStack()
    net = LoopNet()
    stack.register_socket(SOCK_DGRAM, IPPROTO_UDP, lambda s, f, t, p: LoopUdpSock(s, f, t, p, net))
    stack.register_socket(SOCK_RAW, IPPROTO_ICMP, lambda s, f, t, p: LoopRawIcmpSock(s, f, t, p, net))
    return stack, net


def serve(server: SyscallServer, stop: threading.Event | None = None) -> None:
    """A minimal kernel event loop: poll the server's fds, dispatch, run its timers."""
    clock = server.clock
    ep = select.epoll()
    gen = -1
    try:
        while stop is None or not stop.is_set():
            if gen != server.fds_generation:  # fd numbers are reused: register all afresh
                gen = server.fds_generation
                ep.close()
                ep = select.epoll()
                for fd in server.fds():
                    ep.register(fd, select.EPOLLIN)
            dl = server.next_deadline()
            timeout = 0.05 if dl is None else max(0.0, min(0.05, (dl - clock()) / 1e9))
            for fd, _ in ep.poll(timeout):
                if gen == server.fds_generation:  # else fd may be closed or another's now
                    server.handle_ready(fd)
            server.run_timers(clock())
    finally:
        ep.close()


class ServerThread:
    """A SyscallServer over the loopback stack, served by a thread (for tests)."""

    def __init__(self, path: str, **kw) -> None:
        self.stack, self.net = make_stack()
        self.server = SyscallServer(self.stack, path, **kw)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=serve, args=(self.server, self.stop), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.server.close()


if __name__ == "__main__":
    stack, _net = make_stack()
    srv = SyscallServer(stack, sys.argv[1])
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: done.set())
    print("ready", flush=True)
    try:
        serve(srv, done)
    finally:
        srv.close()
