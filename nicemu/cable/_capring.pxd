# The compiled capture ring (nicemu/cable/_capring.pyx), declared for nicemu/_datapath.pyx.
from libc.stdint cimport uint8_t, uint32_t, uint64_t

cdef class CapRing:
    cdef uint8_t *_buf
    cdef readonly uint64_t capacity  # bytes of records the ring holds at most
    cdef readonly uint32_t snaplen  # bytes kept of each frame at most
    cdef uint64_t _used  # bytes of records waiting for drain()
    cdef uint64_t _count  # records waiting
    cdef readonly unsigned long long captured  # frames put into the ring, ever
    cdef readonly unsigned long long not_captured  # frames refused: the ring was full
    cdef uint64_t _clock_step  # tests: timestamps k * step instead of the wall clock
    cdef uint64_t _fake_now
    cdef int put(self, const uint8_t *f, uint32_t n, bint fcs_owed) noexcept nogil
