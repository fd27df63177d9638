"""A bulk TCP sender and sink over kstack, reporting goodput as iperf does, with the SHA-256
of what was sent and received so a test can check the transfer byte for byte.

    python -m kstack.apps.tcp_bulk sink [--bind IP] [--port PORT] [--count N] [--kernel PATH]
    python -m kstack.apps.tcp_bulk send HOST [--port PORT] [--bytes N] [--seed S] [--nodelay]
                                        [--chunk B] [-i S] [--kernel PATH]

The sender sends N bytes of a pseudo-random stream (seeded, so both ends and a test can
compute it), shuts down its sending side and waits for the sink's EOF; the sink takes N
connections (one by default), reads each to EOF and closes. Interval lines every -i seconds,
then one JSON line: bytes, seconds, goodput_mbps, sha256.
"""
from __future__ import annotations

import argparse
import hashlib
import random
import sys
import time

from kstack import socket as ksocket
from kstack.apps.common import Stop, add_kernel_arg, listen_tcp, open_kernel, report


def stream(seed: int, total: int, chunk: int = 65536):
    """The bytes the sender sends: chunks of random.Random(seed)."""
    rng = random.Random(seed)
    left = total
    while left > 0:
        n = min(chunk, left)
        yield rng.randbytes(n)
        left -= n


def stream_sha256(seed: int, total: int, chunk: int = 65536) -> str:
    h = hashlib.sha256()
    for b in stream(seed, total, chunk):
        h.update(b)
    return h.hexdigest()


class _Meter:
    """iperf's interval lines."""

    def __init__(self, interval: float, label: str) -> None:
        self.interval = interval
        self.label = label
        self.start = self.last = time.monotonic()
        self.bytes_last = 0

    def tick(self, total: int, force: bool = False) -> None:
        now = time.monotonic()
        if self.interval <= 0 or (not force and now - self.last < self.interval):
            return
        dt = max(now - self.last, 1e-9)
        n = total - self.bytes_last
        print(f"[{self.label}] {self.last - self.start:6.2f}-{now - self.start:6.2f} sec "
              f"{n / 1e6:10.3f} MBytes {n * 8 / dt / 1e6:10.2f} Mbits/sec", flush=True)
        self.last, self.bytes_last = now, total


def send(args: argparse.Namespace) -> int:
    s = ksocket.socket(ksocket.AF_INET, ksocket.SOCK_STREAM)
    if args.nodelay:
        s.setsockopt(ksocket.IPPROTO_TCP, ksocket.TCP_NODELAY, 1)
    s.settimeout(args.timeout)
    h = hashlib.sha256()
    sent = 0
    t0 = time.monotonic()
    try:
        s.connect((args.host, args.port))
        meter = _Meter(args.interval, "send")
        for b in stream(args.seed, args.bytes, args.chunk):
            s.sendall(b)
            h.update(b)
            sent += len(b)
            meter.tick(sent)
        s.shutdown(ksocket.SHUT_WR)
        while s.recv(65536):  # the sink sends nothing: wait for its EOF (all acknowledged)
            pass
    except OSError as e:
        print(f"tcp_bulk: send: {e}", file=sys.stderr)
        report("tcp_bulk", {"mode": "send", "bytes": sent, "error": str(e), "sha256": h.hexdigest()})
        return 1
    finally:
        s.close()
    dt = time.monotonic() - t0
    print(f"tcp_bulk: sent {sent} bytes in {dt:.3f} s, {sent * 8 / dt / 1e6:.2f} Mbits/sec", flush=True)
    report("tcp_bulk", {"mode": "send", "bytes": sent, "seconds": dt,
                        "goodput_mbps": sent * 8 / dt / 1e6, "sha256": h.hexdigest()})
    return 0


def sink(args: argparse.Namespace) -> int:
    stop = Stop()
    lsk = listen_tcp("tcp_bulk", args.bind, args.port, 8)
    if lsk is None:
        return 2
    lsk.settimeout(0.2)
    flows = []
    while not stop.set and len(flows) < args.count:
        try:
            c, peer = lsk.accept()
        except TimeoutError:
            continue
        c.settimeout(args.timeout)
        h = hashlib.sha256()
        got = 0
        t0 = time.monotonic()
        meter = _Meter(args.interval, "sink")
        err = None
        try:
            while True:
                b = c.recv(65536)
                if not b:
                    break
                h.update(b)
                got += len(b)
                meter.tick(got)
        except OSError as e:
            err = str(e)
        c.close()
        dt = max(time.monotonic() - t0, 1e-9)
        print(f"tcp_bulk: received {got} bytes from {peer[0]}:{peer[1]} in {dt:.3f} s, "
              f"{got * 8 / dt / 1e6:.2f} Mbits/sec", flush=True)
        flows.append({"peer": f"{peer[0]}:{peer[1]}", "bytes": got, "seconds": dt,
                      "goodput_mbps": got * 8 / dt / 1e6, "sha256": h.hexdigest(), "error": err})
    lsk.close()
    last = flows[-1] if flows else {"bytes": 0, "sha256": hashlib.sha256().hexdigest()}
    report("tcp_bulk", {"mode": "sink", "flows": flows, "bytes": last["bytes"],
                        "sha256": last["sha256"], "goodput_mbps": last.get("goodput_mbps", 0.0)})
    return 0 if all(f["error"] is None for f in flows) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tcp_bulk", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    ps = sub.add_parser("send")
    ps.add_argument("host")
    ps.add_argument("--bytes", type=int, default=10_000_000)
    ps.add_argument("--seed", type=int, default=1)
    ps.add_argument("--chunk", type=int, default=65536)
    ps.add_argument("--nodelay", action="store_true")
    pk = sub.add_parser("sink")
    pk.add_argument("--bind", default="0.0.0.0")
    pk.add_argument("--count", type=int, default=1, help="connections to take before exiting")
    for q in (ps, pk):
        q.add_argument("--port", type=int, default=5001)
        q.add_argument("-i", "--interval", type=float, default=1.0)
        q.add_argument("--timeout", type=float, default=30.0, help="per socket call")
        add_kernel_arg(q)
    args = p.parse_args(argv)
    if args.mode == "send" and not 0 < args.chunk <= 1 << 20:
        p.error("--chunk must be in 1..1048576")
    open_kernel(args)
    return send(args) if args.mode == "send" else sink(args)


if __name__ == "__main__":
    sys.exit(main())
