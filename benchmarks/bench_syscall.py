"""The syscall channel's cost: UDP datagrams/s from a sender process through a kstack kernel
process into a receiver process, beside Python over the real Linux kernel's UDP loopback.

    python benchmarks/bench_syscall.py [--seconds 2] [--reps 3] [--payload 18] [--spin-ns 0]
                                       [--pingpong 2000] [--no-linux]

The kernel is the loopback Sock kernel of tests/kstack_loopsock.py in its own process (the
channel alone, no IP, no device): a sender app and a receiver app, each in its own process,
talk through it. Per run: datagrams/s received; CPU ns per datagram of the receiver, the
sender and the kernel (/proc/PID/schedstat); the receiver's and the sender's syscalls per
datagram (submissions + completions reaped) and wake-ups (the receiver's sleeps, the sender's
eventfd writes to the kernel). Then a ping-pong through the same kernel (p50/p99 round trip).
Each row is run --reps times and printed as median (min-max); `linux_udp.py rate` (and
`pingpong`) runs in between each repetition so that both see the same machine.

Figures on this 2-core machine are noisy: other work shares the cores (the load average is
printed), and three busy processes (kernel, sender, receiver) share two cores here.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from _common import ProcCost, machine_line, pdeathsig_preexec, run_main, spread  # noqa: E402

PORT = 9000

RECEIVER = """
import json, sys, time
from kstack import socket as k
from benchmarks._common import cpu_ns, ctx_switches
secs = float(sys.argv[1])
s = k.socket(k.AF_INET, k.SOCK_DGRAM)
s.setsockopt(k.SOL_SOCKET, k.SO_RCVBUF, 1 << 20)
s.bind(("198.18.0.1", %d))
print("ready", flush=True)
s.settimeout(10)
s.recv(2048)
c0, x0, k0 = cpu_ns(), ctx_switches(), k.costs()
print("go", flush=True)
n = 0
recv = s.recv
t0 = time.perf_counter()
end = t0 + secs
s.settimeout(0.5)
try:
    while True:
        recv(2048)
        n += 1
        if not n & 255 and time.perf_counter() >= end:
            break
except TimeoutError:
    pass
dt = time.perf_counter() - t0
c1, x1, k1 = cpu_ns(), ctx_switches(), k.costs()
print(json.dumps({"n": n, "dt": dt, "cpu": c1 - c0, "ctx": x1 - x0,
                  **{f: k1[f] - k0[f] for f in ("syscalls", "submissions", "completions_reaped",
                                                 "sleeps", "wakeups_sent")}}), flush=True)
""" % PORT

SENDER = """
import json, sys, time
from kstack import socket as k
payload = b"x" * int(sys.argv[1])
s = k.socket(k.AF_INET, k.SOCK_DGRAM)
s.connect(("198.18.0.1", %d))
print("ready", flush=True)
sys.stdin.readline()
c0 = k.costs()
send = s.send
n = 0
t0 = time.perf_counter()
end = t0 + float(sys.argv[2])
while True:
    for _ in range(64):
        send(payload)
    n += 64
    if time.perf_counter() >= end:
        break
c1 = k.costs()
print(json.dumps({"sent": n, "dt": time.perf_counter() - t0, **{f: c1[f] - c0[f] for f in ("syscalls", "submissions", "completions_reaped",
                                                             "sleeps", "wakeups_sent", "cpu_ns")}}), flush=True)
""" % PORT

ECHO = """
import sys
from kstack import socket as k
s = k.socket(k.AF_INET, k.SOCK_DGRAM)
s.bind(("198.18.0.1", %d))
print("ready", flush=True)
s.settimeout(5)
try:
    while True:
        d, a = s.recvfrom(2048)
        s.sendto(d, a)
except TimeoutError:
    pass
""" % (PORT + 1)

PINGER = """
import json, sys, time
from kstack import socket as k
from benchmarks._common import cpu_ns, percentile
rounds = int(sys.argv[1])
data = b"p" * int(sys.argv[2])
s = k.socket(k.AF_INET, k.SOCK_DGRAM)
s.connect(("198.18.0.1", %d))
s.settimeout(5)
for _ in range(200):
    s.send(data); s.recv(2048)
rtts = []
c0, k0 = cpu_ns(), k.costs()
for _ in range(rounds):
    t = time.perf_counter_ns()
    s.send(data)
    s.recv(2048)
    rtts.append((time.perf_counter_ns() - t) / 1000)
c1, k1 = cpu_ns(), k.costs()
print(json.dumps({"p50_us": percentile(rtts, 50), "p99_us": percentile(rtts, 99),
                  "cpu_ns_per_rtt": (c1 - c0) / rounds,
                  "syscalls_per_rtt": (k1["syscalls"] - k0["syscalls"]) / rounds,
                  "sleeps_per_rtt": (k1["sleeps"] - k0["sleeps"]) / rounds}), flush=True)
""" % (PORT + 1)


def _py(code: str, env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            preexec_fn=pdeathsig_preexec())  # dies with us


class KernelProc:
    """The loopback kernel in its own process."""

    def __init__(self, path: str) -> None:
        self.p = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "kstack_loopsock.py"), path],
                                  stdout=subprocess.PIPE, text=True, preexec_fn=pdeathsig_preexec())
        if self.p.stdout.readline().strip() != "ready":
            raise RuntimeError("kernel did not start")

    def close(self) -> None:
        self.p.terminate()
        self.p.wait(10)
        self.p.stdout.close()


def run_rate(path: str, env: dict, seconds: float, payload: int) -> dict:
    k = KernelProc(path)
    try:
        rx = _py(RECEIVER, env, str(seconds))
        assert rx.stdout.readline().strip() == "ready"
        tx = _py(SENDER, env, str(payload), str(seconds + 1.5))
        assert tx.stdout.readline().strip() == "ready"
        tx.stdin.write("go\n")
        tx.stdin.flush()
        assert rx.stdout.readline().strip() == "go"
        kc = ProcCost(k.p.pid).start()
        r = json.loads(rx.stdout.readline())
        kc.stop()
        t = json.loads(tx.stdout.readline())
        for p in (rx, tx):
            p.wait(30)
            p.stdin.close()
            p.stdout.close()
    finally:
        k.close()
    n = max(r["n"], 1)
    return {"rate": r["n"] / r["dt"], "rx_cpu_ns": r["cpu"] / n, "kernel_cpu_ns": kc.cpu / n,
            "rx_syscalls": r["syscalls"] / n, "rx_sleeps": r["sleeps"] / n,
            "rx_wakeups_sent": r["wakeups_sent"] / n, "rx_ctx": r["ctx"] / n,
            "tx_cpu_ns": t["cpu_ns"] / max(t["sent"], 1), "tx_syscalls": t["syscalls"] / max(t["sent"], 1),
            "tx_wakeups_sent": t["wakeups_sent"] / max(t["sent"], 1), "tx_sleeps": t["sleeps"] / max(t["sent"], 1),
            "sent": t["sent"], "received": r["n"], "tx_rate": t["sent"] / t["dt"]}


def run_pingpong(path: str, env: dict, rounds: int, payload: int) -> dict:
    k = KernelProc(path)
    try:
        echo = _py(ECHO, env)
        assert echo.stdout.readline().strip() == "ready"
        pinger = _py(PINGER, env, str(rounds), str(payload))
        out = json.loads(pinger.stdout.readline())
        pinger.wait(30)
        echo.terminate()
        echo.wait(10)
        for p in (pinger, echo):
            p.stdin.close()
            p.stdout.close()
    finally:
        k.close()
    return out


def linux(what: str, payload: int, seconds: float) -> dict:
    out = subprocess.run([sys.executable, os.path.join(HERE, "linux_udp.py"), what, "--payload", str(payload),
                          "--seconds", str(seconds)], capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--payload", type=int, default=18, help="UDP payload (18: a 64-byte frame)")
    ap.add_argument("--spin-ns", type=int, default=0, help="NICEMU_SPIN_NS for the apps")
    ap.add_argument("--pingpong", type=int, default=2000, help="round trips (0: skip)")
    ap.add_argument("--no-linux", action="store_true")
    ap.add_argument("--sync", action="store_true", help="one synchronous call per send/recv")
    a = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": ROOT, "NICEMU_SPIN_NS": str(a.spin_ns)}
    if a.sync:
        env.update(NICEMU_ASYNC_SEND="0", NICEMU_MULTISHOT="0")
    print(machine_line())
    print(f"kstack: loopback Sock kernel process (tests/kstack_loopsock.py), payload {a.payload} B, "
          f"{'sync calls' if a.sync else 'async sends + multishot receive'}, spin {a.spin_ns} ns")
    rows: list[dict] = []
    lin: list[dict] = []
    pp: list[dict] = []
    lpp: list[dict] = []
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.sock")
        env["NICEMU_KERNEL"] = path
        for _ in range(a.reps):
            rows.append(run_rate(path, env, a.seconds, a.payload))
            if not a.no_linux:
                lin.append(linux("rate", a.payload, a.seconds))
            if a.pingpong:
                pp.append(run_pingpong(path, env, a.pingpong, a.payload))
                if not a.no_linux:
                    lpp.append(linux("pingpong", a.payload, a.seconds))
    print(f"machine after: {machine_line()[9:]}")

    def col(rs: list[dict], key: str, fmt: str = "{:.0f}") -> str:
        return spread([r[key] for r in rs], fmt)

    print(f"\nUDP receive rate, {a.payload}-byte payload, median (min-max, n) of {a.reps}:")
    print(f"  kstack datagrams/s        {col(rows, 'rate')}")
    if lin:
        print(f"  linux  datagrams/s        {col(lin, 'rate')}   (python benchmarks/linux_udp.py rate)")
        ratio = [r["rate"] / max(l_["rate"], 1) for r, l_ in zip(rows, lin)]
        print(f"  kstack / linux            {spread(ratio, '{:.2f}')}")
    print(f"  receiver CPU ns/dgram     {col(rows, 'rx_cpu_ns')}" +
          (f"   linux {col(lin, 'rx_cpu_ns_per_pkt')}" if lin else ""))
    print(f"  sender CPU ns/dgram sent  {col(rows, 'tx_cpu_ns')}" +
          (f"   linux {col(lin, 'tx_cpu_ns_per_pkt')} (per dgram received)" if lin else ""))
    print(f"  kernel CPU ns/dgram       {col(rows, 'kernel_cpu_ns')}")
    print(f"  receiver syscalls/dgram   {col(rows, 'rx_syscalls', '{:.3f}')}  (submissions + completions reaped)")
    print(f"  receiver sleeps/dgram     {col(rows, 'rx_sleeps', '{:.3f}')}  (each one a wake-up by the kernel)")
    print(f"  receiver ctx sw/dgram     {col(rows, 'rx_ctx', '{:.3f}')}")
    print(f"  sender syscalls/dgram     {col(rows, 'tx_syscalls', '{:.3f}')}")
    print(f"  sender wake-ups/dgram     {col(rows, 'tx_wakeups_sent', '{:.3f}')}  (eventfd writes to the kernel)")
    print(f"  sender sleeps/dgram       {col(rows, 'tx_sleeps', '{:.3f}')}  (waits for the bound on sends in flight)")
    print(f"  sender datagrams/s        {col(rows, 'tx_rate')}  (the excess is dropped at the receiver's SO_RCVBUF,"
          " in the kernel process)")
    if pp:
        print(f"\nUDP ping-pong, {a.pingpong} round trips:")
        print(f"  kstack p50 us             {col(pp, 'p50_us', '{:.1f}')}   p99 {col(pp, 'p99_us', '{:.1f}')}")
        if lpp:
            print(f"  linux  p50 us             {col(lpp, 'p50_us', '{:.1f}')}   p99 {col(lpp, 'p99_us', '{:.1f}')}")
        print(f"  kstack pinger CPU ns/rtt  {col(pp, 'cpu_ns_per_rtt')}  syscalls/rtt "
              f"{col(pp, 'syscalls_per_rtt', '{:.2f}')}  sleeps/rtt {col(pp, 'sleeps_per_rtt', '{:.2f}')}")
    print("\nfigures are noisy: 2 cores shared with other work; three busy processes here")
    return 0


if __name__ == "__main__":
    run_main(main)
