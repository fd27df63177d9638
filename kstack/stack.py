"""One modeled kernel's network stack: the devices, the demux between layers, the timers and
the counters. Protocols plug in here as Linux's do (dev_add_pack for EtherTypes,
inet_add_protocol for IP protocols, a socket factory per (type, protocol)); this module holds
no protocol logic itself.

RX:  driver -> NetDevice.netif_receive_skb -> NetStack._receive (taps get clones, then
     eth_type_trans) -> the packet_type handler for the EtherType (ARP, IPv4).
TX:  a protocol builds an skb with its Ethernet header -> dev_queue_xmit (taps get clones)
     -> the device's qdisc -> qdisc_run -> ndo_start_xmit; a stopped queue is run again on wake.

Everything takes time from `clock()` (ns): time.monotonic_ns in a kernel process, a fake clock
in tests. The event loop calls run_timers(now) and sleeps until next_deadline().
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from nicemu import tracepoint
from kstack.dropreason import SkbDropReason
from kstack.gso import skb_gso_segment
from kstack.netdevice import IFF_UP, NetDevice, NetDeviceHooks
from kstack.skbuff import SkBuff, SkbPool
from kstack.timer import TimerQueue
from wire.ethernet import ETH_HLEN
from wire.mac import BROADCAST

__all__ = ["NetStack", "Sysctl", "PACKET_HOST", "PACKET_BROADCAST", "PACKET_MULTICAST",
           "PACKET_OTHERHOST", "PACKET_OUTGOING", "Tap"]

# skb->pkt_type (include/uapi/linux/if_packet.h)
PACKET_HOST = 0
PACKET_BROADCAST = 1
PACKET_MULTICAST = 2
PACKET_OTHERHOST = 3
PACKET_OUTGOING = 4

MAX_DEVICES = 64
MAX_TAPS = 16

Tap = Callable[[SkBuff, bool], None]  # (a clone the tap must free, outgoing?)


@dataclass
class Sysctl:
    """The tunables of net.ipv4 and net.core this model has, with Linux's defaults."""

    ip_forward: bool = False
    ip_default_ttl: int = 64
    ipfrag_high_thresh: int = 4 * 1024 * 1024  # bytes of pending fragments before dropping
    ipfrag_time_s: int = 30  # reassembly timeout
    ipfrag_low_thresh: int = 3 * 1024 * 1024  # eviction stops below this (pre-4.17 Linux)
    ipfrag_max_dist: int = 64
    ipfrag_max_queues: int = 4096  # ours: reassembly queues at once (Linux bounds by memory)
    icmp_ratelimit_ms: int = 1000  # token bucket refill interval for ICMP errors
    icmp_ratemask: int = 0x1818  # dest unreachable, source quench, time exceeded, param problem
    icmp_msgs_per_sec: int = 1000  # global ICMP limit
    icmp_msgs_burst: int = 50
    icmp_echo_ignore_broadcasts: bool = True
    neigh_base_reachable_ms: int = 30_000
    neigh_delay_first_probe_ms: int = 5_000
    neigh_retrans_ms: int = 1_000
    neigh_ucast_solicit: int = 3
    neigh_mcast_solicit: int = 3
    neigh_gc_stale_ms: int = 60_000
    neigh_queue_len_bytes: int = 212992  # unres_qlen_bytes: packets waiting for resolution
    neigh_gc_thresh3: int = 1024  # the table's hard limit
    neigh_gc_thresh1: int = 128  # below this many entries the periodic gc keeps everything
    neigh_locktime_ms: int = 1_000  # an entry's address is not replaced sooner than this
    neigh_gc_interval_ms: int = 30_000
    ip_local_port_range: tuple[int, int] = (32768, 60999)  # ephemeral ports
    udp_mem_pages: int = 0  # 0: no global UDP memory limit beyond SO_RCVBUF
    somaxconn: int = 4096


class NetStack:
    """A kernel's network namespace: devices, protocol handlers, timers, counters."""

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns, pool: SkbPool | None = None,
                 sysctl: Sysctl | None = None, name: str = "kstack") -> None:
        self.clock = clock
        self.name = name
        self.pool = pool or SkbPool()
        self.sysctl = sysctl or Sysctl()
        self.timers = TimerQueue()
        self.snmp: Counter[str] = Counter()  # nstat names: IpInReceives, UdpInDatagrams, ...
        self.devices: dict[str, NetDevice] = {}
        self._by_index: dict[int, NetDevice] = {}
        self.ptype: dict[int, Callable[[SkBuff], None]] = {}  # EtherType -> handler
        self.protocols: dict[str, Any] = {}  # name -> protocol object (arp, ipv4, udp, ...)
        self.socket_factories: dict[tuple[int, int], Callable[..., Any]] = {}
        self._taps: dict[int, list[Tap]] = {}
        self.carrier_listeners: list[Callable[[NetDevice, bool], None]] = []
        # a batch of sends (the syscall layer's batch of submissions): frames go to the
        # driver with xmit_more and each device's doorbell is rung once at the end
        self.xmit_batch_devs: list[NetDevice] | None = None
        self._xmit_batch_depth = 0

    # --- time -----------------------------------------------------------------------------------

    def now(self) -> int:
        return self.clock()

    def next_deadline(self) -> int | None:
        return self.timers.next_deadline()

    def run_timers(self, now: int | None = None) -> int:
        return self.timers.run(self.clock() if now is None else now)

    # --- devices --------------------------------------------------------------------------------

    def register_netdev(self, dev: NetDevice, qdisc: str = "pfifo_fast") -> None:
        """register_netdevice: give the device an ifindex, its qdisc and the stack's hooks."""
        from kstack.qdisc import make_qdisc

        if dev.name in self.devices:
            raise ValueError(f"a device named {dev.name} exists")
        if len(self.devices) >= MAX_DEVICES:
            raise ValueError(f"at most {MAX_DEVICES} devices")
        dev.ifindex = max(self._by_index, default=1) + 1  # 1 is lo in Linux
        dev.stack = self
        dev.qdisc = make_qdisc(qdisc, dev)
        dev.hooks = NetDeviceHooks(self._receive, self._carrier_changed, self._queue_woken)
        self.devices[dev.name] = dev
        self._by_index[dev.ifindex] = dev

    def dev_get_by_index(self, ifindex: int) -> NetDevice | None:
        return self._by_index.get(ifindex)

    def dev_open(self, dev: NetDevice) -> None:
        """`ip link set DEV up`. IFF_UP is set before ndo_open: a driver that finds the link up
        during open reports the carrier at once, and what that triggers (a gratuitous ARP)
        must find the device up, as Linux's deferred linkwatch event does."""
        if not dev.flags & IFF_UP:
            dev.flags |= IFF_UP
            try:
                dev.ndo_open()
            except BaseException:
                dev.flags &= ~IFF_UP
                raise

    def dev_close(self, dev: NetDevice) -> None:
        if dev.flags & IFF_UP:
            dev.flags &= ~IFF_UP
            dev.qdisc.reset()
            dev.ndo_stop()
            dev.netif_carrier_off()

    def dev_add_pack(self, ethertype: int, handler: Callable[[SkBuff], None]) -> None:
        self.ptype[ethertype] = handler

    def add_tap(self, dev: NetDevice, tap: Tap) -> Callable[[], None]:
        """A packet tap on `dev` (what tcpdump -i opens): it gets a clone of every frame in
        and out and must free it. Returns the function that removes it."""
        taps = self._taps.setdefault(dev.ifindex, [])
        if len(taps) >= MAX_TAPS:
            raise ValueError(f"at most {MAX_TAPS} taps per device")
        taps.append(tap)
        return lambda: taps.remove(tap) if tap in taps else None

    def _run_taps(self, dev: NetDevice, skb: SkBuff, outgoing: bool) -> None:
        for tap in self._taps.get(dev.ifindex, ()):
            tap(skb.clone(), outgoing)

    # --- receive --------------------------------------------------------------------------------

    def _receive(self, dev: NetDevice, skb: SkBuff) -> None:
        """netif_receive_skb -> __netif_receive_skb_core: taps, eth_type_trans, demux."""
        skb.dev = dev
        if not skb.tstamp:
            skb.tstamp = self.clock()
        if self._taps.get(dev.ifindex):
            self._run_taps(dev, skb, False)
        if skb.len < ETH_HLEN:
            skb.drop(SkbDropReason.MAC_HDR)
            return
        self.eth_type_trans(skb, dev)
        handler = self.ptype.get(skb.protocol)
        if tracepoint.enabled:
            tracepoint.emit("l2.eth_type_trans", dev=dev.name, proto=hex(skb.protocol), pkt_type=skb.pkt_type)
        if handler is None:
            skb.drop(SkbDropReason.UNHANDLED_PROTO)
            return
        handler(skb)

    @staticmethod
    def eth_type_trans(skb: SkBuff, dev: NetDevice) -> None:
        """Set mac_header, pkt_type and protocol, and pull the Ethernet header."""
        skb.reset_mac_header()
        buf = skb.buf
        d = skb.data
        dst = bytes(buf[d:d + 6])
        if dst[0] & 1:
            skb.pkt_type = PACKET_BROADCAST if dst == BROADCAST else PACKET_MULTICAST
        elif dst != dev.dev_addr:
            skb.pkt_type = PACKET_OTHERHOST
        else:
            skb.pkt_type = PACKET_HOST
        skb.protocol = buf[d + 12] << 8 | buf[d + 13]
        skb.pull(ETH_HLEN)
        skb.reset_network_header()

    # --- transmit -------------------------------------------------------------------------------

    def dev_queue_xmit(self, skb: SkBuff) -> None:
        """Queue a complete frame (Ethernet header at skb.data) on skb.dev: taps, qdisc, run.
        A device that is down or has no carrier drops it (counted)."""
        dev = skb.dev
        if dev is None or not dev.flags & IFF_UP:
            skb.drop(SkbDropReason.DEV_READY)
            return
        if not skb.tstamp:
            skb.tstamp = self.clock()
        skb.pkt_type = PACKET_OUTGOING
        if skb.cb and "gso_size" in skb.cb:  # validate_xmit_skb: no TSO here, GSO splits it
            queued = False
            for seg in skb_gso_segment(skb):
                if self._taps.get(dev.ifindex):
                    self._run_taps(dev, seg, True)
                queued = dev.qdisc.enqueue(seg) or queued
            if queued:
                dev.qdisc.run()
            return
        if self._taps.get(dev.ifindex):
            self._run_taps(dev, skb, True)
        if dev.qdisc.enqueue(skb):
            dev.qdisc.run()

    def xmit_batch_begin(self) -> None:
        """Start (or nest in) a batch of sends: see xmit_batch_devs."""
        if not self._xmit_batch_depth:
            self.xmit_batch_devs = []
        self._xmit_batch_depth += 1

    def xmit_batch_end(self) -> None:
        """End the batch: ring each device's doorbell deferred by xmit_more (ndo_flush_xmit)."""
        self._xmit_batch_depth -= 1
        if self._xmit_batch_depth:
            return
        devs, self.xmit_batch_devs = self.xmit_batch_devs, None
        for dev in devs or ():
            dev.ndo_flush_xmit()

    def _queue_woken(self, dev: NetDevice) -> None:
        """netif_wake_queue -> __netif_schedule: the qdisc dequeues again."""
        dev.qdisc.run()

    def _carrier_changed(self, dev: NetDevice, up: bool) -> None:
        for fn in list(self.carrier_listeners):
            fn(dev, up)
        if up:
            dev.qdisc.run()

    # --- sockets --------------------------------------------------------------------------------

    def register_socket(self, sock_type: int, protocol: int, factory: Callable[..., Any]) -> None:
        """inet_register_protosw: `factory(stack, family, type, protocol)` makes the Sock."""
        self.socket_factories[(sock_type, protocol)] = factory

    def socket(self, family: int, sock_type: int, protocol: int = 0) -> Any:
        """inet_create: a new kernel socket, or OSError as Linux answers."""
        import errno

        from kstack.sock import AF_INET
        if family != AF_INET:
            raise OSError(errno.EAFNOSUPPORT, "address family not supported")
        factory = self.socket_factories.get((sock_type, protocol))
        if factory is None and protocol == 0:
            factory = next((f for (t, p), f in self.socket_factories.items() if t == sock_type), None)
        if factory is None:
            raise OSError(errno.EPROTONOSUPPORT if sock_type in (1, 2, 3) else errno.ESOCKTNOSUPPORT,
                          "protocol not supported")
        return factory(self, family, sock_type, protocol)

    # --- counters -------------------------------------------------------------------------------

    def counters(self) -> dict[str, Any]:
        """Everything `nicemu stats` prints for this kernel."""
        return {
            "snmp": dict(self.snmp),
            "drops": dict(self.pool.drops),
            "skb": self.pool.stats(),
            "devices": {name: {"stats": dev.ndo_get_stats64(), "qdisc": dev.qdisc.stats(),
                               "netdev": dict(dev.counters)}
                        for name, dev in self.devices.items()},
        }
