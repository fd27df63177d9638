# cython: language_level=3, boundscheck=False, wraparound=False
"""The doorbell page's poll step in C: nicemu/vfio_user/pagepoll.py (PagePollerRef, PagePortRef)
is the readable reference and says what each step does; tests/transport/test_pagepoll.py holds
the two equal (results, register files, counters, frames).

What is C here: loading the slots (atomics), the slot rule (changed word, `after` reached, the
ring-index check counted in `bad`), storing the tail, and acting on the event words the engine
returns when only ICR changes. The engine is called through its Python methods (once per
doorbell, not per frame). `spin` waits for a slot to change with the GIL released, so another
thread (the control plane, or another device's engine thread) runs meanwhile."""
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE
from libc.stdint cimport uint32_t, uint64_t, int64_t

from nicemu.vfio_user._doorbell cimport DoorbellPage

from nicemu import regs as _R
from nicemu.vfio_user import doorbell as _db

cdef extern from *:
    """
    #include <stdint.h>
    #include <time.h>
    static inline uint64_t pp_load(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline int pp_load_int(const int *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
    static inline void pp_store_int(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
    static inline int64_t pp_now(void) {
        struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
        return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    }
    static inline void pp_relax(void) {
    #if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
    #endif
    }
    """
    uint64_t pp_load(const uint64_t *p) nogil
    int pp_load_int(const int *p) nogil
    void pp_store_int(int *p, int v) nogil
    int64_t pp_now() nogil
    void pp_relax() nogil

# results of taking a slot (pagepoll.py)
cdef enum:
    NONE = 0
    APPLIED = 1
    WAIT = 2
    SLOW = 3
    EVENTS = 4

cdef int SLOT_TDT = _db.SLOT_TDT
cdef int SLOT_RDT = _db.SLOT_RDT
cdef int W_TDT = _R.TDT >> 2
cdef int W_RDT = _R.RDT >> 2
cdef int W_TDLEN = _R.TDLEN >> 2
cdef int W_RDLEN = _R.RDLEN >> 2
cdef int W_ICR = _R.ICR >> 2
cdef int W_IMS = _R.IMS >> 2
cdef int W_RDTR = _R.RDTR >> 2
cdef int W_TIDV = _R.TIDV >> 2
cdef uint32_t REG_TDT = _R.TDT
cdef uint32_t REG_RDT = _R.RDT
cdef uint32_t RXT0 = int(_R.Icr.RXT0)
cdef uint32_t TXDW = int(_R.Icr.TXDW)
cdef uint64_t EV_RX_DONE = _R.EV_RX_DONE
cdef uint64_t EV_TX_IDE = _R.EV_TX_IDE
cdef uint64_t EV_TX_MORE = _R.EV_TX_MORE
cdef uint32_t RING_LEN_MASK = _R.RING_LEN_MASK
cdef uint32_t DESC_SIZE = _R.DESC_SIZE
cdef uint32_t DELAY_TIMER = _R.DELAY_TIMER
DEF MAX_WAIT_PORTS = 64


cdef inline int slot_check(uint64_t word, uint64_t last, uint32_t handled, uint32_t ring_len,
                           bint *bad) noexcept nogil:
    """pagepoll.slot_result: NONE, WAIT or APPLIED ("take it"), and the ring-index check."""
    bad[0] = False
    if word == last:
        return NONE
    if <uint32_t>(handled - <uint32_t>(word >> 32)) >= 0x80000000U:
        return WAIT
    cdef uint32_t value = <uint32_t>(word & 0xFFFF)
    cdef uint32_t n = (ring_len & RING_LEN_MASK) // DESC_SIZE
    bad[0] = value >= n and (n != 0 or value != 0)
    return APPLIED


def slot_result(uint64_t word, uint64_t last, uint32_t handled, uint32_t ring_len):
    """slot_check for tests: (NONE | WAIT | APPLIED, bad), as pagepoll.slot_result."""
    cdef bint bad
    cdef int res = slot_check(word, last, handled, ring_len, &bad)
    return res, bool(bad)


cdef inline uint32_t ev_causes(uint64_t ev) noexcept nogil:
    cdef uint32_t causes = <uint32_t>ev
    if ev & EV_RX_DONE:
        causes |= RXT0
    if ev & EV_TX_IDE:
        causes |= TXDW
    return causes


cdef inline bint ev_ok(const uint32_t *r, uint64_t ev) noexcept nogil:
    """pagepoll.events_ok."""
    if ev == 0:
        return True
    if ev & EV_TX_MORE:
        return False
    if (ev & EV_RX_DONE) and (r[W_RDTR] & DELAY_TIMER):
        return False
    if (ev & EV_TX_IDE) and (r[W_TIDV] & DELAY_TIMER):
        return False
    return ((r[W_ICR] | ev_causes(ev)) & r[W_IMS]) == 0


def events_ok(regs, uint64_t ev):
    """ev_ok for tests (pagepoll.events_ok)."""
    cdef const uint32_t[::1] r = regs
    return bool(ev_ok(&r[0], ev))


cdef class PagePort:
    """pagepoll.PagePortRef in C."""
    cdef DoorbellPage page
    cdef uint64_t *w
    cdef object regs
    cdef object peer_regs_obj
    cdef Py_buffer _rb
    cdef Py_buffer _pb
    cdef bint _have_rb
    cdef bint _have_pb
    cdef uint32_t *r
    cdef uint32_t *pr
    cdef object _transmit
    cdef object _drain
    cdef object _peer_take
    cdef uint64_t _last[2]
    cdef public object owner
    cdef public uint32_t handled
    cdef public bint fast
    cdef public bint tx_ok
    cdef public bint active
    cdef public bint waiting
    cdef public unsigned long long doorbells
    cdef public unsigned long long bad
    cdef int _closing  # atomics: a waiter (spin, maybe on another thread) holds _busy while
    cdef int _busy     # it reads the page; remove() sets _closing and waits for _busy == 0

    def __init__(self, DoorbellPage page not None, regs, engine, peer_regs=None, peer_engine=None,
                 owner=None):
        if page._w == NULL:
            raise ValueError("the doorbell page was released")
        PyObject_GetBuffer(regs, &self._rb, PyBUF_WRITABLE)
        self._have_rb = True
        if self._rb.len < 0x20000:
            raise ValueError("the register file must hold 0x20000 bytes")
        self.r = <uint32_t *>self._rb.buf
        if peer_regs is not None:
            PyObject_GetBuffer(peer_regs, &self._pb, PyBUF_WRITABLE)
            self._have_pb = True
            if self._pb.len < 0x20000:
                raise ValueError("the register file must hold 0x20000 bytes")
            self.pr = <uint32_t *>self._pb.buf
        self.page = page
        self.w = page._w
        self.regs = regs
        self.peer_regs_obj = peer_regs
        self._transmit = engine.transmit
        self._drain = engine.drain_rx
        self._peer_take = peer_engine.take_events if peer_engine is not None else None
        self._last[0] = pp_load(&self.w[SLOT_TDT])
        self._last[1] = pp_load(&self.w[SLOT_RDT])
        self.owner = owner

    def __dealloc__(self):
        if self._have_rb:
            PyBuffer_Release(&self._rb)
        if self._have_pb:
            PyBuffer_Release(&self._pb)

    @property
    def last(self):
        return [self._last[0], self._last[1]]

    def set_last(self, uint64_t tdt, uint64_t rdt):
        """PagePortRef.set_last."""
        self._last[0] = tdt
        self._last[1] = rdt

    @property
    def closed(self):
        return bool(pp_load_int(&self._closing))

    @property
    def peer_regs(self):
        return self.peer_regs_obj

    cdef int take_slot(self, PagePoller poller, int slot) except -1:
        """PagePortRef.take_slot."""
        if pp_load_int(&self._closing):
            return NONE
        cdef uint64_t word = pp_load(&self.w[slot])
        cdef uint32_t *r = self.r
        cdef bint tx = slot == SLOT_TDT
        cdef bint bad
        cdef int res = slot_check(word, self._last[slot], self.handled,
                                  r[W_TDLEN] if tx else r[W_RDLEN], &bad)
        if res == WAIT:
            self.waiting = True
        if res != APPLIED:
            return res
        self._last[slot] = word
        poller.act_port = self  # whose doorbell it is, if the engine raises
        self.active = True
        self.doorbells += 1
        if bad:
            self.bad += 1
        cdef uint32_t value = <uint32_t>(word & 0xFFFF)
        cdef uint64_t ev, pev = 0
        if tx and not self.tx_ok:
            return poller.act(self, SLOW, REG_TDT, value, 0, 0)
        if tx:
            r[W_TDT] = value
            ev = self._transmit()
            if self._peer_take is not None:
                pev = self._peer_take()
        else:
            r[W_RDT] = value
            ev = self._drain()
        if (ev == 0 and pev == 0) or (self.fast and self._events_both(ev, pev)):
            return APPLIED
        return poller.act(self, EVENTS, REG_TDT if tx else REG_RDT, value, ev, pev)

    cdef inline bint _events_both(self, uint64_t ev, uint64_t pev) noexcept:
        if pev and self.pr == NULL:
            return False
        if not ev_ok(self.r, ev) or (pev and not ev_ok(self.pr, pev)):
            return False
        self.r[W_ICR] |= ev_causes(ev)
        if pev:
            self.pr[W_ICR] |= ev_causes(pev)
        return True


cdef class PagePoller:
    """pagepoll.PagePollerRef in C."""
    cdef list _ports  # polled: their TDT and RDT, waited on in spin / wait
    cdef list _rx_ports  # whose RDT goes first before a TDT is applied: all of them
    cdef public object act_port
    cdef public int act_kind
    cdef public uint32_t act_reg
    cdef public uint32_t act_value
    cdef public uint64_t act_ev
    cdef public uint64_t act_pev
    cdef public unsigned long long spins
    cdef public object port_class

    def __init__(self):
        self._ports = []
        self._rx_ports = []
        self.act_port = None

    @property
    def ports(self):
        return list(self._ports)

    @property
    def rx_ports(self):
        return list(self._rx_ports)

    def add(self, PagePort port not None, bint polled=True):
        """Poll `port` (PagePollerRef.add); not `polled`: only its RDT, before a TDT."""
        if len(self._rx_ports) >= MAX_WAIT_PORTS:
            raise ValueError(f"at most {MAX_WAIT_PORTS} doorbell pages per poller")
        if polled:
            self._ports.append(port)
        self._rx_ports.append(port)

    def remove(self, PagePort port not None):
        """Stop polling `port`; returns once no thread reads its page (it may be let go then)."""
        pp_store_int(&port._closing, 1)
        with nogil:
            while pp_load_int(&port._busy):
                pp_relax()
        if port in self._ports:
            self._ports.remove(port)
        if port in self._rx_ports:
            self._rx_ports.remove(port)

    cdef int act(self, PagePort port, int kind, uint32_t reg, uint32_t value, uint64_t ev,
                 uint64_t pev) except -1:
        self.act_port = port
        self.act_kind = kind
        self.act_reg = reg
        self.act_value = value
        self.act_ev = ev
        self.act_pev = pev
        return kind

    cdef int _rx_all(self) except -1:
        """Every port's RDT: NONE, WAIT if one waits for messages, or an action."""
        cdef PagePort p
        cdef int res, out = NONE
        for p in self._rx_ports:
            res = p.take_slot(self, SLOT_RDT)
            if res >= SLOW:
                return res
            if res == WAIT:
                out = WAIT
        return out

    cdef int _sync(self, PagePort port, bint defer) except -1:
        cdef int res = port.take_slot(self, SLOT_RDT)
        if res >= SLOW:
            return res
        if pp_load_int(&port._closing) or pp_load(&port.w[SLOT_TDT]) == port._last[0]:
            return NONE
        res = self._rx_all()
        if res >= SLOW:
            return res
        if res == WAIT and defer:
            port.waiting = True  # the TDT after the RDT's messages (PagePollerRef.sync)
            return NONE
        res = port.take_slot(self, SLOT_TDT)
        return res if res >= SLOW else NONE

    def sync(self, PagePort port not None, bint defer=False):
        """PagePollerRef.sync."""
        return self._sync(port, defer)

    cdef int _poll_all(self) except -1:
        cdef PagePort p
        cdef int res
        for p in self._ports:
            res = self._sync(p, True)
            if res >= SLOW:
                return res
        return NONE

    def poll_all(self):
        """PagePollerRef.poll_all."""
        return self._poll_all()

    def spin(self, int64_t until_ns):
        """PagePollerRef.spin; between passes it waits for a slot word to change (or the
        clock to reach `until_ns`) with the GIL released."""
        cdef PagePort p
        cdef int res
        for p in self._ports:
            p.waiting = False
        while True:
            self.spins += 1
            res = self._poll_all()
            if res >= SLOW:
                return res
            for p in self._ports:
                if p.waiting:
                    return NONE
            if not self._wait(until_ns):
                return NONE

    def wait(self, int64_t until_ns):
        """Wait, with the GIL released, until a polled port's slot word differs from the last
        taken (True), the clock reaches `until_ns` (False) or a port is being removed (True)."""
        return self._wait(until_ns)

    cdef bint _wait(self, int64_t until_ns) except -1:
        cdef PagePort p
        cdef int k, n = 0
        cdef uint64_t *words[2 * MAX_WAIT_PORTS]
        cdef uint64_t lasts[2 * MAX_WAIT_PORTS]
        cdef int *busy[MAX_WAIT_PORTS]
        cdef int *closing[MAX_WAIT_PORTS]
        cdef bint changed = False
        cdef uint32_t spins = 0
        for p in self._ports:
            if n < MAX_WAIT_PORTS:
                words[2 * n] = &p.w[SLOT_TDT]
                words[2 * n + 1] = &p.w[SLOT_RDT]
                lasts[2 * n] = p._last[0]
                lasts[2 * n + 1] = p._last[1]
                busy[n] = &p._busy
                closing[n] = &p._closing
                n += 1
        with nogil:
            for k in range(n):
                pp_store_int(busy[k], 1)
            while True:
                for k in range(n):
                    if pp_load_int(closing[k]):
                        changed = True  # let go of it now; the next pass skips it
                        break
                    if pp_load(words[2 * k]) != lasts[2 * k] or pp_load(words[2 * k + 1]) != lasts[2 * k + 1]:
                        changed = True
                        break
                if changed:
                    break
                spins += 1
                if spins & 15 == 0 and pp_now() >= until_ns:  # the clock every 16 looks (~20 ns a read)
                    break
                pp_relax()
            for k in range(n):
                pp_store_int(busy[k], 0)
        return changed
