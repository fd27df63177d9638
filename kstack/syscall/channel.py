"""The channel's setup handshake and its wire vocabulary (ops, argument layout), both ends.

1. The application connects to the kernel's AF_UNIX SOCK_SEQPACKET socket and sends HELLO
   (magic, version, its pid).
2. The kernel answers ACCEPT (the layout: ring sizes and limits) with three descriptors by
   SCM_RIGHTS: a memfd sealed with F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL (a mapping no
   one can shrink under the other, never a file in /dev/shm), the submission eventfd (the
   application writes it to wake the kernel) and the completion eventfd (the other way).
   Or it answers with a non-zero status (an errno: EAGAIN when it has as many applications
   as it takes) and closes.
3. The unix socket then stays open and silent: its EOF is how each side learns that the
   other died, even by kill -9 (the kernel then closes the application's sockets, unmaps and
   closes its eventfds; the memfd goes away with the last mapping).

Call records (see ring.py for the record header). The argument words per op:

    SOCKET      a0 family, a1 type, a2 protocol                    -> result: the fd
    CLOSE       fd                                                  -> 0
    BIND        fd, addr                                            -> 0
    CONNECT     fd, addr                                            -> 0
    SENDTO      fd, a0 flags, a2 timeout, payload, addr (optional)  -> bytes sent
    RECVFROM    fd, a0 bufsize, a1 flags, a2 timeout                -> bytes, payload, addr
    SETSOCKOPT  fd, a0 level, a1 option, a2 value                   -> 0
    GETSOCKOPT  fd, a0 level, a1 option                             -> the value
    GETSOCKNAME fd / GETPEERNAME fd                                 -> 0, addr
    POLL        a2 timeout, payload: POLLFD entries (fd, events)    -> ready count, payload:
                                                                       the entries with revents
    SHUTDOWN    fd, a0 how                                          -> 0
    LISTEN      fd, a0 backlog                                      -> 0
    ACCEPT      fd, a2 timeout                                      -> the new fd, addr (the peer)
    STATS       (no fd)                                             -> payload length, payload:
                the kernel's counters as JSON (`nicemu stats`; EMSGSIZE if over max_payload)
    RECV_MULTISHOT fd, a0 credit (datagrams)                        -> with F_ASYNC: no
                completion; each datagram then comes as its own completion (op
                RECV_MULTISHOT, the arming call's id, F_MORE, a0 = its length, payload,
                addr) while credit lasts; a later call with the same id adds credit. Without
                F_ASYNC (a flush): deliver what is queued now, then complete with 0.

On a SOCK_STREAM socket: CONNECT takes a2 timeout too; it waits until the handshake ends
(a non-blocking one answers EINPROGRESS, a second one EALREADY, as Linux's). SENDTO copies
in what the send buffer takes; a blocking one waits until the kernel has taken all of its
payload (on its timeout: the bytes taken so far, or ETIMEDOUT if none); a non-blocking one
answers what was taken (EAGAIN if nothing). RECVFROM waits for data, EOF (0 bytes) or an
error. CLOSE with SO_LINGER > 0 completes when the FIN is acknowledged or the linger time
passed.

A SENDTO with F_ASYNC completes only if it fails (its completion then has F_ASYNC too and the
application keeps the errno as the socket's pending error). It never times out in the kernel.

A timeout is in nanoseconds: -1 waits forever, 0 never waits (EAGAIN at once). A result < 0
is -errno; -ETIMEDOUT from a call with a timeout is Python's socket.timeout.
"""
from __future__ import annotations

import array
import enum
import errno
import fcntl
import mmap
import os
import socket
import struct
from dataclasses import dataclass

from kstack.syscall.ring import HEADER_BYTES, LAYOUT, MAGIC, VERSION, record_bytes

__all__ = ["Op", "F_ASYNC", "F_MORE", "MAX_CREDIT", "MAX_MMSG", "MMSG_HDR", "pack_mmsg", "unpack_mmsg", "mmsg_entry", "Layout", "HELLO", "REPLY", "POLLFD", "create_shared", "send_accept",
           "send_refuse", "recv_hello", "connect", "SEALS"]


class Op(enum.IntEnum):
    SOCKET = 1
    CLOSE = 2
    BIND = 3
    CONNECT = 4
    SENDTO = 5
    RECVFROM = 6
    SETSOCKOPT = 7
    GETSOCKOPT = 8
    GETSOCKNAME = 9
    GETPEERNAME = 10
    POLL = 11
    SHUTDOWN = 12
    RECV_MULTISHOT = 13
    LISTEN = 14
    ACCEPT = 15
    STATS = 16
    SENDMMSG = 17  # sendmmsg(2): several datagrams in one record (see MMSG_HDR)


# record flags (the header's u16 flags word)
F_ASYNC = 0x1  # SQ: post no completion on success (IOSQE_CQE_SKIP_SUCCESS); CQ: the failed
#                completion of such a call, reported as the socket's pending error
F_MORE = 0x2  # CQ: a multishot receive's datagram; the receive stays armed (IORING_CQE_F_MORE)
MAX_CREDIT = 4096  # datagrams one multishot receive may have granted and not yet delivered
# SENDMMSG: a0 flags, a1 the number of datagrams (1..MAX_MMSG, Linux's UIO_MAXIOV bound), the
# record's address (or the connected peer) for all of them; the payload is each datagram as
# MMSG_HDR (its length, u16 little-endian) and its bytes, back to back, nothing after the last
MAX_MMSG = 1024
MMSG_HDR = struct.Struct("<H")


HELLO = struct.Struct("<QII")  # magic, version, pid
REPLY = struct.Struct("<QIiIIIII")  # magic, version, status, sq, cq, max_payload, inflight, fds
POLLFD = struct.Struct("<ihH")  # fd, events, revents
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
MAX_POLL_FDS = 1024


@dataclass(frozen=True)
class Layout:
    """What one channel's mapping holds and the limits the kernel enforces on it."""

    sq_bytes: int = 1 << 18
    cq_bytes: int = 1 << 18
    max_payload: int = 65536
    max_inflight: int = 64
    max_fds: int = 1024

    @property
    def size(self) -> int:
        return HEADER_BYTES + self.sq_bytes + self.cq_bytes

    @property
    def sq_offset(self) -> int:
        return HEADER_BYTES

    @property
    def cq_offset(self) -> int:
        return HEADER_BYTES + self.sq_bytes

    def check(self) -> None:
        for n in (self.sq_bytes, self.cq_bytes):
            if n & (n - 1) or n < 2 * record_bytes(self.max_payload) or n > 1 << 30:
                raise ValueError(f"ring of {n} bytes: a power of two holding two largest records")
        if not 0 < self.max_inflight <= 4096 or not 0 < self.max_fds <= 1 << 20:
            raise ValueError("limits out of range")


def create_shared(layout: Layout) -> tuple[int, mmap.mmap]:
    """The kernel's side: a sealed memfd with the layout written and both rings empty."""
    fd = os.memfd_create("kstack-syscall", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, layout.size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        mm = mmap.mmap(fd, layout.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    LAYOUT.pack_into(mm, 0, MAGIC, VERSION, layout.sq_bytes, layout.cq_bytes, layout.max_payload,
                     layout.max_inflight, layout.max_fds)
    return fd, mm


def recv_hello(conn: socket.socket) -> int:
    """The application's pid from its HELLO; ValueError when it is not one."""
    msg = conn.recv(64)
    if len(msg) != HELLO.size:
        raise ValueError(f"hello of {len(msg)} bytes")
    magic, version, pid = HELLO.unpack(msg)
    if magic != MAGIC or version != VERSION:
        raise ValueError("hello with a foreign magic or version")
    return pid


def send_accept(conn: socket.socket, layout: Layout, memfd: int, sq_efd: int, cq_efd: int) -> None:
    msg = REPLY.pack(MAGIC, VERSION, 0, layout.sq_bytes, layout.cq_bytes, layout.max_payload,
                     layout.max_inflight, layout.max_fds)
    conn.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [memfd, sq_efd, cq_efd]))])


def send_refuse(conn: socket.socket, err: int) -> None:
    try:
        conn.send(REPLY.pack(MAGIC, VERSION, err, 0, 0, 0, 0, 0))
    except OSError:
        pass


@dataclass
class Accepted:
    """The application's end after the handshake: the socket, the mapping, the eventfds."""

    conn: socket.socket
    layout: Layout
    mm: mmap.mmap
    sq_efd: int
    cq_efd: int


def connect(path: str, timeout: float = 5.0) -> Accepted:
    """The application's side of the handshake. OSError (with the kernel's errno) on refusal."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    fds: list[int] = []
    try:
        conn.settimeout(timeout)
        conn.connect(path)
        try:
            conn.send(HELLO.pack(MAGIC, VERSION, os.getpid()))
        except (BrokenPipeError, ConnectionResetError):
            pass  # a kernel that refuses answers at once and closes: read its answer
        msg, anc, _flags, _ = conn.recvmsg(64, socket.CMSG_SPACE(3 * 4))
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(data[:len(data) - len(data) % 4])
                fds.extend(a)
        if len(msg) != REPLY.size:
            raise OSError(errno.ECONNREFUSED, f"kernel at {path} closed the channel")
        magic, version, status, sq, cq, max_payload, inflight, max_fds = REPLY.unpack(msg)
        if magic != MAGIC or version != VERSION:
            raise OSError(errno.EPROTO, "kernel speaks another channel version")
        if status:
            raise OSError(status, f"kernel refused the channel: {os.strerror(status)}")
        if len(fds) != 3:
            raise OSError(errno.EPROTO, "kernel sent no descriptors")
        layout = Layout(sq, cq, max_payload, inflight, max_fds)
        layout.check()
        memfd, sq_efd, cq_efd = fds
        if fcntl.fcntl(memfd, fcntl.F_GET_SEALS) & SEALS != SEALS or os.fstat(memfd).st_size != layout.size:
            raise OSError(errno.EPROTO, "channel memory is not sealed at its size")
        mm = mmap.mmap(memfd, layout.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        os.close(memfd)  # the mapping keeps the memory
        fds = []
        conn.settimeout(None)
        return Accepted(conn, layout, mm, sq_efd, cq_efd)
    except BaseException:
        conn.close()
        for fd in fds:
            os.close(fd)
        raise


def pack_mmsg(datagrams) -> bytes:
    """A SENDMMSG payload from a sequence of bytes-like datagrams (each at most 65535 bytes)."""
    parts = []
    pack = MMSG_HDR.pack
    for d in datagrams:
        parts.append(pack(len(d)))
        parts.append(d)
    return b"".join(parts)


def unpack_mmsg(payload, count: int) -> list:
    """The datagrams of a SENDMMSG payload (memoryview slices), checked: exactly `count`
    (1..MAX_MMSG) entries covering the payload; anything else is ValueError."""
    if not 1 <= count <= MAX_MMSG:
        raise ValueError("sendmmsg count out of range")
    mv = memoryview(payload).cast("B")
    b = payload if type(payload) is bytes else mv  # bytes index faster than a memoryview
    n = len(mv)
    off = 0
    out = []
    for _ in range(count):
        if off + 2 > n:
            raise ValueError("sendmmsg entry header past the payload")
        ln = b[off] | b[off + 1] << 8
        off += 2
        if off + ln > n:
            raise ValueError("sendmmsg entry past the payload")
        out.append(mv[off:off + ln])
        off += ln
    if off != n:
        raise ValueError("sendmmsg payload longer than its entries")
    return out


def mmsg_entry(payload, count: int, k: int):
    """Datagram k of a SENDMMSG payload, the whole payload checked (unpack_mmsg)."""
    views = unpack_mmsg(payload, count)
    if not 0 <= k < count:
        raise IndexError("sendmmsg entry out of range")
    return views[k]


def _check_ring_constants() -> None:
    """ring.py and _ring.pyx know SENDTO, F_ASYNC and MSG_DONTWAIT by value (they are
    imported before this module): they must be these."""
    from kstack import sock
    from kstack.syscall import ring

    want = (int(Op.SENDTO), F_ASYNC, sock.MSG_DONTWAIT)
    if (ring._SENDTO, ring.F_ASYNC, ring.MSG_DONTWAIT) != want or (
            ring._c is not None and (ring._c.SENDTO, ring._c.F_ASYNC, ring._c.MSG_DONTWAIT) != want):
        raise ImportError("kstack/syscall/ring.py or _ring.pyx: SENDTO/F_ASYNC/MSG_DONTWAIT changed")


_check_ring_constants()
