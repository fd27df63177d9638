"""In-process cables: two devices back to back inside one emulator process.

`PairCable(nic_a, nic_b)` plugs two Nics together. With no faults it uses
`nic_a.connect(nic_b)`: frames go from one data-path engine to the other without a Python
object per frame (the fast default); a capture then rides on the engines' capture ring
(nicemu.cable.capture.RingCapture: a clock read and one copy per frame in C, drained into the
pcap by the event loop every 100 ms, by `run_timers()`, and at close). Without faults both
ports see the same frames, so a capture on each port writes the same records to both files.
With faults on either side it builds a Python-level pair of `PipeEnd`s wrapped in
`FaultyEnd` / `CapturedEnd`, and delivers synchronously: a frame the TX ring sends is in the peer's RX ring when the TDT write returns,
unless a fault holds it (then `run_timers()` at `next_deadline()` releases it; `fileno()` is
a timerfd-backed descriptor an event loop can wait on).

Options (the YAML keys of a `pair` cable):
    capture_a, capture_b   pcap path for port a / port b (None: no capture)
    capture_snaplen, capture_max_frames
                           bytes kept of each frame, records written at most (None: no
                           limit) by the capture ring (`nicemu serve --pair --pcap`)
    faults_ab, faults_ba   fault settings (nicemu.cable.faults.FaultConfig keys) for the direction
                           a -> b and b -> a
    clock                  callable returning ns, for fault timing (default: nic_a.clock)

`pipe()` is the same pair as two plain CableEnds for an event loop that services ports itself
(nicemu.emulator): send() queues into the peer's inbox and rings its eventfd.
"""
from __future__ import annotations

import collections
import os
import time
from typing import Any, Callable, Mapping

from nicemu.cable.base import CableEnd, Poller, eventfd_clear, unplugged

__all__ = ["PairCable", "PipeEnd", "pipe"]


class PipeEnd:
    """One end of an in-process pipe pair. Bounded: send() refuses while the peer's inbox
    holds `limit` frames, and the peer rings our eventfd when it drains a full inbox."""

    kind = "pair"  # in nicemu, an end of the in-process pipe a `pair` cable uses

    def __init__(self, limit: int = 256) -> None:
        if limit < 1:
            raise ValueError(f"pipe limit must be >= 1, got {limit}")
        self.limit = limit
        self.peer: PipeEnd | None = None
        self.inbox: collections.deque[bytes] = collections.deque()
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._closed = False
        self._peer_waiting = False  # the peer was refused: ring it when our inbox drains

    @property
    def link_up(self) -> bool:
        return not self._closed and self.peer is not None and not self.peer._closed

    def fileno(self) -> int | None:
        return None if self._closed else self._efd

    def send(self, frame: bytes) -> bool:
        peer = self.peer
        if peer is None or self._closed or peer._closed:
            return True  # unplugged: the frame is lost on the floor, as on a real cable
        if len(peer.inbox) >= peer.limit:
            peer._peer_waiting = True
            return False
        was_empty = not peer.inbox
        peer.inbox.append(bytes(frame))
        if was_empty:
            os.eventfd_write(peer._efd, 1)
        return True

    def writable(self) -> bool:
        peer = self.peer
        return peer is None or peer._closed or len(peer.inbox) < peer.limit

    def recv_frames(self) -> list[bytes]:
        if self._closed:
            return []
        eventfd_clear(self._efd)
        frames = list(self.inbox)
        self.inbox.clear()
        if self._peer_waiting and self.peer is not None and not self.peer._closed:
            self._peer_waiting = False
            os.eventfd_write(self.peer._efd, 1)  # space again: wake the refused sender
        return frames

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.inbox.clear()
        if self.peer is not None and not self.peer._closed:
            os.eventfd_write(self.peer._efd, 1)  # the peer sees link down
        os.close(self._efd)


def pipe(limit: int = 256) -> tuple[PipeEnd, PipeEnd]:
    """Two connected in-process cable ends."""
    a, b = PipeEnd(limit), PipeEnd(limit)
    a.peer, b.peer = b, a
    return a, b


class PairCable:
    """Two Nics in one process, back to back. See the module docstring for the options."""

    kind = "pair"

    def __init__(
        self,
        nic_a,
        nic_b,
        *,
        capture_a: str | os.PathLike[str] | None = None,
        capture_b: str | os.PathLike[str] | None = None,
        faults_ab: Mapping[str, Any] | None = None,
        faults_ba: Mapping[str, Any] | None = None,
        clock: Callable[[], int] | None = None,
        capture_snaplen: int = 65535,
        capture_max_frames: int | None = None,
    ) -> None:
        from nicemu.cable.faults import FaultConfig, FaultyEnd
        from nicemu.cable.capture import CapturedEnd, RingCapture

        if nic_a is nic_b:
            raise ValueError("pair cable: both ends are the same device")
        self.nic_a, self.nic_b = nic_a, nic_b
        fab = FaultConfig.from_dict(faults_ab)
        fba = FaultConfig.from_dict(faults_ba)
        self.fast = not fab.active and not fba.active  # engine to engine, in C
        self.end_a: CableEnd | None = None
        self.end_b: CableEnd | None = None
        self.capture: RingCapture | None = None  # the fast path's capture (both ports' files)
        self._poller: Poller | None = None
        clk = clock or getattr(nic_a, "clock", None)
        if self.fast:
            paths = [p for p in (capture_a, capture_b) if p is not None]
            if paths:
                self.capture = RingCapture(paths[0], also=paths[1:], snaplen=capture_snaplen,
                                           max_frames=capture_max_frames,
                                           clock=clk if callable(clk) else time.monotonic_ns)
                self.capture.attach(nic_a.engine, nic_b.engine)
            nic_a.connect(nic_b)
        else:
            pa, pb = pipe()
            ea: CableEnd = pa
            eb: CableEnd = pb
            # faults on a's end shape a -> b on its tx side; b -> a on b's tx side
            if fab.active or fba.active:
                ea = FaultyEnd(ea, tx=fab, clock=clk)
                eb = FaultyEnd(eb, tx=fba, clock=clk)
            if capture_a is not None:
                ea = CapturedEnd(ea, capture_a)
            if capture_b is not None:
                eb = CapturedEnd(eb, capture_b)
            self.end_a, self.end_b = ea, eb
            self._poller = Poller()
            for e in (ea, eb):
                fd = e.fileno()
                if fd is not None:
                    self._poller.watch(fd)
            nic_a.attach(self._sink(ea, eb, nic_b))
            nic_b.attach(self._sink(eb, ea, nic_a))
        nic_a.set_link(True)
        nic_b.set_link(True)

    @staticmethod
    def _sink(mine: CableEnd, theirs: CableEnd, peer) -> Callable[[bytes], bool]:
        def sink(frame: bytes) -> bool:
            if not mine.send(frame):
                return False
            for f in theirs.recv_frames():  # synchronous, as in QEMU: delivered before return
                peer.receive(f)
            return True

        return sink

    @property
    def needs_timers(self) -> bool:
        """Whether an event loop must call run_timers() at next_deadline(): faults hold
        frames, a capture ring is drained."""
        return not self.fast or self.capture is not None

    def stats(self) -> dict:
        """The cable's counters on the fast path (the slow path's ends have their own)."""
        out: dict[str, Any] = {"kind": "pair"}
        if self.capture is not None:
            out["captured"] = self.capture.writer.count
            out["not_captured"] = self.capture.not_captured
        return out

    def fileno(self) -> int | None:
        """Readable when a held (delayed) frame may be due; None on the fast path."""
        return None if self._poller is None else self._poller.fileno()

    def next_deadline(self) -> int | None:
        if self.capture is not None:
            return self.capture.next_deadline()
        ts = []
        for e in (self.end_a, self.end_b):
            nd = getattr(e, "next_deadline", None)  # None on the fast path (no ends)
            t = nd() if nd is not None else None
            if t is not None:
                ts.append(t)
        return min(ts) if ts else None

    def run_timers(self) -> None:
        """Release frames whose delay has passed, in both directions, and resume TX buffers;
        on the fast path, write what the capture ring holds when its time has come."""
        if self.capture is not None:
            self.capture.run_timers()
        if self.end_a is None or self.end_b is None:
            return
        for _ in range(2):  # tx releases on one side become rx arrivals on the other
            for end, nic in ((self.end_a, self.nic_a), (self.end_b, self.nic_b)):
                for f in end.recv_frames():
                    nic.receive(f)
        for end, nic in ((self.end_a, self.nic_a), (self.end_b, self.nic_b)):
            if end.writable():
                nic.tx_ready()

    def close(self) -> None:
        """Unplug: both links go down and what the devices still transmit is lost, as with a
        pulled cable (the engines are unlinked on the fast path)."""
        if self.fast:
            self.nic_a.disconnect()
            if self.capture is not None:
                self.capture.close()  # detach from the engines, write the rest, close the files
        elif self.end_a is not None:
            self.end_a.close()
            self.end_b.close()
            self.end_a = self.end_b = None
        if self._poller is not None:
            self._poller.close()
            self._poller = None
        self.nic_a.attach(unplugged)
        self.nic_b.attach(unplugged)
        self.nic_a.set_link(False)
        self.nic_b.set_link(False)


# --- the `pair` kind of a topology (registered in nicemu.cable.KINDS) --------------------

ENDS = (2, 2)
KEYS: tuple[str, ...] = ()
SAME_PROCESS = True  # an in-process call from one device model into the other


def check(cc) -> dict:
    """No options of its own (capture and faults are common to every kind)."""
    return {}


def build(cable, local: list[str], ctx) -> list:
    """Both devices are here (SAME_PROCESS): plug them together; no ends for the loop."""
    a, b = cable.ends
    ctx.emu.add_pair(ctx.nics[a], ctx.nics[b], capture_a=cable.capture.get(a), capture_b=cable.capture.get(b),
                     faults_ab=ctx.fault_kwargs(cable.faults.get(a)), faults_ba=ctx.fault_kwargs(cable.faults.get(b)))
    return []


def make(**options: Any) -> Any:
    raise ValueError("a pair cable joins two Nics: use nicemu.cable.pair.PairCable(nic_a, nic_b, ...)")
