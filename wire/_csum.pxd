"""The internet checksum (RFC 1071) for the compiled paths: wire/checksum.py's sums in C, one
home for the loops that kstack/_gro.pyx, _gso.pyx, _rxfast.pyx and _txfast.pyx cimport (inline:
no module of its own to build)."""
from libc.stdint cimport uint8_t, uint64_t


cdef inline uint64_t csum_sum16(const uint8_t *p, Py_ssize_t n) noexcept nogil:
    """Sum of big-endian 16-bit words, an odd last byte padded with a zero, carries not folded
    (the caller folds, or takes the sum modulo 0xFFFF: the same value in ones' complement)."""
    cdef uint64_t s = 0
    cdef Py_ssize_t k = 0
    while k + 1 < n:
        s += (<uint64_t>p[k] << 8) | p[k + 1]
        k += 2
    if n & 1:
        s += <uint64_t>p[n - 1] << 8
    return s


cdef inline uint64_t csum_fold(uint64_t s) noexcept nogil:
    """The carries added back in until the sum fits in 16 bits (ones' complement addition)."""
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s
