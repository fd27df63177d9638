"""What every shipped application shares: the kernel option, stopping, the final JSON line."""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import Any, Callable

from kstack import socket as ksocket


def add_kernel_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", metavar="PATH", default=None,
                   help=f"the kernel's channel socket (default: ${ksocket.ENV})")


def open_kernel(args: argparse.Namespace) -> None:
    """Connect now, so that a missing kernel is a clear error before any work."""
    try:
        ksocket.connect_kernel(args.kernel)
    except OSError as e:
        print(f"{sys.argv[0]}: cannot reach the kernel: {e}", file=sys.stderr)
        raise SystemExit(2) from None


class Stop:
    """Set by SIGTERM or SIGINT, so a server ends its loop and still reports."""

    def __init__(self) -> None:
        self.set = False
        signal.signal(signal.SIGTERM, self._on)
        signal.signal(signal.SIGINT, self._on)

    def _on(self, *_: object) -> None:
        self.set = True


def report(app: str, result: dict[str, Any]) -> None:
    """The final machine-readable line: the results and this process's own costs."""
    print(json.dumps({"app": app, **result, "costs": ksocket.costs()}, sort_keys=True), flush=True)


def now() -> float:
    return time.monotonic()


def server_parser(prog: str, doc: str, port: int) -> argparse.ArgumentParser:
    """A server's parser with --bind and --port (its well-known port by default)."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--port", type=int, default=port)
    return p


def deadline(duration: float) -> tuple[float, float]:
    """(start, end): now, and now + duration (infinity for a duration of 0 or less)."""
    start = time.monotonic()
    return start, start + duration if duration > 0 else float("inf")


def listen_tcp(app: str, bind: str, port: int, backlog: int) -> ksocket.socket | None:
    """A TCP listener on (bind, port) with SO_REUSEADDR; None (after saying why on stderr) if
    bind or listen fails. Says where it listens."""
    lsk = ksocket.socket(ksocket.AF_INET, ksocket.SOCK_STREAM)
    lsk.setsockopt(ksocket.SOL_SOCKET, ksocket.SO_REUSEADDR, 1)
    try:
        lsk.bind((bind, port))
        lsk.listen(backlog)
    except OSError as e:
        print(f"{app}: {e.strerror or e}", file=sys.stderr)
        return None
    host, lport = lsk.getsockname()
    print(f"{app}: listening on {host}:{lport}", flush=True)
    return lsk


def bind_udp(app: str, bind: str, port: int) -> ksocket.socket | None:
    """A UDP socket bound to (bind, port); None (after saying why on stderr) if bind fails.
    Says where it listens."""
    s = ksocket.socket(ksocket.AF_INET, ksocket.SOCK_DGRAM)
    try:
        s.bind((bind, port))
    except OSError as e:
        print(f"{app}: bind: {e.strerror or e}", file=sys.stderr)
        return None
    host, lport = s.getsockname()
    print(f"{app}: listening on {host}:{lport}", flush=True)
    return s


def accept_nonblocking(lsk: ksocket.socket) -> ksocket.socket | None:
    """The next connection on a non-blocking listener, itself made non-blocking; None if there
    is none (or accept failed)."""
    try:
        cs, _ = lsk.accept()
    except OSError:
        return None
    cs.setblocking(False)
    return cs


def select_and_accept(lsk: ksocket.socket, conns: dict[int, Any], rl: list, wl: list, room: bool,
                      make: Callable[[ksocket.socket], Any]) -> tuple[list, list, int] | None:
    """One select() of a connection server (0.2 s, to notice a stop): over the listener (when
    there is `room`) and rl/wl. A ready listener's connection goes into conns as make(sock),
    by its fd. Returns (the readable sockets but the listener, the writable ones, how many
    were accepted), or None if select failed."""
    try:
        r, w, _ = ksocket.select(([lsk] if room else []) + rl, wl, [], 0.2)
    except OSError:
        return None
    readable, accepted = [], 0
    for s in r:
        if s is not lsk:
            readable.append(s)
            continue
        cs = accept_nonblocking(lsk)
        if cs is not None:
            conns[cs.fileno()] = make(cs)
            accepted += 1
    return readable, w, accepted
