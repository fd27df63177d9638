# cython: boundscheck=False, wraparound=False, cdivision=True
"""The e1000 transmit and TX clean, compiled: E1000.xmit_py and E1000.clean_tx_irq_py in
driver/e1000.py are the readable twins with the same steps, counters and queue stop/wake
(tests/test_kstack_txfast.py holds them equal: byte-identical descriptors and DMA buffers).

Why: per frame the Python xmit spent most of its time packing a descriptor with struct,
slicing the sk_buff and looking up the DMA region of the buffer; the TX clean did the same
per descriptor and two Python frames per freed sk_buff. Here the descriptor (address,
length, CSO, CMD, CSS; STA and special zero) and the copy into the DMA buffer are C stores
into the ring and the TX buffer pool's memory, and the sk_buffs of one DD run are freed in
one loop (the pool's bookkeeping as SkbPool._free does it; each one's destructor still runs,
so the socket's send memory is given back per skb)."""
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcpy, memset

from kstack.dropreason import SkbDropReason
from kstack.netdevice import NETDEV_TX_BUSY, NETDEV_TX_OK, NetdevFeatures
from kstack.skbuff import CHECKSUM_PARTIAL, SkBuff, SkbPool, _SharedInfo
from kstack._slots cimport slot_get, slot_offset
from nicemu.regs import DESC_SIZE, ETH_MAX_FCS, ETH_MAX_LPE, TXD_STA, TxdCmd, TxdSta
from wire.ethernet import ETH_FCS_LEN

cdef int _BUSY = NETDEV_TX_BUSY
cdef int _OK = NETDEV_TX_OK
cdef int _PARTIAL = CHECKSUM_PARTIAL
cdef int _IP_CSUM = NetdevFeatures.IP_CSUM
cdef int _IFCS = TxdCmd.IFCS
cdef int _IC = TxdCmd.IC
cdef int _DD = TxdSta.DD
cdef Py_ssize_t _DESC = DESC_SIZE
cdef Py_ssize_t _STA = TXD_STA
cdef object _SkbPool = SkbPool
cdef object _DEV_READY = SkbDropReason.DEV_READY
cdef object _TX_ERROR = SkbDropReason.TX_ERROR
cdef Py_ssize_t _MAX_FCS = ETH_MAX_FCS - ETH_FCS_LEN  # E1000Config.max_frame, without a frame
cdef Py_ssize_t _MAX_LPE = ETH_MAX_LPE - ETH_FCS_LEN

assert DESC_SIZE == 16 and TXD_STA == 12

# the sk_buff fields the transmit reads, straight from their slots (kstack/_slots.pxd) when
# the skb is a SkBuff itself (a subclass is read by name)
cdef object _SkBuff = SkBuff
cdef Py_ssize_t _O_DATA = slot_offset(SkBuff, "data")
cdef Py_ssize_t _O_TAIL = slot_offset(SkBuff, "tail")
cdef Py_ssize_t _O_IP_SUMMED = slot_offset(SkBuff, "ip_summed")
cdef Py_ssize_t _O_CSUM_START = slot_offset(SkBuff, "csum_start")
cdef Py_ssize_t _O_CSUM_OFFSET = slot_offset(SkBuff, "csum_offset")
cdef Py_ssize_t _O_SHINFO = slot_offset(SkBuff, "shinfo")
cdef Py_ssize_t _O_SH_BUF = slot_offset(_SharedInfo, "buf")
cdef object _Shinfo = _SharedInfo


cdef class _PoolMem:
    """The TX buffer pool's DMA memory and the ring's descriptors as writable views of the
    shared memory, and their addresses, made once per ring (per open) and kept on the ring
    object, so they go away with the ring before the memory closes. (Acquiring typed views of
    ring.desc and the pool memory on every frame cost two buffer exports per frame; the ring's
    own `desc` view is not exported, so the ring can still release it.)"""
    cdef unsigned char[::1] mem
    cdef unsigned char[::1] desc
    cdef unsigned char* mp
    cdef unsigned char* dp
    cdef object pool
    cdef Py_ssize_t base, size, stride, count

    def __init__(self, drv, pool, ring):
        self.pool = pool
        self.base = pool.base
        self.stride = pool._stride
        self.count = pool.count
        self.size = self.stride * self.count
        self.mem = drv._mem.view(self.base, self.size)
        self.desc = drv._mem.view(ring.base, ring.count * _DESC)
        if self.desc.shape[0] != len(ring.desc):
            raise ValueError("TX ring descriptors outside the DMA memory")
        self.mp = &self.mem[0]
        self.dp = &self.desc[0]


cdef _PoolMem _pool_mem(drv, ring):
    cdef _PoolMem pm = getattr(ring, "_c_pool_mem", None)
    pool = drv.tx_pool
    if pm is None or pm.pool is not pool:
        pm = _PoolMem(drv, pool, ring)
        ring._c_pool_mem = pm
    return pm


cdef inline void _put_desc(unsigned char* p, uint64_t addr, Py_ssize_t length, int cso,
                           int cmd, int css) noexcept nogil:
    """TX_DESC.pack_into(desc, off, addr, length, cso, cmd, 0, css, 0): little-endian."""
    cdef int k
    for k in range(8):
        p[k] = (addr >> (8 * k)) & 0xFF
    p[8] = length & 0xFF
    p[9] = (length >> 8) & 0xFF
    p[10] = cso
    p[11] = cmd
    p[12] = 0
    p[13] = css
    p[14] = 0
    p[15] = 0


cdef inline Py_ssize_t _unused(Py_ssize_t count, Py_ssize_t ntu, Py_ssize_t ntc) noexcept nogil:
    """E1000_DESC_UNUSED (driver.rings.desc_unused)."""
    return (0 if ntc > ntu else count) + ntc - ntu - 1


def xmit(drv, skb, bint xmit_more):
    """See E1000.xmit_py (e1000_xmit_frame)."""
    st = drv.stats
    if drv.queue_stopped:
        st.tx_busy += 1
        return _BUSY
    cdef bint direct = type(skb) is _SkBuff
    cdef Py_ssize_t data = slot_get(skb, _O_DATA) if direct else skb.data
    cdef Py_ssize_t length = (<Py_ssize_t>slot_get(skb, _O_TAIL) if direct else <Py_ssize_t>skb.tail) - data
    if not drv.carrier or not drv.is_open:
        st.tx_dropped += 1
        skb.drop(_DEV_READY)
        return _OK
    cfg = drv.config
    cdef Py_ssize_t max_frame = _MAX_LPE if cfg.long_packets else _MAX_FCS  # cfg.max_frame
    if not 14 <= length <= max_frame:
        st.tx_dropped += 1
        skb.drop(_TX_ERROR)
        return _OK
    ring = drv.tx_ring
    cdef Py_ssize_t per_desc = cfg.tx_buffer_len
    cdef Py_ssize_t count = (length + per_desc - 1) // per_desc
    cdef Py_ssize_t n = ring.count
    if _unused(n, ring.next_to_use, ring.next_to_clean) < count + 2:
        drv.maybe_stop_tx(count + 2)  # stops the queue and counts it, as the twin does
        st.tx_busy += 1
        drv.flush_tx()
        return _BUSY
    cdef int cso = 0, css = 0, ic = 0
    cdef Py_ssize_t c0, c1
    if <int>(slot_get(skb, _O_IP_SUMMED) if direct else skb.ip_summed) == _PARTIAL:
        c0 = <Py_ssize_t>(slot_get(skb, _O_CSUM_START) if direct else skb.csum_start) - data
        c1 = c0 + <Py_ssize_t>(slot_get(skb, _O_CSUM_OFFSET) if direct else skb.csum_offset)
        if (<int>drv.features & _IP_CSUM) and 0 <= c0 < c1 <= 0xFF and c1 + 2 <= length:
            css = c0
            cso = c1
            ic = _IC
            st.tx_csum_offload += 1
        else:
            _checksum_help(skb)
            st.tx_csum_help += 1
    sh = slot_get(skb, _O_SHINFO) if direct else skb.shinfo
    buf = slot_get(sh, _O_SH_BUF) if type(sh) is _Shinfo else sh.buf
    if type(buf) is not bytearray:
        raise TypeError("sk_buff buffers are bytearrays")
    data = slot_get(skb, _O_DATA) if direct else skb.data  # _checksum_help leaves it, as the twin reads it here
    if data < 0 or data + length > PyByteArray_GET_SIZE(buf):
        raise ValueError("sk_buff data outside its buffer")
    cdef const uint8_t* src = <const uint8_t*>PyByteArray_AS_STRING(buf) + data
    cdef _PoolMem pm = _pool_mem(drv, ring)
    cdef unsigned char* dp = pm.dp
    cdef unsigned char* mp = pm.mp
    free = pm.pool._free
    baddr = ring.buffer_addr
    cdef int txd_cmd = drv._txd_cmd
    cdef Py_ssize_t first = ring.next_to_use
    cdef Py_ssize_t i = first, last = first, off = 0, chunk, rel
    cdef uint64_t addr
    while off < length:
        chunk = length - off
        if chunk > per_desc:
            chunk = per_desc
        a = free.pop()  # never empty: one buffer per descriptor
        addr = a
        rel = <Py_ssize_t>(addr - <uint64_t>pm.base)
        if rel < 0 or rel + chunk > pm.size:
            raise ValueError(f"TX buffer {addr:#x}+{chunk} outside the pool")
        memcpy(mp + rel, src + off, chunk)
        baddr[i] = a
        last = i
        _put_desc(dp + i * _DESC, addr, chunk,
                  cso, (txd_cmd if off + per_desc >= length else _IFCS) | ic, css)
        i += 1
        if i == n:
            i = 0
        off += per_desc
    st.tx_copied_bytes += length
    ring.next_to_watch[first] = last
    ring.skb[first] = skb
    ring.next_to_use = i
    cdef Py_ssize_t needed = drv.tx_desc_needed
    if _unused(n, i, ring.next_to_clean) < needed:
        drv.maybe_stop_tx(needed)
    if not xmit_more or drv.queue_stopped:
        drv._tx_doorbell()
    else:
        drv._tx_doorbell_pending = True
    return _OK


cdef object _checksum_help = None


def _set_checksum_help(fn):
    """driver.e1000 hands over its skb_checksum_help (the rare software fallback)."""
    global _checksum_help
    _checksum_help = fn


cdef void _consume(skb) except *:
    """consume_skb: SkbPool._free(skb, None) for the pool class itself (any other pool, or
    a subclass, gets its own method)."""
    pool = skb.pool
    if type(pool) is not _SkbPool:
        skb.consume()
        return
    if skb.freed:
        raise RuntimeError("double free of an sk_buff")
    skb.freed = True
    d = skb.destructor
    if d is not None:  # skb->destructor (sock_wfree gives the socket its wmem back)
        skb.destructor = None
        d(skb)
    pool.frees += 1
    pool.live -= 1
    sh = skb.shinfo
    sh.dataref -= 1
    if sh.dataref == 0:
        b = sh.buf
        cache = pool._cache
        if len(b) == pool.buffer_size and len(cache) < pool.max_cached:
            cache.append(b)


def clean_tx(drv):
    """See E1000.clean_tx_irq_py (e1000_clean_tx_irq)."""
    ring = drv.tx_ring
    cdef Py_ssize_t n = ring.count
    cdef _PoolMem pm = _pool_mem(drv, ring)
    cdef unsigned char* dp = pm.dp
    cdef Py_ssize_t base = pm.base, stride = pm.stride, pcount = pm.count
    free = pm.pool._free
    nbw = ring.next_to_watch
    skbs = ring.skb
    baddr = ring.buffer_addr
    cdef Py_ssize_t i = ring.next_to_clean, count = 0, eop, off, packets = 0, nbytes = 0, b
    cdef bint cleaned
    try:
        while count < n:
            e = nbw[i]
            if e is None:
                break
            eop = e
            if not dp[eop * _DESC + _STA] & _DD:  # DD of the frame's last descriptor
                break
            skb = skbs[i]
            nbw[i] = None
            skbs[i] = None
            while True:
                cleaned = i == eop
                a = baddr[i]
                off = <Py_ssize_t>a - base  # DmaBufferPool.put's check
                if off < 0 or off % stride or off // stride >= pcount:
                    raise ValueError(f"{a:#x} is not a buffer of this pool")
                free.append(a)
                baddr[i] = None
                memset(dp + i * _DESC, 0, _DESC)
                i += 1
                if i == n:
                    i = 0
                count += 1
                if cleaned:
                    break
            b = 0
            if skb is not None:
                b = <Py_ssize_t>skb.tail - <Py_ssize_t>skb.data
                _consume(skb)  # sent: dev_consume_skb_any
            packets += 1
            nbytes += b
    finally:  # the twin counts per frame: what was freed is counted even on an error
        st = drv.stats
        st.tx_packets += packets
        st.tx_bytes += nbytes
        drv._irq_tx_packets += packets
        drv._irq_tx_bytes += nbytes
    ring.next_to_clean = i
    if count:
        drv._maybe_wake_queue()
    return count < n
