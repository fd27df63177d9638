"""The seam between a driver and the stack: Linux's struct net_device and net_device_ops.

A driver subclasses NetDevice and implements the ndo_* operations; the stack never calls a
driver by name. The driver calls back into the stack through the netif_* methods below, which
the stack binds when it registers the device (register_netdev). Everything a kernel process's
event loop needs from a driver is here too: the interrupt fd to wait on, the handler to run
when it fires (the top half), and the softirq work it schedules (bottom half or NAPI poll).

    driver -> stack:  netif_receive_skb(skb)   a received frame (from the bottom half / poll)
                      napi_gro_receive(skb)    the same through GRO (kstack.gro) when on
                      napi_gro_flush()         the poll's end: GRO delivers what it holds
                      netif_carrier_on/off()   link state (from the watchdog)
                      netif_stop_queue()       the TX ring is full: stop calling start_xmit
                      netif_wake_queue()       room again: the qdisc dequeues
    stack -> driver:  ndo_open / ndo_stop / ndo_start_xmit(skb, xmit_more) / ndo_get_stats64
                      irq_fd() / handle_irq() / softirq_pending() / run_softirq(budget)
                      next_timer() / run_timers(now)  (the driver's watchdog)
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from operator import attrgetter

from kstack.dstgen import dst_genid_bump
from kstack.skbuff import NET_IP_ALIGN, NET_SKB_PAD, default_pool
from wire.ethernet import ETH_DATA_LEN

_RX_HEADROOM = NET_SKB_PAD + NET_IP_ALIGN  # netdev_alloc_skb_ip_align's reserve

if TYPE_CHECKING:
    from kstack.skbuff import SkBuff

__all__ = ["NetDevice", "NETDEV_TX_OK", "NETDEV_TX_BUSY", "NetdevFeatures", "NetDeviceHooks",
           "IFF_UP", "IFF_RUNNING"]

# netdev_tx_t (include/linux/netdevice.h)
NETDEV_TX_OK = 0x00  # the driver took the skb (sent, or dropped and counted by the driver)
NETDEV_TX_BUSY = 0x10  # the queue is stopped: the caller keeps the skb and requeues it

IFF_UP = 0x1
IFF_RUNNING = 0x40  # carrier on (operstate UP)


class NetdevFeatures:
    """dev->features bits that matter here (NETIF_F_*)."""

    IP_CSUM = 1 << 0  # NETIF_F_IP_CSUM: the device inserts TCP/UDP checksums (TX IC)
    RXCSUM = 1 << 1  # NETIF_F_RXCSUM: the device verifies checksums on receive
    GRO = 1 << 2  # NETIF_F_GRO: napi_gro_receive merges TCP segments (kstack.gro)
    GSO = 1 << 3  # NETIF_F_GSO: TCP may send segments larger than the MTU, split at
    #               dev_queue_xmit (kstack.gso) since the device does not do TSO


@dataclass
class NetDeviceHooks:
    """What the stack gives a registered device to call (set by register_netdev)."""

    receive: Callable[["NetDevice", "SkBuff"], None]
    carrier_changed: Callable[["NetDevice", bool], None]
    queue_woken: Callable[["NetDevice"], None]


class NetDevice(abc.ABC):
    """A network interface as the stack sees it. Drivers implement the abstract ndo_* methods
    and call the netif_* methods; the stack sets `hooks`, `qdisc` and `ifindex`."""

    def __init__(self, name: str = "eth0", mtu: int = ETH_DATA_LEN) -> None:
        self.name = name
        self.mtu = mtu
        self.ifindex = 0
        self.flags = 0
        self.features = 0  # NetdevFeatures bits the driver offers and has enabled
        self.tx_queue_len = 1000  # txqueuelen: the qdisc's limit
        self.carrier = False
        self.queue_stopped = False
        self.hooks: NetDeviceHooks | None = None
        self.qdisc: Any = None  # kstack.qdisc.Qdisc, set by the stack
        self.stack: Any = None  # the NetStack it is registered with
        self.counters: dict[str, int] = {"tx_queue_stops": 0, "tx_queue_wakes": 0}

    # --- what a socket's cached send state holds (kstack/dstgen.py): a change expires it ------
    # (NETDEV_CHANGEMTU, NETDEV_UP/DOWN and carrier (IFF_RUNNING), NETDEV_FEAT_CHANGE, a new
    # qdisc); the reads stay C-speed (attrgetter, no Python frame)

    def _set_mtu(self, v: int) -> None:
        self._mtu = v
        dst_genid_bump()

    def _set_flags(self, v: int) -> None:
        self._flags = v
        dst_genid_bump()

    def _set_features(self, v: int) -> None:
        self._features = v
        dst_genid_bump()

    def _set_qdisc(self, v: Any) -> None:
        self._qdisc = v
        dst_genid_bump()

    mtu = property(attrgetter("_mtu"), _set_mtu)
    flags = property(attrgetter("_flags"), _set_flags)
    features = property(attrgetter("_features"), _set_features)
    qdisc = property(attrgetter("_qdisc"), _set_qdisc)

    # --- identity ----------------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def dev_addr(self) -> bytes:
        """The device's MAC address (6 bytes)."""

    # --- net_device_ops ------------------------------------------------------------------------

    @abc.abstractmethod
    def ndo_open(self) -> None:
        """Bring the interface up (rings, interrupts); called by `ip link set up`."""

    @abc.abstractmethod
    def ndo_stop(self) -> None:
        """Bring it down and give its resources back."""

    @abc.abstractmethod
    def ndo_start_xmit(self, skb: "SkBuff", xmit_more: bool = False) -> int:
        """Queue one frame (Ethernet header included, no FCS) for transmission. Returns
        NETDEV_TX_OK when the driver took the skb (it frees it once sent, or drops it and
        counts that), NETDEV_TX_BUSY when it cannot take it now (the skb stays the caller's).
        xmit_more: more frames follow at once, so the doorbell may wait for the last."""

    @abc.abstractmethod
    def ndo_get_stats64(self) -> dict[str, int]:
        """rtnl_link_stats64: rx/tx packets, bytes, errors, dropped."""

    def ndo_flush_xmit(self) -> None:
        """Ring a doorbell deferred by xmit_more (the qdisc calls it when its queue empties)."""

    def ethtool_stats(self) -> dict[str, Any]:
        """`ethtool -S`: the driver's and device's own counters."""
        return {}

    # --- event loop: the interrupt and the softirq work it schedules -----------------------------

    def irq_fd(self) -> int | None:
        """An fd that becomes readable when the device raises its interrupt (None: polled)."""
        return None

    def handle_irq(self) -> None:
        """The top half, run when irq_fd() is readable: acknowledge and schedule softirq work."""

    def softirq_pending(self) -> bool:
        """Bottom-half or NAPI work is scheduled (the loop runs it without waiting)."""
        return False

    def run_softirq(self, budget: int) -> int:
        """Run the scheduled bottom half / NAPI poll; returns packets processed."""
        return 0

    def next_timer(self) -> float | None:
        """The driver's next timer (watchdog), in the clock the driver was given."""
        return None

    def run_timers(self, now: float) -> None:
        """Run the driver's timers that are due."""

    # --- driver -> stack ----------------------------------------------------------------------

    def netdev_alloc_skb(self, length: int) -> "SkBuff":
        """netdev_alloc_skb_ip_align: an sk_buff for a received frame of `length` bytes from
        the stack's pool (the process's pool before registration), with NET_SKB_PAD +
        NET_IP_ALIGN bytes of headroom so the IP header after Ethernet is 4-byte aligned."""
        pool = self.stack.pool if self.stack is not None else default_pool()
        return pool.alloc(length, _RX_HEADROOM)

    gro: Any = None  # kstack.gro.Gro, made on first use (the NAPI context's gro_hash)

    def napi_gro_receive(self, skb: "SkBuff") -> None:
        """A received frame through GRO when NETIF_F_GRO is on, else netif_receive_skb."""
        if self.features & NetdevFeatures.GRO:
            gro = self.gro
            if gro is None:
                from kstack.gro import Gro
                gro = self.gro = Gro(self)
            gro.receive(skb)
            return
        if self.gro is not None and self.gro.held:
            self.gro.flush()  # turned off while packets were held: they go first
        self.netif_receive_skb(skb)

    def napi_gro_flush(self) -> None:
        """napi_gro_flush at the end of a poll (and of a bottom half): deliver what is held."""
        gro = self.gro
        if gro is not None and gro.held:
            gro.flush()

    def netif_receive_skb(self, skb: "SkBuff") -> None:
        skb.dev = self
        if self.hooks is not None:
            self.hooks.receive(self, skb)
        else:
            from kstack.dropreason import SkbDropReason
            skb.drop(SkbDropReason.UNHANDLED_PROTO)

    def netif_carrier_on(self) -> None:
        if not self.carrier:
            self.carrier = True
            self.flags |= IFF_RUNNING
            if self.hooks is not None:
                self.hooks.carrier_changed(self, True)

    def netif_carrier_off(self) -> None:
        if self.carrier:
            self.carrier = False
            self.flags &= ~IFF_RUNNING
            if self.hooks is not None:
                self.hooks.carrier_changed(self, False)

    def netif_stop_queue(self) -> None:
        if not self.queue_stopped:
            self.queue_stopped = True
            self.counters["tx_queue_stops"] += 1

    def netif_wake_queue(self) -> None:
        if self.queue_stopped:
            self.queue_stopped = False
            self.counters["tx_queue_wakes"] += 1
            if self.hooks is not None:
                self.hooks.queue_woken(self)

    def netif_queue_stopped(self) -> bool:
        return self.queue_stopped

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} mtu {self.mtu}>"
