"""Fault injection on a cable: drop, bit-flip corruption, duplication, reordering, delay and a
rate limit, per direction, repeatable from a seed.

Two layers, as in smoltcp's phy::FaultInjector and h11's sans-IO style:

* `FaultLine` is pure logic: it takes frames with an explicit `now` (ns) and answers which
  frames to deliver now and when the next held frame is due. No clock, no sockets, no sleeps,
  so tests drive it with a fake clock and assert exact release times.
* `FaultyEnd` wraps any CableEnd and applies one FaultLine to what the port sends (tx) and one
  to what it receives (rx). It holds the clock and a timerfd, so held frames wake the event
  loop through the end's single fileno().

Configuration (`FaultConfig`, the YAML keys under a cable's `faults: {tx: ..., rx: ...}`):

    drop        probability a frame is lost                           (0..1, default 0)
    corrupt     probability a frame gets bit flips                    (0..1, default 0)
    corrupt_bits  bits flipped in a corrupted frame (distinct positions) (default 1)
    duplicate   probability a frame is delivered twice                (0..1, default 0)
    reorder     probability a frame is held back and delivered after the next one
                                                                      (0..1, default 0)
    reorder_timeout_ms  a held-back frame goes out after this long if no frame passes it
                                                                      (default 10)
    delay_ms    fixed one-way delay added to every frame              (>= 0, default 0)
    rate_bps    line rate in bits per second; frames are serialised one after another
                (release = max(arrival, line free) + 8 * len / rate)  (None = unlimited)
    overhead_bytes  per-frame bytes counted by the rate limit besides the frame (FCS is
                already in the frame; 20 adds preamble + inter-frame gap)   (default 0)
    limit       frames held at most; the tx side refuses more (backpressure: the NIC keeps
                them in its TX packet buffer), the rx side drops them      (default 1000)
    seed        seed of this line's random generator (None: random)  (default None)

The stages run in this order for each frame: drop, corrupt, duplicate (the copy follows the
original through the rest), rate limit (serialisation), delay (propagation), reorder.
Corruption flips bits anywhere in the frame, FCS included; any flip of up to three bits
breaks a CRC-32, so the receiving NIC counts each corrupted frame in CRCERRS.
"""
from __future__ import annotations

import heapq
import math
import random
import time
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping

from nicemu.cable.base import CableEnd, Poller, Timer

__all__ = ["FaultConfig", "FaultLine", "FaultStats", "FaultyEnd", "PROBABILITY_KEYS"]

NS_PER_MS = 1_000_000
NS_PER_S = 1_000_000_000

PROBABILITY_KEYS = ("drop", "corrupt", "duplicate", "reorder")  # the FaultConfig keys in 0..1


@dataclass(frozen=True)
class FaultConfig:
    """The faults of one direction. Validated on construction (ValueError naming the key)."""

    drop: float = 0.0
    corrupt: float = 0.0
    corrupt_bits: int = 1
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_timeout_ms: float = 10.0
    delay_ms: float = 0.0
    rate_bps: int | None = None
    overhead_bytes: int = 0
    limit: int = 1000
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in PROBABILITY_KEYS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"faults.{name}: must be a probability between 0 and 1, got {v!r}")
        for name in ("delay_ms", "reorder_timeout_ms"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"faults.{name}: must be a number >= 0, got {v!r}")
        if self.rate_bps is not None and (
            isinstance(self.rate_bps, bool) or not isinstance(self.rate_bps, (int, float)) or self.rate_bps <= 0
        ):
            raise ValueError(f"faults.rate_bps: must be a positive number of bits per second, got {self.rate_bps!r}")
        for name, lo in (("corrupt_bits", 1), ("overhead_bytes", 0), ("limit", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"faults.{name}: must be an integer >= {lo}, got {v!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"faults.seed: must be an integer, got {self.seed!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "FaultConfig":
        """From a config mapping; unknown keys are an error naming the key."""
        if d is None:
            return cls()
        if isinstance(d, FaultConfig):
            return d
        if not isinstance(d, Mapping):
            raise ValueError(f"faults: expected a mapping of fault settings, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        for k in d:
            if k not in known:
                raise ValueError(f"faults.{k}: unknown key (known: {', '.join(sorted(known))})")
        return cls(**d)

    @property
    def active(self) -> bool:
        """False when this config changes nothing (the cable can take its fast path)."""
        return bool(
            self.drop or self.corrupt or self.duplicate or self.reorder or self.delay_ms or self.rate_bps
        )


@dataclass
class FaultStats:
    """What a FaultLine did, for tests and for `nicemu` to show."""

    offered: int = 0  # frames given to the line
    refused: int = 0  # frames refused because `limit` frames were held (tx backpressure)
    dropped: int = 0  # lost by the drop probability
    overflow: int = 0  # lost because `limit` frames were held (rx side)
    corrupted: int = 0
    duplicated: int = 0
    reordered: int = 0
    delivered: int = 0


class FaultLine:
    """One direction of a faulty cable, sans-IO.

    `push(frame, now)` offers a frame (False: refused, the line holds `limit` frames);
    `pop_due(now)` returns the frames whose release time has come, in delivery order;
    `next_release()` is the time of the next held frame (None: nothing held).
    `transfer(frames, now)` does both for a batch and returns (deliver_now, next_release).
    """

    def __init__(self, config: FaultConfig | Mapping[str, Any] | None = None) -> None:
        self.config = config if isinstance(config, FaultConfig) else FaultConfig.from_dict(config)
        self.rng = random.Random(self.config.seed)
        self.stats = FaultStats()
        self._heap: list[tuple[int, int, bytes]] = []  # (release ns, sequence, frame)
        self._seq = 0
        self._line_free = 0  # rate limit: when the last frame finished serialising
        self._held: tuple[int, bytes] | None = None  # reorder: (deadline, frame) held back

    # --- input ---------------------------------------------------------------------------

    def held(self) -> int:
        """Frames inside the line (not yet delivered)."""
        return len(self._heap) + (self._held is not None)

    def full(self) -> bool:
        return self.held() >= self.config.limit

    def push(self, frame: bytes, now: int, *, refuse_when_full: bool = True) -> bool:
        """Offer one frame at time now. Returns False (and keeps nothing) when the line holds
        `limit` frames and refuse_when_full; otherwise the frame is taken (maybe dropped)."""
        c = self.config
        if self.full():
            if refuse_when_full:
                self.stats.refused += 1
                return False
            self.stats.offered += 1
            self.stats.overflow += 1
            return True
        self.stats.offered += 1
        rng = self.rng
        if c.drop and rng.random() < c.drop:
            self.stats.dropped += 1
            return True
        if c.corrupt and rng.random() < c.corrupt:
            frame = self._flip(frame)
            self.stats.corrupted += 1
        copies = 1
        if c.duplicate and rng.random() < c.duplicate:
            copies = 2
            self.stats.duplicated += 1
        for _ in range(copies):
            self._enqueue(frame, now)
        return True

    def _flip(self, frame: bytes) -> bytes:
        buf = bytearray(frame)
        nbits = len(buf) * 8
        for bit in self.rng.sample(range(nbits), min(self.config.corrupt_bits, nbits)):
            buf[bit >> 3] ^= 1 << (bit & 7)
        return bytes(buf)

    def _enqueue(self, frame: bytes, now: int) -> None:
        c = self.config
        t = now
        if c.rate_bps:
            start = max(now, self._line_free)
            bits = 8 * (len(frame) + c.overhead_bytes)
            # rounded up, so a released frame has really finished serialising
            rate = c.rate_bps
            if isinstance(rate, int):
                t = start + -(-bits * NS_PER_S // rate)
            else:
                t = start + math.ceil(bits * NS_PER_S / rate)
            self._line_free = t
        t += int(round(c.delay_ms * NS_PER_MS))
        if c.reorder and self.rng.random() < c.reorder:
            if self._held is None:
                # hold this frame back: the next frame overtakes it
                self._held = (t + int(round(c.reorder_timeout_ms * NS_PER_MS)), frame)
                self.stats.reordered += 1
                return
        self._push_heap(t, frame)
        if self._held is not None:
            # the frame that overtook the held one is in; the held one goes right after it
            _, held = self._held
            self._held = None
            self._push_heap(t, held)

    def _push_heap(self, t: int, frame: bytes) -> None:
        heapq.heappush(self._heap, (t, self._seq, frame))
        self._seq += 1

    # --- output --------------------------------------------------------------------------

    def _release_held(self, now: int) -> None:
        """A frame held back for reordering whose timeout has passed goes out: no frame
        overtook it in time."""
        if self._held is not None and self._held[0] <= now:
            t, frame = self._held
            self._held = None
            self._push_heap(t, frame)

    def pop_due(self, now: int) -> list[bytes]:
        """Frames due by now, in delivery order."""
        self._release_held(now)
        out: list[bytes] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            out.append(heapq.heappop(heap)[2])
        self.stats.delivered += len(out)
        return out

    def peek_due(self, now: int) -> bytes | None:
        """The next frame due by now without taking it (for a tx side whose cable is busy)."""
        self._release_held(now)
        if self._heap and self._heap[0][0] <= now:
            return self._heap[0][2]
        return None

    def pop_one(self) -> bytes:
        """Take the frame peek_due returned."""
        self.stats.delivered += 1
        return heapq.heappop(self._heap)[2]

    def next_release(self) -> int | None:
        times = []
        if self._heap:
            times.append(self._heap[0][0])
        if self._held is not None:
            times.append(self._held[0])
        return min(times) if times else None

    def transfer(self, frames: list[bytes], now: int) -> tuple[list[bytes], int | None]:
        """Push a batch (rx semantics: overflow drops) and return (due now, next release)."""
        for f in frames:
            self.push(f, now, refuse_when_full=False)
        return self.pop_due(now), self.next_release()


class FaultyEnd:
    """A CableEnd that applies a FaultLine to each direction of another CableEnd.

    tx: frames the port sends are pushed into the tx line and handed to the inner end when
    due (a full line refuses: the NIC keeps them). rx: frames from the inner end pass the rx
    line before recv_frames returns them. Held frames are released by recv_frames(); the
    timerfd behind fileno() expires at next_deadline(), so the loop calls it in time (a loop
    that drives timers itself may call run_timers(), which releases tx frames only).
    """

    def __init__(
        self,
        inner: CableEnd,
        tx: FaultConfig | Mapping[str, Any] | None = None,
        rx: FaultConfig | Mapping[str, Any] | None = None,
        *,
        clock: Callable[[], int] | None = None,
        use_timer: bool = True,
    ) -> None:
        self.inner = inner
        self.tx = FaultLine(tx)
        self.rx = FaultLine(rx)
        self.clock = clock or time.monotonic_ns
        self._tx_blocked = False  # the inner end refused the frame at the head of the tx line
        self._timer = Timer() if use_timer else None
        self._poller: Poller | None = None
        if self._timer is not None:
            self._poller = Poller()
            self._poller.watch(self._timer.fileno())
            ifd = inner.fileno()
            if ifd is not None:
                self._poller.watch(ifd)

    @property
    def link_up(self) -> bool:
        return self.inner.link_up

    def fileno(self) -> int | None:
        return self._poller.fileno() if self._poller is not None else self.inner.fileno()

    def send(self, frame: bytes) -> bool:
        now = self.clock()
        if not self.tx.push(frame, now):
            return False
        self._flush_tx(now)
        self._rearm(now)
        return True

    def _flush_tx(self, now: int) -> None:
        self._tx_blocked = False
        while True:
            f = self.tx.peek_due(now)
            if f is None:
                return
            if not self.inner.send(f):
                # the inner cable is busy: the frame waits at the head of the line until the
                # inner end's descriptor (watched by ours) says it may be writable again
                self._tx_blocked = True
                return
            self.tx.pop_one()

    def writable(self) -> bool:
        return not self.tx.full()

    def recv_frames(self) -> list[bytes]:
        now = self.clock()
        if self._timer is not None:
            self._timer.clear()
        self._flush_tx(now)
        got, _ = self.rx.transfer(self.inner.recv_frames(), now)
        self._rearm(now)
        return got

    def run_timers(self) -> None:
        """Timer due (the emulator calls this at next_deadline()): hand due tx frames to the
        inner end. Due rx frames stay queued for recv_frames(); the timerfd is left expired so
        fileno() stays readable until the loop collects them."""
        now = self.clock()
        self._flush_tx(now)
        if self._timer is None:
            return
        rx_next = self.rx.next_release()
        if rx_next is not None and rx_next <= now:
            self._timer.arm_in(1)
        else:
            self._rearm(now)

    def next_deadline(self) -> int | None:
        """Clock time of the next held frame in either direction (tx not counted while the
        inner end refuses: its descriptor, not a timer, says when to try again)."""
        tx = None if self._tx_blocked else self.tx.next_release()
        ts = [t for t in (tx, self.rx.next_release()) if t is not None]
        return min(ts) if ts else None

    def _rearm(self, now: int) -> None:
        if self._timer is None:
            return
        t = self.next_deadline()
        if t is None:
            self._timer.disarm()
        else:
            self._timer.arm_in(t - now)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        if self._poller is not None:
            self._poller.close()
            self._poller = None
        self.inner.close()
