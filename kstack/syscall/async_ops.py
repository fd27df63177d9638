"""The syscall server's data path for datagrams without a completion per call: async sends
(IOSQE_CQE_SKIP_SUCCESS: done at once, or queued in order behind SO_SNDBUF) and the multishot
receive (IORING_RECV_MULTISHOT: datagrams copied into the CQ while credit lasts). A mixin of
SyscallServer (server.py), which owns the counters, the layout and _complete."""
from __future__ import annotations

import errno
import struct
from typing import Any

from kstack.sock import MSG_DONTWAIT, SOCK_STREAM
from kstack.syscall.channel import F_ASYNC, F_MORE, MAX_CREDIT, Op
from kstack.syscall.ring import Record, RingCorrupt, int_to_ip, ip_to_int
from kstack.syscall.state import _RECV_MS, _App, _Multishot, _SendQueue


class AsyncOpsMixin:
    """Async sends and multishot receives (see the module's docstring)."""

    counters: Any
    layout: Any
    _woken: dict


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
