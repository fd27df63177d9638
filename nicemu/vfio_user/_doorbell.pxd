# The compiled doorbell page (_doorbell.pyx), for the compiled poll step (_pagepoll.pyx) to
# read its words without a Python call.
from libc.stdint cimport uint64_t


cdef class DoorbellPage:
    cdef object _mv
    cdef uint64_t *_w

    cdef inline uint64_t *_words(self) except NULL
