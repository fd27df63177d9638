"""pfifo_fast's compiled enqueue and run (kstack/_qdisc.pyx) against their Python twins
(kstack/qdisc.py) on random runs through the stack: a driver whose room comes and goes and
that sometimes answers BUSY, small txqueuelens, quotas; the state after every step equal."""
from __future__ import annotations

import random

import pytest

from kstack import qdisc as qdisc_mod
from kstack.netdevice import NETDEV_TX_BUSY
from kstack.qdisc import DEV_TX_WEIGHT, PFifoFast
from kstack.skbuff import SkbPool
from kstack.stack import NetStack
from tests.stack.test_kstack_qdisc import FakeDev


class RandomDev(FakeDev):
    """A driver whose room comes and goes at random, that sometimes answers BUSY without
    having stopped (the requeue case) and frees what it sends (the pool counts)."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__(room=rng.randint(0, 5))
        self.rng = rng
        self.honest = False

    def ndo_start_xmit(self, skb, xmit_more: bool = False) -> int:
        if not self.honest and not self.queue_stopped and self.rng.random() < 0.1:
            self.busy += 1
            return NETDEV_TX_BUSY
        return super().ndo_start_xmit(skb, xmit_more)


def _qdisc_state(q, dev, pool) -> dict:
    return {"stats": q.stats(), "bands": [[s.tobytes() for s in b] for b in q.bands],
            "requeued": None if q._requeued is None else q._requeued.tobytes(),
            "sent": list(dev.sent), "more": list(dev.more), "flushes": dev.flushes, "busy": dev.busy,
            "stopped": dev.queue_stopped, "pool": pool.stats(), "drops": dict(pool.drops),
            "pending": q.pending(), "dev": dict(dev.counters)}


def _random_qdisc_run(kind: str, seed: int) -> list:
    rng = random.Random(seed)
    pool = SkbPool()
    stack = NetStack(pool=pool)
    dev = RandomDev(rng)
    dev.tx_queue_len = rng.choice([2, 5, 8])
    stack.register_netdev(dev)
    stack.dev_open(dev)
    q = dev.qdisc
    assert type(q) is PFifoFast
    q.c_ops = qdisc_mod.select(kind)
    states = []
    for k in range(400):
        r = rng.random()
        if r < 0.55:  # dev_queue_xmit: enqueue, then run (drops counted)
            s = pool.from_bytes(bytes([k & 0xFF]) * rng.randint(14, 200))
            s.priority = rng.choice([0, 1, 2, 4, 6, 7, 15, 0x10006, rng.randint(0, 1 << 20)])
            s.dev = dev
            stack.dev_queue_xmit(s)
        elif r < 0.7:
            dev.make_room(rng.randint(0, 6))  # netif_wake_queue -> the stack runs the qdisc
        elif r < 0.8:
            if not dev.queue_stopped:
                dev.netif_stop_queue()
        elif r < 0.95:
            q.run(rng.choice([1, 2, 3, DEV_TX_WEIGHT]))
        else:
            dev.room = rng.randint(0, 3)
        states.append(_qdisc_state(q, dev, pool))
    dev.honest = True
    dev.make_room(10_000)  # wakes a stopped queue: the stack runs the qdisc
    while q.pending():
        q.run()
    assert q.stats()["qlen"] == 0
    states.append(_qdisc_state(q, dev, pool))
    q.reset()
    states.append(_qdisc_state(q, dev, pool))
    assert pool.live == 0
    return states


@pytest.mark.parametrize("seed", [1, 3, 4, 9, 10])  # seeds whose run hits every case
def test_compiled_pfifo_fast_agrees_with_its_twin(seed):
    """Bands, priomap, per-band txqueuelen drops, BUSY requeues, stop/wake, quotas: the same
    frames in the same order with the same xmit_more and doorbells, the same counters."""
    assert qdisc_mod.select("c") is not None, "run `python setup.py build_ext --inplace`"
    twin = _random_qdisc_run("py", seed)
    comp = _random_qdisc_run("c", seed)
    for k, (x, y) in enumerate(zip(twin, comp)):
        assert x == y, f"step {k}: {[f for f in x if x[f] != y[f]]}"
    st = twin[-2]["stats"]
    assert st["requeues"] and st["drops"] and st["quota_exhausted"] and st["packets"] > 50
