# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The syscall channel's record ring in C: the same protocol, checks and attributes as the
pure-Python reference kstack.syscall.ring.PyRing (whose module docstring explains it), with
real atomics: tail/head published with release stores and read with acquire loads, a
sequentially consistent fence between "set my flag" and "read the other side's index", and
each record header copied out of the shared mapping once before one field of it is checked
(the peer may rewrite it while we look). ring.py picks this class when it is built
(cythonize -i -3 kstack/syscall/_ring.pyx; pip install . does).
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

cdef extern from *:
    """
    #include <stdint.h>
    static inline void kstack_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    static inline uint64_t kstack_load(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void kstack_store(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    #pragma pack(push, 1)
    typedef struct { uint32_t n; uint16_t op, flags; uint32_t call_id; int32_t fd;
                     int64_t a0, a1, a2; uint32_t ip; uint16_t port, has_addr; } kstack_rec;
    #pragma pack(pop)
    """
    void kstack_fence() nogil
    uint64_t kstack_load(const uint64_t *p) nogil
    void kstack_store(uint64_t *p, uint64_t v) nogil
    ctypedef struct kstack_rec:
        uint32_t n
        uint16_t op
        uint16_t flags
        uint32_t call_id
        int32_t fd
        int64_t a0
        int64_t a1
        int64_t a2
        uint32_t ip
        uint16_t port
        uint16_t has_addr

# Op.SENDTO, F_ASYNC (kstack.syscall.channel, which imports this module's importer: the
# values are checked there) and MSG_DONTWAIT, for pop_sends
SENDTO, F_ASYNC, MSG_DONTWAIT = 5, 0x1, 0x40
cdef int _SENDTO = SENDTO
cdef int _F_ASYNC = F_ASYNC
cdef int64_t _DONTWAIT = MSG_DONTWAIT
cdef uint64_t REC_BYTES = 48
cdef uint64_t HEADER_BYTES = 4096
cdef uint32_t WRAP = 0xFFFFFFFF
assert sizeof(kstack_rec) == 48


def fence():
    kstack_fence()


class RingCorruptC(Exception):
    """Replaced by ring.RingCorrupt when ring.py imports this module."""


cdef object Corrupt = RingCorruptC


def set_corrupt(cls):
    global Corrupt
    Corrupt = cls


cdef class CRing:
    """One end of ring `index` (0: SQ, 1: CQ); see kstack.syscall.ring.PyRing."""

    cdef public object _mv, _q, data
    cdef public uint64_t size, mask, tail, head, published, released
    cdef public Py_ssize_t max_payload, _w_tail, _w_head, _w_wake, _w_space
    cdef public bint producer
    cdef unsigned char[::1] _view
    cdef uint8_t *base
    cdef uint64_t *ctl

    def __init__(self, buf, int index, uint64_t size, Py_ssize_t offset, Py_ssize_t max_payload, bint producer):
        if size & (size - 1) or size < 2 * (REC_BYTES + ((max_payload + 7) & ~7)):
            raise ValueError(f"ring of {size} bytes: a power of two holding two largest records")
        mv = memoryview(buf)
        if len(mv) < offset + <Py_ssize_t>size or offset < <Py_ssize_t>HEADER_BYTES:
            raise ValueError("ring outside its mapping")
        self._mv = mv
        self._q = mv[:HEADER_BYTES].cast("Q")
        self.data = mv[offset:offset + <Py_ssize_t>size]
        self._view = mv
        self.ctl = <uint64_t *>&self._view[0]
        self.base = &self._view[offset]
        self.size = size
        self.mask = size - 1
        self.max_payload = max_payload
        self.producer = producer
        base = (128 + 256 * index) // 8
        self._w_tail = base  # each control word on its own cache line, as PyRing has them
        self._w_head = base + 8
        self._w_wake = base + 16
        self._w_space = base + 24
        self.tail = self.head = self.published = self.released = 0

    def close(self):
        self._view = None
        self.base = NULL
        self.ctl = NULL
        for v in (self._q, self.data, self._mv):
            v.release()

    # --- producer -----------------------------------------------------------------------

    cpdef uint64_t _peer_head(self) except? 0xFFFFFFFFFFFFFFFF:
        cdef uint64_t h = kstack_load(&self.ctl[self._w_head])
        if h < self.head or h > self.published or h & 7:
            raise Corrupt(f"consumer head {h} outside [{self.head}, {self.published}]")
        self.head = h
        return h

    def consumed(self):
        return self._peer_head()

    cdef inline uint64_t _end(self, Py_ssize_t n):
        cdef uint64_t need = REC_BYTES + ((n + 7) & ~7)
        cdef uint64_t contig = self.size - (self.tail & self.mask)
        return self.tail + (need if contig >= need else contig + need)

    def room(self, Py_ssize_t payload_len):
        cdef uint64_t end = self._end(payload_len)
        if end - self.head <= self.size:
            return True
        return end - self._peer_head() <= self.size

    def push(self, int op, uint32_t call_id, int32_t fd=-1, int64_t a0=0, int64_t a1=0, int64_t a2=0,
             payload=b"", addr=None, int flags=0):
        """Write one record (not yet visible: publish() makes it so). False when full."""
        cdef const unsigned char[::1] pv
        cdef const uint8_t *src
        cdef Py_ssize_t n
        if type(payload) is bytes:
            n = PyBytes_GET_SIZE(payload)
            src = <const uint8_t *>PyBytes_AS_STRING(payload)
        else:
            pv = memoryview(payload).cast("B")
            n = pv.shape[0]
            src = &pv[0] if n else NULL
        if n > self.max_payload:
            raise ValueError(f"payload of {n} bytes over the limit of {self.max_payload}")
        cdef kstack_rec r
        if addr is None:
            r.ip = 0
            r.port = 0
            r.has_addr = 0
        else:
            r.ip = addr[0]
            r.port = addr[1]
            r.has_addr = 1
        cdef uint64_t need = REC_BYTES + ((n + 7) & ~7)
        cdef uint64_t tail = self.tail
        cdef uint64_t pos = tail & self.mask
        cdef uint64_t contig = self.size - pos
        cdef uint64_t end = tail + (need if contig >= need else contig + need)
        if end - self.head > self.size and end - self._peer_head() > self.size:
            return False
        if contig < need:
            (<uint32_t *>(self.base + pos))[0] = WRAP
            tail += contig
            pos = 0
        if n:
            memcpy(self.base + pos + REC_BYTES, src, n)  # payload, then header
            if n & 7:
                memset(self.base + pos + REC_BYTES + n, 0, 8 - (n & 7))
        r.n = <uint32_t>n
        r.op = <uint16_t>op
        r.flags = <uint16_t>flags
        r.call_id = call_id
        r.fd = fd
        r.a0 = a0
        r.a1 = a1
        r.a2 = a2
        memcpy(self.base + pos, &r, REC_BYTES)
        self.tail = tail + need
        return True

    def publish(self):
        """Make the pushed records visible. True: the consumer sleeps, ring its eventfd."""
        if self.tail == self.published:
            return False
        kstack_store(&self.ctl[self._w_tail], self.tail)
        self.published = self.tail
        kstack_fence()
        if kstack_load(&self.ctl[self._w_wake]):
            kstack_store(&self.ctl[self._w_wake], 0)
            return True
        return False

    def want_space(self, Py_ssize_t payload_len):
        kstack_store(&self.ctl[self._w_space], 1)
        kstack_fence()
        return self.room(payload_len)

    def request_progress(self):
        kstack_store(&self.ctl[self._w_space], 1)
        kstack_fence()

    # --- consumer -----------------------------------------------------------------------

    cpdef uint64_t _peer_tail(self) except? 0xFFFFFFFFFFFFFFFF:
        cdef uint64_t t = kstack_load(&self.ctl[self._w_tail])
        if t < self.tail or t - self.head > self.size or t & 7:
            raise Corrupt(f"producer tail {t} outside [{self.tail}, {self.head + self.size}]")
        self.tail = t
        return t

    def pending(self):
        return self.head != self.tail or self._peer_tail() != self.head

    def pop_raw(self):
        """(op, flags, call_id, fd, a0, a1, a2, ip, port, has_addr, payload) or None."""
        cdef uint64_t head = self.head
        if head == self.tail and self._peer_tail() == head:
            return None
        cdef uint64_t tail = self.tail
        cdef uint64_t pos = head & self.mask
        cdef uint64_t contig = self.size - pos
        cdef uint32_t first = (<uint32_t *>(self.base + pos))[0]
        if first == WRAP:
            if contig > tail - head:
                raise Corrupt(f"wrap marker at {head} past the tail {tail}")
            head += contig
            self.head = head
            if head == tail:
                return None
            pos = 0
            contig = self.size
        cdef uint64_t avail = tail - head
        if avail < REC_BYTES:
            raise Corrupt(f"record header at {head} cut by the tail {tail}")
        cdef kstack_rec r
        memcpy(&r, self.base + pos, REC_BYTES)  # once: every check is of this copy
        if r.n > <uint64_t>self.max_payload:
            raise Corrupt(f"record length {r.n} over the limit {self.max_payload}")
        cdef uint64_t need = REC_BYTES + ((r.n + 7) & ~7)
        if need > avail or need > contig:
            raise Corrupt(f"record of {r.n} bytes at {head} runs past the tail or the end")
        payload = PyBytes_FromStringAndSize(<char *>(self.base + pos + REC_BYTES), r.n) if r.n else b""
        self.head = head + need
        return (r.op, r.flags, r.call_id, r.fd, r.a0, r.a1, r.a2, r.ip, r.port, r.has_addr, payload)

    def pop_sends(self, socks, sendq, parked, send_c, Py_ssize_t budget):
        """PyRing.pop_sends (see there), the loop in C."""
        cdef Py_ssize_t sent = 0, copied = 0
        cdef uint64_t head
        cdef int64_t a0
        last_fd = None
        last_ok = False
        while sent < budget:
            head = self.head
            r = self.pop_raw()
            if r is None:
                break
            fd = r[3]
            a0 = r[4]
            if r[0] != _SENDTO or r[1] != _F_ASYNC or r[9] or a0 & ~_DONTWAIT:
                self.head = head  # not ours: the caller pops it again
                break
            if fd != last_fd:
                sock = socks.get(fd)
                last_ok = (sock is not None and fd not in sendq and fd not in parked
                           and getattr(sock, "sendmsg_c", None) is send_c)
                last_fd = fd
            if not last_ok:
                self.head = head
                break
            payload = r[10]
            if send_c(sock, payload) < 0:
                return sent, copied, r
            sent += 1
            copied += PyBytes_GET_SIZE(payload)
        return sent, copied, None

    def release(self):
        if self.released == self.head:
            return False
        kstack_store(&self.ctl[self._w_head], self.head)
        self.released = self.head
        kstack_fence()
        if kstack_load(&self.ctl[self._w_space]):
            kstack_store(&self.ctl[self._w_space], 0)
            return True
        return False

    def arm(self):
        kstack_store(&self.ctl[self._w_wake], 1)
        kstack_fence()
        return self.pending()

    def disarm(self):
        kstack_store(&self.ctl[self._w_wake], 0)
