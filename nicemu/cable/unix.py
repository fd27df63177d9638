"""A cable between two emulator processes on one host: frames as AF_UNIX datagrams.

Each end binds its own socket path and sends each frame (FCS included) as one datagram to
the peer's path. SOCK_DGRAM keeps frame boundaries, and the socket is connected to the peer,
so the kernel gives real backpressure: a full peer queue (net.unix.max_dgram_qlen) refuses
the frame (the NIC keeps it in its TX packet buffer) and the socket polls writable as soon as
the peer has read, which makes fileno() readable and the loop resume the NIC.

Options (YAML keys of a `unix` cable end):
    path      this end's socket path. Its directory is created 0700 if missing; an existing
              one must be private (ours, no group/other access: nicemu.private_dir); the
              socket is made 0600. A stale socket left by a
              dead process is replaced; one that a live process is bound to is an error.
    peer      the other end's socket path (it may not exist yet)
    pulse_ms  link pulse interval (default 250): see below

Link state, as Ethernet's link pulses: an empty datagram is "hello", sent when an end opens and
then every `pulse_ms` when nothing else was sent; a 1-byte datagram b"\x00" is "bye" (sent on
close). No Ethernet frame is that short (any other datagram goes to the NIC as a frame; one
under 64 bytes is a runt, counted in RUC). The link is up while sending to the peer works and
down after a bye or when a send (a frame or a pulse) finds no peer - ENOENT or ECONNREFUSED,
so a peer killed with kill -9 is noticed within one pulse even on an idle cable. While down,
an end tries to reach the peer every pulse, so a restarted peer brings the link back. Paths
are made absolute, so each end must name the other's path as that one binds it; only
datagrams from the peer's path are accepted.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import stat
import time
from pathlib import Path

from nicemu.cable.base import MAX_FRAME, CableError, DatagramEnd, eventfd_clear
from nicemu.private_dir import ensure_private_dir

__all__ = ["UnixCableEnd"]

HELLO = b""
BYE = b"\x00"
_NO_PEER = (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTCONN)


def _prepare_dir(d: Path) -> bool:
    """Make sure the socket's directory exists and is private (nicemu.private_dir); True when
    this created it. Only that one level is created: parents made here would be left behind."""
    created: list[Path] = []
    try:
        ensure_private_dir(d, created=created)
    except OSError as e:
        raise CableError(e.errno or errno.EPERM, f"unix cable: {e}") from None
    return bool(created)


def _bind(sock: socket.socket, path: Path) -> None:
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise CableError(errno.EEXIST, f"unix cable: {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # nobody bound to it: a leftover of a killed process
        else:
            raise CableError(errno.EADDRINUSE, f"unix cable: {path} is in use by a running process")
        finally:
            probe.close()
    sock.bind(str(path))
    os.chmod(path, 0o600)


class UnixCableEnd(DatagramEnd):
    """One end of a unix-datagram cable (a CableEnd). Its socket is connected to the peer, so
    a full peer queue is waited out on EPOLLOUT, and its timer sends the link pulses."""

    kind = "unix"  # the YAML cable kind (stats, logs)

    def __init__(
        self, path: str | os.PathLike[str], peer: str | os.PathLike[str], pulse_ms: float = 250
    ) -> None:
        self.path = Path(os.path.abspath(path))
        peer = os.path.abspath(peer)
        if str(self.path) == peer:
            raise CableError(errno.EINVAL, f"unix cable: path and peer are the same ({self.path})")
        if isinstance(pulse_ms, bool) or not isinstance(pulse_ms, (int, float)) or not 1 <= pulse_ms <= 60_000:
            raise ValueError(f"unix cable pulse_ms must be a number of milliseconds from 1 to 60000, got {pulse_ms!r}")
        self.pulse_ns = int(pulse_ms * 1_000_000)
        self._made_dir = _prepare_dir(self.path.parent)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            _bind(sock, self.path)
            # room for a queue of maximum-size frames
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        except BaseException:
            sock.close()
            raise
        super().__init__(sock, peer, link=False)
        self._last_tx = 0
        self._reach_peer()
        self._timer.arm_in(self.pulse_ns)

    # --- link ------------------------------------------------------------------------------

    def _reach_peer(self) -> None:
        """(Re)connect to the peer's path and say hello. Connecting replaces an association
        with a peer that died, whose restarted successor could not send to us otherwise."""
        try:
            self.sock.connect(self.peer)
            self.sock.send(HELLO)
        except BlockingIOError:
            pass  # connected; its queue is just full
        except OSError as e:
            self.last_error = f"connect {self.peer}: {e.strerror or e}"
            self._set_link(False)
            return
        self._last_tx = time.monotonic_ns()
        self._set_link(True)

    def _pulse(self) -> None:
        if not self._link:
            self._reach_peer()
        elif time.monotonic_ns() - self._last_tx >= self.pulse_ns:
            try:
                self.sock.send(HELLO)
                self._last_tx = time.monotonic_ns()
            except BlockingIOError:
                pass
            except OSError as e:
                self._send_failed(e)
        self._timer.arm_in(self.pulse_ns)

    def _send_failed(self, e: OSError) -> None:
        self.last_error = f"send: {e.strerror or e}"
        if e.errno in _NO_PEER:
            self._set_link(False)

    # --- CableEnd (send is DatagramEnd's) ---------------------------------------------------

    def _sendto(self, data: bytes) -> None:
        self.sock.send(data)  # connected to the peer
        self._last_tx = time.monotonic_ns()

    def _wait_writable(self) -> None:
        # the peer's queue is full: wait until the socket polls writable
        self._poller.watch(self.sock.fileno(), select.EPOLLIN | select.EPOLLOUT)

    def writable(self) -> bool:
        if self._blocked and select.select([], [self.sock], [], 0)[1]:
            self._blocked = False
            self._poller.watch(self.sock.fileno(), select.EPOLLIN)
        return not self._blocked

    def recv_frames(self) -> list[bytes]:
        if self._closed:
            return []
        eventfd_clear(self._wake)
        if self._timer_expired():
            self._pulse()
        frames: list[bytes] = []
        for _ in range(self.RECV_BATCH):
            try:
                data, addr = self.sock.recvfrom(MAX_FRAME + 1)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self.last_error = f"recv: {e.strerror or e}"
                break
            if addr != self.peer:
                self.rx_foreign += 1
                continue
            if data == BYE:
                self._set_link(False)
                continue
            if not self._link:
                self._reach_peer()  # it is alive: connect to it (again)
            if data != HELLO:
                frames.append(data)
        self.rx_frames += len(frames)
        self.writable()  # a blocked end may have become writable: stop watching EPOLLOUT
        return frames

    def _timer_expired(self) -> bool:
        try:
            return os.read(self._timer.fileno(), 8) != b""
        except BlockingIOError:
            return False

    def close(self) -> None:
        if self._closed:
            return
        if self._link:
            try:
                self.sock.send(BYE)
            except OSError:
                pass
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        if self._made_dir:
            try:
                self.path.parent.rmdir()  # only when empty: the peer's socket may live there
            except OSError:
                pass
        super().close()


# --- the `unix` kind of a topology (registered in nicemu.cable.KINDS) --------------------

ENDS = (1, 2)
KEYS = ("path", "peer")
SAME_PROCESS = False


def check(cc) -> dict:
    """Two devices: paths of our choosing in the runtime directory; one device: `peer` (the
    outside end's path) and optionally its own `path`."""
    spec: dict = {}
    ends, rdir, i = cc.ends, cc.rdir, cc.index
    unix_paths: dict[str, Path] = {}
    own = cc.file("path", rdir, "a socket path") if len(ends) == 1 else None
    if len(ends) == 2:
        if "path" in cc.cab or "peer" in cc.cab:
            key = "path" if "path" in cc.cab else "peer"
            cc.err(key, "a unix cable between two devices of this topology chooses its own socket paths; "
                        "`path`/`peer` are for a one-device cable to an outside peer")
        for e in ends:
            unix_paths[e] = rdir / f"cable{i}-{e}.sock"
    else:
        unix_paths[ends[0]] = own or rdir / f"cable{i}-{ends[0]}.sock"
        if "peer" not in cc.cab:
            cc.err("peer", "a unix cable with one device needs `peer`: the socket path of the outside end",
                   at=None)
        else:
            peer = cc.file("peer", rdir, "a socket path")
            if peer is not None:
                spec["unix_peer"] = peer
    spec["unix_paths"] = unix_paths
    return spec


def build(cable, local: list[str], ctx) -> list:
    opened = []
    try:
        for dev in local:
            if cable.unix_peer is not None:
                peer = cable.unix_peer
            else:
                peer = cable.unix_paths[next(e for e in cable.ends if e != dev)]
            opened.append((dev, UnixCableEnd(cable.unix_paths[dev], peer)))
    except BaseException:
        for _dev, end in opened:
            end.close()
        raise
    return opened


make = UnixCableEnd
