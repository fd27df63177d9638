"""The application's end of the syscall channel: submit calls, wait for their completions.

KernelChannel(path) connects and maps the rings. call() is one system call: push the record,
publish (ringing the kernel's eventfd only when the kernel said it sleeps), then take
completions until ours is there, sleeping on the completion eventfd only after setting the
ring's need_wakeup flag and looking once more. submit()/wait() let several calls be in flight
(the kernel's limit is respected here: submit waits for a completion when it is reached).

The unix socket of the handshake is polled with the eventfd: its EOF means the kernel died,
and every call then fails with ECONNRESET instead of waiting forever.

One thread at a time: call() holds a lock for the whole call, so a thread blocked in recv()
holds up the others (a process-wide channel, not one per thread).
"""
from __future__ import annotations

import errno
import os
import select
import threading
from collections import Counter
from typing import NamedTuple

from kstack.syscall.channel import Op, connect
from kstack.syscall.ring import Ring, RingCorrupt, ip_to_int

__all__ = ["KernelChannel", "Completion"]

_OP_NAMES = {int(op): op.name.lower() for op in Op}


class Completion(NamedTuple):
    result: int  # >= 0, or -errno
    payload: bytes
    addr: tuple[str, int] | None


class KernelChannel:
    """One process's channel to one kernel."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
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
        self._inflight = 0
        self._done: dict[int, Completion] = {}
        self._lock = threading.RLock()
        self.dead = False
        self.closed = False
        self.syscalls: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()  # bytes, wake-ups, sleeps

    # --- calls -----------------------------------------------------------------------------

    def call(self, op: int, fd: int = -1, a0: int = 0, a1: int = 0, a2: int = 0,
             payload: bytes | bytearray | memoryview = b"", addr: tuple[str, int] | None = None) -> Completion:
        with self._lock:
            return self.wait(self.submit(op, fd, a0, a1, a2, payload, addr))

    def submit(self, op: int, fd: int = -1, a0: int = 0, a1: int = 0, a2: int = 0,
               payload: bytes | bytearray | memoryview = b"", addr: tuple[str, int] | None = None) -> int:
        """Push one call and publish it; returns its call id for wait()."""
        self._check()
        n = len(payload)
        if n > self.layout.max_payload:
            raise OSError(errno.EMSGSIZE, "message too long")
        a = (ip_to_int(addr[0]), addr[1]) if addr is not None else None
        with self._lock:
            while self._inflight >= self.layout.max_inflight:
                self._take(block=True)
            cid = self._next_id
            self._next_id = cid + 1 if cid < 0xFFFFFFFF else 1
            while not self.sq.push(op, cid, fd, a0, a1, a2, payload, a):
                self.counters["sq_full"] += 1
                if not self.sq.want_space(n):
                    self._take(block=True)
            self._inflight += 1
            self.syscalls[_OP_NAMES.get(op, "unknown")] += 1
            self.counters["bytes_in_calls"] += n
            if self.sq.publish():
                os.eventfd_write(self.sq_efd, 1)
                self.counters["wakeups_sent"] += 1
            else:
                self.counters["wakeups_suppressed"] += 1
            return cid

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

    # --- the completion ring ---------------------------------------------------------------

    def _take(self, block: bool) -> None:
        """Take every completion there is; with block, sleep until at least one came."""
        while True:
            self._check()
            got = 0
            try:
                while (rec := self.cq.pop()) is not None:
                    self._done[rec.call_id] = Completion(rec.a0, rec.payload, rec.addr)
                    self.counters["bytes_out_calls"] += len(rec.payload)
                    self._inflight -= 1
                    got += 1
                if self.cq.release():  # the kernel holds completions for want of room
                    os.eventfd_write(self.sq_efd, 1)
            except RingCorrupt as e:
                self.dead = True
                raise OSError(errno.EPROTO, f"kernel channel corrupt: {e}") from None
            if got or not block:
                return
            self._sleep()

    def _sleep(self) -> None:
        try:
            if self.cq.arm():
                return
        except RingCorrupt as e:
            self.dead = True
            raise OSError(errno.EPROTO, f"kernel channel corrupt: {e}") from None
        self.counters["sleeps"] += 1
        for fd, _ev in self._poller.poll():
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

    def _check(self) -> None:
        if self.closed:
            raise OSError(errno.EBADF, "kernel channel closed")
        if self.dead:
            raise OSError(errno.ECONNRESET, f"the kernel at {self.path} went away")

    # --- the rest --------------------------------------------------------------------------

    def stats(self) -> dict:
        c = self.counters
        return {"syscalls": dict(self.syscalls), "syscalls_total": sum(self.syscalls.values()),
                "wakeups_sent": c["wakeups_sent"], "wakeups_suppressed": c["wakeups_suppressed"],
                "sleeps": c["sleeps"], "sq_full": c["sq_full"]}

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
        """Unmap and hang up: the kernel closes every socket this process still has."""
        if self.closed:
            return
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
