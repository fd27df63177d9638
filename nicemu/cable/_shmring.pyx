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
    /* A record header, read exactly once (the peer may rewrite it while we look: the compiler
       must not fetch it twice, which a plain read of shared memory would allow). */
    static inline uint64_t nicemu_shm_read_once(const uint8_t *p) {
        return __atomic_load_n((const uint64_t *)p, __ATOMIC_RELAXED);
    }
    """
    void nicemu_shm_fence() nogil
    uint64_t nicemu_shm_load(const uint64_t *p) nogil
    void nicemu_shm_store(uint64_t *p, uint64_t v) nogil
    uint64_t nicemu_shm_xchg(uint64_t *p, uint64_t v) nogil
    uint64_t nicemu_shm_read_once(const uint8_t *p) nogil

cdef uint32_t WRAP = 0xFFFFFFFF
cdef uint64_t REC_HDR = 8
cdef uint64_t HEADER_BYTES = 4096
RX_BATCH = 1024  # frames one pull copies out at most (as nicemu.cable.shm.RX_BATCH)


def fence():
    """Full (sequentially consistent) memory fence."""
    nicemu_shm_fence()


cdef inline uint64_t ring_word(int r, int k):
    # (tail, head, sleeping, waiting) of ring r, each on its own cache line: see shm._ring_words
    return (128 + r * 512) // 8 + 8 * k


cdef str bad_head(uint64_t tail, uint64_t head, uint64_t ring):
    """Why the consumer's `head` cannot be behind our `tail` (None: it can): shm._bad_head."""
    cdef uint64_t used = tail - head
    if used > ring or used & 7:
        return f"head {head} of the peer is not a valid distance behind tail {tail}"
    return None


cdef class Rings:
    """One end's view of the two rings: it produces into ring `tx` and consumes ring `rx`.

    Everything in the mapping is the peer's and untrusted: the checks are those of
    shm.RingsRef and shm.drain_ref (module docstring of nicemu/cable/shm.py, "Hostile peer"),
    with the same messages in `corrupt` and the same `steps`."""

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
    cdef readonly uint64_t tail, head_cache, head  # readonly: the pointers rely on them
    cdef public uint32_t max_frame
    cdef readonly uint32_t batch
    cdef readonly uint64_t steps
    cdef readonly object corrupt

    def __init__(self, buf, uint64_t ring_bytes, int tx, int rx, int fence_fd=-1, uint32_t max_frame=16388,
                 uint32_t batch=RX_BATCH):
        # the geometry checks of shm._check_geometry: without them the pointers below could
        # leave the mapping
        if ring_bytes < 32 or ring_bytes & (ring_bytes - 1):
            raise ValueError(f"shm rings: ring_bytes must be a power of two of at least 32, got {ring_bytes}")
        if not ((tx == 0 and rx == 1) or (tx == 1 and rx == 0)):
            raise ValueError(f"shm rings: tx and rx must be rings 0 and 1, got {tx} and {rx}")
        if max_frame == 0 or REC_HDR + ((<uint64_t>max_frame + 7) & ~(<uint64_t>7)) > ring_bytes // 2:
            raise ValueError(f"shm rings: max_frame {max_frame} does not fit half a ring of {ring_bytes}")
        if batch < 1:
            raise ValueError(f"shm rings: batch must be at least 1, got {batch}")
        self._view = buf
        if <uint64_t>self._view.shape[0] < HEADER_BYTES + 2 * ring_bytes:
            raise ValueError("shm rings: mapping too small")
        cdef uint8_t *base = &self._view[0]
        self._w = <uint64_t *>base
        self.ring = ring_bytes
        self.mask = ring_bytes - 1
        self.max_frame = max_frame
        self.batch = batch
        self.steps = 0
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
        # where the previous owner of this end left off: untrusted like the rest of the mapping
        self.tail = nicemu_shm_load(self._tx_tail)
        self.head_cache = nicemu_shm_load(self._tx_head)
        self.head = nicemu_shm_load(self._rx_head)
        self.corrupt = None
        if self.tail & 7:
            self.corrupt = f"tail {self.tail} of ring {tx} is not a multiple of 8"
        elif self.head & 7:
            self.corrupt = f"head {self.head} of ring {rx} is not a multiple of 8"
        else:
            self.corrupt = bad_head(self.tail, self.head_cache, ring_bytes)

    def close(self):
        self._w = NULL
        self._view = None

    cdef bint _load_head(self) except -1:
        """Read the consumer's head; False (and the ring corrupt) if it is not behind our tail."""
        cdef uint64_t h = nicemu_shm_load(self._tx_head)
        err = bad_head(self.tail, h, self.ring)
        if err is not None:
            self.corrupt = err
            return False
        self.head_cache = h
        return True

    cdef inline bint _room(self, uint64_t total) except -1:
        if self.tail - self.head_cache + total <= self.ring:
            return True
        return self._load_head() and self.tail - self.head_cache + total <= self.ring

    cdef inline bint _wait_space(self, uint64_t total) except -1:
        nicemu_shm_store(self._tx_waiting, 1)
        nicemu_shm_fence()
        return self._load_head() and self.tail - self.head_cache + total <= self.ring

    def push(self, frame):
        """1: taken, ring the consumer's doorbell; 0: taken; -1: full (waiting flag set);
        -2: the ring is corrupt (the frame is not taken, nothing ever will be)."""
        if self._w == NULL:
            raise ValueError("shm rings are closed")
        if self.corrupt is not None:
            return -2
        if type(frame) is not bytes:
            frame = bytes(frame)
        cdef uint64_t n = PyBytes_GET_SIZE(frame)
        if n == 0 or n > self.max_frame:
            raise ValueError(f"shm rings: a frame of {n} bytes (1 to {self.max_frame})")
        cdef uint64_t need = REC_HDR + ((n + 7) & ~(<uint64_t>7))
        cdef uint64_t pos = self.tail & self.mask  # a multiple of 8: checked at start, kept so
        cdef uint64_t contig = self.ring - pos
        cdef uint64_t total = need if contig >= need else contig + need
        cdef uint32_t hdr[2]
        if not self._room(total) and not self._wait_space(total):
            return -1 if self.corrupt is None else -2
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
        """Bytes free in the tx ring now (0 when corrupt)."""
        if self._w == NULL:
            raise ValueError("shm rings are closed")
        if self.corrupt is not None or not self._load_head():
            return 0
        return self.ring - (self.tail - self.head_cache)

    def writable(self, uint64_t need):
        """Room for `need` bytes; if not, ask the consumer to ring us when it frees space."""
        if self._w == NULL:
            raise ValueError("shm rings are closed")
        if self.corrupt is not None:
            return False
        return self._room(need) or self._wait_space(need)

    def pull(self):
        """Up to `batch` complete records: (frames, ring_the_producer, error or None). An error
        is returned once, by the pull that found the ring corrupt (also in `corrupt`)."""
        if self._w == NULL:
            raise ValueError("shm rings are closed")
        cdef list out = []
        self.steps = 0
        if self.corrupt is not None:
            return out, False, None
        cdef uint64_t tail = nicemu_shm_load(self._rx_tail)  # acquire: records up to tail are complete
        cdef uint64_t head = self.head
        cdef uint64_t left = tail - head  # mod 2**64, as the counters
        cdef uint64_t pos, rec, jump, word, steps = 0
        cdef uint32_t n, reserved, count = 0
        err = None
        if left == 0:
            return out, False, None
        if left > self.ring or left & 7:
            err = f"tail {tail} is not a valid distance from head {head}"
        else:
            while left and count < self.batch:
                steps += 1
                pos = head & self.mask  # a multiple of 8, so the header is inside the ring
                word = nicemu_shm_read_once(self._rxd + pos)
                n = <uint32_t>word  # little-endian: u32 length, then u32 0
                reserved = <uint32_t>(word >> 32)
                if n == WRAP:
                    jump = self.ring - pos  # a wrap at 0 would jump a whole ring; one must leave a record
                    if pos == 0 or reserved != 0 or jump >= left:
                        err = f"bad wrap marker at ring offset {pos}"
                        break
                    head += jump
                    left -= jump
                    continue
                rec = REC_HDR + ((<uint64_t>n + 7) & ~(<uint64_t>7))
                if n == 0 or n > self.max_frame or reserved != 0 or pos + rec > self.ring or rec > left:
                    err = f"bad record at ring offset {pos}: length {n}, reserved word {reserved}"
                    break
                out.append(PyBytes_FromStringAndSize(<char *>(self._rxd + pos + REC_HDR), n))
                count += 1
                head += rec
                left -= rec
        self.steps = steps
        if err is not None:
            self.corrupt = err
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
        if self.corrupt is not None:
            return False
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
