# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The receive fast path in C: kstack/rxfast.py step for step (its docstring says what and
why), with the descriptor ring and the DMA buffers as typed memoryviews, the checks on C
integers, and the counters kept in C and added once per poll. Python objects per packet are
only what the model itself holds: the sk_buff's data buffer (from the pool's cache), the
socket (its port list and attributes) and the completion ring's push.
"""
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memcmp, memset
from wire._csum cimport csum_sum16 as _sum16  # RFC 1071 sums: one home

from kstack.rxfast import RX_HEADROOM as _PY_RX_HEADROOM, MAX_ADDRS as _PY_MAX_ADDRS
from kstack.rxfast import batch_ctx, finish_batch, skb_around, RECV_MULTISHOT, F_MORE
from kstack.netdevice import NetdevFeatures
from kstack.skbuff import CHECKSUM_NONE, CHECKSUM_UNNECESSARY, skb_truesize_for as _py_truesize_for
from kstack._truesize cimport skb_truesize_for
from nicemu.regs import RDT

DEF RX_HEADROOM = 66
DEF MAX_ADDRS = 16
DEF ETH_HLEN = 14
DEF DESC = 16
DEF DD = 0x01
DEF EOP = 0x02
DEF IXSM = 0x04
DEF TCPCS = 0x20
DEF FRAME_ERR = 0x01 | 0x02 | 0x04 | 0x10 | 0x80
DEF CSUM_ERR = 0x20 | 0x40
assert _PY_RX_HEADROOM == RX_HEADROOM and _PY_MAX_ADDRS == MAX_ADDRS
for _n in (0, 1, 60, 126, 127, 200, 1000, 1600, 3000, 8000, 9000, 70000):
    if skb_truesize_for(_n) != _py_truesize_for(_n):
        raise ImportError("kstack.skbuff.skb_truesize_for changed: update kstack/_truesize.pxd")

cdef int _RECV_MS = RECV_MULTISHOT
cdef int _F_MORE = F_MORE
cdef int _UNNECESSARY = CHECKSUM_UNNECESSARY
cdef int _NONE = CHECKSUM_NONE
cdef int _RXCSUM = NetdevFeatures.RXCSUM
cdef object _RDT = RDT


cdef struct Ctx:
    uint8_t mac[6]
    uint32_t local[MAX_ADDRS]
    int nlocal
    uint32_t bcast[MAX_ADDRS]
    int nbcast
    long ip_in, ip_deliv, udp_in


cdef inline bint _in(const uint32_t *a, int n, uint32_t v):
    cdef int k
    for k in range(n):
        if a[k] == v:
            return True
    return False


cdef bint _ms_deliver(object ms, object sk, object buf, Py_ssize_t off, Py_ssize_t n,
                      uint32_t saddr, uint32_t sport, Py_ssize_t truesize) except -1:
    """rxfast.ms_deliver: copy_to_user into the multishot receive's completion ring."""
    app = ms.app
    if ms.credit <= 0 or app.dead or app.ms_starved or app.backlog:
        return False
    cdef Py_ssize_t maxp = ms.max_payload
    if n > maxp:
        n = maxp
    cdef const char *p = PyByteArray_AS_STRING(buf)
    sk.rmem += truesize
    ok = ms.cq.push(_RECV_MS, ms.call_id, ms.fd, n, 0, 0, PyBytes_FromStringAndSize(p + off, n),
                    (saddr, sport), _F_MORE)
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


cdef bint _udp_fast(Ctx *c, object ports, object udp, object buf, Py_ssize_t length,
                    int ip_summed) except -1:
    """rxfast.udp_fast: False with nothing changed, or the datagram is delivered."""
    cdef const uint8_t *b = <const uint8_t *>PyByteArray_AS_STRING(buf)
    cdef const uint8_t *e = b + RX_HEADROOM
    if memcmp(e, c.mac, 6) != 0:
        return False
    if ((e[12] << 8) | e[13]) != 0x0800:
        return False
    cdef const uint8_t *ip = e + ETH_HLEN
    cdef Py_ssize_t n = length - ETH_HLEN
    if n < 20 or ip[0] != 0x45:
        return False
    if _sum16(ip, 20) % 0xFFFF:
        return False
    cdef Py_ssize_t tot = (ip[2] << 8) | ip[3]
    if tot > n or tot < 20:
        return False
    if ((ip[6] << 8) | ip[7]) & 0x3FFF:
        return False
    if ip[9] != 17:
        return False
    cdef uint32_t src = (<uint32_t>ip[12] << 24) | (<uint32_t>ip[13] << 16) | (<uint32_t>ip[14] << 8) | ip[15]
    cdef uint32_t dst = (<uint32_t>ip[16] << 24) | (<uint32_t>ip[17] << 16) | (<uint32_t>ip[18] << 8) | ip[19]
    cdef uint32_t hi = src >> 24
    if hi == 127 or (224 <= hi < 240) or src == 0xFFFFFFFF or hi == 0:
        return False
    if _in(c.local, c.nlocal, src) or _in(c.bcast, c.nbcast, src) or not _in(c.local, c.nlocal, dst):
        return False
    cdef const uint8_t *th = ip + 20
    cdef Py_ssize_t un = tot - 20
    if un < 8:
        return False
    cdef uint32_t sport = (th[0] << 8) | th[1]
    cdef uint32_t dport = (th[2] << 8) | th[3]
    cdef Py_ssize_t ulen = (th[4] << 8) | th[5]
    cdef uint32_t check = (th[6] << 8) | th[7]
    if ulen > un or ulen < 8:
        return False
    if check and ip_summed != _UNNECESSARY:
        if (_sum16(th, ulen) + (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF)
                + 17 + <uint64_t>ulen) % 0xFFFF:
            return False
    lst = ports.get(dport)
    if not lst:
        return False
    if len(lst) == 1 and not lst[0].connected and not lst[0].rcv_saddr:
        sk = lst[0]
    else:
        sk = udp.lookup(src, sport, dst, dport)
        if sk is None:
            return False
    ms = sk.ms
    if ms is None or sk.queue or sk.err or sk.closed:
        return False
    if sk.rmem > sk.rcvbuf:
        return False
    if not _ms_deliver(ms, sk, buf, (th - b) + 8, ulen - 8, src, sport,
                       skb_truesize_for(RX_HEADROOM + length)):
        return False
    c.ip_in += 1
    c.ip_deliv += 1
    c.udp_in += 1
    return True


cdef bint _fill_ctx(Ctx *c, object pc) except -1:
    cdef int k = 0
    mac = pc.mac
    for k in range(6):
        c.mac[k] = mac[k]
    c.nlocal = 0
    for a in pc.local:
        c.local[c.nlocal] = a
        c.nlocal += 1
    c.nbcast = 0
    for a in pc.bcast:
        c.bcast[c.nbcast] = a
        c.nbcast += 1
    c.ip_in = c.ip_deliv = c.udp_in = 0
    return True


cdef void _pool_put(object pool, object addr, Py_ssize_t pbase, Py_ssize_t stride,
                    Py_ssize_t pcount) except *:
    """DmaBufferPool.put: only an address of this pool goes back."""
    cdef Py_ssize_t off = <Py_ssize_t>addr - pbase
    if off < 0 or off % stride or off // stride >= pcount:
        pool.put(addr)  # raises DmaAllocError, as the slow path does
        return
    pool._free.append(addr)


cdef void _refill(object drv, Py_ssize_t cleaned_count, unsigned char[::1] desc) except *:
    """e1000_alloc_rx_buffers (E1000.alloc_rx_buffers), step for step: a buffer per
    descriptor from the pool, the descriptor rewritten (status 0), then the tail once."""
    ring = drv.rx_ring
    free = drv.rx_pool._free
    baddr = ring.buffer_addr
    cdef Py_ssize_t count = ring.count
    cdef Py_ssize_t start = ring.next_to_use
    cdef Py_ssize_t i = start
    cdef uint64_t a
    cdef Py_ssize_t k
    while cleaned_count > 0:
        addr = baddr[i]
        if addr is None:
            if not free:
                drv.stats.alloc_rx_buff_failed += 1
                break
            addr = free.pop()
            baddr[i] = addr
        a = addr
        for k in range(8):
            desc[i * DESC + k] = (a >> (8 * k)) & 0xFF
        memset(&desc[i * DESC + 8], 0, 8)
        i += 1
        if i == count:
            i = 0
        cleaned_count -= 1
    if i != start:
        ring.next_to_use = i
        drv.bus.write32(_RDT, i)
        drv.stats.rx_doorbells += 1


cdef class _RxMem:
    """The RX ring's descriptors and the RX buffer pool's memory as views of the shared
    memory, made once per ring (per open) and kept on the ring object, so they go away with
    the ring before the memory closes: acquiring them on every poll cost two buffer exports
    and a new view per poll. (The ring's own `desc` view is not exported: it can be released.)"""
    cdef unsigned char[::1] desc
    cdef const unsigned char[::1] dma
    cdef object pool
    cdef Py_ssize_t pbase, stride, pcount

    def __init__(self, drv, ring, pool):
        self.pool = pool
        self.pbase = pool.base
        self.stride = pool._stride
        self.pcount = pool.count
        self.desc = drv._mem.view(ring.base, ring.count * DESC)
        if self.desc.shape[0] != len(ring.desc):
            raise ValueError("RX ring descriptors outside the DMA memory")
        self.dma = drv._mem.view(self.pbase, self.stride * self.pcount)


cdef _RxMem _rx_mem(drv, ring):
    cdef _RxMem m = getattr(ring, "_c_rx_mem", None)
    pool = drv.rx_pool
    if m is None or m.pool is not pool:
        m = _RxMem(drv, ring, pool)
        ring._c_rx_mem = m
    return m


def clean_rx(object drv, Py_ssize_t budget):
    """rxfast.clean_rx in C: e1000_clean_rx_irq with each good frame offered to the fast path."""
    ring = drv.rx_ring
    cdef _RxMem rm = _rx_mem(drv, ring)
    cdef unsigned char[::1] desc = rm.desc
    cdef Py_ssize_t count = ring.count
    cfg = drv.config
    st = drv.stats
    cdef Py_ssize_t trim = 0 if cfg.strip_fcs else 4
    cdef Py_ssize_t batch = cfg.rx_write_batch
    pool = rm.pool
    cdef Py_ssize_t buf_len = cfg.rx_buffer_len
    cdef bint rxcsum = (drv.features & _RXCSUM) != 0
    cdef Py_ssize_t pbase = rm.pbase
    cdef Py_ssize_t stride = rm.stride
    cdef Py_ssize_t pcount = rm.pcount
    cdef const unsigned char[::1] dma = rm.dma
    cdef Py_ssize_t dma_len = dma.shape[0]
    skpool = drv.stack.pool
    hooks_none = drv.hooks is None
    pc = batch_ctx(drv)
    cdef Ctx c
    cdef bint fast = pc is not None
    if fast:
        _fill_ctx(&c, pc)
        ports = pc.ports
        udp = pc.udp
    else:
        ports = udp = None
    cdef Py_ssize_t i = ring.next_to_clean
    cdef Py_ssize_t ntu = ring.next_to_use
    cdef Py_ssize_t work_done = 0, cleaned = 0, o, length, off
    cdef int status, errors, ip_summed
    cdef bint discarding = drv._discarding
    cdef long rx_packets = 0, rx_bytes = 0, length_errors = 0, rx_errors = 0, dropped = 0
    cdef long csum_good = 0, csum_errors = 0, copied = 0, allocs = 0, frees = 0, hits = 0
    cdef Py_ssize_t need, bsize = skpool.buffer_size, maxc = skpool.max_cached
    scache = skpool._cache
    baddr = ring.buffer_addr
    try:
        while work_done < budget and i != ntu:
            o = i * DESC
            status = desc[o + 12]
            if not status & DD:
                break
            work_done += 1
            length = desc[o + 8] | (desc[o + 9] << 8)
            errors = desc[o + 13]
            if not status & EOP:
                discarding = True
            if discarding:
                if status & EOP:
                    discarding = False
                    length_errors += 1
            elif errors & FRAME_ERR or length > buf_len:
                rx_errors += 1
            else:
                length -= trim
                if length < ETH_HLEN:
                    rx_errors += 1
                else:
                    rx_packets += 1
                    rx_bytes += length
                    ip_summed = _NONE
                    if not status & IXSM and rxcsum:
                        if errors & CSUM_ERR:
                            csum_errors += 1
                        elif status & TCPCS:
                            csum_good += 1
                            ip_summed = _UNNECESSARY
                    if hooks_none:
                        dropped += 1
                    else:
                        addr = baddr[i]
                        off = <Py_ssize_t>addr - pbase
                        if off < 0 or off + length > dma_len:
                            raise ValueError(f"RX buffer {addr:#x} outside the pool")
                        # alloc_rx_buf, its counters added once per poll (below)
                        need = (length + RX_HEADROOM + 63) & ~63
                        if need <= bsize and scache:
                            buf = scache.pop()
                            hits += 1
                        else:
                            buf = bytearray(bsize if need <= bsize else need)
                        allocs += 1
                        memcpy(PyByteArray_AS_STRING(buf) + RX_HEADROOM, &dma[off], length)
                        copied += length
                        if fast and _udp_fast(&c, ports, udp, buf, length, ip_summed):
                            frees += 1  # free_rx_buf: consume_skb
                            if PyByteArray_GET_SIZE(buf) == bsize and len(scache) < maxc:
                                scache.append(buf)
                        else:
                            # the slow path may look at the driver's state: bring it up to date
                            drv._discarding = discarding
                            drv.napi_gro_receive(skb_around(skpool, buf, length, ip_summed))
            _pool_put(pool, baddr[i], pbase, stride, pcount)
            baddr[i] = None
            desc[o + 12] = 0
            i += 1
            if i == count:
                i = 0
            cleaned += 1
            if cleaned >= batch:
                ring.next_to_clean = i
                _refill(drv, cleaned, desc)
                ntu = ring.next_to_use
                cleaned = 0
    finally:
        ring.next_to_clean = i
        drv._discarding = discarding
        st.rx_packets += rx_packets
        st.rx_bytes += rx_bytes
        drv._irq_rx_packets += rx_packets
        drv._irq_rx_bytes += rx_bytes
        st.rx_length_errors += length_errors
        st.rx_errors += rx_errors
        st.rx_dropped += dropped
        st.rx_csum_offload_good += csum_good
        st.rx_csum_offload_errors += csum_errors
        st.rx_copied_bytes += copied
        # the sk_buff pool's counters, as SkbPool.alloc / _free count them, once per poll
        if allocs:
            skpool.allocs += allocs
            skpool.live += allocs - frees
            skpool.frees += frees
            skpool.cache_hits += hits
            skpool.bytes_copied += copied
        if fast:
            pc.ip_in = c.ip_in
            pc.ip_deliv = c.ip_deliv
            pc.udp_in = c.udp_in
            finish_batch(pc)
    cdef Py_ssize_t unused = ring.unused()
    if unused:
        _refill(drv, unused, desc)
    return work_done
