"""A small control socket of an emulator process: `nicemu stats` asks it for its counters.

Why: SIGUSR1 prints the counters on the process's stdout, which under `nicemu up` is the
terminal of the supervisor, so another program could only scrape a log. The control socket is
an AF_UNIX SOCK_SEQPACKET socket in the topology's private runtime directory (0600, bound only
when `nicemu up` names it in NICEMU_CONTROL_SOCKET). One request per message; the only request
is `stats`, answered with one message: `{"stats": Emulator.stats(), "process": {...}}` as
JSON. Anything else is answered `{"error": ...}`. It runs on the emulator's own event loop
(its selector), never blocks it (non-blocking sockets; a reply that does not fit is dropped
with the connection) and holds at most MAX_CLIENTS connections (the oldest goes first).
close() unlinks the socket; after a SIGKILL `nicemu up` removes it.
"""
from __future__ import annotations

import json
import os
import resource
import selectors
import socket
import stat
from typing import Any

__all__ = ["ControlSocket", "ENV_CONTROL_SOCKET", "MAX_CLIENTS", "MAX_REQUEST", "control_path", "process_costs"]

ENV_CONTROL_SOCKET = "NICEMU_CONTROL_SOCKET"
MAX_CLIENTS = 4
MAX_REQUEST = 256  # bytes: requests are single words


def control_path(runtime_dir: "str | os.PathLike[str]", process: str) -> str | None:
    """`<runtime_dir>/ctl-<process>.sock`, or None if it does not fit sun_path (107 bytes)."""
    path = os.path.join(os.fspath(runtime_dir), f"ctl-{process}.sock")
    return path if len(os.fsencode(path)) <= 107 else None


def process_costs() -> dict[str, int]:
    """This process's CPU ns (/proc/self/schedstat) and context switches (getrusage)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/schedstat") as f:
            cpu, wait, slices = (int(x) for x in f.read().split()[:3])
        out.update(cpu_ns=cpu, run_delay_ns=wait, timeslices=slices)
    except (OSError, ValueError):
        pass
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out.update(nvcsw=ru.ru_nvcsw, nivcsw=ru.ru_nivcsw, ctx_switches=ru.ru_nvcsw + ru.ru_nivcsw)
    return out


class ControlSocket:
    """Serves `stats` requests for `emu` (an nicemu.emulator.Emulator) on `path`."""

    def __init__(self, emu: Any, path: str) -> None:
        self.emu = emu
        self.path = path
        self.requests = 0
        self.clients: list[socket.socket] = []
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # a dead run's socket (the directory is private: ours)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self.sock.setblocking(False)
            old = os.umask(0o177)
            try:
                self.sock.bind(path)
            finally:
                os.umask(old)
            self.sock.listen(MAX_CLIENTS)
        except BaseException:
            self.sock.close()
            raise
        emu.selector.register(self.sock, selectors.EVENT_READ, self._on_accept)
        emu.add_closeable(self)

    def _on_accept(self, _mask: int) -> None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError:
            return
        conn.setblocking(False)
        if len(self.clients) >= MAX_CLIENTS:
            self._drop(self.clients[0])
        self.clients.append(conn)
        self.emu.selector.register(conn, selectors.EVENT_READ, lambda _m, c=conn: self._on_request(c))

    def _on_request(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        self.requests += 1
        if data.strip() == b"stats":
            reply: dict[str, Any] = {"stats": self.emu.stats(), "process": process_costs()}
        else:
            reply = {"error": "unknown request (the only one is 'stats')"}
        try:
            conn.send(json.dumps(reply, default=str, separators=(",", ":")).encode())
        except OSError:  # no room or gone: the client asks again
            self._drop(conn)

    def _drop(self, conn: socket.socket) -> None:
        try:
            self.emu.selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        if conn in self.clients:
            self.clients.remove(conn)
        conn.close()

    def close(self) -> None:
        for c in list(self.clients):
            self._drop(c)
        if self.sock.fileno() >= 0:
            try:
                self.emu.selector.unregister(self.sock)
            except (KeyError, ValueError, RuntimeError):
                pass
            self.sock.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass
