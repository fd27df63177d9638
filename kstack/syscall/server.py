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

The code: server.py (connections, the rings, submission), calls.py (calls with a
completion, stream sends, parked calls), async_ops.py (async sends, the multishot receive),
state.py (per-application state).
"""
from __future__ import annotations

import errno
import os
import socket
import stat
import struct
from collections import Counter
from typing import Any, Callable

from nicemu import tracepoint
from kstack.syscall.async_ops import AsyncOpsMixin
from kstack.syscall.calls import CallsMixin
from kstack.sock import MSG_DONTWAIT
from kstack.syscall.channel import (F_ASYNC, MAX_MMSG, Layout, Op, create_shared, recv_hello, send_accept,
                                    send_refuse)
from kstack.syscall.ring import Record, Ring, RingCorrupt, int_to_ip, ip_to_int
from kstack.syscall.state import (_CONN, _LISTEN, _OP_NAMES, _PEERCRED, _REFUSED, _SENDMMSG, _SENDTO, _SQ,
                                  _WAKE, FIRST_FD, MAX_REFUSED, _App, _eventfd_clear, _Multishot,
                                  _Parked, _SendQueue)
from kstack.timer import Timer, TimerQueue

__all__ = ["SyscallServer"]

try:  # UdpSock.sendmsg_c when the send path is built: what Ring.pop_sends sends through
    from kstack._txfast import sendmsg_connected as _SEND_C
except ImportError:
    _SEND_C = None
# re-exported for the tests and tools that reach into the server's state
_reexports = (FIRST_FD, _Multishot, _Parked, _SendQueue)


class SyscallServer(AsyncOpsMixin, CallsMixin):
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
        self._async_mmsg = 0  # async sendmmsg calls done by the fast path (counted as sendmmsg)
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
        if self._async_mmsg:
            syscalls["sendmmsg"] += self._async_mmsg
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
                fast_sends = 0
                pop = sq.pop_raw
                socks, sendq, parked = app.socks, app.sendq, app.parked
                self.stack.xmit_batch_begin()  # one doorbell per device for the batch (xmit_more)
                try:
                    while budget and app.inflight < lim and not app.backlog:
                        refused = None
                        if _SEND_C is not None and not tracepoint.enabled:
                            # async sends on connected UDP sockets in a row, each through the
                            # compiled send, with no Python frame per record (Ring.pop_sends);
                            # a send it refused (-1) comes back to go the usual way
                            k, nb, refused = sq.pop_sends(socks, sendq, parked, _SEND_C, budget)
                            if k:
                                budget -= k
                                copied += nb
                                fast_sends += k
                                if refused is None:
                                    continue
                        r = refused if refused is not None else pop()
                        if r is None:
                            break
                        budget -= 1
                        copied += len(r[10])
                        if tracepoint.enabled:
                            tracepoint.emit("sys.enter", op=r[0], fd=r[3], bytes=len(r[10]), copy_from_user="SQ ring (shared memory)")
                        if r[1] == F_ASYNC:
                            if r[0] == _SENDTO:
                                # an async send on a connected UDP socket with nothing queued
                                # before it: the compiled send (UdpSock.sendmsg_c) with no
                                # Python frame; anything else, or its -1, goes the usual way
                                if refused is None and not r[9] and not r[4] & ~MSG_DONTWAIT:
                                    fd = r[3]
                                    c = getattr(socks.get(fd), "sendmsg_c", None)
                                    if (c is not None and fd not in sendq and fd not in parked
                                            and c(socks[fd], r[10]) >= 0):
                                        fast_sends += 1
                                        continue
                                if self._send_async(app, r):
                                    continue
                            if r[0] == _SENDMMSG and self._sendmmsg_async(app, r):
                                # the budget is in datagrams: a batch takes its count
                                budget = max(budget - min(max(r[5], 1), MAX_MMSG) + 1, 0)
                                continue
                        self._submit(app, Record(*r[:7], (int_to_ip(r[7]), r[8]) if r[9] else None, r[10]))
                finally:
                    self.stack.xmit_batch_end()
                    if fast_sends:  # each a sendto call, counted as _send_async counts it
                        app.syscalls += fast_sends
                        self._async_sends += fast_sends
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
        if rec.flags & ~F_ASYNC or rec.flags and rec.op not in (Op.SENDTO, Op.SENDMMSG, Op.RECV_MULTISHOT):
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
