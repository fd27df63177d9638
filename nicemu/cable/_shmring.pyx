# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The shm cable's rings in C: the same protocol as nicemu.cable.shm.RingsRef (the pure-Python
reference, whose docstring and the module docstring of nicemu/cable/shm.py explain it), with
real atomics: tail/head published with release stores and read with acquire loads, and a
sequentially consistent fence between "set my flag" and "read the other side's index"
(Dekker's pattern, which x86's store buffer breaks without one). Tests run both classes
against each other.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy

cdef extern from *:
    """
    #include <stdint.h>
    static inline void nicemu_shm_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    static inline uint64_t nicemu_shm_load(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void nicemu_shm_store(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline uint64_t nicemu_shm_xchg(uint64_t *p, uint64_t v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
    """
    void nicemu_shm_fence() nogil
    uint64_t nicemu_shm_load(const uint64_t *p) nogil
    void nicemu_shm_store(uint64_t *p, uint64_t v) nogil
    uint64_t nicemu_shm_xchg(uint64_t *p, uint64_t v) nogil

cdef uint32_t WRAP = 0xFFFFFFFF
cdef uint64_t REC_HDR = 8
cdef uint64_t HEADER_BYTES = 4096


def fence():
    """Full (sequentially consistent) memory fence."""
    nicemu_shm_fence()


cdef inline uint64_t ring_word(int r, int k):
    # (tail, head, sleeping, waiting) of ring r, each on its own cache line: see shm._ring_words
    return (128 + r * 512) // 8 + 8 * k


cdef class Rings:
    """One end's view of the two rings: it produces into ring `tx` and consumes ring `rx`."""

    cdef uint8_t[::1] _view  # keeps the mapping exported while we hold pointers into it
    cdef uint64_t *_w
    cdef uint8_t *_txd
    cdef uint8_t *_rxd
    cdef uint64_t ring, mask
    cdef uint64_t *_tx_tail
    cdef uint64_t *_tx_head
    cdef uint64_t *_tx_sleeping
    cdef uint64_t *_tx_waiting
    cdef uint64_t *_rx_tail
    cdef uint64_t *_rx_head
    cdef uint64_t *_rx_sleeping
    cdef uint64_t *_rx_waiting
    cdef uint64_t tail, head_cache, head
    cdef public uint32_t max_frame

    def __init__(self, buf, uint64_t ring_bytes, int tx, int rx, int fence_fd=-1, uint32_t max_frame=16388):
        self._view = buf
        if <uint64_t>self._view.shape[0] < HEADER_BYTES + 2 * ring_bytes:
            raise ValueError("shm rings: mapping too small")
        cdef uint8_t *base = &self._view[0]
        self._w = <uint64_t *>base
        self.ring = ring_bytes
        self.mask = ring_bytes - 1
        self.max_frame = max_frame
        self._txd = base + HEADER_BYTES + tx * ring_bytes
        self._rxd = base + HEADER_BYTES + rx * ring_bytes
        self._tx_tail = self._w + ring_word(tx, 0)
        self._tx_head = self._w + ring_word(tx, 1)
        self._tx_sleeping = self._w + ring_word(tx, 2)
        self._tx_waiting = self._w + ring_word(tx, 3)
        self._rx_tail = self._w + ring_word(rx, 0)
        self._rx_head = self._w + ring_word(rx, 1)
        self._rx_sleeping = self._w + ring_word(rx, 2)
        self._rx_waiting = self._w + ring_word(rx, 3)
        self.tail = nicemu_shm_load(self._tx_tail)
        self.head_cache = nicemu_shm_load(self._tx_head)
        self.head = nicemu_shm_load(self._rx_head)

    def close(self):
        self._w = NULL
        self._view = None

    cdef inline bint _room(self, uint64_t total):
        if self.tail + total - self.head_cache <= self.ring:
            return True
        self.head_cache = nicemu_shm_load(self._tx_head)
        return self.tail + total - self.head_cache <= self.ring

    cdef inline bint _wait_space(self, uint64_t total):
        nicemu_shm_store(self._tx_waiting, 1)
        nicemu_shm_fence()
        self.head_cache = nicemu_shm_load(self._tx_head)
        return self.tail + total - self.head_cache <= self.ring

    def push(self, frame):
        """1: taken, ring the consumer's doorbell; 0: taken; -1: full (waiting flag set)."""
        if self._w == NULL:
            raise ValueError("shm rings are closed")
        if type(frame) is not bytes:
            frame = bytes(frame)
        cdef uint64_t n = PyBytes_GET_SIZE(frame)
        cdef uint64_t need = REC_HDR + ((n + 7) & ~(<uint64_t>7))
        cdef uint64_t pos = self.tail & self.mask
        cdef uint64_t contig = self.ring - pos
        cdef uint64_t total = need if contig >= need else contig + need
        cdef uint32_t hdr[2]
        if not self._room(total) and not self._wait_space(total):
            return -1
        if contig < need:
            hdr[0] = WRAP
            hdr[1] = 0
            memcpy(self._txd + pos, hdr, 8)
            pos = 0
        hdr[0] = <uint32_t>n
        hdr[1] = 0
        memcpy(self._txd + pos, hdr, 8)
        memcpy(self._txd + pos + REC_HDR, PyBytes_AS_STRING(frame), n)
        self.tail += total
        nicemu_shm_store(self._tx_tail, self.tail)  # release: the record before the index
        nicemu_shm_fence()
        # the consumer armed its doorbell: take the request (so the frames that follow do not
        # ring again until it re-arms) and ring once
        if nicemu_shm_load(self._tx_sleeping) and nicemu_shm_xchg(self._tx_sleeping, 0):
            return 1
        return 0

    def free(self):
        """Bytes free in the tx ring now."""
        if self._w == NULL:
            raise ValueError("shm rings are closed")
        return self.ring - (self.tail - nicemu_shm_load(self._tx_head))

    def writable(self, uint64_t need):
        """Room for `need` bytes; if not, ask the consumer to ring us when it frees space."""
        if self._w == NULL:
            raise ValueError("shm rings are closed")
        return self._room(need) or self._wait_space(need)

    def pull(self):
        """All complete records: (frames, ring_the_producer, error or None)."""
        if self._w == NULL:
            raise ValueError("shm rings are closed")
        cdef uint64_t tail = nicemu_shm_load(self._rx_tail)  # acquire: records up to tail are complete
        cdef uint64_t head = self.head
        cdef uint64_t pos, rec
        cdef uint32_t n
        cdef list out = []
        err = None
        if tail == head:
            return out, False, None
        if tail - head > self.ring or (tail - head) & 7:
            err = f"tail {tail} is not a valid distance from head {head}"
        else:
            while head != tail:
                pos = head & self.mask
                memcpy(&n, self._rxd + pos, 4)
                if n == WRAP:
                    head += self.ring - pos
                    continue
                rec = REC_HDR + ((<uint64_t>n + 7) & ~(<uint64_t>7))
                if n == 0 or n > self.max_frame or pos + rec > self.ring or head + rec > tail:
                    err = f"bad record length {n} at ring offset {pos}"
                    break
                out.append(PyBytes_FromStringAndSize(<char *>(self._rxd + pos + REC_HDR), n))
                head += rec
        if err is not None:
            err = f"{err}; {tail - head} bytes skipped"
            head = tail
        self.head = head
        nicemu_shm_store(self._rx_head, head)  # release: the records are copied out
        nicemu_shm_fence()
        if nicemu_shm_load(self._rx_waiting):
            nicemu_shm_store(self._rx_waiting, 0)
            return out, True, err
        return out, False, err

    def awake(self):
        """We are draining: the producer need not ring."""
        if self._w == NULL:
            raise ValueError("shm rings are closed")
        nicemu_shm_store(self._rx_sleeping, 0)

    def arm(self):
        """About to sleep: ask for a doorbell, then look once more. True: data pending."""
        if self._w == NULL:
            raise ValueError("shm rings are closed")
        nicemu_shm_store(self._rx_sleeping, 1)
        nicemu_shm_fence()
        return nicemu_shm_load(self._rx_tail) != self.head

    def word(self, int i):
        """Header word i (acquire load); i is checked against the header's 512 words."""
        if self._w == NULL or not 0 <= i < 512:
            raise ValueError("shm rings are closed or the word index is out of the header")
        return nicemu_shm_load(self._w + i)

    def set_word(self, int i, uint64_t v):
        """Store header word i (release), then a full fence."""
        if self._w == NULL or not 0 <= i < 512:
            raise ValueError("shm rings are closed or the word index is out of the header")
        nicemu_shm_store(self._w + i, v)
        nicemu_shm_fence()
