"""A UDP echo server over kstack: every datagram goes back to its sender.

    python -m kstack.apps.udp_echo [--bind IP] [--port PORT] [--count N] [--duration S] [--kernel PATH]

Runs until SIGTERM/SIGINT, N datagrams or S seconds; then prints the JSON line.
"""
from __future__ import annotations

import sys
import time

from kstack.apps.common import Stop, add_kernel_arg, bind_udp, deadline, open_kernel, report, server_parser


def main(argv: list[str] | None = None) -> int:
    p = server_parser("udp_echo", __doc__, 7)
    p.add_argument("--count", type=int, default=0, help="stop after echoing N datagrams")
    p.add_argument("--duration", type=float, default=0.0, help="stop after S seconds")
    p.add_argument("--bufsize", type=int, default=65535)
    add_kernel_arg(p)
    args = p.parse_args(argv)
    open_kernel(args)
    stop = Stop()
    s = bind_udp("udp_echo", args.bind, args.port)
    if s is None:
        return 2
    s.settimeout(0.2)  # to notice a stop
    echoed = nbytes = errors = 0
    start, end = deadline(args.duration)
    while not stop.set and (args.count == 0 or echoed < args.count) and time.monotonic() < end:
        try:
            data, addr = s.recvfrom(args.bufsize)
            s.sendto(data, addr)
        except TimeoutError:
            continue
        except OSError:
            errors += 1
            continue
        echoed += 1
        nbytes += len(data)
    s.close()
    elapsed = time.monotonic() - start
    print(f"udp_echo: echoed {echoed} datagrams, {nbytes} bytes in {elapsed:.3f} s")
    report("udp_echo", {"echoed": echoed, "bytes": nbytes, "errors": errors, "seconds": elapsed})
    return 0


if __name__ == "__main__":
    sys.exit(main())
