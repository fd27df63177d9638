"""A UDP receiver over kstack: rate, and loss and reordering from udp_send's sequence numbers.

    python -m kstack.apps.udp_sink [--bind IP] [--port PORT] [--count N] [--duration S]
                                   [--idle S] [--batch N] [--kernel PATH]

Stops after N datagrams, S seconds, S idle seconds once traffic started (default 2), or on
SIGTERM/SIGINT. Rates run from the first datagram to the last. Loss is what the sequence
numbers say never came: (highest - lowest + 1) - distinct received.

--batch N (default 1) receives with recvmmsg, up to N datagrams per call, as `iperf3`-style
tools use recvmmsg on Linux; the default is one recv per datagram.
"""
from __future__ import annotations

import struct
import sys
import time

from kstack.apps.common import Stop, add_kernel_arg, bind_udp, deadline, open_kernel, report, server_parser

HDR = struct.Struct("!QQ")
MAX_TRACKED = 1 << 22  # sequence numbers remembered for duplicates (memory bound)


def main(argv: list[str] | None = None) -> int:
    p = server_parser("udp_sink", __doc__, 9)
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--duration", type=float, default=0.0)
    p.add_argument("--idle", type=float, default=2.0)
    p.add_argument("--batch", type=int, default=1, help="datagrams per recvmmsg call (1: recv)")
    add_kernel_arg(p)
    args = p.parse_args(argv)
    open_kernel(args)
    stop = Stop()
    s = bind_udp("udp_sink", args.bind, args.port)
    if s is None:
        return 2
    buf = bytearray(65535)
    received = nbytes = reordered = dups = short = 0
    seen: set[int] = set()
    lo, hi, last_seq = None, -1, -1
    first = last = 0.0
    start, end = deadline(args.duration)
    while not stop.set and (args.count == 0 or received < args.count):
        t = time.monotonic()
        limit = end if not received else min(end, last + args.idle)
        if t >= limit:
            break
        s.settimeout(min(limit - t, 0.5))
        try:
            if args.batch > 1:
                batch = [d for d, _ in s.recvmmsg(args.batch, len(buf))]
            else:
                batch = (buf[:s.recv_into(buf)],)
        except TimeoutError:
            continue
        last = time.monotonic()
        if not received:
            first = last
        for d in batch:
            n = len(d)
            received += 1
            nbytes += n
            if n < HDR.size:
                short += 1
                continue
            seq, _sent_ns = HDR.unpack_from(d)
            if seq in seen:
                dups += 1
                continue
            if len(seen) < MAX_TRACKED:
                seen.add(seq)
            if seq < last_seq:
                reordered += 1
            last_seq = seq
            if lo is None or seq < lo:
                lo = seq
            if seq > hi:
                hi = seq
    s.close()
    span = max(last - first, 1e-9)
    distinct = received - dups - short
    expected = hi - lo + 1 if lo is not None else 0
    lost = max(0, expected - distinct)
    pps = received / span if received > 1 else 0.0
    bps = nbytes / span if received > 1 else 0.0
    loss_pct = 100.0 * lost / expected if expected else 0.0
    print(f"udp_sink: received {received} datagrams, {nbytes} bytes in {span:.3f} s: {pps:.0f} "
          f"datagrams/s, {bps:.0f} bytes/s; lost {lost} ({loss_pct:.2f}%), reordered {reordered}, "
          f"duplicates {dups}")
    report("udp_sink", {"received": received, "bytes": nbytes, "seconds": span,
                        "datagrams_per_s": pps, "bytes_per_s": bps, "lost": lost,
                        "loss_percent": loss_pct, "reordered": reordered, "duplicates": dups,
                        "short": short})
    return 0


if __name__ == "__main__":
    sys.exit(main())
