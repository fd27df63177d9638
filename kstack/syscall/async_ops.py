"""The syscall server's data path for datagrams without a completion per call: async sends
(IOSQE_CQE_SKIP_SUCCESS: done at once, or queued in order behind SO_SNDBUF) and the multishot
receive (IORING_RECV_MULTISHOT: datagrams copied into the CQ while credit lasts). A mixin of
SyscallServer (server.py), which owns the counters, the layout and _complete."""
from __future__ import annotations

import errno
import struct
from typing import Any

from kstack.sock import MSG_DONTWAIT, SOCK_STREAM
from kstack.syscall.channel import F_ASYNC, F_MORE, MAX_CREDIT, Op, unpack_mmsg
from kstack.syscall.ring import Record, RingCorrupt, int_to_ip, ip_to_int
from kstack.syscall.state import _RECV_MS, _SENDMMSG, _SENDTO, _App, _Multishot, _SendQueue

try:
    from kstack._txfast import mmsg_check, mmsg_entry
except ImportError:  # not built: the channel's own (the twins)
    from kstack.syscall.channel import mmsg_entry
    mmsg_check = unpack_mmsg


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
        self._send_one_async(app, sock, r, (int_to_ip(r[7]), r[8]) if r[9] else None, r[10])
        return True

    def _send_one_async(self, app: _App, sock: Any, r: tuple, addr: Any, data: Any) -> int:
        """One async datagram of the raw record r: sent, queued behind earlier ones (0), or
        failed, its async error posted (the errno)."""
        fd = r[3]
        q = app.sendq.get(fd)
        if q is None:
            ps = app.parked.get(fd)
            if ps and any(p.rec is not None and p.rec.op in (Op.SENDTO, Op.SENDMMSG) for p in ps):
                q = self._sendq(app, fd)  # behind a parked blocking send, in order
        if q is not None:
            # an earlier send on this socket waits for SO_SNDBUF room: this one queues behind
            # it, in order, as a blocked sender's next call would
            app.inflight += 1
            q.recs.append(Record(_SENDTO, F_ASYNC, r[2], fd, r[4], 0, -1, addr, bytes(data)))
            self.counters["parked"] += 1
            return 0
        try:
            sock.sendmsg(data, addr, r[4] & ~MSG_DONTWAIT)
            return 0
        except BlockingIOError:
            err = 0
        except OSError as e:
            err = e.errno or errno.EIO
        except (ValueError, TypeError, OverflowError, struct.error):
            err = errno.EINVAL
        except Exception:
            self.counters["sock_errors"] += 1
            err = errno.EIO
        rec = Record(_SENDTO, F_ASYNC, r[2], fd, r[4], 0, -1, addr, bytes(data))
        app.inflight += 1  # not done at once (the Sock was asked once: its error is consumed)
        if err:
            self._complete(app, rec, -err)
        else:
            self._sendq(app, fd).recs.append(rec)
            self.counters["parked"] += 1
        return err

    def _sendmmsg_async(self, app: _App, r: tuple) -> bool:
        """An async SENDMMSG (sendmmsg(2) with IOSQE_CQE_SKIP_SUCCESS): one call, many
        datagrams. The payload is checked whole before anything is sent (a malformed one is
        EINVAL, counted in mmsg_malformed). The datagrams go in order, a connected socket's
        through the compiled loop (UdpSock.sendmmsg_fast: no object per datagram); when
        SO_SNDBUF is full the call waits in the socket's send queue as *one* entry with its
        progress, resumed by the socket's wake-up; at the first error that error is posted
        (the call's async failure) and the datagrams after it are dropped (mmsg_dropped), as
        sendmmsg stops at the first failure. False: no such datagram socket (_submit answers)."""
        fd = r[3]
        sock = app.socks.get(fd)
        if sock is None or sock.type == SOCK_STREAM:
            return False
        app.syscalls += 1
        self._async_mmsg += 1
        count = r[5]
        payload = r[10]
        addr = (int_to_ip(r[7]), r[8]) if r[9] else None
        rec = Record(*r[:7], addr, payload)
        try:
            mmsg_check(payload, count)
        except (ValueError, TypeError):
            self.counters["mmsg_malformed"] += 1
            app.inflight += 1
            self._complete(app, rec._replace(payload=b""), -errno.EINVAL)
            return True
        q = app.sendq.get(fd)
        if q is None:
            ps = app.parked.get(fd)
            if ps and any(p.rec is not None and p.rec.op in (Op.SENDTO, Op.SENDMMSG) for p in ps):
                q = self._sendq(app, fd)  # behind a parked blocking send, in order
        if q is None:
            k, err = self._mmsg_send(sock, rec, 0)
            if k >= count:
                return True
            app.inflight += 1
            if err:
                self.counters["mmsg_dropped"] += count - k - 1
                self._complete(app, rec._replace(payload=b""), -err)
                return True
            q = self._sendq(app, fd)
            q.pos = k
        else:
            app.inflight += 1
        q.recs.append(rec)
        self.counters["parked"] += 1
        return True

    def _mmsg_send(self, sock: Any, rec: Record, k: int) -> tuple[int, int]:
        """Send datagrams k.. of a checked SENDMMSG record: (the index reached, errno). Stops
        at the first failure: errno 0 there means SO_SNDBUF is full (resume from the index)."""
        count = rec.a1
        payload = rec.payload
        addr = rec.addr
        fast = getattr(sock, "sendmmsg_fast", None) if addr is None else None
        flags = rec.a0 & ~MSG_DONTWAIT
        while k < count:
            if fast is not None:
                k = fast(payload, count, k)
                if k >= count:
                    break
            try:
                sock.sendmsg(mmsg_entry(payload, count, k), addr, flags)
            except BlockingIOError:
                return k, 0
            except OSError as e:
                return k, e.errno or errno.EIO
            except (ValueError, TypeError, OverflowError, struct.error):
                return k, errno.EINVAL
            except Exception:
                self.counters["sock_errors"] += 1
                return k, errno.EIO
            k += 1
        return k, 0

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
        send_c = getattr(sock, "sendmsg_c", None)  # UdpSock's compiled common case
        while recs:
            rec = recs[0]
            err = 0
            if (send_c is not None and rec.addr is None and rec.op == _SENDTO
                    and not rec.a0 & ~MSG_DONTWAIT and send_c(sock, rec.payload) >= 0):
                recs.popleft()
                app.inflight -= 1
                continue
            if rec.op == _SENDMMSG:  # a batch: from its progress, as far as the socket takes
                if sock is None:
                    err = errno.EBADF
                else:
                    k, err = self._mmsg_send(sock, rec, q.pos)
                    if k < rec.a1 and not err:
                        q.pos = k
                        return
                    if err:
                        self.counters["mmsg_dropped"] += rec.a1 - k - 1
                recs.popleft()
                q.pos = 0
                if err:
                    self._complete(app, rec._replace(payload=b""), -err)
                else:
                    app.inflight -= 1
                continue
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
