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
