"""The emulator process: one selectors loop over vfio-user servers, cable ends and timers.

Everything a device does happens on this one thread, as in QEMU's main loop: a vfio-user
message, a frame arriving on a cable, or a due moderation timer. The loop sleeps in
`select()` until one of them is ready, with the timeout taken from the earliest
`next_deadline()` of the devices (and of timer sources such as a delayed-frame cable), so an
idle emulator uses no CPU and a timer fires on time.

Fairness: each turn handles every ready descriptor once, and each handler does a bounded
amount of work (a vfio-user server handles at most WORK_PER_TURN messages of a client per
turn, then asks for the next turn through its next_deadline()), so one device's client can
never keep the loop from another device, its cable or its timers.

SIGTERM and SIGINT stop the loop (through a self-pipe, so the sleeping select wakes), then
`close()` drops clients (resetting their devices), unlinks every socket and closes cables.

What a driver cannot see through the 82540EM's registers is reported here instead, so the
register interface stays as the SDM has it: a DMA error (a descriptor or buffer outside the
DMA_MAP'd memory) is logged as a warning when it happens (at most once a second per device),
and SIGUSR1 prints one `nicemu: stats {json}` line on stdout with every device's transport,
data-path and cable counters (`Emulator.stats()`).
"""
from __future__ import annotations

import json
import logging
import os
import select
import selectors
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from nicemu.cable import cable_kind, layer_name
from nicemu.vfio_user.page_service import EngineThreads, PagePolling
from nicemu.vfio_user.server import VfioUserServer

_EPOLL_RESOLUTION_S = 0.001  # epoll_wait's timeout is in milliseconds

__all__ = ["Emulator", "Port", "STATS_PREFIX"]

log = logging.getLogger("nicemu.emulator")

STATS_PREFIX = "nicemu: stats "  # then one JSON object (SIGUSR1)
DMA_ERROR_LOG_INTERVAL = 1_000_000_000  # ns between two DMA-error warnings of one device
# Data-path counters with no SDM register (nicemu.datapath_ref.RefDatapath documents them)
ENGINE_COUNTERS = ("dma_errors", "tx_dropped", "rx_dropped", "tx_dext_skipped", "tx_descs_fetched",
                   "rx_written")
SERVER_COUNTERS = ("clients_served", "clients_refused", "messages", "error_replies", "posted_errors",
                   "irqs_signalled", "fds_refused", "clients_dropped", "accept_errors",
                   "page_doorbells", "page_bad", "page_wakeups", "page_sleeps")
CABLE_COUNTERS = ("tx_dropped", "rx_errors", "rx_foreign", "tx_bad_fcs")


@dataclass
class Port:
    """A Nic's port plugged into a cable end (nicemu.cable.base.CableEnd)."""

    nic: Any
    cable: Any
    link: bool = False  # the link state last given to the Nic
    errors: int = 0
    fd: int | None = field(default=None)


class _PortTimer:
    """A cable end with a deadline but no run_timers(): servicing the port is its timer."""

    def __init__(self, emu: "Emulator", port: Port) -> None:
        self.emu, self.port = emu, port

    def next_deadline(self) -> int | None:
        return self.port.cable.next_deadline()

    def run_timers(self) -> None:
        self.emu._service_port(self.port)


class Emulator:
    """Devices, their sockets and cables, driven by one event loop.

    `clock` must be the clock the Nics use (ns); it only turns deadlines into select timeouts.
    """

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns, *, doorbell_page: bool = True,
                 engine_threads: bool | None = None) -> None:
        self.clock = clock
        self.doorbell_page = doorbell_page  # offer the doorbell page (docs/transport.md) to clients that ask
        # Each device's doorbell page polled by a thread of its own (page_service.EngineThreads)
        # instead of this loop; then `lock` is held by the loop while it handles descriptors
        # and timers, and by an engine thread while it applies doorbells. Default: the
        # environment's NICEMU_ENGINE_THREADS=1, else off (docs/benchmarks.md, "The compiled poll step and engine threads")
        if engine_threads is None:
            engine_threads = os.environ.get("NICEMU_ENGINE_THREADS", "0") == "1"
        self.engine_threads = engine_threads
        self.lock: threading.RLock | None = threading.RLock() if engine_threads else None
        self.lock_wanted = 0  # the loop is waiting for `lock`
        self.selector = selectors.DefaultSelector()
        self.servers: dict[str, VfioUserServer] = {}
        self.nics: list[Any] = []
        self.ports: list[Port] = []
        self.pairs: list[Any] = []  # PairCables between two devices of this process
        self.timer_sources: list[Any] = []  # objects with next_deadline()/run_timers()
        self.page_polling: PagePolling | EngineThreads | None = None  # the devices' doorbell pages (page_service.py)
        self.closeables: list[Any] = []  # cables and other objects to close() at the end
        self._stopping = False  # set by stop(); never reset, so a stop before run() is kept
        self._report_requested = False  # set by SIGUSR1; the loop prints stats()
        self.report: Callable[[dict], None] = _print_stats
        self._dma_seen: dict[str, tuple[int, int | None]] = {}  # device -> (errors logged, when: clock ns)
        self._dma_log_due: int | None = None  # errors held back by the rate limit: log them then
        self._dma_logged_total = 0  # sum of the counts in _dma_seen: a turn with no new error is one sum
        self._served_nics: tuple[Any, ...] = ()  # the Nic of each server
        self._deadline_sources: tuple[Any, ...] = ()  # self.nics then self.timer_sources
        self._earliest: int | None = None  # their earliest deadline after the last turn's timers
        self._saved_handlers: dict[int, Any] = {}
        self._closed = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._on_wake)

    # --- building ---------------------------------------------------------------------------

    def add_device(self, name: str, nic: Any, socket_path: str) -> VfioUserServer:
        """Serve `nic` over vfio-user on `socket_path` (created 0600 in a 0700 directory)."""
        if name in self.servers:
            raise ValueError(f"device name {name!r} is used twice")
        server = VfioUserServer(nic, socket_path, name=name, clock=self.clock,
                                doorbell_page=self.doorbell_page)
        server.register(self.selector)
        if self.page_polling is None and self.engine_threads:
            self.page_polling = EngineThreads(self, self.lock)
        elif self.page_polling is None:  # the doorbell pages of all devices, polled together
            self.page_polling = PagePolling(self)
            self.timer_sources.append(self.page_polling)
        self.page_polling.attach(server)
        self.servers[name] = server
        self._served_nics += (nic,)
        # The server's timer: the next batch of a client's buffered messages (each turn handles
        # a bounded batch per device) and polling its socket again after a failed accept()
        self.timer_sources.append(server)
        if nic not in self.nics:
            self.nics.append(nic)
        self._sources_changed()
        log.info("%s: %s listening on %s", name, nic.mac, server.socket_path)
        return server

    def add_nic(self, nic: Any) -> None:
        """A device without a socket (e.g. the far end of an in-process pair): its timers run."""
        if nic not in self.nics:
            self.nics.append(nic)
            self._sources_changed()

    def add_port(self, nic: Any, cable: Any) -> Port:
        """Plug `nic`'s port into a cable end: TX goes to cable.send; arriving frames, link
        changes and "writable again" are serviced when cable.fileno() is readable."""
        port = Port(nic, cable)
        nic.attach(cable.send)
        port.link = bool(getattr(cable, "link_up", True))
        nic.set_link(port.link)
        fd = cable.fileno()
        if fd is not None:
            port.fd = fd
            self.selector.register(fd, selectors.EVENT_READ, lambda _m, port=port: self._service_port(port))
        self.ports.append(port)
        self.add_nic(nic)
        if hasattr(cable, "next_deadline"):  # an end that holds frames (delay faults)
            self.timer_sources.append(cable if hasattr(cable, "run_timers") else _PortTimer(self, port))
            self._sources_changed()
        self.closeables.append(cable)
        return port

    def add_pair(self, nic_a: Any, nic_b: Any, **options: Any) -> Any:
        """Two devices of this process back to back (nicemu.cable.pair.PairCable; options:
        captures and faults). Without options the frames go engine to engine."""
        from nicemu.cable.pair import PairCable

        pair = PairCable(nic_a, nic_b, **options)
        self.pairs.append(pair)
        self.add_nic(nic_a)
        self.add_nic(nic_b)
        if pair.needs_timers:  # faults hold frames, a capture ring is drained
            self.add_timer_source(pair)
        self.closeables.append(pair)
        return pair

    def add_timer_source(self, source: Any) -> None:
        """Anything with next_deadline() -> ns | None and run_timers(); if it has a fileno()
        that is not None, run_timers() also runs when that descriptor is readable."""
        self.timer_sources.append(source)
        self._sources_changed()
        fd = source.fileno() if hasattr(source, "fileno") else None
        if fd is not None:
            self.selector.register(fd, selectors.EVENT_READ, lambda _m, s=source: self._run_source(s))

    def add_closeable(self, obj: Any) -> None:
        """Close `obj` when the emulator closes (e.g. a capture file or a shm segment)."""
        self.closeables.append(obj)

    # --- running ----------------------------------------------------------------------------

    def catch_signals(self) -> None:
        """Make SIGTERM/SIGINT stop this emulator from now on, also while it is still being
        built: `nicemu up` may stop a child before its run() starts, and that child must close
        its sockets rather than run on. SIGUSR1 asks for a stats line (and must not kill a
        child that is still starting). close() puts the old handlers back."""
        if self._saved_handlers or threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._saved_handlers[sig] = signal.signal(sig, self._on_signal)
        self._saved_handlers[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._on_report_signal)

    def run(self) -> None:
        """Serve until stop() or SIGTERM/SIGINT, then close everything."""
        self.catch_signals()
        if isinstance(self.page_polling, EngineThreads):
            self.page_polling.start()
        try:
            timeout = self._timeout()
            while not self._stopping:
                self.run_once(timeout)
                if self._report_requested:
                    self._report_requested = False
                    self._report()
                # The turn's _run_due_timers left the earliest device/source deadline, exact
                # (nothing has run since); asking every source again would cost as much.
                timeout = self._timeout_until(self._earliest)
        finally:
            self.close()

    def run_once(self, timeout: float | None = 0) -> None:
        """One turn: wait up to `timeout` s for ready descriptors, handle them, fire due timers."""
        try:
            if timeout is not None and 0 < timeout < _EPOLL_RESOLUTION_S:
                self._wait_precisely(timeout)
                timeout = 0
            events = self.selector.select(timeout)
        except InterruptedError:
            events = []
        lock = self.lock
        if lock is not None:  # engine threads: they apply doorbells under it
            self.lock_wanted += 1  # they let go of it and wait while this is set
            lock.acquire()
            self.lock_wanted -= 1
        try:
            for key, mask in events:
                try:
                    key.data(mask)
                except Exception:  # one broken callback must not stop the other devices
                    log.exception("event handler failed")
            self._run_due_timers()
            if self.servers:
                self._note_dma_errors()
        finally:
            if lock is not None:
                lock.release()

    def stop(self) -> None:
        """Ask run() to return (safe from a signal handler or another thread)."""
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def _on_signal(self, signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        self.stop()

    def _on_report_signal(self, _signum: int, _frame: Any) -> None:
        self._report_requested = True
        try:
            os.write(self._wake_w, b"r")
        except (BlockingIOError, OSError):
            pass

    def _report(self) -> None:
        try:
            self.report(self.stats())
        except Exception:
            log.exception("stats report failed")

    def stats(self) -> dict:
        """Every served device's counters that have no register: the transport's (clients,
        messages, Error replies, failed posted writes, INTx signals), the data path's
        (`dma_errors`: accesses outside DMA_MAP'd memory; drops with no SDM statistic), the
        link, and its cable's (drops, malformed records, fault and capture statistics)."""
        ports = {id(port.nic): port for port in self.ports}
        devices: dict[str, dict] = {}
        for name, server in self.servers.items():
            nic = server.nic
            d: dict[str, Any] = {"mac": nic.mac, "client": server.connected,
                                 "dma_regions": len(getattr(nic.mem, "regions", ()))}
            for key in SERVER_COUNTERS:
                d[key] = getattr(server, key)
            for key in ENGINE_COUNTERS:
                value = getattr(nic.engine, key, None)
                if value is not None:
                    d[key] = int(value)
            port = ports.get(id(nic))
            if port is not None:
                d["link"] = port.link
                d["cable"] = _cable_stats(port.cable)
            for pair in self.pairs:
                if nic is pair.nic_a or nic is pair.nic_b:
                    d["link"] = nic.link_up
                    end = pair.end_a if nic is pair.nic_a else pair.end_b
                    # engine to engine (no faults): no cable end; the capture's counts, if any
                    d["cable"] = pair.stats() if end is None else _cable_stats(end)
            devices[name] = d
        return {"pid": os.getpid(), "devices": devices}

    def _note_dma_errors(self) -> None:
        """Log a device's new DMA errors: the 82540EM has no register for them, and a driver
        that points a descriptor outside its DMA_MAP'd memory must be told somewhere. At most
        one line a second per device (a ring full of bad addresses), with the running total;
        errors held back are logged when that second is over (`_timeout` wakes the loop)."""
        total = 0
        for nic in self._served_nics:
            total += nic.dma_errors
        self._dma_log_due = None
        if total == self._dma_logged_total:  # counters only grow: nothing new, nothing held back
            return
        now: int | None = None  # read the clock only when there is something to log
        for name, server in self.servers.items():
            n = server.nic.dma_errors
            logged, when = self._dma_seen.get(name, (0, None))
            if n <= logged:
                continue
            if now is None:
                now = self.clock()
            if when is not None and now - when < DMA_ERROR_LOG_INTERVAL:
                due = when + DMA_ERROR_LOG_INTERVAL
                self._dma_log_due = due if self._dma_log_due is None else min(self._dma_log_due, due)
                continue
            self._dma_seen[name] = (n, now)
            self._dma_logged_total += n - logged
            log.warning("%s: %d DMA error(s): a descriptor or buffer address outside the "
                        "DMA_MAP'd memory (%d in all); the access was not made", name, n - logged, n)

    def _on_wake(self, _mask: int) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except (BlockingIOError, OSError):
            pass

    def _sources_changed(self) -> None:
        self._deadline_sources = tuple(self.nics) + tuple(self.timer_sources)

    def _earliest_deadline(self) -> int | None:
        """The earliest next_deadline() of the devices and timer sources, asked now."""
        earliest: int | None = None
        for obj in self._deadline_sources:
            d = obj.next_deadline()
            if d is not None and (earliest is None or d < earliest):
                earliest = d
        return earliest

    def _wait_precisely(self, timeout: float) -> None:
        """Wait up to `timeout` (under a millisecond) for any registered descriptor.

        epoll (and so selectors) rounds timeouts up to whole milliseconds: an ITR gap of 50 us
        or an RDTR of a few microseconds would fire up to 1 ms late, and interrupt moderation
        would measure the event loop instead of the device. select() waits in microseconds;
        the caller then collects the ready events with a zero-timeout selector call."""
        keys = self.selector.get_map().values()
        if any(k.fd >= 1024 for k in keys):  # beyond select()'s FD_SETSIZE: the coarse wait
            self.selector.select(timeout)
            return
        readers = [k.fd for k in keys if k.events & selectors.EVENT_READ]
        writers = [k.fd for k in keys if k.events & selectors.EVENT_WRITE]
        select.select(readers, writers, [], timeout)

    def _timeout(self) -> float | None:
        """Seconds until the earliest device or timer-source deadline (None: sleep until I/O)."""
        return self._timeout_until(self._earliest_deadline())

    def _timeout_until(self, earliest: int | None) -> float | None:
        """Seconds until `earliest` or a held-back DMA error log, whichever comes first."""
        due = self._dma_log_due
        if due is not None and (earliest is None or due < earliest):
            earliest = due
        if earliest is None:
            return None
        return max(0.0, (earliest - self.clock()) / 1e9)

    def _run_due_timers(self) -> None:
        """Fire every device and timer source whose deadline has come (devices first), and
        leave the earliest deadline still pending in `_earliest` for the next select timeout.
        One next_deadline() per source in a turn where nothing fires (the common case); when
        something fired, all are asked again, as a fired timer (a delayed frame delivered) may
        have armed or moved another source's."""
        now = self.clock()
        earliest: int | None = None
        fired = False
        for src in self._deadline_sources:
            d = src.next_deadline()
            if d is None:
                continue
            if d <= now:
                self._run_source(src)
                fired = True
            elif earliest is None or d < earliest:
                earliest = d
        self._earliest = self._earliest_deadline() if fired else earliest

    def _run_source(self, src: Any) -> None:
        try:
            src.run_timers()
        except Exception:
            log.exception("%r: run_timers failed", src)

    def _service_port(self, port: Port) -> None:
        """The cable's descriptor is readable: frames, a link change, or room to send again."""
        cable, nic = port.cable, port.nic
        try:
            for frame in cable.recv_frames():
                nic.receive(frame)
            up = bool(getattr(cable, "link_up", True))
            if up != port.link:
                port.link = up
                nic.set_link(up)
            if cable.writable():
                nic.tx_ready()
        except Exception:
            port.errors += 1
            log.exception("%r: cable %r failed", nic, cable)
            if port.errors >= 100 and port.fd is not None:  # a cable that keeps failing: unplug it
                log.error("%r: unplugging cable %r after %d errors", nic, cable, port.errors)
                self.selector.unregister(port.fd)
                port.fd = None
                nic.set_link(False)
                port.link = False

    # --- teardown ---------------------------------------------------------------------------

    def close(self) -> None:
        """Drop clients (devices reset, DMA unmapped), unlink sockets, close cables."""
        if self._closed:
            return
        self._closed = True
        if isinstance(self.page_polling, EngineThreads):
            self.page_polling.stop()  # first: no doorbell is applied while the devices go
        for server in self.servers.values():
            try:
                server.close()
            except Exception:
                log.exception("%s: close failed", server.name)
        for obj in reversed(self.closeables):
            try:
                obj.close()
            except Exception:
                log.exception("%r: close failed", obj)
        self.selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        for sig, handler in self._saved_handlers.items():
            signal.signal(sig, handler)
        self._saved_handlers = {}

    def __enter__(self) -> "Emulator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _print_stats(stats: dict) -> None:
    """The default report: one line on stdout, `nicemu: stats ` and compact JSON. One write()
    for the whole line: the processes of a topology share one stdout, and print() may issue
    the text and its newline as two writes (unbuffered stdout), interleaving their lines."""
    sys.stdout.write(STATS_PREFIX + json.dumps(stats, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _cable_stats(end: Any, depth: int = 0) -> dict:
    """Counters of a cable end and of the ends it wraps (FaultyEnd / CapturedEnd layers)."""
    out: dict[str, Any] = {"kind": cable_kind(end)}
    layer = layer_name(end)
    if layer:
        out["layer"] = layer
    for key in CABLE_COUNTERS:
        value = getattr(end, key, None)
        if isinstance(value, int):
            out[key] = value
    for side in ("tx", "rx"):  # a FaultyEnd's two FaultLines
        line = getattr(end, side, None)
        stats = getattr(line, "stats", None)
        if stats is not None and hasattr(stats, "__dataclass_fields__"):
            out[f"faults_{side}"] = {k: getattr(stats, k) for k in stats.__dataclass_fields__}
    writer = getattr(end, "writer", None)  # a CapturedEnd's PcapWriter
    if isinstance(getattr(writer, "count", None), int):
        out["captured"] = writer.count
    inner = getattr(end, "inner", None)
    if inner is not None and inner is not end and depth < 4:
        out["inner"] = _cable_stats(inner, depth + 1)
    return out
