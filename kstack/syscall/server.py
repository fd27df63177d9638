"""The kernel's end of the syscall channels: one SyscallServer per kernel process.

It owns a listening AF_UNIX socket and, per application, the unix socket (liveness), the
shared rings and two eventfds. The kernel's event loop polls fds() for reading, calls
handle_ready(fd) for each that is readable, sleeps no longer than next_deadline() and calls
run_timers(now) after. fds() changes as applications come and go (on_fds_changed is called,
fds_generation counts the changes); a closed fd's number can come back as another
application's at once, so on a change the loop registers fds() afresh and drops the rest of
the events it already has for this server.

A call is dispatched to the Sock's method (all non-blocking). A call that raises
BlockingIOError and may block is parked: it is retried when the Sock calls its wake-up (after
the current handler, never inside the protocol's own call chain) or completed with ETIMEDOUT
when its timeout passes. A POLL call is parked on all its fds at once.

The shared memory is the application's to scribble on: every index and record is checked
(ring.py), a lie is RingCorrupt, counted, and the application is disconnected; its sockets are
closed as if it had exited. Limits: applications per kernel (EAGAIN to the next), sockets per
application (EMFILE), calls in flight per application (the kernel stops reading the ring),
payload size (a record over it is corruption), records per wake-up (fairness between apps).
"""
from __future__ import annotations

import errno
import os
import socket
import stat
import struct
from collections import Counter, deque
from typing import Any, Callable

from nicemu import tracepoint
from kstack.sock import MSG_DONTWAIT, POLLERR, POLLHUP, POLLIN, POLLNVAL, SOCK_STREAM
from kstack.syscall.channel import (F_ASYNC, F_MORE, MAX_CREDIT, MAX_POLL_FDS, POLLFD, Layout,
                                    Op, create_shared, recv_hello, send_accept, send_refuse)
from kstack.syscall.ring import Record, Ring, RingCorrupt, int_to_ip, ip_to_int
from kstack.timer import Timer, TimerQueue

__all__ = ["SyscallServer"]

FIRST_FD = 3  # 0, 1, 2 are the application's stdio in its own numbering
_CONN, _SQ, _LISTEN, _WAKE, _REFUSED = range(5)
MAX_REFUSED = 16  # refused connections kept until they said hello (so the answer is read)
_OP_NAMES = {int(op): op.name.lower() for op in Op}
_SENDTO = int(Op.SENDTO)
_RECV_MS = int(Op.RECV_MULTISHOT)
_WAITING_OPS = (Op.SENDTO, Op.RECVFROM, Op.POLL, Op.CONNECT, Op.ACCEPT)  # a2 is their timeout
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

    __slots__ = ("recs",)

    def __init__(self, app: "_App", fd: int) -> None:
        super().__init__(app, None, [fd])  # type: ignore[arg-type]
        self.recs: deque[Record] = deque()


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


class SyscallServer:
    """Serves applications' socket calls against `stack` (a NetStack: socket(), clock())."""

    def __init__(self, stack: Any, path: str, *, max_apps: int = 64, max_fds_per_app: int = 1024,
                 max_inflight: int = 64, max_payload: int = 65536, ring_bytes: int = 1 << 18,
                 budget: int = 256, handshake_timeout_ns: int = 2_000_000_000) -> None:
        self.stack = stack
        self.path = path
        self.layout = Layout(ring_bytes, ring_bytes, max_payload, max_inflight, max_fds_per_app)
        self.layout.check()
        self.max_apps = max_apps
        self.budget = budget
        self.handshake_timeout_ns = handshake_timeout_ns
        self.clock: Callable[[], int] = stack.clock
        self.timers = TimerQueue()
        self.counters: Counter[str] = Counter()  # wakeups, copies, limits, disconnects
        self.syscalls: Counter[str] = Counter()  # by op
        self.on_fds_changed: Callable[[], None] | None = None
        self.stats_provider: Callable[[], dict] | None = None  # what a STATS call answers
        self.fds_generation = 0
        self._apps: list[_App] = []
        self._by_fd: dict[int, tuple[int, Any]] = {}
        self._refused: dict[int, tuple[socket.socket, Timer]] = {}
        self._woken: dict[_App, set[int]] = {}
        self._wake_signaled = False
        self._async_sends = 0  # async sends done by the fast path (counted as sendto calls)
        if os.path.exists(path) and stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # a dead kernel's socket
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._listener.setblocking(False)
        self._listener.bind(path)
        self._listener.listen(64)
        self.wake_efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._by_fd[self._listener.fileno()] = (_LISTEN, None)
        self._by_fd[self.wake_efd] = (_WAKE, None)

    # --- the event loop's interface --------------------------------------------------------

    def fds(self) -> list[int]:
        """Every fd to poll for reading: the listener, the wake-up eventfd, and per application
        its unix socket and its submission eventfd."""
        return list(self._by_fd)

    def handle_ready(self, fd: int) -> None:
        kind, app = self._by_fd.get(fd, (None, None))
        if kind == _SQ and app is not None:
            _eventfd_clear(fd)
            self._service(app)
        elif kind == _CONN and app is not None:
            self._conn_ready(app)
        elif kind == _LISTEN:
            self._accept()
        elif kind == _REFUSED:
            self._refused_done(fd)
        elif kind == _WAKE:
            _eventfd_clear(fd)
            self._wake_signaled = False
        self._run_woken()

    def next_deadline(self) -> int | None:
        """When run_timers must next run (ns of stack.clock), or None."""
        return self.timers.next_deadline()

    def run_timers(self, now: int | None = None) -> None:
        self.timers.run(self.clock() if now is None else now)
        self._run_woken()

    def close(self) -> None:
        for app in list(self._apps):
            self._teardown(app, "kernel_close")
        for fd in list(self._refused):
            self._refused_done(fd)
        if self._listener.fileno() >= 0:
            self._by_fd.pop(self._listener.fileno(), None)
            self._listener.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass
        if self.wake_efd >= 0:
            self._by_fd.pop(self.wake_efd, None)
            os.close(self.wake_efd)
            self.wake_efd = -1

    def stats(self) -> dict[str, Any]:
        parked = sum(len(p.recs) if type(p) is _SendQueue else 1
                     for a in self._apps for p in {id(p): p for ps in a.parked.values() for p in ps}.values())
        syscalls = self.syscalls.copy()
        if self._async_sends:
            syscalls["sendto"] += self._async_sends
        return {
            "apps": len(self._apps),
            "syscalls": dict(syscalls),
            "syscalls_total": sum(syscalls.values()),
            "bytes_copied_in": self.counters["bytes_copied_in"],
            "bytes_copied_out": self.counters["bytes_copied_out"],
            "wakeups_sent": self.counters["wakeups_sent"],
            "wakeups_suppressed": self.counters["wakeups_suppressed"],
            "parked": parked,
            "multishot": sum(len(a.ms) for a in self._apps),
            "counters": dict(self.counters),
            "per_app": [{"pid": a.pid, "sockets": len(a.socks), "inflight": a.inflight,
                         "syscalls": a.syscalls} for a in self._apps],
        }

    # --- connections -----------------------------------------------------------------------

    def _changed(self) -> None:
        self.fds_generation += 1
        if self.on_fds_changed is not None:
            self.on_fds_changed()

    def _accept(self) -> None:
        for _ in range(16):
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.counters["accept_errors"] += 1
                return
            conn.setblocking(False)
            if len(self._apps) >= self.max_apps:
                self._refuse(conn)
                continue
            try:
                pid = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
            except OSError:
                pid = 0
            app = _App(conn, pid)
            self._apps.append(app)
            self._by_fd[conn.fileno()] = (_CONN, app)
            app.hello_timer = self.timers.timer(lambda now, a=app: self._hello_timeout(a), "hello")
            app.hello_timer.mod(self.clock() + self.handshake_timeout_ns)
            self._changed()

    def _refuse(self, conn: socket.socket) -> None:
        """Answer EAGAIN. Closing at once, with the hello unread, would reset the connection
        and lose the answer: keep it (a bounded number) until the hello or a timeout."""
        self.counters["refused_max_apps"] += 1
        send_refuse(conn, errno.EAGAIN)
        fd = conn.fileno()
        if len(self._refused) >= MAX_REFUSED:
            conn.close()
            return
        t = self.timers.timer(lambda now, f=fd: self._refused_done(f), "refused")
        t.mod(self.clock() + self.handshake_timeout_ns)
        self._refused[fd] = (conn, t)
        self._by_fd[fd] = (_REFUSED, conn)
        self._changed()

    def _refused_done(self, fd: int) -> None:
        conn, t = self._refused.pop(fd, (None, None))
        if conn is None:
            return
        t.delete()
        self._by_fd.pop(fd, None)
        try:
            conn.recv(64)
        except OSError:
            pass
        conn.close()
        self._changed()

    def _hello_timeout(self, app: _App) -> None:
        if not app.ready and not app.dead:
            self._teardown(app, "hello_timeout")

    def _conn_ready(self, app: _App) -> None:
        if not app.ready:
            self._handshake(app)
            return
        try:
            data = app.conn.recv(64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        # nothing is ever sent on the socket after the handshake: EOF is an exit, data a lie
        self._teardown(app, "exit" if not data else "protocol")

    def _handshake(self, app: _App) -> None:
        try:
            recv_hello(app.conn)
        except (BlockingIOError, InterruptedError):
            return
        except (OSError, ValueError):
            self._teardown(app, "bad_hello")
            return
        lay = self.layout
        memfd = -1
        try:
            memfd, app.mm = create_shared(lay)
            app.sq = Ring(app.mm, 0, lay.sq_bytes, lay.sq_offset, lay.max_payload, producer=False)
            app.cq = Ring(app.mm, 1, lay.cq_bytes, lay.cq_offset, lay.max_payload, producer=True)
            app.sq_efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            app.cq_efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            app.sq.arm()  # the kernel sleeps until the application rings
            send_accept(app.conn, lay, memfd, app.sq_efd, app.cq_efd)
        except OSError:
            self.counters["handshake_errors"] += 1
            self._teardown(app, "handshake")
            return
        finally:
            if memfd >= 0:
                os.close(memfd)
        app.ready = True
        if app.hello_timer is not None:
            app.hello_timer.delete()
        self._by_fd[app.sq_efd] = (_SQ, app)
        self.counters["apps_connected"] += 1
        self._changed()

    def _teardown(self, app: _App, reason: str) -> None:
        """The application is gone (or must go): close its sockets, unmap, close its fds."""
        if app.dead:
            return
        app.dead = True
        self.counters[f"disconnect_{reason}"] += 1
        for ps in app.parked.values():
            for p in ps:
                if p.timer is not None:
                    p.timer.delete()
        app.parked.clear()
        app.sendq.clear()
        app.backlog.clear()
        app.ms.clear()
        app.partial.clear()
        for sock, fn in app.lingering.values():
            sock.remove_wakeup(fn)
        app.lingering.clear()
        for fd, sock in list(app.socks.items()):
            self._release_sock(app, fd, sock)
        if app.hello_timer is not None:
            app.hello_timer.delete()
        self._woken.pop(app, None)
        self._by_fd.pop(app.conn.fileno(), None)
        app.conn.close()
        for efd in (app.sq_efd, app.cq_efd):
            if efd >= 0:
                self._by_fd.pop(efd, None)
                os.close(efd)
        app.sq_efd = app.cq_efd = -1
        for ring in (app.sq, app.cq):
            if ring is not None:
                ring.close()
        if app.mm is not None:
            app.mm.close()
        self._apps.remove(app)
        self._changed()

    def _release_sock(self, app: _App, fd: int, sock: Any) -> None:
        app.socks.pop(fd, None)
        app.ms.pop(fd, None)
        if getattr(sock, "ms", None) is not None:
            sock.ms = None  # no more direct deliveries into this application's CQ
        fn = app.wakeups.pop(fd, None)
        if fn is not None:
            sock.remove_wakeup(fn)
        app.free_fds.append(fd)
        try:
            sock.close()
        except Exception:  # a protocol's bug must not keep the application's other sockets
            self.counters["sock_close_errors"] += 1

    # --- the rings -------------------------------------------------------------------------

    def _service(self, app: _App) -> None:
        """Read submissions (within the budget and the in-flight limit), post completions."""
        if app.dead or not app.ready:
            return
        sq, lim = app.sq, self.layout.max_inflight
        budget = self.budget
        try:
            while True:
                self._flush_backlog(app)
                if app.ms_starved and not app.backlog:
                    app.ms_starved = False
                    for fd in list(app.ms):
                        self._ms_drain(app, fd)
                copied = 0
                pop = sq.pop_raw
                self.stack.xmit_batch_begin()  # one doorbell per device for the batch (xmit_more)
                try:
                    while budget and app.inflight < lim and not app.backlog:
                        r = pop()
                        if r is None:
                            break
                        budget -= 1
                        copied += len(r[10])
                        if tracepoint.enabled:
                            tracepoint.emit("sys.enter", op=r[0], fd=r[3], bytes=len(r[10]), copy_from_user="SQ ring (shared memory)")
                        if r[0] == _SENDTO and r[1] == F_ASYNC and self._send_async(app, r):
                            continue
                        self._submit(app, Record(*r[:7], (int_to_ip(r[7]), r[8]) if r[9] else None, r[10]))
                finally:
                    self.stack.xmit_batch_end()
                self.counters["bytes_copied_in"] += copied
                if sq.release():  # the application waits for room in the SQ
                    self._ring(app)
                self._publish(app)
                if app.dead:
                    return
                if not budget:  # come back after the other applications had their turn
                    self.counters["budget_yields"] += 1
                    os.eventfd_write(app.sq_efd, 1)
                    return
                if app.inflight >= lim or app.backlog:
                    self.counters["inflight_full" if app.inflight >= lim else "cq_full"] += 1
                    return  # resumed by a completion or by the application freeing CQ room
                if not sq.arm():
                    return
                sq.disarm()
        except RingCorrupt:
            self.counters["corrupt"] += 1
            self._teardown(app, "corrupt")

    def _publish(self, app: _App) -> None:
        cq = app.cq
        if cq.tail == cq.published:
            return
        if cq.publish():
            self._ring(app)
            self.counters["wakeups_sent"] += 1
            if tracepoint.enabled:
                tracepoint.emit("sys.cq.wakeup", pid=app.pid, wakeups_sent=self.counters["wakeups_sent"])
        else:
            self.counters["wakeups_suppressed"] += 1

    def _ring(self, app: _App) -> None:
        try:
            os.eventfd_write(app.cq_efd, 1)
        except OSError:
            self.counters["eventfd_errors"] += 1

    def _flush_backlog(self, app: _App) -> None:
        cq = app.cq
        while app.backlog:
            c = app.backlog[0]
            if not cq.room(len(c[5])) and not cq.want_space(len(c[5])):
                return
            app.backlog.popleft()
            cq.push(c[0], c[1], c[2], c[3], 0, 0, c[5], c[4], c[6])

    def _complete(self, app: _App, rec: Record, result: int, payload: bytes = b"",
                  addr: tuple[str, int] | None = None) -> None:
        """copy_to_user and post the completion (or keep it while the CQ is full)."""
        app.inflight -= 1
        try:
            a = (ip_to_int(addr[0]), int(addr[1]) & 0xFFFF) if addr is not None else None
        except (ValueError, TypeError, IndexError):  # a protocol answered a malformed address
            self.counters["sock_errors"] += 1
            a, result, payload = None, -errno.EIO, b""
        flags = rec.flags & F_ASYNC
        if flags:
            self.counters["async_errors"] += 1
        c = (rec.op, rec.call_id, rec.fd, result, a, payload, flags)
        self.counters["bytes_copied_out"] += len(payload)
        if app.backlog or not app.cq.push(c[0], c[1], c[2], c[3], 0, 0, payload, a, flags):
            app.backlog.append(c)
            if len(app.backlog) == 1 and app.cq.want_space(len(payload)):
                self._flush_backlog(app)

    # --- calls -----------------------------------------------------------------------------

    def _submit(self, app: _App, rec: Record) -> None:
        app.inflight += 1
        app.syscalls += 1
        self.syscalls[_OP_NAMES.get(rec.op, "unknown")] += 1
        if rec.flags & ~F_ASYNC or rec.flags and rec.op not in (Op.SENDTO, Op.RECV_MULTISHOT):
            self.counters["bad_flags"] += 1
            self._complete(app, rec._replace(flags=0), -errno.EINVAL)  # a plain completion
            return
        try:
            if rec.op == Op.RECV_MULTISHOT:
                self._multishot(app, rec)
                return
            if rec.op == Op.CLOSE:
                self._close_call(app, rec)
                return
            result, payload, addr = self._call(app, rec)
        except BlockingIOError as e:
            if self._timeout(rec) == 0:
                if rec.op == Op.POLL:  # poll(0) with nothing ready: 0, not an error
                    self._complete(app, rec, 0, rec.payload)
                else:  # EAGAIN, or a connect's EINPROGRESS / EALREADY
                    self._complete(app, rec, -(e.errno or errno.EAGAIN))
            else:
                self._park(app, rec)
            return
        except OSError as e:
            self._complete(app, rec, -(e.errno or errno.EIO))
            return
        except (ValueError, TypeError, OverflowError, struct.error):
            self._complete(app, rec, -errno.EINVAL)
            return
        except RingCorrupt:
            raise
        except Exception:  # a protocol bug answers EIO; the kernel goes on
            self.counters["sock_errors"] += 1
            self._complete(app, rec, -errno.EIO)
            return
        if rec.flags & F_ASYNC:  # succeeded: no completion (the application already returned)
            app.inflight -= 1
            return
        self._complete(app, rec, result, payload, addr)

    def _send_async(self, app: _App, r: tuple) -> bool:
        """The fast path of an async datagram send (r: a raw SQ record, see Ring.pop_raw):
        done here, with no completion to post, when the Sock takes it at once; otherwise it
        parks or fails as _submit would. False: no such socket, _submit answers EBADF."""
        sock = app.socks.get(r[3])
        if sock is None or sock.type == SOCK_STREAM:  # a stream send keeps its progress: _submit
            return False
        app.syscalls += 1
        self._async_sends += 1
        addr = (int_to_ip(r[7]), r[8]) if r[9] else None
        q = app.sendq.get(r[3])
        if q is None:
            ps = app.parked.get(r[3])
            if ps and any(p.rec is not None and p.rec.op == Op.SENDTO for p in ps):
                q = self._sendq(app, r[3])  # behind a parked blocking send, in order
        if q is not None:
            # an earlier send on this socket waits for SO_SNDBUF room: this one queues behind
            # it, in order, as a blocked sender's next call would
            app.inflight += 1
            q.recs.append(Record(*r[:7], addr, r[10]))
            self.counters["parked"] += 1
            return True
        try:
            sock.sendmsg(r[10], addr, r[4] & ~MSG_DONTWAIT)
            return True
        except BlockingIOError:
            err = 0
        except OSError as e:
            err = e.errno or errno.EIO
        except (ValueError, TypeError, OverflowError, struct.error):
            err = errno.EINVAL
        except Exception:
            self.counters["sock_errors"] += 1
            err = errno.EIO
        rec = Record(*r[:7], addr, r[10])
        app.inflight += 1  # not done at once (the Sock was asked once: its error is consumed)
        if err:
            self._complete(app, rec, -err)
        else:
            self._sendq(app, r[3]).recs.append(rec)
            self.counters["parked"] += 1
        return True

    def _sendq(self, app: _App, fd: int) -> _SendQueue:
        """fd's queue of async sends waiting for room, parked on fd (no timeout)."""
        q = app.sendq[fd] = _SendQueue(app, fd)
        app.parked.setdefault(fd, []).append(q)
        return q

    def _retry_sendq(self, q: _SendQueue) -> None:
        """The socket woke: send the queued datagrams in order until it is full again (one
        EAGAIN per wake-up); an error completes that call (async_errors). Empty: unparked."""
        app, fd, recs = q.app, q.fds[0], q.recs
        sock = app.socks.get(fd)
        while recs:
            rec = recs[0]
            err = 0
            try:
                if sock is None:
                    raise OSError(errno.EBADF, "bad file descriptor")
                sock.sendmsg(rec.payload, rec.addr, rec.a0 & ~MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as e:
                err = e.errno or errno.EIO
            except RingCorrupt:
                raise
            except (ValueError, TypeError, OverflowError, struct.error):
                err = errno.EINVAL
            except Exception:
                self.counters["sock_errors"] += 1
                err = errno.EIO
            recs.popleft()
            if err:
                self._complete(app, rec, -err)
            else:  # a send that waited for room: done, nothing to post
                app.inflight -= 1
        self._unpark(q)
        if app.sendq.get(fd) is q:
            del app.sendq[fd]

    # --- multishot receive -----------------------------------------------------------------

    def _multishot(self, app: _App, rec: Record) -> None:
        """Arm (or add credit to) fd's standing receive, deliver what is queued; a flush
        (no F_ASYNC) completes with 0 after the delivery."""
        fd = rec.fd
        self._sock(app, fd)
        if not 0 <= rec.a0 <= MAX_CREDIT:
            raise OSError(errno.EINVAL, "credit out of range")
        ms = app.ms.get(fd)
        if rec.flags & F_ASYNC:
            if ms is None or ms.call_id != rec.call_id:
                ms = app.ms[fd] = _Multishot(rec.call_id, self, app, fd)
                sock = app.socks[fd]
                if hasattr(sock, "ms"):  # a socket that delivers straight into the CQ
                    sock.ms = ms
                self.counters["multishot_armed"] += 1
            ms.credit = min(ms.credit + rec.a0, MAX_CREDIT)
            app.inflight -= 1  # a standing call is bounded by sockets, not by calls in flight
        elif ms is None:
            raise OSError(errno.EINVAL, "no multishot receive armed")
        self._ms_drain(app, fd)
        if not rec.flags & F_ASYNC:
            self._complete(app, rec, 0)

    def _ms_drain(self, app: _App, fd: int) -> None:
        """copy_to_user: move datagrams from the socket's queue into the CQ while credit and
        CQ room last; the rest stays in the socket (its SO_RCVBUF limit drops and counts)."""
        ms = app.ms.get(fd)
        sock = app.socks.get(fd)
        if ms is None or sock is None:
            return
        if ms.notified or ms.direct:  # what the socket delivered itself since the last time
            ms.notified = False
            if ms.direct:
                ms.last_end = app.cq.tail
                ms.delivered += ms.direct
                self.counters["multishot_delivered"] += ms.direct
                self.counters["bytes_copied_out"] += ms.direct_bytes
                ms.direct = ms.direct_bytes = 0
        cq = app.cq
        push = cq.push
        call_id = ms.call_id
        maxp = self.layout.max_payload
        n = nbytes = 0
        while ms.credit > 0:
            if not cq.room(maxp) and not cq.want_space(maxp):  # room for the largest datagram
                app.ms_starved = True  # resumed when the application frees CQ room
                self.counters["multishot_cq_full"] += 1
                break
            try:
                data, addr = sock.recvmsg(maxp)
            except BlockingIOError:
                break
            except OSError as e:  # a pending socket error: reported, the receive stays armed
                self._ms_post(app, ms, fd, -(e.errno or errno.EIO), b"", None, F_ASYNC | F_MORE)
                break
            except Exception:
                self.counters["sock_errors"] += 1
                self._ms_post(app, ms, fd, -errno.EIO, b"", None, F_ASYNC)
                del app.ms[fd]
                if getattr(sock, "ms", None) is ms:
                    sock.ms = None
                break
            if type(data) is not bytes or len(data) > maxp:
                data = bytes(data[:maxp])
            ms.credit -= 1
            ln = len(data)
            try:
                a = (ip_to_int(addr[0]), int(addr[1]) & 0xFFFF) if addr is not None else None
            except (ValueError, TypeError, IndexError):  # a protocol answered a bad address
                self.counters["sock_errors"] += 1
                self._ms_post(app, ms, fd, -errno.EIO, b"", None, F_ASYNC | F_MORE)
                continue
            if not push(_RECV_MS, call_id, fd, ln, 0, 0, data, a, F_MORE):  # room was checked
                self.counters["multishot_lost"] += 1
                break
            n += 1
            nbytes += ln
        if n:
            ms.last_end = cq.tail
            ms.delivered += n
            self.counters["multishot_delivered"] += n
            self.counters["bytes_copied_out"] += nbytes
            if fd in app.parked:  # a POLL waiting on fd sees the datagrams in the CQ
                self._woken.setdefault(app, set()).add(fd)
        elif ms.credit <= 0:
            self.counters["multishot_no_credit"] += 1

    def _ms_post(self, app: _App, ms: _Multishot, fd: int, result: int, data: bytes,
                 addr: tuple[str, int] | None, flags: int) -> None:
        try:
            a = (ip_to_int(addr[0]), int(addr[1]) & 0xFFFF) if addr is not None else None
        except (ValueError, TypeError, IndexError):
            self.counters["sock_errors"] += 1
            a, result, data, flags = None, -errno.EIO, b"", F_ASYNC | F_MORE
        if flags & F_ASYNC:
            self.counters["async_errors"] += 1
        app.cq.push(Op.RECV_MULTISHOT, ms.call_id, fd, result, 0, 0, data, a, flags)
        ms.last_end = app.cq.tail

    @staticmethod
    def _timeout(rec: Record) -> int:
        if rec.flags & F_ASYNC:
            return -1  # already returned to the application: waits for room, never times out
        if rec.op == Op.SENDTO and rec.a0 & MSG_DONTWAIT or rec.op == Op.RECVFROM and rec.a1 & MSG_DONTWAIT:
            return 0
        if rec.op in _WAITING_OPS:
            return rec.a2
        return 0

    def _sock(self, app: _App, fd: int) -> Any:
        sock = app.socks.get(fd)
        if sock is None:
            raise OSError(errno.EBADF, "bad file descriptor")
        return sock

    def _call(self, app: _App, rec: Record) -> tuple[int, bytes, tuple[str, int] | None]:
        """Run one call against the Sock, non-blocking: (result, payload, address)."""
        op = rec.op
        if op == Op.RECVFROM:
            if rec.a0 < 0:
                raise OSError(errno.EINVAL, "negative buffer size")
            n = min(rec.a0, self.layout.max_payload)
            data, addr = self._sock(app, rec.fd).recvmsg(n, rec.a1 & ~MSG_DONTWAIT)
            data = bytes(data[:n])
            return len(data), data, addr
        if op == Op.SENDTO:
            sock = self._sock(app, rec.fd)
            if sock.type == SOCK_STREAM:
                return self._stream_send(app, rec, sock), b"", None
            return sock.sendmsg(rec.payload, rec.addr, rec.a0 & ~MSG_DONTWAIT), b"", None
        if op == Op.ACCEPT:
            return self._accept_call(app, rec)
        if op == Op.POLL:
            return self._poll(app, rec)
        if op == Op.STATS:
            return self._stats_call()
        if op == Op.SOCKET:
            return self._socket(app, rec), b"", None
        if op == Op.CLOSE:  # only a lingering close comes back here (see _close_call)
            return self._linger_done(app, rec), b"", None
        if op == Op.BIND:
            self._sock(app, rec.fd).bind(_need_addr(rec))
        elif op == Op.CONNECT:
            self._sock(app, rec.fd).connect(_need_addr(rec))
        elif op == Op.SETSOCKOPT:
            self._sock(app, rec.fd).setsockopt(rec.a0, rec.a1, rec.a2)
        elif op == Op.GETSOCKOPT:
            return int(self._sock(app, rec.fd).getsockopt(rec.a0, rec.a1)), b"", None
        elif op == Op.GETSOCKNAME:
            return 0, b"", self._sock(app, rec.fd).getsockname()
        elif op == Op.GETPEERNAME:
            return 0, b"", self._sock(app, rec.fd).getpeername()
        elif op == Op.SHUTDOWN:
            self._sock(app, rec.fd).shutdown(rec.a0)
        elif op == Op.LISTEN:
            self._sock(app, rec.fd).listen(rec.a0)
        else:
            raise OSError(errno.ENOSYS, "unknown call")
        return 0, b"", None

    def _stats_call(self) -> tuple[int, bytes, None]:
        """STATS: the kernel's counters as JSON (stats_provider, set by the kernel process;
        this server's own stats() without one), as `cat /proc/net/snmp` reads them."""
        import json

        provider = self.stats_provider
        data = json.dumps(provider() if provider is not None else {"syscall": self.stats()},
                          default=str, separators=(",", ":")).encode()
        if len(data) > self.layout.max_payload:
            raise OSError(errno.EMSGSIZE, "stats larger than the channel's payload")
        return len(data), data, None

    def _socket(self, app: _App, rec: Record) -> int:
        if len(app.socks) >= self.layout.max_fds:
            self.counters["emfile"] += 1
            raise OSError(errno.EMFILE, "too many open files")
        return self._install(app, self.stack.socket(rec.a0, rec.a1, rec.a2))

    def _install(self, app: _App, sock: Any) -> int:
        """A new descriptor for `sock` in the application's table (the lowest free one)."""
        if app.free_fds:
            app.free_fds.sort()
            fd = app.free_fds.pop(0)  # the lowest free number, as Linux gives
        else:
            fd = app.next_fd
            app.next_fd += 1
        app.socks[fd] = sock
        fn = app.wakeups[fd] = lambda s, a=app, f=fd: self._sock_woken(a, f)
        sock.add_wakeup(fn)
        return fd

    def _close(self, app: _App, fd: int) -> Any:
        sock = self._sock(app, fd)
        for p in list(app.parked.get(fd, ())):
            if type(p) is _SendQueue:  # each queued send fails as a parked one would
                self._unpark(p)
                app.sendq.pop(fd, None)
                for rec in p.recs:
                    self._complete(app, rec, -errno.EBADF)
            elif p.rec.op != Op.POLL:  # a poll sees POLLNVAL on its next look
                self._unpark(p)
                app.partial.pop(p.rec.call_id, None)
                self._complete(app, p.rec, -errno.EBADF)
        self._release_sock(app, fd, sock)
        self._sock_woken(app, fd)  # polls that included fd look again
        return sock

    def _poll(self, app: _App, rec: Record) -> tuple[int, bytes, None]:
        payload = rec.payload
        n, rem = divmod(len(payload), POLLFD.size)
        if rem or n > MAX_POLL_FDS:
            raise OSError(errno.EINVAL, "bad poll array")
        out = bytearray(payload)
        ready = 0
        for i in range(n):
            fd, events, _ = POLLFD.unpack_from(payload, i * POLLFD.size)
            if fd < 0:
                revents = 0
            else:
                sock = app.socks.get(fd)
                revents = POLLNVAL if sock is None else sock.poll() & (events | POLLERR | POLLHUP)
            if sock is not None and fd in app.ms and app.ms[fd].last_end > app.cq._peer_head():
                revents |= POLLIN & events  # datagrams in the CQ the application has not read
            POLLFD.pack_into(out, i * POLLFD.size, fd, events, revents & 0xFFFF)
            ready += revents != 0
        if not ready:
            raise BlockingIOError(errno.EAGAIN, "nothing ready")
        return ready, bytes(out), None

    # --- stream sockets ----------------------------------------------------------------------

    def _stream_send(self, app: _App, rec: Record, sock: Any) -> int:
        """tcp_sendmsg across the channel: copy in what the send buffer takes; a blocking send
        keeps its progress (app.partial) and waits until all of its payload is taken."""
        cid = rec.call_id
        done = app.partial.get(cid, 0)
        payload = rec.payload
        total = len(payload)
        try:
            n = sock.sendmsg(memoryview(payload)[done:], None, rec.a0 & ~MSG_DONTWAIT) if done < total else 0
        except BlockingIOError:
            if done and self._timeout(rec) == 0:
                app.partial.pop(cid, None)
                return done
            raise
        except OSError:
            if done:  # what was taken was sent: report it; the error comes with the next call
                app.partial.pop(cid, None)
                return done
            raise
        done += n
        if done < total and self._timeout(rec) != 0:
            app.partial[cid] = done
            raise BlockingIOError(errno.EAGAIN, "send buffer full")
        app.partial.pop(cid, None)
        return done

    def _accept_call(self, app: _App, rec: Record) -> tuple[int, bytes, tuple[str, int] | None]:
        """accept(2): the connection gets the lowest free descriptor (EMFILE is checked first,
        so a full table leaves the connection in the accept queue)."""
        sock = self._sock(app, rec.fd)
        if len(app.socks) >= self.layout.max_fds:
            self.counters["emfile"] += 1
            raise OSError(errno.EMFILE, "too many open files")
        child, addr = sock.accept()
        return self._install(app, child), b"", addr

    def _close_call(self, app: _App, rec: Record) -> None:
        """close(2); a stream socket with SO_LINGER > 0 that has not had its FIN acknowledged
        completes later (tcp_close's sk_stream_wait_close), the descriptor already free."""
        sock = self._close(app, rec.fd)
        lingering = getattr(sock, "lingering", None)
        if lingering is None or not lingering():
            self._complete(app, rec, 0)
            return
        key = -1 - rec.call_id  # a parking key no descriptor has
        fn = lambda s, a=app, k=key: self._sock_woken(a, k)  # noqa: E731
        sock.add_wakeup(fn)
        app.lingering[rec.call_id] = (sock, fn)
        self.counters["linger_waits"] += 1
        self._park(app, rec, key=key, timeout=sock.linger * 1_000_000_000)

    def _linger_done(self, app: _App, rec: Record) -> int:
        entry = app.lingering.get(rec.call_id)
        if entry is not None and entry[0].lingering():
            raise BlockingIOError(errno.EAGAIN, "lingering")
        self._linger_forget(app, rec.call_id)
        return 0

    def _linger_forget(self, app: _App, call_id: int) -> None:
        entry = app.lingering.pop(call_id, None)
        if entry is not None:
            entry[0].remove_wakeup(entry[1])

    # --- parked calls ----------------------------------------------------------------------

    def _park(self, app: _App, rec: Record, key: int | None = None,
              timeout: int | None = None) -> None:
        """Wait for a wake-up of the call's fds (or of `key`, a lingering close's) or the
        timeout (the record's unless given)."""
        if key is not None:
            fds = [key]
        elif rec.op == Op.POLL:
            fds = sorted({POLLFD.unpack_from(rec.payload, i)[0]
                          for i in range(0, len(rec.payload), POLLFD.size)} & app.socks.keys())
        else:
            fds = [rec.fd]
        p = _Parked(app, rec, fds)
        for fd in fds:
            app.parked.setdefault(fd, []).append(p)
        timeout = self._timeout(rec) if timeout is None else timeout
        if timeout > 0:
            p.timer = self.timers.timer(lambda now, p=p: self._expire(p), "syscall")
            p.timer.mod(self.clock() + timeout)
        self.counters["parked"] += 1

    def _unpark(self, p: _Parked) -> None:
        for fd in p.fds:
            ps = p.app.parked.get(fd)
            if ps is not None and p in ps:
                ps.remove(p)
                if not ps:
                    del p.app.parked[fd]
        if p.timer is not None:
            p.timer.delete()

    def _expire(self, p: _Parked) -> None:
        app = p.app
        if app.dead:
            return
        self._unpark(p)
        self.counters["timeouts"] += 1
        try:
            done = app.partial.pop(p.rec.call_id, 0)
            if p.rec.op == Op.POLL:
                self._complete(app, p.rec, 0, p.rec.payload)  # nothing ready: revents as sent
            elif p.rec.op == Op.CLOSE:  # the linger time passed: close returns, the stack finishes
                self._linger_forget(app, p.rec.call_id)
                self._complete(app, p.rec, 0)
            elif done:  # a stream send that timed out after taking some: what it took
                self._complete(app, p.rec, done)
            else:
                self._complete(app, p.rec, -errno.ETIMEDOUT)
        except RingCorrupt:
            self.counters["corrupt"] += 1
            self._teardown(app, "corrupt")
            return
        self._service(app)

    def _sock_woken(self, app: _App, fd: int) -> None:
        """A Sock's wake-up: note it; parked calls are retried after the current handler."""
        if app.dead or fd not in app.parked and fd not in app.ms:
            return
        self._woken.setdefault(app, set()).add(fd)
        if not self._wake_signaled and self.wake_efd >= 0:
            self._wake_signaled = True
            os.eventfd_write(self.wake_efd, 1)

    def _run_woken(self) -> None:
        self.stack.xmit_batch_begin()  # retried sends share one doorbell per device
        try:
            self._run_woken_batch()
        finally:
            self.stack.xmit_batch_end()

    def _run_woken_batch(self) -> None:
        for _ in range(16):  # wakes caused by these retries come round again, a bounded number
            if not self._woken:
                return
            woken, self._woken = self._woken, {}
            for app, fds in woken.items():
                if app.dead:
                    continue
                seen: set[int] = set()
                try:
                    for fd in sorted(fds):
                        if fd in app.ms:
                            self._ms_drain(app, fd)
                        for p in list(app.parked.get(fd, ())):
                            if id(p) not in seen:
                                seen.add(id(p))
                                if type(p) is _SendQueue:
                                    self._retry_sendq(p)
                                else:
                                    self._retry(p)
                except RingCorrupt:
                    self.counters["corrupt"] += 1
                    self._teardown(app, "corrupt")
                    continue
                self._service(app)
        if self._woken and not self._wake_signaled:
            self._wake_signaled = True
            os.eventfd_write(self.wake_efd, 1)

    def _retry(self, p: _Parked) -> None:
        app = p.app
        try:
            result, payload, addr = self._call(app, p.rec)
        except BlockingIOError:
            return
        except OSError as e:
            self._unpark(p)
            app.partial.pop(p.rec.call_id, None)
            self._complete(app, p.rec, -(e.errno or errno.EIO))
            return
        except RingCorrupt:
            raise
        except Exception:
            self._unpark(p)
            app.partial.pop(p.rec.call_id, None)
            self.counters["sock_errors"] += 1
            self._complete(app, p.rec, -errno.EIO)
            return
        self._unpark(p)
        if p.rec.flags & F_ASYNC:  # a send that waited for room: done, nothing to post
            app.inflight -= 1
            return
        self._complete(app, p.rec, result, payload, addr)


def _need_addr(rec: Record) -> tuple[str, int]:
    if rec.addr is None:
        raise OSError(errno.EINVAL, "no address")
    return rec.addr


def _eventfd_clear(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except (BlockingIOError, OSError):
        pass

