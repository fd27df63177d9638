"""The UDP send fast path, readable twin of kstack/_txfast.pyx (tests hold them equal).

Why: a connected UDP socket whose route and neighbour are resolved sends every datagram the
same way, through five layers of method calls (udp_sendmsg, ip_output, ip_finish_output2,
dev_queue_xmit, qdisc_run). Linux keeps that cheap with a cached dst and the qdisc bypass
(TCQ_F_CAN_BYPASS: an empty pfifo_fast hands the frame straight to the driver, counted in the
qdisc's statistics as if it had gone through). Here the same steps run in one function, with
every counter the layered path increments, and anything unusual falls back to that path.

    udp_send(sk, d, data, dport, more) -> bool
        True: sent (or handed to the driver, which may still drop and count it).
        False: not for the fast path; nothing was changed, the caller takes the slow path.

`d` is the socket's UdpDst (the dst cache: route, source address, neighbour, device) and,
filled by dst_tx_fill under a generation of kstack.dstgen (dst_check + hh_cache), everything a
send reads that does not change from one datagram to the next: the neighbour's Ethernet
header, the device's MTU, checksum offload and qdisc, the socket's TOS, priority, TTL, ports
and SO_SNDBUF. A send checks one identity (d.tx_gen is DST_GENID.value) instead of reading
those again; whatever changes one of them bumps the generation, and the next send refills
(or, when the fill's checks fail, takes the layered path). The fast path needs: the neighbour CONNECTED, DELAY or PROBE with an address (__neigh_event_send
changes nothing else then; STALE, INCOMPLETE, FAILED go the slow way to run the state
machine), the device up with no tap, a pfifo_fast qdisc, no learned path MTU, and the
datagram within the device MTU. With the pfifo_fast empty and the driver's queue awake the
frame bypasses the qdisc (TCQ_F_CAN_BYPASS); otherwise it is enqueued behind the others and
the qdisc runs, as dev_queue_xmit does (kstack/_qdisc.pyx makes that cheap): more datagrams
than the TX ring holds may be in flight, as SO_SNDBUF allows once truesize is Linux's.
"""
from __future__ import annotations

import struct
from typing import Any

from kstack.dstgen import DST_GENID
from kstack.qdisc import IP_TOS2PRIO, PFifoFast
from kstack.neighbour import NUD_CONNECTED, NUD_DELAY, NUD_PROBE
from kstack.netdevice import NETDEV_TX_BUSY, IFF_UP, NetdevFeatures
from kstack.skbuff import CHECKSUM_PARTIAL, MAX_HEADER
from nicemu import tracepoint

__all__ = ["UdpDst", "dst_tx_fill", "udp_send", "sendmmsg_connected", "sock_wfree", "FAST_NUD", "IP_IDENTS_MUL"]

FAST_NUD = NUD_CONNECTED | NUD_DELAY | NUD_PROBE
IP_IDENTS_MUL = 2654435761  # ip_select_ident's hash (kstack.ipv4.Ipv4.select_ident)
_PACKET_OUTGOING = 4
_IP_CSUM = NetdevFeatures.IP_CSUM
_ETH = struct.Struct("!6s6sH")
_IPUDP = struct.Struct("!BBHHHBBHIIHHHH")  # IPv4 header (20) + UDP header (8)
_ETH_HLEN = 14
_IP_HLEN = 20
_UDP_HLEN = 8


class UdpDst:
    """sk_dst_cache of a connected UDP socket: valid while the FIB's generation is the one it
    was made under (a route or address change bumps it) and its neighbour entry lives."""

    __slots__ = ("genid", "daddr", "res", "dev", "src", "neigh", "key", "stack", "pool", "snmp",
                 "nstats", "idents", "ident_i", "ip", "taps", "batch",
                 # the cached send state (dst_tx_fill), valid while tx_gen is DST_GENID.value
                 "tx_gen", "hh", "mtu", "hw_csum", "qdisc", "tos", "priority", "ttl", "sport",
                 "dport", "sndbuf")

    def __init__(self, genid: int, daddr: int, res: Any, src: int, inet: Any) -> None:
        self.genid = genid
        self.daddr = daddr
        self.res = res
        self.dev = res.dev
        self.src = src
        self.neigh: Any = None  # looked up when first needed, dropped when it dies
        self.key = (res.dev.ifindex, res.nexthop)
        self.stack = inet.stack
        self.pool = inet.stack.pool
        self.snmp = inet.stack.snmp
        self.nstats = inet.neigh.stats
        self.ip = inet.ip
        self.idents = inet.ip.idents
        self.ident_i = (daddr * IP_IDENTS_MUL ^ 17) % len(inet.ip.idents)
        self.taps = inet.stack._taps
        self.batch = inet.stack  # xmit_batch_devs: the syscall layer's batch (xmit_more)
        self.tx_gen: Any = None  # not filled yet
        self.hh = b""
        self.mtu = self.tos = self.priority = self.ttl = self.sport = self.dport = self.sndbuf = 0
        self.hw_csum = False
        self.qdisc: Any = None


def dst_tx_fill(sk: Any, d: UdpDst) -> bool:
    """dst_check + neigh_hh_init for the fast path: check what does not change between sends
    (the route's generation, the neighbour CONNECTED/DELAY/PROBE with an address and alive,
    the device up with a pfifo_fast) and cache what the send reads (hh_cache: destination and
    source MAC and the EtherType, ready to copy; MTU, checksum offload, qdisc; TOS, priority,
    TTL, ports, SO_SNDBUF) under the current generation. False: not for the fast path (the
    cache stays invalid). The compiled send calls this too: one fill for both."""
    gen = DST_GENID.value  # before reading: a bump while filling leaves the cache stale
    n = d.neigh
    if n is None or n.dead or d.genid != sk.inet.fib.genid:
        return False
    dev = d.dev
    qd = dev.qdisc
    ha = n.ha
    if not n.nud_state & FAST_NUD or ha is None or not dev.flags & IFF_UP or type(qd) is not PFifoFast:
        return False
    dev_addr = dev.dev_addr
    if type(ha) is not bytes or type(dev_addr) is not bytes or len(ha) != 6 or len(dev_addr) != 6:
        raise TypeError("link-layer addresses are 6 bytes")
    d.hh = _ETH.pack(ha, dev_addr, 0x0800)
    d.mtu = dev.mtu
    d.hw_csum = bool(dev.features & _IP_CSUM)
    d.qdisc = qd
    tos = d.tos = sk.tos & 0xFF
    d.priority = IP_TOS2PRIO[(tos & 0x1E) >> 1]
    d.ttl = sk.ttl  # 0: ip_default_ttl, read at each send (a sysctl is not a cause)
    d.sport = sk.sport
    d.dport = sk.dport
    d.sndbuf = sk.sndbuf
    d.tx_gen = gen
    return True


def sock_wfree(skb: Any) -> None:
    """sock_wfree, the destructor of an skb charged to a socket's send memory: give its
    truesize back, and wake a writer that found SO_SNDBUF full once half is free again
    (sock_def_write_space)."""
    sk = skb.sk
    sk.wmem -= skb.truesize
    if sk.nospace and sk.wmem << 1 <= sk.sndbuf:
        sk.nospace = False
        sk.wake()


def _fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def udp_send(sk: Any, d: UdpDst, data: bytes, dport: int, now: int | None = None) -> bool:
    """udp_sendmsg -> ip_output -> neigh_output -> dev_queue_xmit (bypass) -> ndo_start_xmit,
    in one step for the common case. See the module docstring."""
    if d.tx_gen is not DST_GENID.value and not dst_tx_fill(sk, d):
        return False  # sk_dst_check / hh: something changed and the fill refused
    n = d.neigh
    dev = d.dev
    qd = d.qdisc
    nlen = len(data)
    ulen = _UDP_HLEN + nlen
    tot = ulen + _IP_HLEN
    if tot > d.mtu or d.ip.pmtu or (d.taps and d.taps.get(dev.ifindex)):
        return False
    stack = d.stack
    if now is None:  # a batch (sendmmsg_connected) reads the clock once for all its datagrams
        now = stack.clock()
    pool = d.pool
    # sock_alloc_send_skb: the buffer, charged to the socket's send memory (sock_wfree gives
    # it back when the driver frees the skb after DD)
    skb = pool.alloc(ulen, MAX_HEADER)
    buf = skb.shinfo.buf
    sk.wmem += skb.truesize
    skb.sk = sk
    skb.destructor = sock_wfree
    o = MAX_HEADER  # the UDP header; IP 20 and Ethernet 14 bytes in front
    buf[o + _UDP_HLEN:o + ulen] = data  # copy_from_user into the skb
    if tracepoint.enabled:
        tracepoint.emit("sock.copy_from_user", path="txfast", bytes=nlen, wmem=sk.wmem)
    pool.bytes_copied += nlen
    src = d.src
    dst = d.daddr
    idents = d.idents
    i = d.ident_i
    ident = idents[i] = (idents[i] + 1) & 0xFFFF
    tos = d.tos
    ttl = d.ttl or stack.sysctl.ip_default_ttl
    psum = (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF) + 17 + ulen
    ih = o - _IP_HLEN
    _IPUDP.pack_into(buf, ih, 0x45, tos, tot, ident, 0x4000, ttl, 17, 0, src, dst,
                     d.sport, dport, ulen, 0)
    c = ~_fold(int.from_bytes(buf[ih:ih + _IP_HLEN], "big") % 0xFFFF or 0xFFFF) & 0xFFFF
    buf[ih + 10] = c >> 8
    buf[ih + 11] = c & 0xFF
    if d.hw_csum:
        c = _fold(psum)  # udp4_hwcsum: the device finishes it (CHECKSUM_PARTIAL)
        skb.ip_summed = CHECKSUM_PARTIAL
        skb.csum_start = o
        skb.csum_offset = 6
    else:
        v = int.from_bytes(buf[o:o + ulen], "big")
        if ulen & 1:
            v <<= 8
        s = v % 0xFFFF
        if s == 0 and v:
            s = 0xFFFF
        c = (~_fold(s + psum) & 0xFFFF) or 0xFFFF
    buf[o + 6] = c >> 8
    buf[o + 7] = c & 0xFF
    mh = ih - _ETH_HLEN
    buf[mh:ih] = d.hh  # neigh_hh_output: the cached header copied in front
    skb.data = mh
    skb.tail = o + ulen
    skb.transport_header = o
    skb.network_header = ih
    skb.mac_header = mh
    skb.protocol = 0x0800
    skb.priority = d.priority
    skb.dev = dev
    skb.tstamp = now
    skb.pkt_type = _PACKET_OUTGOING
    snmp = d.snmp
    snmp["UdpOutDatagrams"] += 1
    snmp["IpOutRequests"] += 1
    ns = d.nstats
    ns["lookups"] += 1
    ns["hits"] += 1
    n.used = now
    if dev.queue_stopped or qd._qlen or qd._requeued is not None:
        # __dev_xmit_skb without the bypass: the frame waits behind the queued ones (or for
        # the driver's netif_wake_queue): enqueue (a drop is counted), then __qdisc_run
        if qd.enqueue(skb):
            qd.run()
        return True
    # __dev_xmit_skb with TCQ_F_CAN_BYPASS: qdisc_run_begin, bstats, sch_direct_xmit
    qd.runs += 1
    flen = tot + _ETH_HLEN
    batch = d.batch.xmit_batch_devs
    if tracepoint.enabled:
        tracepoint.emit("qdisc.bypass", path="txfast", qdisc="pfifo_fast (empty: TCQ_F_CAN_BYPASS)", len=flen)
    more = batch is not None
    if dev.ndo_start_xmit(skb, more) == NETDEV_TX_BUSY:
        qd._requeue(skb)  # as qdisc_run would: first out when the driver wakes the queue
        return True
    qd.packets += 1
    qd.bytes += flen
    if more and dev not in batch:
        batch.append(dev)
    return True


def sendmmsg_connected(sk: Any, payload: bytes, count: int, start: int = 0, send: Any = None) -> int:
    """sendmmsg(2)'s loop for a connected socket, the twin of kstack._txfast.sendmmsg_connected:
    the payload is checked whole first (kstack.syscall.channel.unpack_mmsg: ValueError, nothing
    sent), then each datagram goes as UdpSock.sendmsg's fast case sends one, through `send`
    (this module's udp_send unless given), from datagram `start`. Returns the index of the
    first not sent (count: all); the caller sends that one the usual way."""
    from kstack.syscall.channel import unpack_mmsg
    from wire.udp import UDP_MAX_PAYLOAD

    views = unpack_mmsg(payload, count)
    if start < 0:
        raise ValueError("negative start")
    now = None
    if send is None:
        send = udp_send
        d = sk._dst
        now = d.stack.clock() if d is not None else None  # one clock read per batch
    for i, v in enumerate(views):
        if i < start:
            continue
        if sk.closed or sk.err or not sk.connected:
            return i
        d = sk._dst
        if d is None or len(v) > UDP_MAX_PAYLOAD or d.genid != sk.inet.fib.genid or sk.wmem >= sk.sndbuf:
            return i
        nb = d.neigh
        if nb is None or nb.dead:
            return i
        if not (send(sk, d, v, sk.dport, now) if now is not None else send(sk, d, v, sk.dport)):
            return i
    return count


def select(kind: str | None = None) -> Any:
    """The udp_send to use: "c" (compiled; this twin when it is not built), "py" (this twin)
    or "off" (None: every datagram takes the layered path). Default: $KSTACK_TXFAST, else "c"."""
    import os

    kind = kind or os.environ.get("KSTACK_TXFAST", "c")
    if kind == "off":
        return None
    if kind == "py":
        return udp_send
    if kind != "c":
        raise ValueError(f"KSTACK_TXFAST={kind!r}: c, py or off")
    try:
        from kstack._txfast import udp_send as c_udp_send
    except ImportError:
        return udp_send
    return c_udp_send
