"""The receive fast path for the common case, in plain Python: the readable twin of
kstack/_rxfast.pyx, which does the same steps in C. Tests hold the two (and the slow path,
E1000.clean_rx_irq -> NetStack._receive -> Ipv4.rcv -> UdpTable.rcv -> UdpSock.queue_rcv)
equal: same deliveries, same counters, same drops.

Why: per packet, the slow path walks six Python layers, each looking up attributes and
dicts again; the interpreter, not the model, was the cost (44 us of CPU per datagram). The
fast path takes the same steps in one function, with everything that cannot change inside a
NAPI poll (the device's MAC, our addresses, the protocol handlers, taps, raw sockets) looked
up once per poll (the batch of netif_receive_skb_list / ip_list_rcv).

Every step the slow path takes is still taken and counted, per packet:
  the DMA'd descriptor (DD, EOP, errors, a length bounded by the buffer), the sk_buff
  (allocated from the pool, the frame copied out of the DMA buffer, freed after delivery),
  L2 (to our MAC, EtherType IPv4), L3 (version, IHL, header checksum, total length, trim,
  martian source, destination ours, not a fragment), L4 (length, checksum unless zero or
  CHECKSUM_UNNECESSARY from RXCSUM, socket lookup, SO_RCVBUF charge), and copy_to_user into
  the armed multishot receive's completion ring, with IpInReceives, IpInDelivers,
  UdpInDatagrams, the pool's allocs/frees/bytes and the driver's counters.

A frame that is anything else (ARP, options, fragments, ICMP, broadcast, other hosts, an
error of any kind, no socket, a socket without an armed multishot receive or with datagrams
already queued) is handed whole to the slow path, which does exactly what it did before: the
fast path decides before it changes anything.
"""
from __future__ import annotations

from typing import Any

from kstack.netdevice import NetdevFeatures
from kstack.syscall.channel import F_MORE, Op
from kstack.skbuff import CHECKSUM_NONE, CHECKSUM_UNNECESSARY, SkBuff, _SharedInfo, _align, skb_truesize_for
from nicemu import tracepoint
from nicemu.regs import DESC_SIZE, RxdErrors, RxdStatus
from wire.ethernet import ETH_HLEN

__all__ = ["BatchCtx", "batch_ctx", "clean_rx", "udp_fast", "ms_deliver", "alloc_rx_buf",
           "free_rx_buf", "skb_around", "refill", "RX_HEADROOM", "MAX_ADDRS"]

RX_HEADROOM = 64 + 2  # NET_SKB_PAD + NET_IP_ALIGN (netdev_alloc_skb_ip_align)
MAX_ADDRS = 16  # local + broadcast addresses the fast path keeps per poll (more: slow path)
ETH_P_IP = 0x0800
IPPROTO_UDP = 17
RECV_MULTISHOT = int(Op.RECV_MULTISHOT)
_FRAME_ERR = int(RxdErrors.CE | RxdErrors.SE | RxdErrors.SEQ | RxdErrors.CXE | RxdErrors.RXE)
_DD, _EOP, _IXSM, _TCPCS = int(RxdStatus.DD), int(RxdStatus.EOP), int(RxdStatus.IXSM), int(RxdStatus.TCPCS)
_CSUM_ERR = int(RxdErrors.TCPE | RxdErrors.IPE)


class BatchCtx:
    """What one poll looks up once: the stack's state that no packet of the batch changes."""

    __slots__ = ("pool", "snmp", "mac", "local", "bcast", "ports", "udp", "tstamp",
                 "ip_in", "ip_deliv", "udp_in")

    def __init__(self, pool: Any, snmp: Any, mac: bytes, local: frozenset, bcast: frozenset,
                 ports: dict, udp: Any, tstamp: int) -> None:
        self.pool = pool
        self.snmp = snmp
        self.mac = mac
        self.local = local
        self.bcast = bcast
        self.ports = ports
        self.udp = udp
        self.tstamp = tstamp  # net_timestamp, once per poll (a fast-path skb never escapes)
        self.ip_in = self.ip_deliv = self.udp_in = 0  # snmp, added once per poll


def batch_ctx(drv: Any) -> BatchCtx | None:
    """The per-poll context, or None when this poll must take the slow path for every frame
    (no stack, a tap on the device, raw sockets, handlers that are not the standard ones)."""
    stack = drv.stack
    if stack is None or drv.hooks is None or drv.hooks.receive != stack._receive:
        return None
    inet = stack.protocols.get("inet")
    if inet is None or stack._taps.get(drv.ifindex) or inet.raw.socks:
        return None
    if stack.ptype.get(ETH_P_IP) != inet.ip.rcv:
        return None
    entry = inet.protocols.get(IPPROTO_UDP)
    if entry is None or entry[0] != inet.udp.rcv:
        return None
    if len(inet.local_addrs) + len(inet.bcast_addrs) > MAX_ADDRS:
        return None
    return BatchCtx(stack.pool, stack.snmp, bytes(drv.dev_addr), frozenset(inet.local_addrs),
                    frozenset(inet.bcast_addrs), inet.udp.ports, inet.udp, stack.clock())


def finish_batch(ctx: BatchCtx) -> None:
    snmp = ctx.snmp
    if ctx.ip_in:
        snmp["IpInReceives"] += ctx.ip_in
    if ctx.ip_deliv:
        snmp["IpInDelivers"] += ctx.ip_deliv
    if ctx.udp_in:
        snmp["UdpInDatagrams"] += ctx.udp_in
    ctx.ip_in = ctx.ip_deliv = ctx.udp_in = 0


# --- sk_buff data: the pool's alloc_skb and kfree_skb, counted as SkbPool counts them ---------

def alloc_rx_buf(pool: Any, length: int) -> bytearray:
    """netdev_alloc_skb_ip_align(length): a buffer from the pool's cache (or a new one),
    counted as SkbPool.alloc counts it (allocs, cache hits, live)."""
    need = _align(length + RX_HEADROOM)
    if need <= pool.buffer_size and pool._cache:
        buf = pool._cache.pop()
        pool.cache_hits += 1
    else:
        buf = bytearray(pool.buffer_size if need <= pool.buffer_size else need)
    pool.live += 1
    pool.allocs += 1
    return buf


def free_rx_buf(pool: Any, buf: bytearray) -> None:
    """consume_skb of a fast-path sk_buff: counted as SkbPool._free counts it."""
    pool.frees += 1
    pool.live -= 1
    if len(buf) == pool.buffer_size and len(pool._cache) < pool.max_cached:
        pool._cache.append(buf)


def skb_around(pool: Any, buf: bytearray, length: int, ip_summed: int) -> SkBuff:
    """The sk_buff head over a buffer the fast path allocated and filled (already counted),
    for the slow path: as if netdev_alloc_skb + skb_put_data had made it."""
    skb = SkBuff(pool, _SharedInfo(buf), skb_truesize_for(RX_HEADROOM + length))
    skb.data = RX_HEADROOM
    skb.tail = RX_HEADROOM + length
    skb.protocol = buf[RX_HEADROOM + 12] << 8 | buf[RX_HEADROOM + 13]
    skb.ip_summed = ip_summed
    return skb


# --- L2 to L4 ----------------------------------------------------------------------------------

def _sum16(buf: bytearray, off: int, n: int) -> int:
    """Sum of big-endian 16-bit words (an odd last byte padded with a zero)."""
    v = int.from_bytes(buf[off:off + n], "big")
    return v << 8 if n & 1 else v


def udp_fast(ctx: BatchCtx, buf: bytearray, length: int, ip_summed: int) -> bool:
    """One frame (at RX_HEADROOM in buf, `length` bytes) through L2, IP and UDP into its
    socket's multishot receive. False, with nothing changed: the slow path takes it."""
    d = RX_HEADROOM
    if buf[d:d + 6] != ctx.mac:  # broadcast, multicast, another host: slow path
        return False
    if (buf[d + 12] << 8 | buf[d + 13]) != ETH_P_IP:
        return False
    if tracepoint.enabled:
        tracepoint.emit("l2.eth_type_trans", path="rxfast", dst=bytes(buf[d:d + 6]).hex(":"), proto="IPv4")
    # ip_rcv_core
    off = d + ETH_HLEN
    n = length - ETH_HLEN
    if n < 20 or buf[off] != 0x45:  # version 4, IHL 5 (options: slow path)
        return False
    if _sum16(buf, off, 20) % 0xFFFF:
        return False
    tot = buf[off + 2] << 8 | buf[off + 3]
    if tot > n or tot < 20:
        return False
    if (buf[off + 6] << 8 | buf[off + 7]) & 0x3FFF:  # MF or an offset: reassembly
        return False
    if buf[off + 9] != IPPROTO_UDP:
        return False
    if tracepoint.enabled:
        tracepoint.emit("l3.ip_rcv", path="rxfast", tot_len=tot, proto="UDP", csum="ok")
    src = int.from_bytes(buf[off + 12:off + 16], "big")
    dst = int.from_bytes(buf[off + 16:off + 20], "big")
    hi = src >> 24
    if hi == 127 or 224 <= hi < 240 or src == 0xFFFFFFFF or hi == 0:
        return False
    if src in ctx.local or src in ctx.bcast or dst not in ctx.local:
        return False
    # udp_rcv
    th = off + 20
    un = tot - 20
    if un < 8:
        return False
    sport = buf[th] << 8 | buf[th + 1]
    dport = buf[th + 2] << 8 | buf[th + 3]
    ulen = buf[th + 4] << 8 | buf[th + 5]
    check = buf[th + 6] << 8 | buf[th + 7]
    if ulen > un or ulen < 8:
        return False
    if check and ip_summed != CHECKSUM_UNNECESSARY:
        if (_sum16(buf, th, ulen) + (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF)
                + IPPROTO_UDP + ulen) % 0xFFFF:
            return False
    lst = ctx.ports.get(dport)
    if not lst:
        return False
    if len(lst) == 1 and not lst[0].connected and not lst[0].rcv_saddr:
        sk = lst[0]
    else:
        sk = ctx.udp.lookup(src, sport, dst, dport)
        if sk is None:
            return False
    if tracepoint.enabled:
        tracepoint.emit("l4.udp_rcv", path="rxfast", dport=dport, ulen=ulen, rmem=sk.rmem, rcvbuf=sk.rcvbuf)
    ms = sk.ms
    if ms is None or sk.queue or sk.err or sk.closed:
        return False  # no multishot, or datagrams before this one: the socket queue keeps order
    if sk.rmem > sk.rcvbuf:
        return False  # the slow path drops it (SOCKET_RCVBUFF) and counts it
    if not ms_deliver(ms, sk, buf, th + 8, ulen - 8, src, sport, skb_truesize_for(RX_HEADROOM + length)):
        return False
    ctx.ip_in += 1
    ctx.ip_deliv += 1
    ctx.udp_in += 1
    return True


def ms_deliver(ms: Any, sk: Any, buf: bytearray, off: int, n: int, saddr: int, sport: int,
               truesize: int) -> bool:
    """copy_to_user into the armed multishot receive's completion ring, charging the socket's
    receive memory for the time the datagram is held (__udp_enqueue_schedule_skb, then the
    receive). False when the receive cannot take it now (no credit, its ring full, the
    application gone): the caller queues it on the socket instead."""
    app = ms.app
    if ms.credit <= 0 or app.dead or app.ms_starved or app.backlog:
        return False
    if n > ms.max_payload:
        n = ms.max_payload  # recvmsg(max_payload) truncates the same way
    sk.rmem += truesize  # the skb's (skb_truesize_for its head)
    ok = ms.cq.push(RECV_MULTISHOT, ms.call_id, ms.fd, n, 0, 0, bytes(buf[off:off + n]),
                    (saddr, sport), F_MORE)
    if tracepoint.enabled and ok:
        tracepoint.emit("sock.copy_to_user", path="multishot CQ", bytes=n, call_id=ms.call_id, credit=ms.credit - 1)
    sk.rmem -= truesize
    if not ok:
        ms.ring_full()
        return False
    ms.credit -= 1
    ms.direct += 1
    ms.direct_bytes += n
    if not ms.notified:
        ms.notify()
    return True


# --- the driver's RX clean and refill ------------------------------------------------------------

def refill(drv: Any, cleaned_count: int) -> None:
    """e1000_alloc_rx_buffers (see E1000.alloc_rx_buffers): the same, step for step."""
    drv.alloc_rx_buffers(cleaned_count)


def clean_rx(drv: Any, budget: int) -> int:
    """e1000_clean_rx_irq with the fast path: E1000.clean_rx_irq's loop and counters, each
    good frame first offered to udp_fast, the rest to netif_receive_skb."""
    ring = drv.rx_ring
    desc = ring.desc
    count = ring.count
    mem = drv._mem
    cfg = drv.config
    st = drv.stats
    trim = 0 if cfg.strip_fcs else 4
    batch = cfg.rx_write_batch
    pool = drv.rx_pool
    buf_len = cfg.rx_buffer_len
    rxcsum = bool(drv.features & NetdevFeatures.RXCSUM)
    ctx = batch_ctx(drv)
    skpool = drv.stack.pool  # the driver takes this path only when registered with a stack
    i = ring.next_to_clean
    work_done = cleaned_count = 0
    try:
        while work_done < budget and i != ring.next_to_use:
            o = i * DESC_SIZE
            status = desc[o + 12]
            if not status & _DD:
                break
            work_done += 1
            length = desc[o + 8] | desc[o + 9] << 8
            if tracepoint.enabled:
                tracepoint.emit("drv.rx.desc_dd", idx=i, len=length, status=hex(status), path="rxfast")
            errors = desc[o + 13]
            if not status & _EOP:
                drv._discarding = True
            if drv._discarding:
                if status & _EOP:
                    drv._discarding = False
                    st.rx_length_errors += 1
            elif errors & _FRAME_ERR or length > buf_len:
                st.rx_errors += 1
            else:
                length -= trim
                if length < ETH_HLEN:
                    st.rx_errors += 1
                else:
                    st.rx_packets += 1
                    st.rx_bytes += length
                    drv._irq_rx_packets += 1
                    drv._irq_rx_bytes += length
                    # e1000_rx_checksum
                    ip_summed = CHECKSUM_NONE
                    if not status & _IXSM and rxcsum:
                        if errors & _CSUM_ERR:
                            st.rx_csum_offload_errors += 1
                        elif status & _TCPCS:
                            st.rx_csum_offload_good += 1
                            ip_summed = CHECKSUM_UNNECESSARY
                    if drv.hooks is None:
                        st.rx_dropped += 1
                    else:
                        # netdev_alloc_skb_ip_align + the copybreak copy out of the DMA buffer
                        buf = alloc_rx_buf(skpool, length)
                        buf[RX_HEADROOM:RX_HEADROOM + length] = mem.view(ring.buffer_addr[i], length)
                        skpool.bytes_copied += length
                        if tracepoint.enabled:
                            tracepoint.emit("drv.skb_alloc", idx=i, len=length, copied_bytes=length, allocs=skpool.allocs)
                        st.rx_copied_bytes += length
                        if ctx is not None and udp_fast(ctx, buf, length, ip_summed):
                            free_rx_buf(skpool, buf)  # consume_skb after copy_to_user
                        else:
                            drv.napi_gro_receive(skb_around(skpool, buf, length, ip_summed))
            pool.put(ring.buffer_addr[i])
            ring.buffer_addr[i] = None
            desc[o + 12] = 0
            i += 1
            if i == count:
                i = 0
            cleaned_count += 1
            if cleaned_count >= batch:
                ring.next_to_clean = i
                refill(drv, cleaned_count)
                cleaned_count = 0
    finally:
        ring.next_to_clean = i
        if ctx is not None:
            finish_batch(ctx)
    unused = ring.unused()
    if unused:
        refill(drv, unused)
    return work_done


def select(kind: str | None = None) -> Any:
    """The clean_rx to use: "c" (compiled; the twin when it is not built), "py" (this
    twin) or "off" (None: the driver's own loop, the slow path for every frame). Default:
    $KSTACK_RXFAST, else "c"."""
    import os

    kind = kind or os.environ.get("KSTACK_RXFAST", "c")
    if kind == "off":
        return None
    if kind == "py":
        return clean_rx
    if kind != "c":
        raise ValueError(f"KSTACK_RXFAST={kind!r}: c, py or off")
    try:
        from kstack._rxfast import clean_rx as c_clean_rx
    except ImportError:
        return clean_rx
    return c_clean_rx
