"""The CableEnd protocol: what a NIC port plugs into, and small helpers every cable shares.

A cable end carries whole Ethernet frames, FCS included, in both directions. The device side
(`Nic.attach(sink)`) pushes frames into `send`; the event loop (nicemu.emulator) waits on
`fileno()` and hands what `recv_frames()` returns to `Nic.receive`. That is the whole contract,
so a capture or a fault injector is just another CableEnd wrapped around one (as smoltcp's
phy/ wrappers are), and the loop never needs to know which kind of cable it drives.

Flow control is the cable's job, as on a real link: `send` returns False when the cable cannot
take the frame now; the NIC keeps it in its TX packet buffer. Afterwards `fileno()` becomes
readable when the end may be writable again (even if no frame arrived: `recv_frames()` may then
return []), and the loop calls `nic.tx_ready()` once `writable()` is True. Every end therefore
exposes ONE descriptor: where an end depends on several (a socket and a timer, two eventfds and
a hang-up socket) it is an epoll descriptor over them (`Poller`), which select/selectors can
watch like any other.
"""
from __future__ import annotations

import ctypes
import errno
import os
import select
import time
from typing import Callable, Protocol, runtime_checkable

__all__ = [
    "CableEnd",
    "CableError",
    "DatagramEnd",
    "MAX_FRAME",
    "Poller",
    "Sink",
    "Timer",
    "eventfd_clear",
    "plug",
    "service",
    "unplugged",
]

Sink = Callable[[bytes], bool]
"""What Nic.attach takes: sink(frame) -> bool (False: the cable cannot take it now)."""

MAX_FRAME = 16384 + 4  # RCTL.LPE maximum plus slack: nothing longer is ever a frame here


class CableError(OSError):
    """A cable could not be opened or configured (bad address, no permission, no TAP support)."""


@runtime_checkable
class CableEnd(Protocol):
    """One end of a cable, as a NIC port sees it. Frames always include the 4-byte FCS."""

    link_up: bool
    """True while a peer is plugged in at the other end; STATUS.LU follows it."""

    def send(self, frame: bytes) -> bool:
        """Put a frame on the cable. False: cannot take it now (retry after writable())."""

    def fileno(self) -> int | None:
        """A descriptor that is readable when frames arrived, the link changed, a timer is due
        or, after a refused send, the end may be writable again. None: nothing to wait on
        (the end is driven synchronously)."""

    def recv_frames(self) -> list[bytes]:
        """All frames that arrived (non-blocking; [] if none). Also runs due timers."""

    def writable(self) -> bool:
        """True if send() would take a frame now."""

    def close(self) -> None:
        """Release every resource (idempotent)."""


# --- helpers for ends that wait on several things --------------------------------------------


class Poller:
    """One descriptor that is readable while any of several registered descriptors is ready.

    An epoll fd is itself pollable, so an event loop that knows only `fileno()` can wait on a
    socket plus a timer plus a doorbell at once. Level-triggered: a registration stays ready
    until the condition behind it is consumed.
    """

    def __init__(self) -> None:
        self._ep = select.epoll()  # created O_CLOEXEC by Python
        self._fds: dict[int, int] = {}

    def fileno(self) -> int:
        return self._ep.fileno()

    def watch(self, fd: int, events: int = select.EPOLLIN) -> None:
        """Register fd for events, or change its events if already registered."""
        if self._fds.get(fd) == events:
            return
        if fd in self._fds:
            self._ep.modify(fd, events)
        else:
            self._ep.register(fd, events)
        self._fds[fd] = events

    def unwatch(self, fd: int) -> None:
        if self._fds.pop(fd, None) is not None:
            try:
                self._ep.unregister(fd)
            except (OSError, ValueError):
                pass

    def ready(self, timeout: float = 0) -> list[tuple[int, int]]:
        """The (fd, events) ready now (or within timeout seconds)."""
        return self._ep.poll(timeout)

    def close(self) -> None:
        self._fds.clear()
        self._ep.close()


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_libc: ctypes.CDLL | None = None


def _get_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


class Timer:
    """A one-shot timerfd (CLOCK_MONOTONIC), so a delayed frame wakes a select loop.

    Python 3.11 has no os.timerfd_create; the three libc calls go through ctypes.
    `arm_in(ns)` sets a relative expiry, `disarm()` cancels, `clear()` consumes an expiry
    (the fd stays readable until then).
    """

    _TFD_NONBLOCK = os.O_NONBLOCK
    _TFD_CLOEXEC = os.O_CLOEXEC

    def __init__(self) -> None:
        libc = _get_libc()
        fd = libc.timerfd_create(time.CLOCK_MONOTONIC, self._TFD_NONBLOCK | self._TFD_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            raise CableError(e, f"timerfd_create: {os.strerror(e)}")
        self._fd = fd
        self.armed = False

    def fileno(self) -> int:
        return self._fd

    def _settime(self, ns: int) -> None:
        spec = _Itimerspec()
        spec.it_value.tv_sec, spec.it_value.tv_nsec = divmod(ns, 1_000_000_000)
        if _get_libc().timerfd_settime(self._fd, 0, ctypes.byref(spec), None) < 0:
            e = ctypes.get_errno()
            raise CableError(e, f"timerfd_settime: {os.strerror(e)}")

    def arm_in(self, ns: int) -> None:
        """Expire after ns nanoseconds (at least 1 ns: a zero value would disarm)."""
        self._settime(max(1, ns))
        self.armed = True

    def disarm(self) -> None:
        if self.armed:
            self._settime(0)
            self.armed = False

    def clear(self) -> None:
        try:
            os.read(self._fd, 8)
        except BlockingIOError:
            pass

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def eventfd_clear(fd: int) -> None:
    """Consume an eventfd's count (non-blocking fd), so it stops being readable."""
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass
    except OSError as e:  # pragma: no cover - only EAGAIN is expected
        if e.errno != errno.EAGAIN:
            raise


# --- plugging a Nic into a cable without an event loop ---------------------------------------


def unplugged(frame: bytes) -> bool:
    """The Sink of a port with no cable: every frame is taken and lost."""
    return True


def plug(nic, end: CableEnd) -> None:
    """Connect a Nic's port to a cable end: its transmissions go to end.send, and STATUS.LU
    follows end.link_up. Frames arriving are delivered by `service` (or the emulator loop)."""
    nic.attach(end.send)
    nic.set_link(bool(end.link_up))


def service(nic, end: CableEnd, state: dict | None = None) -> int:
    """One turn of what the emulator loop (nicemu.emulator) does for a port when the end's
    fileno() is readable: deliver arrived frames to the Nic, follow link changes, and resume
    its TX packet buffer if the cable is writable. `state` remembers the last link state
    (pass the same dict each turn). Returns the number of frames delivered."""
    frames = end.recv_frames()
    for f in frames:
        nic.receive(f)
    up = bool(end.link_up)
    if state is None or state.get("link") != up:
        if state is not None:
            state["link"] = up
        nic.set_link(up)
    if end.writable():
        nic.tx_ready()
    return len(frames)


class DatagramEnd:
    """Shared logic of a cable that carries one frame per datagram (the udp and unix cables):
    the socket, a timer and a private eventfd behind one Poller, the link state and counters.

    The socket is non-blocking. As the udp cable uses it, it is unconnected (sendto the peer's
    address each time, as QEMU's udp netdev does): a full socket buffer refuses the frame
    (send -> False) and arms a retry timer (50 us, doubling to 1 ms while still full), since an
    unconnected datagram socket cannot report when there is room again, so the end looks
    again. A subclass changes what differs through hooks: `_sendto`, `_wait_writable` and
    `_send_failed` when sending, `_from_peer` when receiving (the unix cable connects its
    socket, waits for EPOLLOUT, and reads its link pulses in its own recv_frames). Link
    changes ring the private eventfd, so the loop wakes and reads link_up.
    """

    RETRY_MIN_NS = 50_000
    RETRY_MAX_NS = 1_000_000
    RECV_BATCH = 256  # datagrams per recv_frames call; the rest keep the fd readable

    def __init__(self, sock, peer, *, link: bool = True) -> None:
        self.sock = sock
        sock.setblocking(False)
        self.peer = peer
        self._closed = False
        self._blocked = False
        self._retry_ns = self.RETRY_MIN_NS
        self._link = link
        self._timer = Timer()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._poller = Poller()
        self._poller.watch(sock.fileno())
        self._poller.watch(self._timer.fileno())
        self._poller.watch(self._wake)
        self.tx_frames = 0
        self.rx_frames = 0
        self.tx_refused = 0
        self.tx_dropped = 0  # lost: no peer, link down, or a send error
        self.rx_foreign = 0  # datagrams from someone other than the peer (ignored)
        self.last_error: str | None = None

    @property
    def link_up(self) -> bool:
        return self._link and not self._closed

    def _set_link(self, up: bool) -> None:
        if up != self._link:
            self._link = up
            os.eventfd_write(self._wake, 1)  # wake the loop so it reads link_up

    def fileno(self) -> int | None:
        return None if self._closed else self._poller.fileno()

    def _sendto(self, data: bytes) -> None:
        self.sock.sendto(data, self.peer)

    def send(self, frame: bytes) -> bool:
        if self._closed or self.peer is None or not self._link:
            self.tx_dropped += 1  # unplugged: the frame is lost, as on a real cable
            return True
        if self._blocked:
            self.tx_refused += 1
            return False
        try:
            self._sendto(frame)
        except BlockingIOError:
            self._blocked = True
            self._wait_writable()
            self.tx_refused += 1
            return False
        except OSError as e:
            self.tx_dropped += 1
            self._send_failed(e)
            return True
        self._retry_ns = self.RETRY_MIN_NS
        self.tx_frames += 1
        return True

    def _wait_writable(self) -> None:
        """Hook: the socket buffer is full; arrange for fileno() to wake the loop when the end
        may be writable again (here: a retry timer with backoff)."""
        self._timer.arm_in(self._retry_ns)
        self._retry_ns = min(2 * self._retry_ns, self.RETRY_MAX_NS)

    def _send_failed(self, e: OSError) -> None:
        """Hook: a send error that is not 'buffer full' (the unix cable also drops the link)."""
        self.last_error = f"send: {e}"

    def writable(self) -> bool:
        return not self._blocked

    def recv_frames(self) -> list[bytes]:
        if self._closed:
            return []
        eventfd_clear(self._wake)
        if self._blocked:
            self._timer.clear()
            self._blocked = False  # try again; a refused send re-arms the timer
        frames: list[bytes] = []
        for _ in range(self.RECV_BATCH):
            try:
                data, addr = self.sock.recvfrom(MAX_FRAME + 1)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:  # e.g. a queued ICMP error on UDP: note it, keep reading
                self.last_error = f"recv: {e}"
                continue
            if not self._from_peer(addr):
                self.rx_foreign += 1
                continue
            frames.append(data)
        self.rx_frames += len(frames)
        return frames

    def _from_peer(self, addr) -> bool:
        return addr == self.peer

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._poller.close()
        self._timer.close()
        os.close(self._wake)
        self.sock.close()
