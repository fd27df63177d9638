# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The PMD's per-packet fast path: RX descriptor scan and refill, TX fill and batched reclaim.

This is driver/pmd_ref.py (the readable reference; tests/test_pmd_agree.py holds both to the
same results) in C: a burst is one call, with no Python object per packet. Mbufs travel as
indices into the Mempool's metadata arrays; bursts come out in, and go in from, preallocated
array('I') objects. The only Python call inside a burst is the doorbell write (RDT or TDT),
at most once per burst. No device register is ever read here.
"""
from cpython cimport array
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from nicemu.regs import (DESC_SIZE, RDT, RXD_ADDR, RXD_ERRORS, RXD_LENGTH, RXD_STATUS, TDT,
                         TXD_ADDR, TXD_STA, RxdStatus, TxdCmd, TxdSta)

# one place for the ring constraints and for which bits mean what
from driver.pmd_ref import (RX_FRAME_ERRORS as _RX_FRAME_ERRORS, RX_MIN_LEN as _RX_MIN_LEN, TX_CMD as _TX_CMD,
                             burst_error, check_geometry)

cdef extern from "include/pmd_atomic.h" nogil:
    uint8_t pmd_load_acquire_u8(const uint8_t *p)
    uint16_t pmd_get_u16(const uint8_t *p)
    void pmd_put_u64(uint8_t *p, uint64_t v)
    void pmd_release_fence()

# The layout facts come from nicemu.regs (one source of truth), copied into C variables once.
assert DESC_SIZE == 16 and RXD_ADDR == 0 and TXD_ADDR == 0 and RXD_LENGTH == 8
cdef Py_ssize_t RXD_STATUS_OFF = RXD_STATUS
cdef Py_ssize_t RXD_ERRORS_OFF = RXD_ERRORS
cdef Py_ssize_t TXD_STA_OFF = TXD_STA
cdef uint8_t RX_DD = RxdStatus.DD
cdef uint8_t RX_EOP = RxdStatus.EOP
cdef uint8_t RX_FRAME_ERRORS = _RX_FRAME_ERRORS  # CE|SE|SEQ|CXE|RXE: drop; IPE/TCPE: deliver
cdef uint32_t RX_MIN_LEN = _RX_MIN_LEN  # a write-back shorter than an Ethernet header is bad
cdef uint8_t TX_DD = TxdSta.DD
cdef uint64_t TX_CMD = _TX_CMD  # EOP | IFCS
cdef uint64_t TX_CMD_RS = TxdCmd.RS
cdef uint32_t REG_RDT = RDT
cdef uint32_t REG_TDT = TDT


cdef class Core:
    """Ring state and fast-path work for one RX and one TX queue over one Mempool.

    Ring memory and the pool must lie in the pool's DMA region; `write32(offset, value)`
    is the (counting) bus write used for the RDT/TDT doorbells.
    """

    # DMA region: host pointer of bus address `region_addr`
    cdef uint8_t[::1] _region_view
    cdef uint8_t *base
    cdef uint64_t region_addr
    # RX ring
    cdef uint8_t *rxd
    cdef readonly uint32_t rx_count, rx_free_thresh
    cdef public uint32_t rx_next, rx_hold, rx_discard
    cdef readonly array.array rx_slot  # mbuf index attached to each RX descriptor
    cdef uint32_t *rx_slot_p
    # TX ring
    cdef uint8_t *txd
    cdef readonly uint32_t tx_count, tx_rs_thresh
    cdef public uint32_t tx_next, tx_clean
    cdef readonly array.array tx_slot  # mbuf index each queued TX descriptor points at
    cdef uint32_t *tx_slot_p
    # the pool's metadata (see driver/mempool.py)
    cdef readonly object pool
    cdef uint64_t pool_addr
    cdef uint32_t num_bufs, buf_size, headroom
    cdef uint16_t *data_off
    cdef uint16_t *data_len
    cdef uint16_t *refcnt
    cdef uint16_t *ol_flags
    cdef uint32_t *stack
    cdef uint32_t *avail
    cdef object write32
    # rte_eth_stats-like software counters, and doorbells written
    cdef public unsigned long long ipackets, ibytes, opackets, obytes, ierrors, rx_nombuf
    cdef public unsigned long long rx_doorbells, tx_doorbells
    cdef public unsigned long long rx_bad_length  # of ierrors: lengths no buffer can hold

    def __init__(self, pool, uint64_t rx_ring, uint32_t rx_count, uint64_t tx_ring,
                 uint32_t tx_count, write32, uint32_t rx_free_thresh=32, uint32_t tx_rs_thresh=32):
        check_geometry(pool, rx_ring, rx_count, tx_ring, tx_count, rx_free_thresh, tx_rs_thresh)
        region = pool.region
        self._region_view = region.mm
        self.base = &self._region_view[0]
        self.region_addr = region.addr
        self.rxd = self.base + (rx_ring - self.region_addr)
        self.txd = self.base + (tx_ring - self.region_addr)
        self.rx_count = rx_count
        self.tx_count = tx_count
        self.rx_free_thresh = rx_free_thresh
        self.tx_rs_thresh = tx_rs_thresh
        self.rx_slot = array.array("I", [0]) * rx_count
        self.tx_slot = array.array("I", [0]) * tx_count
        self.rx_slot_p = self.rx_slot.data.as_uints
        self.tx_slot_p = self.tx_slot.data.as_uints
        self.pool = pool
        self.pool_addr = pool.addr
        self.num_bufs = pool.num_bufs
        self.buf_size = pool.buf_size
        self.headroom = pool.headroom
        self.data_off = (<array.array>pool.data_off).data.as_ushorts
        self.data_len = (<array.array>pool.data_len).data.as_ushorts
        self.refcnt = (<array.array>pool.refcnt).data.as_ushorts
        self.ol_flags = (<array.array>pool.ol_flags).data.as_ushorts
        self.stack = (<array.array>pool.stack).data.as_uints
        self.avail = (<array.array>pool.avail).data.as_uints
        self.write32 = write32

    # --- pool helpers -----------------------------------------------------------------------
    cdef inline uint32_t _get(self) noexcept nogil:
        """Pop a buffer (the caller checked avail) and reset it as rte_pktmbuf_reset does."""
        self.avail[0] -= 1
        cdef uint32_t idx = self.stack[self.avail[0]]
        self.refcnt[idx] = 1
        self.data_off[idx] = self.headroom
        self.data_len[idx] = 0
        self.ol_flags[idx] = 0
        return idx

    cdef inline void _put(self, uint32_t idx) noexcept nogil:
        """Drop one reference; push the buffer back when it was the last."""
        self.refcnt[idx] -= 1
        if self.refcnt[idx] == 0:
            self.stack[self.avail[0]] = idx
            self.avail[0] += 1

    cdef inline void _rx_attach(self, uint32_t slot, uint32_t idx) noexcept nogil:
        """Give buffer `idx` to RX descriptor `slot`: address set, length/status/errors zeroed
        (a stale DD left from the previous lap would otherwise look like a new packet)."""
        cdef uint8_t *d = self.rxd + (<size_t>slot << 4)
        pmd_put_u64(d, self.pool_addr + <uint64_t>idx * self.buf_size + self.headroom)
        pmd_put_u64(d + 8, 0)
        self.rx_slot_p[slot] = idx

    def alloc_bulk(self, array.array out not None, int n, int length=0):
        """Take `n` buffers into out[0:n], all or none (rte_pktmbuf_alloc_bulk): n or 0."""
        if n < 0 or n > len(out):
            raise ValueError(f"cannot allocate {n} mbufs into an array of {len(out)}")
        if length < 0 or length > <int>(self.buf_size - self.headroom):
            raise ValueError(f"data length {length} does not fit a {self.buf_size - self.headroom}-byte data room")
        if self.avail[0] < <uint32_t>n:
            return 0
        cdef uint32_t *o = out.data.as_uints
        cdef int k
        cdef uint32_t idx
        for k in range(n):
            idx = self._get()
            self.data_len[idx] = <uint16_t>length
            o[k] = idx
        return n

    def free_bulk(self, array.array idx not None, int n, int start=0):
        """Drop one reference on each of idx[start:start+n] (rte_pktmbuf_free_bulk)."""
        cdef uint32_t *p = self._checked(idx, n, start, False)
        cdef int k
        for k in range(n):
            self._put(p[k])

    cdef uint32_t *_checked(self, array.array idx, int n, int start, bint for_tx) except? NULL:
        """Pointer to idx[start:], after checking that every entry names an allocated mbuf
        holding at least as many references as it appears in the burst (sending or freeing
        one mbuf twice with one reference would put it on the free stack twice)."""
        if n < 0 or start < 0 or start + n > len(idx) or idx.ob_descr.typecode != c"I":
            raise ValueError(f"bad burst: {n} mbufs from {start} of an array('{idx.typecode}') of {len(idx)}")
        cdef uint32_t *p = idx.data.as_uints + start
        cdef int k, bad = -1
        cdef uint32_t j
        for k in range(n):  # spend one reference per appearance, then give them all back
            j = p[k]
            if j >= self.num_bufs or self.refcnt[j] == 0 or (for_tx and (
                    self.data_len[j] == 0 or <uint32_t>self.data_off[j] + self.data_len[j] > self.buf_size)):
                bad = k
                break
            self.refcnt[j] -= 1
        for k in range(n if bad < 0 else bad):
            self.refcnt[p[k]] += 1
        if bad >= 0:
            burst_error(self.pool, list(idx[start : start + bad + 1]), for_tx)
        return p

    # --- RX --------------------------------------------------------------------------------
    def rx_init(self):
        """Attach a buffer to every RX descriptor; returns the first RDT value (count - 1).

        Every descriptor always holds a buffer; the tail stays one behind next_to_clean
        because RDT == RDH means "no buffers" to the device: a full ring would look empty.
        """
        if self.avail[0] < self.rx_count:
            raise ValueError(f"the pool has {self.avail[0]} buffers, the RX ring needs {self.rx_count}")
        cdef uint32_t i
        for i in range(self.rx_count):
            self._rx_attach(i, self._get())
        self.rx_next = 0
        self.rx_hold = 0
        self.rx_discard = 0
        return self.rx_count - 1

    def rx_burst(self, array.array out not None, int n):
        """Take up to n received frames: their mbuf indices land in out[0:count]; returns count.

        Each taken descriptor gets a fresh buffer at once; RDT is written once, at the end,
        when at least rx_free_thresh descriptors are waiting to go back to the device.
        """
        if n < 0 or n > len(out) or out.ob_descr.typecode != c"I":
            raise ValueError(f"cannot take {n} mbufs into an array('{out.typecode}') of {len(out)}")
        cdef uint32_t *o = out.data.as_uints
        cdef uint32_t i = self.rx_next, got = 0, taken = 0, idx, length
        cdef uint32_t room = self.buf_size - self.headroom
        cdef uint8_t st, err
        cdef bint bad_length
        cdef uint8_t *d
        # one lap of the ring at most: a device that keeps writing DD cannot hold us here
        while got < <uint32_t>n and taken < self.rx_count:
            d = self.rxd + (<size_t>i << 4)
            st = pmd_load_acquire_u8(d + RXD_STATUS_OFF)  # DD first: the rest is valid only after it
            if not st & RX_DD:
                break
            err = d[RXD_ERRORS_OFF]
            length = pmd_get_u16(d + 8)
            bad_length = length < RX_MIN_LEN or length > room  # never trusted as data_len
            if self.rx_discard or err & RX_FRAME_ERRORS or not st & RX_EOP or bad_length:
                # a bad frame, or one that spans buffers: drop it, reusing the buffer in place
                pmd_put_u64(d + 8, 0)
                if st & RX_EOP:
                    self.ierrors += 1
                    if bad_length and not self.rx_discard:  # a frame's last piece may be short
                        self.rx_bad_length += 1
                    self.rx_discard = 0
                else:
                    self.rx_discard = 1
            else:
                if self.avail[0] == 0:
                    # no buffer to put in its place: leave the frame in the ring (the device
                    # counts RNBC/MPC when the ring runs dry) and tell the application
                    self.rx_nombuf += 1
                    break
                idx = self.rx_slot_p[i]
                self.data_len[idx] = <uint16_t>length
                self.ol_flags[idx] = st | (<uint16_t>err << 8)
                self.ibytes += length
                o[got] = idx
                got += 1
                self._rx_attach(i, self._get())
            taken += 1
            i += 1
            if i == self.rx_count:
                i = 0
        self.rx_next = i
        self.ipackets += got
        self.rx_hold += taken
        if self.rx_hold and self.rx_hold >= self.rx_free_thresh:
            self._rx_doorbell()
        return got

    cdef int _rx_doorbell(self) except -1:
        pmd_release_fence()  # the refilled descriptors before the tail that publishes them
        self.write32(REG_RDT, self.rx_count - 1 if self.rx_next == 0 else self.rx_next - 1)
        self.rx_doorbells += 1
        self.rx_hold = 0
        return 0

    def rx_flush(self):
        """Return held descriptors to the device now (before sleeping); True if RDT was written."""
        if self.rx_hold:
            self._rx_doorbell()
            return True
        return False

    def rx_ready(self):
        """Whether a completed descriptor waits (a memory read, never a register read)."""
        return bool(pmd_load_acquire_u8(self.rxd + (<size_t>self.rx_next << 4) + RXD_STATUS_OFF) & RX_DD)

    # --- TX --------------------------------------------------------------------------------
    cdef inline uint32_t _tx_free(self) noexcept nogil:
        """Descriptors we may fill; one stays unused so a full ring never looks empty."""
        return (self.tx_clean + self.tx_count - self.tx_next - 1) % self.tx_count

    def tx_reclaim(self):
        """Free the mbufs of completed batches; returns how many descriptors were cleaned.

        RS is set only on the last descriptor of each tx_rs_thresh batch, so one DD read
        frees a whole batch. Only whole batches already queued are checked: a descriptor we
        have not refilled this lap still shows the DD the device wrote on the previous lap.
        """
        cdef uint32_t cleaned = 0, last, k, rs = self.tx_rs_thresh
        while (self.tx_next + self.tx_count - self.tx_clean) % self.tx_count >= rs:
            last = self.tx_clean + rs - 1
            if not pmd_load_acquire_u8(self.txd + (<size_t>last << 4) + TXD_STA_OFF) & TX_DD:
                break
            for k in range(self.tx_clean, self.tx_clean + rs):
                self._put(self.tx_slot_p[k])
            self.tx_clean = (self.tx_clean + rs) % self.tx_count
            cleaned += rs
        return cleaned

    def tx_room(self):
        """Descriptors a tx_burst could fill now, after reclaiming completed batches: lets a
        sender wait for room for a whole burst (one doorbell per burst) instead of ringing
        for every few descriptors the device frees."""
        self.tx_reclaim()
        return self._tx_free()

    def tx_burst(self, array.array idx not None, int n, int start=0):
        """Queue idx[start:start+n] for transmission; returns how many were queued.

        Zero copy: the descriptor points at the mbuf's data. The queued mbufs now belong to
        the driver (freed after the device reports them done); the rest stay the caller's.
        TDT is written once per burst.
        """
        cdef uint32_t *p = self._checked(idx, n, start, True)
        self.tx_reclaim()
        cdef uint32_t nfree = self._tx_free(), k, j, t = self.tx_next, sent
        cdef uint64_t cmd
        cdef uint8_t *d
        sent = <uint32_t>n if <uint32_t>n < nfree else nfree
        for k in range(sent):
            j = p[k]
            d = self.txd + (<size_t>t << 4)
            cmd = TX_CMD
            if t % self.tx_rs_thresh == self.tx_rs_thresh - 1:
                cmd |= TX_CMD_RS  # report status once per batch (ends it)
            pmd_put_u64(d, self.pool_addr + <uint64_t>j * self.buf_size + self.data_off[j])
            # length | CSO 0 | CMD | STA 0 (clears the old DD) | CSS 0 | special 0
            pmd_put_u64(d + 8, <uint64_t>self.data_len[j] | (cmd << 24))
            self.tx_slot_p[t] = j
            self.obytes += self.data_len[j]
            t += 1
            if t == self.tx_count:
                t = 0
        if sent:
            self.tx_next = t
            self.opackets += sent
            pmd_release_fence()  # descriptors before the doorbell
            self.write32(REG_TDT, t)
            self.tx_doorbells += 1
        return sent

    def tx_in_flight(self):
        """Descriptors queued and not yet reclaimed."""
        return (self.tx_next + self.tx_count - self.tx_clean) % self.tx_count

    def release_all(self):
        """After the device is stopped: give every ring buffer back to the pool."""
        cdef uint32_t i
        for i in range(self.rx_count):
            if self.refcnt[self.rx_slot_p[i]]:
                self._put(self.rx_slot_p[i])
        while self.tx_clean != self.tx_next:
            self._put(self.tx_slot_p[self.tx_clean])
            self.tx_clean = (self.tx_clean + 1) % self.tx_count
        self.rx_hold = 0

