# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# distutils: include_dirs = nicemu/include
# distutils: extra_compile_args = -O3
"""Datapath: the per-frame work of the 82540EM in Cython (the default engine).

The same logic as nicemu.datapath_ref.RefDatapath, step for step (read that file first: it is
the specification; tests/test_datapath_agree.py holds the two to identical results). Here the
work runs on raw pointers into the register file and into the DMA regions, the packet buffers
are C byte rings, and a frame sent to a linked peer engine goes from
this engine's TX scratch buffer straight into the peer's receive path: no Python object is made
per frame on that path.

Memory ordering (docs/datapath.md): descriptor fields are written before the status byte, and
the status byte is written with a release store (nicemu/include/nicemu_atomic.h).
The FCS is CRC-32 by carry-less multiply folding (PCLMULQDQ, when the CPU has it) with a
slicing-by-8 table for short buffers and tails (nicemu/include/nicemu_crc32.h).
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyObject_GetBuffer, PyBuffer_Release
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memset
from nicemu.cable._capring cimport CapRing

cdef extern from "nicemu_crc32.h" nogil:
    void nicemu_crc32_init()
    uint32_t nicemu_crc32(uint32_t crc, const uint8_t *p, size_t n)
    uint32_t nicemu_crc32_portable(uint32_t crc, const uint8_t *p, size_t n)
    int nicemu_crc_clmul

cdef extern from "nicemu_atomic.h" nogil:
    void nicemu_store_release_u8(uint8_t *p, uint8_t v)

cdef extern from *:
    """
    /* Cache hints for the buffers of upcoming descriptors: the buffers sit a page apart, where
     * the hardware prefetchers do not look. A hint never faults. */
    static inline void nicemu_prefetch_r(const void *p) { __builtin_prefetch(p, 0, 3); }
    static inline void nicemu_prefetch_w(const void *p) { __builtin_prefetch(p, 1, 3); }
    """
    void nicemu_prefetch_r(const void *p) nogil
    void nicemu_prefetch_w(const void *p) nogil

__all__ = ["Datapath", "crc32", "TX_BUDGET"]

nicemu_crc32_init()


def crc32(const uint8_t[::1] data not None, uint32_t crc=0, bint portable=False):
    """The engine's CRC-32 (what it uses for the FCS); equals zlib.crc32(data, crc).

    portable=True: the slicing-by-8 path alone, without carry-less multiply."""
    cdef size_t n = data.shape[0]
    if n == 0:
        return crc
    if portable:
        return nicemu_crc32_portable(crc, &data[0], n)
    return nicemu_crc32(crc, &data[0], n)


def crc32_uses_clmul():
    """True when this CPU runs the carry-less multiply CRC."""
    return bool(nicemu_crc_clmul)

# --- register offsets (words: offset >> 2) and bits, as in nicemu.regs ----------------------
cdef enum:
    R_RCTL = 0x0100 >> 2
    R_TCTL = 0x0400 >> 2
    R_PBA = 0x1000 >> 2
    R_RDBAL = 0x2800 >> 2
    R_RDBAH = 0x2804 >> 2
    R_RDLEN = 0x2808 >> 2
    R_RDH = 0x2810 >> 2
    R_RDT = 0x2818 >> 2
    R_TDBAL = 0x3800 >> 2
    R_TDBAH = 0x3804 >> 2
    R_TDLEN = 0x3808 >> 2
    R_TDH = 0x3810 >> 2
    R_TDT = 0x3818 >> 2
    R_RXCSUM = 0x5000 >> 2
    R_MTA = 0x5200 >> 2
    R_RA = 0x5400 >> 2
    R_CRCERRS = 0x4000 >> 2
    R_MPC = 0x4010 >> 2
    R_PRC64 = 0x405C >> 2
    R_GPRC = 0x4074 >> 2
    R_BPRC = 0x4078 >> 2
    R_MPRC = 0x407C >> 2
    R_GPTC = 0x4080 >> 2
    R_GORCL = 0x4088 >> 2
    R_GOTCL = 0x4090 >> 2
    R_RNBC = 0x40A0 >> 2
    R_RUC = 0x40A4 >> 2
    R_ROC = 0x40AC >> 2
    R_TORL = 0x40C0 >> 2
    R_TOTL = 0x40C8 >> 2
    R_TPR = 0x40D0 >> 2
    R_TPT = 0x40D4 >> 2
    R_PTC64 = 0x40D8 >> 2
    R_MPTC = 0x40F0 >> 2
    R_BPTC = 0x40F4 >> 2

    RCTL_EN = 0x2
    RCTL_SBP = 0x4
    RCTL_UPE = 0x8
    RCTL_MPE = 0x10
    RCTL_LPE = 0x20
    RCTL_BAM = 0x8000
    RCTL_BSEX = 0x02000000
    RCTL_SECRC = 0x04000000
    TCTL_EN = 0x2
    TCTL_PSP = 0x8
    RXCSUM_IPOFL = 0x100
    RXCSUM_TUOFL = 0x200

    CMD_EOP = 0x01
    CMD_IFCS = 0x02
    CMD_IC = 0x04
    CMD_RS = 0x08
    CMD_DEXT = 0x20
    CMD_IDE = 0x80
    STA_DD = 0x1

    RXS_DD = 0x01
    RXS_EOP = 0x02
    RXS_IXSM = 0x04
    RXS_TCPCS = 0x20
    RXS_IPCS = 0x40
    RXE_CE = 0x01
    RXE_TCPE = 0x20
    RXE_IPE = 0x40

    ICR_TXDW = 0x01
    ICR_TXQE = 0x02
    ICR_RXDMT0 = 0x10
    ICR_RXO = 0x40

    DESC = 16
    MAX_FRAME = 16384
    PB_MAX = 65536  # packet buffer bytes per direction (a power of two: the rings mask with it)
    PB_MASK = 65535
    PB_LINE = 16
    MAX_RX_BUFS = 64
    RING_LEN_MASK = 0x000FFF80
    RING_BASE_MASK = 0xFFFFFFF0
    FCS_RESIDUE = 0x2144DF1C

    # results of _dma_frame
    RX_WRITTEN = 0
    RX_DROPPED = 1
    RX_NO_DESC = 2
    RX_NOT_NOW = 3

    PREFETCH_AHEAD = 4  # descriptors

    # TX descriptors one walk may fetch (datapath_ref.TX_BUDGET)
    TX_WALK_BUDGET = 4096

    # how fetching one packet's descriptors ended (datapath_ref._fetch_chain)
    CH_OPEN = 0
    CH_BUDGET = 1
    CH_EOP = 2
    CH_FAULT = 3
    CH_LONE_DEXT = 4
    CH_OVERSIZE = 5

TX_BUDGET = TX_WALK_BUDGET

cdef uint32_t RAH_AV = 0x80000000U
cdef uint64_t EV_RX_DONE = 1ULL << 32
cdef uint64_t EV_TX_IDE = 1ULL << 33
cdef uint64_t EV_TX_MORE = 1ULL << 34
cdef uint64_t U64_MAX = 0xFFFFFFFFFFFFFFFFULL


cdef struct Region:
    uint64_t addr
    uint64_t size
    uint8_t *ptr
    bint writable


cdef struct PktBuf:
    # A byte ring of records: a 16-byte status line (u32 length, u8 status, u8 errors,
    # u16 csum) and the frame in 16-byte lines. Records are contiguous from `head`; data may
    # wrap at the end of the ring (headers never do: everything is a multiple of 16).
    uint8_t *mem
    uint32_t head
    uint32_t used
    uint32_t count


cdef inline uint32_t pb_record_size(uint32_t n) noexcept nogil:
    return ((n + PB_LINE - 1) & ~(<uint32_t>PB_LINE - 1)) + PB_LINE


cdef inline void pb_push(PktBuf *pb, const uint8_t *data, uint32_t n, uint8_t status,
                         uint8_t errors, uint16_t csum) noexcept nogil:
    cdef uint32_t t = (pb.head + pb.used) & PB_MASK
    cdef uint8_t *h = pb.mem + t
    memcpy(h, &n, 4)
    h[4] = status
    h[5] = errors
    memcpy(h + 6, &csum, 2)
    t = (t + PB_LINE) & PB_MASK
    cdef uint32_t first = PB_MAX - t
    if n <= first:
        memcpy(pb.mem + t, data, n)
    else:
        memcpy(pb.mem + t, data, first)
        memcpy(pb.mem, data + first, n - first)
    pb.used += pb_record_size(n)
    pb.count += 1


cdef inline const uint8_t *pb_peek(PktBuf *pb, uint8_t *scratch, uint32_t *n, uint8_t *status,
                                   uint8_t *errors, uint16_t *csum) noexcept nogil:
    """The oldest record's frame: a pointer into the ring, or into `scratch` when it wraps."""
    cdef uint8_t *h = pb.mem + pb.head
    memcpy(n, h, 4)
    status[0] = h[4]
    errors[0] = h[5]
    memcpy(csum, h + 6, 2)
    cdef uint32_t t = (pb.head + PB_LINE) & PB_MASK
    cdef uint32_t first = PB_MAX - t
    if n[0] <= first:
        return pb.mem + t
    memcpy(scratch, pb.mem + t, first)
    memcpy(scratch + first, pb.mem, n[0] - first)
    return scratch


cdef inline void pb_pop(PktBuf *pb) noexcept nogil:
    cdef uint32_t n
    memcpy(&n, pb.mem + pb.head, 4)
    cdef uint32_t rec = pb_record_size(n)
    pb.head = (pb.head + rec) & PB_MASK
    pb.used -= rec
    pb.count -= 1


cdef inline uint32_t ones_sum(const uint8_t *p, uint32_t n, uint64_t start) noexcept nogil:
    """RFC 1071 ones'-complement sum of big-endian 16-bit words (not complemented), folded.

    Summed four bytes at a time in the machine's (little-endian) order: the ones'-complement
    sum does not depend on byte order (RFC 1071, 2(B)), so the folded sum is byte-swapped once
    at the end, then `start` (a big-endian partial sum) is added. Zero only when every byte
    and `start` are, as when summing word by word."""
    cdef uint64_t s = 0
    cdef uint32_t w
    cdef uint32_t i = 0
    while i + 4 <= n:
        memcpy(&w, p + i, 4)
        s += w
        i += 4
    if i + 2 <= n:
        s += p[i] | (<uint32_t>p[i + 1] << 8)
        i += 2
    if i < n:
        s += p[i]
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    s = ((s & 0xFF) << 8) | (s >> 8)
    s += start
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return <uint32_t>s


cdef inline int size_bucket(uint32_t n) noexcept nogil:
    if n <= 64:
        return 0
    if n <= 127:
        return 1
    if n <= 255:
        return 2
    if n <= 511:
        return 3
    if n <= 1023:
        return 4
    if n <= 1522:
        return 5
    return -1


cdef inline uint32_t rx_buffer_size(uint32_t rctl) noexcept nogil:
    cdef uint32_t bsize = (rctl >> 16) & 3
    if rctl & RCTL_BSEX:
        if bsize == 1:
            return 16384
        if bsize == 2:
            return 8192
        if bsize == 3:
            return 4096
        return 2048
    return 2048 >> bsize


cdef inline void append_fcs(uint8_t *f, uint64_t data_len) noexcept nogil:
    """Store the FCS of f[:data_len] after it (CRC-32, least significant byte first)."""
    cdef uint32_t fcs = nicemu_crc32(0, f, data_len)
    f[data_len] = <uint8_t>fcs
    f[data_len + 1] = <uint8_t>(fcs >> 8)
    f[data_len + 2] = <uint8_t>(fcs >> 16)
    f[data_len + 3] = <uint8_t>(fcs >> 24)


cdef inline uint64_t le64(const uint8_t *p) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(7, -1, -1):
        v = (v << 8) | p[i]
    return v


cdef inline bint ends_packet(const uint8_t *c) noexcept nogil:
    """A legacy TX descriptor with CMD.EOP (a DEXT=1 descriptor's EOP is ignored)."""
    return (c[11] & (CMD_EOP | CMD_DEXT)) == CMD_EOP


cdef inline bint is_broadcast(const uint8_t *d) noexcept nogil:
    return (d[0] & d[1] & d[2] & d[3] & d[4] & d[5]) == 0xFF


cdef void rx_checksum_offload(const uint8_t *d, uint32_t n, uint32_t rxcsum, uint8_t *status,
                              uint8_t *errors, uint16_t *csum) noexcept nogil:
    """RX checksum offload over a frame without its FCS: see datapath_ref.rx_checksum_offload."""
    cdef uint8_t st = 0
    cdef uint8_t er = 0
    cdef uint32_t cs = 0
    cdef bint checked = False
    cdef uint32_t pcss, ihl, proto, total, frag, seg_len, min_len, pseudo
    if rxcsum & (RXCSUM_IPOFL | RXCSUM_TUOFL):
        pcss = rxcsum & 0xFF
        if pcss < n:
            cs = ones_sum(d + pcss, n - pcss, 0)
        if n >= 34 and d[12] == 0x08 and d[13] == 0x00 and d[14] >> 4 == 4:
            ihl = (d[14] & 0x0F) * 4
            if ihl >= 20 and 14 + ihl <= n:
                if rxcsum & RXCSUM_IPOFL:
                    checked = True
                    st |= RXS_IPCS
                    if ones_sum(d + 14, ihl, 0) != 0xFFFF:
                        er |= RXE_IPE
                if rxcsum & RXCSUM_TUOFL:
                    proto = d[23]
                    total = (<uint32_t>d[16] << 8) | d[17]
                    frag = ((<uint32_t>d[20] << 8) | d[21]) & 0x3FFF
                    min_len = 20 if proto == 6 else 8
                    if (proto == 6 or proto == 17) and frag == 0 and total >= ihl + min_len \
                            and 14 + total <= n:
                        seg_len = total - ihl
                        if not (proto == 17 and d[14 + ihl + 6] == 0 and d[14 + ihl + 7] == 0):
                            checked = True
                            st |= RXS_TCPCS
                            pseudo = ones_sum(d + 26, 8, proto + seg_len)
                            if ones_sum(d + 14 + ihl, seg_len, pseudo) != 0xFFFF:
                                er |= RXE_TCPE
    if not checked:
        st |= RXS_IXSM
    status[0] = st
    errors[0] = er
    csum[0] = <uint16_t>cs


cdef class Datapath:
    """The data path engine in Cython (interface: docs/architecture.md, "Nic <-> datapath")."""

    cdef readonly object regs
    cdef readonly object mem
    cdef public bint bus_master
    cdef public object sink
    cdef readonly object peer
    cdef Datapath _peer_c  # the peer when it is a Datapath too: frames go to it in C
    cdef public unsigned long long dma_errors
    cdef public unsigned long long tx_dropped
    cdef public unsigned long long tx_dext_skipped
    cdef public unsigned long long tx_descs_fetched
    cdef public unsigned long long rx_dropped
    cdef public unsigned long long rx_written
    cdef public CapRing capture  # a capture ring: every frame put on the wire is recorded

    cdef uint32_t *r  # the register file
    cdef Py_buffer _regs_buf
    cdef bint _have_regs_buf
    cdef Region *_regions
    cdef Py_buffer *_bufs
    cdef int _nregions
    cdef object _generation
    cdef PktBuf _txq
    cdef PktBuf _rxq
    cdef uint8_t *_tx_scratch  # a packet being built from its descriptors
    cdef uint8_t *_tx_flush  # a TX packet buffer record made contiguous
    cdef uint8_t *_rx_scratch  # an RX packet buffer record made contiguous
    cdef uint8_t *_chain  # copies of the descriptors of one TX packet, kept between walks
    cdef uint32_t _chain_cap
    cdef uint32_t _chain_count  # descriptors fetched of the packet at TDH
    cdef uint64_t _chain_len  # its data bytes so far
    cdef uint64_t _chain_base  # the ring and TDH at the end of the last walk
    cdef uint32_t _chain_n
    cdef uint32_t _chain_head
    cdef bint _discard  # dropping the rest of an oversize packet, up to its EOP
    cdef uint64_t _events
    cdef list _sent
    cdef bint _in_transmit  # a sink that calls back into transmit() gets a no-op

    def __cinit__(self, regs, mem):
        PyObject_GetBuffer(regs, &self._regs_buf, PyBUF_WRITABLE)
        self._have_regs_buf = True
        if self._regs_buf.len < 0x20000:
            raise ValueError("the register file must hold 0x20000 bytes")
        self.r = <uint32_t *>self._regs_buf.buf
        self.regs = regs
        self.mem = mem
        self._txq.mem = <uint8_t *>malloc(PB_MAX)
        self._rxq.mem = <uint8_t *>malloc(PB_MAX)
        self._tx_scratch = <uint8_t *>malloc(MAX_FRAME + 64)
        self._tx_flush = <uint8_t *>malloc(MAX_FRAME + 64)
        self._rx_scratch = <uint8_t *>malloc(MAX_FRAME + 64)
        self._chain_cap = 64
        self._chain = <uint8_t *>malloc(self._chain_cap * DESC)
        if not (self._txq.mem and self._rxq.mem and self._tx_scratch and self._tx_flush
                and self._rx_scratch and self._chain):
            raise MemoryError()
        self._sent = []
        self._generation = None

    def __dealloc__(self):
        self._release_regions()
        if self._have_regs_buf:
            PyBuffer_Release(&self._regs_buf)
        free(self._txq.mem)
        free(self._rxq.mem)
        free(self._tx_scratch)
        free(self._tx_flush)
        free(self._rx_scratch)
        free(self._chain)

    # --- DMA regions ----------------------------------------------------------------------

    cdef void _release_regions(self) noexcept:
        cdef int i
        for i in range(self._nregions):
            PyBuffer_Release(&self._bufs[i])
        free(self._regions)
        free(self._bufs)
        self._regions = NULL
        self._bufs = NULL
        self._nregions = 0

    cdef int _check_mem(self) except -1:
        """Refresh the cached region pointers when the DmaMemory mapping changed."""
        gen = self.mem.generation
        if gen == self._generation:
            return 0
        self._release_regions()
        regions = list(self.mem.regions)
        cdef int k = len(regions)
        self._regions = <Region *>malloc(max(k, 1) * sizeof(Region))
        self._bufs = <Py_buffer *>malloc(max(k, 1) * sizeof(Py_buffer))
        if not self._regions or not self._bufs:
            raise MemoryError()
        cdef int i = 0
        cdef bint writable
        for reg in regions:
            writable = True
            try:
                PyObject_GetBuffer(reg.mm, &self._bufs[i], PyBUF_WRITABLE)
            except (BufferError, TypeError, ValueError):
                writable = False
                try:
                    PyObject_GetBuffer(reg.mm, &self._bufs[i], PyBUF_SIMPLE)
                except (BufferError, TypeError, ValueError):
                    continue  # a closed mapping: not reachable
            self._regions[i].addr = reg.addr
            self._regions[i].size = min(<uint64_t>reg.size, <uint64_t>self._bufs[i].len)
            self._regions[i].ptr = <uint8_t *>self._bufs[i].buf
            self._regions[i].writable = writable
            i += 1
            self._nregions = i
        self._generation = gen
        return 0

    cdef inline uint8_t *_dma(self, uint64_t addr, uint64_t n, bint write) noexcept nogil:
        """Host memory [addr, addr + n) if it lies inside one mapped region, else NULL."""
        cdef int i
        cdef Region *g
        cdef uint64_t off
        for i in range(self._nregions):
            g = &self._regions[i]
            if addr >= g.addr:
                off = addr - g.addr
                if off <= g.size and n <= g.size - off:
                    if write and not g.writable:
                        return NULL
                    return g.ptr + off
        return NULL

    cdef inline uint8_t *_desc(self, uint64_t base, uint32_t idx, bint write) noexcept nogil:
        """Descriptor `idx` of the ring at `base`, or NULL. A ring that runs past the top of the
        64-bit bus address space does not wrap to address 0 (as the reference's integers do
        not): those descriptors are faults."""
        cdef uint64_t addr = base + <uint64_t>idx * DESC
        if addr < base:
            return NULL
        return self._dma(addr, DESC, write)

    # --- statistics -------------------------------------------------------------------------

    cdef inline void _count(self, int word, uint32_t n) noexcept nogil:
        cdef uint32_t v = self.r[word] + n
        if v < n:
            v = 0xFFFFFFFF
        self.r[word] = v

    cdef inline void _count64(self, int word, uint64_t n) noexcept nogil:
        cdef uint64_t v = self.r[word] | (<uint64_t>self.r[word + 1] << 32)
        cdef uint64_t w = v + n
        if w < v:
            w = U64_MAX
        self.r[word] = <uint32_t>w
        self.r[word + 1] = <uint32_t>(w >> 32)

    cdef inline uint32_t _pb_capacity(self, int shift) noexcept nogil:
        cdef uint32_t kb = (self.r[R_PBA] >> shift) & 0xFFFF
        if kb > PB_MAX // 1024:
            kb = PB_MAX // 1024
        return kb * 1024

    # --- the engine interface -----------------------------------------------------------------

    def link(self, peer):
        """Deliver transmitted frames straight to `peer` (None: back to the sink)."""
        self.peer = peer
        self._peer_c = peer if isinstance(peer, Datapath) else None

    def deliver(self, frame):
        """A frame from a linked peer: received now, its events kept for take_events()."""
        self._events |= self.receive(frame)

    def take_events(self):
        ev = self._events
        self._events = 0
        return ev

    def take_transmitted(self):
        sent = self._sent
        self._sent = []
        return sent

    @property
    def rx_queued(self):
        """Frames waiting in the RX packet buffer."""
        return self._rxq.count

    @property
    def tx_queued(self):
        """Frames waiting in the TX packet buffer."""
        return self._txq.count

    def reset(self):
        """Power-on reset: both packet buffers and the packet being fetched are emptied (the
        diagnostics counters stay)."""
        self._txq.head = self._txq.used = self._txq.count = 0
        self._forget_chain()
        self._rxq.head = self._rxq.used = self._rxq.count = 0
        self._events = 0
        self._sent = []

    def transmit(self):
        """TDT write: send what waits in the TX packet buffer, then walk the TX ring."""
        if self._in_transmit:
            return 0
        self._check_mem()
        if self._peer_c is not None:
            self._peer_c._check_mem()
        self._in_transmit = True
        try:
            self._flush_tx()
            return self._walk_tx()
        finally:
            self._in_transmit = False

    def tx_resume(self):
        """The cable can take frames again: send waiting frames, then fetch more descriptors."""
        return self.transmit()

    def receive(self, const uint8_t[::1] frame not None):
        """A frame from the cable, FCS included: checks, filter, RX packet buffer, DMA."""
        self._check_mem()
        cdef uint32_t n = <uint32_t>frame.shape[0]
        if n == 0:
            return self._rx(<const uint8_t *>b"", 0)
        return self._rx(&frame[0], n)

    def drain_rx(self):
        """RDT write (or RCTL.EN / bus master turned on): DMA frames waiting in the RX buffer."""
        self._check_mem()
        cdef bint no_desc = False
        return self._drain(&no_desc)

    # --- transmit ---------------------------------------------------------------------------

    cdef int _grow_chain(self, uint32_t need) except -1:
        if need <= self._chain_cap:
            return 0
        cdef uint8_t *p = <uint8_t *>realloc(self._chain, need * DESC)
        if not p:
            raise MemoryError()
        self._chain = p
        self._chain_cap = need
        return 0

    cdef uint64_t _walk_tx(self) except? 0xFFFFFFFFFFFFFFFF:
        """Walk the legacy TX descriptors from TDH to TDT, fetching at most TX_BUDGET (see
        RefDatapath._walk_tx)."""
        cdef uint32_t *r = self.r
        if not (r[R_TCTL] & TCTL_EN) or not self.bus_master:
            return 0
        cdef uint32_t n = (r[R_TDLEN] & RING_LEN_MASK) // DESC
        cdef uint32_t head = r[R_TDH] & 0xFFFF
        cdef uint32_t tail = r[R_TDT] & 0xFFFF
        if head >= n or tail >= n:
            n = 0
        if n == 0:
            return 0
        cdef uint64_t base = (<uint64_t>r[R_TDBAH] << 32) | (r[R_TDBAL] & RING_BASE_MASK)
        self._grow_chain(n)
        cdef uint32_t avail = tail - head if tail >= head else tail + n - head
        if base != self._chain_base or n != self._chain_n or head != self._chain_head \
                or self._chain_count > avail:
            self._forget_chain()  # TDH, the ring or TDT moved under what was fetched
        # budget: descriptors this walk may still fetch (what it fetched is counted at the end)
        cdef uint32_t budget = TX_WALK_BUDGET
        cdef uint64_t events = 0
        cdef uint32_t consumed = 0
        cdef uint32_t count, k, idx, used
        cdef int state
        while avail:
            if self._discard:
                if budget == 0:
                    events |= EV_TX_MORE
                    break
                budget -= 1
                events |= self._discard_one(base, head)
                used = 1
            else:
                if self._chain_count == 0:
                    self._prefetch_tx(base, n, head, tail)
                state = self._fetch_chain(base, n, head, avail, &budget)
                count = self._chain_count
                if state == CH_EOP:
                    if self._tx_packet(count):
                        break  # no room in the TX packet buffer: after tx_resume()
                elif state == CH_BUDGET:
                    events |= EV_TX_MORE
                    break
                elif state == CH_OPEN:
                    if count < n - 1:
                        break  # wait for TDT to move on: the chain stays fetched
                    self.tx_dropped += 1
                elif state == CH_OVERSIZE:
                    self.tx_dropped += 1
                    self._discard = True
                elif state == CH_FAULT and count:
                    self.tx_dropped += 1
                idx = head
                for k in range(count):
                    events |= self._write_back(base, idx, self._chain + k * DESC)
                    idx += 1
                    if idx == n:
                        idx = 0
                used = count + (1 if state == CH_FAULT else 0)
                self._chain_count = 0
                self._chain_len = 0
            consumed += used
            avail -= used
            head += used
            if head >= n:
                head -= n
            r[R_TDH] = head
        self.tx_descs_fetched += TX_WALK_BUDGET - budget
        self._chain_base = base
        self._chain_n = n
        self._chain_head = head
        if consumed and head == tail:
            events |= ICR_TXQE
        return events

    cdef inline void _forget_chain(self) noexcept nogil:
        self._chain_count = 0
        self._chain_len = 0
        self._discard = False

    cdef inline int _fetch_chain(self, uint64_t base, uint32_t n, uint32_t head, uint32_t avail,
                                 uint32_t *budget) noexcept nogil:
        """Fetch the packet at TDH after what is already fetched, up to its EOP, TDT (`avail`
        descriptors from TDH) or the end of the budget (see RefDatapath._fetch_chain); returns
        how it ended."""
        cdef uint32_t count = self._chain_count  # kept in locals: stored back on every exit
        cdef uint32_t left = budget[0]
        cdef uint32_t idx
        cdef uint8_t *c
        cdef const uint8_t *d
        cdef int state = CH_OPEN
        if count and ends_packet(self._chain + (count - 1) * DESC):
            return CH_EOP  # fetched by an earlier walk, which found no room for it
        while count < avail:
            if left == 0:
                state = CH_BUDGET
                break
            left -= 1
            idx = head + count
            if idx >= n:
                idx -= n
            d = self._desc(base, idx, False)
            if d == NULL:
                self.dma_errors += 1
                state = CH_FAULT
                break
            c = self._chain + count * DESC
            memcpy(c, d, DESC)
            count += 1
            if c[11] & CMD_DEXT:
                if count == 1:
                    state = CH_LONE_DEXT
                    break
                continue
            if c[11] & CMD_EOP:
                state = CH_EOP
                break
            self._chain_len += c[8] | (<uint32_t>c[9] << 8)
            if self._tx_too_long(self._chain_len):
                state = CH_OVERSIZE
                break
        self._chain_count = count
        budget[0] = left
        return state

    cdef uint64_t _discard_one(self, uint64_t base, uint32_t idx) noexcept nogil:
        """Consume descriptor `idx` of a packet dropped for its size (see
        RefDatapath._discard_one)."""
        cdef const uint8_t *d = self._desc(base, idx, False)
        if d == NULL:
            self.dma_errors += 1
            self._discard = False
            return 0
        cdef uint8_t c[DESC]
        memcpy(c, d, DESC)
        if ends_packet(c):
            self._discard = False
        return self._write_back(base, idx, c)

    cdef inline uint64_t _write_back(self, uint64_t base, uint32_t idx, const uint8_t *c) noexcept nogil:
        """STA.DD into descriptor `idx` (fetched as `c`) if CMD.RS, with a release store (the
        fetched copy's upper nibble kept); returns the event it raises."""
        if c[11] & CMD_DEXT:
            self.tx_dext_skipped += 1
        if not (c[11] & CMD_RS):
            return 0
        cdef uint8_t *w = self._desc(base, idx, True)
        if w == NULL:
            self.dma_errors += 1
            return 0
        nicemu_store_release_u8(w + 12, (c[12] & 0xF0) | STA_DD)
        return EV_TX_IDE if c[11] & CMD_IDE else ICR_TXDW

    cdef inline bint _tx_too_long(self, uint64_t frame_len) noexcept nogil:
        """Over MAX_FRAME, or larger than the whole TX packet buffer (see RefDatapath)."""
        return frame_len > MAX_FRAME or pb_record_size(<uint32_t>frame_len) > self._pb_capacity(16)

    cdef inline void _prefetch_tx(self, uint64_t base, uint32_t n, uint32_t head,
                                  uint32_t tail) noexcept nogil:
        """Hint the cache about the buffer PREFETCH_AHEAD descriptors on, if it is queued."""
        cdef uint32_t ahead = tail - head if tail >= head else tail + n - head
        if ahead <= PREFETCH_AHEAD:
            return
        cdef uint32_t idx = head + PREFETCH_AHEAD
        if idx >= n:
            idx -= n
        cdef const uint8_t *d = self._desc(base, idx, False)
        if d == NULL:
            return
        cdef const uint8_t *b = self._dma(le64(d), 64, False)
        if b != NULL:
            nicemu_prefetch_r(b)

    cdef int _tx_packet(self, uint32_t count) except -1:
        """Build one packet from the fetched chain and send or queue it; 1 = no room: stop."""
        cdef uint32_t *r = self.r
        cdef uint64_t total = 0
        cdef uint32_t k, length
        cdef const uint8_t *c
        for k in range(count):
            c = self._chain + k * DESC
            if not (c[11] & CMD_DEXT):
                total += c[8] | (<uint32_t>c[9] << 8)
        c = self._chain + (count - 1) * DESC
        cdef uint8_t cmd = c[11]
        cdef uint32_t cso = c[10]
        cdef uint32_t css = c[13]
        cdef uint64_t data_len = total
        if (r[R_TCTL] & TCTL_PSP) and data_len < 60:
            data_len = 60
        cdef uint64_t frame_len = data_len + (4 if cmd & CMD_IFCS else 0)
        cdef uint32_t cap = self._pb_capacity(16)
        if total == 0 or frame_len > MAX_FRAME or pb_record_size(<uint32_t>frame_len) > cap:
            self.tx_dropped += 1  # _tx_too_long, with the capacity read once
            return 0
        cdef uint32_t rec = pb_record_size(<uint32_t>frame_len)
        if self._txq.used > cap or rec > cap - self._txq.used:
            return 1
        cdef uint8_t *f = self._tx_scratch
        cdef uint32_t pos = 0
        cdef const uint8_t *src
        for k in range(count):
            c = self._chain + k * DESC
            if c[11] & CMD_DEXT:
                continue
            length = c[8] | (<uint32_t>c[9] << 8)
            if length:
                src = self._dma(le64(c), length, False)
                if src == NULL:
                    self.dma_errors += 1
                    self.tx_dropped += 1
                    return 0
                memcpy(f + pos, src, length)
                pos += length
        cdef uint32_t s
        if (cmd & CMD_IC) and css < total and cso + 2 <= total:
            s = ones_sum(f + css, total - css, 0) ^ 0xFFFF
            f[cso] = <uint8_t>(s >> 8)
            f[cso + 1] = <uint8_t>s
        if data_len > total:
            memset(f + total, 0, data_len - total)
        if (cmd & CMD_IFCS) and self._txq.count == 0 and self._peer_c is not None:
            # Straight into a linked Cython peer: the FCS this engine appends is correct by
            # construction, so the peer need not check it, and it is written only if the peer
            # keeps or stores the frame's last 4 bytes (no RCTL.SECRC, or its packet buffer):
            # with SECRC nobody can ever see them (docs/datapath.md, "Deferred FCS").
            self._send_fcs_deferred(f, frame_len)
            return 0
        if cmd & CMD_IFCS:
            append_fcs(f, data_len)
        if self._txq.count == 0:
            if not self._send(f, frame_len):
                pb_push(&self._txq, f, frame_len, 0, 0, 0)  # the cable is busy: keep it
            return 0
        pb_push(&self._txq, f, frame_len, 0, 0, 0)  # behind the frames already waiting
        self._flush_tx()
        return 0

    cdef inline void _send_fcs_deferred(self, uint8_t *f, uint32_t n) noexcept nogil:
        """_send to the linked Cython peer of a frame whose FCS is owed, not yet written."""
        if self.capture is not None:
            self.capture.put(f, n, True)  # its FCS is written by the capture's drain
        self._peer_c._events |= self._peer_c._rx_fcs(f, n, True)
        self._count_tx(f, n)

    cdef int _send(self, const uint8_t *f, uint32_t n) except -1:
        """Put one frame on the wire; 0 = the cable cannot take it now."""
        if self._peer_c is not None:
            self._peer_c._events |= self._peer_c._rx(f, n)
        elif self.peer is not None:
            self.peer.deliver(PyBytes_FromStringAndSize(<const char *>f, n))
        elif self.sink is not None:
            if not self.sink(PyBytes_FromStringAndSize(<const char *>f, n)):
                return 0
        else:
            self._sent.append(PyBytes_FromStringAndSize(<const char *>f, n))
        if self.capture is not None:
            self.capture.put(f, n, False)
        self._count_tx(f, n)
        return 1

    cdef int _flush_tx(self) except -1:
        """Send frames from the TX packet buffer while the cable takes them."""
        cdef uint32_t n
        cdef uint8_t st, er
        cdef uint16_t cs
        cdef const uint8_t *f
        while self._txq.count:
            f = pb_peek(&self._txq, self._tx_flush, &n, &st, &er, &cs)
            if f != self._tx_flush:
                memcpy(self._tx_flush, f, n)  # the sink may run Python that queues more
                f = self._tx_flush
            if not self._send(f, n):
                break
            pb_pop(&self._txq)
        return 0

    cdef inline void _count_tx(self, const uint8_t *f, uint32_t n) noexcept nogil:
        self._count(R_GPTC, 1)
        self._count(R_TPT, 1)
        self._count64(R_GOTCL, n)
        self._count64(R_TOTL, n)
        cdef int b = size_bucket(n)
        if b >= 0:
            self._count(R_PTC64 + b, 1)
        if n >= 6 and (f[0] & 1):
            self._count(R_BPTC if is_broadcast(f) else R_MPTC, 1)

    # --- receive ----------------------------------------------------------------------------

    cdef uint64_t _rx(self, const uint8_t *f, uint32_t n) noexcept nogil:
        """Receive one frame (see RefDatapath.receive)."""
        return self._rx_fcs(<uint8_t *>f, n, False)

    cdef uint64_t _rx_fcs(self, uint8_t *f, uint32_t n, bint fcs_owed) noexcept nogil:
        """_rx; `fcs_owed`: the frame comes from a linked engine that appended no FCS yet
        (its last 4 bytes are to be the CRC-32 of the rest, which is therefore good): the
        check is known to pass, and the FCS is written into `f` before anything can see it
        (a DMA without SECRC, the RX packet buffer). The result is the same as _rx's of the
        frame with its FCS: tests/test_datapath_agree.py holds it to the reference."""
        cdef uint32_t *r = self.r
        cdef uint32_t rctl = r[R_RCTL]
        if not (rctl & RCTL_EN):
            self.rx_dropped += 1
            return 0
        self._count(R_TPR, 1)
        self._count64(R_TORL, n)
        if n < 64:
            self._count(R_RUC, 1)
            return 0
        if n > (MAX_FRAME if rctl & RCTL_LPE else 1522):
            self._count(R_ROC, 1)
            return 0
        cdef uint8_t errors = 0
        if fcs_owed:
            if not (rctl & RCTL_SECRC) or self._rxq.count:  # the FCS bytes will be seen
                append_fcs(f, n - 4)
                fcs_owed = False
        elif nicemu_crc32(0, f, n) != FCS_RESIDUE:
            self._count(R_CRCERRS, 1)
            if not (rctl & RCTL_SBP):
                return 0
            errors = RXE_CE
        if not self._accept(f, rctl):
            return 0
        cdef uint32_t rec = pb_record_size(n)
        cdef uint32_t cap = self._pb_capacity(0)
        if self._rxq.used > cap or rec > cap - self._rxq.used:
            self._count(R_MPC, 1)
            return ICR_RXO
        cdef int b
        if not errors:
            self._count(R_GPRC, 1)
            self._count64(R_GORCL, n)
            b = size_bucket(n)
            if b >= 0:
                self._count(R_PRC64 + b, 1)
            if f[0] & 1:
                self._count(R_BPRC if is_broadcast(f) else R_MPRC, 1)
        cdef uint8_t status, err2
        cdef uint16_t csum
        rx_checksum_offload(f, n - 4, r[R_RXCSUM], &status, &err2, &csum)
        errors |= err2
        cdef uint64_t events = 0
        cdef int res
        cdef bint no_desc = False
        if self._rxq.count == 0:
            # Nothing waits: DMA straight from the frame (it passes through the buffer at once).
            res = self._dma_frame(f, n, status, errors, csum, &events)
            if res == RX_WRITTEN or res == RX_DROPPED:
                return events
            if fcs_owed:  # it waits in the packet buffer: RCTL may change before it goes
                append_fcs(f, n - 4)
            pb_push(&self._rxq, f, n, status, errors, csum)
            if res == RX_NO_DESC:
                self._count(R_RNBC, 1)
            return events
        pb_push(&self._rxq, f, n, status, errors, csum)
        events = self._drain(&no_desc)
        if no_desc and self._rxq.count:
            self._count(R_RNBC, 1)
        return events

    cdef inline bint _accept(self, const uint8_t *d, uint32_t rctl) noexcept nogil:
        """Receive address filtering (see RefDatapath._accept): broadcast only with BAM."""
        cdef uint32_t *r = self.r
        if is_broadcast(d):
            return (rctl & RCTL_BAM) != 0
        cdef bint multicast = d[0] & 1
        if multicast and (rctl & RCTL_MPE):
            return True
        if not multicast and (rctl & RCTL_UPE):
            return True
        cdef uint32_t lo = d[0] | (<uint32_t>d[1] << 8) | (<uint32_t>d[2] << 16) | (<uint32_t>d[3] << 24)
        cdef uint32_t hi = d[4] | (<uint32_t>d[5] << 8)
        cdef int k
        cdef uint32_t rah
        for k in range(16):
            rah = r[R_RA + 2 * k + 1]
            if (rah & RAH_AV) and not (rah & 0x30000) and r[R_RA + 2 * k] == lo and (rah & 0xFFFF) == hi:
                return True
        cdef uint32_t mo, h
        if multicast:
            mo = (rctl >> 12) & 3
            h = (d[4] | (<uint32_t>d[5] << 8)) >> (0 if mo == 3 else 4 - mo)
            h &= 0xFFF
            if (r[R_MTA + (h >> 5)] >> (h & 31)) & 1:
                return True
        return False

    cdef uint64_t _drain(self, bint *no_desc) noexcept nogil:
        """DMA waiting frames into free RX descriptors (see RefDatapath._drain)."""
        cdef uint64_t events = 0
        cdef uint32_t n
        cdef uint8_t st, er
        cdef uint16_t cs
        cdef const uint8_t *f
        cdef int res
        no_desc[0] = False
        if not self.bus_master or not (self.r[R_RCTL] & RCTL_EN) or self._rxq.count == 0:
            return 0
        while self._rxq.count:
            f = pb_peek(&self._rxq, self._rx_scratch, &n, &st, &er, &cs)
            res = self._dma_frame(f, n, st, er, cs, &events)
            if res == RX_NO_DESC:
                no_desc[0] = True
                break
            if res == RX_NOT_NOW:
                break
            pb_pop(&self._rxq)
        return events

    cdef int _dma_frame(self, const uint8_t *f, uint32_t flen, uint8_t status, uint8_t errors,
                        uint16_t csum, uint64_t *events) noexcept nogil:
        """Write one frame into the RX ring, whole or not at all (SDM 3.2.3-3.2.6)."""
        cdef uint32_t *r = self.r
        cdef uint32_t rctl = r[R_RCTL]
        if not self.bus_master or not (rctl & RCTL_EN):
            return RX_NOT_NOW
        cdef uint32_t n = (r[R_RDLEN] & RING_LEN_MASK) // DESC
        cdef uint32_t head = r[R_RDH] & 0xFFFF
        cdef uint32_t tail = r[R_RDT] & 0xFFFF
        if head >= n or tail >= n or n == 0:
            return RX_NO_DESC
        cdef uint64_t base = (<uint64_t>r[R_RDBAH] << 32) | (r[R_RDBAL] & RING_BASE_MASK)
        cdef uint32_t bufsize = rx_buffer_size(rctl)
        cdef uint32_t dlen = flen - 4 if rctl & RCTL_SECRC else flen
        cdef uint32_t need = (dlen + bufsize - 1) // bufsize
        if need > n - 1:
            self.rx_dropped += 1
            return RX_DROPPED
        cdef uint32_t free_ = tail + n - head if tail < head else tail - head
        if free_ < need:
            return RX_NO_DESC
        # need <= MAX_FRAME / 256 (the smallest buffer): the pointers fit on the stack
        cdef uint8_t *dp[MAX_RX_BUFS]
        cdef uint8_t *bp[MAX_RX_BUFS]
        # fetch and check every descriptor and buffer before writing anything
        cdef uint32_t k, idx, chunk
        cdef uint8_t *d
        idx = head
        for k in range(need):
            chunk = bufsize if (k + 1) * bufsize <= dlen else dlen - k * bufsize
            d = self._desc(base, idx, False)
            if d == NULL or self._desc(base, idx, True) == NULL:
                self.dma_errors += 1
                self.rx_dropped += 1
                return RX_DROPPED
            dp[k] = d
            bp[k] = self._dma(le64(d), chunk, True)
            if bp[k] == NULL:
                self.dma_errors += 1
                self.rx_dropped += 1
                return RX_DROPPED
            idx += 1
            if idx == n:
                idx = 0
        cdef bint last
        for k in range(need):
            chunk = bufsize if (k + 1) * bufsize <= dlen else dlen - k * bufsize
            memcpy(bp[k], f + k * bufsize, chunk)
            d = dp[k]
            last = k == need - 1
            # length, checksum, errors and special first; the status byte last (release)
            d[8] = <uint8_t>chunk
            d[9] = <uint8_t>(chunk >> 8)
            d[10] = <uint8_t>csum if last else 0
            d[11] = <uint8_t>(csum >> 8) if last else 0
            d[13] = errors if last else 0
            d[14] = 0
            d[15] = 0
            nicemu_store_release_u8(d + 12, (RXS_DD | RXS_EOP | status) if last else RXS_DD)
        head += need
        if head >= n:
            head -= n
        r[R_RDH] = head
        self.rx_written += 1
        # hint the cache about a buffer a few frames on (written soon, if it is the device's)
        free_ = tail + n - head if tail < head else tail - head
        if free_ > PREFETCH_AHEAD:
            idx = head + PREFETCH_AHEAD
            if idx >= n:
                idx -= n
            d = self._desc(base, idx, False)
            if d != NULL:
                d = self._dma(le64(d), 64, False)
                if d != NULL:
                    nicemu_prefetch_w(d)
        events[0] |= EV_RX_DONE
        free_ = tail + n - head if tail < head else tail - head
        if free_ * DESC <= (n * DESC) >> (((rctl >> 8) & 3) + 1):
            events[0] |= ICR_RXDMT0
        return RX_WRITTEN
