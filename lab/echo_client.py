"""The demo's UDP echo client: the same code over kstack.socket (`--kernel PATH`) and over the
real Linux kernel's sockets (no --kernel), so that paths differ only in what is under them.

    python -m lab.echo_client HOST PORT [--kernel PATH] [--rounds N] [--window W] [--payload B]

Sends ROUNDS datagrams to HOST:PORT with at most WINDOW unanswered, after a warm-up; each
echo must come back (a datagram lost is counted, not waited for forever). Prints one JSON line:
round trips (us, p50/p99, from send to its echo), echoes per second, lost, and its own costs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from typing import Any

from lab.measure import cpu_ns, ctx_switches, percentile

WARMUP = 200  # round trips before the measured ones: ARP, caches, the echo server's first call


def exchange(s: Any, rounds: int, window: int, payload: int) -> dict:
    """`rounds` datagrams out and back, at most `window` in flight; numbered so that a late
    echo is recognised. Returns rtts (us), lost and seconds."""
    sent_at: deque[tuple[int, int]] = deque()
    rtts: list[float] = []
    lost = 0
    seq = 0
    clock = time.perf_counter_ns
    t0 = clock()
    while len(rtts) + lost < rounds:
        while seq < rounds and len(sent_at) < window:
            sent_at.append((seq, clock()))
            s.send(seq.to_bytes(4, "big") + b"e" * (payload - 4))
            seq += 1
        try:
            data = s.recv(2048)
        except (TimeoutError, OSError):
            lost += len(sent_at)  # nothing for the timeout: what is in flight is gone
            sent_at.clear()
            continue
        n = int.from_bytes(data[:4], "big")
        while sent_at and sent_at[0][0] < n:  # skipped: lost on the way
            sent_at.popleft()
            lost += 1
        if sent_at and sent_at[0][0] == n:
            rtts.append((clock() - sent_at.popleft()[1]) / 1000)
    return {"rtts": rtts, "lost": lost, "seconds": (clock() - t0) / 1e9}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.echo_client", description=__doc__.split("\n\n")[0])
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--kernel", metavar="PATH", help="kstack's syscall socket (default: Linux's sockets)")
    ap.add_argument("--rounds", type=int, default=1000)
    ap.add_argument("--window", type=int, default=1)
    ap.add_argument("--payload", type=int, default=18)
    ap.add_argument("--wait-go", action="store_true", help="after the warm-up, print a ready event "
                    "and wait for a line on stdin")
    args = ap.parse_args(argv)
    if args.kernel:
        from kstack import socket as sk

        sk.connect_kernel(args.kernel)
    else:
        import socket as sk  # type: ignore[no-redef]
    s = sk.socket(sk.AF_INET, sk.SOCK_DGRAM)
    s.connect((args.host, args.port))
    s.settimeout(1.0)
    exchange(s, WARMUP, 1, max(4, args.payload))
    if args.wait_go:  # the controller snapshots the echo side, then says go
        print(json.dumps({"event": "ready"}), flush=True)
        if not sys.stdin.readline():
            return 1
    c0, x0 = cpu_ns(), ctx_switches()
    k0 = sk.costs() if args.kernel else None
    r = exchange(s, args.rounds, max(1, args.window), max(4, args.payload))
    c1, x1 = cpu_ns(), ctx_switches()
    k1 = sk.costs() if args.kernel else None
    s.close()
    n = max(1, len(r["rtts"]))
    print(json.dumps({
        "echoed": len(r["rtts"]), "lost": r["lost"], "seconds": r["seconds"],
        "rate": len(r["rtts"]) / r["seconds"] if r["seconds"] else 0.0,
        "p50_us": percentile(r["rtts"], 50), "p99_us": percentile(r["rtts"], 99),
        "cpu_ns": c1 - c0, "ctx": x1 - x0,
        # Linux: one send and one recv per datagram; kstack: what its library counted
        "syscalls": (k1["syscalls"] - k0["syscalls"]) if k0 else 2 * n,
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
