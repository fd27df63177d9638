# cython: language_level=3, boundscheck=False, wraparound=False
"""The doorbell page's memory operations with C atomics: nicemu/vfio_user/doorbell.py
(DoorbellPageRef, the readable reference) says what each does; tests/transport/
test_doorbell_page.py holds the two equal. Every word is loaded and stored whole (an aligned
64-bit atomic), and each side's store-then-load has a sequentially consistent fence between
(Dekker's pattern: see docs/transport.md, "The doorbell page")."""
from libc.stdint cimport uint32_t, uint64_t

from nicemu.vfio_user.doorbell import PAGE_SIZE as _PAGE_SIZE, WORD_NEED_WAKE as _NEED_WAKE

cdef extern from *:
    """
    #include <stdint.h>
    static inline void db_store(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
    static inline uint64_t db_load(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void db_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    """
    void db_store(uint64_t *p, uint64_t v) nogil
    uint64_t db_load(const uint64_t *p) nogil
    void db_fence() nogil

cdef Py_ssize_t PAGE_SIZE = _PAGE_SIZE
cdef Py_ssize_t NEED_WAKE = _NEED_WAKE


cdef class DoorbellPage:
    # attributes (_mv, _w): _doorbell.pxd

    def __init__(self, buf):
        cdef unsigned char[::1] view
        mv = memoryview(buf)
        if mv.readonly or mv.nbytes < PAGE_SIZE:
            mv.release()
            raise ValueError(f"a doorbell page needs {PAGE_SIZE} writable bytes")
        view = mv.cast("B")
        if (<size_t>&view[0]) & 7:
            raise ValueError("a doorbell page must be 8-byte aligned")
        self._w = <uint64_t *>&view[0]
        self._mv = view  # holds the buffer export while the pointer is used

    cdef inline uint64_t *_words(self) except NULL:
        if self._w == NULL:
            raise ValueError("the doorbell page was released")
        return self._w

    def client_write(self, Py_ssize_t slot, uint64_t word):
        cdef uint64_t *w = self._words()
        if not 0 <= slot < 2:
            raise IndexError(slot)
        db_store(&w[slot], word)  # seq_cst: a locked exchange on x86, a full barrier
        db_fence()
        return db_load(&w[NEED_WAKE])

    def load(self, Py_ssize_t slot):
        cdef uint64_t *w = self._words()
        if not 0 <= slot < PAGE_SIZE // 8:
            raise IndexError(slot)
        return db_load(&w[slot])

    def arm(self):
        cdef uint64_t *w = self._words()
        db_store(&w[NEED_WAKE], 1)
        db_fence()

    def disarm(self):
        cdef uint64_t *w = self._words()
        db_store(&w[NEED_WAKE], 0)

    def need_wake(self):
        return db_load(&self._words()[NEED_WAKE])

    def release(self):
        self._w = NULL
        self._mv = None


cdef extern from "<string.h>" nogil:
    int memcmp(const void *a, const void *b, size_t n)


def scan_tail_run(const unsigned char[::1] buf, Py_ssize_t start, Py_ssize_t end):
    """nicemu/vfio_user/doorbell.py's scan_tail_run_ref in C: the run of posted 32-bit writes
    identical but for id and data from `start` to at most `end`, decoded without a Python step
    per message: (where it ends, the data dwords)."""
    cdef Py_ssize_t nxt, n = buf.shape[0]
    cdef const unsigned char *p
    cdef uint32_t v
    if end > n:
        end = n
    if start < 0 or end - start < 36:
        raise ValueError("no whole posted write at start")
    p = &buf[0]
    values = []
    memcpy_u32(&v, p + start + 32)
    values.append(v)
    nxt = start + 36
    while end - nxt >= 36 and memcmp(p + nxt + 2, p + start + 2, 30) == 0:
        memcpy_u32(&v, p + nxt + 32)
        values.append(v)
        nxt += 36
    return nxt, values


cdef inline void memcpy_u32(uint32_t *dst, const unsigned char *src) noexcept nogil:
    (<unsigned char *>dst)[0] = src[0]
    (<unsigned char *>dst)[1] = src[1]
    (<unsigned char *>dst)[2] = src[2]
    (<unsigned char *>dst)[3] = src[3]
