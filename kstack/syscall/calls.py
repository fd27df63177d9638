"""The syscall server's calls with a completion each: dispatch of a record to the Sock's
method (non-blocking), stream sends that keep their progress, and calls that wait (parked until
a Sock's wake-up or their timeout). A mixin of SyscallServer (server.py)."""
from __future__ import annotations

import errno
import os
from typing import Any

from kstack.sock import MSG_DONTWAIT, POLLERR, POLLHUP, POLLIN, POLLNVAL, SOCK_STREAM
from kstack.syscall.channel import F_ASYNC, MAX_POLL_FDS, POLLFD, Op, unpack_mmsg
from kstack.syscall.ring import Record, RingCorrupt
from kstack.syscall.state import _WAITING_OPS, _App, _need_addr, _Parked, _SendQueue


class CallsMixin:
    """Synchronous calls, stream sends and parked calls (see the module's docstring)."""

    counters: Any
    layout: Any
    stack: Any
    timers: Any
    clock: Any
    wake_efd: int
    _woken: dict
    _wake_signaled: bool


    @staticmethod
    def _timeout(rec: Record) -> int:
        if rec.flags & F_ASYNC:
            return -1  # already returned to the application: waits for room, never times out
        if (rec.op in (Op.SENDTO, Op.SENDMMSG) and rec.a0 & MSG_DONTWAIT
                or rec.op == Op.RECVFROM and rec.a1 & MSG_DONTWAIT):
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
        if op == Op.SENDMMSG:
            return self._sendmmsg(app, rec, self._sock(app, rec.fd)), b"", None
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

    def _sendmmsg(self, app: _App, rec: Record, sock: Any) -> int:
        """sendmmsg(2), synchronous: the datagrams in order (a connected socket's through the
        compiled loop first); the result is how many were sent. An error or EAGAIN on the first
        is the call's; after some were sent, the count is returned (a later error is the
        next call's, as the socket keeps it). A blocking call that finds SO_SNDBUF full keeps
        its progress (app.partial) and is parked until it has sent all or times out."""
        if sock.type == SOCK_STREAM:
            raise OSError(errno.EOPNOTSUPP, "sendmmsg on a stream socket")
        count = rec.a1
        cid = rec.call_id
        done = app.partial.get(cid, 0)
        try:
            fast = getattr(sock, "sendmmsg_fast", None)
            if not done and rec.addr is None and fast is not None:
                done = fast(rec.payload, count)
            views = unpack_mmsg(rec.payload, count)
        except (ValueError, TypeError):
            self.counters["mmsg_malformed"] += 1
            app.partial.pop(cid, None)
            raise OSError(errno.EINVAL, "malformed sendmmsg") from None
        flags = rec.a0 & ~MSG_DONTWAIT
        while done < count:
            try:
                sock.sendmsg(views[done], rec.addr, flags)
            except BlockingIOError:
                if done and self._timeout(rec) == 0:
                    break
                app.partial[cid] = done
                raise
            except OSError:
                if done:
                    break
                app.partial.pop(cid, None)
                raise
            done += 1
        app.partial.pop(cid, None)
        return done

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
