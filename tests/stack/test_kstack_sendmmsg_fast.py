"""sendmmsg's send loop for a connected UDP socket (UdpSock.sendmmsg_fast): the compiled loop
(kstack/_txfast.pyx sendmmsg_connected) and its Python twin (kstack/txfast.py) put the same
frames on the wire with the same counters as one sendmsg per datagram ("off": the layered
path), over the e1000 driver and emulated NICs in-process; a batch that meets SO_SNDBUF stops
there and resumes from where it stopped; a malformed batch sends nothing."""
from __future__ import annotations

import random

import pytest

from kstack import txfast
from kstack.sock import SO_SNDBUF, SOCK_DGRAM, SOL_SOCKET
from kstack.syscall.channel import pack_mmsg
from tests.stack.test_kstack_txfast import _e1000_hosts, _run_until


def _run(mode: str, csum: bool, seed: int, small_sndbuf: bool):
    a, b = _e1000_hosts(csum)
    try:
        _run_until(a, b, lambda: a.drv.carrier and b.drv.carrier)
        wire: list[bytes] = []
        b.stack.add_tap(b.drv, lambda skb, out: (wire.append(skb.tobytes()), skb.consume()))
        rx = b.stack.socket(2, SOCK_DGRAM)
        rx.bind(("0.0.0.0", 9000))
        s = a.stack.socket(2, SOCK_DGRAM)
        s.bind(("0.0.0.0", 5555))
        s.connect(("198.18.0.2", 9000))
        s._tx_fast = txfast.select(mode)
        if small_sndbuf:
            s.setsockopt(SOL_SOCKET, SO_SNDBUF, 4096)  # a few skbs: batches stop midway
        s.sendmsg(b"resolve", None)
        _run_until(a, b, lambda: rx.poll() & 1 and not a.drv.tx_pending())
        rx.recvmsg(100)
        rng = random.Random(seed)
        sizes: list[int] = []
        stops = 0
        for _ in range(12):
            dgs = [bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 18, 700, 1472])))
                   for _ in range(rng.randint(1, 12))]
            p = pack_mmsg(dgs)
            k = 0
            while k < len(dgs):
                a.stack.xmit_batch_begin()
                try:
                    if mode == "off":  # one sendmsg per datagram, the reference
                        while k < len(dgs) and s.wmem < s.sndbuf:
                            s.sendmsg(dgs[k], None)
                            k += 1
                    else:
                        k = s.sendmmsg_fast(p, len(dgs), k)
                        while k < len(dgs) and s.wmem < s.sndbuf:  # what the syscall layer does
                            s.sendmsg(dgs[k], None)
                            k = s.sendmmsg_fast(p, len(dgs), k + 1)
                finally:
                    a.stack.xmit_batch_end()
                if k < len(dgs):
                    stops += 1
                    _run_until(a, b, lambda: not a.drv.tx_pending())  # frees the skbs: room again
            sizes += [len(d) for d in dgs]
        _run_until(a, b, lambda: len([f for f in wire if f[23] == 17]) == len(sizes) + 1
                   and not a.drv.tx_pending())
        got = []
        while rx.poll() & 1:
            got.append(len(rx.recvmsg(2000)[0]))
        assert got == sizes and s.wmem == 0
        st = a.drv.stats
        drv = {k: getattr(st, k) for k in ("tx_packets", "tx_bytes", "tx_copied_bytes",
                                           "tx_csum_offload", "tx_csum_help", "tx_dropped")}
        counters = {"snmp": dict(a.stack.snmp), "skb": a.stack.pool.stats(),
                    "neigh": dict(a.inet.neigh.stats), "qdisc": a.drv.qdisc.stats(), "drv": drv}
        for x in (rx, s):
            x.close()
        return [f for f in wire if f[23] == 17], counters, stops
    finally:
        a.close()
        b.close()
        assert a.stack.pool.live == 0


@pytest.mark.parametrize("csum", [True, False])
@pytest.mark.parametrize("small_sndbuf", [False, True])
def test_compiled_loop_twin_and_layered_path_agree(csum, small_sndbuf):
    ref = _run("off", csum, 11, small_sndbuf)
    for m in ("c", "py"):
        frames, counters, stops = _run(m, csum, 11, small_sndbuf)
        assert frames == ref[0], f"{m}: frames differ on the wire"
        assert counters == ref[1], f"{m}: counters differ"
        assert stops == ref[2]
        if small_sndbuf:
            assert stops > 0  # the batches did stop at SO_SNDBUF and resume


@pytest.mark.parametrize("mode", ["c", "py"])
def test_malformed_batch_sends_nothing(mode):
    a, b = _e1000_hosts(True)
    try:
        _run_until(a, b, lambda: a.drv.carrier and b.drv.carrier)
        s = a.stack.socket(2, SOCK_DGRAM)
        s.connect(("198.18.0.2", 9000))
        s._tx_fast = txfast.select(mode)
        s.sendmsg(b"resolve", None)
        _run_until(a, b, lambda: not a.drv.tx_pending())
        before = dict(a.stack.snmp)
        for p, n in ((pack_mmsg([b"a", b"b"]), 3), (pack_mmsg([b"a"]) + b"x", 1), (b"\x09\x00ab", 1),
                     (pack_mmsg([b"a"]), 0), (pack_mmsg([b"a"]), 1025)):
            with pytest.raises(ValueError):
                s.sendmmsg_fast(p, n)
        with pytest.raises(ValueError):
            s.sendmmsg_fast(pack_mmsg([b"a"]), 1, -1)
        assert dict(a.stack.snmp) == before and s.wmem == 0
        assert s.sendmmsg_fast(pack_mmsg([b"a", b"b"]), 2, 2) == 2  # nothing left to send
        s.close()
    finally:
        a.close()
        b.close()


def _overflow_run(mode: str, seed: int, batched: bool):
    """More datagrams in flight than a small TX ring holds (SO_SNDBUF large, the ring 32
    descriptors, txqueuelen 12): the driver stops its queue, the rest wait in pfifo_fast
    (past txqueuelen they are dropped, counted) and go when the TX clean wakes the queue.
    Returns the frames on the wire and the sender's counters."""
    a, b = _e1000_hosts(True, tx_ring_size=32)
    try:
        _run_until(a, b, lambda: a.drv.carrier and b.drv.carrier)
        a.drv.tx_queue_len = 12
        wire: list[bytes] = []
        b.stack.add_tap(b.drv, lambda skb, out: (wire.append(skb.tobytes()), skb.consume()))
        rx = b.stack.socket(2, SOCK_DGRAM)
        rx.bind(("0.0.0.0", 9000))
        s = a.stack.socket(2, SOCK_DGRAM)
        s.bind(("0.0.0.0", 5555))
        s.connect(("198.18.0.2", 9000))
        s._tx_fast = txfast.select(mode)
        s.setsockopt(SOL_SOCKET, SO_SNDBUF, 1 << 20)
        s.sendmsg(b"resolve", None)
        _run_until(a, b, lambda: rx.poll() & 1 and not a.drv.tx_pending())
        rx.recvmsg(100)
        rng = random.Random(seed)
        for _ in range(6):
            dgs = [bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 18, 18, 300])))
                   for _ in range(rng.randint(20, 60))]
            a.stack.xmit_batch_begin()
            try:
                if batched and mode != "off":
                    k = s.sendmmsg_fast(pack_mmsg(dgs), len(dgs))
                    while k < len(dgs):
                        s.sendmsg(dgs[k], None)
                        k = s.sendmmsg_fast(pack_mmsg(dgs), len(dgs), k + 1)
                else:
                    for d in dgs:
                        s.sendmsg(d, None)
            finally:
                a.stack.xmit_batch_end()
            for _ in range(rng.randint(0, 3)):  # sometimes the ring drains a little meanwhile
                a.turn()
                b.turn()
        _run_until(a, b, lambda: not a.drv.tx_pending() and not a.drv.qdisc.stats()["qlen"])
        while rx.poll() & 1:
            rx.recvmsg(2000)
        st = a.drv.stats
        drv = {k: getattr(st, k) for k in ("tx_packets", "tx_bytes", "tx_copied_bytes", "tx_csum_offload",
                                           "tx_dropped", "tx_queue_stops", "tx_busy")}
        counters = {"snmp": dict(a.stack.snmp), "skb": a.stack.pool.stats(), "drops": dict(a.stack.pool.drops),
                    "neigh": dict(a.inet.neigh.stats), "qdisc": a.drv.qdisc.stats(), "drv": drv}
        assert s.wmem == 0
        for x in (rx, s):
            x.close()
        return [f for f in wire if f[23] == 17], counters
    finally:
        a.close()
        b.close()
        assert a.stack.pool.live == 0


@pytest.mark.parametrize("batched", [False, True])
def test_ring_overflow_queues_in_pfifo_fast_as_the_layered_path(batched):
    """The fast paths (compiled, twin; sendmsg and sendmmsg) enqueue behind a stopped driver
    queue as dev_queue_xmit does: the same frames, qdisc drops, requeues and counters."""
    ref = _overflow_run("off", 5, False)
    for m in ("c", "py"):
        frames, counters = _overflow_run(m, 5, batched)
        assert frames == ref[0], f"{m}: frames differ on the wire"
        assert counters == ref[1], f"{m}: counters differ"
    q = ref[1]["qdisc"]
    assert ref[1]["drv"]["tx_queue_stops"] > 0 and q["drops"] > 0 and q["packets"] > 0
    assert ref[1]["drops"] == {"QDISC_DROP": q["drops"]}
