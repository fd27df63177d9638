"""Per-application state of the syscall server: the connected application, its parked calls,
its queued async sends and its armed multishot receives (kstack/syscall/server.py uses them;
calls.py and async_ops.py work on them)."""
from __future__ import annotations

import errno
import os
import socket
import struct
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

from kstack.syscall.channel import Op
from kstack.syscall.ring import Record, Ring
from kstack.timer import Timer

if TYPE_CHECKING:
    from kstack.syscall.server import SyscallServer


FIRST_FD = 3  # 0, 1, 2 are the application's stdio in its own numbering
_CONN, _SQ, _LISTEN, _WAKE, _REFUSED = range(5)
MAX_REFUSED = 16  # refused connections kept until they said hello (so the answer is read)
_OP_NAMES = {int(op): op.name.lower() for op in Op}
_SENDTO = int(Op.SENDTO)
_SENDMMSG = int(Op.SENDMMSG)
_RECV_MS = int(Op.RECV_MULTISHOT)
_WAITING_OPS = (Op.SENDTO, Op.SENDMMSG, Op.RECVFROM, Op.POLL, Op.CONNECT, Op.ACCEPT)  # a2 is their timeout
_PEERCRED = struct.Struct("3i")


class _Parked:
    """A call waiting for a Sock's wake-up or its timeout."""

    __slots__ = ("app", "rec", "fds", "timer")

    def __init__(self, app: "_App", rec: Record, fds: list[int]) -> None:
        self.app = app
        self.rec = rec
        self.fds = fds
        self.timer: Timer | None = None


class _SendQueue(_Parked):
    """Async datagram sends on one socket that wait for SO_SNDBUF room, in their order: one
    parked position for all of them. A wake-up of the socket sends from the front while the
    socket takes them, so a full send buffer costs one attempt per wake-up, not one per call
    (each record is still a call in flight, counted as parked, and completes only on error)."""

    __slots__ = ("recs", "pos")

    def __init__(self, app: "_App", fd: int) -> None:
        super().__init__(app, None, [fd])  # type: ignore[arg-type]
        self.recs: deque[Record] = deque()
        self.pos = 0  # datagrams of the first record already sent (a SENDMMSG's progress)


class _Multishot:
    """A standing receive on one socket: each datagram goes into the CQ while credit lasts.

    The socket holds it (sock.ms) so that its receive path copies a datagram straight into
    the CQ when nothing is queued before it (kstack.rxfast.ms_deliver, in softirq context):
    a bottom half that takes thousands of frames at once does not overflow SO_RCVBUF while
    the application waits. Those deliveries are counted in `direct`/`direct_bytes` and
    folded into the server's counters when the server publishes them (_ms_drain)."""

    __slots__ = ("call_id", "credit", "last_end", "delivered", "server", "app", "fd", "cq",
                 "max_payload", "direct", "direct_bytes", "notified")

    def __init__(self, call_id: int, server: "SyscallServer | None" = None,
                 app: "_App | None" = None, fd: int = -1) -> None:
        self.call_id = call_id
        self.credit = 0  # datagrams the application still takes (it grants more as it reads)
        self.last_end = 0  # CQ position after the last datagram delivered (for POLL)
        self.delivered = 0
        self.server = server
        self.app = app
        self.fd = fd
        self.cq = app.cq if app is not None else None
        self.max_payload = server.layout.max_payload if server is not None else 0
        self.direct = self.direct_bytes = 0  # delivered by the socket, not yet folded in
        self.notified = False  # the server was told (once per batch) to publish

    def notify(self) -> None:
        """The first direct delivery since the last publish: have the server publish the CQ
        (and wake pollers of fd) after the current handler, as a Sock's wake-up does."""
        self.notified = True
        self.server._sock_woken(self.app, self.fd)

    def ring_full(self) -> None:
        """A direct delivery found the CQ full: resume when the application frees room."""
        self.app.ms_starved = True
        self.server.counters["multishot_cq_full"] += 1
        self.cq.want_space(self.max_payload)
        if not self.notified:
            self.notify()


class _App:
    """One connected application: its channel and its sockets."""

    def __init__(self, conn: socket.socket, pid: int) -> None:
        self.conn = conn
        self.pid = pid
        self.ready = False
        self.dead = False
        self.sq: Ring | None = None
        self.cq: Ring | None = None
        self.mm: Any = None
        self.sq_efd = -1
        self.cq_efd = -1
        self.socks: dict[int, Any] = {}
        self.wakeups: dict[int, Callable[[Any], None]] = {}
        self.free_fds: list[int] = []
        self.next_fd = FIRST_FD
        self.inflight = 0  # accepted calls not yet completed (parked or in the backlog)
        self.backlog: deque[tuple] = deque()  # completions waiting for room in the CQ
        self.parked: dict[int, list[_Parked]] = {}
        self.sendq: dict[int, _SendQueue] = {}  # fd -> its async sends waiting for room (in parked too)
        self.ms: dict[int, _Multishot] = {}  # armed multishot receives by fd
        self.ms_starved = False  # a delivery stopped for want of CQ room: resume on release
        self.hello_timer: Timer | None = None
        self.syscalls = 0
        self.partial: dict[int, int] = {}  # call id -> bytes of a stream send taken so far
        self.lingering: dict[int, tuple[Any, Callable[[Any], None]]] = {}  # call id -> (sock, wake-up)



def _need_addr(rec: Record) -> tuple[str, int]:
    if rec.addr is None:
        raise OSError(errno.EINVAL, "no address")
    return rec.addr


def _eventfd_clear(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except (BlockingIOError, OSError):
        pass
