"""Queueing disciplines between the stack and a driver (Linux's net/sched/sch_generic.c).

dev_queue_xmit enqueues; qdisc_run dequeues and hands frames to the driver's ndo_start_xmit
until the queue is empty, the driver stops its queue, or a quota is spent. Why a queue at
all: the driver's TX ring is small and fills in bursts; the qdisc holds what the ring cannot
take yet (up to txqueuelen, then drops with QDISC_DROP) and gives priority (pfifo_fast's
three bands, from skb->priority, which the IP layer sets from the TOS byte).

    enqueue(skb) -> bool   False: dropped (counted, freed with SkbDropReason.QDISC_DROP)
    run()                  __qdisc_run: dequeue + xmit until empty, stopped, or quota
    pending()              frames wait and the queue is not stopped: the event loop calls run()
    reset()                qdisc_reset: free everything queued (interface down)
    stats()                what `tc -s qdisc` prints

NETDEV_TX_BUSY (the driver refused a frame it should have stopped for) puts the frame back
at the head (dev_requeue_skb, counted in `requeues`); the driver's netif_wake_queue makes the
stack call run() again. A new discipline is one class plus one row in QDISCS.

pfifo_fast, the default, has its enqueue and run compiled (kstack/_qdisc.pyx, selected by
$KSTACK_QDISC: c or py); the methods here are their readable twins, used when it is not
built, for a subclass, and while tracepoints are on (the compiled ones emit none).
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Callable

from nicemu import tracepoint
from kstack.dropreason import SkbDropReason
from kstack.netdevice import NETDEV_TX_BUSY

if TYPE_CHECKING:
    from kstack.netdevice import NetDevice
    from kstack.skbuff import SkBuff

__all__ = ["Qdisc", "PFifo", "PFifoFast", "NoQueue", "QDISCS", "make_qdisc", "rt_tos2priority", "select",
           "PRIO2BAND", "IP_TOS2PRIO", "DEV_TX_WEIGHT", "TC_PRIO_BESTEFFORT", "TC_PRIO_FILLER",
           "TC_PRIO_BULK", "TC_PRIO_INTERACTIVE_BULK", "TC_PRIO_INTERACTIVE", "TC_PRIO_CONTROL",
           "TC_PRIO_MAX"]

DEV_TX_WEIGHT = 64  # net.core.dev_weight * dev_weight_tx_bias: frames per qdisc_run

# include/uapi/linux/pkt_sched.h
TC_PRIO_BESTEFFORT = 0
TC_PRIO_FILLER = 1
TC_PRIO_BULK = 2
TC_PRIO_INTERACTIVE_BULK = 4
TC_PRIO_INTERACTIVE = 6
TC_PRIO_CONTROL = 7
TC_PRIO_MAX = 15

# sch_generic.c: skb->priority (low 4 bits) -> band; band 0 is served first
PRIO2BAND = (1, 2, 2, 2, 1, 2, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)

# net/ipv4/route.c ip_tos2prio: indexed by IPTOS_TOS(tos) >> 1 (RFC 1349's four TOS bits);
# the odd entries are ECN_OR_COST(class), which Linux defines as the class itself
IP_TOS2PRIO = (
    TC_PRIO_BESTEFFORT, TC_PRIO_BESTEFFORT, TC_PRIO_BESTEFFORT, TC_PRIO_BESTEFFORT,
    TC_PRIO_BULK, TC_PRIO_BULK, TC_PRIO_BULK, TC_PRIO_BULK,
    TC_PRIO_INTERACTIVE, TC_PRIO_INTERACTIVE, TC_PRIO_INTERACTIVE, TC_PRIO_INTERACTIVE,
    TC_PRIO_INTERACTIVE_BULK, TC_PRIO_INTERACTIVE_BULK, TC_PRIO_INTERACTIVE_BULK,
    TC_PRIO_INTERACTIVE_BULK,
)
IPTOS_TOS_MASK = 0x1E


def rt_tos2priority(tos: int) -> int:
    """skb->priority for an IP packet with this TOS byte (Linux's rt_tos2priority):
    low delay (0x10) -> INTERACTIVE (band 0), throughput (0x08) -> BULK (band 2)."""
    return IP_TOS2PRIO[(tos & IPTOS_TOS_MASK) >> 1]


class Qdisc:
    """The common part: statistics, the requeue slot, qdisc_run. Subclasses keep the
    queue (`_enqueue`, `_dequeue`, `_reset`, `qlen`)."""

    kind = ""

    def __init__(self, dev: "NetDevice", limit: int | None = None) -> None:
        self.dev = dev
        self._limit = limit  # None: follow dev.tx_queue_len, as Linux's fifos do
        self._requeued: SkBuff | None = None  # q->gso_skb: taken before the queue
        self.backlog = 0  # bytes queued
        self.bytes = 0  # sent (handed to the driver and taken)
        self.packets = 0
        self.drops = 0
        self.overlimits = 0
        self.requeues = 0
        self.runs = 0
        self.quota_exhausted = 0  # runs that ended on the quota (rescheduled)

    @property
    def limit(self) -> int:
        return self.dev.tx_queue_len if self._limit is None else self._limit

    # --- what a discipline implements -------------------------------------------------------

    @property
    def qlen(self) -> int:
        raise NotImplementedError

    def _enqueue(self, skb: "SkBuff") -> bool:
        raise NotImplementedError

    def _dequeue(self) -> "SkBuff | None":
        raise NotImplementedError

    def _reset(self) -> list["SkBuff"]:
        raise NotImplementedError

    # --- the generic part -------------------------------------------------------------------

    def enqueue(self, skb: "SkBuff") -> bool:
        """Queue one frame; False when the queue is full (the frame is dropped and counted)."""
        if not self._enqueue(skb):
            self.drops += 1
            skb.drop(SkbDropReason.QDISC_DROP)
            return False
        self.backlog += skb.len
        if tracepoint.enabled:
            tracepoint.emit("qdisc.enqueue", qdisc=type(self).__name__, qlen=self.qlen, backlog=self.backlog)
        return True

    def _take(self) -> "SkBuff | None":
        skb = self._requeued
        if skb is not None:
            self._requeued = None
            return skb
        skb = self._dequeue()
        if skb is not None:
            self.backlog -= skb.len
        return skb

    def _more(self) -> bool:
        return self._requeued is not None or self.qlen > 0

    def pending(self) -> bool:
        """Frames wait and the driver's queue is running: the event loop should run() us."""
        return self._more() and not self.dev.queue_stopped

    def run(self, quota: int = DEV_TX_WEIGHT) -> int:
        """__qdisc_run: hand frames to the driver until the queue is empty, the driver's
        queue stops or `quota` frames went (then pending() stays true and the event loop runs
        us again, as __netif_schedule would). One doorbell per run: every frame but the last
        goes with xmit_more, and a run that ends owing a doorbell rings it (ndo_flush_xmit).
        Returns the frames the driver took."""
        dev = self.dev
        self.runs += 1
        sent = 0
        owed = False  # the last frame went with xmit_more: its doorbell is not rung yet
        while sent < quota and not dev.queue_stopped:
            skb = self._take()
            if skb is None:
                break
            more = sent + 1 < quota and self._more()
            n = skb.len
            if tracepoint.enabled:
                tracepoint.emit("qdisc.dequeue", qdisc=type(self).__name__, qlen=self.qlen, xmit_more=more)
            if dev.ndo_start_xmit(skb, xmit_more=more) == NETDEV_TX_BUSY:
                self._requeue(skb)
                break
            sent += 1
            self.packets += 1
            self.bytes += n
            owed = more
        else:
            if sent >= quota and self._more():
                self.quota_exhausted += 1
        if owed:
            dev.ndo_flush_xmit()
        return sent

    def _requeue(self, skb: "SkBuff") -> None:
        """dev_requeue_skb: the driver said BUSY; the frame goes first next time."""
        self._requeued = skb
        self.requeues += 1

    def reset(self) -> None:
        """qdisc_reset: free everything queued (the interface goes down)."""
        skbs = self._reset()
        if self._requeued is not None:
            skbs.append(self._requeued)
            self._requeued = None
        for skb in skbs:
            skb.drop(SkbDropReason.QDISC_DROP)
        self.backlog = 0

    def stats(self) -> dict[str, int | str]:
        """`tc -s qdisc`: Sent B bytes P pkt (dropped D, overlimits O requeues R) backlog Bb Qp."""
        queued = self.qlen + (self._requeued is not None)
        backlog = self.backlog + (self._requeued.len if self._requeued is not None else 0)
        return {"kind": self.kind, "limit": self.limit, "bytes": self.bytes,
                "packets": self.packets, "drops": self.drops, "overlimits": self.overlimits,
                "requeues": self.requeues, "backlog": backlog, "qlen": queued,
                "runs": self.runs, "quota_exhausted": self.quota_exhausted}


class PFifo(Qdisc):
    """pfifo: one FIFO of at most `limit` frames (default txqueuelen); the tail is dropped."""

    kind = "pfifo"

    def __init__(self, dev: "NetDevice", limit: int | None = None) -> None:
        super().__init__(dev, limit)
        self._q: deque[SkBuff] = deque()

    @property
    def qlen(self) -> int:
        return len(self._q)

    def _enqueue(self, skb: "SkBuff") -> bool:
        if len(self._q) >= self.limit:
            return False
        self._q.append(skb)
        return True

    def _dequeue(self) -> "SkBuff | None":
        return self._q.popleft() if self._q else None

    def _reset(self) -> list["SkBuff"]:
        out = list(self._q)
        self._q.clear()
        return out


class PFifoFast(Qdisc):
    """pfifo_fast: three FIFOs (bands), band 0 served first; the band is PRIO2BAND of
    skb.priority. Each band holds up to txqueuelen frames, as Linux's per-band rings do."""

    kind = "pfifo_fast"
    BANDS = 3
    # kstack/_qdisc.pyx (enqueue, run) or None for the twins in this file; per instance
    # too (tests drive both), set for the class below
    c_ops: Any = None

    def __init__(self, dev: "NetDevice", limit: int | None = None) -> None:
        super().__init__(dev, limit)
        self.bands: tuple[deque[SkBuff], ...] = tuple(deque() for _ in range(self.BANDS))
        self._qlen = 0

    def enqueue(self, skb: "SkBuff") -> bool:
        c = self.c_ops
        if c is not None and type(self) is PFifoFast and not tracepoint.enabled:
            return c.enqueue(self, skb)
        return Qdisc.enqueue(self, skb)

    def run(self, quota: int = DEV_TX_WEIGHT) -> int:
        c = self.c_ops
        if c is not None and type(self) is PFifoFast and not tracepoint.enabled:
            return c.run(self, quota)
        return Qdisc.run(self, quota)

    @property
    def qlen(self) -> int:
        return self._qlen

    def _enqueue(self, skb: "SkBuff") -> bool:
        band = self.bands[PRIO2BAND[skb.priority & TC_PRIO_MAX]]
        if len(band) >= self.limit:
            return False
        band.append(skb)
        self._qlen += 1
        return True

    def _dequeue(self) -> "SkBuff | None":
        if not self._qlen:
            return None
        for band in self.bands:
            if band:
                self._qlen -= 1
                return band.popleft()
        return None

    def _reset(self) -> list["SkBuff"]:
        out = [skb for band in self.bands for skb in band]
        for band in self.bands:
            band.clear()
        self._qlen = 0
        return out

    def stats(self) -> dict[str, int | str]:
        out = super().stats()
        out["bands"] = 3
        out["priomap"] = " ".join(str(b) for b in PRIO2BAND)  # type: ignore[assignment]
        return out


class NoQueue(Qdisc):
    """noqueue: no queue at all. A frame goes to the driver at once; one it refuses (queue
    stopped) is dropped, as Linux does for a device without a queue."""

    kind = "noqueue"

    def __init__(self, dev: "NetDevice", limit: int | None = None) -> None:
        super().__init__(dev, 1 if limit is None else limit)
        self._slot: deque[SkBuff] = deque()

    @property
    def qlen(self) -> int:
        return len(self._slot)

    def _enqueue(self, skb: "SkBuff") -> bool:
        if self.dev.queue_stopped or self._slot:
            self.overlimits += 1
            return False
        self._slot.append(skb)
        return True

    def _dequeue(self) -> "SkBuff | None":
        return self._slot.popleft() if self._slot else None

    def _requeue(self, skb: "SkBuff") -> None:
        self.drops += 1
        skb.drop(SkbDropReason.QDISC_DROP)

    def _reset(self) -> list["SkBuff"]:
        out = list(self._slot)
        self._slot.clear()
        return out


QDISCS: dict[str, Callable[..., Qdisc]] = {
    "pfifo": PFifo,
    "pfifo_fast": PFifoFast,
    "noqueue": NoQueue,
}


def make_qdisc(name: str, dev: "NetDevice", limit: int | None = None) -> Qdisc:
    """`tc qdisc replace dev DEV root NAME [limit N]`."""
    try:
        cls = QDISCS[name]
    except KeyError:
        raise ValueError(f"unknown qdisc {name!r}: one of {', '.join(QDISCS)}") from None
    return cls(dev, limit)


def select(kind: str | None = None) -> Any:
    """pfifo_fast's compiled enqueue and run: "c" (kstack/_qdisc.pyx; None, the twins, when
    it is not built) or "py" (None). Default: $KSTACK_QDISC, else "c"."""
    import os

    kind = kind or os.environ.get("KSTACK_QDISC", "c")
    if kind == "py":
        return None
    if kind != "c":
        raise ValueError(f"KSTACK_QDISC={kind!r}: c or py")
    try:
        from kstack import _qdisc
    except ImportError:
        return None
    _qdisc.check_priomap(PRIO2BAND)
    return _qdisc


PFifoFast.c_ops = select()
