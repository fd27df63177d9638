"""The sans-IO TCP engine alone: what one bulk segment costs the sender and the receiver.

    python benchmarks/bench_tcp_engine.py [--mbytes 10] [--repeat 5] [--wire csum,offload,none]
                                          [--instructions]
                                          [--profile [--profile-wire csum|offload|none]]

Two TcpConnections joined by a fake link (1 ms each way, a fake clock, no loss), as
tests/stack/test_tcp_link.py builds them: A sends --mbytes to B, B reads everything as it arrives.
Every engine call is timed with perf_counter_ns and charged to its side: the sender's
send(), segments_to_send() and segment_arrives() of the ACKs; the receiver's
segment_arrives() of the data, recv() and segments_to_send() of the ACKs. With the wire, each
side also pays for emitting what it sends (TcpSegment.emit with the checksum) and parsing what
it receives (TcpSegment.parse, checksum checked), as the stack does without checksum offload.
Rows: with the software checksum (computed on emit, checked on parse), with the checksum
offloaded (what kstack's TCP does on the 82540EM: emit and parse without it), and without
the wire (the segment objects go across as they are). The sender calls send() when
writable() and the receiver recv() while readable(), as poll-driven sockets do.
Per-side figures are wall time inside the calls (a preempted call counts its wait); the
thread CPU time of the whole run, both sides and the harness together, is printed beside them
as the load-proof figure. --instructions counts instructions per segment under callgrind instead: the figure to compare
on a loaded machine. Three variants run interleaved (so that a changing load falls on each alike): the full path
(TcpConnection.fast_path = False, what the engine did before header prediction), the fast path
in Python, and the fast path in C (kstack/tcp/_fast.pyx) when it is built.

Printed per side: µs per data segment and segments/s that one core could sustain at that
cost (1e6 / µs). Target (issue 9): 1 Gbit/s with a 1500-byte MTU is about 83k segments/s,
12 µs per segment for each side. Repeats: median (min-max, n); on a loaded machine the minimum
is the figure least disturbed (each run also prints the ms it waited for a CPU). The machine is shared (2 CPUs,
other work running): read the figures with the load printed beside them.
--profile runs one transfer with the wire under cProfile and prints the top functions.
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import heapq
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "stack"))  # test_tcp_link since the tests are grouped by layer

from _common import machine_line, run_delay_ns, spread  # noqa: E402
from kstack.tcp import TcpConfig, TcpConnection, fast_path_kind  # noqa: E402
from kstack.tcp import fastpath  # noqa: E402
from test_tcp_link import A_INT, B_INT, MS, established_pair  # noqa: E402
from wire.tcp import TcpSegment  # noqa: E402

clock = time.perf_counter_ns
NAMES = ("_rcv_predicted", "_xmit_full_segments", "_output_predicted")
PY_IMPL = tuple(getattr(TcpConnection, n) for n in NAMES)
try:
    from kstack.tcp import _fast
    C_IMPL = (_fast.rcv_predicted, _fast.xmit_full_segments, _fast.output_predicted)
except ImportError:
    C_IMPL = None


def use(fast: bool, impl) -> None:
    """Choose the path: the full one (fast_path off), or the common path in C or Python."""
    TcpConnection.fast_path = fast
    if impl is not None:
        for name, f in zip(NAMES, impl):
            setattr(fastpath, name.lstrip("_"), f)


def transfer(nbytes: int, wire: str) -> dict:
    """One bulk transfer A -> B; returns the ns charged to each side and the segment count.
    wire: "csum" (emit and parse with the software checksum), "offload" (emit and parse, the
    checksum left to the NIC as the stack does with the 82540EM's offloads) or "none"."""
    cfg = dict(rcvbuf=262144, sndbuf=262144)
    link, counters = established_pair(cfg_a=TcpConfig(**cfg), cfg_b=TcpConfig(**cfg))
    a, b = link.a, link.b
    ns = {"a_eng": 0, "a_wire": 0, "b_eng": 0, "b_wire": 0}
    side = {id(a): "a", id(b): "b"}
    ends = {id(a): (A_INT, B_INT, b), id(b): (B_INT, A_INT, a)}
    data = memoryview(bytes(range(256)) * (nbytes // 256 + 1))[:nbytes]
    now = link.now
    q: list = []
    n = 0
    sent = got = 0
    data_segs = 0
    hits0 = counters["TcpExtTCPHPHits"], counters["TcpExtTCPHPAcks"]
    while got < nbytes:
        t0 = clock()
        if sent < nbytes and a.writable():  # as a blocked send() waits for POLLOUT
            sent += a.send(data[sent:sent + 65536], now)
        t1 = clock()
        while b.readable():  # as a reader waits for POLLIN
            chunk = b.recv(1 << 20)
            if not chunk:
                break
            got += len(chunk)
        t2 = clock()
        ns["a_eng"] += t1 - t0
        ns["b_eng"] += t2 - t1
        for c in (a, b):
            s = side[id(c)]
            t0 = clock()
            segs = c.segments_to_send(now)
            ns[s + "_eng"] += clock() - t0
            src, dst, peer = ends[id(c)]
            for seg in segs:
                if c is a and seg.payload:
                    data_segs += 1
                if wire != "none":
                    s_, d_ = (src, dst) if wire == "csum" else (None, None)
                    t0 = clock()
                    raw = seg.emit(s_, d_)
                    t1 = clock()
                    seg = TcpSegment.parse(raw, s_, d_)
                    t2 = clock()
                    ns[s + "_wire"] += t1 - t0
                    ns[side[id(peer)] + "_wire"] += t2 - t1
                n += 1
                heapq.heappush(q, (now + MS, n, peer, seg))
        deadlines = [d for d in (a.next_deadline(), b.next_deadline()) if d is not None]
        t_timer = min(deadlines) if deadlines else None
        if q and (t_timer is None or q[0][0] <= t_timer):
            t, _, conn, seg = heapq.heappop(q)
            now = max(now, t)
            t0 = clock()
            conn.segment_arrives(seg, now)
            ns[side[id(conn)] + "_eng"] += clock() - t0
        elif t_timer is not None:
            now = max(now, t_timer)
            for c in (a, b):
                d = c.next_deadline()
                if d is not None and d <= now:
                    t0 = clock()
                    c.timer_expired(now)
                    ns[side[id(c)] + "_eng"] += clock() - t0
        elif sent >= nbytes and not q:
            break
    ns["segs"] = data_segs
    ns["hp_hits"] = counters["TcpExtTCPHPHits"] - hits0[0]
    ns["hp_acks"] = counters["TcpExtTCPHPAcks"] - hits0[1]
    ns["retrans"] = counters["TcpRetransSegs"]
    return ns


VARIANTS = {"full": (False, None), "python": (True, PY_IMPL), "c": (True, C_IMPL)}


def instructions(args) -> None:
    """Instructions per data segment, both sides and the harness together, counted by
    callgrind: the difference between a transfer of --mbytes and one of twice that, divided
    by the difference in segments, so that start-up and set-up cancel. Independent of the
    machine's load (the one figure here that is)."""
    vg = shutil.which("valgrind")
    if vg is None:
        sys.exit("valgrind is not installed")
    print(machine_line())
    print("instructions per data segment (callgrind; both sides + the harness loop; "
          f"marginal between {args.mbytes:g} and {2 * args.mbytes:g} MB)")
    variants = ["full", "python"] + (["c"] if C_IMPL is not None else [])
    with tempfile.TemporaryDirectory() as tmp:
        for wire in args.wire.split(","):
            for v in variants:
                counts = []
                for mb in (args.mbytes, 2 * args.mbytes):
                    out = os.path.join(tmp, "cg.out")
                    r = subprocess.run([vg, "--tool=callgrind", f"--callgrind-out-file={out}",
                                        sys.executable, __file__, "--mbytes", str(mb), "--one", v, wire],
                                       capture_output=True, text=True, check=True)
                    segs = int(r.stdout.split()[-1])
                    with open(out) as f:
                        ir = next(int(line.split()[1]) for line in f if line.startswith("summary:"))
                    counts.append((segs, ir))
                (s1, i1), (s2, i2) = counts
                print(f"  {wire:8s} {v:7s} {(i2 - i1) / (s2 - s1):9.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mbytes", type=float, default=10)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-wire", default="offload", choices=("csum", "offload", "none"))
    ap.add_argument("--wire", default="csum,offload,none", help="rows: csum, offload, none")
    ap.add_argument("--instructions", action="store_true",
                    help="count instructions under valgrind's callgrind instead (load-proof, slow)")
    ap.add_argument("--one", nargs=2, metavar=("VARIANT", "WIRE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    nbytes = int(args.mbytes * 1e6)
    if args.one:
        v = VARIANTS[args.one[0]]
        use(v[0], v[1])
        print("segs", transfer(nbytes, args.one[1])["segs"])
        return
    if args.instructions:
        instructions(args)
        return
    print(machine_line())
    print("note: the machine is shared with other work; figures are CPU-bound wall time per call")
    print(f"engine common path: {fast_path_kind()} (NICEMU_PY_TCP=1 forces the Python twin)")
    if args.profile:
        pr = cProfile.Profile()
        pr.enable()
        transfer(nbytes, args.profile_wire)
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)
        return
    labels = {"csum": "emit/parse included, software checksum",
              "offload": "emit/parse included, checksum offloaded (as the stack with the 82540EM)",
              "none": "emit/parse excluded"}
    variants = {"full path": VARIANTS["full"], "fast, Python twin": VARIANTS["python"]}
    if C_IMPL is not None:
        variants["fast, C (_fast.pyx)"] = VARIANTS["c"]
    for wire in args.wire.split(","):
        # the variants run interleaved, repeat after repeat, so that a changing load falls
        # on all of them alike
        rows = {v: collections.defaultdict(list) for v in variants}
        info = {}
        for _ in range(args.repeat):
            for v, (fast, impl) in variants.items():
                use(fast, impl)
                rd0, c0 = run_delay_ns(), time.thread_time_ns()
                r = transfer(nbytes, wire)
                segs = r["segs"]
                rows[v]["cpu"].append((time.thread_time_ns() - c0) / segs / 1000)
                rows[v]["delay"].append((run_delay_ns() - rd0) / 1e6)
                for s in ("a", "b"):
                    rows[v][s].append((r[s + "_eng"] + r[s + "_wire"]) / segs / 1000)
                info[v] = r
        use(True, C_IMPL or PY_IMPL)
        print(f"\n{args.mbytes:g} MB A->B, {r['segs']} data segments, {labels[wire]}")
        for v in variants:
            i = info[v]
            print(f"  {v}: header prediction hits {i['hp_hits']} data, {i['hp_acks']} ACKs; "
                  f"retransmissions {i['retrans']}; ms waiting for a CPU per run "
                  f"{spread(rows[v]['delay'], '{:.0f}')}")
            for s, name in (("a", "sender"), ("b", "receiver")):
                us = rows[v][s]
                print(f"    {name:8s} µs/segment {spread(us, '{:.1f}')}   segments/s "
                      f"{spread([1e6 / u for u in us], '{:.0f}')}")
            print(f"    thread CPU of the whole run (both sides + harness) µs/segment "
                  f"{spread(rows[v]['cpu'], '{:.1f}')}")
    print("\ntarget: 12 µs/segment per side (83k segments/s, 1 Gbit/s at MTU 1500)")
    print(machine_line())


if __name__ == "__main__":
    main()
