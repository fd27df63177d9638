"""Qdiscs against a fake driver that answers BUSY and wakes: bands, priomap, TOS, txqueuelen
drops, requeue, dequeue again on wake, one doorbell per run, the quota. Every test runs with
pfifo_fast's compiled enqueue/run (kstack/_qdisc.pyx) and with its Python twins;
test_kstack_qdisc_twin.py holds the two equal step by step on random runs."""
from __future__ import annotations

import pytest

from kstack import qdisc as qdisc_mod
from kstack.netdevice import NETDEV_TX_BUSY, NETDEV_TX_OK, NetDevice
from kstack.qdisc import (DEV_TX_WEIGHT, PRIO2BAND, TC_PRIO_BULK, TC_PRIO_CONTROL, TC_PRIO_INTERACTIVE,
                          PFifoFast, make_qdisc, rt_tos2priority)
from kstack.skbuff import SkbPool
from kstack.stack import NetStack


class FakeDev(NetDevice):
    """Takes `room` frames, then stops its queue (and, if `lie`, answers BUSY once more
    without having stopped: the case dev_requeue_skb exists for)."""

    def __init__(self, room: int = 1000, lie: bool = False) -> None:
        super().__init__("fake0")
        self.room = room
        self.lie = lie
        self.sent: list[bytes] = []
        self.more: list[bool] = []
        self.flushes = 0
        self.busy = 0

    @property
    def dev_addr(self) -> bytes:
        return b"\x02\x00\x00\x00\x00\x01"

    def ndo_open(self) -> None:
        self.netif_carrier_on()

    def ndo_stop(self) -> None:
        pass

    def ndo_start_xmit(self, skb, xmit_more: bool = False) -> int:
        if self.queue_stopped or (self.lie and self.room == 0):
            self.busy += 1
            return NETDEV_TX_BUSY
        self.sent.append(skb.tobytes())
        self.more.append(xmit_more)
        skb.consume()
        self.room -= 1
        if self.room == 0 and not self.lie:
            self.netif_stop_queue()
        return NETDEV_TX_OK

    def ndo_flush_xmit(self) -> None:
        self.flushes += 1

    def ndo_get_stats64(self) -> dict[str, int]:
        return {"tx_packets": len(self.sent)}

    def make_room(self, n: int) -> None:
        self.room += n
        self.netif_wake_queue()


@pytest.fixture
def pool() -> SkbPool:
    return SkbPool()


@pytest.fixture(autouse=True, params=["c", "py"])
def qdisc_impl(request, monkeypatch):
    """Each test twice: pfifo_fast compiled and its Python twin."""
    monkeypatch.setattr(PFifoFast, "c_ops", qdisc_mod.select(request.param))
    return request.param


def test_compiled_qdisc_is_built():
    assert qdisc_mod.select("c") is not None, "run `python setup.py build_ext --inplace`"
    assert qdisc_mod.select("py") is None


def skb(pool: SkbPool, tag: int, priority: int = 0):
    s = pool.from_bytes(bytes([tag]) * 60)
    s.priority = priority
    return s


def test_pfifo_is_fifo_and_one_doorbell_per_run(pool):
    dev = FakeDev()
    q = make_qdisc("pfifo", dev)
    for i in range(5):
        assert q.enqueue(skb(pool, i))
    assert q.stats()["qlen"] == 5 and q.stats()["backlog"] == 300
    assert q.run() == 5
    assert [f[0] for f in dev.sent] == [0, 1, 2, 3, 4]
    assert dev.more == [True, True, True, True, False]  # the last frame rings the doorbell
    assert dev.flushes == 0
    st = q.stats()
    assert (st["packets"], st["bytes"], st["qlen"], st["backlog"]) == (5, 300, 0, 0)
    assert pool.live == 0


def test_txqueuelen_drops_are_counted_and_freed(pool):
    dev = FakeDev(room=0)
    dev.netif_stop_queue()
    dev.tx_queue_len = 3
    q = make_qdisc("pfifo", dev)
    assert [q.enqueue(skb(pool, i)) for i in range(5)] == [True, True, True, False, False]
    assert q.stats()["drops"] == 2 and pool.drops["QDISC_DROP"] == 2
    assert q.run() == 0 and not q.pending()  # the driver's queue is stopped
    dev.make_room(10)  # netif_wake_queue, no stack: the owner runs the qdisc
    assert q.pending() and q.run() == 3
    q.reset()
    assert pool.live == 0


def test_pfifo_fast_serves_band_0_first_with_linux_priomap(pool):
    dev = FakeDev()
    q = make_qdisc("pfifo_fast", dev)
    prios = list(range(16))
    for p in prios:
        q.enqueue(skb(pool, p, priority=p))
    q.run()
    order = [f[0] for f in dev.sent]
    want = sorted(prios, key=lambda p: (PRIO2BAND[p], p))
    assert order == want
    assert PRIO2BAND == (1, 2, 2, 2, 1, 2, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)
    assert order[:2] == [6, 7]  # TC_PRIO_INTERACTIVE and TC_PRIO_CONTROL: band 0
    assert q.stats()["priomap"] == "1 2 2 2 1 2 0 0 1 1 1 1 1 1 1 1"


def test_priority_above_15_uses_its_low_bits(pool):
    dev = FakeDev()
    q = make_qdisc("pfifo_fast", dev)
    q.enqueue(skb(pool, 1, priority=0x10001))  # & TC_PRIO_MAX = 1 -> band 2
    q.enqueue(skb(pool, 2, priority=0x10006))  # 6 -> band 0
    q.run()
    assert [f[0] for f in dev.sent] == [2, 1]


@pytest.mark.parametrize("tos, prio, band", [
    (0x00, 0, 1), (0x10, TC_PRIO_INTERACTIVE, 0), (0x08, TC_PRIO_BULK, 2), (0x04, 0, 1),
    (0x02, 0, 1), (0x18, 4, 1), (0x10 | 0x03, TC_PRIO_INTERACTIVE, 0), (0xB8, 4, 1), (0xC0, 0, 1),
])
def test_tos_to_priority_to_band(tos, prio, band):
    """rt_tos2priority reads only the four RFC 1349 TOS bits (ECN and precedence ignored)."""
    assert rt_tos2priority(tos) == prio
    assert PRIO2BAND[prio] == band


def test_pfifo_fast_band_limit_is_per_band(pool):
    dev = FakeDev(room=0)
    dev.netif_stop_queue()
    dev.tx_queue_len = 2
    q = make_qdisc("pfifo_fast", dev)
    assert [q.enqueue(skb(pool, i, priority=TC_PRIO_BULK)) for i in range(3)] == [True, True, False]
    assert q.enqueue(skb(pool, 9, priority=TC_PRIO_CONTROL))  # another band has room
    assert q.stats()["drops"] == 1 and q.stats()["qlen"] == 3
    q.reset()
    assert pool.live == 0 and pool.drops["QDISC_DROP"] == 4


def test_stop_then_wake_dequeues_again_through_the_stack(pool):
    stack = NetStack(pool=pool)
    dev = FakeDev(room=4)
    stack.register_netdev(dev)
    stack.dev_open(dev)
    for i in range(10):
        s = skb(pool, i)
        s.dev = dev
        stack.dev_queue_xmit(s)
    assert len(dev.sent) == 4 and dev.queue_stopped
    assert dev.qdisc.stats()["qlen"] == 6
    dev.make_room(3)  # netif_wake_queue -> the stack runs the qdisc
    assert len(dev.sent) == 7 and dev.qdisc.stats()["qlen"] == 3
    dev.make_room(100)
    assert [f[0] for f in dev.sent] == list(range(10))
    assert dev.counters["tx_queue_stops"] == 2 and dev.counters["tx_queue_wakes"] == 2
    assert pool.live == 0


def test_busy_requeues_at_the_head_and_counts(pool):
    dev = FakeDev(room=2, lie=True)  # answers BUSY without stopping first
    q = make_qdisc("pfifo", dev)
    for i in range(4):
        q.enqueue(skb(pool, i))
    assert q.run() == 2
    st = q.stats()
    assert st["requeues"] == 1 and st["qlen"] == 2 and st["drops"] == 0
    assert dev.flushes == 1  # frame 1 went with xmit_more; the BUSY ended the run: ring now
    dev.room = 5
    assert q.run() == 2
    assert [f[0] for f in dev.sent] == [0, 1, 2, 3]  # the requeued frame went first
    assert q.stats()["requeues"] == 1 and pool.live == 0


def test_quota_leaves_work_pending_for_the_event_loop(pool):
    dev = FakeDev()
    q = make_qdisc("pfifo", dev)
    n = DEV_TX_WEIGHT + 10
    for i in range(n):
        q.enqueue(skb(pool, i & 0xFF))
    assert q.run() == DEV_TX_WEIGHT
    assert q.pending() and q.stats()["quota_exhausted"] == 1
    assert dev.more[DEV_TX_WEIGHT - 1] is False  # the quota's last frame rings the doorbell
    assert q.run() == 10 and not q.pending()
    assert pool.live == 0


def test_noqueue_sends_at_once_and_drops_when_stopped(pool):
    dev = FakeDev(room=1)
    stack = NetStack(pool=pool)
    stack.register_netdev(dev, qdisc="noqueue")
    stack.dev_open(dev)
    for i in range(3):
        s = skb(pool, i)
        s.dev = dev
        stack.dev_queue_xmit(s)
    assert [f[0] for f in dev.sent] == [0]
    assert dev.qdisc.stats()["drops"] == 2 and pool.live == 0


def test_unknown_qdisc_is_refused():
    with pytest.raises(ValueError, match="unknown qdisc"):
        make_qdisc("htb", FakeDev())


def test_reset_frees_a_requeued_frame(pool):
    dev = FakeDev(room=0, lie=True)
    q = make_qdisc("pfifo_fast", dev)
    q.enqueue(skb(pool, 1))
    q.enqueue(skb(pool, 2))
    q.run()
    assert q.stats()["requeues"] == 1 and q.stats()["qlen"] == 2 and q.stats()["backlog"] == 120
    q.reset()
    assert pool.live == 0 and q.stats()["qlen"] == 0

