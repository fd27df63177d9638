"""kstack TCP figures: bulk goodput between two emulated NICs through kstack on both sides, a
request/response latency, and what each byte costs, beside Python over the real Linux kernel's
TCP on loopback in the same run.

    python benchmarks/bench_kstack_tcp.py [--mbytes 30] [--repeat 3] [--rounds 1000] [--quick]

Set-up, all real processes (bench_kstack.Lab): one emulator (`nicemu serve --pair`, two
82540EMs back to back, 1500-byte MTU), kernel A (198.18.0.1) and kernel B (198.18.0.2), each
`python -m kstack.kernel` driving its device in NAPI mode (--itr, dynamic by default).

1. Bulk goodput: `kstack.apps.tcp_bulk send` on A -> `tcp_bulk sink` on B, --mbytes per
   repetition, SHA-256 checked end to end. The window starts at the sender's first interval
   line (0.5 s in: start-up and the first round trips of slow start are outside it) and ends
   when the sender is done (the sink's EOF); goodput is the bytes copied to the sink
   (kernel B's copy_to_user) over the window. Beside it, in the same run and interleaved,
   benchmarks/linux_tcp.py bulk: a Python sender process and a Python sink process doing the
   same work (the seeded stream, SHA-256 both ends, 64 KiB calls) over the Linux kernel's TCP
   on loopback, with loopback's own MSS and with TCP_MAXSEG 1460 (kstack's segment size).
   Target: 1 Gbit/s, the 82540EM's line rate.
2. Request/response latency: one 32-byte request at a time (TCP_NODELAY), a client process on
   A, kstack.apps.tcp_echo on B: p50/p99 round trip; Linux: linux_tcp.py pingpong (client and
   echo processes on loopback).
3. Per-byte costs of the bulk window: bytes copied per byte of goodput (copy_from_user on A,
   the drivers' TX and RX copies, copy_to_user on B; the TCP engine's own copies into and out
   of its send queue are not counted by anything), syscalls per MB (the kernels' records and
   the applications' library calls), segments per ACK (B's wire segments in,
   TcpInSegs with GRO's merged ones counted, / TcpOutSegs; Linux: the sink socket's TCP_INFO),
   GRO's merging (B's gro_* counters), GSO's splitting (A's gso_*; NICEMU_GRO=0 / NICEMU_GSO=0
   in the environment turn them off in both kernels, NICEMU_PY_GRO=1 / NICEMU_PY_GSO=1 run
   the Python twins of the compiled kstack/_gro.pyx and _gso.pyx), retransmissions, NAPI polls, and CPU ns per KB of each process
   from /proc/PID/schedstat with its run-queue wait.

Every figure is repeated --repeat times: median (min-max, n). The machine line (CPUs, load) is
printed at the start and at the end: the machine is shared (2 cores, other work running), so
read every figure with its load and the run-queue wait printed beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import machine_line, run_json, run_main  # noqa: E402
from bench_kstack import IP_B, Costs, Lab, _delta, _dev, fmt_num, idle_cpu, print_cpu_shares, sp  # noqa: E402
from kstack import gro as _gro, gso as _gso  # noqa: E402  (the kernels choose as this process does)
from kstack.apps.tcp_bulk import stream_sha256  # noqa: E402

TARGET_MBPS = 1000.0  # the 82540EM's line rate
PAYLOAD = 32

# One request at a time over kstack.socket TCP, its own process: ROUNDS round trips after a
# warm-up; one JSON line with the round trips (us) and its own costs.
TCP_PING_CLIENT = textwrap.dedent(
    """
    import json, sys, time
    from kstack import socket as ks
    path, host, port, rounds, payload = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    ks.connect_kernel(path)
    s = ks.socket(ks.AF_INET, ks.SOCK_STREAM)
    s.settimeout(5.0)
    s.setsockopt(ks.IPPROTO_TCP, ks.TCP_NODELAY, 1)
    s.connect((host, port))
    data = b"q" * payload
    def once():
        s.sendall(data)
        n = 0
        while n < payload:
            b = s.recv(65536)
            if not b:
                raise ConnectionError("EOF")
            n += len(b)
    for _ in range(200):
        once()
    c0 = ks.costs()
    rtts = []
    pc = time.perf_counter_ns
    for _ in range(rounds):
        t = pc()
        once()
        rtts.append((pc() - t) / 1000)
    c1 = ks.costs()
    s.close()
    rtts.sort()
    n = len(rtts)
    print(json.dumps({"rounds": n, "p50_us": rtts[n // 2], "p99_us": rtts[min(n - 1, int(n * 0.99))],
                      "cpu_ns_per_rtt": (c1["cpu_ns"] - c0["cpu_ns"]) / n,
                      "ctx_per_rtt": (c1["context_switches"] - c0["context_switches"]) / n,
                      "syscalls_per_rtt": (c1["syscalls"] - c0["syscalls"]) / n}), flush=True)
    """
)


def linux_tcp(what: str, *args: str) -> dict:
    return run_json("linux_tcp.py", what, *args)


# --- 1 and 3: bulk and its costs -------------------------------------------------------------------

def kstack_bulk(lab: Lab, nbytes: int, port: int, seed: int) -> dict:
    sink = lab.app("kstack.apps.tcp_bulk", "sink", "--port", str(port), "-i", "0", "--timeout", "60",
                   "--kernel", lab.kb_sock, name="tcp_bulk-sink")
    sink.line(lambda ln: ln.startswith("tcp_bulk: listening"))
    send = lab.app("kstack.apps.tcp_bulk", "send", IP_B, "--port", str(port), "--bytes", str(nbytes),
                   "--seed", str(seed), "-i", "0.5", "--timeout", "60", "--kernel", lab.ka_sock,
                   name="tcp_bulk-send")
    timeout = 60 + nbytes / 200_000  # 1.6 Mbit/s at the least: never a hang
    first = send.line(lambda ln: ln.startswith("[send]") or ln.startswith("{"), timeout=timeout)
    whole = first.startswith("{")  # done before its first interval line: the whole run is the window
    pids = {"emulator": lab.emu.pid, "kernel A": lab.ka.pid, "kernel B": lab.kb.pid,
            "tcp_bulk send": send.pid, "tcp_bulk sink": sink.pid}
    a0, b0 = lab.ka.stats(), lab.kb.stats()
    costs = Costs(pids)
    send_rep = json.loads(first) if whole else send.json(lambda d: d.get("app") == "tcp_bulk", timeout=timeout)
    proc = costs.stop()
    a1, b1 = lab.ka.stats(), lab.kb.stats()
    sink_rep = sink.json(lambda d: d.get("app") == "tcp_bulk", timeout=60)
    send.p.wait(10)
    sink.p.wait(10)
    if send_rep.get("error") or sink_rep["bytes"] != nbytes or sink_rep["sha256"] != stream_sha256(seed, nbytes):
        raise RuntimeError(f"tcp_bulk transfer failed: sender {send_rep}, sink {sink_rep}")
    window = costs.seconds
    got = _delta(b0, b1, "syscall", "bytes_copied_out")
    if whole or got <= 0:
        got, window = nbytes, send_rep["seconds"]
    mb, kb = got / 1e6, got / 1e3
    da = {k: _delta(_dev(a0), _dev(a1), k) for k in _dev(a1) if isinstance(_dev(a1)[k], (int, float))}
    db = {k: _delta(_dev(b0), _dev(b1), k) for k in _dev(b1) if isinstance(_dev(b1)[k], (int, float))}
    tcp = {f"{side}:{k}": _delta(x0, x1, "snmp", k) for side, x0, x1 in (("A", a0, a1), ("B", b0, b1))
           for k in ("TcpInSegs", "TcpOutSegs", "TcpRetransSegs")}
    copies = {
        "copy_from_user (A)": _delta(a0, a1, "syscall", "bytes_copied_in"),
        "driver TX copy (A: sk_buff -> DMA)": da.get("tx_copied_bytes", 0),
        "driver RX copy (B: DMA -> sk_buff)": db.get("rx_copied_bytes", 0),
        "copy_to_user (B)": got,
        "sk_buff copies (A and B)": _delta(a0, a1, "skb", "skb_bytes_copied") + _delta(b0, b1, "skb", "skb_bytes_copied"),
    }
    per = {f"bytes copied per byte: {k}": v / got for k, v in copies.items()}
    per["bytes copied per byte: all counted"] = sum(copies.values()) / got
    per["syscalls per MB: kernel A (records handled)"] = _delta(a0, a1, "syscall", "syscalls_total") / mb
    per["syscalls per MB: kernel B (records handled)"] = _delta(b0, b1, "syscall", "syscalls_total") / mb
    sc, kc = send_rep["costs"], sink_rep["costs"]
    per["syscalls per MB: sender library (whole run)"] = sc["syscalls"] / (nbytes / 1e6)
    per["syscalls per MB: sink library (whole run)"] = kc["syscalls"] / (nbytes / 1e6)
    # GRO (kstack.gro) on B: TcpInSegs counts sk_buffs as Linux's MIB does; the wire segments
    # are the sk_buffs plus what GRO merged into them (tcp_info's segs_in, as Linux's column)
    gro = {k: _delta(b0, b1, "devices", "eth0", "netdev", k)
           for k in ("gro_packets", "gro_wire_packets", "gro_normal", "gro_held")}
    wire_in = tcp["B:TcpInSegs"] - gro["gro_packets"] + gro["gro_wire_packets"]
    per["segments per ACK (B: wire segments in / out)"] = wire_in / max(tcp["B:TcpOutSegs"], 1)
    per["sk_buffs per ACK (B: TcpInSegs / TcpOutSegs)"] = tcp["B:TcpInSegs"] / max(tcp["B:TcpOutSegs"], 1)
    per["GRO: wire segments per merged sk_buff (B)"] = gro["gro_wire_packets"] / max(gro["gro_packets"], 1)
    per["GRO: share of segments merged (B)"] = gro["gro_wire_packets"] / max(wire_in, 1)
    gso = {k: _delta(a0, a1, "devices", "eth0", "netdev", k) for k in ("gso_packets", "gso_wire_packets")}
    per["GSO: wire segments per GSO segment (A)"] = gso["gso_wire_packets"] / max(gso["gso_packets"], 1)
    per["GSO: share of data segments sent as GSO (A)"] = gso["gso_wire_packets"] / max(tcp["A:TcpOutSegs"], 1)
    per["data segments per MB (A out)"] = tcp["A:TcpOutSegs"] / mb
    per["retransmitted segments per MB (A)"] = tcp["A:TcpRetransSegs"] / mb
    per["NAPI polls per MB (B)"] = db.get("polls", 0) / mb
    per["interrupts per MB (A + B)"] = (da.get("interrupts", 0) + db.get("interrupts", 0)) / mb
    per["eventfd wake-ups per MB (A + B, to apps)"] = (_delta(a0, a1, "syscall", "wakeups_sent")
                                                       + _delta(b0, b1, "syscall", "wakeups_sent")) / mb
    for k, (c, s) in proc.items():
        per[f"CPU ns per KB: {k}"] = c / kb
    per["CPU ns per KB: all five"] = sum(c for c, _ in proc.values()) / kb
    for k, (c, s) in proc.items():
        per[f"context switches per MB: {k}"] = s / mb
    return {
        "goodput_mbps": got * 8 / window / 1e6, "window": window, "bytes": got,
        "sender_goodput_mbps": send_rep["goodput_mbps"], "sink_goodput_mbps": sink_rep["goodput_mbps"],
        "cpu_util": {k: c / 1e9 / window for k, (c, _) in proc.items()},
        "run_delay": {k: v / 1e9 / window for k, v in costs.run_delay.items()},
        # goodput if each process had a CPU of its own: the busiest one's CPU per byte
        "ceiling_mbps": 8e6 / max(per[f"CPU ns per KB: {k}"] for k in proc),
        "busiest": max(proc, key=lambda k: proc[k][0]), "per": per,
    }


# --- 2: request/response ---------------------------------------------------------------------------

def kstack_pingpong(lab: Lab, rounds: int, port: int) -> dict:
    echo = lab.app("kstack.apps.tcp_echo", "--port", str(port), "--kernel", lab.kb_sock, name="tcp_echo")
    echo.line(lambda ln: ln.startswith("tcp_echo: listening"))
    try:
        c = lab.start([sys.executable, "-c", TCP_PING_CLIENT, lab.ka_sock, IP_B, str(port), str(rounds),
                       str(PAYLOAD)], "tcp-ping-client")
        out = c.json(lambda d: "p50_us" in d, timeout=60 + rounds * 0.02)
        c.p.wait(10)
        return out
    finally:
        echo.stop()


# --- main ------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mbytes", type=float, default=30.0, help="MB (10^6 bytes) per bulk transfer")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions of every figure")
    ap.add_argument("--rounds", type=int, default=1000, help="request/response round trips per repetition")
    ap.add_argument("--itr", default="dynamic", help="interrupt moderation of both devices (itr=)")
    ap.add_argument("--quick", action="store_true", help="10 MB, 2 repetitions, 300 rounds")
    args = ap.parse_args()
    if args.quick:
        args.mbytes, args.repeat, args.rounds = 10.0, 2, 300
    nbytes = int(args.mbytes * 1e6)

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    print(f"bench_kstack_tcp: TCP bulk {args.mbytes:g} MB per transfer, NAPI, 1500-byte MTU, "
          f"{args.repeat} repetitions; request/response {PAYLOAD} bytes, {args.rounds} rounds")
    print(machine_line())
    print(f"  GRO/GSO: {'on' if os.environ.get('NICEMU_GRO') != '0' else 'off'}/"
          f"{'on' if os.environ.get('NICEMU_GSO') != '0' else 'off'}, implementation {_gro.KIND}/{_gso.KIND} "
          "(NICEMU_GRO=0 / NICEMU_GSO=0 turn them off; NICEMU_PY_GRO=1 / NICEMU_PY_GSO=1 force the Python twins)")
    print("  the machine is shared with other work (tests, other sessions' benchmarks) while this runs: "
          "the load average above and below, and each process's run-queue wait, are part of every figure")

    kb_rows: list[dict] = []
    lin_rows: list[dict] = []
    lin_1460: list[dict] = []
    kpp: list[dict] = []
    lab = Lab()
    try:
        lab.up("napi", args.itr)
        time.sleep(0.3)
        idle = idle_cpu({"emulator": lab.emu.pid, "kernel A": lab.ka.pid, "kernel B": lab.kb.pid})
        port = 5100
        for i in range(args.repeat):
            port += 1
            kb_rows.append(kstack_bulk(lab, nbytes, port, seed=100 + i))
            lin_rows.append(linux_tcp("bulk", "--mbytes", str(args.mbytes)))
            lin_1460.append(linux_tcp("bulk", "--mbytes", str(args.mbytes), "--mss", "1460"))
            print(f"  [run {i + 1}: kstack {kb_rows[-1]['goodput_mbps']:.1f} Mbit/s, Linux loopback "
                  f"{lin_rows[-1]['goodput_mbps']:.0f}, Linux MSS 1460 {lin_1460[-1]['goodput_mbps']:.0f}]",
                  flush=True)
        for i in range(args.repeat):
            port += 1
            kpp.append(kstack_pingpong(lab, args.rounds, port))
    finally:
        lab.close()
    lin_pp = [linux_tcp("pingpong", "--payload", str(PAYLOAD), "--rounds", str(args.rounds))
              for _ in range(args.repeat)]

    print()
    print("processes with no traffic (fraction of a CPU over 0.5 s): "
          + ", ".join(f"{k} {v:.3f}" for k, v in idle.items()) + f"; cores: {os.cpu_count()}")

    print()
    print("1. TCP bulk goodput, one connection, application to application: median (min-max, n)")
    print(f"  kstack NAPI (itr={args.itr}), tcp_bulk send on A -> tcp_bulk sink on B, 1500-byte MTU:")
    print(f"    goodput in the window:          {sp([r['goodput_mbps'] for r in kb_rows])} Mbit/s "
          f"(window {sp([r['window'] for r in kb_rows])} s)")
    if statistics.median([r["window"] for r in kb_rows]) < 1.0:
        print("    (a window under 1 s: start-up and the machine's other work weigh on every figure; "
              "--mbytes 150 gives a window of several seconds)")
    print(f"    sender's own report (whole run): {sp([r['sender_goodput_mbps'] for r in kb_rows])} Mbit/s; "
          f"sink's {sp([r['sink_goodput_mbps'] for r in kb_rows])} Mbit/s")
    print_cpu_shares(kb_rows)
    print(f"    if each process had a CPU of its own (the busiest process's CPU per byte): "
          f"{sp([r['ceiling_mbps'] for r in kb_rows])} Mbit/s; busiest: "
          f"{', '.join(sorted({r['busiest'] for r in kb_rows}))}")
    for title, rows in (("Linux TCP on loopback (MSS ~64 KiB), Python sender -> Python sink", lin_rows),
                        ("Linux TCP on loopback, TCP_MAXSEG 1460", lin_1460)):
        print(f"  {title}:")
        print(f"    goodput:                        {sp([r['goodput_mbps'] for r in rows])} Mbit/s; "
              f"SHA-256 matched in {sum(r['sha_ok'] for r in rows)}/{len(rows)}")
        print(f"    CPU used: sender {statistics.median([r['sender_cpu_frac'] for r in rows]):.2f}, sink "
              f"{statistics.median([r['sink_cpu_frac'] for r in rows]):.2f}; waited for a CPU: sender "
              f"{statistics.median([r['sender_run_delay_frac'] for r in rows]):.2f}, sink "
              f"{statistics.median([r['sink_run_delay_frac'] for r in rows]):.2f}")
        ceil = [8e6 / max(r["sender_cpu_ns_per_kb"], r["sink_cpu_ns_per_kb"]) for r in rows]
        print(f"    if each process had a CPU of its own: {sp(ceil)} Mbit/s")
    ratios = [k["goodput_mbps"] / l["goodput_mbps"] for k, l in zip(kb_rows, lin_1460) if l["goodput_mbps"]]
    print(f"  ratio kstack / Linux (MSS 1460), per paired run: {sp(ratios)}")

    print()
    print(f"2. Request/response round trip, {PAYLOAD} bytes one at a time, TCP_NODELAY, "
          f"{args.rounds} rounds per repetition (us)")
    print(f"  {'':52s} {'p50':>28s} {'p99':>28s}")
    for title, rows in (("kstack NAPI: client on A, tcp_echo on B", kpp),
                        ("Linux TCP on loopback (two Python processes)", lin_pp)):
        print(f"  {title:52s} {sp([r['p50_us'] for r in rows]):>28s} {sp([r['p99_us'] for r in rows]):>28s}")
    print(f"  kstack client: CPU {sp([r['cpu_ns_per_rtt'] for r in kpp])} ns, context switches "
          f"{sp([r['ctx_per_rtt'] for r in kpp])}, library syscalls {sp([r['syscalls_per_rtt'] for r in kpp])} "
          f"per round trip")
    print(f"  Linux client:  CPU {sp([r['cpu_ns_per_rtt_client'] for r in lin_pp])} ns, context switches "
          f"{sp([r['ctx_per_rtt_client'] for r in lin_pp])} per round trip")

    print()
    print("3. Per-byte costs of the bulk window (per byte / MB / KB of goodput)")
    cols = ["kstack napi", "Linux MSS 1460", "Linux loopback"]
    print(f"  {'':58s}" + "".join(f"{c:>28s}" for c in cols))
    lin_map = {"syscalls per MB: sender library (whole run)": "sender_syscalls_per_mb",
               "syscalls per MB: sink library (whole run)": "sink_syscalls_per_mb",
               "segments per ACK (B: wire segments in / out)": "segments_per_ack",
               "CPU ns per KB: tcp_bulk send": "sender_cpu_ns_per_kb",
               "CPU ns per KB: tcp_bulk sink": "sink_cpu_ns_per_kb",
               "context switches per MB: tcp_bulk send": "sender_ctx_per_mb",
               "context switches per MB: tcp_bulk sink": "sink_ctx_per_mb"}
    for k in kb_rows[0]["per"]:
        cells = [sp([r["per"][k] for r in kb_rows])]
        lk = lin_map.get(k)
        for rows in (lin_1460, lin_rows):
            cells.append(sp([r[lk] for r in rows]) if lk else "-")
        print(f"  {k:58s}" + "".join(f"{c:>28s}" for c in cells))
    print("  Linux: the sender and sink are the two Python processes (their rows); the kernel's work is "
          "inside their CPU time (system time); its syscalls are one send(2) or recv(2) per 64 KiB call; "
          "segments per ACK from the sink's TCP_INFO (loopback coalesces, so ACKs are per super-packet)")

    print()
    print("verdict")
    g = statistics.median([r["goodput_mbps"] for r in kb_rows])
    c = statistics.median([r["ceiling_mbps"] for r in kb_rows])
    print(f"  TCP bulk goodput >= {TARGET_MBPS:.0f} Mbit/s (the 82540EM's line rate): "
          f"{'met' if g >= TARGET_MBPS else 'NOT met'} (kstack {g:.1f} Mbit/s, {g / TARGET_MBPS:.1%} of the "
          f"target; {fmt_num(c)} Mbit/s if each process had a core; Linux on loopback in the same run "
          f"{statistics.median([r['goodput_mbps'] for r in lin_1460]):.0f} Mbit/s with MSS 1460, "
          f"{statistics.median([r['goodput_mbps'] for r in lin_rows]):.0f} with loopback's)")
    print(f"  request/response p50/p99 printed for kstack and Linux: done (kstack p50 "
          f"{statistics.median([r['p50_us'] for r in kpp]):.0f} us, Linux "
          f"{statistics.median([r['p50_us'] for r in lin_pp]):.0f} us; no target in the issue)")
    print(machine_line())
    return 0


if __name__ == "__main__":
    run_main(main)
