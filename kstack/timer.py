"""Kernel timers (Linux's timer_list): one queue per kernel, driven by the event loop.

Protocol modules are sans-IO: they take `now` and say when they next need to run. The stack
keeps one Timer per such deadline here; the event loop asks next_deadline() how long it may
sleep and calls run(now) when it wakes. Times are integers in nanoseconds of the kernel's
clock (time.monotonic_ns in a process, a fake clock in tests).
"""
from __future__ import annotations

import heapq
import itertools
from typing import Callable

__all__ = ["Timer", "TimerQueue"]


class Timer:
    """A callback due at `expires` (ns). mod() re-arms it, delete() disarms it."""

    __slots__ = ("queue", "callback", "expires", "_seq", "name")

    def __init__(self, queue: "TimerQueue", callback: Callable[[int], None], name: str = "") -> None:
        self.queue = queue
        self.callback = callback
        self.expires: int | None = None
        self._seq = -1
        self.name = name

    def mod(self, expires: int) -> None:
        """mod_timer: (re)arm at `expires`."""
        self.queue._arm(self, expires)

    def delete(self) -> None:
        """del_timer: disarm (a no-op when not armed)."""
        self.expires = None
        self._seq = -1

    @property
    def pending(self) -> bool:
        return self.expires is not None


class TimerQueue:
    """A heap of armed timers; stale heap entries (re-armed or deleted) are skipped."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Timer]] = []
        self._seq = itertools.count()
        self.fired = 0

    def timer(self, callback: Callable[[int], None], name: str = "") -> Timer:
        """A new, unarmed timer that calls callback(now) when it fires."""
        return Timer(self, callback, name)

    def _arm(self, t: Timer, expires: int) -> None:
        t.expires = expires
        t._seq = next(self._seq)
        heapq.heappush(self._heap, (expires, t._seq, t))
        if len(self._heap) > 64 and len(self._heap) > 4 * self.armed():
            self._compact()

    def armed(self) -> int:
        return sum(1 for e, s, t in self._heap if t._seq == s)

    def _compact(self) -> None:
        self._heap = [(e, s, t) for e, s, t in self._heap if t._seq == s]
        heapq.heapify(self._heap)

    def next_deadline(self) -> int | None:
        """When the earliest armed timer is due, or None."""
        h = self._heap
        while h and h[0][2]._seq != h[0][1]:
            heapq.heappop(h)
        return h[0][0] if h else None

    def run(self, now: int) -> int:
        """Fire every timer due at `now` (in deadline order). Returns how many fired."""
        n = 0
        h = self._heap
        while h and h[0][0] <= now:
            expires, seq, t = heapq.heappop(h)
            if t._seq != seq:
                continue
            t.expires = None
            t._seq = -1
            n += 1
            t.callback(now)
        self.fired += n
        return n
