"""The doorbell page's poll step: slots read, tails checked and applied to the data path engine,
with no Python step per doorbell unless Python work is due (docs/transport.md, "The doorbell
page", "The compiled poll step").

The emulator's fast path with the page on is: a slot word changed -> the tail register is
stored -> the engine's TX walk (TDT) or RX drain (RDT) runs -> the event word it returns is
acted on. Everything in that chain but the last step is register-file and engine work, and the
last step is Python only when it does something Python must do: start a delay timer, raise the
INTx line, continue a TX walk that ran out of budget, emit a tracepoint. So a port (one device's
page) applies a slot itself when the Nic says, through `fast` / `tx_ok` (set by the server
before every poll from Nic state: no timer armed, line low, no pending TX continuation,
tracepoints off), that nothing of the kind is pending, and the causes an event word adds to ICR
stay masked (IMS) and need no timer (RDTR / TIDV zero). Any other outcome is handed back to
Python as an *action* (`act_*`): "write this value through Nic.write32" (SLOW) or "service
these event words through Nic._service" (EVENTS), exactly what the Nic would have done, after
which the poll goes on where it stopped.

The rule for a slot (one place: `take_slot`, and its C twin in _pagepoll.pyx, held equal by
tests/transport/test_pagepoll.py): apply it once its word differs from the last taken and the
client's `after` (messages sent before the store) has been reached by `handled` (messages
taken); the value is the word's low 16 bits, applied as a REGION_WRITE of it is; one that is
not a descriptor index of the ring (value >= descriptor count, unless both are 0) is counted in
`bad`. Before a TDT is applied every port's pending RDT is (frames sent to a device of this
process find the buffers its driver gave back before ringing that TDT).

This module is the readable reference (`PagePollerRef`, `PagePortRef`); _pagepoll.pyx is the
same in C (`PagePoller`, `PagePort`), its waiting without the GIL.
"""
from __future__ import annotations

import time
from typing import Any

from nicemu import regs as R
from nicemu.vfio_user import doorbell as db

__all__ = ["NONE", "APPLIED", "WAIT", "SLOW", "EVENTS", "PagePortRef", "PagePollerRef", "make_poller",
           "slot_result", "events_ok", "apply_events"]

# what taking one slot did (take_slot)
NONE = 0  # the word did not change: nothing to do
APPLIED = 1  # taken and applied, events included
WAIT = 2  # changed, but written after messages not yet taken: it waits for them
SLOW = 3  # taken; Python applies the value (Nic.write32): act_reg, act_value
EVENTS = 4  # taken and the engine ran; Python services the event words: act_ev, act_pev

_TDT, _RDT = R.TDT >> 2, R.RDT >> 2
_TDLEN, _RDLEN = R.TDLEN >> 2, R.RDLEN >> 2
_ICR, _IMS = R.ICR >> 2, R.IMS >> 2
_RDTR, _TIDV = R.RDTR >> 2, R.TIDV >> 2
_RXT0, _TXDW = int(R.Icr.RXT0), int(R.Icr.TXDW)
_EV_RX_DONE, _EV_TX_IDE, _EV_TX_MORE = R.EV_RX_DONE, R.EV_TX_IDE, R.EV_TX_MORE
_M32 = 0xFFFFFFFF


def slot_result(word: int, last: int, handled: int, ring_len_reg: int) -> tuple[int, bool]:
    """The check of one slot word against the last taken: (NONE | WAIT | APPLIED, whether the
    value is not a descriptor index of a ring whose RDLEN/TDLEN reads `ring_len_reg`). APPLIED
    here means "take it"."""
    if word == last:
        return NONE, False
    if (handled - (word >> 32)) & _M32 >= 0x80000000:
        return WAIT, False
    value = word & 0xFFFF
    n = (ring_len_reg & R.RING_LEN_MASK) // R.DESC_SIZE
    return APPLIED, value >= n and (n != 0 or value != 0)


def events_ok(regs, ev: int) -> bool:
    """Whether Nic._service(ev) would only add causes to ICR: no delay timer to start (RDTR /
    TIDV 0: RXT0 / TXDW at once), no TX continuation (EV_TX_MORE), and every cause masked
    (ICR & IMS stays 0: the line stays low). The Nic's own state (no timer armed, line low,
    tracepoints off) is the port's `fast` flag, checked by the caller."""
    if not ev:
        return True
    if ev & _EV_TX_MORE:
        return False
    causes = ev & _M32
    if ev & _EV_RX_DONE:
        if regs[_RDTR] & R.DELAY_TIMER:
            return False
        causes |= _RXT0
    if ev & _EV_TX_IDE:
        if regs[_TIDV] & R.DELAY_TIMER:
            return False
        causes |= _TXDW
    return not (regs[_ICR] | causes) & regs[_IMS]


def apply_events(regs, ev: int) -> None:
    """What Nic._service(ev) does when events_ok(regs, ev): the causes into ICR."""
    causes = ev & _M32
    if ev & _EV_RX_DONE:
        causes |= _RXT0
    if ev & _EV_TX_IDE:
        causes |= _TXDW
    if causes:
        regs[_ICR] |= causes


class PagePortRef:
    """One device's doorbell page as the poller sees it: the page, the Nic's register file and
    engine, its linked peer's engine (frames a TX walk delivers raise events there)."""

    def __init__(self, page: Any, regs, engine: Any, peer_regs=None, peer_engine: Any = None,
                 owner: Any = None) -> None:
        self.page = page
        self.regs = regs
        self.engine = engine
        self.peer_regs = peer_regs
        self.peer_engine = peer_engine
        self.owner = owner  # the server (for the Python actions); not used here
        self.last = [page.load(db.SLOT_TDT), page.load(db.SLOT_RDT)]
        self.handled = 0  # messages the server has taken from this client (mod 2**32)
        self.fast = False  # the Nic and its peer have no timer armed, line low, tracepoints off
        self.tx_ok = False  # a TDT may walk the ring here (no TX continuation pending, no tracepoint)
        self.doorbells = 0
        self.bad = 0
        self.active = False  # a slot was taken since the flag was last cleared
        self.waiting = False  # a slot waits for messages (its `after` is ahead)
        self.closed = False

    def set_last(self, tdt: int, rdt: int) -> None:
        """The words last taken (a port that replaces another goes on from its words)."""
        self.last = [tdt, rdt]

    def take_slot(self, poller: "PagePollerRef", slot: int) -> int:
        """Take slot `slot` if its word says so (the rule: module docstring) and apply it;
        returns NONE, WAIT, APPLIED, or SLOW / EVENTS with the action in `poller`."""
        if self.closed:
            return NONE
        word = self.page.load(slot)
        regs = self.regs
        tx = slot == db.SLOT_TDT
        res, bad = slot_result(word, self.last[slot], self.handled, regs[_TDLEN if tx else _RDLEN])
        if res == WAIT:
            self.waiting = True
        if res != APPLIED:
            return res
        self.last[slot] = word
        poller.act_port = self  # whose doorbell it is, if the engine raises
        self.active = True
        self.doorbells += 1
        if bad:
            self.bad += 1
        value = word & 0xFFFF
        if tx and not self.tx_ok:
            return poller._act(self, SLOW, R.TDT, value, 0, 0)
        if tx:
            regs[_TDT] = value
            ev = self.engine.transmit()
            pev = self.peer_engine.take_events() if self.peer_engine is not None else 0
        else:
            regs[_RDT] = value
            ev = self.engine.drain_rx()
            pev = 0
        if not (ev or pev) or (self.fast and _events_both(self, ev, pev)):
            return APPLIED
        return poller._act(self, EVENTS, R.TDT if tx else R.RDT, value, ev, pev)


def _events_both(port, ev: int, pev: int) -> bool:
    """Both event words in place (checked first, then applied), or neither."""
    if pev and port.peer_regs is None:
        return False
    if not events_ok(port.regs, ev) or (pev and not events_ok(port.peer_regs, pev)):
        return False
    apply_events(port.regs, ev)
    if pev:
        apply_events(port.peer_regs, pev)
    return True


class PagePollerRef:
    """The ports of one emulator, polled together (the RDT-before-TDT rule spans devices)."""

    def __init__(self) -> None:
        self.ports: list[PagePortRef] = []  # polled: TDT and RDT, waited on
        self.rx_ports: list[PagePortRef] = []  # whose RDT goes first before a TDT: all of them
        self.act_port: PagePortRef | None = None
        self.act_kind = NONE
        self.act_reg = self.act_value = self.act_ev = self.act_pev = 0
        self.spins = 0  # passes over the ports in spin()

    def add(self, port: PagePortRef, polled: bool = True) -> None:
        """Poll `port`; not `polled` (another thread polls it): only its RDT, before a TDT
        of a polled port is applied."""
        if polled:
            self.ports.append(port)
        self.rx_ports.append(port)

    def remove(self, port: PagePortRef) -> None:
        """Stop polling `port` (its page is let go after this returns)."""
        port.closed = True
        if port in self.ports:
            self.ports.remove(port)
        if port in self.rx_ports:
            self.rx_ports.remove(port)

    def _act(self, port, kind: int, reg: int, value: int, ev: int, pev: int) -> int:
        self.act_port, self.act_kind = port, kind
        self.act_reg, self.act_value, self.act_ev, self.act_pev = reg, value, ev, pev
        return kind

    def _rx_all(self) -> int:
        """Every port's RDT: NONE, WAIT if one waits for messages, or an action."""
        out = NONE
        for p in self.rx_ports:
            res = p.take_slot(self, db.SLOT_RDT)
            if res >= SLOW:
                return res
            if res == WAIT:
                out = WAIT
        return out

    def sync(self, port: PagePortRef, defer: bool = False) -> int:
        """The page before a message of `port`'s client (and when polled): its RDT; then, if
        its TDT changed, every port's RDT and its TDT. NONE when done (port.active says whether
        something was taken), else an action for Python, after which sync is called again.

        `defer` (a poll, not a message of this client): if another port's RDT waits for
        messages of its client, the TDT waits too (port.waiting), so that a TDT rung after
        that RDT in real time - a driver that frees buffers, then its peer sends - never finds
        the ring without them. Before a message of this client (a read flushes the TDT) it
        does not wait."""
        res = port.take_slot(self, db.SLOT_RDT)
        if res >= SLOW:
            return res
        if port.closed or port.page.load(db.SLOT_TDT) == port.last[db.SLOT_TDT]:
            return NONE
        res = self._rx_all()
        if res >= SLOW:
            return res
        if res == WAIT and defer:
            port.waiting = True
            return NONE
        res = port.take_slot(self, db.SLOT_TDT)
        return res if res >= SLOW else NONE

    def poll_all(self) -> int:
        """One pass over every port (sync of each, deferring); NONE or an action."""
        for p in self.ports:
            res = self.sync(p, True)
            if res >= SLOW:
                return res
        return NONE

    def spin(self, until_ns: int) -> int:
        """Poll every port until the clock reaches `until_ns` or a slot waits for messages (the
        loop must read them) or an action is due; NONE or the action."""
        for p in self.ports:
            p.waiting = False
        while True:
            self.spins += 1
            res = self.poll_all()
            if res >= SLOW:
                return res
            if any(p.waiting for p in self.ports) or not self.wait(until_ns):
                return NONE

    def wait(self, until_ns: int) -> bool:
        """Until a polled port's slot word differs from the last taken (True), the clock
        reaches `until_ns` (False) or a port is being removed (True)."""
        clock = time.monotonic_ns
        while True:
            for p in self.ports:
                if p.closed or p.page.load(db.SLOT_TDT) != p.last[0] or p.page.load(db.SLOT_RDT) != p.last[1]:
                    return True
            if clock() >= until_ns:
                return False


def make_poller(engine: str = "cython"):
    """The compiled poller (nicemu/vfio_user/_pagepoll.pyx) if built and asked for, else the
    reference; its port class comes with it (poller.port_class)."""
    if engine == "cython":
        try:
            from nicemu.vfio_user._pagepoll import PagePoller, PagePort
        except ImportError:
            pass
        else:
            poller = PagePoller()
            poller.port_class = PagePort
            return poller
    poller = PagePollerRef()
    poller.port_class = PagePortRef
    return poller
