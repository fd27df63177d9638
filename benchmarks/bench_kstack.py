"""kstack figures: UDP receive rate through the whole modeled kernel, ping-pong latency, and
what each packet costs, beside Python over the real Linux kernel in the same run.

    python benchmarks/bench_kstack.py [--seconds 3] [--repeat 3] [--quick] [--modes napi,interrupt]

Set-up, all real processes: one emulator (`nicemu serve --pair`, two 82540EMs back to back),
kernel A (`python -m kstack.kernel`, 198.18.0.1, the sender's) and kernel B (198.18.0.2, the
receiver's), each driving one device in NAPI mode with dynamic interrupt moderation (Linux's
default InterruptThrottleRate), and interrupt mode as a second row; `kstack.apps.udp_send` on
A and `kstack.apps.udp_sink` on B, each its own process.

1. Receive rate: 18-byte UDP payloads (64-byte frames with the FCS) as fast as udp_send
   sends them; the figure is datagrams/s the sink application received, counted by kernel B
   (UdpInDatagrams: counted when the datagram is copied to the application) between two stats
   snapshots taken after a warm-up, so that start-up and tail are outside the window. Beside
   it, in the same run, benchmarks/linux_udp.py rate: a Python sender process and a Python
   receiver process over the real kernel's UDP on loopback, same payload. Target: kstack >=
   0.5 x Linux.
2. Ping-pong: one 18-byte datagram at a time, a client process on A, kstack.apps.udp_echo on
   B: p50/p99 round trip. Beside it the PMD ping-pong through the same kind of emulator
   (bench_pmd.ping_pong: one process busy-polling both ports) and Linux UDP on loopback
   (linux_udp.py pingpong: the same two-process structure).
3. Per-packet costs of the kstack receive run (the same window): interrupts, NAPI polls,
   syscalls (the application's library count and the kernel's), bytes copied (copy_from_user,
   copy_to_user, the drivers' DMA copies, sk_buff copies), sk_buff allocations and frees,
   context switches and CPU ns of each process from /proc/PID/schedstat and /proc/PID/status;
   Linux's where they can be had (CPU ns and context switches of its two processes; one
   syscall per datagram on each side).

Every figure is repeated --repeat times: median (min-max, n). The machine line (CPUs, load)
is printed at the start and at the end; the machine may be shared, so read the figures with
its load. No process here busy-polls except the PMD ping-pong's one; the idle CPU of each
kstack process is measured before traffic and printed. Set KSTACK_PROFILE=PREFIX to have the
kernel processes write cProfile statistics (CPU time) to PREFIX.PID.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import cpu_ns, ctx_switches, machine_line, pdeathsig_preexec, run_delay_ns, run_json, run_main  # noqa: E402

MAC0, MAC1 = "52:54:00:12:34:56", "52:54:00:12:34:57"
IP_A, IP_B = "198.18.0.1", "198.18.0.2"
PAYLOAD = 18  # 14 Ethernet + 20 IP + 8 UDP + 18 + 4 FCS = 64 bytes on the wire
RATE_TARGET = 0.5  # kstack receive rate / Linux receive rate
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}

# A UDP ping-pong client over kstack.socket, its own process: ROUNDS round trips of one
# datagram after a warm-up; one JSON line with the round trips (us) and its own costs.
PING_CLIENT = textwrap.dedent(
    """
    import json, sys, time
    from kstack import socket as ks
    path, host, port, rounds, payload = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    ks.connect_kernel(path)
    s = ks.socket(ks.AF_INET, ks.SOCK_DGRAM)
    s.connect((host, port))
    s.settimeout(2.0)
    data = b"p" * payload
    lost = 0
    for _ in range(100):
        s.send(data)
        try:
            s.recv(2048)
        except TimeoutError:
            lost += 1
    c0 = ks.costs()
    rtts = []
    pc = time.perf_counter_ns
    for _ in range(rounds):
        t = pc()
        s.send(data)
        try:
            s.recv(2048)
        except TimeoutError:
            lost += 1
            continue
        rtts.append((pc() - t) / 1000)
    c1 = ks.costs()
    s.close()
    rtts.sort()
    n = len(rtts)
    print(json.dumps({"rounds": n, "lost": lost,
                      "p50_us": rtts[n // 2] if n else None,
                      "p99_us": rtts[min(n - 1, int(n * 0.99))] if n else None,
                      "cpu_ns_per_rtt": (c1["cpu_ns"] - c0["cpu_ns"]) / max(n, 1),
                      "ctx_per_rtt": (c1["context_switches"] - c0["context_switches"]) / max(n, 1),
                      "syscalls_per_rtt": (c1["syscalls"] - c0["syscalls"]) / max(n, 1)}), flush=True)
    """
)


# --- processes ------------------------------------------------------------------------------------

class Proc:
    """A child process whose stdout lines are collected by a thread; stopped with SIGTERM,
    then SIGKILL, whatever happens."""

    def __init__(self, args: list[str], name: str, env: dict | None = None) -> None:
        self.name = name
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env or ENV, cwd=ROOT, preexec_fn=pdeathsig_preexec())  # dies with us
        self.pid = self.p.pid
        self.q: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.err: list[str] = []
        threading.Thread(target=self._read, args=(self.p.stdout, self.q), daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    @staticmethod
    def _read(f, q) -> None:
        for line in f:
            q.put(line.rstrip("\n"))

    def _read_err(self) -> None:
        for line in self.p.stderr:
            self.err.append(line.rstrip("\n"))

    def line(self, pred: Callable[[str], bool], timeout: float = 30.0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                ln = self.q.get(timeout=0.2)
            except queue.Empty:
                if self.p.poll() is not None and self.q.empty():
                    break
                continue
            self.seen.append(ln)
            if pred(ln):
                return ln
        raise RuntimeError(f"{self.name}: no expected line (exit {self.p.poll()}); "
                           f"stderr: {' | '.join(self.err[-5:])}")

    def json(self, pred: Callable[[dict], bool], timeout: float = 30.0) -> dict:
        def ok(ln: str) -> bool:
            if not ln.startswith("{"):
                return False
            try:
                return pred(json.loads(ln))
            except ValueError:
                return False
        return json.loads(self.line(ok, timeout))

    def event(self, name: str, timeout: float = 30.0) -> dict:
        return self.json(lambda d: d.get("event") == name, timeout)

    def stats(self) -> dict:
        self.p.send_signal(signal.SIGUSR1)
        return self.event("stats")

    def stop(self, timeout: float = 10.0) -> None:
        if self.p.poll() is None:
            try:
                self.p.send_signal(signal.SIGTERM)
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
            except ProcessLookupError:
                pass


class Lab:
    """One emulator pair and kernels A and B on it; every process is stopped by close()."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bench-kstack-"))
        self.procs: list[Proc] = []

    def start(self, args: list[str], name: str, env: dict | None = None) -> Proc:
        p = Proc(args, name, env)
        self.procs.append(p)
        return p

    def up(self, mode: str, itr: str, doorbell_page: bool = False) -> None:
        a, b = str(self.dir / "a.sock"), str(self.dir / "b.sock")
        self.emu = self.start([sys.executable, "-m", "nicemu", "serve", "--socket", a, "--mac", MAC0,
                               "--socket", b, "--mac", MAC1, "--pair"], "emulator")
        self.emu.line(lambda ln: ln == "nicemu: ready")
        self.ka_sock, self.kb_sock = str(self.dir / "ka.sock"), str(self.dir / "kb.sock")
        dev = f"mode={mode},itr={itr}" + (",doorbell_page=on" if doorbell_page else "")
        self.ka = self.start([sys.executable, "-m", "kstack.kernel", "--device", f"{a},name=eth0,{dev}",
                              "--addr", f"eth0={IP_A}/24", "--syscall-socket", self.ka_sock], "kernel-a")
        self.kb = self.start([sys.executable, "-m", "kstack.kernel", "--device", f"{b},name=eth0,{dev}",
                              "--addr", f"eth0={IP_B}/24", "--syscall-socket", self.kb_sock], "kernel-b")
        self.ka.event("up")
        self.kb.event("up")

    def app(self, module: str, *args: str, name: str) -> Proc:
        return self.start([sys.executable, "-m", module, *args], name)

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Costs:
    """CPU ns (schedstat), context switches and run-queue wait ns (schedstat: runnable, no
    CPU free) of a set of processes between two readings."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.t0 = time.perf_counter()
        self.c0 = {k: self._read(p) for k, p in pids.items()}

    @staticmethod
    def _read(pid: int) -> tuple[int, int, int]:
        return cpu_ns(pid), ctx_switches(pid), run_delay_ns(pid)

    def stop(self) -> dict[str, tuple[int, int]]:
        c1 = {k: self._read(p) for k, p in self.pids.items()}
        self.seconds = time.perf_counter() - self.t0
        self.run_delay = {k: c1[k][2] - self.c0[k][2] for k in self.pids}
        return {k: (c1[k][0] - self.c0[k][0], c1[k][1] - self.c0[k][1]) for k in self.pids}


def idle_cpu(pids: dict[str, int], seconds: float = 0.5) -> dict[str, float]:
    """Fraction of a CPU each process uses with no traffic: a busy-poller shows ~1."""
    c = Costs(pids)
    time.sleep(seconds)
    d = c.stop()
    return {k: v[0] / 1e9 / c.seconds for k, v in d.items()}


# --- 1 and 3: the receive rate and its costs ---------------------------------------------------------

def _dev(st: dict) -> dict:
    return st["ethtool"]["eth0"]


def _delta(a: dict, b: dict, *path: str) -> int:
    for k in path[:-1]:
        a, b = a.get(k, {}), b.get(k, {})
    return b.get(path[-1], 0) - a.get(path[-1], 0)


def kstack_rate(lab: Lab, seconds: float, warmup: float, port: int, payload: int = PAYLOAD,
                batch: int = 1) -> dict:
    """udp_send on A as fast as it goes, udp_sink on B; the window's figures and costs
    (`payload` UDP bytes: the frame is payload + 46 bytes with the FCS). batch > 1: the apps
    use sendmmsg / recvmmsg with that many datagrams per call (--batch)."""
    batch_args = ("--batch", str(batch)) if batch > 1 else ()
    sink = lab.app("kstack.apps.udp_sink", "--port", str(port), "--idle", "1.5", *batch_args,
                   "--duration", str(warmup + seconds + 20), "--kernel", lab.kb_sock, name="udp_sink")
    sink.line(lambda ln: ln.startswith("udp_sink: listening"))
    send = lab.app("kstack.apps.udp_send", IP_B, str(port), "--size", str(payload), "--count", "0",
                   *batch_args,
                   "--duration", str(warmup + seconds + 0.5), "--kernel", lab.ka_sock, name="udp_send")
    time.sleep(warmup)
    pids = {"emulator": lab.emu.pid, "kernel A": lab.ka.pid, "kernel B": lab.kb.pid,
            "udp_send": send.pid, "udp_sink": sink.pid}
    a0, b0 = lab.ka.stats(), lab.kb.stats()
    costs = Costs(pids)
    time.sleep(seconds)
    a1, b1 = lab.ka.stats(), lab.kb.stats()
    proc = costs.stop()
    window = costs.seconds
    send_rep = send.json(lambda d: d.get("app") == "udp_send", timeout=warmup + seconds + 30)
    sink_rep = sink.json(lambda d: d.get("app") == "udp_sink", timeout=60)
    send.p.wait(10)
    sink.p.wait(10)
    got = _delta(b0, b1, "snmp", "UdpInDatagrams")
    sent = _delta(a0, a1, "snmp", "UdpOutDatagrams")
    n = max(got, 1)
    da = {k: _delta(_dev(a0), _dev(a1), k) for k in _dev(a1) if isinstance(_dev(a1)[k], (int, float))}
    db = {k: _delta(_dev(b0), _dev(b1), k) for k in _dev(b1) if isinstance(_dev(b1)[k], (int, float))}
    sa = {k: _delta(a0["syscall"], a1["syscall"], k) for k in ("syscalls_total", "bytes_copied_in",
                                                                "wakeups_sent", "wakeups_suppressed")}
    sb = {k: _delta(b0["syscall"], b1["syscall"], k) for k in ("syscalls_total", "bytes_copied_out",
                                                                "wakeups_sent", "wakeups_suppressed")}
    ska = {k: _delta(a0["skb"], a1["skb"], k) for k in a1["skb"]}
    skb = {k: _delta(b0["skb"], b1["skb"], k) for k in b1["skb"]}
    qa = a1["devices"]["eth0"]["qdisc"]
    sc, kc = send_rep["costs"], sink_rep["costs"]
    per = {
        # the receive side, per datagram the sink received in the window
        "rx interrupts (B)": db["interrupts"] / n,
        "NAPI polls (B)": db["polls"] / n,
        "packets per poll (B)": db["poll_packets"] / max(db["polls"], 1),
        "tx interrupts (A)": da["interrupts"] / n,
        "syscalls, kernel side (B: records handled)": sb["syscalls_total"] / n,
        "syscalls, kernel side (A)": sa["syscalls_total"] / n,
        "syscalls, sink library (whole run)": kc["syscalls"] / max(sink_rep["received"], 1),
        "syscalls, sender library (whole run)": sc["syscalls"] / max(send_rep["sent"], 1),
        "eventfd wake-ups sent (B, to the sink)": sb["wakeups_sent"] / n,
        "eventfd wake-ups sent (A, to the sender)": sa["wakeups_sent"] / n,
        "copy_to_user bytes (B)": sb["bytes_copied_out"] / n,
        "copy_from_user bytes (A)": sa["bytes_copied_in"] / n,
        "driver RX copy bytes (B: DMA -> sk_buff)": db["rx_copied_bytes"] / n,
        "driver TX copy bytes (A: sk_buff -> DMA)": da["tx_copied_bytes"] / n,
        "sk_buff allocs (A)": ska["skb_allocs"] / n,
        "sk_buff frees (A)": ska["skb_frees"] / n,
        "sk_buff allocs (B)": skb["skb_allocs"] / n,
        "sk_buff frees (B)": skb["skb_frees"] / n,
        "RDT doorbells (B)": db["rx_doorbells"] / n,
        "TDT doorbells (A)": da["tx_doorbells"] / n,
    }
    for k, (c, s) in proc.items():
        per[f"CPU ns: {k}"] = c / n
        per[f"context switches: {k}"] = s / n
    per["CPU ns: all five"] = sum(c for c, _ in proc.values()) / n
    return {
        "rate": got / window, "sent_rate": sent / window, "window": window, "received": got, "sent": sent,
        "missed (B: MPC)": db.get("rx_missed_errors", 0), "no buffer (B: RNBC)": db.get("rx_no_buffer_count", 0),
        "qdisc drops (A, whole run)": qa.get("drops", 0),
        "drops": {f"{side}:{k}": v for side, x0, x1 in (("A", a0, a1), ("B", b0, b1))
                  for k in x1["drops"] if (v := x1["drops"][k] - x0["drops"].get(k, 0))},
        "sink rate (its own report)": sink_rep["datagrams_per_s"], "sink lost": sink_rep["lost"],
        "cpu_util": {k: c / 1e9 / window for k, (c, _) in proc.items()},
        "run_delay": {k: v / 1e9 / window for k, v in costs.run_delay.items()},
        # datagrams/s if each process had a CPU of its own: the busiest one's CPU per datagram
        "ceiling": 1e9 / max(per[f"CPU ns: {k}"] for k in proc) if got else 0.0,
        "busiest": max(proc, key=lambda k: proc[k][0]), "per": per,
    }


def linux_run(what: str, *args: str) -> dict:
    return run_json("linux_udp.py", what, "--payload", str(PAYLOAD), *args)


# --- 2: ping-pong ---------------------------------------------------------------------------------

def kstack_pingpong(lab: Lab, rounds: int, port: int, payload: int = PAYLOAD) -> dict:
    echo = lab.app("kstack.apps.udp_echo", "--port", str(port), "--kernel", lab.kb_sock, name="udp_echo")
    echo.line(lambda ln: ln.startswith("udp_echo: listening"))
    try:
        costs = Costs({"emulator": lab.emu.pid, "kernel A": lab.ka.pid, "kernel B": lab.kb.pid,
                       "udp_echo": echo.pid})
        c = lab.start([sys.executable, "-c", PING_CLIENT, lab.ka_sock, IP_B, str(port), str(rounds),
                       str(payload)], "ping-client")
        out = c.json(lambda d: "p50_us" in d, timeout=60 + rounds * 0.01)
        costs.stop()
        # whole client run (start-up and 100 warm-up rounds included): an upper bound
        out["run_delay_us_per_rtt"] = sum(costs.run_delay.values()) / 1000 / (rounds + 100)
        c.p.wait(10)
        return out
    finally:
        echo.stop()


def pmd_pingpong(rounds: int) -> dict:
    """bench_pmd's own ping-pong (one process busy-polls both PMDs) over an emulator pair."""
    import bench_pmd

    pair = bench_pmd.EmulatorPair()
    try:
        r = bench_pmd.ping_pong(pair, rounds, 60)  # 60 bytes in the buffer: 64 on the wire
    finally:
        pair.close()
    return {"p50_us": r["p50"], "p99_us": r["p99"]}


# --- printing -------------------------------------------------------------------------------------

def fmt_num(v: float) -> str:
    if v != v:
        return "-"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    if abs(v) >= 0.1:
        return f"{v:.2f}"
    return f"{v:.4f}"


def sp(values: list[float]) -> str:
    """median (min-max, n) with a number format that suits the size."""
    if not values:
        return "-"
    med = statistics.median(values)
    return f"{fmt_num(med)} ({fmt_num(min(values))}-{fmt_num(max(values))}, n={len(values)})"


def print_cpu_shares(rows: list[dict]) -> None:
    """Each process's CPU use and run-queue wait, fractions of the window (medians of the runs)."""
    util = {k: [r["cpu_util"][k] for r in rows] for k in rows[0]["cpu_util"]}
    wait = {k: [r["run_delay"][k] for r in rows] for k in rows[0]["run_delay"]}
    print("    CPU used, fraction of one CPU (median): " + ", ".join(
        f"{k} {statistics.median(v):.2f}" for k, v in util.items()))
    print("    waited for a CPU (run-queue delay, fraction of the window): " + ", ".join(
        f"{k} {statistics.median(v):.2f}" for k, v in wait.items()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="measured window of each rate run")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions of every figure")
    ap.add_argument("--rounds", type=int, default=2000, help="ping-pong round trips per repetition")
    ap.add_argument("--modes", default="napi,interrupt", help="kernel driver modes for the rate rows")
    ap.add_argument("--itr", default="dynamic", help="interrupt moderation of both devices (itr=)")
    ap.add_argument("--quick", action="store_true", help="1 s windows, 2 repetitions, 500 rounds, NAPI only")
    ap.add_argument("--batch", type=int, default=1,
                    help="datagrams per sendmmsg/recvmmsg call of udp_send/udp_sink in the rate runs "
                         "(1, the default: one send/recv per datagram, as the Linux reference does; "
                         "Python's socket module has no sendmmsg/recvmmsg)")
    ap.add_argument("--rate-only", action="store_true", help="skip the ping-pong figures")
    ap.add_argument("--doorbell-page", action="store_true",
                    help="both kernels write their tails through the doorbell page (kstack.kernel "
                         "--device ...,doorbell_page=on; docs/kstack.md), not a message each")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.repeat, args.rounds, args.modes = 1.0, 2, 500, "napi"
    modes = [m for m in args.modes.split(",") if m]
    warmup = 1.0

    # Ctrl-C or SIGTERM: unwind through the finally clauses, which stop every process
    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored

    print(f"bench_kstack: {PAYLOAD}-byte UDP payloads (64-byte frames), {args.repeat} repetitions, "
          f"{args.seconds:g} s windows after {warmup:g} s of warm-up; kstack apps: "
          + (f"sendmmsg/recvmmsg, {args.batch} datagrams per call" if args.batch > 1
             else "one send/recv per datagram")
          + ("; kernels' tails through the doorbell page" if args.doorbell_page else ""))
    print(machine_line())
    print("  the machine is shared with other work (tests, fuzzers) while this runs: the load average "
          "above and below is part of every figure")

    rate_rows: dict[str, list[dict]] = {}
    lin_rate: list[dict] = []
    kpp: list[dict] = []
    idle: dict[str, float] = {}
    port = 9000
    for mode in modes:
        lab = Lab()
        try:
            lab.up(mode, args.itr, args.doorbell_page)
            if mode == modes[0]:
                time.sleep(0.3)
                idle = idle_cpu({"emulator": lab.emu.pid, "kernel A": lab.ka.pid, "kernel B": lab.kb.pid})
            rows = rate_rows.setdefault(mode, [])
            for i in range(args.repeat):
                port += 1
                rows.append(kstack_rate(lab, args.seconds, warmup, port, batch=args.batch))
                if mode == modes[0]:  # the reference in the same run, interleaved
                    lin_rate.append(linux_run("rate", "--seconds", str(args.seconds)))
                print(f"  [{mode} run {i + 1}: kstack {rows[-1]['rate']:.0f} datagrams/s"
                      + (f", Linux {lin_rate[-1]['rate']:.0f}" if mode == modes[0] else "") + "]", flush=True)
            if mode == modes[0] and not args.rate_only:
                for i in range(args.repeat):
                    port += 1
                    kpp.append(kstack_pingpong(lab, args.rounds, port))
        finally:
            lab.close()
    lin_pp = [] if args.rate_only else [linux_run("pingpong", "--rounds", str(args.rounds)) for _ in range(args.repeat)]
    pmd_pp = [] if args.rate_only else [pmd_pingpong(args.rounds) for _ in range(args.repeat)]

    busy = [k for k, v in idle.items() if v > 0.5]
    print()
    print("processes with no traffic (fraction of a CPU over 0.5 s): "
          + ", ".join(f"{k} {v:.3f}" for k, v in idle.items())
          + f"; busy-polling: {len(busy)} of them" + (f" ({', '.join(busy)})" if busy else "")
          + f"; cores: {os.cpu_count()}")
    print("  kernels sleep in epoll on the devices' interrupt eventfds and the syscall channels; the "
          "applications sleep on their eventfds; Linux's receiver sleeps in recv(2)")

    print()
    print("1. UDP receive rate into an application process, 64-byte frames: median (min-max, n)")
    for mode in modes:
        rows = rate_rows[mode]
        print(f"  kstack, {mode} (itr={args.itr}), udp_send on A -> udp_sink on B:")
        print(f"    received by the sink:  {sp([r['rate'] for r in rows])} datagrams/s")
        print(f"    sent by udp_send:      {sp([r['sent_rate'] for r in rows])} datagrams/s")
        print(f"    sink's own report:     {sp([r['sink rate (its own report)'] for r in rows])} datagrams/s "
              f"(first to last datagram); lost per its sequence numbers {sp([r['sink lost'] for r in rows])}")
        print(f"    B missed (MPC) {sp([r['missed (B: MPC)'] for r in rows])}, no buffer (RNBC) "
              f"{sp([r['no buffer (B: RNBC)'] for r in rows])} in the window; A qdisc drops (so far) "
              f"{sp([r['qdisc drops (A, whole run)'] for r in rows])}")
        reasons = sorted({k for r in rows for k in r["drops"]})
        print("    sk_buff drops in the window by reason (kernel:reason, median of the runs): "
              + (", ".join(f"{k} {statistics.median([r['drops'].get(k, 0) for r in rows]):.0f}"
                           for k in reasons) or "none"))
        print_cpu_shares(rows)
        print(f"    if each process had a CPU of its own (1 / busiest process's CPU per datagram): "
              f"{sp([r['ceiling'] for r in rows])} datagrams/s; busiest: "
              f"{', '.join(sorted({r['busiest'] for r in rows}))}")
    print(f"  Linux, Python sender process -> Python receiver process, UDP on loopback:")
    print(f"    received:              {sp([r['rate'] for r in lin_rate])} datagrams/s")
    print(f"    CPU used: sender {statistics.median([r['tx_cpu_frac'] for r in lin_rate]):.2f}, receiver "
          f"{statistics.median([r['rx_cpu_frac'] for r in lin_rate]):.2f}; waited for a CPU: sender "
          f"{statistics.median([r['tx_run_delay_frac'] for r in lin_rate]):.2f}, receiver "
          f"{statistics.median([r['rx_run_delay_frac'] for r in lin_rate]):.2f}")
    lin_ceil = [1e9 / max(r["rx_cpu_ns_per_pkt"], r["tx_cpu_ns_per_pkt"]) for r in lin_rate]
    print(f"    if each process had a CPU of its own: {sp(lin_ceil)} datagrams/s")
    ratios = [k["rate"] / l["rate"] for k, l in zip(rate_rows[modes[0]], lin_rate) if l["rate"]]
    print(f"  ratio kstack ({modes[0]}) / Linux, per paired run: {sp(ratios)}   (target >= {RATE_TARGET})")
    ceil_ratios = [k["ceiling"] / c for k, c in zip(rate_rows[modes[0]], lin_ceil) if c]
    print(f"  the same ratio of the CPU-per-datagram ceilings (less sensitive to the machine's load): "
          f"{sp(ceil_ratios)}")

    if kpp:
        print()
        print(f"2. UDP ping-pong round trip, {PAYLOAD}-byte payload, {args.rounds} rounds per repetition (us)")
        print(f"  {'':52s} {'p50':>28s} {'p99':>28s}")
        for title, rows in ((f"kstack {modes[0]}: client on A, udp_echo on B", kpp),
                            ("PMD through the emulator (bench_pmd, busy-polling)", pmd_pp),
                            ("Linux UDP on loopback (two Python processes)", lin_pp)):
            print(f"  {title:52s} {sp([r['p50_us'] for r in rows]):>28s} {sp([r['p99_us'] for r in rows]):>28s}")
        print(f"  kstack client: CPU {sp([r['cpu_ns_per_rtt'] for r in kpp])} ns, context switches "
              f"{sp([r['ctx_per_rtt'] for r in kpp])}, library syscalls {sp([r['syscalls_per_rtt'] for r in kpp])} "
              f"per round trip; lost {sum(r['lost'] for r in kpp)}")
        print(f"  kstack: emulator, kernels and udp_echo waited for a CPU {sp([r['run_delay_us_per_rtt'] for r in kpp])} us "
              f"per round trip (run-queue delay, summed; client start-up and warm-up included)")
        print(f"  Linux pinger:  CPU {sp([r['cpu_ns_per_rtt_pinger'] for r in lin_pp])} ns, context switches "
              f"{sp([r['ctx_per_rtt_pinger'] for r in lin_pp])} per round trip")

    print()
    print("3. Per-packet costs of the receive runs (per datagram the sink received in the window)")
    cols = [f"kstack {m}" for m in modes] + ["Linux"]
    print(f"  {'':44s}" + "".join(f"{c:>30s}" for c in cols))
    keys = list(rate_rows[modes[0]][0]["per"])
    lin_map = {"CPU ns: udp_send": "tx_cpu_ns_per_pkt", "CPU ns: udp_sink": "rx_cpu_ns_per_pkt",
               "context switches: udp_sink": "rx_ctx_per_pkt", "context switches: udp_send": "tx_ctx_per_pkt",
               "syscalls, sink library (whole run)": "syscalls_per_pkt_rx",
               "syscalls, sender library (whole run)": "syscalls_per_pkt_tx"}
    for k in keys:
        cells = [sp([r["per"][k] for r in rate_rows[m]]) for m in modes]
        lk = lin_map.get(k)
        cells.append(sp([r[lk] for r in lin_rate if lk in r]) if lk else "-")
        print(f"  {k:44s}" + "".join(f"{c:>30s}" for c in cells))
    print("  Linux: the sender and receiver are the two Python processes (udp_send / udp_sink rows); "
          "the kernel's own work is inside their CPU time (system time)")

    print()
    print("verdict")
    k_med = statistics.median([r["rate"] for r in rate_rows[modes[0]]])
    l_med = statistics.median([r["rate"] for r in lin_rate])
    ratio = statistics.median(ratios) if ratios else 0.0
    print(f"  receive rate >= {RATE_TARGET} x Linux: {'met' if ratio >= RATE_TARGET else 'NOT met'} "
          f"(kstack {modes[0]} {k_med:.0f} datagrams/s, Linux {l_med:.0f}, ratio {ratio:.3f}; "
          f"needs {RATE_TARGET * l_med:.0f})")
    if kpp:
        kp = statistics.median([r["p50_us"] for r in kpp])
        print(f"  ping-pong p50/p99 printed for kstack, PMD, Linux: done (kstack p50 {kp:.0f} us, "
              f"PMD {statistics.median([r['p50_us'] for r in pmd_pp]):.0f} us, "
              f"Linux {statistics.median([r['p50_us'] for r in lin_pp]):.0f} us; no target in the issue)")
    print(f"  no more busy-polling processes than cores: {'met' if len(busy) <= (os.cpu_count() or 1) else 'NOT met'} "
          f"({len(busy)} busy with no traffic; the PMD ping-pong adds one, run alone)")
    print(machine_line())
    return 0


if __name__ == "__main__":
    run_main(main)
