"""A kernel-bypass poll-mode driver for the 82540EM, in the style of DPDK's PMDs and ixy.

The application owns the device: its rings and a pool of packet buffers live in the DMA memory
of its own process, and it busy-polls descriptors instead of taking interrupts.

    pmd = Pmd(bus)                            # probe, rings, mempool, RX/TX on, IMS = 0
    mbufs = pmd.rx_burst(32)                  # zero copy: each mbuf IS an RX buffer
    pmd.tx_burst(mbufs)                       # ... and is sent from where it lies
    pmd.rx_burst_into(handle, 64)             # handle(burst): Python once per burst

Fast path (driver/_pmd.pyx, reference driver/pmd_ref.py): descriptors read DD first; each
taken buffer is replaced at once and RDT is written once per burst (only once rx_free_thresh
descriptors are due); TX sets RS on one descriptor per tx_rs_thresh batch and reclaims whole
batches after their DD; no interrupt and no register read, ever - the counting bus proves it.
Slow path, here: bring-up through driver.hw, statistics (stats_update reads the device's
counters), and adaptive mode (ixy's): poll while traffic flows, after `idle_polls` empty polls
arm RXT0 in IMS and sleep on the interrupt eventfd, then mask it again and poll.
"""
from __future__ import annotations

import warnings
from array import array
from dataclasses import dataclass, fields
from typing import Callable, Iterator, Sequence

from driver import hw
from driver.bus import Bus, BusError
from driver.dma_alloc import DmaAllocator
from driver.mempool import DATA_ROOM, Mbuf, Mempool
from driver.pmd_ref import RefCore
from nicemu import tracepoint
from nicemu import regs
from nicemu.regs import Icr
from wire.ethernet import ETH_FCS_LEN, EtherType
from wire.mac import parse_mac

__all__ = ["Pmd", "PmdStats", "Burst", "CountingBus", "MODES", "ENGINES", "PRESENCE_CHECK"]

MODES = ("poll", "adaptive")
ENGINES = ("auto", "cython", "python")
RING_ALIGN = 128  # RDBAL/TDBAL need 16; a cache-line pair keeps descriptors off shared lines
PRESENCE_CHECK = 0.1  # seconds between looks at the transport from a polling loop (check_present)


class CountingBus:
    """A Bus that counts the register reads and writes passing through it.

    The PMD talks to the device only through one of these, so "no register read on the fast
    path" is a number a test or a benchmark can check, whatever transport is underneath.
    """

    def __init__(self, bus: Bus) -> None:
        self.inner = bus
        self.mem = bus.mem
        self.reads = 0
        self.writes = 0

    def read32(self, offset: int) -> int:
        self.reads += 1
        return self.inner.read32(offset)

    def write32(self, offset: int, value: int) -> None:
        self.writes += 1
        self.inner.write32(offset, value)

    def config_read(self, offset: int, size: int = 4) -> int:
        return self.inner.config_read(offset, size)

    def config_write(self, offset: int, value: int, size: int = 4) -> None:
        self.inner.config_write(offset, value, size)

    def irq_fd(self) -> int:
        return self.inner.irq_fd()

    def wait_irq(self, timeout: float | None) -> bool:
        return self.inner.wait_irq(timeout)

    def reset(self) -> None:
        self.inner.reset()

    def check_present(self) -> None:
        """BusError if the transport is gone; a bus without one (InProcessBus) has none to lose."""
        check = getattr(self.inner, "check_present", None)
        if check is not None:
            check()

    def close(self) -> None:
        self.inner.close()


@dataclass
class PmdStats:
    """rte_eth_stats: what rte_eth_stats_get reports for one port."""

    ipackets: int = 0  # frames handed to the application
    opackets: int = 0  # frames queued for transmission
    ibytes: int = 0  # their bytes (FCS stripped by the device: RCTL.SECRC)
    obytes: int = 0
    imissed: int = 0  # frames the device dropped for want of RX buffers (MPC)
    ierrors: int = 0  # bad frames: the device's error counters plus error descriptors dropped
    oerrors: int = 0  # frames the device failed to send (none on a full-duplex link)
    rx_nombuf: int = 0  # RX refills that found the mempool empty

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Burst:
    """The frames of one rx_burst_into call, handed to the application's callback.

    It wraps the PMD's preallocated index array: no Python object exists per packet unless
    the callback asks for one (`burst[i]`). Valid only during the callback.
    """

    __slots__ = ("pool", "indices", "n")

    def __init__(self, pool: Mempool, indices: array, n: int) -> None:
        self.pool = pool
        self.indices = indices  # mbuf indices in indices[0:n]
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Mbuf:
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return Mbuf(self.pool, self.indices[i % self.n])

    def __iter__(self) -> Iterator[Mbuf]:
        pool = self.pool
        return (Mbuf(pool, i) for i in self.indices[: self.n])

    def data(self, i: int) -> memoryview:
        """Frame i's bytes, zero copy, without making an Mbuf."""
        p, idx = self.pool, self.indices[i]
        return p.mem.view(p.addr + idx * p.buf_size + p.data_off[idx], p.data_len[idx])

    def lengths(self) -> list[int]:
        dl = self.pool.data_len
        return [dl[i] for i in self.indices[: self.n]]


def _core_class(engine: str):
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "python":
        return RefCore
    try:
        from driver._pmd import Core
    except ImportError:
        if engine == "cython":
            raise ImportError("driver/_pmd.pyx is not built: cythonize -i -3 driver/_pmd.pyx") from None
        warnings.warn("driver._pmd is not built; the PMD runs on the slow pure-Python core",
                      RuntimeWarning, stacklevel=3)
        return RefCore
    return Core


class Pmd:
    """One port driven from user space: one RX and one TX queue and their mempool.

    `bus`: the device (InProcessBus or VfioUserBus); the PMD takes its DMA memory for rings and
    buffers. `pool_size` defaults to both rings plus room for the application's bursts.
    `mode`: "poll" (never an interrupt) or "adaptive" (sleep on RXT0 when idle).
    `rx_free_thresh`: RDT is written when this many RX descriptors wait to go back (default 32);
    `tx_rs_thresh`: RS on every this-many TX descriptors, the reclaim batch (default 32).
    """

    def __init__(self, bus: Bus, rx_count: int = 512, tx_count: int = 512, pool_size: int | None = None,
                 *, mode: str = "poll", engine: str = "auto", burst: int = 64,
                 rx_free_thresh: int | None = None, tx_rs_thresh: int | None = None, idle_polls: int = 1000,
                 sleep_timeout: float = 0.5, promisc: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 1 <= burst <= rx_count:
            raise ValueError(f"burst must be in 1..{rx_count}, got {burst}")
        core_cls = _core_class(engine)
        self.bus = CountingBus(bus)
        self.mode = mode
        self.burst = burst
        self.idle_polls = idle_polls
        self.sleep_timeout = sleep_timeout
        if pool_size is None:
            pool_size = rx_count + tx_count + 2 * burst + 256
        if rx_free_thresh is None:  # DPDK's default 32, smaller for small rings
            rx_free_thresh = max(1, min(32, rx_count // 2))
        if tx_rs_thresh is None:  # 32, or the largest divisor of the ring size up to half of it
            tx_rs_thresh = max(d for d in range(1, min(32, tx_count // 2) + 1) if tx_count % d == 0)
        self.mac = hw.probe(self.bus)  # bus master, CTRL.RST, interrupts masked, MAC filters

        self._alloc = DmaAllocator(bus.mem)
        self._dma: list[int] = []
        try:
            rx_ring = self._dma_alloc(rx_count * regs.DESC_SIZE)
            tx_ring = self._dma_alloc(tx_count * regs.DESC_SIZE)
            self.pool = Mempool.allocate(self._alloc, pool_size)
            self._dma.append(self.pool.addr)
            self.core = core_cls(self.pool, rx_ring, rx_count, tx_ring, tx_count, self.bus.write32,
                                 rx_free_thresh=rx_free_thresh, tx_rs_thresh=tx_rs_thresh)
            self.engine = "python" if core_cls is RefCore else "cython"
            hw.setup_rx_ring(self.bus, rx_ring, rx_count)
            hw.setup_tx_ring(self.bus, tx_ring, tx_count)
            # RXT0 the moment a frame lands (used only by adaptive sleep); no ITR hold-off
            hw.set_moderation(self.bus, itr=0, rdtr=0, radv=0, tidv=0, tadv=0)
            hw.enable_tx(self.bus)
            rdt = self.core.rx_init()
            # SECRC: buffers hold the frame without FCS, so a received mbuf can be sent as is
            self.rctl = hw.enable_rx(self.bus, DATA_ROOM, strip_fcs=True, promisc=promisc)
            self.bus.write32(regs.RDT, rdt)
        except BaseException:
            try:
                hw.reset(self.bus)  # the device may already point at the rings: make it forget
            except BusError:
                pass
            self._free_dma()
            raise
        self._rx_out = array("I", [0]) * rx_count
        self._tx_idx = array("I", [0]) * tx_count
        self._closed = False
        # software and device counters (see stats(), xstats())
        self._hw: dict[str, int] = {}  # accumulated device statistics registers
        self.empty_polls = 0
        self.sleeps = 0
        self.interrupts = 0
        self._idle_run = 0

    def _dma_alloc(self, size: int) -> int:
        addr = self._alloc.alloc_zeroed(size, RING_ALIGN)
        self._dma.append(addr)
        return addr

    def _free_dma(self) -> None:
        for addr in self._dma:
            self._alloc.free(addr)
        self._dma.clear()

    # --- receive ---------------------------------------------------------------------------
    def rx_burst_idx(self, out: array, n: int) -> int:
        """Fast path: up to n received mbuf indices into out[0:count]; no objects made."""
        got = self.core.rx_burst(out, n)
        if not got:
            self._idle()
        else:
            self._idle_run = 0
        return got

    def rx_burst(self, n: int | None = None) -> list[Mbuf]:
        """Up to n received frames as Mbufs (the caller frees them or sends them on)."""
        n = self.burst if n is None else min(n, len(self._rx_out))
        got = self.rx_burst_idx(self._rx_out, n)
        pool = self.pool
        return [Mbuf(pool, i) for i in self._rx_out[:got]]

    def rx_burst_into(self, callback: Callable[[Burst], object], n: int | None = None,
                      *, free: bool = True) -> int:
        """Take one burst and call `callback(burst)` once for all of it; returns its size.

        With `free` the burst's mbufs go back to the pool after the callback (keep one with
        mbuf.ref()); pass free=False when the callback sends them on or keeps them.
        """
        n = self.burst if n is None else min(n, len(self._rx_out))
        out = self._rx_out
        got = self.rx_burst_idx(out, n)
        if got:
            try:
                callback(Burst(self.pool, out, got))
            finally:
                if free:
                    self.core.free_bulk(out, got)
        return got

    def _idle(self) -> None:
        """An empty poll. In adaptive mode, enough of them in a row put the port to sleep."""
        self.empty_polls += 1
        self._idle_run += 1
        if self.mode == "adaptive" and self._idle_run >= self.idle_polls:
            self.sleep(self.sleep_timeout)

    def sleep(self, timeout: float | None) -> bool:
        """Block until a frame arrives (True) or `timeout` passes, without burning the CPU.

        The lost-wakeup trap: a frame landing between the last empty poll and arming the
        interrupt must not be slept through. So: clear a stale RXT0 (write 1 to ICR), unmask
        RXT0, read a register, then look at the ring once more before waiting; a frame that
        came in the window is seen there, any later one raises RXT0. The read matters: the two
        writes are posted, and until the device has applied them a frame's RXT0 would still be
        cleared by the ICR write, after our last look. A read completes only after every
        earlier posted write (PCIe ordering), so it closes the window. It costs one round trip
        per sleep, off the fast path.
        """
        self._idle_run = 0
        self.core.rx_flush()  # every buffer to the device before going to sleep
        w = self.bus.write32
        w(regs.ICR, Icr.RXT0)
        w(regs.IMS, Icr.RXT0)
        self.bus.read32(regs.STATUS)  # flush the posted writes
        woke = self.core.rx_ready()
        if not woke:
            self.sleeps += 1
            woke = self.bus.wait_irq(timeout)
            if woke:
                self.interrupts += 1
                if tracepoint.enabled:
                    tracepoint.emit("pmd.irq.wake", interrupts=self.interrupts)
        w(regs.IMC, Icr.RXT0)  # back to polling: masked
        self.bus.wait_irq(0)  # drop a signal raised while we were looking (no spurious wake later)
        return woke or self.core.rx_ready()

    # --- transmit --------------------------------------------------------------------------
    def tx_burst_idx(self, idx: array, n: int, start: int = 0) -> int:
        """Fast path: queue idx[start:start+n]; returns how many the ring took."""
        return self.core.tx_burst(idx, n, start)

    def tx_burst(self, mbufs: Sequence[Mbuf]) -> int:
        """Queue mbufs for transmission (zero copy); returns how many were taken.

        Taken mbufs belong to the driver until the device is done with them; the rest
        (mbufs[sent:]) are still the caller's to retry or free.
        """
        n = len(mbufs)
        if n > len(self._tx_idx):
            n = len(self._tx_idx)
        idx = self._tx_idx
        pool = self.pool
        for k in range(n):
            m = mbufs[k]
            if m.pool is not pool:
                raise ValueError(f"{m!r} is not from this port's mempool")
            idx[k] = m.idx
        return self.core.tx_burst(idx, n, 0)

    def alloc(self) -> Mbuf | None:
        """An empty mbuf from this port's pool (to build a frame in), or None."""
        return self.pool.alloc()

    def alloc_bulk(self, out: array, n: int, length: int = 0) -> int:
        """n mbufs of data length `length` into out[0:n], all or none: n or 0."""
        return self.core.alloc_bulk(out, n, length)

    def free_bulk(self, idx: array, n: int, start: int = 0) -> None:
        self.core.free_bulk(idx, n, start)

    def send(self, frame: bytes | bytearray | memoryview) -> bool:
        """Copy one frame into an mbuf and queue it (a convenience; not the fast path)."""
        m = self.pool.alloc()
        if m is None:
            return False
        m.set_data(frame)
        if self.tx_burst([m]) == 1:
            return True
        m.free()
        return False

    def tx_reclaim(self) -> int:
        """Free the buffers of completed TX batches now (tx_burst also does it)."""
        return self.core.tx_reclaim()

    def tx_room(self) -> int:
        """Descriptors tx_burst could fill now (completed batches reclaimed first).

        A generator that waits for room for a whole burst writes TDT once per burst; one
        that sends whatever fits rings the doorbell for every batch the device frees, and
        over vfio-user every doorbell is a message the emulator must handle."""
        return self.core.tx_room()

    # --- statistics --------------------------------------------------------------------------
    def stats_update(self) -> dict[str, int]:
        """Read (and so clear) the device's statistics registers into running totals.

        Off the fast path: these are register reads, round trips over vfio-user. Call it
        from a timer (every second or so), as DPDK applications call rte_eth_stats_get.
        """
        for name, value in hw.read_stats(self.bus).items():
            self._hw[name] = self._hw.get(name, 0) + value
        return dict(self._hw)

    def stats(self) -> PmdStats:
        """rte_eth_stats_get: software counters plus the device totals of the last stats_update."""
        c, h = self.core, self._hw
        hw_errors = sum(h.get(k, 0) for k in ("CRCERRS", "ALGNERRC", "SYMERRS", "RXERRC", "RUC", "ROC", "RJC"))
        return PmdStats(ipackets=c.ipackets, opackets=c.opackets, ibytes=c.ibytes, obytes=c.obytes,
                        imissed=h.get("MPC", 0), ierrors=c.ierrors + hw_errors, oerrors=0,
                        rx_nombuf=c.rx_nombuf)

    def xstats(self) -> dict[str, int]:
        """Everything else, like rte_eth_xstats: the driver's own counters and the device's."""
        c = self.core
        out = {
            "rx_doorbells": c.rx_doorbells, "tx_doorbells": c.tx_doorbells,
            "rx_desc_errors": c.ierrors, "rx_bad_length": c.rx_bad_length, "tx_in_flight": c.tx_in_flight(),
            "mmio_reads": self.bus.reads, "mmio_writes": self.bus.writes,
            "empty_polls": self.empty_polls, "sleeps": self.sleeps, "interrupts": self.interrupts,
            "mempool_available": self.pool.available, "mempool_in_use": self.pool.in_use,
        }
        out.update({f"hw_{k.lower()}": v for k, v in self._hw.items()})
        inner = getattr(self.bus, "inner", None)
        if getattr(inner, "doorbell_page", False):  # VfioUserBus with the doorbell page on
            out["page_doorbells"] = inner.page_doorbells  # tails written to the page alone
            out["page_wakeups"] = inner.page_wakeups  # ... and also sent: the emulator slept
        return out

    def stats_reset(self) -> None:
        """Zero every counter (rte_eth_stats_reset); the device's are cleared by reading them."""
        hw.read_stats(self.bus)
        self._hw.clear()
        c = self.core
        c.ipackets = c.ibytes = c.opackets = c.obytes = c.ierrors = c.rx_nombuf = 0
        c.rx_doorbells = c.tx_doorbells = c.rx_bad_length = 0
        self.empty_polls = self.sleeps = self.interrupts = 0

    def link_up(self) -> bool:
        return hw.link_up(self.bus)

    def check_present(self) -> None:
        """BusError if the device is gone (its emulator died), found without waiting.

        The fast path touches the transport only for doorbells, so a port that polls an idle
        ring would hear of a dead emulator only at its next register read. Call this from the
        loop every PRESENCE_CHECK seconds (rte_eth_dev_is_removed): one non-blocking poll() of
        the socket, never one per burst.
        """
        self.bus.check_present()

    # --- teardown ---------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the device (reset: it forgets the rings) and give the memory back.

        The bus stays open: it belongs to the caller."""
        if self._closed:
            return
        self._closed = True
        try:
            hw.disable_rx(self.bus)
            hw.disable_tx(self.bus)
            hw.reset(self.bus)  # no DMA into buffers we are about to reuse
        except BusError:
            pass  # the device (or its emulator process) is gone: nothing left to stop
        finally:
            self.core.release_all()
            self._free_dma()

    def __enter__(self) -> "Pmd":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Pmd(mac={self.mac}, mode={self.mode}, engine={self.engine}, "
                f"rx={self.core.rx_count}, tx={self.core.tx_count}, pool={self.pool.num_bufs})")


# --- a PMD application in its own process (tests, demo) -----------------------------------------

def _swap_macs(burst: Burst) -> None:
    """Turn each frame around (destination <-> source), in place: the echo role."""
    for i in range(len(burst)):
        d = burst.data(i)
        d[0:6], d[6:12] = bytes(d[6:12]), bytes(d[0:6])
        if tracepoint.enabled:
            tracepoint.emit("pmd.app.echo", mbuf=burst.indices[i], len=len(d), swapped="dst<->src", copied_bytes=0)


FCS_LEN = ETH_FCS_LEN  # the device appends it (TX descriptors carry IFCS) and strips it on RX (SECRC)
MIN_FRAME, MAX_FRAME = 64, 1518  # Ethernet frame sizes on the wire, FCS included


def main(argv: list[str] | None = None) -> int:
    """`python -m driver.pmd --socket PATH`: a bypass application on one device.

    Applications (--app): `count` (also called `sink`) counts and drops what arrives;
    `echo` sends every frame back with the addresses swapped (zero copy: the received buffer
    is transmitted); `gen` also sends `--size`-byte frames to `--dst` as fast as the ring
    takes them (`--count` of them, or without end). Reports JSON lines on stdout: "up",
    "stats" every --stats-interval seconds (and on SIGUSR1), "sent" once gen has handed its
    --count frames to the device, "done" on SIGTERM/SIGINT or after --seconds, "error"
    (exit 1; 2 for bad options) when the device cannot be reached or goes away: the loop
    looks at the transport every 0.1 s, so a dead emulator ends the process within a second
    whatever --stats-interval says.

    A generator never sleeps while it has frames to send: it waits for TX room by polling its
    ring in memory, whatever --mode says (an RX interrupt it might sleep on may never come).
    In adaptive mode it sleeps on RX only once its --count frames are out.

    --app, --seconds and --stats-interval are named as in `python -m driver.kernel`; the older
    spellings --role, --duration and --interval are accepted too.
    """
    import argparse
    import json
    import resource
    import signal
    import textwrap
    import time

    from driver.vfio_user_client import VfioUserBus

    doc = main.__doc__.split("\n\n")
    class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        """Every option with its default; the epilog as written."""

    ap = argparse.ArgumentParser(prog="python -m driver.pmd", description=doc[0],
                                 epilog="\n\n".join(textwrap.dedent(p) for p in doc[1:]),
                                 formatter_class=HelpFormatter)
    ap.add_argument("--socket", required=True, default=argparse.SUPPRESS, metavar="PATH",
                    help="the device's vfio-user socket")
    ap.add_argument("--mode", choices=MODES, default="adaptive",
                    help="poll: busy-poll the RX ring always; adaptive: sleep on the RX interrupt "
                         "after 1000 empty polls (gen: only once its --count is sent)")
    ap.add_argument("--app", "--role", dest="role", choices=("count", "sink", "echo", "gen"), default="count",
                    help="count (or sink): count and drop; echo: send every frame back; gen: send frames")
    ap.add_argument("--dst", default="ff:ff:ff:ff:ff:ff", metavar="MAC", help="gen: destination MAC")
    ap.add_argument("--size", type=int, default=MIN_FRAME, metavar="BYTES",
                    help=f"gen: frame size on the wire including the 4-byte FCS, {MIN_FRAME}..{MAX_FRAME} "
                         f"({MIN_FRAME}: 60 bytes of header and payload + FCS)")
    ap.add_argument("--count", type=int, default=0, metavar="N",
                    help="gen: frames to send, then keep receiving (0: send until stopped)")
    ap.add_argument("--stats-interval", "--interval", dest="interval", type=float, default=1.0, metavar="S",
                    help="seconds between 'stats' lines")
    ap.add_argument("--seconds", "--duration", dest="seconds", type=float, default=0.0, metavar="S",
                    help="stop after this long (0: run until SIGTERM/SIGINT)")
    ap.add_argument("--no-doorbell-page", action="store_true",
                    help="do not ask for the doorbell page: every TDT/RDT write is a REGION_WRITE "
                         "message (by default the page is used when the emulator offers it; "
                         "docs/transport.md)")
    ap.add_argument("--engine", choices=ENGINES, default="auto",
                    help="the ring code: cython, python (the reference) or auto (cython if built)")
    args = ap.parse_args(argv)
    if args.role == "count":
        args.role = "sink"
    if not MIN_FRAME <= args.size <= MAX_FRAME or args.count < 0 or args.interval <= 0:
        problem = (f"--size {args.size} outside {MIN_FRAME}..{MAX_FRAME} (bytes on the wire, FCS included)"
                   if not MIN_FRAME <= args.size <= MAX_FRAME else
                   f"--count {args.count} is negative" if args.count < 0 else "--interval must be positive")
        print(json.dumps({"event": "error", "message": problem}), flush=True)
        return 2
    try:
        dst = parse_mac(args.dst)
    except ValueError as e:
        print(json.dumps({"event": "error", "message": f"--dst: {e}"}), flush=True)
        return 2

    stop = False
    report = False

    def on_stop(*_: object) -> None:
        nonlocal stop
        stop = True

    def on_usr1(*_: object) -> None:
        nonlocal report
        report = True

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGUSR1, on_usr1)

    def emit(event: str, pmd: Pmd, **extra: object) -> None:
        ru = resource.getrusage(resource.RUSAGE_SELF)  # for the demo's table: what polling costs
        line = {"event": event, **pmd.stats().as_dict(), **pmd.xstats(), **extra,
                "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 3),
                "voluntary_ctxt_switches": ru.ru_nvcsw, "nonvoluntary_ctxt_switches": ru.ru_nivcsw}
        print(json.dumps(line), flush=True)

    try:
        bus = VfioUserBus(args.socket, mem_size=8 << 20, doorbell_page=not args.no_doorbell_page)
    except BusError as e:
        print(json.dumps({"event": "error", "message": str(e)}), flush=True)
        return 1
    try:
        pmd = Pmd(bus, mode=args.mode, engine=args.engine, sleep_timeout=min(0.5, args.interval))
        print(json.dumps({"event": "up", "mac": pmd.mac, "mode": pmd.mode, "engine": pmd.engine}), flush=True)
        echo = args.role == "echo"
        gen = args.role == "gen"
        gen_left = (args.count or -1) if gen else 0  # -1: without end
        gen_idx = array("I", [0]) * pmd.burst
        frame = dst + parse_mac(pmd.mac) + int(EtherType.LOCAL_EXP1).to_bytes(2, "big")
        frame += bytes(max(0, args.size - FCS_LEN - len(frame)))  # the device appends the FCS
        pool = pmd.pool

        def restore_template(burst: Burst) -> None:
            # gen: a received frame overwrote a buffer that will be sent again later
            for i in burst.indices[: len(burst)]:
                pool.mem.write(pool.buf_addr(i) + pool.headroom, frame)

        handler = {"sink": lambda burst: None, "gen": restore_template, "echo": _swap_macs}[args.role]
        if gen:
            for i in range(pool.num_bufs):  # every buffer holds the frame: sending is just a length
                pool.mem.write(pool.buf_addr(i) + pool.headroom, frame)
        if gen_left:
            pmd.mode = "poll"  # never sleep on RX while there is something to send
        start = last = time.monotonic()
        next_check = start + PRESENCE_CHECK
        while not stop:
            if echo:
                n = pmd.rx_burst_into(handler, free=False)
                if n:
                    sent = pmd.tx_burst_idx(pmd._rx_out, n)
                    pmd.free_bulk(pmd._rx_out, n - sent, sent)  # what the ring did not take
            else:
                pmd.rx_burst_into(handler)
            if gen_left:
                # a whole burst at a time (one TDT write per burst) when the ring has room for
                # it (tx_room reads descriptors in memory: waiting for room is polling, no sleep)
                want = len(gen_idx) if gen_left < 0 else min(len(gen_idx), gen_left)
                if pmd.tx_room() >= want and pmd.alloc_bulk(gen_idx, want, len(frame)):
                    sent = pmd.tx_burst_idx(gen_idx, want)
                    pmd.free_bulk(gen_idx, want - sent, sent)
                    if gen_left > 0:
                        gen_left -= sent
                if gen_left == 0:  # all --count frames are on the ring, TDT written: the device sends them
                    emit("sent", pmd, seconds=round(time.monotonic() - start, 6))
                    pmd.mode = args.mode  # nothing more to send: adaptive may sleep now
            now = time.monotonic()
            if now >= next_check:  # a dead emulator is found here, whatever --interval says
                next_check = now + PRESENCE_CHECK
                pmd.check_present()
            if report or now - last >= args.interval:
                report = False
                last = now
                pmd.stats_update()
                emit("stats", pmd)
            if args.seconds and now - start >= args.seconds:
                break
        pmd.stats_update()
        emit("done", pmd, seconds=round(time.monotonic() - start, 3))
        pmd.close()
    except BusError as e:  # the emulator went away: say so, as driver.kernel does
        print(json.dumps({"event": "error", "message": f"device gone: {e}"}), flush=True)
        return 1
    finally:
        bus.close()
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
