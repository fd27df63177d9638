"""The vfio-user server's side of the doorbell page's poll step (docs/transport.md, "The
doorbell page"): a port made from a server's Nic, its flags kept from the Nic's state, the
Python actions the poll hands back, and the emulator's polling source, which spins over every
device's page in compiled code between two turns of the event loop.

The poll step itself (the slot rule, the tail stored, the engine run, the event words acted on
when only ICR changes) is nicemu/vfio_user/pagepoll.py (reference) / _pagepoll.pyx (C).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

from nicemu import tracepoint
from nicemu.vfio_user import pagepoll as pp

__all__ = ["make_port", "refresh", "run", "PagePolling", "SPIN_NS", "MAX_ACTIONS"]

log = logging.getLogger("nicemu.vfio_user")

# How long the polling source spins over the pages in one loop turn (then the loop looks at its
# descriptors and timers): a message or a timer waits at most this long while a client is active
SPIN_NS = 50_000
# Python actions (a timer to start, a line to raise...) one call runs before it returns
MAX_ACTIONS = 64


def make_port(server: Any, poller: Any, page: Any) -> Any:
    """A poll-step port for `server`'s Nic and `page`, in `poller` (same engine kind)."""
    nic = server.nic
    peer = getattr(nic, "_peer", None)
    port = poller.port_class(page, nic.regs, nic.engine,
                             peer.regs if peer is not None else None,
                             peer.engine if peer is not None else None, server)
    server._page_peer = peer
    return port


def _nic_quiet(nic: Any) -> bool:
    """The Nic has nothing Python must do around an event word but add its causes to ICR: no
    timer armed (delay timers, ITR hold-off, TX continuation) and the line low."""
    return getattr(nic, "_deadline", 1) is None and not getattr(nic, "irq", True)


def refresh(server: Any) -> None:
    """Before a poll: the messages `server` has taken, and whether its Nic (and the peer a TX
    walk delivers to) can take events in place (`fast`) and a TDT can walk here (`tx_ok`)."""
    port = server._page_port
    nic = server.nic
    if getattr(nic, "_peer", None) is not server._page_peer:  # linked or unlinked since: a new port
        server._page_rebuild_port()
        port = server._page_port
    port.handled = (server.messages - server._conn_base + server._skipped_msgs) & 0xFFFFFFFF
    peer = server._page_peer
    ok = not tracepoint.enabled
    port.tx_ok = ok and getattr(nic, "_tx_more_at", 1) is None
    port.fast = ok and _nic_quiet(nic) and (peer is None or _nic_quiet(peer))


def _act(poller: Any) -> None:
    """What the poll handed back, done as the Nic does it: a value through Nic.write32 (SLOW),
    or event words through Nic._service (EVENTS: the device's, then its peer's)."""
    port = poller.act_port
    server = port.owner
    nic = server.nic
    try:
        if poller.act_kind == pp.SLOW:
            nic.write32(poller.act_reg, poller.act_value)
        else:
            if poller.act_ev:
                nic._service(poller.act_ev)
            if poller.act_pev:
                nic._peer._service(poller.act_pev)
    except Exception:
        log.exception("%s: device failed on a doorbell-page write to %#x", server.name, poller.act_reg)
        server.posted_errors += 1


def run(poller: Any, step: Callable[[], int], servers: Any) -> None:
    """Run `step` (a poll: sync, poll_all or spin) and the actions it hands back, at most
    MAX_ACTIONS of them; after each, every port's flags are taken again from its Nic."""
    for _ in range(MAX_ACTIONS):
        poller.act_port = None
        try:
            res = step()
        except Exception:  # an engine failure: the slot was taken; count it and go on
            port = poller.act_port
            server = port.owner if port is not None else None
            log.exception("%s: device failed on a doorbell-page write", getattr(server, "name", "?"))
            if server is not None:
                server.posted_errors += 1
            res = pp.NONE
        if res < pp.SLOW:
            return
        _act(poller)
        for s in servers:
            if s._page_port is not None:
                refresh(s)


class PagePolling:
    """The emulator's timer source for the doorbell pages of all its devices (one poller, so the
    RDT-before-TDT rule spans them): due at once while any device polls its page; a turn spins
    over the pages for up to SPIN_NS (less if another timer is due sooner), then each device's
    idle rule (arm NEED_WAKE and sleep after PAGE_POLL_IDLE_NS without a doorbell) runs."""

    def __init__(self, emulator: Any, engine: str = "cython") -> None:
        self.emu = emulator
        self.poller = pp.make_poller(engine)
        # the kind of page its ports take (a server with a page of the other kind polls alone)
        self.kind = "python" if isinstance(self.poller, pp.PagePollerRef) else "cython"
        self.servers: list[Any] = []
        self.spin_ns = SPIN_NS

    def attach(self, server: Any) -> None:
        self.servers.append(server)
        server.page_polling = self

    def poller_for(self, server: Any) -> Any:
        return self.poller

    def add_port(self, server: Any, port: Any) -> None:
        self.poller.add(port)

    def remove_port(self, port: Any) -> None:
        self.poller.remove(port)

    wake_on_message = False

    def wake(self, server: Any) -> None:
        """A sleeping device polls again: the loop sees it in next_deadline."""

    def polling(self) -> bool:
        for s in self.servers:
            if s._page_port is not None and not s._page_sleeping:
                return True
        return False

    def next_deadline(self) -> int | None:
        return 0 if self.polling() else None

    def run_timers(self) -> None:
        servers = [s for s in self.servers if s._page_port is not None]
        if not servers:
            return
        clock = self.emu.clock
        now = clock()
        spin = self.spin_ns
        for src in self.emu._deadline_sources:  # another timer due sooner: spin until then only
            if src is self:
                continue
            d = src.next_deadline()
            if d is not None and d - now < spin:
                spin = max(0, d - now)
        until = time.monotonic_ns() + spin  # the compiled spin reads CLOCK_MONOTONIC
        for s in servers:
            refresh(s)
        poller = self.poller
        run(poller, lambda: poller.spin(until), servers)
        now = clock()
        for s in servers:
            if s._page_port is not None:
                s._page_after_poll(now)


class EngineThreads:
    """The option `Emulator(engine_threads=True)` (`nicemu serve --engine-threads`): each
    device's doorbell page polled by a thread of its own instead of the event loop.

    A device's thread waits for its page's slots to change with the GIL released (the compiled
    poller's `wait`), then takes `lock` (the emulator's device lock, which the event loop holds
    while it handles descriptors and timers: register writes, resets, DMA_MAP/UNMAP, a
    disconnect) and runs one poll pass and the Python actions it hands back. So a control-plane
    write and a doorbell never interleave, and a page is let go only once its thread no longer
    reads it (the poller's remove() waits for that, the thread holds no lock while it waits). The
    engine's work runs under that lock and the GIL: two devices' doorbells do not run at the same
    time (a TX walk delivers into the linked peer's engine). When a device sleeps (NEED_WAKE set)
    its thread blocks until the server's wake-up (a message came) or the end."""

    def __init__(self, emulator: Any, lock: Any, engine: str = "cython") -> None:
        import threading

        self.emu = emulator
        self.lock = lock
        self.kind = "python" if isinstance(pp.make_poller(engine), pp.PagePollerRef) else "cython"
        self._engine = engine
        self.servers: list[Any] = []
        self.pollers: dict[int, Any] = {}  # id(server) -> its thread's poller
        self.threads: list[Any] = []
        self._events: dict[int, Any] = {}  # id(server) -> threading.Event: wake a sleeping thread
        self._stop = False
        self.spin_ns = SPIN_NS
        self._threading = threading

    def attach(self, server: Any) -> None:
        self.servers.append(server)
        self.pollers[id(server)] = pp.make_poller(self._engine)
        self._events[id(server)] = self._threading.Event()
        server.page_polling = self

    def poller_for(self, server: Any) -> Any:
        return self.pollers[id(server)]

    def add_port(self, server: Any, port: Any) -> None:
        """A page is on: polled by its server's thread; every other thread takes its RDT
        before a TDT of its own (the cross-device rule)."""
        for s in self.servers:
            self.pollers[id(s)].add(port, polled=s is server)
        # ports of the other devices already on: this device's poller takes their RDT too
        mine = self.pollers[id(server)]
        for s in self.servers:
            if s is not server and s._page_port is not None and s._page_port not in mine.rx_ports:
                mine.add(s._page_port, polled=False)
        self.wake(server)

    def remove_port(self, port: Any) -> None:
        """A page is let go: out of every poller (returns once no thread reads it)."""
        for poller in self.pollers.values():
            poller.remove(port)

    wake_on_message = True  # the server calls wake() for every read, not only when asleep

    def wake(self, server: Any) -> None:
        """`server`'s device polls again (or got a message): every thread looks again (one
        may hold a TDT back for this device's messages)."""
        for ev in self._events.values():
            ev.set()

    def polling(self) -> bool:
        return False  # the threads poll, not the loop

    def start(self) -> None:
        for s in self.servers:
            t = self._threading.Thread(target=self._run, args=(s,), name=f"engine-{s.name}", daemon=True)
            t.start()
            self.threads.append(t)

    def stop(self) -> None:
        self._stop = True
        for ev in self._events.values():
            ev.set()
        for t in self.threads:
            t.join(5)
        self.threads = []

    def _run(self, server: Any) -> None:
        poller = self.pollers[id(server)]
        event = self._events[id(server)]
        lock = self.lock
        clock = self.emu.clock
        emu = self.emu
        while not self._stop:
            while emu.lock_wanted and not self._stop:  # the loop waits for the lock: let it have it
                time.sleep(0)
            with lock:
                port = server._page_port
                polling = port is not None and not server._page_sleeping
                waiting = False
                if polling:
                    port.waiting = False
                    servers = [q.owner for q in poller.rx_ports]
                    for s in servers:
                        refresh(s)
                    run(poller, poller.poll_all, servers)
                    server._page_after_poll(clock())
                    waiting = port.waiting
                    polling = server._page_port is not None and not server._page_sleeping
                if not polling or waiting:
                    event.clear()
            if not polling:
                event.wait(1.0)  # a wake-up (a message, a page on) or the end
            elif waiting:  # a tail written after messages the loop has not taken yet
                event.wait(0.001)  # woken when a message comes (wake_on_message)
            else:
                poller.wait(time.monotonic_ns() + self.spin_ns)
