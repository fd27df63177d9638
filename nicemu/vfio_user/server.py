"""Serves one Nic to one vfio-user client over an AF_UNIX stream socket.

The server is driven by a `selectors` loop (nicemu.emulator.Emulator): `register(selector)`
puts the listening socket in it, and every key's `data` is the callback to run when it is
ready. Per readable event the server does one `recvmsg_into` straight into its decoder's
buffer (SCM_RIGHTS fds come with it), then handles the complete messages in order, at most a
turn's work of them (the rest in the next turns, through `next_deadline`/`run_timers`, the
emulator's timer interface; nothing more is read until they are done): a burst of posted MMIO
writes costs one syscall, and 32-bit BAR0 reads and writes have a short path.

Lifecycle of a client (also after kill -9 of the driver): on disconnect the device is reset,
every DMA region is unmapped, the INTx eventfd is closed and the next client is accepted.
A client that connects while another is served gets one Error reply (msg id 0, command 0,
errno EBUSY) and is closed.

Errors: a message the server refuses gets an Error reply with an errno and the server goes on
(posted No_reply commands get no reply: the failure is logged and counted in
`posted_errors`). A broken stream (size field below 16), EOF mid-message or a socket error
ends the connection, as above. Nothing a client sends can stop the emulator.

Limits (a client is not trusted; docs/transport.md, "Limits"): fds per message
(`max_msg_fds`; more drops the client), fds held for a message not yet complete (the same),
fds with a message that takes none (closed as soon as its header shows it), messages handled
per loop turn (`WORK_PER_TURN`: one device's client cannot starve another device), replies
waiting (`OUTPUT_HIGH_WATER`), DMA regions (`MAX_DMA_REGIONS`), warnings a client can cause
(`WARNINGS_PER_SECOND`). A failing accept() (EMFILE...) stops the listening socket from being
polled for a while (`ACCEPT_BACKOFF_*`), logged once per episode.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import select
import selectors
import socket
import stat
import struct
import time
from typing import Any, Callable

from nicemu.dma import DmaError
from nicemu.pci import COMMAND as PCI_COMMAND, CONFIG_SIZE
from nicemu.regs import BAR0_SIZE, ICR, IMS, RDT, TDT
from nicemu.private_dir import check_private_dir
from nicemu.vfio_user import doorbell as db
from nicemu.vfio_user import page_service as ps
from nicemu.vfio_user import pagepoll as pp
from nicemu.vfio_user import protocol as p
from nicemu.vfio_user.protocol import Command, Flags, FramingError, Message, ProtocolError

__all__ = ["VfioUserServer", "listen_unix"]

log = logging.getLogger("nicemu.vfio_user")

MAX_DMA_REGIONS = 64
OUTPUT_HIGH_WATER = 4 << 20  # stop reading requests while this much reply data waits to be sent
# Work done for one client per loop turn, in messages plus the dwords of multi-dword region
# accesses: then the other devices and cables of the process get their turn, and the rest of
# the buffer is handled in the next one (run_timers). 1024 posted writes are ~0.7 ms.
WORK_PER_TURN = 1024
# Commands that take fds; fds with any other are closed as soon as the header is seen
FD_COMMANDS = frozenset({int(Command.DMA_MAP), int(Command.DEVICE_SET_IRQS)})
# fds held at once for messages not yet handled: the incomplete message's (<= max_msg_fds, or
# the client is dropped) plus one read's worth (the ancillary buffer holds max_msg_fds)
MAX_HELD_FDS = 2 * p.MAX_MSG_FDS
# A failed accept() (EMFILE, ENFILE, ENOBUFS, ENOMEM): stop polling the listening socket for
# this long, doubling per failure in a row up to the maximum, instead of spinning on it
ACCEPT_BACKOFF_MIN_NS = 10_000_000
ACCEPT_BACKOFF_MAX_NS = 1_000_000_000
# Warnings a client's messages can cause, per second (then counted and summarised)
WARNINGS_PER_SECOND = 10
# The doorbell page (docs/transport.md): the emulator polls it for this long after the last
# thing the client did (a slot changed, a message came), then sets NEED_WAKE and sleeps
PAGE_POLL_IDLE_NS = 200_000
_DB_COMMAND = db.COMMAND
_scan_tail_run = db.scan_tail_run  # the run of a tail register's posted writes (doorbell.py)
_ANC_SIZE = socket.CMSG_SPACE(p.MAX_MSG_FDS * 4)
_REPLY = int(p.MsgType.REPLY)
_NO_REPLY = int(Flags.NO_REPLY)
_REGION_WRITE = int(Command.REGION_WRITE)
_REGION_READ = int(Command.REGION_READ)
_VERSION = int(Command.VERSION)
_U32 = struct.Struct("<I")
_MSG_CTRUNC = int(socket.MSG_CTRUNC)  # plain ints: IntFlag arithmetic costs ~1 us per read
_MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_POSTED32 = struct.Struct("=HHIIIQIII")  # a whole posted 32-bit REGION_WRITE: header, access, dword
_TAILS = (TDT, RDT)  # doorbells: a run of posted writes to one of them goes to Nic.write_tail
_HDR_ACCESS = struct.Struct("=HHIIIQII")  # a reply header + REGION_ACCESS in one pack
_ACCESS_FIXED = p.HEADER_SIZE + p.REGION_ACCESS.size
_READ32_REPLY = struct.Struct("=HHIIIQIII")  # the whole reply to a 32-bit read
_BAR0_LAST32 = BAR0_SIZE - 4  # the last offset a 4-byte BAR0 access may start at
_ACCEPT_TRANSIENT = (BlockingIOError, InterruptedError, ConnectionAbortedError)
_HUNG_UP = select.POLLRDHUP | select.POLLHUP | select.POLLERR


_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux


def listen_unix(path: str) -> tuple[socket.socket, str | None]:
    """Bind and listen on `path`: its directory created 0700 if missing, the socket 0600.

    A stale socket file (nobody accepts on it) is replaced; a live one or a non-socket file is
    an error, so two emulators never steal each other's device. Returns the socket and the
    directory it created (None if it existed), to remove when done.
    """
    path = os.path.abspath(path)
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise OSError(errno.ENAMETOOLONG,
                      f"{path} is longer than {_SUN_PATH_MAX} bytes, the limit of a unix socket path")
    directory = os.path.dirname(path)
    created = None
    if not os.path.isdir(directory):
        # Only the socket's own directory: creating its parents would leave them behind.
        if not os.path.isdir(os.path.dirname(directory)):
            raise FileNotFoundError(errno.ENOENT, f"the directory {os.path.dirname(directory)} does "
                                    f"not exist (only the socket's own directory is created)")
        os.mkdir(directory, mode=0o700)
        os.chmod(directory, 0o700)  # mode is filtered by the umask; make it exact
        created = directory
    # A directory another user owns or can write to lets them rename our socket away and bind
    # their own (docs/security.md): refused here too, not only by the CLI.
    check_private_dir(directory)
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # stale: left by an emulator that was killed
        else:
            raise OSError(errno.EADDRINUSE, f"{path} is served by another process")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)  # the socket file is created 0600, no window where it is wider
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot bind {path}: {e.strerror or e}") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(4)
    sock.setblocking(False)
    return sock, created


def _is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class VfioUserServer:
    """One device (`nic`) on one socket (`socket_path`)."""

    def __init__(self, nic: Any, socket_path: str, *, name: str = "nic",
                 clock: Callable[[], int] = time.monotonic_ns, doorbell_page: bool = True,
                 page_engine: str = "cython") -> None:
        self.nic = nic
        self.name = name
        self.clock = clock  # ns; the emulator's clock (deadlines go into its loop)
        self.socket_path = os.path.abspath(socket_path)
        self.listener, self._created_dir = listen_unix(self.socket_path)
        self._inode = os.stat(self.socket_path).st_ino
        self.selector: selectors.BaseSelector | None = None
        self.conn: socket.socket | None = None
        self.decoder = p.Decoder()
        self.irq_fd: int | None = None
        # fds received with messages not handled yet: (stream offset of the last byte that came
        # with them, the fds, how many more came and were closed already: refused on arrival)
        self._fds: list[tuple[int, list[int], int]] = []
        self._skipped_fds = (-1, 0)  # (skip_start, fds) closed with an oversized message
        self._out = bytearray()
        self._negotiated = False
        self._signalled = False
        self._more = False  # the work budget ran out with messages left: run_timers goes on
        self._batch_done = False  # this turn's batch came from an event: run_timers waits a turn
        self._work = 0  # dwords of multi-dword region accesses (they count against the budget)
        self._accept_failures = 0  # failed accept() calls in a row (an episode)
        self._accept_retry_at: int | None = None  # clock ns: poll the listening socket again
        self._warn_window = -(1 << 62)  # clock ns the current second of warnings began
        self._warn_count = 0
        self._warn_suppressed = 0
        # counters (for tests, `show` and logs)
        self.clients_served = 0
        self.clients_refused = 0
        self.messages = 0
        self.error_replies = 0
        self.posted_errors = 0
        self.irqs_signalled = 0
        self.fds_refused = 0  # fds closed unused: with a message that takes none, too many, skipped
        self.clients_dropped = 0  # connections closed for a protocol violation
        self.accept_errors = 0  # failed accept() calls (each episode is logged once)
        # the doorbell page (docs/transport.md): offered in VERSION to a client that asks
        self.offer_doorbell_page = doorbell_page
        self.page_engine = page_engine  # "cython" (nicemu/vfio_user/_doorbell.pyx) or "python"
        self._page_negotiated = False  # this client asked for it and was offered it
        self._page: Any = None  # DoorbellPage / DoorbellPageRef while one is set up
        self._page_mm: mmap.mmap | None = None
        # The poll step (page_service.py, pagepoll.py / _pagepoll.pyx): this page's port in a
        # poller, the emulator's shared one (page_polling: its timer source, which spins over
        # every device's page) or, without one or for a page of another kind, a private one
        # polled from this server's own run_timers
        self.page_polling: Any = None
        self._page_port: Any = None
        self._page_poller: Any = None
        self._page_shared = False
        self._page_peer: Any = None  # the Nic's linked peer when the port was made
        self._page_sleeping = False  # NEED_WAKE is set: no polling until a message comes
        self._page_idle_at = 0  # clock ns: arm NEED_WAKE and sleep if nothing happens by then
        self._conn_base = 0  # self.messages when this client connected
        self._skipped_msgs = 0  # messages of this client refused unread (oversized)
        self._page_counts = [0, 0]  # page_doorbells, page_bad of ports let go
        self.page_wakeups = 0  # tail REGION_WRITEs while the page is on (wake-ups; value not applied)
        self.page_sleeps = 0  # times the emulator set NEED_WAKE and stopped polling
        nic.on_irq = self._on_irq
        self._handlers: dict[int, Callable[[Message, list[int]], bytes | None]] = {
            Command.VERSION: self._version,
            Command.DMA_MAP: self._dma_map,
            Command.DMA_UNMAP: self._dma_unmap,
            Command.DEVICE_GET_INFO: self._device_get_info,
            Command.DEVICE_GET_REGION_INFO: self._device_get_region_info,
            Command.DEVICE_GET_IRQ_INFO: self._device_get_irq_info,
            Command.DEVICE_SET_IRQS: self._device_set_irqs,
            Command.REGION_READ: self._region_read,
            Command.REGION_WRITE: self._region_write,
            Command.DEVICE_RESET: self._device_reset,
            _DB_COMMAND: self._doorbell_page,
        }

    # --- event loop wiring -------------------------------------------------------------

    def register(self, selector: selectors.BaseSelector) -> None:
        self.selector = selector
        selector.register(self.listener, selectors.EVENT_READ, self._on_accept)

    @property
    def connected(self) -> bool:
        return self.conn is not None

    def next_deadline(self) -> int | None:
        """When run_timers() has work: now, if a batch of messages is left over from the last
        turn (and no replies are backed up: then the socket's writability resumes it); else
        when the listening socket is to be polled again after a failed accept()."""
        if self._more and not self._out:
            return 0
        if self._page is not None and not self._page_sleeping and not self._page_shared:
            return 0  # polling the doorbell page (the emulator's PagePolling does it if shared)
        return self._accept_retry_at

    def run_timers(self) -> None:
        """The emulator loop's timer: poll the listening socket again after a backoff, and
        handle the next batch of buffered messages."""
        if self._accept_retry_at is not None and self.clock() >= self._accept_retry_at:
            self._accept_retry_at = None
            if self.selector is not None:
                try:
                    self.selector.register(self.listener, selectors.EVENT_READ, self._on_accept)
                except (KeyError, ValueError):
                    pass  # registered already, or the listener is closed
        if self._more and self.conn is not None and not self._out:
            if self._batch_done:  # an event handler did this turn's batch already
                self._batch_done = False
            else:
                self._serve()
        if self._page is not None and not self._page_sleeping and not self._page_shared:
            self._page_poll()

    @property
    def page_doorbells(self) -> int:
        """Tail values taken from the page and applied."""
        port = self._page_port
        return self._page_counts[0] + (port.doorbells if port is not None else 0)

    @property
    def page_bad(self) -> int:
        """... of them not a descriptor index of the ring (applied as a register write is)."""
        port = self._page_port
        return self._page_counts[1] + (port.bad if port is not None else 0)

    def _on_accept(self, _mask: int) -> None:
        try:
            conn, _ = self.listener.accept()
        except _ACCEPT_TRANSIENT:
            return
        except OSError as e:  # EMFILE, ENFILE, ENOBUFS, ENOMEM: keep serving the current client
            self._accept_failed(e)
            return
        if self._accept_failures:
            log.warning("%s: accepting connections again (after %d failed accept() calls)",
                        self.name, self._accept_failures)
            self._accept_failures = 0
        # _client_gone(): the old client may have hung up (e.g. been killed) unnoticed so far
        if self.conn is not None and not self._client_gone():
            self.clients_refused += 1
            self._warn("%s: refused a second client (device busy)", self.name)
            try:
                conn.setblocking(False)
                conn.send(p.pack_error(0, 0, errno.EBUSY))
            except OSError:
                pass
            conn.close()
            return
        conn.setblocking(False)
        self.conn = conn
        self.clients_served += 1
        self._negotiated = False
        self._page_negotiated = False
        self._conn_base = self.messages
        self._skipped_msgs = 0
        self.decoder = p.Decoder()
        if self.selector is not None:
            self.selector.register(conn, selectors.EVENT_READ, self._on_conn_event)
        log.info("%s: client connected", self.name)

    def _accept_failed(self, e: OSError) -> None:
        """accept() failed: the pending connection stays queued and the listening socket stays
        readable, so polling it again at once would spin. Stop polling it for a backoff that
        doubles while the failures go on; one log line per episode."""
        self.accept_errors += 1
        self._accept_failures += 1
        backoff = min(ACCEPT_BACKOFF_MAX_NS, ACCEPT_BACKOFF_MIN_NS << min(self._accept_failures - 1, 20))
        if self._accept_failures == 1:
            log.error("%s: accept failed: %s; not accepting connections for a while (retrying "
                      "every %d ms at most; logged once until it works again)", self.name,
                      e.strerror or e, ACCEPT_BACKOFF_MAX_NS // 1_000_000)
        if self.selector is not None:
            try:
                self.selector.unregister(self.listener)
            except (KeyError, ValueError):
                pass
        self._accept_retry_at = self.clock() + backoff

    def _warn(self, fmt: str, *args: Any) -> None:
        """A warning caused by what a client sent: at most WARNINGS_PER_SECOND a second, so a
        client cannot fill the log; the rest are counted and the count logged later."""
        now = self.clock()
        if now - self._warn_window >= 1_000_000_000:
            if self._warn_suppressed:
                log.warning("%s: %d more warning(s) like the above were suppressed", self.name,
                            self._warn_suppressed)
            self._warn_window, self._warn_count, self._warn_suppressed = now, 0, 0
        if self._warn_count < WARNINGS_PER_SECOND:
            self._warn_count += 1
            log.warning(fmt, *args)
        else:
            self._warn_suppressed += 1

    def _client_gone(self) -> bool:
        """Whether the current client has hung up (been killed, say) without the loop having
        handled that yet; if so it is disconnected now, so that a driver restarted right after
        kill -9 of its predecessor is not refused because the loop saw its connect first.

        The socket says so (POLLRDHUP: the peer closed, even while data it sent is still
        queued), so nothing a dead client left - unread requests, unsent replies, a batch in
        progress - makes it look alive. What it left is not handled: the device is reset for
        the next client anyway."""
        conn = self.conn
        if conn is None:
            return True
        poller = select.poll()
        poller.register(conn, _HUNG_UP)
        if not poller.poll(0):
            return False
        self.disconnect("client hung up")
        return True

    def _on_conn_event(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush()
            if self.conn is None or self._out:
                return
            self._serve()  # requests held back while replies were pending
            self._batch_done = self._more
        if self._more:
            return  # the rest of the buffer first (run_timers, next turn); then read more
        if mask & selectors.EVENT_READ and self.conn is not None and not self._out:
            self._receive()

    def _receive(self) -> None:
        conn = self.conn
        assert conn is not None
        dec = self.decoder
        try:
            n, anc, msg_flags, _ = conn.recvmsg_into([dec.writable()], _ANC_SIZE, _MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.disconnect(f"receive failed: {e}")
            return
        if anc:
            self._take_ancillary(anc, dec.stream_pos + n - 1)
            if msg_flags & _MSG_CTRUNC:
                # More than max_msg_fds with one sendmsg() (the kernel closed the rest), or no
                # free descriptor here: either way a message lost fds it came with.
                self._drop_for_fds(f"fds lost in transit (MSG_CTRUNC): more than max_msg_fds "
                                   f"({p.MAX_MSG_FDS}) with one message, or no free descriptor")
                return
            if sum(len(b[1]) for b in self._fds) > MAX_HELD_FDS:  # not reachable: see _check_tail_fds
                self._drop_for_fds(f"more than {MAX_HELD_FDS} fds held for unfinished messages")
                return
        if n == 0:
            if dec.pending():
                self.disconnect(f"client closed the connection mid-message ({dec.pending()} bytes pending)")
            else:
                self.disconnect("client closed the connection")
            return
        dec.commit(n)
        if self._page is not None:
            self._page_wake()
        self._serve()
        self._batch_done = self._more

    def _take_ancillary(self, anc: list, tag: int) -> None:
        fds: list[int] = []
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(data) - len(data) % 4
                fds.extend(struct.unpack(f"{usable // 4}i", data[:usable]))
        if fds:
            self._fds.append((tag, fds, 0))

    def _serve(self) -> None:
        """Handle the buffered messages (one turn's budget of them); once every complete one
        is handled, hold the fds of the one still arriving to the limits."""
        self._more = False
        if self._process() and self._fds and self.conn is not None:
            self._check_tail_fds()
        if self._page is not None:
            self._page_sync()  # tails that waited for the messages just handled

    def _check_tail_fds(self) -> None:
        """Every complete message has been handled, and a read happens only then (see
        _on_conn_event), so the fds still held all came with the message being received.
        More than max_msg_fds for it (counting those closed already) drops the client. If its
        header shows a command that takes no fds, they are closed now rather than held until
        its last byte comes (which a client may never send); the message will be refused."""
        total = 0
        for _, fds, refused in self._fds:
            total += len(fds) + refused
        if total > p.MAX_MSG_FDS:
            self._drop_for_fds(f"{total} fds sent with one message (max_msg_fds is {p.MAX_MSG_FDS})")
            return
        hdr = self.decoder.peek_header()
        if hdr is None or hdr[1] in FD_COMMANDS or (hdr[1] == _DB_COMMAND and self._page_negotiated):
            return  # the message may take them: held, at most max_msg_fds
        held = [fd for _, fds, _ in self._fds for fd in fds]
        if held:
            _close_fds(held)
            self.fds_refused += len(held)
            self._fds = [(self._fds[-1][0], [], total)]

    def _drop_for_fds(self, why: str) -> None:
        """The client broke the fd limits: its fds are closed (counted) and it is dropped."""
        self.fds_refused += sum(len(b[1]) for b in self._fds)
        self._drop_client(why)

    def _drop_client(self, why: str) -> None:
        """A protocol violation the stream cannot go on after: an Error reply with id 0 and
        command 0 (it answers the connection, not a request), then the disconnect."""
        self.clients_dropped += 1
        self._warn("%s: %s; closing the connection", self.name, why)
        self._send(p.pack_error(0, 0, errno.EINVAL))
        self.disconnect(why)

    def _fds_for(self, msg: Message) -> tuple[list[int], int]:
        """The fds that arrived with `msg`, and how many more did and were closed on arrival.

        A chunk that carries fds ends with the sendmsg() they came with (the kernel stops a
        stream read right after such data), so its tag - its last byte - lies inside the
        message the fds belong to. Fds tagged before `msg` came with an earlier message that
        never reached a handler (refused unread as oversized): they are closed here, not handed
        to this one, which would then see too many."""
        out: list[int] = []
        refused = 0
        while self._fds and self._fds[0][0] < msg.end:
            tag, fds, closed = self._fds.pop(0)
            if tag < msg.start:
                self._close_skipped(fds, closed)
            else:
                out.extend(fds)
                refused += closed
        return out, refused

    def _drop_stale_fds(self) -> None:
        """Close fds whose bytes are consumed without a handler having claimed them (they came
        with a message skipped as oversized), so they neither leak nor keep the short path off.
        More than max_msg_fds with one skipped message drops the client."""
        consumed = self.decoder.consumed_pos
        while self._fds and self._fds[0][0] < consumed:
            _, fds, closed = self._fds.pop(0)
            if self._close_skipped(fds, closed) > p.MAX_MSG_FDS:
                self._drop_for_fds(f"more than max_msg_fds ({p.MAX_MSG_FDS}) fds sent with one message")
                return

    def _close_skipped(self, fds: list[int], closed: int) -> int:
        """Close fds that came with a message refused unread; returns how many that message
        has brought so far."""
        _close_fds(fds)
        self.fds_refused += len(fds)
        self._warn("%s: closing %d fd(s) sent with a message that was refused unread", self.name, len(fds))
        key = self.decoder.skip_start
        count = (self._skipped_fds[1] if self._skipped_fds[0] == key else 0) + len(fds) + closed
        self._skipped_fds = (key, count)
        return count

    # --- message processing --------------------------------------------------------------

    def _process(self) -> bool:
        """Handle the complete messages, in order; True when none is left. Stops early (False)
        while replies are backed up, and once this turn's WORK_PER_TURN is done (`_more`: the
        loop's next turn goes on, after the other devices had theirs).

        32-bit BAR0 accesses (posted writes and reads: what a driver does all the time) are
        decoded straight from the buffer without building a Message; everything else goes
        through the decoder and a handler per command. Back-to-back posted writes to one tail
        register (TDT, RDT) found in the buffer go to the device together, `Nic.write_tail`:
        a driver that rang a doorbell several times while the emulator was busy elsewhere costs
        one walk of the ring when only the last value can matter (see there). A run ends at any
        other message, so the order with respect to everything else is kept.
        """
        dec = self.decoder
        if self._fds and self._fds[0][0] < dec.base + dec.start:
            self._drop_stale_fds()
        buf = dec.buf
        nic = self.nic
        unpack_hdr = p.HEADER.unpack_from
        unpack_w = _POSTED32.unpack_from
        unpack_r = p.REGION_ACCESS.unpack_from
        budget = self.messages + self._work + WORK_PER_TURN
        while self.conn is not None and len(self._out) <= OUTPUT_HIGH_WATER:
            start = dec.start
            end = dec.end
            avail = end - start
            if avail < p.HEADER_SIZE:
                return True
            if self.messages + self._work >= budget:
                self._more = True
                return False
            if self._negotiated and not self._fds:
                if avail >= 36:  # header and access in one unpack
                    msg_id, cmd, size, flags, _, offset, region, count, value = unpack_w(buf, start)
                else:
                    msg_id, cmd, size, flags, _ = unpack_hdr(buf, start)
                    offset = value = 0
                    region = count = -1  # not decoded yet
                if size == 36 and cmd == _REGION_WRITE and flags == _NO_REPLY:
                    if avail < 36:
                        return True
                    if region == 0 and count == 4 and offset <= _BAR0_LAST32:
                        nxt = start + 36
                        if self._page is not None:
                            if offset in _TAILS:  # the page owns the tails: a wake-up
                                dec.start = nxt
                                self.messages += 1
                                self.page_wakeups += 1
                                self._page_sync()
                                continue
                            self._page_sync()  # tails the client wrote before this message
                        if offset in _TAILS and end - nxt >= 36:
                            left = budget - self.messages - self._work
                            self._tail_run(start, min(end, start + 36 * left), offset, value)
                            continue
                        dec.start = nxt
                        self.messages += 1
                        try:
                            if offset == IMS:
                                self._bar0_write(offset, value)
                            else:
                                nic.write32(offset, value)
                        except Exception:
                            log.exception("%s: device failed on a write to %#x", self.name, offset)
                            self.posted_errors += 1
                        continue
                elif size == 32 and cmd == _REGION_READ and flags == 0:
                    if avail < 32:
                        return True
                    if count < 0:
                        offset, region, count = unpack_r(buf, start + 16)
                    if region == 0 and count == 4 and offset <= _BAR0_LAST32:
                        if self._page is not None:
                            self._page_sync()  # a read flushes the page's tails too
                        dec.start = start + 32
                        self.messages += 1
                        try:
                            value = self._bar0_read(offset) if offset == ICR else nic.read32(offset)
                        except Exception:
                            log.exception("%s: device failed on a read of %#x", self.name, offset)
                            self.error_replies += 1
                            self._send(p.pack_error(msg_id, cmd, errno.EIO))
                            continue
                        self._send(_READ32_REPLY.pack(msg_id, cmd, 36, _REPLY, 0, offset, 0, 4, value))
                        continue
            try:
                msg = dec.next_message()
            except FramingError as e:
                self._drop_client(f"broken message stream: {e}")
                return False
            except ProtocolError as e:  # oversized: refused unread, the stream goes on
                msg_id, cmd, flags = dec.last_oversized
                if flags & _NO_REPLY:
                    self.posted_errors += 1
                    self._warn("%s: posted %s", self.name, e)
                else:
                    self.error_replies += 1
                    self._warn("%s: %s", self.name, e)
                    self._send(p.pack_error(msg_id, cmd, e.errno))
                self._work += 1  # refused unread, but it is work all the same
                self._skipped_msgs += 1
                if self._fds:
                    self._drop_stale_fds()
                continue
            if msg is None:
                return True
            self._handle(msg)
        return False

    def _tail_run(self, start: int, end: int, offset: int, value: int) -> None:
        """The posted write to tail register `offset` at `start` and every identical posted
        write (same command, flags, register; any data) right after it, up to `end` (the end
        of the buffer, or of this turn's budget): consumed from the decoder and given to the
        device together."""
        dec = self.decoder
        nxt, values = _scan_tail_run(dec.buf, start, end)  # compiled: no Python step per message
        dec.start = nxt
        self.messages += len(values)
        try:
            self.nic.write_tail(offset, values)
        except Exception:
            log.exception("%s: device failed on %d write(s) to %#x", self.name, len(values), offset)
            self.posted_errors += 1

    def _handle(self, msg: Message) -> None:
        """One message through its command handler; every failure becomes an Error reply."""
        if self._page is not None:
            self._page_sync()  # tails the client wrote to the page before this message
        self.messages += 1
        cmd = msg.command
        fds, refused = self._fds_for(msg) if self._fds else ([], 0)
        if len(fds) + refused > p.MAX_MSG_FDS:
            self._close_unused(fds)
            self._drop_for_fds(f"{len(fds) + refused} fds sent with one message "
                               f"(max_msg_fds is {p.MAX_MSG_FDS})")
            return
        try:
            if msg.flags & p.TYPE_MASK:  # not a command (a reply, or a bad type)
                raise ProtocolError(errno.EINVAL, f"message {msg.msg_id} is not a command "
                                                  f"(type {msg.flags & p.TYPE_MASK})")
            handler = self._handlers.get(cmd)
            if cmd == _DB_COMMAND and not self._page_negotiated:
                handler = None  # not negotiated: as unknown as any other number
            if handler is None:
                raise ProtocolError(errno.ENOSYS, f"unknown command {cmd}")
            if not self._negotiated and cmd != _VERSION:
                raise ProtocolError(errno.EINVAL, f"{p.command_name(cmd)} before VERSION")
            if refused:
                raise ProtocolError(errno.EINVAL, f"{p.command_name(cmd)} takes no fds; the "
                                                  f"{refused} sent with it were closed")
            reply = handler(msg, fds)
        except ProtocolError as e:
            self._close_unused(fds)
            self._refuse(msg, e.errno, str(e))
        except Exception as e:  # a device bug must not take the emulator down
            self._close_unused(fds)
            log.exception("%s: %s failed", self.name, p.command_name(cmd))
            self._refuse(msg, errno.EIO, f"internal error: {e}")
        else:
            if fds:  # a handler takes the fds it uses out of the list; none is left behind
                self._close_unused(fds)
            if reply is not None and not msg.flags & _NO_REPLY:
                self._send(reply)

    def _close_unused(self, fds: list[int]) -> None:
        if fds:
            _close_fds(fds)
            self.fds_refused += len(fds)

    def _refuse(self, msg: Message, err: int, why: str) -> None:
        if msg.flags & _NO_REPLY:
            self.posted_errors += 1
            self._warn("%s: posted %s (msg id %d) failed: %s", self.name, p.command_name(msg.command),
                       msg.msg_id, why)
            return
        self.error_replies += 1
        log.info("%s: %s (msg id %d) refused: %s", self.name, p.command_name(msg.command), msg.msg_id, why)
        self._send(p.pack_error(msg.msg_id, msg.command, err))

    def _send(self, data: bytes | bytearray) -> None:
        conn = self.conn
        if conn is None:
            return
        if self._out:
            self._out += data
            return
        try:
            n = conn.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as e:
            self.disconnect(f"send failed: {e}")
            return
        if n < len(data):
            self._out += memoryview(data)[n:]
            if self.selector is not None:
                self.selector.modify(conn, selectors.EVENT_WRITE, self._on_conn_event)

    def _flush(self) -> None:
        conn = self.conn
        if conn is None:
            return
        try:
            n = conn.send(self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.disconnect(f"send failed: {e}")
            return
        del self._out[:n]
        if not self._out and self.selector is not None:
            self.selector.modify(conn, selectors.EVENT_READ, self._on_conn_event)

    # --- interrupts -------------------------------------------------------------------

    def _on_irq(self, level: bool) -> None:
        """nic.on_irq: INTx rose -> one eventfd signal."""
        if level:
            self._signal()

    def _signal(self) -> None:
        self._signalled = True
        fd = self.irq_fd
        if fd is None:
            return
        try:
            os.eventfd_write(fd, 1)
            self.irqs_signalled += 1
        except OSError as e:  # a full counter (never in practice) must not block the loop
            log.warning("%s: cannot signal INTx eventfd: %s", self.name, e)

    def _bar0_read(self, offset: int) -> int:
        """A BAR0 read. Level-triggered INTx over an edge-like eventfd: after the driver reads
        ICR, a line that is still (or again) high is signalled once more (once: the Nic may
        have re-signalled through on_irq already)."""
        if offset != ICR:
            return self.nic.read32(offset)
        self._signalled = False
        value = self.nic.read32(offset)
        if self.nic.irq and not self._signalled:
            self._signal()
        return value

    def _bar0_write(self, offset: int, value: int) -> None:
        """A BAR0 write; after an IMS write a line still high is signalled again (see above).
        With the doorbell page on, a write of TDT or RDT is a wake-up: the page's value is
        applied (_page_sync), never the message's, which may be older."""
        if self._page is not None and offset in _TAILS:
            self.page_wakeups += 1
            return
        if offset != IMS:
            self.nic.write32(offset, value)
            return
        self._signalled = False
        self.nic.write32(offset, value)
        if self.nic.irq and not self._signalled:
            self._signal()

    # --- commands -----------------------------------------------------------------------

    def _version(self, msg: Message, fds: list[int]) -> bytes:
        self._no_fds(msg, fds)
        major, minor, caps = p.parse_version(msg.payload)
        if major != p.VERSION_MAJOR:
            raise ProtocolError(errno.ENOTSUP, f"client speaks vfio-user {major}.{minor}, server {p.VERSION_MAJOR}.x")
        self._negotiated = True
        client_caps = caps.get("capabilities")
        asked = isinstance(client_caps, dict) and client_caps.get(db.CAPABILITY) not in (None, False)
        self._page_close()
        self._page_negotiated = self.offer_doorbell_page and asked
        reply_caps = p.server_capabilities()
        if self._page_negotiated:  # only to a client that asked: the others see the old reply
            reply_caps["capabilities"][db.CAPABILITY] = {"version": 1, "command": db.COMMAND,
                                                         "size": db.PAGE_SIZE}
        payload = p.pack_version(p.VERSION_MAJOR, min(minor, p.VERSION_MINOR), reply_caps)
        return p.pack_message(msg.msg_id, msg.command, payload, flags=_REPLY)

    def _dma_map(self, msg: Message, fds: list[int]) -> bytes:
        p.expect_size(msg.command, msg.payload, p.DMA_MAP.size)
        argsz, flags, offset, address, size = p.DMA_MAP.unpack_from(msg.payload)
        p.expect_argsz(msg.command, argsz, p.DMA_MAP.size)
        if len(fds) != 1:
            raise ProtocolError(errno.EINVAL, f"DMA_MAP needs exactly one fd, got {len(fds)}")
        if flags & (p.DMA_MAP_READ | p.DMA_MAP_WRITE) != p.DMA_MAP_READ | p.DMA_MAP_WRITE:
            # The device writes descriptors back and receives into buffers anywhere in its
            # memory; DmaMemory has no per-region permissions, and a write into a read-only
            # mapping would fault the whole emulator. So: readable and writable, or refused.
            raise ProtocolError(errno.ENOTSUP, f"DMA_MAP flags {flags:#x}: nicemu maps only readable+writable memory")
        if len(self.nic.mem.regions) >= MAX_DMA_REGIONS:
            raise ProtocolError(errno.ENOSPC, f"at most {MAX_DMA_REGIONS} DMA regions")
        fd = fds.pop()
        try:
            self.nic.mem.map_fd(fd, address, size, offset, writable=True)
        except DmaError as e:  # map_fd closed the fd
            raise ProtocolError(errno.EINVAL, str(e)) from None
        log.info("%s: DMA_MAP %#x+%#x", self.name, address, size)
        return p.pack_message(msg.msg_id, msg.command, flags=_REPLY)

    def _dma_unmap(self, msg: Message, fds: list[int]) -> bytes:
        self._no_fds(msg, fds)
        p.expect_size(msg.command, msg.payload, p.DMA_UNMAP.size)
        argsz, flags, address, size = p.DMA_UNMAP.unpack_from(msg.payload)
        p.expect_argsz(msg.command, argsz, p.DMA_UNMAP.size)
        if flags:  # GET_DIRTY_BITMAP, UNMAP_ALL: not in the subset; ignoring them would lie
            raise ProtocolError(errno.EINVAL, f"DMA_UNMAP flags {flags:#x}: none are supported")
        try:
            self.nic.mem.unmap(address, size)
        except DmaError as e:
            raise ProtocolError(errno.EINVAL, str(e)) from None
        log.info("%s: DMA_UNMAP %#x+%#x", self.name, address, size)
        return p.pack_message(msg.msg_id, msg.command, p.DMA_UNMAP.pack(p.DMA_UNMAP.size, 0, address, size),
                              flags=_REPLY)

    def _device_get_info(self, msg: Message, fds: list[int]) -> bytes:
        self._no_fds(msg, fds)
        p.expect_size(msg.command, msg.payload, p.DEVICE_INFO.size)
        p.expect_argsz(msg.command, p.DEVICE_INFO.unpack_from(msg.payload)[0], p.DEVICE_INFO.size)
        info = p.DEVICE_INFO.pack(p.DEVICE_INFO.size, p.DEVICE_FLAGS_RESET | p.DEVICE_FLAGS_PCI,
                                  p.NUM_REGIONS, p.NUM_IRQS)
        return p.pack_message(msg.msg_id, msg.command, info, flags=_REPLY)

    def _info_index(self, msg: Message, fds: list[int], layout: struct.Struct, count: int, what: str) -> int:
        """The index a DEVICE_GET_REGION_INFO / DEVICE_GET_IRQ_INFO asks about: both requests
        are (argsz, flags, index, ...) with no fds, for an index below the device's count."""
        self._no_fds(msg, fds)
        p.expect_size(msg.command, msg.payload, layout.size)
        argsz, _flags, index = layout.unpack_from(msg.payload)[:3]
        p.expect_argsz(msg.command, argsz, layout.size)
        if index >= count:
            raise ProtocolError(errno.EINVAL, f"no {what} {index} (the device has {count})")
        return index

    def _device_get_region_info(self, msg: Message, fds: list[int]) -> bytes:
        index = self._info_index(msg, fds, p.REGION_INFO, p.NUM_REGIONS, "region")
        size = _region_size(index)
        flags = p.REGION_INFO_FLAG_READ | p.REGION_INFO_FLAG_WRITE if size else 0
        info = p.REGION_INFO.pack(p.REGION_INFO.size, flags, index, 0, size, 0)
        return p.pack_message(msg.msg_id, msg.command, info, flags=_REPLY)

    def _device_get_irq_info(self, msg: Message, fds: list[int]) -> bytes:
        index = self._info_index(msg, fds, p.IRQ_INFO, p.NUM_IRQS, "IRQ index")
        count, flags = (1, p.IRQ_INFO_EVENTFD) if index == p.INTX_IRQ else (0, 0)
        info = p.IRQ_INFO.pack(p.IRQ_INFO.size, flags, index, count)
        return p.pack_message(msg.msg_id, msg.command, info, flags=_REPLY)

    def _device_set_irqs(self, msg: Message, fds: list[int]) -> bytes:
        # The data that may follow is DATA_BOOL's (not supported): DATA_NONE and DATA_EVENTFD
        # carry none, so the payload is the fixed part alone.
        p.expect_size(msg.command, msg.payload, p.IRQ_SET.size)
        argsz, flags, index, start, count = p.IRQ_SET.unpack_from(msg.payload)
        p.expect_argsz(msg.command, argsz, p.IRQ_SET.size)
        if index != p.INTX_IRQ:
            raise ProtocolError(errno.EINVAL, f"IRQ index {index} has no interrupts (only INTx, index 0)")
        if start + count > 1:
            raise ProtocolError(errno.EINVAL, f"INTx has one vector; start {start} count {count}")
        action = flags & (p.IRQ_SET_ACTION_MASK | p.IRQ_SET_ACTION_UNMASK | p.IRQ_SET_ACTION_TRIGGER)
        data = flags & (p.IRQ_SET_DATA_NONE | p.IRQ_SET_DATA_BOOL | p.IRQ_SET_DATA_EVENTFD)
        if action != p.IRQ_SET_ACTION_TRIGGER:
            raise ProtocolError(errno.EINVAL, "only ACTION_TRIGGER is supported")
        if data == p.IRQ_SET_DATA_EVENTFD:
            if len(fds) != count:
                raise ProtocolError(errno.EINVAL, f"DATA_EVENTFD with count {count} needs {count} fds, got {len(fds)}")
            if count == 1:
                fd = fds[0]
                if not _is_eventfd(fd):
                    raise ProtocolError(errno.EINVAL, "the INTx fd is not an eventfd")
                fds.clear()
                os.set_blocking(fd, False)  # a signal must never block the emulator
                self._close_irq_fd()
                self.irq_fd = fd
                log.info("%s: INTx eventfd attached", self.name)
                if self.nic.irq:  # the line is already high: tell the driver now
                    self._signal()
            else:
                self._close_irq_fd()
        elif data == p.IRQ_SET_DATA_NONE:
            self._no_fds(msg, fds)
            if count == 0:
                self._close_irq_fd()  # VFIO: DATA_NONE|TRIGGER with count 0 tears the trigger down
            else:
                self._signal()  # ... and with count 1 fires it (a loopback test of the path)
        else:
            raise ProtocolError(errno.EINVAL, "only DATA_EVENTFD and DATA_NONE are supported")
        return p.pack_message(msg.msg_id, msg.command, flags=_REPLY)

    def _check_access(self, region: int, offset: int, count: int) -> None:
        if region >= p.NUM_REGIONS:
            raise ProtocolError(errno.EINVAL, f"no region {region}")
        size = _region_size(region)
        if size == 0:
            raise ProtocolError(errno.EINVAL, f"region {region} is not implemented (size 0)")
        if count == 0 or offset >= size or count > size - offset:
            raise ProtocolError(errno.EINVAL, f"access {offset:#x}+{count} outside region {region} of {size:#x} bytes")
        if region == p.BAR0_REGION:
            # Registers are dwords. An unaligned offset goes to the device, which reads 0 and
            # ignores the write, as the in-process Nic (and the hardware) does.
            if count & 3:
                raise ProtocolError(errno.EINVAL, f"BAR0 access of {count} bytes: registers are read in whole dwords")
        elif count not in (1, 2, 4) and (offset & 3 or count & 3):
            raise ProtocolError(errno.EINVAL, f"config access {offset:#x}+{count}: use 1, 2 or 4 bytes or whole dwords")

    def _region_read(self, msg: Message, fds: list[int]) -> bytes:
        self._no_fds(msg, fds)
        p.expect_size(msg.command, msg.payload, p.REGION_ACCESS.size)
        offset, region, count = p.REGION_ACCESS.unpack_from(msg.payload)
        self._check_access(region, offset, count)
        self._work += count >> 2
        data = bytearray(count)
        if region == p.BAR0_REGION:
            for off in range(0, count, 4):
                _U32.pack_into(data, off, self._bar0_read(offset + off))
        elif count in (1, 2, 4):
            data[:] = self.nic.config_read(offset, count).to_bytes(count, "little")
        else:
            for off in range(0, count, 4):
                _U32.pack_into(data, off, self.nic.config_read(offset + off, 4))
        return _HDR_ACCESS.pack(msg.msg_id, msg.command, _ACCESS_FIXED + count, _REPLY, 0,
                                offset, region, count) + data

    def _region_write(self, msg: Message, fds: list[int]) -> bytes:
        self._no_fds(msg, fds)
        payload = msg.payload
        if len(payload) < p.REGION_ACCESS.size:
            raise ProtocolError(errno.EINVAL, f"REGION_WRITE payload is {len(payload)} bytes, need at least 16")
        offset, region, count = p.REGION_ACCESS.unpack_from(payload)
        if len(payload) != p.REGION_ACCESS.size + count:
            raise ProtocolError(errno.EINVAL, f"REGION_WRITE says {count} data bytes, carries "
                                              f"{len(payload) - p.REGION_ACCESS.size}")
        self._check_access(region, offset, count)
        self._work += count >> 2
        nic = self.nic
        if region == p.BAR0_REGION:
            for off in range(0, count, 4):
                self._bar0_write(offset + off, _U32.unpack_from(payload, 16 + off)[0])
        elif count in (1, 2, 4):
            nic.config_write(offset, int.from_bytes(payload[16 : 16 + count], "little"), count)
        else:
            for off in range(0, count, 4):
                nic.config_write(offset + off, _U32.unpack_from(payload, 16 + off)[0], 4)
        return _HDR_ACCESS.pack(msg.msg_id, msg.command, _ACCESS_FIXED, _REPLY, 0, offset, region, count)

    def _doorbell_page(self, msg: Message, fds: list[int]) -> bytes:
        """NICEMU_DOORBELL_PAGE (docs/transport.md, "The doorbell page"): with FLAG_ENABLE and
        one fd, map PAGE_SIZE bytes of it (a memfd sealed against shrinking) as the doorbell
        page; without, stop using the page. Unknown (ENOSYS) unless negotiated in VERSION."""
        if not self._page_negotiated:
            raise ProtocolError(errno.ENOSYS, f"unknown command {msg.command}")
        payload = msg.payload
        if len(payload) != db.PAGE_REQUEST.size:
            raise ProtocolError(errno.EINVAL, f"NICEMU_DOORBELL_PAGE payload is {len(payload)} bytes, "
                                              f"expected {db.PAGE_REQUEST.size}")
        argsz, flags, offset, size = db.PAGE_REQUEST.unpack_from(payload)
        if argsz < db.PAGE_REQUEST.size:
            raise ProtocolError(errno.EINVAL, f"argsz {argsz} is below the fixed part ({db.PAGE_REQUEST.size})")
        if flags & ~db.FLAG_ENABLE:
            raise ProtocolError(errno.EINVAL, f"NICEMU_DOORBELL_PAGE flags {flags:#x}: only ENABLE (1)")
        if not flags & db.FLAG_ENABLE:
            self._no_fds(msg, fds)
            self._page_close()
            log.info("%s: doorbell page off", self.name)
            return p.pack_message(msg.msg_id, msg.command, flags=_REPLY)
        if len(fds) != 1:
            raise ProtocolError(errno.EINVAL, f"NICEMU_DOORBELL_PAGE needs exactly one fd, got {len(fds)}")
        if size != db.PAGE_SIZE or offset % db.PAGE_SIZE or offset > 1 << 62:
            raise ProtocolError(errno.EINVAL, f"doorbell page {offset:#x}+{size:#x}: {db.PAGE_SIZE} bytes "
                                              f"at a page-aligned offset")
        fd = fds.pop()
        try:
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            except OSError:
                seals = 0
            if not seals & fcntl.F_SEAL_SHRINK:  # a file that can shrink under the mapping faults us
                raise ProtocolError(errno.EINVAL, "the doorbell page fd must be a memfd sealed with F_SEAL_SHRINK")
            if os.fstat(fd).st_size < offset + size:
                raise ProtocolError(errno.EINVAL, "the doorbell page runs past the end of its fd")
            try:
                mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
            except (OSError, ValueError) as e:
                raise ProtocolError(errno.EINVAL, f"cannot map the doorbell page: {e}") from None
        finally:
            os.close(fd)
        page = db.make_page(mm, self.page_engine)
        self._page_close()
        self._page, self._page_mm = page, mm
        kind = "python" if isinstance(page, db.DoorbellPageRef) else "cython"
        polling = self.page_polling
        self._page_shared = polling is not None and polling.kind == kind
        self._page_poller = polling.poller_for(self) if self._page_shared else pp.make_poller(kind)
        # what the page holds now is not a doorbell: only words that change from here on are
        self._page_port = ps.make_port(self, self._page_poller, page)
        page.disarm()
        self._page_add_port()
        self._page_sleeping = False
        self._page_idle_at = self.clock() + PAGE_POLL_IDLE_NS
        log.info("%s: doorbell page on", self.name)
        return p.pack_message(msg.msg_id, msg.command, flags=_REPLY)

    # --- the doorbell page ------------------------------------------------------------------

    def _page_sync(self) -> bool:
        """Apply each slot (RDT, then TDT: every device's RDT first) whose word changed and
        whose `after` (messages the client had sent when it wrote it) this server has reached
        (the poll step: page_service.py); True if one of this page's was applied."""
        port = self._page_port
        if port is None:
            return False
        poller = self._page_poller
        servers = [q.owner for q in poller.rx_ports]
        for server in servers:
            ps.refresh(server)
        port = self._page_port  # refresh may have made a new one (the Nic's peer changed)
        before = port.doorbells
        ps.run(poller, lambda: poller.sync(port), servers)
        return port.doorbells != before

    def _page_rebuild_port(self) -> None:
        """The Nic was linked to or unlinked from a peer since the port was made: a new port
        (the peer's register file and engine are part of it), the same last words."""
        old = self._page_port
        last = old.last
        self._page_remove_port()
        port = ps.make_port(self, self._page_poller, self._page)
        port.set_last(last[0], last[1])
        self._page_port = port
        self._page_add_port()

    def _page_add_port(self) -> None:
        if self._page_shared:
            self.page_polling.add_port(self, self._page_port)
        else:
            self._page_poller.add(self._page_port)

    def _page_remove_port(self) -> None:
        """Out of its poller(s), its counters kept; returns once no thread reads the page."""
        port = self._page_port
        if self._page_shared:
            self.page_polling.remove_port(port)
        else:
            self._page_poller.remove(port)
        self._page_counts[0] += port.doorbells
        self._page_counts[1] += port.bad
        self._page_port = None

    def _page_poll(self) -> None:
        """A loop turn while polling a private poller (no emulator's, see page_service.py)."""
        self._page_sync()
        self._page_after_poll(self.clock())

    def _page_after_poll(self, now: int) -> None:
        """After a poll: if a slot was taken, poll on; after PAGE_POLL_IDLE_NS with nothing,
        set NEED_WAKE, fence, look once more (a tail stored before the client could see the
        flag), and sleep (next_deadline: no more polling) unless that found one."""
        port = self._page_port
        if self._page_sleeping or port is None:
            return
        if port.active:
            port.active = False
            self._page_idle_at = now + PAGE_POLL_IDLE_NS
            return
        if now < self._page_idle_at or self._more:
            return
        page = self._page
        page.arm()
        if self._page_sync():
            page.disarm()
            port.active = False
            self._page_idle_at = now + PAGE_POLL_IDLE_NS
            return
        self._page_sleeping = True
        self.page_sleeps += 1

    def _page_wake(self) -> None:
        """The client sent something: poll the page again (NEED_WAKE off) for a while."""
        if self._page_sleeping:
            self._page.disarm()
            self._page_sleeping = False
            if self._page_shared:
                self.page_polling.wake(self)
        elif self._page_shared and self.page_polling.wake_on_message:
            self.page_polling.wake(self)  # an engine thread may wait for this message
        self._page_idle_at = self.clock() + PAGE_POLL_IDLE_NS

    def _page_close(self) -> None:
        if self._page_port is not None:  # first: once it is out no poll reads the page
            self._page_remove_port()
        page, mm = self._page, self._page_mm
        self._page = self._page_mm = None
        self._page_sleeping = False
        self._page_shared = False
        if page is not None:
            page.release()
        if mm is not None:
            mm.close()

    def _device_reset(self, msg: Message, fds: list[int]) -> bytes:
        self._no_fds(msg, fds)
        p.expect_size(msg.command, msg.payload, 0)
        self.nic.reset()
        return p.pack_message(msg.msg_id, msg.command, flags=_REPLY)

    def _no_fds(self, msg: Message, fds: list[int]) -> None:
        if fds:
            raise ProtocolError(errno.EINVAL, f"{p.command_name(msg.command)} takes no fds, got {len(fds)}")

    # --- teardown -----------------------------------------------------------------------

    def _close_irq_fd(self) -> None:
        if self.irq_fd is not None:
            os.close(self.irq_fd)
            self.irq_fd = None

    def disconnect(self, why: str = "disconnect") -> None:
        """Drop the client: reset the device, unmap its memory, close its eventfd."""
        conn = self.conn
        if conn is None:
            return
        log.info("%s: %s; resetting the device", self.name, why)
        if self.selector is not None:
            try:
                self.selector.unregister(conn)
            except (KeyError, ValueError):
                pass
        conn.close()
        self._out.clear()
        for _, fds, _ in self._fds:
            _close_fds(fds)
        self._fds.clear()
        self._skipped_fds = (-1, 0)
        self._more = False
        self._close_irq_fd()
        self._page_close()
        self._page_negotiated = False
        self._negotiated = False
        if self._warn_suppressed:
            log.warning("%s: %d more warning(s) about this client were suppressed", self.name,
                        self._warn_suppressed)
            self._warn_suppressed = 0
        try:
            # First, so no DMA happens from here on. nic.reset() keeps config space (as a
            # function reset does); the next client gets a power-on device: bus master off.
            self.nic.config_write(PCI_COMMAND, 0, 2)
            self.nic.reset()
        except Exception:
            log.exception("%s: reset after disconnect failed", self.name)
        self.nic.mem.close()
        self._release_engine_memory()
        self.conn = None  # last: `connected` turns False once the device is clean

    def _release_engine_memory(self) -> None:
        """Let the client's memory go now. The Cython engine holds buffer exports of the DMA
        regions (its raw pointers), which keep a closed region's mapping alive until the engine
        next looks at the memory - the next doorbell, maybe never. drain_rx() with bus
        mastering off (just cleared) does that look and nothing else."""
        try:
            self.nic.engine.drain_rx()
        except Exception:
            log.exception("%s: releasing the DMA memory failed", self.name)

    def close(self) -> None:
        """Stop serving: drop the client, close and unlink the socket (only if it is still ours)."""
        self.disconnect("server closing")
        if self.selector is not None:
            try:
                self.selector.unregister(self.listener)
            except (KeyError, ValueError):
                pass
        self.listener.close()
        try:
            if os.stat(self.socket_path).st_ino == self._inode:
                os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        if self._created_dir:
            try:
                os.rmdir(self._created_dir)
            except OSError:
                pass  # not empty: other sockets live there
        if self.nic.on_irq == self._on_irq:
            self.nic.on_irq = None


def _region_size(index: int) -> int:
    if index == p.BAR0_REGION:
        return BAR0_SIZE
    if index == p.CONFIG_REGION:
        return CONFIG_SIZE
    return 0
