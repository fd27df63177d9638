# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# distutils: include_dirs = nicemu/include
"""The capture ring in C: the same behaviour as nicemu.cable.capring.CapRingRef (the
pure-Python twin, whose docstring is the specification); tests/cable/test_capring.py holds the
two to identical output. `put()` is a cdef method that nicemu/_datapath.pyx calls (cimport
through _capring.pxd) on the linked send path: a clock read and one memcpy of at most snaplen
bytes, no Python object. Single-threaded: the engines and the drain run in one event loop.

A record in the ring: u64 timestamp (ns, CLOCK_REALTIME), u32 original length, u32 captured
length with bit 31 = "FCS owed" (the frame came from an engine that hands its peer frames
before writing their FCS, docs/datapath.md "Deferred FCS": drain() writes the captured part of
the FCS), then the captured bytes, padded to 8.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy
from posix.time cimport clock_gettime, timespec, CLOCK_REALTIME

cdef extern from "nicemu_crc32.h" nogil:
    void nicemu_crc32_init()
    uint32_t nicemu_crc32(uint32_t crc, const uint8_t *p, size_t n)

__all__ = ["CapRing", "HEADER", "OWED"]

nicemu_crc32_init()

cdef enum:
    HDR = 16
HEADER = HDR  # bytes of a record's header in the ring (and of a pcap record header)
cdef uint32_t OWED_BIT = 0x80000000U
OWED = OWED_BIT


cdef inline uint64_t record_size(uint32_t incl) noexcept nogil:
    return HDR + ((incl + 7) & ~(<uint64_t>7))


cdef inline void put_u32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>v
    p[1] = <uint8_t>(v >> 8)
    p[2] = <uint8_t>(v >> 16)
    p[3] = <uint8_t>(v >> 24)


cdef class CapRing:
    """A capture ring of `capacity` bytes keeping at most `snaplen` bytes of each frame.
    clock_step_ns (tests): stamp the k-th frame (k from 1) k * clock_step_ns instead of the
    wall clock, so that two rings fed the same frames produce the same bytes."""

    def __cinit__(self, uint64_t capacity=1 << 22, uint32_t snaplen=65535, uint64_t clock_step_ns=0):
        if capacity < HDR + 8 or capacity > (1 << 40):
            raise ValueError(f"capture ring capacity must be 24 bytes to 1 TiB, got {capacity}")
        if snaplen < 1 or snaplen > 0x7FFFFFFF:
            raise ValueError(f"capture snaplen must be 1 to 2**31 - 1, got {snaplen}")
        self._buf = <uint8_t *>malloc(capacity)
        if self._buf == NULL:
            raise MemoryError()
        self.capacity = capacity
        self.snaplen = snaplen
        self._clock_step = clock_step_ns

    def __dealloc__(self):
        free(self._buf)

    cdef int put(self, const uint8_t *f, uint32_t n, bint fcs_owed) noexcept nogil:
        """Record frame f[:n] (1) or count it in not_captured when the ring is full (0)."""
        cdef uint32_t incl = n if n <= self.snaplen else self.snaplen
        cdef uint64_t rec = record_size(incl)
        if rec > self.capacity - self._used:
            self.not_captured += 1
            return 0
        cdef uint64_t ts
        cdef timespec t
        if self._clock_step:
            self._fake_now += self._clock_step
            ts = self._fake_now
        else:
            clock_gettime(CLOCK_REALTIME, &t)
            ts = <uint64_t>t.tv_sec * 1000000000ULL + <uint64_t>t.tv_nsec
        cdef uint8_t *h = self._buf + self._used
        memcpy(h, &ts, 8)
        memcpy(h + 8, &n, 4)
        cdef uint32_t word = incl | (OWED_BIT if fcs_owed else 0)
        memcpy(h + 12, &word, 4)
        memcpy(h + HDR, f, incl)
        self._used += rec
        self._count += 1
        self.captured += 1
        return 1

    def push(self, const uint8_t[::1] frame not None, bint fcs_owed=False):
        """put() from Python (tests, Python callers): True if recorded."""
        cdef uint32_t n = <uint32_t>frame.shape[0]
        if n == 0:
            return bool(self.put(<const uint8_t *>b"", 0, fcs_owed))
        return bool(self.put(&frame[0], n, fcs_owed))

    @property
    def used(self):
        """Bytes of records waiting for drain()."""
        return self._used

    def __len__(self):
        """Records waiting for drain()."""
        return self._count

    def drain(self, long long limit=-1):
        """Empty the ring: (pcap records, written, truncated, discarded).

        The first `limit` records (all if limit < 0) as classic pcap records, the layout of
        nicemu.cable.capture.RECORD_HEADER (ts_sec, ts_usec, incl_len, orig_len, little-endian)
        each followed by its bytes, with any owed FCS written; `truncated`: how many of them
        are shorter than their frame; `discarded`: records beyond `limit`, dropped."""
        cdef uint64_t k = self._count if limit < 0 or <uint64_t>limit > self._count else <uint64_t>limit
        cdef uint64_t off = 0, out_len = 0, i
        cdef uint32_t word, incl
        for i in range(k):
            memcpy(&word, self._buf + off + 12, 4)
            incl = word & ~OWED_BIT
            out_len += HDR + incl
            off += record_size(incl)
        blob = PyBytes_FromStringAndSize(NULL, out_len)
        cdef uint8_t *o = <uint8_t *>PyBytes_AS_STRING(blob)
        cdef uint8_t *h
        cdef uint64_t ts
        cdef uint32_t n, fcs, j
        cdef unsigned long long truncated = 0
        off = 0
        for i in range(k):
            h = self._buf + off
            memcpy(&ts, h, 8)
            memcpy(&n, h + 8, 4)
            memcpy(&word, h + 12, 4)
            incl = word & ~OWED_BIT
            put_u32(o, <uint32_t>(ts // 1000000000ULL))
            put_u32(o + 4, <uint32_t>((ts % 1000000000ULL) // 1000))
            put_u32(o + 8, incl)
            put_u32(o + 12, n)
            memcpy(o + HDR, h + HDR, incl)
            if (word & OWED_BIT) and n >= 4 and incl > n - 4:
                fcs = nicemu_crc32(0, h + HDR, n - 4)
                for j in range(n - 4, incl):
                    o[HDR + j] = <uint8_t>(fcs >> (8 * (j - (n - 4))))
            if incl < n:
                truncated += 1
            o += HDR + incl
            off += record_size(incl)
        cdef unsigned long long discarded = self._count - k
        self._used = 0
        self._count = 0
        return blob, k, truncated, discarded
