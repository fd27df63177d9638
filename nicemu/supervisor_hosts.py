"""What `nicemu up` needs for hosts and applications: their output, relayed line by line.

Why a relay: a kernel says it is ready with a JSON line on stdout ({"event": "up", ...}) and a
server application with a line such as "udp_echo: listening ...", so the supervisor reads each
one's output through a pipe. It keeps reading for as long as the child lives (a pipe nobody
reads would block the child once full) and shows every line prefixed with whose it is, so the
output of several processes stays readable on one terminal.
"""
from __future__ import annotations

import os
from typing import Callable, TextIO

from nicemu.topology_hosts import HostSpec

__all__ = ["LineRelay", "MAX_LINE", "host_summary"]

MAX_LINE = 1 << 20  # a longer line is shown in pieces: a child cannot make us hold more


class LineRelay:
    """Reads a child's output pipe (non-blocking) and prints each line as `prefix line`;
    `on_line` sees each line first (readiness)."""

    def __init__(self, fd: int, prefix: str, out: TextIO,
                 on_line: Callable[[str], None] | None = None) -> None:
        os.set_blocking(fd, False)
        self.fd: int | None = fd
        self.prefix = prefix
        self.out = out
        self.on_line = on_line
        self._buf = bytearray()

    def pump(self) -> bool:
        """Read what is there; False once the pipe is closed (EOF: the child is gone)."""
        while self.fd is not None:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                return True
            except OSError:
                chunk = b""
            if not chunk:
                self.close()
                return False
            self._buf += chunk
            self._lines()
        return False

    def _lines(self) -> None:
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) >= MAX_LINE:
                    self._show(bytes(self._buf[:MAX_LINE]))
                    del self._buf[:MAX_LINE]
                    continue
                return
            line = bytes(self._buf[:nl])
            del self._buf[:nl + 1]
            self._show(line)

    def _show(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        if self.on_line is not None:
            self.on_line(line)
        try:
            print(f"{self.prefix}{line}", file=self.out, flush=True)
        except (OSError, ValueError):
            pass  # our own output is gone; keep reading so the child never blocks

    def close(self) -> None:
        """Stop reading; a last unterminated line is shown."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        os.close(fd)
        if self._buf:
            self._show(bytes(self._buf))
            self._buf.clear()


def host_summary(host: HostSpec) -> str:
    """`eth0 198.18.0.1/24, eth1 198.18.2.254/24` for messages."""
    return ", ".join(f"{i.name} {' '.join(i.addresses) or '(no address)'}" for i in host.interfaces.values())
