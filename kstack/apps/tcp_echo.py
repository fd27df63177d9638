"""A TCP echo server over kstack: every byte a client sends comes back to it.

    python -m kstack.apps.tcp_echo [--bind IP] [--port PORT] [--backlog N] [--max-conns N]
                                   [--duration S] [--kernel PATH]

One process, one select() loop over the listener and the connections (non-blocking sends with
a bounded output buffer per connection: a client that does not read stops being read).
Runs until SIGTERM/SIGINT or S seconds; then prints the JSON line.
"""
from __future__ import annotations

import sys
import time

from kstack import socket as ksocket
from kstack.apps.common import (Stop, add_kernel_arg, deadline, listen_tcp, open_kernel, report,
                                 select_and_accept, server_parser)

OUT_LIMIT = 1 << 20  # bytes waiting to go back to one client before we stop reading it


class _Conn:
    __slots__ = ("sock", "out", "eof")

    def __init__(self, sock: ksocket.socket) -> None:
        self.sock = sock
        self.out = bytearray()
        self.eof = False


def main(argv: list[str] | None = None) -> int:
    p = server_parser("tcp_echo", __doc__, 7)
    p.add_argument("--backlog", type=int, default=128)
    p.add_argument("--max-conns", type=int, default=256)
    p.add_argument("--duration", type=float, default=0.0, help="stop after S seconds")
    add_kernel_arg(p)
    args = p.parse_args(argv)
    open_kernel(args)
    stop = Stop()
    lsk = listen_tcp("tcp_echo", args.bind, args.port, args.backlog)
    if lsk is None:
        return 2
    lsk.setblocking(False)
    conns: dict[int, _Conn] = {}
    accepted = nbytes = errors = 0
    start, end = deadline(args.duration)
    while not stop.set and time.monotonic() < end:
        rl = [c.sock for c in conns.values() if not c.eof and len(c.out) < OUT_LIMIT]
        wl = [c.sock for c in conns.values() if c.out]
        got = select_and_accept(lsk, conns, rl, wl, len(conns) < args.max_conns, _Conn)
        if got is None:
            errors += 1
            break
        r, w, n = got
        accepted += n
        for s in r:
            c = conns.get(s.fileno())
            if c is None:
                continue
            try:
                data = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                errors += 1
                data = b""
                c.out.clear()
            if data:
                c.out += data
                nbytes += len(data)
            else:
                c.eof = True
        for s in w:
            c = conns.get(s.fileno())
            if c is None or not c.out:
                continue
            try:
                n = s.send(c.out)
                del c.out[:n]
            except BlockingIOError:
                pass
            except OSError:
                errors += 1
                c.out.clear()
                c.eof = True
        for fd, c in list(conns.items()):
            if c.eof and not c.out:
                c.sock.close()
                del conns[fd]
    for c in conns.values():
        c.sock.close()
    lsk.close()
    elapsed = time.monotonic() - start
    print(f"tcp_echo: {accepted} connections, echoed {nbytes} bytes in {elapsed:.3f} s")
    report("tcp_echo", {"connections": accepted, "bytes": nbytes, "errors": errors, "seconds": elapsed})
    return 0


if __name__ == "__main__":
    sys.exit(main())
