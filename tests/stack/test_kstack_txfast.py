"""The UDP send fast path (kstack/_txfast.pyx), its Python twin (kstack/txfast.py) and the
layered slow path ("off") agree: byte-identical frames on the wire and identical counters,
over fake devices and over the real e1000 driver and emulated NICs in-process, for random
payload sizes, TOS, TTL, with checksum offload on and off. Also SO_SNDBUF: a sender whose
skbs the driver has not freed yet waits (EAGAIN) instead of the qdisc dropping."""
from __future__ import annotations

import errno
import random
import time
import warnings

import pytest

from kstack import txfast
from kstack.dropreason import SkbDropReason
from kstack.neighbour import NUD_DELAY, NUD_REACHABLE, NUD_STALE
from kstack.skbuff import MAX_HEADER, skb_truesize_for
from kstack.sock import IP_TOS, IP_TTL, IPPROTO_IP, SO_SNDBUF, SOCK_DGRAM, SOL_SOCKET
from tests.kstack_fakes import MS, FakeNet

MODES = ["c", "py", "off"]


def _compiled_built() -> bool:
    try:
        import kstack._txfast  # noqa: F401
    except ImportError:
        return False
    return True


def test_compiled_path_is_built():
    assert _compiled_built(), "run `python setup.py build_ext --inplace`"
    assert txfast.select("c") is not txfast.udp_send
    assert txfast.select("py") is txfast.udp_send
    assert txfast.select("off") is None


def _counters(host) -> dict:
    st = host.stack
    dev = host.dev
    q = dev.qdisc.stats()
    return {"snmp": dict(st.snmp), "skb": st.pool.stats(), "drops": dict(st.pool.drops),
            "neigh": dict(host.inet.neigh.stats), "qdisc": q, "dev": dev.ndo_get_stats64(),
            "partial": dev.partial_sent}


def _fake_run(mode: str, tx_csum: bool, seed: int, count: int = 60):
    """One sender on a fresh fake network: frames a's device sent, and a's counters."""
    net = FakeNet()
    a = net.host("a", "198.18.0.1/24", tx_csum=tx_csum)
    b = net.host("b", "198.18.0.2/24")
    rx = b.socket(SOCK_DGRAM)
    rx.bind(("0.0.0.0", 9000))
    s = a.socket(SOCK_DGRAM)
    s.bind(("0.0.0.0", 5555))
    s.connect(("198.18.0.2", 9000))
    s._tx_fast = txfast.select(mode)
    s.sendmsg(b"resolve", None)  # ARP first: the neighbour becomes REACHABLE
    net.settle()
    rng = random.Random(seed)
    got: list[bytes] = []
    for k in range(count):
        if k % 7 == 0:
            s.setsockopt(IPPROTO_IP, IP_TOS, rng.choice([0, 0x10, 0x08, 0x04, 0xB8, 0x02]))
            s.setsockopt(IPPROTO_IP, IP_TTL, rng.randint(1, 255))
        n = rng.choice([0, 1, 2, 17, 18, 255, 1000, 1471, 1472, rng.randint(0, 1472)])
        s.sendmsg(bytes(rng.getrandbits(8) for _ in range(n)), None)
        net.settle()
        while rx.poll() & 1:
            got.append(rx.recvmsg(4000)[0])
    s.sendmsg(b"x" * 3000, None)  # too big for the MTU: the slow path fragments
    net.settle()
    while rx.poll() & 1:
        got.append(rx.recvmsg(4000)[0])
    frames = [f for _, f in net.hubs["lan"].log if f[6:12] == a.dev.dev_addr]
    assert s.wmem == 0
    assert b.stack.snmp["UdpInCsumErrors"] == 0
    return frames, _counters(a), got


@pytest.mark.parametrize("tx_csum", [False, True])
@pytest.mark.parametrize("seed", [1, 2])
def test_fake_devices_frames_and_counters_agree(tx_csum, seed):
    runs = {m: _fake_run(m, tx_csum, seed) for m in MODES}
    frames, counters, got = runs["off"]
    assert len(frames) > 60 and got[-1] == b"x" * 3000
    for m in ("c", "py"):
        assert runs[m][0] == frames, f"{m}: frames differ from the slow path"
        assert runs[m][1] == counters, f"{m}: counters differ from the slow path"
        assert runs[m][2] == got


def _udp_frames(host):
    return [f for f in host.dev.take() if f[12:14] == b"\x08\x00" and f[23] == 17]


def _connected_sender(mode: str):
    """A fresh fake network: (net, host a, b's UDP socket on port 9, a's UDP socket connected
    to it sending through the `mode` transmit path)."""
    net = FakeNet()
    a = net.host("a", "198.18.0.1/24")
    b = net.host("b", "198.18.0.2/24")
    sink = b.socket(SOCK_DGRAM)
    sink.bind(("0.0.0.0", 9))
    s = a.socket(SOCK_DGRAM)
    s.connect(("198.18.0.2", 9))
    s._tx_fast = txfast.select(mode)
    return net, a, sink, s


def test_stale_neighbour_takes_the_slow_path_state_machine():
    for mode in MODES:
        net, a, _sink, s = _connected_sender(mode)
        s.sendmsg(b"1", None)
        net.settle()
        n = next(iter(a.inet.neigh.entries.values()))
        assert n.nud_state == NUD_REACHABLE
        s.sendmsg(b"fast", None)  # the fast path (and its cached hh) first
        n._set_state(NUD_STALE, net.clock())  # as the reachable timer does
        s.sendmsg(b"2", None)
        assert n.nud_state == NUD_DELAY  # __neigh_event_send ran
        assert len(_udp_frames(a)) == 2


def test_route_change_invalidates_the_cached_dst():
    for mode in MODES:
        net, a, _sink, s = _connected_sender(mode)
        s.sendmsg(b"1", None)
        net.settle()
        assert s._dst is not None
        a.inet.fib.remove(lambda r: r.plen == 24 and r.proto == "kernel")
        with pytest.raises(OSError) as e:
            s.sendmsg(b"2", None)
        assert e.value.errno == errno.ENETUNREACH


@pytest.mark.parametrize("mode", MODES)
def test_sndbuf_blocks_the_sender_instead_of_qdisc_drops(mode):
    net, a, _sink, s = _connected_sender(mode)
    s.setsockopt(SOL_SOCKET, SO_SNDBUF, 8192)  # doubled: 16384, 22 skbs of 768 (truesize)
    s.sendmsg(b"resolve", None)
    net.settle()
    woken = []
    s.add_wakeup(lambda sk: woken.append(sk.wmem))
    a.dev.busy = True  # the driver's ring is full: skbs wait in the qdisc, charged to s
    sent = 0
    with pytest.raises(BlockingIOError) as e:
        for _ in range(1000):
            s.sendmsg(b"d" * 18, None)
            sent += 1
    assert e.value.errno == errno.EAGAIN
    # each 18-byte datagram is charged its truesize (128 + 26 bytes of head: 768, as Linux
    # charges), so the sender stops once SO_SNDBUF is reached, not at a buffer's 2 KiB
    assert sent == -(-s.sndbuf // skb_truesize_for(MAX_HEADER + 8 + 18)) and s.wmem >= s.sndbuf
    assert a.dev.qdisc.drops == 0 and not s.poll() & 4  # no POLLOUT while full
    a.dev.busy = False
    a.dev.netif_wake_queue()  # room in the ring: the qdisc runs, the driver frees the skbs
    assert s.wmem == 0 and woken and woken[0] * 2 <= s.sndbuf
    assert s.poll() & 4
    assert len(_udp_frames(a)) == sent  # every one sent, none dropped


# --- the real e1000 in-process -----------------------------------------------------------------

def _e1000_hosts(csum: bool, **cfg):
    from driver.e1000 import E1000, E1000Config
    from driver.inprocess_bus import InProcessBus
    from kstack.inet import install
    from kstack.stack import NetStack
    from nicemu import DmaMemory
    from nicemu.nic import Nic

    class Host:
        def __init__(self, nic, cidr):
            self.nic = nic
            self.stack = NetStack()
            self.inet = install(self.stack)
            self.bus = InProcessBus(nic)
            self.drv = E1000(self.bus, E1000Config(tx_csum=csum, rx_csum=False, **cfg), name="eth0")
            self.stack.register_netdev(self.drv)
            self.stack.dev_open(self.drv)
            self.inet.add_address(self.drv, cidr)

        def turn(self):
            self.drv.process(0.0)
            self.stack.run_timers()
            if self.drv.qdisc.pending():
                self.drv.qdisc.run()

        def close(self):
            self.inet.shutdown()
            self.stack.dev_close(self.drv)
            self.drv.close()
            self.bus.close()
            self.nic.mem.close()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        na = Nic(DmaMemory(4 << 20), mac="52:54:00:00:aa:01")
        nb = Nic(DmaMemory(4 << 20), mac="52:54:00:00:bb:02")
    na.connect(nb)
    return Host(na, "198.18.0.1/24"), Host(nb, "198.18.0.2/24")


def _run_until(a, b, cond, limit=10.0):
    end = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < end, "condition never held"
        a.turn()
        b.turn()


def _e1000_run(mode: str, csum: bool, seed: int, batch: bool):
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
        s.sendmsg(b"resolve", None)
        _run_until(a, b, lambda: rx.poll() & 1)
        rx.recvmsg(100)
        rng = random.Random(seed)
        sizes = []
        for k in range(40):
            if k % 5 == 0:
                s.setsockopt(IPPROTO_IP, IP_TOS, rng.choice([0, 0x10, 0x08]))
                s.setsockopt(IPPROTO_IP, IP_TTL, rng.randint(1, 255))
            n = rng.choice([0, 1, 18, 1472, rng.randint(0, 1472)])
            sizes.append(n)
            if batch and k % 4 == 0:
                a.stack.xmit_batch_begin()
            s.sendmsg(bytes(rng.getrandbits(8) for _ in range(n)), None)
            if batch and k % 4 == 3:
                a.stack.xmit_batch_end()
            if k % 8 == 7:
                _run_until(a, b, lambda: not a.drv.tx_pending())
        _run_until(a, b, lambda: len([f for f in wire if f[23] == 17]) == 41 and not a.drv.tx_pending())
        got = []
        while rx.poll() & 1:
            got.append(len(rx.recvmsg(2000)[0]))
        assert got == sizes and s.wmem == 0
        st = a.drv.stats
        drv = {k: getattr(st, k) for k in ("tx_packets", "tx_bytes", "tx_copied_bytes",
                                           "tx_csum_offload", "tx_csum_help", "tx_dropped")}
        counters = {"snmp": dict(a.stack.snmp), "skb": a.stack.pool.stats(),
                    "neigh": dict(a.inet.neigh.stats), "qdisc": a.drv.qdisc.stats(), "drv": drv}
        doorbells = st.tx_doorbells
        for x in (rx, s):
            x.close()
        return [f for f in wire if f[23] == 17], counters, doorbells
    finally:
        a.close()
        b.close()
        assert a.stack.pool.live == 0


@pytest.mark.parametrize("csum", [True, False])
def test_e1000_frames_and_counters_agree(csum):
    runs = {m: _e1000_run(m, csum, 7, batch=False) for m in MODES}
    frames, counters, doorbells = runs["off"]
    for m in ("c", "py"):
        assert runs[m][0] == frames, f"{m}: frames differ on the wire"
        assert runs[m][1] == counters, f"{m}: counters differ"
        assert runs[m][2] == doorbells  # one per frame without a batch, as the slow path


def test_e1000_batch_rings_one_doorbell_per_batch():
    off = _e1000_run("off", True, 3, batch=False)
    for m in ("c", "py"):
        frames, counters, doorbells = _e1000_run(m, True, 3, batch=True)
        assert frames == off[0] and counters == off[1]
        assert doorbells < off[2]  # xmit_more inside a batch: TDT once per batch


# --- the compiled e1000 transmit (driver/_e1000tx.pyx) against its twin ------------------------

def test_e1000_compiled_transmit_is_built():
    from driver import e1000

    assert e1000.tx_select("c") is not None, "run `python setup.py build_ext --inplace`"
    assert e1000.tx_select("py") is None


def _tx_state(h) -> dict:
    drv = h.drv
    ring, pool = drv.tx_ring, drv.tx_pool
    return {"desc": bytes(ring.desc), "dma": bytes(drv._mem.view(pool.base, pool._stride * pool.count)),
            "stats": drv.stats.as_dict(), "stopped": drv.queue_stopped, "counters": dict(drv.counters),
            "ntu": ring.next_to_use, "ntc": ring.next_to_clean, "watch": list(ring.next_to_watch),
            "addrs": list(ring.buffer_addr), "free": list(pool._free), "skb": h.stack.pool.stats(),
            "pending": drv._tx_doorbell_pending, "irq": (drv._irq_tx_packets, drv._irq_tx_bytes),
            "ring_skbs": [None if x is None else x.tobytes() for x in ring.skb]}


def _drv_tx_run(compiled: bool, csum: bool, seed: int, **cfg) -> list:
    """Random frames straight into the driver (odd lengths, several descriptors per frame,
    CHECKSUM_PARTIAL offloaded or helped, xmit_more, a ring that fills and stops the queue),
    the device sending them and the TX clean freeing them: the state after every step."""
    from driver import e1000
    from kstack.skbuff import CHECKSUM_PARTIAL

    a, b = _e1000_hosts(csum, **cfg)
    a.drv.tx_c = e1000.tx_select("c" if compiled else "py")
    freed: list[int] = []
    states = []
    try:
        _run_until(a, b, lambda: a.drv.carrier and b.drv.carrier)
        rng = random.Random(seed)
        busy = 0
        for k in range(160):
            n = rng.choice([13, 14, 15, 60, 61, 300, 1513, 1514, 1518, 1519, 3000, rng.randint(14, 1514)])
            skb = a.stack.pool.alloc(n, 128)
            off = skb.put(n)
            skb.buf[off:off + n] = bytes(rng.getrandbits(8) for _ in range(n))
            if n >= 40 and rng.random() < 0.6:
                skb.ip_summed = CHECKSUM_PARTIAL
                skb.csum_start = skb.data + rng.choice([14, 34, 20, 300])
                skb.csum_offset = rng.choice([6, 16])
            skb.destructor = lambda x, k=k: freed.append(k)
            r = a.drv.ndo_start_xmit(skb, rng.random() < 0.7)
            if r:
                busy += 1
                skb.drop(SkbDropReason.QDISC_DROP)
            if rng.random() < 0.15:
                a.drv.ndo_flush_xmit()
            if rng.random() < 0.04:
                a.drv.clean_tx_irq()
            states.append(_tx_state(a))
        a.drv.ndo_flush_xmit()
        _run_until(a, b, lambda: not a.drv.tx_pending())
        states.append(_tx_state(a))
        states.append(freed)
        if cfg:  # the small ring fills: the queue stops, answers BUSY and wakes on clean
            assert busy and a.drv.stats.tx_queue_stops and a.drv.stats.restart_queue
        assert a.drv.stats.tx_dropped > 0 if not cfg.get("long_packets") else True
        return states
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("csum", [True, False])
@pytest.mark.parametrize("cfg", [{}, {"tx_buffer_len": 512, "tx_ring_size": 64},
                                 {"long_packets": True, "tx_ring_size": 64}])
def test_e1000_compiled_transmit_agrees_with_its_twin(csum, cfg):
    twin = _drv_tx_run(False, csum, 5, **cfg)
    comp = _drv_tx_run(True, csum, 5, **cfg)
    assert len(twin) == len(comp)
    for k, (x, y) in enumerate(zip(twin, comp)):
        assert x == y, f"step {k}: {[f for f in x if x[f] != y[f]] if isinstance(x, dict) else 'freed order'}"


def test_compiled_skb_alloc_agrees_with_the_pool():
    """The compiled send path's alloc_skb + skb_reserve: the same fields, buffers and pool
    counters as SkbPool.alloc, from the cache and without it."""
    from kstack import _txfast
    from kstack.skbuff import SkBuff, SkbPool

    pools = SkbPool(max_cached=3), SkbPool(max_cached=3)
    for k, (size, head) in enumerate([(26, 128), (0, 0), (1500, 128), (5000, 128), (26, 128)] * 3):
        x, y = pools[0].alloc(size, head), _txfast.skb_alloc(pools[1], size, head)
        assert type(y) is SkBuff
        for f in SkBuff.__slots__:
            vx, vy = getattr(x, f), getattr(y, f)
            if f == "pool":
                assert vx is pools[0] and vy is pools[1]
            elif f == "shinfo":
                assert (vx.buf, vx.dataref) == (vy.buf, vy.dataref)
            else:
                assert vx == vy, f
        if k % 2:
            x.consume()
            y.consume()
        assert pools[0].stats() == pools[1].stats()


def _skbs_handed_to_the_driver(mode: str, batched: bool) -> list[dict]:
    """Every field of each sk_buff the send path hands to the e1000's transmit (identities
    as what they are: the socket, the device, the pool, the destructor's name)."""
    from driver import e1000
    from kstack.skbuff import SkBuff
    from kstack.syscall.channel import pack_mmsg

    a, b = _e1000_hosts(True)
    seen: list[dict] = []
    real = e1000.tx_select("c")

    class Recorder:
        @staticmethod
        def xmit(dev, skb, more):
            f = {k: getattr(skb, k) for k in SkBuff.__slots__}
            f.update(pool=f["pool"] is a.stack.pool, dev=f["dev"] is a.drv, sk=f["sk"] is s,
                     destructor=getattr(f["destructor"], "__name__", "").removesuffix("_c"), more=more,
                     shinfo=(bytes(skb.shinfo.buf[skb.data:skb.tail]), skb.shinfo.dataref, len(skb.shinfo.buf)))
            seen.append(f)
            return real.xmit(dev, skb, more)

        clean_tx = staticmethod(real.clean_tx)

    try:
        _run_until(a, b, lambda: a.drv.carrier and b.drv.carrier)
        rx = b.stack.socket(2, SOCK_DGRAM)
        rx.bind(("0.0.0.0", 9000))
        s = a.stack.socket(2, SOCK_DGRAM)
        s.bind(("0.0.0.0", 5555))
        s.connect(("198.18.0.2", 9000))
        s._tx_fast = txfast.select(mode)
        s.sendmsg(b"resolve", None)
        _run_until(a, b, lambda: not a.drv.tx_pending())
        s.sendmsg(b"neigh", None)  # the dst's neighbour is cached from here on
        _run_until(a, b, lambda: not a.drv.tx_pending())
        a.drv.tx_c = Recorder
        dgs = [b"", b"x" * 18, bytes(range(200)), b"y" * 1472]
        for tos in (0, 0x10):
            s.setsockopt(IPPROTO_IP, IP_TOS, tos)
            if batched:
                a.stack.xmit_batch_begin()
                assert s.sendmmsg_fast(pack_mmsg(dgs), len(dgs)) == len(dgs)
                a.stack.xmit_batch_end()
            else:
                for d in dgs:
                    s.sendmsg(d, None)
            _run_until(a, b, lambda: not a.drv.tx_pending())
        a.drv.tx_c = real
        s.close()
        rx.close()
        return seen
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("batched", [False, True])
def test_compiled_send_builds_the_same_skbs_as_its_twin(batched):
    """The compiled loop writes the sk_buff's fields straight into its slots
    (kstack/_slots.pxd): the same values as the twin's setattrs, field by field."""
    twin = _skbs_handed_to_the_driver("py", batched)
    comp = _skbs_handed_to_the_driver("c", batched)
    assert len(twin) == len(comp) == 8
    for x, y in zip(twin, comp):
        x.pop("tstamp"), y.pop("tstamp")  # the clock
        assert x == y
    assert comp[0]["truesize"] == 768 and comp[0]["destructor"] == "sock_wfree"
