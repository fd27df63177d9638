"""The reference: Python over the real Linux kernel's UDP sockets on loopback, with the same
process structure as the kstack benchmark (a sender process and a receiver process; an echo
process and a pinging process), so that the two rows differ only in the kernel under them.

    python benchmarks/linux_udp.py rate [--payload 18] [--seconds 2]
    python benchmarks/linux_udp.py pingpong [--payload 18] [--rounds 5000]

Each prints one JSON line. Addresses are 127.0.0.1 (loopback only).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from multiprocessing import get_context

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ProcCost, die_with, percentile, start_echo, timed_rounds  # noqa: E402


def _sender(port: int, payload: int, seconds: float, ready) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    data = b"x" * payload
    if not ready.wait(30):
        return
    end = time.monotonic() + seconds
    sendto = s.sendto
    addr = ("127.0.0.1", port)
    while time.monotonic() < end:
        for _ in range(256):
            try:
                sendto(data, addr)
            except BlockingIOError:
                pass
    s.close()


def rate(payload: int = 18, seconds: float = 2.0) -> dict:
    """Datagrams/s the receiving Python process gets from a sending Python process."""
    ctx = get_context("fork")
    r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    r.bind(("127.0.0.1", 0))
    port = r.getsockname()[1]
    ready = ctx.Event()
    p = ctx.Process(target=die_with, args=(os.getpid(), _sender, port, payload, seconds + 0.5, ready))
    p.start()
    me = ProcCost("self")
    snd = ProcCost(p.pid)
    r.settimeout(2.0)
    ready.set()
    r.recv(2048)  # first datagram: the sender is running
    me.start(), snd.start()
    n = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    recv = r.recv
    try:
        while True:
            recv(2048)
            n += 1
            if not n & 1023 and time.perf_counter() >= end:
                break
    except socket.timeout:
        pass
    dt = time.perf_counter() - t0
    me.stop(), snd.stop()
    p.join(5)
    r.close()
    return {"kernel": "linux", "payload": payload, "datagrams": n, "seconds": dt, "rate": n / dt,
            "rx_cpu_ns_per_pkt": me.cpu / max(n, 1), "tx_cpu_ns_per_pkt": snd.cpu / max(n, 1),
            "rx_ctx_per_pkt": me.cs / max(n, 1), "tx_ctx_per_pkt": snd.cs / max(n, 1),
            "rx_cpu_frac": me.cpu / 1e9 / dt, "tx_cpu_frac": snd.cpu / 1e9 / dt,
            "rx_run_delay_frac": me.run_delay / 1e9 / dt, "tx_run_delay_frac": snd.run_delay / 1e9 / dt,
            "syscalls_per_pkt_rx": 1.0, "syscalls_per_pkt_tx": 1.0}


def _echo(port_q, stop_evt) -> None:
    parent = os.getppid()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port_q.put(s.getsockname()[1])
    s.settimeout(0.2)
    while not stop_evt.is_set() and os.getppid() == parent:  # never outlive a killed parent
        try:
            data, addr = s.recvfrom(2048)
        except socket.timeout:
            continue
        s.sendto(data, addr)
    s.close()


def pingpong(payload: int = 18, rounds: int = 5000) -> dict:
    """Round trips of one datagram between this process and an echo process."""
    p, stop, port = start_echo(_echo)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("127.0.0.1", port))
    s.settimeout(2.0)
    data = b"p" * payload

    def once() -> None:
        s.send(data)
        s.recv(2048)

    rtts, cpu, ctx = timed_rounds(once, rounds)
    stop.set()
    p.join(5)
    s.close()
    return {"kernel": "linux", "payload": payload, "rounds": rounds,
            "p50_us": percentile(rtts, 50), "p99_us": percentile(rtts, 99),
            "cpu_ns_per_rtt_pinger": cpu / rounds, "ctx_per_rtt_pinger": ctx / rounds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("rate", "pingpong"))
    ap.add_argument("--payload", type=int, default=18, help="UDP payload bytes (18: a 64-byte frame)")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=5000)
    a = ap.parse_args()
    out = rate(a.payload, a.seconds) if a.what == "rate" else pingpong(a.payload, a.rounds)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
