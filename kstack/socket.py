"""Sockets for applications, shaped like Python's socket module, served by a kstack kernel.

    from kstack import socket as ksocket
    ksocket.connect_kernel("/run/nicemu/host-a.sock")    # or NICEMU_KERNEL in the environment
    s = ksocket.socket(ksocket.AF_INET, ksocket.SOCK_DGRAM)
    s.bind(("198.18.0.1", 5000)); s.settimeout(1.0)
    data, addr = s.recvfrom(2048)

Every method that Linux implements as a system call (socket, bind, connect, sendto, recvfrom,
setsockopt, getsockopt, getsockname, getpeername, shutdown, close, select/poll) is one call
over the process's KernelChannel; settimeout/setblocking/fileno stay in the process (Python
keeps the timeout in the socket object too). Blocking and timeouts happen in the kernel: a
recv with a timeout is parked there until data or the deadline. Errors are OSError with
Linux's errno (BlockingIOError for EAGAIN, TimeoutError "timed out" as socket.timeout).

Datagram sends are asynchronous (io_uring's way, see kstack/syscall/client.py): a sendto on a
SOCK_DGRAM socket that is bound (by bind, connect or an earlier send) and has a destination
(an address, or connect) pushes the datagram into the submission ring and returns len(data)
at once; a failure the kernel meets later (ENETUNREACH, an ICMP error already pending on the
socket) becomes the socket's pending error: the next send or recv raises it, and
getsockopt(SO_ERROR) returns and clears it, as Linux reports asynchronous ICMP errors. A send
stays synchronous when the application must see its outcome now: the first send on a socket
that was never bound (it binds; its errors, and the port, are the application's to see at
once), a send without a destination (EDESTADDRREQ), one over 65507 bytes (EMSGSIZE), one with
flags other than MSG_DONTWAIT, and every send on a raw socket. At most max_async sends wait
unconsumed in the ring; the next waits for the kernel (EAGAIN on a non-blocking socket).

Receives on datagram and raw sockets use a multishot receive: the first recv arms it, and the
kernel then copies each datagram into the completion ring as it arrives while the credit
(RX_CREDIT datagrams, given back in batches) lasts; beyond it datagrams wait in the kernel's
socket queue under SO_RCVBUF. recv takes the next one from the local queue with no round trip;
it waits for the completion ring only when the queue is empty (timeouts are kept here); a
non-blocking recv with nothing local makes one flush call before EAGAIN. select/poll count the
datagrams already delivered here as readable. NICEMU_ASYNC_SEND=0 / NICEMU_MULTISHOT=0 turn
either off (one synchronous call per send or receive, as before).

Stream sockets (SOCK_STREAM, TCP) make one synchronous call per operation: connect waits in
the kernel for the handshake (non-blocking: EINPROGRESS, then select/poll for POLLOUT and
SO_ERROR), accept returns a new socket object, send copies in what the kernel's send buffer
takes (a blocking send waits until all of it is taken; sendall sends max_payload bytes per
call), recv waits for data, EOF (b"") or an error, close with SO_LINGER (struct linger
bytes) waits for the FIN to be acknowledged. Every byte is copied once each way across the
channel and counted.

fileno() is the kernel's descriptor number in this process's table: it works with this
module's select() and poll(), not with the operating system's.

costs() reports this process's own costs: CPU ns (/proc/self/schedstat), context switches
(/proc/self/status), calls made, bytes copied in and out.
"""
from __future__ import annotations

import atexit
import errno
import os
import socket as _py
import struct
import threading
from collections import Counter
from typing import Any, Iterable

from kstack.sock import (AF_INET, IP_TOS, IP_TTL, IPPROTO_ICMP, IPPROTO_IP, IPPROTO_TCP,
                         IPPROTO_UDP, MSG_DONTWAIT, MSG_PEEK, POLLERR, POLLHUP, POLLIN, POLLNVAL,
                         POLLOUT, SHUT_RD, SHUT_RDWR, SHUT_WR, SO_BROADCAST, SO_ERROR,
                         SO_KEEPALIVE, SO_LINGER, SO_RCVBUF, SO_REUSEADDR, SO_SNDBUF, SOCK_DGRAM,
                         SOCK_RAW, SOCK_STREAM, SOL_SOCKET, TCP_NODELAY)
from kstack.tcp_sock import TCP_KEEPCNT, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_MAXSEG
from kstack.syscall.channel import MAX_MMSG, POLLFD, Op, pack_mmsg
from kstack.syscall.client import KernelChannel

__all__ = ["socket", "select", "poll", "connect_kernel", "disconnect_kernel", "kernel", "costs", "timeout", "error",
           "getdefaulttimeout", "setdefaulttimeout", "AF_INET", "SOCK_DGRAM", "SOCK_RAW",
           "SOCK_STREAM", "IPPROTO_TCP", "TCP_NODELAY", "TCP_KEEPIDLE", "TCP_KEEPINTVL",
           "TCP_KEEPCNT", "TCP_MAXSEG", "SO_KEEPALIVE", "SO_LINGER",
           "IPPROTO_ICMP", "IPPROTO_UDP", "IPPROTO_IP", "SOL_SOCKET", "SO_RCVBUF", "SO_SNDBUF",
           "SO_REUSEADDR", "SO_ERROR", "SO_BROADCAST", "IP_TOS", "IP_TTL", "MSG_DONTWAIT",
           "MSG_PEEK", "SHUT_RD", "SHUT_WR", "SHUT_RDWR", "POLLIN", "POLLOUT", "POLLERR",
           "POLLHUP", "POLLNVAL", "POLLPRI"]

timeout = TimeoutError  # socket.timeout is TimeoutError since Python 3.10
error = OSError
gaierror = _py.gaierror
POLLPRI = 0x002
ENV = "NICEMU_KERNEL"

_channel: KernelChannel | None = None
_channel_lock = threading.Lock()
_default_timeout: float | None = None
_copies: Counter[str] = Counter()  # bytes this process handed to and got from the kernel
ASYNC_SEND = os.environ.get("NICEMU_ASYNC_SEND", "1") != "0"
MULTISHOT = os.environ.get("NICEMU_MULTISHOT", "1") != "0"
RX_CREDIT = 1024  # datagrams a socket's multishot receive may have in flight to this process
UDP_MAX = 65507


def connect_kernel(path: str | None = None) -> KernelChannel:
    """Connect this process to the kernel at `path` (default: $NICEMU_KERNEL)."""
    global _channel
    path = path or os.environ.get(ENV)
    if not path:
        raise OSError(errno.ENOENT, f"no kernel to talk to: call connect_kernel(path) or set {ENV}")
    with _channel_lock:
        if _channel is not None:
            _channel.close() if _channel.pid == os.getpid() else _channel.abandon()
        _channel = KernelChannel(path)
        return _channel


def disconnect_kernel() -> None:
    """Close this process's channel (the kernel closes the sockets it still has)."""
    global _channel
    with _channel_lock:
        ch, _channel = _channel, None
    if ch is not None:
        ch.close() if ch.pid == os.getpid() else ch.abandon()


def kernel() -> KernelChannel:
    """This process's channel (connecting on first use; a forked child connects anew)."""
    ch = _channel
    if ch is None or ch.closed or ch.pid != os.getpid():
        return connect_kernel(os.environ.get(ENV) or (ch.path if ch is not None else None))
    return ch


def _after_fork_in_child() -> None:
    """A forked child must not keep its parent's channel open: the kernel would not see the
    parent exit while the child lives. Its own calls connect anew."""
    global _channel
    if _channel is not None:
        _channel.abandon()
        _channel = None


os.register_at_fork(after_in_child=_after_fork_in_child)


def _at_exit() -> None:
    """Sends that returned are sent: let the kernel consume the ring before the process ends."""
    ch = _channel
    if ch is not None and ch.pid == os.getpid() and not ch.closed and not ch.dead:
        try:
            ch.drain()
        except OSError:
            pass


atexit.register(_at_exit)


def getdefaulttimeout() -> float | None:
    return _default_timeout


def setdefaulttimeout(t: float | None) -> None:
    global _default_timeout
    _default_timeout = _check_timeout(t)


def _check_timeout(t: float | None) -> float | None:
    if t is None:
        return None
    t = float(t)
    if t < 0:
        raise ValueError("Timeout value out of range")
    return t


def _error(err: int) -> OSError:
    if err == errno.ETIMEDOUT:
        return TimeoutError("timed out")
    return OSError(err, os.strerror(err))  # OSError picks BlockingIOError etc. by errno


def _addr(addr: Any) -> tuple[str, int]:
    if not isinstance(addr, tuple) or len(addr) != 2:
        raise TypeError("AF_INET address must be a pair (host, port)")
    host, port = addr
    if not isinstance(port, int):
        raise TypeError(f"'{type(port).__name__}' object cannot be interpreted as an integer")
    if not 0 <= port <= 0xFFFF:
        raise OverflowError("port must be 0-65535.")
    if host in ("", None):
        host = "0.0.0.0"
    elif host == "<broadcast>":
        host = "255.255.255.255"
    try:
        return _py.inet_ntoa(_py.inet_aton(host)), port
    except (OSError, TypeError):
        raise _py.gaierror(_py.EAI_NONAME, "Name or service not known") from None


def _timeout_ns(t: float | None) -> int:
    return -1 if t is None else int(t * 1e9)


_LINGER = struct.Struct("ii")  # struct linger: l_onoff, l_linger


class socket:
    """An AF_INET socket in the kstack kernel (SOCK_STREAM, SOCK_DGRAM, or SOCK_RAW with
    IPPROTO_ICMP). `fileno` wraps a descriptor the kernel already gave (accept)."""

    def __init__(self, family: int = AF_INET, type: int = SOCK_DGRAM, proto: int = 0,
                 fileno: int | None = None, *, channel: KernelChannel | None = None) -> None:
        self._ch = channel or kernel()
        self.family = family
        self.type = type
        self.proto = proto
        self._timeout = _default_timeout
        self._bound = False  # bound by bind, connect or a send: sends may then go async
        self._connected = False
        self.async_send = ASYNC_SEND and type == SOCK_DGRAM
        self.multishot = MULTISHOT and type in (SOCK_DGRAM, SOCK_RAW)
        self.rx_credit = RX_CREDIT
        if fileno is not None:
            self._fd = fileno
            self._bound = self._connected = True
        else:
            self._fd = self._call(Op.SOCKET, -1, family, type, proto).result

    def _call(self, op: int, fd: int, a0: int = 0, a1: int = 0, a2: int = 0, payload: Any = b"",
              addr: tuple[str, int] | None = None):
        c = self._ch.call(op, fd, a0, a1, a2, payload, addr)
        if c.result < 0:
            raise _error(-c.result)
        return c

    def _live(self) -> int:
        if self._fd < 0:
            raise OSError(errno.EBADF, "Bad file descriptor")
        return self._fd

    def _tmo(self, flags: int) -> int:
        return 0 if flags & MSG_DONTWAIT else _timeout_ns(self._timeout)

    # --- the calls -------------------------------------------------------------------------

    def bind(self, address: tuple[str, int]) -> None:
        self._call(Op.BIND, self._live(), addr=_addr(address))
        self._bound = True

    def connect(self, address: tuple[str, int]) -> None:
        """On SOCK_STREAM the kernel waits for the handshake (the socket's timeout;
        non-blocking: BlockingIOError EINPROGRESS, then EALREADY until it is done)."""
        tmo = _timeout_ns(self._timeout) if self.type == SOCK_STREAM else 0
        self._call(Op.CONNECT, self._live(), 0, 0, tmo, addr=_addr(address))
        self._bound = self._connected = True

    def listen(self, backlog: int = 128) -> None:
        self._call(Op.LISTEN, self._live(), max(0, int(backlog)))
        self._bound = True

    def accept(self) -> tuple["socket", tuple[str, int]]:
        """A new socket for the next connection (waits up to the timeout), and its peer."""
        c = self._call(Op.ACCEPT, self._live(), 0, 0, _timeout_ns(self._timeout))
        conn = socket(self.family, self.type, self.proto, fileno=c.result, channel=self._ch)
        conn._timeout = _default_timeout  # as Python: the new socket follows the default
        return conn, c.addr

    def _pending_error(self, fd: int) -> None:
        """Raise (and clear) the error an async completion left on this socket."""
        err = self._ch.errors.pop(fd, 0) if self._ch.errors else 0
        if err:
            raise OSError(err, os.strerror(err))

    def connect_ex(self, address: tuple[str, int]) -> int:
        try:
            self.connect(address)
        except OSError as e:
            return e.errno or errno.EIO
        return 0

    def sendto(self, data: bytes, flags_or_addr: Any, address: Any = None) -> int:
        flags, addr = (0, flags_or_addr) if address is None else (flags_or_addr, address)
        return self._send(data, flags, _addr(addr))

    def send(self, data: bytes, flags: int = 0) -> int:
        if self.type == SOCK_STREAM:
            view = data if type(data) is bytes else memoryview(data).cast("B")
            return self._stream_send(view[:self._ch.layout.max_payload], flags)
        return self._send(data, flags, None)

    def sendall(self, data: bytes, flags: int = 0) -> None:
        if self.type != SOCK_STREAM:
            self._send(data, flags, None)
            return
        view = memoryview(data).cast("B")
        step = self._ch.layout.max_payload
        off = 0
        while off < len(view):
            off += self._stream_send(view[off:off + step], flags)

    def _stream_send(self, view: Any, flags: int) -> int:
        """One SENDTO: the kernel copies in what the send buffer takes (all of it unless
        non-blocking or timed out)."""
        n = self._call(Op.SENDTO, self._live(), flags, 0, self._tmo(flags), view).result
        _copies["bytes_sent"] += n
        return n

    def _send(self, data: Any, flags: int, addr: tuple[str, int] | None) -> int:
        view = data if type(data) is bytes else memoryview(data).cast("B")
        n = len(view)
        if n > self._ch.layout.max_payload:
            raise OSError(errno.EMSGSIZE, os.strerror(errno.EMSGSIZE))
        fd = self._live()
        if self._ch.errors:
            self._pending_error(fd)
        if (self.async_send and self._bound and (addr is not None or self._connected)
                and n <= UDP_MAX and not flags & ~MSG_DONTWAIT):
            t = 0.0 if flags & MSG_DONTWAIT else self._timeout
            self._ch.submit_async(Op.SENDTO, fd, flags, 0, -1, view, addr, timeout=t)
            _copies["bytes_sent"] += n
            return n
        n = self._call(Op.SENDTO, fd, flags, 0, self._tmo(flags), view, addr).result
        self._bound = True
        _copies["bytes_sent"] += len(view)
        return n

    def sendmmsg(self, datagrams: Iterable, flags: int = 0, address: Any = None) -> int:
        """sendmmsg(2) for a datagram socket: the datagrams to `address` (or the connected
        peer) in as few calls as fit (MAX_MMSG datagrams and the channel's payload size per
        call; each call is one syscall, as Linux counts sendmmsg). Returns how many were sent:
        async (see _send) all of them; synchronous, a short count when one failed after
        others went (its error then comes with the next call, as Linux does), the error itself
        when the first of a call failed."""
        if self.type == SOCK_STREAM:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        addr = _addr(address) if address is not None else None
        views = [d if type(d) is bytes else memoryview(d).cast("B") for d in datagrams]
        if not views:
            return 0
        fd = self._live()
        for v in views:
            if len(v) > UDP_MAX:
                raise OSError(errno.EMSGSIZE, os.strerror(errno.EMSGSIZE))
        if not self._bound:  # the first send autobinds synchronously, its errors seen at once
            self._send(views[0], flags, addr)
            return 1 + self.sendmmsg(views[1:], flags, address) if len(views) > 1 else 1
        if self._ch.errors:
            self._pending_error(fd)
        limit = self._ch.layout.max_payload
        sent = 0
        i = 0
        while i < len(views):
            j, size = i, 0
            while j < len(views) and j - i < MAX_MMSG and size + 2 + len(views[j]) <= limit:
                size += 2 + len(views[j])
                j += 1
            if j == i:  # one datagram larger than a call's payload: alone, as sendto
                sent += self._send(views[i], flags, addr) >= 0
                i += 1
                continue
            chunk = views[i:j]
            payload = pack_mmsg(chunk)
            nbytes = size - 2 * len(chunk)
            if (self.async_send and (addr is not None or self._connected)
                    and not flags & ~MSG_DONTWAIT):
                t = 0.0 if flags & MSG_DONTWAIT else self._timeout
                self._ch.submit_async(Op.SENDMMSG, fd, flags, len(chunk), -1, payload, addr, timeout=t)
                _copies["bytes_sent"] += nbytes
                sent += len(chunk)
            else:
                try:
                    n = self._call(Op.SENDMMSG, fd, flags, len(chunk), self._tmo(flags), payload, addr).result
                except OSError:
                    if sent:
                        return sent
                    raise
                _copies["bytes_sent"] += sum(len(v) for v in chunk[:n])
                sent += n
                if n < len(chunk):
                    return sent
            i = j
        return sent

    def recvmmsg(self, vlen: int, bufsize: int = 65535, flags: int = 0) -> list:
        """recvmmsg(2) for a datagram socket: up to `vlen` datagrams as (data, address); waits
        (as recvfrom does, by the socket's timeout and MSG_DONTWAIT) for the first only, then
        takes what else is already here: the multishot receive's datagrams in this process's
        queue and the completion ring, reaped once without sleeping. A pending error stops the
        batch and comes with the next call, as Linux does."""
        if vlen < 1:
            raise ValueError("vlen must be at least 1")
        out = [self.recvfrom(bufsize, flags)]
        if vlen == 1 or flags & ~MSG_DONTWAIT or not self.multishot or self.type == SOCK_STREAM:
            return out
        ch = self._ch
        fd = self._fd
        with ch._lock:
            st = ch.rx.get(fd)
            if st is None:
                return out
            if len(st.queue) < vlen - 1 and not ch.errors:
                ch._take(block=False)
            if ch.errors or ch.rx.get(fd) is not st:
                return out
            q = st.queue
            k = min(vlen - 1, len(q))
            nbytes = 0
            popleft = q.popleft
            append = out.append
            for _ in range(k):
                data, addr = popleft()
                if len(data) > bufsize:
                    data = data[:bufsize]
                nbytes += len(data)
                append((data, addr))
            st.consumed += k
            if st.consumed * 2 >= st.credit:
                ch.grant(fd, st)
        _copies["bytes_received"] += nbytes
        return out

    def recvfrom(self, bufsize: int, flags: int = 0) -> tuple[bytes, tuple[str, int] | None]:
        if bufsize < 0:
            raise ValueError("negative buffersize in recvfrom")
        fd = self._live()
        ch = self._ch
        if self.type == SOCK_STREAM:
            c = self._call(Op.RECVFROM, fd, bufsize, flags, self._tmo(flags))
            _copies["bytes_received"] += len(c.payload)
            return c.payload, None
        if not flags and ch.rx:  # the fast path: a datagram already here
            st = ch.rx.get(fd)
            if st is not None and st.queue and not ch.errors:
                with ch._lock:
                    if st.queue:
                        data, addr = st.queue.popleft()
                        st.consumed += 1
                        if st.consumed * 2 >= st.credit:
                            ch.grant(fd, st)
                        data = data[:bufsize]
                        _copies["bytes_received"] += len(data)
                        return data, addr
        if self.multishot and not flags & ~(MSG_DONTWAIT | MSG_PEEK):
            t = 0.0 if flags & MSG_DONTWAIT else self._timeout
            data, addr = self._ch.recv_multishot(fd, peek=bool(flags & MSG_PEEK), timeout=t,
                                                 credit=self.rx_credit)
            data = data[:bufsize]  # the rest of the datagram is lost, as Linux does
            _copies["bytes_received"] += len(data)
            return data, addr
        self._pending_error(fd)
        c = self._call(Op.RECVFROM, fd, bufsize, flags, self._tmo(flags))
        _copies["bytes_received"] += len(c.payload)
        return c.payload, c.addr

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        return self.recvfrom(bufsize, flags)[0]

    def recvfrom_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> tuple[int, tuple[str, int] | None]:
        view = memoryview(buffer).cast("B")
        if nbytes < 0:
            raise ValueError("negative buffersize in recvfrom_into")
        if nbytes > len(view):
            raise ValueError("nbytes is greater than the length of the buffer")
        data, addr = self.recvfrom(nbytes or len(view), flags)
        view[:len(data)] = data
        return len(data), addr

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        return self.recvfrom_into(buffer, nbytes, flags)[0]

    def setsockopt(self, level: int, option: int, value: int | bytes) -> None:
        if level == SOL_SOCKET and option == SO_LINGER:
            # struct linger crosses as one word: -1 off, else the seconds
            if not isinstance(value, (bytes, bytearray)) or len(value) < _LINGER.size:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            onoff, secs = _LINGER.unpack_from(bytes(value))
            value = max(0, secs) if onoff else -1
        elif isinstance(value, (bytes, bytearray)):
            value = int.from_bytes(bytes(value)[:4], "little")
        self._call(Op.SETSOCKOPT, self._live(), level, option, int(value))

    def getsockopt(self, level: int, option: int, buflen: int = 0) -> int | bytes:
        v = self._call(Op.GETSOCKOPT, self._live(), level, option).result
        if level == SOL_SOCKET and option == SO_ERROR:  # an async completion's error first
            v = self._ch.errors.pop(self._fd, 0) or v
        if level == SOL_SOCKET and option == SO_LINGER:
            return _LINGER.pack(v >> 32 & 1, v & 0x7FFFFFFF)[:buflen or _LINGER.size]
        return struct.pack("i", v)[:buflen] if buflen else v

    def getsockname(self) -> tuple[str, int]:
        return self._call(Op.GETSOCKNAME, self._live()).addr

    def getpeername(self) -> tuple[str, int]:
        return self._call(Op.GETPEERNAME, self._live()).addr

    def shutdown(self, how: int) -> None:
        self._call(Op.SHUTDOWN, self._live(), how)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0 and not self._ch.closed and not self._ch.dead:
            try:
                self._call(Op.CLOSE, fd)
            finally:
                self._ch.forget(fd)

    def detach(self) -> int:
        fd, self._fd = self._fd, -1
        return fd

    # --- in the process --------------------------------------------------------------------

    def fileno(self) -> int:
        return self._fd

    def settimeout(self, value: float | None) -> None:
        self._timeout = _check_timeout(value)

    def gettimeout(self) -> float | None:
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        self._timeout = None if flag else 0.0

    def getblocking(self) -> bool:
        return self._timeout != 0.0

    def __enter__(self) -> "socket":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<kstack.socket fd={self._fd}, family={self.family}, type={self.type}, proto={self.proto}>"


# --- readiness ----------------------------------------------------------------------------

def _fileno(obj: Any) -> int:
    fd = obj if isinstance(obj, int) else obj.fileno()
    if not isinstance(fd, int) or fd < 0:
        raise ValueError(f"file descriptor cannot be a negative integer ({fd})")
    return fd


def _poll_call(entries: list[tuple[int, int]], timeout_ns: int,
               channel: KernelChannel | None = None) -> list[tuple[int, int]]:
    """One POLL call: [(fd, revents)] of the entries with something to report."""
    ch = channel or kernel()
    ch.reap()  # datagrams already in the completion ring count as readable
    if any(ch.readable(fd) & (ev | POLLERR) for fd, ev in entries):
        timeout_ns = 0  # something is ready here: only ask what else is
    payload = b"".join(POLLFD.pack(fd, ev, 0) for fd, ev in entries)
    c = ch.call(Op.POLL, -1, 0, 0, timeout_ns, payload)
    if c.result < 0:
        raise _error(-c.result)
    got = {}
    for i in range(0, min(len(c.payload), len(payload)), POLLFD.size):
        fd, _ev, rev = POLLFD.unpack_from(c.payload, i)
        got[fd] = rev
    out = []
    for fd, ev in entries:
        rev = got.get(fd, 0)
        if not rev & POLLNVAL:
            rev |= ch.readable(fd) & (ev | POLLERR)
        if rev:
            out.append((fd, rev))
    return out


def select(rlist: Iterable, wlist: Iterable, xlist: Iterable, timeout: float | None = None,
           ) -> tuple[list, list, list]:
    """select.select over kstack sockets: one call, waiting in the kernel."""
    rlist, wlist, xlist = list(rlist), list(wlist), list(xlist)
    if timeout is not None and timeout < 0:
        raise ValueError("timeout must be non-negative")
    events: dict[int, int] = {}
    for objs, ev in ((rlist, POLLIN), (wlist, POLLOUT), (xlist, POLLPRI)):
        for o in objs:
            fd = _fileno(o)
            events[fd] = events.get(fd, 0) | ev
    if not events:
        return [], [], []
    ready = dict(_poll_call(sorted(events.items()), _timeout_ns(timeout)))
    if any(r & POLLNVAL for r in ready.values()):
        raise OSError(errno.EBADF, "Bad file descriptor")
    r = [o for o in rlist if ready.get(_fileno(o), 0) & (POLLIN | POLLERR | POLLHUP)]
    w = [o for o in wlist if ready.get(_fileno(o), 0) & (POLLOUT | POLLERR)]
    x = [o for o in xlist if ready.get(_fileno(o), 0) & POLLPRI]
    return r, w, x


class poll:
    """select.poll over kstack sockets; poll(timeout) takes milliseconds as select.poll does."""

    def __init__(self) -> None:
        self._fds: dict[int, int] = {}

    def register(self, fd: Any, eventmask: int = POLLIN | POLLPRI | POLLOUT) -> None:
        self._fds[_fileno(fd)] = eventmask & 0xFFFF

    def modify(self, fd: Any, eventmask: int) -> None:
        n = _fileno(fd)
        if n not in self._fds:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        self._fds[n] = eventmask & 0xFFFF

    def unregister(self, fd: Any) -> None:
        del self._fds[_fileno(fd)]

    def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
        if not self._fds:
            return []
        t = -1 if timeout is None or timeout < 0 else int(timeout * 1e6)
        return _poll_call(sorted(self._fds.items()), t)


# --- costs --------------------------------------------------------------------------------

def _proc_costs(pid: str = "self") -> dict[str, int]:
    out = {"cpu_ns": 0, "voluntary_ctxt_switches": 0, "nonvoluntary_ctxt_switches": 0}
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            out["cpu_ns"] = int(f.read().split()[0])  # ns on CPU, not 10 ms ticks
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
                    out[k] = int(v)
    except (OSError, ValueError, IndexError):
        pass
    return out


def costs() -> dict[str, Any]:
    """This process's costs so far: CPU, context switches, kernel calls, bytes copied."""
    out: dict[str, Any] = _proc_costs()
    out["context_switches"] = out["voluntary_ctxt_switches"] + out["nonvoluntary_ctxt_switches"]
    ch = _channel
    st = ch.stats() if ch is not None and ch.pid == os.getpid() else {
        "syscalls": {}, "submissions": 0, "completions_reaped": 0, "wakeups_sent": 0,
        "wakeups_suppressed": 0, "sleeps": 0, "bytes_copied_in": 0, "bytes_copied_out": 0,
        "async_errors": 0, "multishot_datagrams": 0}
    # syscalls: every call into the kernel (a submission) plus every completion reaped
    out.update(syscalls=st["submissions"] + st["completions_reaped"], syscalls_by_op=st["syscalls"],
               submissions=st["submissions"], completions_reaped=st["completions_reaped"],
               wakeups_sent=st["wakeups_sent"], wakeups_suppressed=st["wakeups_suppressed"],
               sleeps=st["sleeps"], bytes_copied_in=_copies["bytes_sent"],
               bytes_copied_out=_copies["bytes_received"],
               ring_bytes_in=st["bytes_copied_in"], ring_bytes_out=st["bytes_copied_out"],
               async_errors=st["async_errors"], multishot_datagrams=st["multishot_datagrams"])
    return out
