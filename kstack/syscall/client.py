"""The application's end of the syscall channel: submit calls, reap their completions.

KernelChannel(path) connects and maps the rings. Three kinds of calls, as io_uring has them:

- call(): one synchronous call. Push the record, publish (ringing the kernel's eventfd only
  when the kernel said it sleeps), then reap completions until ours is there, sleeping on the
  completion eventfd only after setting the ring's need_wakeup flag and looking once more.
- submit_async(): a call that completes only if it fails (F_ASYNC, io_uring's
  IOSQE_CQE_SKIP_SUCCESS): a datagram send returns at once; a failure comes back later as the
  socket's pending error (errors[fd]), as Linux reports an asynchronous ICMP error. At most
  max_async of them are unconsumed by the kernel (their end positions in the SQ are kept and
  retired as the kernel's head passes them); the next one waits (or raises EAGAIN for a
  non-blocking socket, TimeoutError after the socket's timeout).
- A multishot receive (arm_multishot, recv_multishot): one standing call per socket; the
  kernel copies each arriving datagram into the completion ring while the credit this end
  granted lasts, and recv takes it from the local queue without a round trip. Credit is given
  back in batches (half the window at a time), so the kernel never has more than `credit`
  datagrams of this socket in flight and the local queue is bounded by the same number.

The completion ring is trusted but checked: a completion for no call in flight, a datagram
beyond the credit granted, an error outside 1..4095 or for a socket with no such call is
corruption: the channel is declared dead (EPROTO) and every later call fails.

The unix socket of the handshake is polled with the eventfd: its EOF means the kernel died,
and every call then fails with ECONNRESET instead of waiting forever.

Spinning. Before sleeping, _sleep() may look at the completion ring for up to spin_ns
(NICEMU_SPIN_NS, default 0): it only pays when a core is free for the spinner; on this 2-core
machine the kernel process, the application and the emulator are already more than the cores.

One thread at a time: every method holds one lock.
"""
from __future__ import annotations

import errno
import os
import select
import threading
import time
from collections import Counter, deque
from typing import NamedTuple

from nicemu import tracepoint
from kstack.syscall.channel import F_ASYNC, F_MORE, MAX_CREDIT, Op, connect
from kstack.syscall.ring import Ring, RingCorrupt, int_to_ip, ip_to_int

__all__ = ["KernelChannel", "Completion", "RxState"]

_OP_NAMES = {int(op): op.name.lower() for op in Op}
_RECV_MS = int(Op.RECV_MULTISHOT)
_SENDTO = int(Op.SENDTO)
_SENDMMSG = int(Op.SENDMMSG)
MAX_ERRNO = 4095


class Completion(NamedTuple):
    result: int  # >= 0, or -errno
    payload: bytes
    addr: tuple[str, int] | None


class RxState:
    """One socket's multishot receive on the application's side."""

    __slots__ = ("call_id", "credit", "granted", "delivered", "consumed", "queue")

    def __init__(self, call_id: int, credit: int) -> None:
        self.call_id = call_id
        self.credit = credit  # the window
        self.granted = credit  # credit given in total
        self.delivered = 0  # datagrams reaped from the CQ
        self.consumed = 0  # taken by recv since the last grant
        self.queue: deque[tuple[bytes, tuple[str, int] | None]] = deque()


class KernelChannel:
    """One process's channel to one kernel."""

    def __init__(self, path: str, timeout: float = 5.0, *, max_async: int = 4096,
                 spin_ns: int | None = None) -> None:
        acc = connect(path, timeout)
        self.path = path
        self.pid = os.getpid()
        self.conn = acc.conn
        self.layout = lay = acc.layout
        self._mm = acc.mm
        self.sq_efd, self.cq_efd = acc.sq_efd, acc.cq_efd
        self.sq = Ring(self._mm, 0, lay.sq_bytes, lay.sq_offset, lay.max_payload, producer=True)
        self.cq = Ring(self._mm, 1, lay.cq_bytes, lay.cq_offset, lay.max_payload, producer=False)
        self._poller = select.poll()
        self._poller.register(self.cq_efd, select.POLLIN)
        self._poller.register(self.conn.fileno(), select.POLLIN)
        self._next_id = 1
        self._inflight = 0  # synchronous calls submitted, not yet completed
        self._done: dict[int, Completion] = {}
        self._async_ends: deque[int] = deque()  # SQ positions of async calls not yet consumed
        self.max_async = max(1, max_async)
        self.spin_ns = int(os.environ.get("NICEMU_SPIN_NS", "0")) if spin_ns is None else spin_ns
        self.errors: dict[int, int] = {}  # fd -> pending errno from a failed async completion
        self.rx: dict[int, RxState] = {}  # fd -> its multishot receive
        self._lock = threading.RLock()
        self.dead = False
        self.closed = False
        self.syscalls: Counter[str] = Counter()  # submissions by op
        self.counters: Counter[str] = Counter()  # completions, bytes, wake-ups, sleeps
        self._bytes_in = 0  # the hottest counters are plain attributes
        self._bytes_out = 0
        self._reaped = 0
        self._suppressed = 0

    # --- ids and submission ------------------------------------------------------------------

    def _new_id(self) -> int:
        cid = self._next_id
        self._next_id = cid + 1 if cid < 0xFFFFFFFF else 1
        return cid

    def _push(self, op: int, cid: int, fd: int, a0: int, a1: int, a2: int, payload,
              addr: tuple[str, int] | None, flags: int) -> None:
        n = len(payload)
        a = (ip_to_int(addr[0]), addr[1]) if addr is not None else None
        while not self.sq.push(op, cid, fd, a0, a1, a2, payload, a, flags):
            self.counters["sq_full"] += 1
            if not self.sq.want_space(n):  # the kernel rings the CQ eventfd when it frees room
                self._sleep(None)
                self._take(block=False)
        self.syscalls[_OP_NAMES.get(op, "unknown")] += 1
        if tracepoint.enabled:
            tracepoint.emit("app.syscall", op=_OP_NAMES.get(op, "unknown"), fd=fd, bytes=n)
        self._bytes_in += n
        if self.sq.publish():
            os.eventfd_write(self.sq_efd, 1)
            self.counters["wakeups_sent"] += 1
        else:
            self._suppressed += 1

    def call(self, op: int, fd: int = -1, a0: int = 0, a1: int = 0, a2: int = 0,
             payload: bytes | bytearray | memoryview = b"", addr: tuple[str, int] | None = None) -> Completion:
        with self._lock:
            return self.wait(self.submit(op, fd, a0, a1, a2, payload, addr))

    def submit(self, op: int, fd: int = -1, a0: int = 0, a1: int = 0, a2: int = 0,
               payload: bytes | bytearray | memoryview = b"", addr: tuple[str, int] | None = None) -> int:
        """Push one synchronous call and publish it; returns its call id for wait()."""
        self._check()
        if len(payload) > self.layout.max_payload:
            raise OSError(errno.EMSGSIZE, "message too long")
        with self._lock:
            while self._inflight >= self.layout.max_inflight:
                self._take(block=True)
            cid = self._new_id()
            self._push(op, cid, fd, a0, a1, a2, payload, addr, 0)
            self._inflight += 1
            return cid

    def submit_async(self, op: int, fd: int, a0: int = 0, a1: int = 0, a2: int = -1,
                     payload: bytes | bytearray | memoryview = b"", addr: tuple[str, int] | None = None,
                     *, timeout: float | None = None, call_id: int = 0) -> int:
        """Push a call that completes only if it fails; returns at once unless max_async are
        unconsumed (then waits up to `timeout`: 0 raises EAGAIN, expiry TimeoutError)."""
        if self.closed or self.dead:
            self._check()
        n = len(payload)
        if n > self.layout.max_payload:
            raise OSError(errno.EMSGSIZE, "message too long")
        with self._lock:
            if len(self._async_ends) >= self.max_async:
                self._wait_async_room(timeout)
            if call_id:
                cid = call_id
            else:
                cid = self._next_id
                self._next_id = cid + 1 if cid < 0xFFFFFFFF else 1
            sq = self.sq
            a = (ip_to_int(addr[0]), addr[1]) if addr is not None else None
            if not sq.push(op, cid, fd, a0, a1, a2, payload, a, F_ASYNC):
                self._push(op, cid, fd, a0, a1, a2, payload, addr, F_ASYNC)  # the full-ring path
            else:
                self.syscalls[_OP_NAMES.get(op, "unknown")] += 1
                if tracepoint.enabled:
                    tracepoint.emit("app.syscall", op=_OP_NAMES.get(op, "unknown"), fd=fd, bytes=n, mode="async")
                self._bytes_in += n
                if sq.publish():
                    os.eventfd_write(self.sq_efd, 1)
                    self.counters["wakeups_sent"] += 1
                else:
                    self._suppressed += 1
            self._async_ends.append(sq.tail)
            return cid

    def _retire(self) -> None:
        ends = self._async_ends
        if ends:
            try:
                head = self.sq.consumed()
            except RingCorrupt as e:
                self._corrupt(e)
            while ends and ends[0] <= head:
                ends.popleft()

    def _wait_async_room(self, timeout: float | None) -> None:
        if len(self._async_ends) < self.max_async:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._retire()
            if len(self._async_ends) < self.max_async:
                return
            self.counters["async_full"] += 1
            if timeout == 0:
                raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
            self.sq.request_progress()  # the kernel rings when it releases the SQ
            self._retire()
            if len(self._async_ends) < self.max_async:
                return
            if not self._sleep(deadline):
                raise TimeoutError("timed out")
            self._take(block=False)

    def wait(self, call_id: int) -> Completion:
        with self._lock:
            while call_id not in self._done:
                self._take(block=True)
            return self._done.pop(call_id)

    def poll_completion(self, call_id: int) -> Completion | None:
        """The completion if it has come, without sleeping."""
        with self._lock:
            if call_id not in self._done:
                self._take(block=False)
            return self._done.pop(call_id, None)

    def drain(self, timeout: float = 2.0) -> bool:
        """Wait until the kernel has consumed every async call (before exit or close)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._async_ends and not self.dead and not self.closed:
                self._retire()
                if not self._async_ends:
                    break
                self.sq.request_progress()
                self._retire()
                if self._async_ends and not self._sleep(deadline):
                    return False
                self._take(block=False)
            return not self._async_ends

    # --- multishot receive ------------------------------------------------------------------

    def arm_multishot(self, fd: int, credit: int = 128) -> RxState:
        """fd's multishot receive, armed now (one async call) if it is not yet."""
        st = self.rx.get(fd)
        if st is None:
            credit = max(2, min(credit, MAX_CREDIT))
            with self._lock:
                st = RxState(self._new_id(), credit)
                self.rx[fd] = st
                self.submit_async(Op.RECV_MULTISHOT, fd, credit, call_id=st.call_id)
        return st

    def recv_multishot(self, fd: int, *, peek: bool = False, timeout: float | None = None,
                       credit: int = 128) -> tuple[bytes, tuple[str, int] | None]:
        """The next datagram of fd: from the local queue, else after sleeping for one (timeout
        None: forever; 0: one flush call, then EAGAIN). A pending error is raised first."""
        with self._lock:
            st = self.rx.get(fd)
            if st is not None and st.queue and not peek and not self.errors:  # the fast path
                item = st.queue.popleft()
                st.consumed += 1
                if st.consumed * 2 >= st.credit:
                    self.grant(fd, st)
                return item
            st = self.arm_multishot(fd, credit)
            deadline = None if timeout is None else time.monotonic() + timeout
            flushed = False
            while True:
                if not st.queue:
                    self._take(block=False)
                err = self.errors.pop(fd, 0)
                if err:
                    raise OSError(err, os.strerror(err))
                if self.rx.get(fd) is not st:  # the kernel ended the receive: arm anew
                    st = self.arm_multishot(fd, credit)
                    continue
                if st.queue:
                    if peek:
                        return st.queue[0]
                    item = st.queue.popleft()
                    st.consumed += 1
                    if st.consumed * 2 >= st.credit:
                        self.grant(fd, st)
                    return item
                if timeout == 0:
                    if flushed:
                        raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
                    # a non-blocking read asks the kernel once: what it has queued comes first
                    c = self.call(Op.RECV_MULTISHOT, fd)
                    flushed = True
                    if c.result < 0 and c.result != -errno.EINVAL:
                        raise OSError(-c.result, os.strerror(-c.result))
                    continue
                if not self._sleep(deadline):
                    self._take(block=False)
                    if not st.queue and fd not in self.errors:
                        raise TimeoutError("timed out")

    def grant(self, fd: int, st: RxState) -> None:
        """Give back the credit of the datagrams consumed since the last grant, in one call."""
        n, st.consumed = st.consumed, 0
        st.granted += n
        self.submit_async(Op.RECV_MULTISHOT, fd, n, call_id=st.call_id)

    def readable(self, fd: int) -> int:
        """POLLIN/POLLERR this end knows of for fd without asking the kernel."""
        st = self.rx.get(fd)
        return (1 if st is not None and st.queue else 0) | (8 if fd in self.errors else 0)

    def forget(self, fd: int) -> None:
        """fd was closed: drop its local state (its completions all came before the close's)."""
        st = self.rx.pop(fd, None)
        if st is not None:
            self.counters["multishot_closed"] += st.delivered
        self.errors.pop(fd, None)

    # --- the completion ring ----------------------------------------------------------------

    def reap(self) -> int:
        """Take whatever completions there are, without sleeping."""
        with self._lock:
            self._check()
            return self._take(block=False)

    def _take(self, block: bool) -> int:
        """Take every completion there is; with block, sleep until at least one came."""
        while True:
            if self.closed or self.dead:
                self._check()
            got = nbytes = 0
            cq = self.cq
            rx = self.rx
            try:
                pop = cq.pop_raw
                while (r := pop()) is not None:
                    op, flags, cid, fd, a0, _a1, _a2, ip, port, has_addr, payload = r
                    got += 1
                    n = len(payload)
                    nbytes += n
                    if flags == F_MORE:  # a multishot receive's datagram
                        st = rx.get(fd)
                        if op != _RECV_MS or st is None or st.call_id != cid:
                            raise RingCorrupt(f"multishot completion for fd {fd} with no receive")
                        if a0 != n or st.delivered >= st.granted:
                            raise RingCorrupt("multishot datagram beyond the credit or its length")
                        st.delivered += 1
                        st.queue.append((payload, (int_to_ip(ip), port) if has_addr else None))
                        if tracepoint.enabled:
                            tracepoint.emit("app.recv", fd=fd, bytes=n, via="multishot CQ", delivered=st.delivered)
                    elif flags & F_MORE:
                        st = rx.get(fd)
                        if flags != F_MORE | F_ASYNC or op != _RECV_MS or st is None or st.call_id != cid:
                            raise RingCorrupt(f"multishot error for fd {fd} with no receive")
                        self._error(fd, a0)
                    elif flags & F_ASYNC:
                        if flags != F_ASYNC or op not in (_SENDTO, _SENDMMSG, _RECV_MS):
                            raise RingCorrupt(f"async completion of op {op}")
                        self._error(fd, a0)
                        st = rx.get(fd)
                        if op == _RECV_MS and st is not None and st.call_id == cid:
                            self.counters["multishot_closed"] += st.delivered
                            del rx[fd]  # the receive ended: the next recv arms anew
                    elif flags or self._inflight <= 0:
                        raise RingCorrupt(f"completion {cid} with no call in flight")
                    else:
                        self._done[cid] = Completion(a0, payload, (int_to_ip(ip), port) if has_addr else None)
                        self._inflight -= 1
                if cq.release():  # the kernel holds completions for want of room
                    os.eventfd_write(self.sq_efd, 1)
                    self.counters["wakeups_sent"] += 1
            except RingCorrupt as e:
                self._corrupt(e)
            finally:
                self._reaped += got
                self._bytes_out += nbytes
            if got or not block:
                return got
            self._sleep(None)

    def _error(self, fd: int, result: int) -> None:
        if not -MAX_ERRNO <= result < 0:
            raise RingCorrupt(f"async completion with result {result}")
        self.errors[fd] = -result
        self.counters["async_errors"] += 1

    def _corrupt(self, e: Exception):
        self.dead = True
        raise OSError(errno.EPROTO, f"kernel channel corrupt: {e}") from None

    def _sleep(self, deadline: float | None) -> bool:
        """Sleep until the kernel rings (or spin first, see the module docstring). False when
        the deadline passed."""
        if self.spin_ns > 0:
            end = time.perf_counter_ns() + self.spin_ns
            try:
                while time.perf_counter_ns() < end:
                    if self.cq.pending():
                        self.counters["spin_hits"] += 1
                        return True
            except RingCorrupt as e:
                self._corrupt(e)
            self.counters["spin_misses"] += 1
        try:
            if self.cq.arm():
                return True
        except RingCorrupt as e:
            self._corrupt(e)
        if deadline is None:
            ms = -1
        else:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ms = max(1, int(left * 1000 + 0.999))
        self.counters["sleeps"] += 1
        events = self._poller.poll(ms)
        for fd, _ev in events:
            if fd == self.conn.fileno():
                try:
                    data = self.conn.recv(64)
                except OSError:
                    data = b""
                if not data:
                    self.dead = True
                    self._check()
        try:
            os.eventfd_read(self.cq_efd)
        except BlockingIOError:
            pass
        return bool(events) or deadline is None or time.monotonic() < deadline

    def _check(self) -> None:
        if self.closed:
            raise OSError(errno.EBADF, "kernel channel closed")
        if self.dead:
            raise OSError(errno.ECONNRESET, f"the kernel at {self.path} went away")

    # --- the rest ---------------------------------------------------------------------------

    def stats(self) -> dict:
        """Submissions (calls into the kernel) and completions reaped; syscalls_total counts
        submissions only, syscalls_with_completions both (what costs() reports)."""
        c = self.counters
        subs = sum(self.syscalls.values())
        return {"syscalls": dict(self.syscalls), "syscalls_total": subs, "submissions": subs,
                "completions_reaped": self._reaped, "syscalls_with_completions": subs + self._reaped,
                "bytes_copied_in": self._bytes_in, "bytes_copied_out": self._bytes_out,
                "wakeups_sent": c["wakeups_sent"], "wakeups_suppressed": self._suppressed,
                "sleeps": c["sleeps"], "sq_full": c["sq_full"], "async_full": c["async_full"],
                "async_errors": c["async_errors"],
                "multishot_datagrams": sum(st.delivered for st in self.rx.values()) + c["multishot_closed"],
                "spin_hits": c["spin_hits"], "spin_misses": c["spin_misses"]}

    def abandon(self) -> None:
        """In a forked child: close the inherited descriptors, touch nothing shared."""
        if self.closed:
            return
        self.closed = True
        for fd in (self.sq_efd, self.cq_efd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.conn.close()

    def close(self) -> None:
        """Let the kernel take the async calls still in the ring, then unmap and hang up:
        the kernel closes every socket this process still has."""
        if self.closed:
            return
        if not self.dead:
            try:
                self.drain()
            except OSError:
                pass
        self.closed = True
        self.sq.close()
        self.cq.close()
        try:
            self._mm.close()
        except BufferError:
            pass
        for fd in (self.sq_efd, self.cq_efd):
            os.close(fd)
        self.conn.close()
