"""A UDP sender over kstack: datagrams with sequence numbers, at a rate or as fast as it can.

    python -m kstack.apps.udp_send DEST PORT [--size BYTES] [--count N] [--rate PPS]
                                   [--duration S] [--batch N] [--kernel PATH]

Each datagram starts with its sequence number (u64, from 0) and the send time (u64 ns of
CLOCK_MONOTONIC), so udp_sink can count loss and reordering. --rate 0 sends as fast as the
calls go; otherwise sends are paced to PPS datagrams per second on average. --batch N (default
1: one send per datagram) sends N datagrams per sendmmsg call when not paced, as Linux tools do.
"""
from __future__ import annotations

import argparse
import struct
import sys
import time

from kstack import socket as ksocket
from kstack.apps.common import Stop, add_kernel_arg, open_kernel, report

HDR = struct.Struct("!QQ")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="udp_send", description=__doc__.split("\n\n")[0])
    p.add_argument("dest")
    p.add_argument("port", type=int)
    p.add_argument("--size", type=int, default=64, help="payload bytes (at least 16)")
    p.add_argument("--count", type=int, default=1000, help="datagrams to send (0: until stopped)")
    p.add_argument("--rate", type=float, default=0.0, help="datagrams per second (0: as fast as possible)")
    p.add_argument("--duration", type=float, default=0.0, help="stop after S seconds")
    p.add_argument("--batch", type=int, default=1, help="datagrams per sendmmsg call (1: send)")
    add_kernel_arg(p)
    args = p.parse_args(argv)
    if not HDR.size <= args.size <= 65507:
        p.error(f"size must be {HDR.size}..65507")
    open_kernel(args)
    stop = Stop()
    s = ksocket.socket(ksocket.AF_INET, ksocket.SOCK_DGRAM)
    s.connect((args.dest, args.port))
    pad = bytes(args.size - HDR.size)
    sent = errors = 0
    start = time.monotonic()
    end = start + args.duration if args.duration > 0 else float("inf")
    gap = 1.0 / args.rate if args.rate > 0 else 0.0
    while not stop.set and (args.count == 0 or sent + errors < args.count):
        now = time.monotonic()
        if now >= end:
            break
        if gap:
            due = start + (sent + errors) * gap
            if due > now:
                time.sleep(due - now)
        if args.batch > 1 and not gap:
            k = args.batch if args.count == 0 else min(args.batch, args.count - sent - errors)
            base, ns = sent + errors, time.monotonic_ns()
            try:
                n = s.sendmmsg([HDR.pack(base + i, ns) + pad for i in range(k)])
                sent += n
                errors += k - n
            except OSError:
                errors += k
            continue
        try:
            s.send(HDR.pack(sent + errors, time.monotonic_ns()) + pad)
            sent += 1
        except OSError:
            errors += 1
    elapsed = max(time.monotonic() - start, 1e-9)
    s.close()
    pps = sent / elapsed
    print(f"udp_send: sent {sent} datagrams of {args.size} bytes in {elapsed:.3f} s: "
          f"{pps:.0f} datagrams/s, {pps * args.size:.0f} bytes/s, {errors} errors")
    report("udp_send", {"sent": sent, "errors": errors, "size": args.size, "seconds": elapsed,
                        "datagrams_per_s": pps, "bytes_per_s": pps * args.size})
    return 0


if __name__ == "__main__":
    sys.exit(main())
