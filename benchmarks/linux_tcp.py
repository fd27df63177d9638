"""The TCP reference: Python over the real Linux kernel's TCP on loopback, with the process
structure of the kstack TCP benchmark (a sender process and a sink process doing what
kstack.apps.tcp_bulk does: the same seeded stream and SHA-256 on both ends; an echo process
and a client sending one small request at a time), so the rows differ only in the kernel.

    python benchmarks/linux_tcp.py bulk [--mbytes 30] [--mss 0]
    python benchmarks/linux_tcp.py pingpong [--payload 32] [--rounds 2000]

Each prints one JSON line. Addresses are 127.0.0.1 (loopback only). --mss sets TCP_MAXSEG on
both sockets (1460: kstack's segment size on a 1500-byte MTU; 0: loopback's own, ~64 KiB).
Segment counts are the sink socket's own (TCP_INFO: tcpi_data_segs_in, tcpi_segs_out, in
MSS-sized segments even where loopback carries 64 KiB super-packets); retransmissions come
from /proc/net/snmp, the whole namespace's.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import struct
import sys
import time
from multiprocessing import get_context

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from _common import ProcCost, die_with, percentile, start_echo, timed_rounds  # noqa: E402
from kstack.apps.tcp_bulk import stream  # noqa: E402  (pure Python: the seeded stream)

CHUNK = 65536  # tcp_bulk's chunk and recv size


def tcp_info_segs(s: socket.socket) -> dict[str, int]:
    """segs_out, segs_in, data_segs_in, data_segs_out of struct tcp_info (Linux >= 4.6)."""
    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    segs_out, segs_in = struct.unpack_from("=II", info, 136)
    data_in, data_out = struct.unpack_from("=II", info, 152)
    return {"segs_out": segs_out, "segs_in": segs_in, "data_segs_in": data_in, "data_segs_out": data_out}


def tcp_snmp() -> dict[str, int]:
    with open("/proc/net/snmp") as f:
        lines = [ln.split() for ln in f if ln.startswith("Tcp:")]
    return {k: int(v) for k, v in zip(lines[0][1:], lines[1][1:])}


def _bulk_sender(port: int, total: int, seed: int, mss: int, out_q) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if mss:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
    s.settimeout(60)
    s.connect(("127.0.0.1", port))
    h = hashlib.sha256()
    calls = 0
    for b in stream(seed, total, CHUNK):
        view = memoryview(b)
        while view:  # sendall, counting each send(2)
            n = s.send(view)
            calls += 1
            view = view[n:]
        h.update(b)
    s.shutdown(socket.SHUT_WR)
    while s.recv(CHUNK):
        calls += 1
    calls += 2  # the shutdown and the recv that saw EOF
    s.close()
    out_q.put({"sha256": h.hexdigest(), "syscalls": calls})


def bulk(mbytes: float = 30.0, mss: int = 0, seed: int = 1) -> dict:
    """Goodput from a Python sender process to this (sink) process over loopback TCP."""
    total = int(mbytes * 1e6)
    ctx = get_context("fork")
    L = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if mss:
        L.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
    L.bind(("127.0.0.1", 0))
    L.listen(1)
    L.settimeout(30)
    q = ctx.Queue()
    p = ctx.Process(target=die_with, args=(os.getpid(), _bulk_sender, L.getsockname()[1], total, seed, mss, q))
    p.start()
    c, _ = L.accept()
    c.settimeout(60)
    me, snd = ProcCost("self"), ProcCost(p.pid)
    snmp0 = tcp_snmp()
    me.start(), snd.start()
    h = hashlib.sha256()
    got = calls = 0
    t0 = time.perf_counter()
    while True:
        b = c.recv(CHUNK)
        calls += 1
        if not b:
            break
        h.update(b)
        got += len(b)
    dt = time.perf_counter() - t0
    me.stop(), snd.stop()
    snmp1 = tcp_snmp()
    info = tcp_info_segs(c)
    c.close()
    L.close()
    res = q.get(timeout=30)
    p.join(10)
    kb = max(got, 1) / 1000
    return {"kernel": "linux", "mss": mss or "loopback", "bytes": got, "seconds": dt,
            "goodput_mbps": got * 8 / dt / 1e6, "sha_ok": res["sha256"] == h.hexdigest(),
            "sink_cpu_ns_per_kb": me.cpu / kb, "sender_cpu_ns_per_kb": snd.cpu / kb,
            "sink_cpu_frac": me.cpu / 1e9 / dt, "sender_cpu_frac": snd.cpu / 1e9 / dt,
            "sink_run_delay_frac": me.run_delay / 1e9 / dt, "sender_run_delay_frac": snd.run_delay / 1e9 / dt,
            "sink_ctx_per_mb": me.cs / (got / 1e6), "sender_ctx_per_mb": snd.cs / (got / 1e6),
            "sink_syscalls_per_mb": calls / (got / 1e6), "sender_syscalls_per_mb": res["syscalls"] / (got / 1e6),
            "retrans": snmp1["RetransSegs"] - snmp0["RetransSegs"],
            "data_segments_in": info["data_segs_in"], "acks_out": info["segs_out"],
            "segments_per_ack": info["data_segs_in"] / max(info["segs_out"], 1)}


def _echo(port_q, stop_evt) -> None:
    parent = os.getppid()
    L = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    L.bind(("127.0.0.1", 0))
    L.listen(1)
    L.settimeout(10)
    port_q.put(L.getsockname()[1])
    c, _ = L.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.settimeout(0.2)
    while not stop_evt.is_set() and os.getppid() == parent:  # never outlive a killed parent
        try:
            b = c.recv(CHUNK)
        except socket.timeout:
            continue
        if not b:
            break
        c.sendall(b)
    c.close()
    L.close()


def pingpong(payload: int = 32, rounds: int = 2000) -> dict:
    """Round trips of one small request between this process and an echo process over TCP."""
    p, stop, port = start_echo(_echo)
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data = b"p" * payload

    def once() -> None:
        s.sendall(data)
        n = 0
        while n < payload:
            n += len(s.recv(CHUNK))

    rtts, cpu, ctx = timed_rounds(once, rounds)
    stop.set()
    s.close()
    p.join(5)
    return {"kernel": "linux", "payload": payload, "rounds": rounds,
            "p50_us": percentile(rtts, 50), "p99_us": percentile(rtts, 99),
            "cpu_ns_per_rtt_client": cpu / rounds, "ctx_per_rtt_client": ctx / rounds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("bulk", "pingpong"))
    ap.add_argument("--mbytes", type=float, default=30.0, help="bulk: MB (10^6 bytes) to send")
    ap.add_argument("--mss", type=int, default=0, help="bulk: TCP_MAXSEG on both ends (0: loopback's)")
    ap.add_argument("--payload", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2000)
    a = ap.parse_args()
    out = bulk(a.mbytes, a.mss) if a.what == "bulk" else pingpong(a.payload, a.rounds)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
