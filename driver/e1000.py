"""The kernel-style e1000 driver: a small, careful version of Linux's e1000_main.c.

It talks to the device only through a `driver.bus.Bus` (over vfio-user to an emulator
process, or in-process for tests) and keeps everything else in DMA memory it allocates:
the descriptor rings and the packet buffers.

Where the Linux functions went:

    e1000_probe / e1000_open      E1000.open          (hw.probe, rings, RCTL/TCTL, IMS)
    e1000_intr                    E1000.intr          top half: read ICR (= acknowledge)
    e1000_clean                   E1000.poll          NAPI poll: TX without budget, RX within
    (pre-NAPI e1000_intr loop)    E1000.bottom_half   interrupt mode: everything, IMS stays on
    e1000_clean_rx_irq            E1000.clean_rx_irq
    e1000_alloc_rx_buffers        E1000.alloc_rx_buffers   one RDT write per group
    e1000_xmit_frame              E1000.xmit          TDT once per batch (xmit_more)
    e1000_maybe_stop_tx           E1000.maybe_stop_tx
    e1000_clean_tx_irq            E1000.clean_tx_irq  free after DD, wake the queue
    e1000_set_itr/update_itr      E1000.set_itr       dynamic ITR ("dynamic", "conservative")
    e1000_watchdog                E1000.watchdog      statistics (carrier: E1000.process)
    e1000_update_stats            E1000.update_stats  clear-on-read registers accumulated

E1000 is a `kstack.netdevice.NetDevice` (net_device_ops): the stack binds to that
interface, never to this class. The kernel's contexts are the event loop's: it waits on
`irq_fd()`, calls `handle_irq()` (the top half), then `run_softirq(budget)` while
`softirq_pending()` (the bottom half in interrupt mode, the NAPI poll, which stays scheduled
without interrupts while it has a full budget), and `run_timers(now)` for the watchdog.
`E1000.process(timeout)` is one turn of that loop for a caller that owns no loop (tests, the
demo, `driver.kernel`).

Received frames are copied out of the DMA buffer into an sk_buff from the stack's pool
(netdev_alloc_skb: Linux's copybreak, for every frame), and the buffer goes straight back to
the RX buffer pool, from which the refill takes buffers for the descriptors it gives back.
Sent sk_buffs are copied into DMA buffers and freed (consumed) once the device wrote DD.
"""
from __future__ import annotations

import enum
import os
import time
from dataclasses import dataclass, field, fields
from typing import Callable

from driver import hw
from driver.bus import Bus
from driver.dma_alloc import DmaAllocator, DmaBufferPool
from driver.rings import RxRing, TxRing
from kstack.dropreason import SkbDropReason
from kstack.netdevice import NETDEV_TX_BUSY, NETDEV_TX_OK, NetDevice, NetDeviceHooks, NetdevFeatures
from kstack.rxfast import select as rxfast_select
from kstack.skbuff import CHECKSUM_NONE, CHECKSUM_PARTIAL, CHECKSUM_UNNECESSARY, SkBuff
from nicemu import regs
from nicemu import tracepoint
from nicemu.regs import DESC_SIZE, RXD_STATUS, Icr, RxdErrors, RxdStatus, TxdCmd
from wire.checksum import internet_checksum
from wire.ethernet import ETH_FCS_LEN, ETH_HLEN
from wire.mac import ZERO, parse_mac

__all__ = [
    "E1000", "E1000Config", "DriverStats", "Mode", "NETDEV_TX_OK", "NETDEV_TX_BUSY", "update_itr",
    "poll_bucket_labels",
]

E1000_RX_BUFFER_WRITE = 16  # return RX buffers to the device in groups of this many
TX_WAKE_THRESHOLD = 32  # wake a stopped queue when this many descriptors are free
E1000_MAX_INTR = 10  # interrupt-mode bottom half: at most this many passes per interrupt

# Linux E1000_RXD_ERR_FRAME_ERR_MASK: errors that make a frame unusable
_FRAME_ERR_MASK = int(RxdErrors.CE | RxdErrors.SE | RxdErrors.SEQ | RxdErrors.CXE | RxdErrors.RXE)
_RXD_DD = int(RxdStatus.DD)
_RXD_EOP = int(RxdStatus.EOP)
_RXD_IXSM = int(RxdStatus.IXSM)
_RXD_TCPCS = int(RxdStatus.TCPCS)
_RXD_ERR_TCPE = int(RxdErrors.TCPE)
_RXD_ERR_IPE = int(RxdErrors.IPE)
_TXD_EOP_RS = int(TxdCmd.EOP | TxdCmd.RS)
_TXD_IFCS = int(TxdCmd.IFCS)
_TXD_IDE = int(TxdCmd.IDE)
_TXD_IC = int(TxdCmd.IC)
_ICR_LINK = int(Icr.LSC | Icr.RXSEQ)
_ICR_RXO = int(Icr.RXO)
_FCS_LEN = ETH_FCS_LEN
_VLAN_HLEN = 4  # an 802.1Q tag: the largest frame has room for one beyond the MTU
_RDT = regs.RDT
_TDT = regs.TDT
_ICR = regs.ICR

# Dynamic interrupt moderation (Linux's InterruptThrottleRate 1 and 3): each interrupt's
# traffic moves a latency range; the range picks the interrupt rate.
LOWEST_LATENCY, LOW_LATENCY, BULK_LATENCY = 0, 1, 2
ITR_FOR_RANGE = {LOWEST_LATENCY: 70000, LOW_LATENCY: 20000, BULK_LATENCY: 4000}
ITR_DYNAMIC = "dynamic"  # all three ranges
ITR_CONSERVATIVE = "conservative"  # never lowest_latency (Linux's default, 3)


def update_itr(latency_range: int, packets: int, nbytes: int) -> int:
    """e1000_update_itr: the next latency range from one interrupt's packets and bytes.
    Small sparse packets move toward lower latency, many or large ones toward bulk."""
    if packets == 0:
        return latency_range
    per = nbytes // packets
    if latency_range == LOWEST_LATENCY:
        if per > 8000:  # jumbo frames get bulk treatment
            return BULK_LATENCY
        if packets < 5 and nbytes > 512:
            return LOW_LATENCY
    elif latency_range == LOW_LATENCY:  # 50 us, 20000 interrupts/s
        if nbytes > 10000:
            if per > 8000 or packets < 10 or per > 1200:
                return BULK_LATENCY
            if packets > 35:
                return LOWEST_LATENCY
        elif per > 2000:
            return BULK_LATENCY
        elif packets <= 2 and nbytes < 512:
            return LOWEST_LATENCY
    elif latency_range == BULK_LATENCY:  # 250 us, 4000 interrupts/s
        if nbytes > 25000:
            if packets > 35:
                return LOW_LATENCY
        elif nbytes < 6000:
            return LOW_LATENCY
    return latency_range


# packets-per-poll histogram buckets (upper bounds, inclusive); the last is "the whole budget"
POLL_BUCKETS = (0, 1, 3, 7, 15, 31, 63)


class Mode(str, enum.Enum):
    INTERRUPT = "interrupt"  # every interrupt: top half + bottom half; IMS stays enabled
    NAPI = "napi"  # top half masks (IMC) and schedules a poll; IMS again when idle


@dataclass
class E1000Config:
    """Driver parameters (Linux's module parameters and ethtool -G/-C settings).

    Moderation defaults are Linux's e1000 defaults (TxIntDelay 8, TxAbsIntDelay 32,
    RxIntDelay 0, RxAbsIntDelay 8) except ITR, which is off here (Linux defaults to
    "conservative", its InterruptThrottleRate=3): `itr` is a static cap in interrupts/s, or
    "dynamic" / "conservative" for Linux's adaptive rate (e1000_set_itr), off by default so
    that every interrupt is visible.
    """

    mode: Mode | str = Mode.NAPI
    rx_ring_size: int = 256
    tx_ring_size: int = 256
    rx_buffer_len: int = 2048  # one of hw.RX_BUFFER_SIZES
    tx_buffer_len: int = 2048  # bytes per TX descriptor; a longer frame spans several
    rx_pool_buffers: int | None = None  # RX DMA buffers (default: one per descriptor)
    budget: int = 64  # NAPI weight
    itr: int | str = 0  # interrupts/s cap (ITR), 0 = off, or "dynamic" / "conservative"
    rdtr: int = 0  # RX packet timer, 1.024 us units
    radv: int = 8  # RX absolute timer
    tidv: int = 8  # TX interrupt delay (descriptors get IDE when non-zero)
    tadv: int = 32  # TX absolute delay
    rx_write_batch: int = E1000_RX_BUFFER_WRITE
    tx_wake_threshold: int = TX_WAKE_THRESHOLD
    strip_fcs: bool = False  # RCTL.SECRC; off as in Linux's e1000 (the driver trims the FCS)
    rx_csum: bool = True  # RXCSUM IPOFL | TUOFL (NETIF_F_RXCSUM)
    tx_csum: bool = True  # TX checksum insertion, legacy descriptor IC/CSO/CSS (NETIF_F_IP_CSUM)
    # software offloads of the stack above (ethtool -K gro/gso; NICEMU_GRO=0 / NICEMU_GSO=0)
    gro: bool = field(default_factory=lambda: os.environ.get("NICEMU_GRO") != "0")
    gso: bool = field(default_factory=lambda: os.environ.get("NICEMU_GSO") != "0")
    promisc: bool = False
    long_packets: bool = False  # RCTL.LPE: frames up to 16 KB
    watchdog_interval: float = 2.0  # seconds between statistics updates (e1000_watchdog)

    def __post_init__(self) -> None:
        self.mode = Mode(self.mode)
        if isinstance(self.itr, str):
            if self.itr not in (ITR_DYNAMIC, ITR_CONSERVATIVE):
                if not self.itr.isdigit():
                    raise ValueError(f"itr {self.itr!r}: an interrupt rate, '{ITR_DYNAMIC}' or '{ITR_CONSERVATIVE}'")
                self.itr = int(self.itr)
        elif self.itr < 0:
            raise ValueError(f"itr {self.itr} must not be negative")
        for name in ("rx_ring_size", "tx_ring_size"):
            n = getattr(self, name)
            if n < 8 or n % 8 or n > 4096:
                raise ValueError(f"{name} = {n}: must be a multiple of 8 in 8..4096")
        if self.rx_buffer_len not in hw.RX_BUFFER_SIZES:
            raise ValueError(f"rx_buffer_len {self.rx_buffer_len} not in {hw.RX_BUFFER_SIZES}")
        if not 256 <= self.tx_buffer_len <= 16384:
            raise ValueError(f"tx_buffer_len {self.tx_buffer_len} outside 256..16384")
        if self.budget < 1:
            raise ValueError("NAPI budget must be at least 1")
        if self.rx_write_batch < 1:
            raise ValueError("rx_write_batch must be at least 1")

    @property
    def dynamic_itr(self) -> bool:
        return isinstance(self.itr, str)

    @property
    def max_frame(self) -> int:
        """Largest frame the driver sends or accepts, without FCS."""
        return (regs.ETH_MAX_LPE if self.long_packets else regs.ETH_MAX_FCS) - _FCS_LEN


@dataclass
class DriverStats:
    """The driver's own counters (the software half of `ethtool -S`)."""

    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    rx_errors: int = 0  # frames with CE/SE/SEQ/CXE/RXE
    rx_length_errors: int = 0  # frames that spanned several buffers (dropped)
    rx_dropped: int = 0  # no receive callback
    tx_dropped: int = 0  # bad length, or no carrier (the qdisc would drop them)
    rx_copied_bytes: int = 0  # DMA buffer -> sk_buff (copybreak)
    tx_copied_bytes: int = 0  # sk_buff -> DMA buffer
    tx_csum_offload: int = 0  # frames sent with IC (the device inserts the checksum)
    tx_csum_help: int = 0  # CHECKSUM_PARTIAL done in software (skb_checksum_help)
    rx_csum_offload_good: int = 0
    rx_csum_offload_errors: int = 0
    alloc_rx_buff_failed: int = 0
    interrupts: int = 0  # top halves that found a cause in ICR
    spurious_interrupts: int = 0  # woken, but ICR was 0
    rx_overrun_interrupts: int = 0  # ICR.RXO seen
    bottom_halves: int = 0
    polls: int = 0
    poll_packets: int = 0
    napi_completes: int = 0
    tx_queue_stops: int = 0
    restart_queue: int = 0  # wakes of a stopped queue (Linux's name)
    tx_busy: int = 0  # xmit refused: queue stopped
    rx_doorbells: int = 0  # RDT writes
    tx_doorbells: int = 0  # TDT writes
    link_changes: int = 0
    poll_histogram: list[int] = field(default_factory=lambda: [0] * (len(POLL_BUCKETS) + 1))

    def as_dict(self) -> dict[str, int | float | list[int]]:
        d: dict = {f.name: getattr(self, f.name) for f in fields(self)}
        d["poll_histogram"] = list(self.poll_histogram)
        d["packets_per_poll"] = self.poll_packets / self.polls if self.polls else 0.0
        return d


def poll_bucket_labels(budget: int) -> list[str]:
    labels, lo = [], 0
    for hi in POLL_BUCKETS:
        labels.append(f"{lo}" if lo == hi else f"{lo}-{hi}")
        lo = hi + 1
    labels.append(f"{lo}+ (budget {budget})")
    return labels


class E1000(NetDevice):
    """One 82540EM driven like Linux drives it, as a `NetDevice` the stack registers.

    The layer above is whoever sets `hooks` (NetStack.register_netdev does). Without a stack,
    three callbacks stand in for it (tests, driver.kernel's small applications):
    - receive(skb): each received frame (netif_receive_skb); the receiver frees the skb;
    - on_carrier(up): link state changes (netif_carrier_on/off);
    - on_tx_wake(): the TX queue was woken after a stop (netif_wake_queue).
    Times (`clock`, next_timer, run_timers) are seconds of time.monotonic by default.
    """

    def __init__(
        self,
        bus: Bus,
        config: E1000Config | None = None,
        *,
        receive: Callable[[SkBuff], None] | None = None,
        on_carrier: Callable[[bool], None] | None = None,
        on_tx_wake: Callable[[], None] | None = None,
        allocator: DmaAllocator | None = None,
        clock: Callable[[], float] = time.monotonic,
        name: str = "eth0",
    ) -> None:
        self.config = config or E1000Config()
        cfg = self.config
        # Linux's e1000: max_frame = mtu + ETH_HLEN + ETH_FCS_LEN + VLAN_HLEN, so 1500 without LPE
        super().__init__(name, mtu=cfg.max_frame - ETH_HLEN - _VLAN_HLEN)
        self.bus = bus
        self.allocator = allocator
        self.clock = clock
        self.features = ((NetdevFeatures.IP_CSUM if cfg.tx_csum else 0)
                         | (NetdevFeatures.RXCSUM if cfg.rx_csum else 0)
                         | (NetdevFeatures.GRO if cfg.gro else 0)
                         | (NetdevFeatures.GSO if cfg.gso else 0))
        if receive is not None or on_carrier is not None or on_tx_wake is not None:
            self.set_callbacks(receive=receive, on_carrier=on_carrier, on_tx_wake=on_tx_wake)
        self.stats = DriverStats()
        self.hw_stats: dict[str, int] = {name: 0 for name in (*regs.STATS_32, *regs.STATS_64)}
        self.mac: str | None = None
        self._dev_addr = ZERO
        self.is_open = False
        self.napi_scheduled = False
        self.bh_scheduled = False
        self._link_check_pending = False
        self._discarding = False  # inside a frame that spans buffers (dropped)
        self._tx_doorbell_pending = False  # xmit_more deferred a TDT write
        self._next_watchdog = 0.0
        # dynamic ITR: the current rate and each direction's latency range, and the traffic
        # since the last interrupt (e1000_set_itr's inputs)
        self.itr = ITR_FOR_RANGE[LOW_LATENCY] if self.config.dynamic_itr else int(self.config.itr)
        self._rx_itr = self._tx_itr = LOW_LATENCY
        self._irq_rx_packets = self._irq_rx_bytes = self._irq_tx_packets = self._irq_tx_bytes = 0
        self.rx_ring: RxRing | None = None
        self.tx_ring: TxRing | None = None
        self.rx_pool: DmaBufferPool | None = None
        self.tx_pool: DmaBufferPool | None = None
        self._ring_addrs: list[int] = []
        self._mem = bus.mem
        # descriptors one frame may need (our sk_buffs are linear: one per tx_buffer_len)
        # plus 2 so the tail never touches the head: the MAX_SKB_FRAGS + 7 of Linux
        self.tx_desc_needed = -(-cfg.max_frame // cfg.tx_buffer_len) + 2
        self.tx_wake_threshold = min(max(cfg.tx_wake_threshold, self.tx_desc_needed), cfg.tx_ring_size - 1)
        self._txd_cmd = _TXD_IFCS | _TXD_EOP_RS | (_TXD_IDE if cfg.tidv else 0)
        # the receive fast path (kstack.rxfast: compiled, its Python twin, or None for this
        # file's own loop), used once the device is registered with a stack
        self.rx_fast: Callable[["E1000", int], int] | None = rxfast_select()

    def set_callbacks(self, *, receive: Callable[[SkBuff], None] | None = None,
                      on_carrier: Callable[[bool], None] | None = None,
                      on_tx_wake: Callable[[], None] | None = None) -> None:
        """Stand-ins for a stack: plain callbacks as the hooks register_netdev would set.
        Without `receive`, frames are dropped and counted (rx_dropped)."""

        def rx(dev: NetDevice, skb: SkBuff) -> None:
            if receive is None:
                self.stats.rx_dropped += 1
                skb.drop(SkbDropReason.UNHANDLED_PROTO)
            else:
                receive(skb)

        self.hooks = NetDeviceHooks(
            receive=rx,
            carrier_changed=(lambda dev, up: on_carrier(up)) if on_carrier else (lambda dev, up: None),
            queue_woken=(lambda dev: on_tx_wake()) if on_tx_wake else (lambda dev: None),
        )

    # --- net_device_ops ----------------------------------------------------------------------

    @property
    def dev_addr(self) -> bytes:
        return self._dev_addr

    def ndo_open(self) -> None:
        self.open()

    def ndo_stop(self) -> None:
        self.close()

    def ndo_start_xmit(self, skb: SkBuff, xmit_more: bool = False) -> int:
        c = self.tx_c
        if c is not None:
            return c.xmit(self, skb, xmit_more)
        return self.xmit_py(skb, xmit_more)

    def ndo_flush_xmit(self) -> None:
        self.flush_tx()

    def ndo_get_stats64(self) -> dict[str, int]:
        """rtnl_link_stats64 from the driver's counters and the device's (as last read)."""
        st, h = self.stats, self.hw_stats
        return {
            "rx_packets": st.rx_packets, "tx_packets": st.tx_packets, "rx_bytes": st.rx_bytes,
            "tx_bytes": st.tx_bytes, "rx_errors": st.rx_errors + st.rx_length_errors + h["CRCERRS"],
            "tx_errors": 0, "rx_dropped": st.rx_dropped, "tx_dropped": st.tx_dropped,
            "rx_length_errors": st.rx_length_errors + h["ROC"] + h["RUC"], "rx_crc_errors": h["CRCERRS"],
            "rx_missed_errors": h["MPC"], "multicast": h["MPRC"],
        }

    # --- the event loop's hooks: interrupt, softirq, timers -----------------------------------

    def irq_fd(self) -> int | None:
        return self.bus.irq_fd()

    def handle_irq(self) -> None:
        """irq_fd() is readable: consume the eventfd and run the top half. The bus's
        zero-timeout wait also notices a vanished emulator (BusError)."""
        if self.bus.wait_irq(0):
            self.intr()

    def softirq_pending(self) -> bool:
        return self.napi_scheduled or self.bh_scheduled or self._link_check_pending

    def run_softirq(self, budget: int) -> int:
        """The link check a cause asked for, then the bottom half (interrupt mode: no budget)
        or one NAPI poll of at most min(budget, the NAPI weight) frames. Returns frames taken."""
        if self._link_check_pending:
            self._link_check_pending = False
            self._set_carrier(hw.link_up(self.bus))
        if self.bh_scheduled:
            return self.bottom_half()
        if self.napi_scheduled:
            return self.poll(min(budget, self.config.budget))
        return 0

    def next_timer(self) -> float | None:
        return self._next_watchdog if self.is_open else None

    def run_timers(self, now: float) -> None:
        if now >= self._next_watchdog:
            self.watchdog()

    # --- bring-up and tear-down ---------------------------------------------------------------

    def open(self) -> str:
        """Probe and bring the interface up (e1000_probe + e1000_open). Returns the MAC."""
        if self.is_open:
            raise RuntimeError("the interface is already open")
        if self.allocator is None:
            self.allocator = DmaAllocator(self.bus.mem)
        try:
            return self._up()
        except BaseException:
            self._free_resources()  # a failed bring-up gives its memory back
            raise

    def _up(self) -> str:
        cfg = self.config
        bus = self.bus
        self.mac = hw.probe(bus)
        self._dev_addr = parse_mac(self.mac)

        # rings and buffers in DMA memory (e1000_setup_all_{tx,rx}_resources)
        alloc = self.allocator
        tx_base = alloc.alloc(cfg.tx_ring_size * DESC_SIZE, 4096)
        self._ring_addrs.append(tx_base)
        rx_base = alloc.alloc(cfg.rx_ring_size * DESC_SIZE, 4096)
        self._ring_addrs.append(rx_base)
        self.tx_ring = TxRing(bus.mem, tx_base, cfg.tx_ring_size)
        self.rx_ring = RxRing(bus.mem, rx_base, cfg.rx_ring_size)
        self.tx_pool = DmaBufferPool(alloc, cfg.tx_buffer_len, cfg.tx_ring_size)
        self.rx_pool = DmaBufferPool(alloc, cfg.rx_buffer_len, cfg.rx_pool_buffers or cfg.rx_ring_size)

        # e1000_configure_tx
        hw.setup_tx_ring(bus, tx_base, cfg.tx_ring_size)
        hw.set_moderation(bus, tidv=cfg.tidv, tadv=cfg.tadv)
        hw.enable_tx(bus)
        self._txd_cmd = _TXD_IFCS | _TXD_EOP_RS | (_TXD_IDE if cfg.tidv else 0)

        # e1000_configure_rx: receiver off while the ring is set up, then on
        hw.disable_rx(bus)
        hw.set_moderation(bus, itr=self.itr, rdtr=cfg.rdtr, radv=cfg.radv)
        hw.setup_rx_ring(bus, rx_base, cfg.rx_ring_size)
        hw.enable_rx(
            bus, cfg.rx_buffer_len, promisc=cfg.promisc, strip_fcs=cfg.strip_fcs,
            long_packets=cfg.long_packets, rx_csum=cfg.rx_csum,
        )
        self.alloc_rx_buffers(self.rx_ring.unused())

        # e1000_up: interrupts on, queue awake, carrier as the PHY reports it
        self.is_open = True
        self.queue_stopped = False  # netif_start_queue
        self.napi_scheduled = self.bh_scheduled = False
        hw.irq_enable(bus)
        self._set_carrier(hw.link_up(bus))
        self._next_watchdog = self.clock() + cfg.watchdog_interval
        return self.mac

    def close(self) -> None:
        """e1000_down + e1000_free_all_resources: quiesce, reset, give the memory back."""
        if not self.is_open:
            return
        bus = self.bus
        try:
            hw.irq_disable(bus)
            hw.disable_rx(bus)
            hw.disable_tx(bus)
            self.update_stats()
            hw.reset(bus)  # the device forgets the rings before their memory is reused
        finally:
            self.is_open = False
            self.napi_scheduled = self.bh_scheduled = False
            self._set_carrier(False)
            self._free_resources()

    def _free_resources(self) -> None:
        if self.tx_ring is not None:  # e1000_clean_tx_ring: frames never sent are dropped
            for k, skb in enumerate(self.tx_ring.skb):
                if skb is not None:
                    self.tx_ring.skb[k] = None
                    skb.drop(SkbDropReason.DEV_READY)
        for ring in (self.rx_ring, self.tx_ring):
            if ring is not None:
                ring.release()
        for pool in (self.rx_pool, self.tx_pool):
            if pool is not None:
                pool.release()
        for addr in self._ring_addrs:
            self.allocator.free(addr)
        self._ring_addrs = []
        self.rx_ring = self.tx_ring = None
        self.rx_pool = self.tx_pool = None

    def set_coalesce(self, *, itr: int | str | None = None, rdtr: int | None = None,
                     radv: int | None = None, tidv: int | None = None, tadv: int | None = None) -> None:
        """Change interrupt moderation on a running interface, like `ethtool -C`: ITR in
        interrupts/s (0 = off) or "dynamic"/"conservative", the delay timers in 1.024 us
        units; None keeps a setting. TX descriptors carry IDE only while TIDV is non-zero."""
        cfg = self.config
        if itr is not None:
            if isinstance(itr, str) and itr not in (ITR_DYNAMIC, ITR_CONSERVATIVE):
                raise ValueError(f"itr {itr!r}: an interrupt rate, '{ITR_DYNAMIC}' or '{ITR_CONSERVATIVE}'")
            cfg.itr = itr
            self.itr = ITR_FOR_RANGE[LOW_LATENCY] if cfg.dynamic_itr else int(itr)
            self._rx_itr = self._tx_itr = LOW_LATENCY
        hw.set_moderation(self.bus, itr=None if itr is None else self.itr, rdtr=rdtr, radv=radv,
                          tidv=tidv, tadv=tadv)
        for name, value in (("rdtr", rdtr), ("radv", radv), ("tidv", tidv), ("tadv", tadv)):
            if value is not None:
                setattr(cfg, name, value)
        self._txd_cmd = _TXD_IFCS | _TXD_EOP_RS | (_TXD_IDE if cfg.tidv else 0)

    # --- interrupt handling ---------------------------------------------------------------------

    def intr(self) -> bool:
        """Top half (e1000_intr). Reading ICR returns the causes and acknowledges them all.
        Returns False for an interrupt that was not ours (ICR 0)."""
        icr = self.bus.read32(_ICR)
        if tracepoint.enabled:
            tracepoint.emit("drv.top_half", ICR=hex(icr), mode=self.config.mode.value, interrupts=self.stats.interrupts + 1)
        if not icr:
            self.stats.spurious_interrupts += 1
            return False
        self.stats.interrupts += 1
        self._irq_rx_packets = self._irq_rx_bytes = self._irq_tx_packets = self._irq_tx_bytes = 0
        if icr & _ICR_LINK:
            self._link_check_pending = True  # the watchdog reads STATUS.LU
        if icr & _ICR_RXO:
            self.stats.rx_overrun_interrupts += 1
        if self.config.mode is Mode.NAPI:
            # mask everything, then poll; the poll re-enables when it runs dry
            hw.irq_disable(self.bus)
            self.napi_scheduled = True
        else:
            self.bh_scheduled = True
        return True

    def bottom_half(self) -> int:
        """Interrupt mode: take every completed RX descriptor, clean TX; IMS stays enabled,
        so a frame that completes meanwhile raises the next interrupt. Returns frames taken."""
        self.bh_scheduled = False
        self.stats.bottom_halves += 1
        if tracepoint.enabled:
            tracepoint.emit("drv.bottom_half", next_to_clean=self.rx_ring.next_to_clean, bottom_halves=self.stats.bottom_halves)
        total = 0
        for _ in range(E1000_MAX_INTR):
            tx_done = self.clean_tx_irq()
            rx = self.clean_rx_irq(self.rx_ring.count)
            total += rx
            if not rx and tx_done:
                break
        if self.config.dynamic_itr:
            self.set_itr()
        return total

    def poll(self, budget: int | None = None) -> int:
        """NAPI poll (e1000_clean): TX without a budget, at most `budget` RX frames. Under
        budget (and TX clean): leave polling and re-enable interrupts. Returns RX work done."""
        budget = self.config.budget if budget is None else budget
        if tracepoint.enabled:
            tracepoint.emit("drv.napi_poll", budget=budget, next_to_clean=self.rx_ring.next_to_clean, polls=self.stats.polls + 1)
        tx_clean_complete = self.clean_tx_irq()
        work_done = self.clean_rx_irq(budget)
        st = self.stats
        st.polls += 1
        st.poll_packets += work_done
        st.poll_histogram[_bucket(work_done, budget)] += 1
        if not tx_clean_complete or work_done >= budget:
            return work_done  # stay in polling mode: more is waiting
        self.napi_complete()
        return work_done

    def napi_complete(self) -> None:
        """napi_complete_done + e1000_irq_enable. If a cause arrived while masked, the IMS
        write raises the line at once (and the eventfd is signalled), so nothing is lost."""
        self.napi_scheduled = False
        self.stats.napi_completes += 1
        if self.config.dynamic_itr:
            self.set_itr()
        if self.is_open:
            hw.irq_enable(self.bus)

    def set_itr(self) -> None:
        """e1000_set_itr: move the interrupt rate with the traffic of the last interrupt.
        Rates go down at once and up in steps of a quarter, biased toward bulk."""
        conservative = self.config.itr == ITR_CONSERVATIVE
        self._tx_itr = update_itr(self._tx_itr, self._irq_tx_packets, self._irq_tx_bytes)
        if conservative and self._tx_itr == LOWEST_LATENCY:
            self._tx_itr = LOW_LATENCY
        self._rx_itr = update_itr(self._rx_itr, self._irq_rx_packets, self._irq_rx_bytes)
        if conservative and self._rx_itr == LOWEST_LATENCY:
            self._rx_itr = LOW_LATENCY
        new = ITR_FOR_RANGE[max(self._rx_itr, self._tx_itr)]
        if new != self.itr:
            if new > self.itr:
                new = min(self.itr + (new >> 2), new)
            self.itr = new
            self.bus.write32(regs.ITR, hw.itr_for_rate(new))

    def process(self, timeout: float | None = 0.0) -> int:
        """One turn of the event loop: interrupt context then softirq context.

        In polling mode the poll runs again at once (no waiting: the interrupt is masked);
        otherwise wait up to `timeout` for the interrupt, run the top half and then the
        bottom half or the first poll. Returns the frames received.
        """
        if not self.napi_scheduled and self.bus.wait_irq(timeout):
            self.intr()
        work = self.run_softirq(self.config.budget) if self.softirq_pending() else 0
        self.run_timers(self.clock())
        return work

    # --- receive -------------------------------------------------------------------------------

    def clean_rx_irq(self, budget: int) -> int:
        """e1000_clean_rx_irq: hand up each frame whose descriptor has DD, at most `budget`;
        give buffers back to the device every rx_write_batch descriptors and at the end.
        With a stack above and a fast path chosen (rx_fast), kstack.rxfast runs this same
        loop and takes the common UDP case through the stack in one step."""
        if self.rx_fast is not None and self.stack is not None:
            work = self.rx_fast(self, budget)
            self.napi_gro_flush()
            return work
        ring = self.rx_ring
        desc = ring.desc
        count = ring.count
        mem = self._mem
        cfg = self.config
        st = self.stats
        trim = 0 if cfg.strip_fcs else _FCS_LEN
        batch = cfg.rx_write_batch
        pool = self.rx_pool
        buf_len = cfg.rx_buffer_len
        i = ring.next_to_clean
        work_done = 0
        cleaned_count = 0
        # Only descriptors the device was given (up to next_to_use): a DD anywhere else is a
        # device that lies, and the descriptor has no buffer behind it.
        while work_done < budget and i != ring.next_to_use:
            # The status byte first: DD is written last by the device, so the other fields
            # are only valid once it is seen (dma_rmb() in Linux).
            if not desc[i * DESC_SIZE + RXD_STATUS] & _RXD_DD:
                break
            work_done += 1
            length, _csum, status, errors, _special = ring.writeback(i)
            if tracepoint.enabled:
                tracepoint.emit("drv.rx.desc_dd", idx=i, len=length, status=hex(status))
            if not status & _RXD_EOP:
                # The frame did not fit one buffer: drop it and every piece up to its EOP.
                self._discarding = True
            if self._discarding:
                if status & _RXD_EOP:  # the frame's last piece: one error per frame
                    self._discarding = False
                    st.rx_length_errors += 1
            elif errors & _FRAME_ERR_MASK:
                st.rx_errors += 1  # only stored at all with RCTL.SBP
            elif length > buf_len:  # a write-back longer than the buffer: never trust it
                st.rx_errors += 1
            else:
                length -= trim
                if length < ETH_HLEN:
                    st.rx_errors += 1
                else:
                    st.rx_packets += 1
                    st.rx_bytes += length
                    self._irq_rx_packets += 1
                    self._irq_rx_bytes += length
                    ip_summed = self._rx_checksum(status, errors)
                    if self.hooks is None:
                        st.rx_dropped += 1  # nobody above: no sk_buff to allocate
                    else:
                        # netdev_alloc_skb_ip_align + the copybreak copy out of the DMA buffer
                        skb = self.netdev_alloc_skb(length)
                        skb.put_data(mem.view(ring.buffer_addr[i], length))
                        if tracepoint.enabled:
                            tracepoint.emit("drv.skb_alloc", idx=i, len=length, copied_bytes=length)
                        st.rx_copied_bytes += length
                        skb.protocol = skb.buf[skb.data + 12] << 8 | skb.buf[skb.data + 13]
                        skb.ip_summed = ip_summed
                        self.napi_gro_receive(skb)
            # the data is copied out: the buffer goes back to the pool, and the refill takes
            # one from there (a fixed pool smaller than the ring still cycles through it)
            pool.put(ring.buffer_addr[i])
            ring.buffer_addr[i] = None
            ring.clear_status(i)
            i += 1
            if i == count:
                i = 0
            cleaned_count += 1
            # return some buffers to hardware, one at a time is too slow
            if cleaned_count >= batch:
                ring.next_to_clean = i
                self.alloc_rx_buffers(cleaned_count)
                cleaned_count = 0
        ring.next_to_clean = i
        unused = ring.unused()
        if unused:
            self.alloc_rx_buffers(unused)
        self.napi_gro_flush()
        return work_done

    def _rx_checksum(self, status: int, errors: int) -> int:
        """e1000_rx_checksum: trust the device only when it checked (no IXSM) and liked it."""
        if status & _RXD_IXSM or not self.features & NetdevFeatures.RXCSUM:
            return CHECKSUM_NONE
        if errors & (_RXD_ERR_TCPE | _RXD_ERR_IPE):
            self.stats.rx_csum_offload_errors += 1  # let the stack verify it again
            return CHECKSUM_NONE
        if status & _RXD_TCPCS:
            self.stats.rx_csum_offload_good += 1
            return CHECKSUM_UNNECESSARY
        return CHECKSUM_NONE

    def alloc_rx_buffers(self, cleaned_count: int) -> None:
        """e1000_alloc_rx_buffers: give up to `cleaned_count` descriptors from next_to_use a
        buffer, then move the tail once.

        RDT is written as one past the last buffer given, as the SDM defines the tail (Linux
        writes one less, hiding a descriptor more than it needs to). E1000_DESC_UNUSED keeps
        one descriptor empty, so the tail never catches up with the head: RDH == RDT would
        tell the device it has no buffers at all.
        """
        ring = self.rx_ring
        pool = self.rx_pool
        count = ring.count
        i = ring.next_to_use
        while cleaned_count > 0:
            addr = ring.buffer_addr[i]
            if addr is None:
                addr = pool.get()
                if addr is None:
                    self.stats.alloc_rx_buff_failed += 1  # better luck next round
                    break
                ring.buffer_addr[i] = addr
            ring.post(i, addr)
            i += 1
            if i == count:
                i = 0
            cleaned_count -= 1
        if i != ring.next_to_use:
            ring.next_to_use = i
            # The descriptors are in memory before the doorbell: the posted register write
            # travels after our stores to shared memory (wmb() in Linux).
            if tracepoint.enabled:
                tracepoint.emit("drv.rx.refill", RDT=i, rx_doorbells=self.stats.rx_doorbells + 1)
            self.bus.write32(_RDT, i)
            self.stats.rx_doorbells += 1

    # --- transmit ------------------------------------------------------------------------------

    # The compiled transmit and TX clean (driver/_e1000tx.pyx), or None for this file's own
    # xmit_py / clean_tx_irq_py, their readable twins. Per instance: tests drive both.
    tx_c = None

    def xmit(self, skb: SkBuff, xmit_more: bool = False) -> int:
        """e1000_xmit_frame, compiled (tx_c) or xmit_py."""
        c = self.tx_c
        if c is not None:
            return c.xmit(self, skb, xmit_more)
        return self.xmit_py(skb, xmit_more)

    def xmit_py(self, skb: SkBuff, xmit_more: bool = False) -> int:
        """e1000_xmit_frame: queue one frame (FCS added by the device: IFCS).

        `xmit_more`: more frames follow at once, so the TDT doorbell waits for the last one
        (or flush_tx()). Returns NETDEV_TX_OK (taken) or NETDEV_TX_BUSY (queue stopped: keep
        the skb and retry after on_tx_wake).
        """
        st = self.stats
        if self.queue_stopped:
            st.tx_busy += 1
            return NETDEV_TX_BUSY
        length = skb.len
        if not self.carrier or not self.is_open:
            st.tx_dropped += 1  # no carrier: the noop qdisc drops
            skb.drop(SkbDropReason.DEV_READY)
            return NETDEV_TX_OK
        if not ETH_HLEN <= length <= self.config.max_frame:
            st.tx_dropped += 1  # a bad length is never sent
            skb.drop(SkbDropReason.TX_ERROR)
            return NETDEV_TX_OK
        ring = self.tx_ring
        per_desc = self.config.tx_buffer_len
        count = -(-length // per_desc)
        # need count + 2 descriptors: keep the tail from touching the head
        if self.maybe_stop_tx(count + 2):
            st.tx_busy += 1
            self.flush_tx()  # frames queued with xmit_more before the stop must still go
            return NETDEV_TX_BUSY

        # CHECKSUM_PARTIAL: the device inserts the L4 checksum (legacy IC: sum from CSS to
        # the end, stored at CSO), or we do it here when it cannot (skb_checksum_help)
        cso = css = ic = 0
        if skb.ip_summed == CHECKSUM_PARTIAL:
            css = skb.csum_start - skb.data
            cso = css + skb.csum_offset
            if self.features & NetdevFeatures.IP_CSUM and 0 <= css < cso <= 0xFF and cso + 2 <= length:
                ic = _TXD_IC
                st.tx_csum_offload += 1
            else:
                _checksum_help(skb)
                st.tx_csum_help += 1
                cso = css = 0

        # e1000_tx_map + e1000_tx_queue: copy into DMA buffers ("map"), fill descriptors
        data = skb.view()
        first = i = ring.next_to_use
        n = ring.count
        mem = self._mem
        pool = self.tx_pool
        for off in range(0, length, per_desc):
            chunk = data[off : off + per_desc]
            addr = pool.get()  # never empty: one buffer per descriptor
            mem.write(addr, chunk)
            ring.buffer_addr[i] = addr
            last = i
            cmd = (self._txd_cmd if off + per_desc >= length else _TXD_IFCS) | ic
            ring.post(i, addr, len(chunk), cmd, cso, css)
            i += 1
            if i == n:
                i = 0
        if tracepoint.enabled:
            tracepoint.emit("drv.xmit", first=first, last=last, len=length, ic=bool(ic))
        st.tx_copied_bytes += length
        ring.next_to_watch[first] = last
        ring.skb[first] = skb
        ring.next_to_use = i

        # make sure there is room for the next frame before the stack hands it over
        self.maybe_stop_tx(self.tx_desc_needed)
        if not xmit_more or self.queue_stopped:
            self._tx_doorbell()
        else:
            self._tx_doorbell_pending = True
        return NETDEV_TX_OK

    def flush_tx(self) -> None:
        """Ring the TDT doorbell for frames queued with xmit_more (end of a batch)."""
        if self._tx_doorbell_pending:
            self._tx_doorbell()

    def _tx_doorbell(self) -> None:
        # Buffers and descriptors are in shared memory before the posted TDT write leaves
        # (the socket send is the wmb() of Linux's e1000_tx_queue).
        self._tx_doorbell_pending = False
        if tracepoint.enabled:
            tracepoint.emit("drv.tx.doorbell", TDT=self.tx_ring.next_to_use, tx_doorbells=self.stats.tx_doorbells + 1)
        self.bus.write32(_TDT, self.tx_ring.next_to_use)
        self.stats.tx_doorbells += 1

    def maybe_stop_tx(self, size: int) -> bool:
        """e1000_maybe_stop_tx: stop the queue if fewer than `size` descriptors are free.
        Returns True if the queue is (now) stopped. Linux re-checks after stopping because
        another CPU may have cleaned meanwhile; here cleaning runs in this same loop, so there
        is nothing to re-check: clean_tx_irq wakes the queue."""
        if self.tx_ring.unused() >= size:
            return False
        self.netif_stop_queue()
        self.stats.tx_queue_stops += 1
        return True

    def clean_tx_irq(self) -> bool:
        """e1000_clean_tx_irq, compiled (tx_c) or clean_tx_irq_py."""
        c = self.tx_c
        if c is not None:
            return c.clean_tx(self)
        return self.clean_tx_irq_py()

    def clean_tx_irq_py(self) -> bool:
        """e1000_clean_tx_irq: free every sent frame whose EOP descriptor has DD (only then:
        before DD the device may still be reading the buffer). Wakes the queue when enough
        descriptors are free. Returns False if a whole ring was cleaned (more may be done)."""
        ring = self.tx_ring
        n = ring.count
        pool = self.tx_pool
        st = self.stats
        i = ring.next_to_clean
        count = 0
        while count < n:
            eop = ring.next_to_watch[i]
            if eop is None or not ring.done(eop):  # DD of the frame's last descriptor
                break
            if tracepoint.enabled:
                tracepoint.emit("drv.tx.clean", idx=eop, status="DD", tx_packets=self.stats.tx_packets + 1)
            skb = ring.skb[i]
            ring.next_to_watch[i] = None
            ring.skb[i] = None
            while True:
                cleaned = i == eop
                pool.put(ring.buffer_addr[i])
                ring.buffer_addr[i] = None
                ring.clear(i)
                i += 1
                if i == n:
                    i = 0
                count += 1
                if cleaned:
                    break
            nbytes = 0
            if skb is not None:
                nbytes = skb.len
                skb.consume()  # sent: dev_consume_skb_any
            st.tx_packets += 1
            st.tx_bytes += nbytes
            self._irq_tx_packets += 1
            self._irq_tx_bytes += nbytes
        ring.next_to_clean = i
        if count:
            self._maybe_wake_queue()
        return count < n

    def _maybe_wake_queue(self) -> None:
        """netif_wake_queue: a stopped queue wakes once the carrier is up and at least
        tx_wake_threshold descriptors are free."""
        if (self.queue_stopped and self.carrier and self.tx_ring is not None
                and self.tx_ring.unused() >= self.tx_wake_threshold):
            self.stats.restart_queue += 1
            self.netif_wake_queue()

    def tx_pending(self) -> int:
        """Descriptors queued and not yet cleaned."""
        ring = self.tx_ring
        return ring.count - 1 - ring.unused()

    # --- link and statistics ---------------------------------------------------------------------

    def _set_carrier(self, up: bool) -> None:
        if up == self.carrier:
            return
        self.stats.link_changes += 1
        if up:
            self.netif_carrier_on()
            self._maybe_wake_queue()
        else:
            self.netif_carrier_off()

    def watchdog(self) -> None:
        """e1000_watchdog: the periodic work. Statistics before they could saturate."""
        self._next_watchdog = self.clock() + self.config.watchdog_interval
        if self.is_open:
            self.update_stats()

    def update_stats(self) -> None:
        """e1000_update_stats: add the device's clear-on-read counters to ours."""
        for name, value in hw.read_stats(self.bus).items():
            self.hw_stats[name] += value

    def ethtool_stats(self, refresh: bool = True) -> dict[str, int | float | list[int]]:
        """`ethtool -S`: device counters (SDM names, and Linux's names for the usual ones)
        plus the driver's own."""
        if refresh and self.is_open:
            self.update_stats()
        out: dict = dict(self.stats.as_dict())
        h = self.hw_stats
        out.update(
            rx_missed_errors=h["MPC"], rx_no_buffer_count=h["RNBC"], rx_crc_errors=h["CRCERRS"],
            rx_long_length_errors=h["ROC"], rx_short_length_errors=h["RUC"],
            hw_rx_packets=h["GPRC"], hw_tx_packets=h["GPTC"], itr=self.itr,
        )
        out.update(h)
        bus = self.bus
        if getattr(bus, "doorbell_page", False):  # VfioUserBus with the doorbell page on
            out.update(page_doorbells=bus.page_doorbells,  # tail writes that went to the page alone
                       page_wakeups=bus.page_wakeups)  # ... and were sent too: the emulator slept
        return out


def _checksum_help(skb: SkBuff) -> None:
    """skb_checksum_help: finish a CHECKSUM_PARTIAL packet in software. The field holds the
    pseudo-header sum; the one's complement of the sum from csum_start to the end goes there."""
    skb.cow()
    start = skb.csum_start
    at = start + skb.csum_offset
    buf = skb.buf
    value = internet_checksum(memoryview(buf)[start:skb.tail])
    buf[at:at + 2] = value.to_bytes(2, "big")
    skb.ip_summed = CHECKSUM_NONE


def _bucket(work: int, budget: int) -> int:
    if work >= budget:
        return len(POLL_BUCKETS)
    for k, hi in enumerate(POLL_BUCKETS):
        if work <= hi:
            return k
    return len(POLL_BUCKETS)


def tx_select(kind: str | None = None):
    """The transmit to use: "c" (driver/_e1000tx.pyx; the Python twins when it is not built)
    or "py" (xmit_py / clean_tx_irq_py). Default: $KSTACK_E1000TX, else "c"."""
    import os

    kind = kind or os.environ.get("KSTACK_E1000TX", "c")
    if kind == "py":
        return None
    if kind != "c":
        raise ValueError(f"KSTACK_E1000TX={kind!r}: c or py")
    try:
        from driver import _e1000tx
    except ImportError:
        return None
    _e1000tx._set_checksum_help(_checksum_help)
    return _e1000tx


E1000.tx_c = tx_select()
