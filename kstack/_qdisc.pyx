# cython: boundscheck=False, wraparound=False, cdivision=True
"""pfifo_fast's enqueue and __qdisc_run, compiled. kstack/qdisc.py's Qdisc.enqueue,
PFifoFast._enqueue, Qdisc.run, Qdisc._take and Qdisc._requeue are the readable twins with
the same steps and counters (tests/stack/test_kstack_qdisc.py holds them equal: bands,
priomap, txqueuelen drops, requeue on BUSY, dequeue on wake, the quota, one doorbell per run).

Why: when more datagrams are in flight than the driver's TX ring holds, the driver stops its
queue and every frame after that goes through the qdisc: queued on send, dequeued when the
TX clean wakes the queue. In Python that costs a few method frames and property reads per
frame in each direction; here it is the deque operations, the counters on C integers
written back once per run, and the driver's compiled transmit (E1000.tx_c) called without
its method frame. Only an exact PFifoFast gets this (a subclass keeps its own methods)."""
from kstack.dropreason import SkbDropReason
from kstack.netdevice import NETDEV_TX_BUSY

cdef int _TX_BUSY = NETDEV_TX_BUSY
cdef object _QDISC_DROP = SkbDropReason.QDISC_DROP
cdef tuple _PRIO2BAND = (1, 2, 2, 2, 1, 2, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)


def check_priomap(prio2band):
    """The priomap compiled in here must be kstack.qdisc.PRIO2BAND (checked on import there)."""
    if tuple(prio2band) != _PRIO2BAND:
        raise ImportError("kstack.qdisc.PRIO2BAND changed: update kstack/_qdisc.pyx")


def enqueue(qd, skb):
    """Qdisc.enqueue of a PFifoFast: the band from skb.priority's low four bits, the band's
    limit (txqueuelen unless set) or a drop (counted, freed with QDISC_DROP); backlog in bytes."""
    band = qd.bands[<int>_PRIO2BAND[<int>skb.priority & 15]]
    lim = qd._limit
    if lim is None:
        lim = qd.dev.tx_queue_len
    if len(band) >= <Py_ssize_t>lim:
        qd.drops += 1
        skb.drop(_QDISC_DROP)
        return False
    band.append(skb)
    qd._qlen += 1
    qd.backlog += <Py_ssize_t>skb.tail - <Py_ssize_t>skb.data
    return True


def run(qd, Py_ssize_t quota):
    """Qdisc.run of a PFifoFast (__qdisc_run): the requeued frame first, then band 0, 1, 2,
    each handed to the driver with xmit_more while more follow within the quota, until the
    queue is empty, the driver stops its queue, or the quota is spent; BUSY requeues the
    frame (dev_requeue_skb); a run that ends owing a doorbell rings it. Returns frames sent."""
    dev = qd.dev
    qd.runs += 1
    cdef Py_ssize_t sent = 0, packets = 0, nbytes = 0, n, backlog_out = 0
    cdef Py_ssize_t qlen
    cdef bint owed = False, more, requeued
    b0, b1, b2 = qd.bands
    ops = getattr(dev, "tx_c", None)
    try:
        while True:
            qlen = qd._qlen  # read each time: a callback from the driver may have queued more
            if sent >= quota or dev.queue_stopped:
                # the while's else in Qdisc.run: a run that used its quota with work left
                if sent >= quota and (qd._requeued is not None or qlen > 0):
                    qd.quota_exhausted += 1
                break
            skb = qd._requeued  # Qdisc._take
            if skb is not None:
                qd._requeued = None
            elif qlen:
                if b0:
                    skb = b0.popleft()
                elif b1:
                    skb = b1.popleft()
                else:
                    skb = b2.popleft()
                qlen -= 1
                qd._qlen = qlen
                backlog_out += <Py_ssize_t>skb.tail - <Py_ssize_t>skb.data
            else:
                break
            more = sent + 1 < quota and (qd._requeued is not None or qlen > 0)
            n = <Py_ssize_t>skb.tail - <Py_ssize_t>skb.data
            if ops is not None:
                r = ops.xmit(dev, skb, more)
            else:
                r = dev.ndo_start_xmit(skb, xmit_more=more)
            if r == _TX_BUSY:
                qd._requeued = skb  # Qdisc._requeue
                qd.requeues += 1
                break
            sent += 1
            packets += 1
            nbytes += n
            owed = more
    finally:
        qd.backlog -= backlog_out
        qd.packets += packets
        qd.bytes += nbytes
    if owed:
        dev.ndo_flush_xmit()
    return sent
