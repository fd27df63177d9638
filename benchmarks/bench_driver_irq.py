"""Interrupts per packet and round-trip latency of the kernel-style driver (printed, not asserted).

Setup, all real processes on this machine: one emulator process (`python -m nicemu serve
--pair`) with two 82540EMs back to back; a driver process per device
(`python -m driver.kernel`). Measured:

1. flood: the generator driver sends --frames 64-byte frames as fast as its TX queue takes
   them; the receiving driver counts. Interrupts per received packet in interrupt mode and
   in NAPI mode (target: at most 0.05 under load), packets per poll, doorbells per packet.
2. paced: the generator sends at --rate frames/s, so the receiver is idle between frames:
   interrupt mode takes about one interrupt per packet.
3. ping-pong: this process drives device A itself (VfioUserBus + E1000) and sends one frame
   at a time; a driver process on device B echoes it. Round-trip p50/p99 through the
   interrupt path (interrupt mode and NAPI mode on both ends).

Context switches (voluntary + involuntary) of every process come from getrusage (drivers,
this process) and /proc/PID/status (the emulator). The machine's load average is printed.

    python benchmarks/bench_driver_irq.py [--frames 20000] [--rate 2000] [--pings 2000]
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from driver.e1000 import E1000, E1000Config  # noqa: E402
from kstack.skbuff import default_pool  # noqa: E402
from _common import pdeathsig_preexec, run_main  # noqa: E402  (benchmarks/ is the script's directory)

MAC0 = "52:54:00:12:34:56"
MAC1 = "52:54:00:12:34:57"
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def proc_ctx_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of a live process, from /proc."""
    total = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
    except OSError:
        return -1
    return total


def self_ctx_switches() -> int:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_nvcsw + ru.ru_nivcsw


class Child:
    """A child process reporting JSON lines on stdout."""

    def __init__(self, args: list[str]) -> None:
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                  env=ENV, cwd=ROOT, preexec_fn=pdeathsig_preexec())  # dies with us
        self.q: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.p.stdout:
            self.q.put(line.rstrip("\n"))

    def line(self, pred, timeout: float = 30.0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                ln = self.q.get(timeout=0.5)
            except queue.Empty:
                if self.p.poll() is not None:
                    break
                continue
            if pred(ln):
                return ln
        raise RuntimeError(f"child {self.p.args[:4]} gave no expected line (rc {self.p.poll()})")

    def event(self, name: str, timeout: float = 30.0) -> dict:
        def pred(ln: str) -> bool:
            return ln.startswith("{") and json.loads(ln).get("event") == name
        return json.loads(self.line(pred, timeout))

    def stats(self) -> dict:
        self.p.send_signal(signal.SIGUSR1)
        return self.event("stats")

    def wait_stats(self, cond, timeout: float = 120.0) -> dict:
        end = time.monotonic() + timeout
        while True:
            st = self.stats()
            if cond(st) or time.monotonic() > end:
                return st
            time.sleep(0.05)

    def stop(self) -> dict | None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        last = None
        try:
            while True:
                ln = self.line(lambda ln: ln.startswith("{"), timeout=10)
                d = json.loads(ln)
                if d.get("event") == "stats":
                    last = d
        except RuntimeError:
            pass
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        self.p.stdout.close()
        return last


class Setup:
    """An emulator process with two devices back to back, in a private directory."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="nkbench")  # in run_main's watched run directory
        self.a = os.path.join(self.dir, "a.sock")
        self.b = os.path.join(self.dir, "b.sock")
        self.children: list[Child] = []
        self.emu = self.start([sys.executable, "-m", "nicemu", "serve", "--socket", self.a, "--mac", MAC0,
                               "--socket", self.b, "--mac", MAC1, "--pair"])
        self.emu.line(lambda ln: ln == "nicemu: ready")
        self.emu_ctx0 = proc_ctx_switches(self.emu.p.pid)

    def start(self, args: list[str]) -> Child:
        c = Child(args)
        self.children.append(c)
        return c

    def driver(self, sock: str, *extra: str) -> Child:
        c = self.start([sys.executable, "-m", "driver.kernel", "--socket", sock, *extra])
        c.event("up")
        return c

    def emu_ctx(self) -> int:
        return proc_ctx_switches(self.emu.p.pid) - self.emu_ctx0

    def close(self) -> None:
        for c in reversed(self.children):
            c.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def run_flood(mode: str, frames: int, rate: float = 0.0, itr: str = "0") -> dict:
    s = Setup()
    try:
        rx = s.driver(s.b, "--mode", mode, "--itr", itr)
        extra = ["--rate", str(rate)] if rate else []
        gen = s.driver(s.a, "--mode", mode, "--itr", itr, "--app", "gen", "--count", str(frames),
                       "--dst", MAC1, *extra)
        t0 = time.monotonic()
        g = gen.wait_stats(lambda st: st["tx_packets"] == frames)
        r = rx.wait_stats(lambda st: st["rx_packets"] + st["MPC"] >= frames and not st["napi_scheduled"])
        wall = time.monotonic() - t0
        emu_ctx = s.emu_ctx()
        g = gen.stop() or g
        r = rx.stop() or r
    finally:
        s.close()
    pk = max(1, r["rx_packets"])
    return {
        "mode": mode, "itr": itr, "rate": rate, "frames": frames, "received": r["rx_packets"], "missed": r["MPC"],
        "rx_rate_pps": r["rx_packets"] / r["rx_seconds"] if r["rx_seconds"] else 0.0,
        "wall_s": wall,
        "rx_irq_per_pkt": r["interrupts"] / pk,
        "rx_polls": r["polls"], "pkts_per_poll": r["packets_per_poll"],
        "rx_doorbells_per_pkt": r["rx_doorbells"] / pk,
        "tx_irq_per_pkt": g["interrupts"] / max(1, g["tx_packets"]),
        "tx_doorbells_per_pkt": g["tx_doorbells"] / max(1, g["tx_packets"]),
        "queue_stops": g["tx_queue_stops"],
        "ctx_rx": r["ctx_switches"], "ctx_gen": g["ctx_switches"], "ctx_emu": emu_ctx,
    }


def run_pingpong(mode: str, pings: int, itr: str = "0") -> dict:
    from driver.vfio_user_client import VfioUserBus

    s = Setup()
    try:
        echo = s.driver(s.b, "--mode", mode, "--app", "echo", "--itr", itr)
        got: list[int] = []
        bus = VfioUserBus(s.a)
        drv = E1000(bus, E1000Config(mode=mode, itr=itr, rdtr=0),
                    receive=lambda skb: (got.append(struct.unpack_from("!I", skb.view(), 14)[0]), skb.consume()))
        drv.open()
        end = time.monotonic() + 10
        while not drv.carrier and time.monotonic() < end:
            drv.process(0.05)
        hdr = bytes.fromhex(MAC1.replace(":", "")) + bytes.fromhex(MAC0.replace(":", "")) + b"\x88\xb5"
        rtts: list[float] = []
        ctx0 = self_ctx_switches()
        lost = 0
        for seq in range(pings):
            frame = hdr + struct.pack("!I", seq) + bytes(42)
            t0 = time.perf_counter_ns()
            drv.xmit(default_pool().from_bytes(frame))
            deadline = time.monotonic() + 1.0
            while seq not in got:
                if time.monotonic() > deadline:
                    lost += 1
                    break
                drv.process(0.5)
            else:
                rtts.append((time.perf_counter_ns() - t0) / 1000)
            got.clear()
        ctx_client = self_ctx_switches() - ctx0
        cst = drv.ethtool_stats()
        drv.close()
        bus.close()
        emu_ctx = s.emu_ctx()
        est = echo.stop()
    finally:
        s.close()
    rtts.sort()
    q = statistics.quantiles(rtts, n=100) if len(rtts) >= 2 else [float("nan")] * 99
    return {
        "mode": mode, "itr": itr, "pings": pings, "lost": lost, "p50_us": q[49], "p99_us": q[98],
        "min_us": rtts[0] if rtts else float("nan"),
        "client_irq_per_ping": cst["interrupts"] / max(1, pings),
        "echo_irq_per_ping": (est or {}).get("interrupts", 0) / max(1, pings),
        "ctx_client_per_ping": ctx_client / max(1, pings),
        "ctx_echo_per_ping": (est or {}).get("ctx_switches", 0) / max(1, pings),
        "ctx_emu_per_ping": emu_ctx / max(1, pings),
    }


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as uptime prints them."""
    return "{:.2f} {:.2f} {:.2f} (1, 5, 15 min)".format(*os.getloadavg())


FLOOD_LEGEND = """\
  rx pps     frames/s the receiving driver took, first to last frame
  missed     frames the receiving device dropped for want of RX descriptors (MPC)
  irq/pkt    interrupts the receiving driver took per frame received
  pkt/poll   frames per NAPI poll of the receiver (budget 64; "-" in interrupt mode: no polls)
  RDT/pkt    RX tail doorbells (RDT writes) of the receiver per frame
  TDT/pkt    TX tail doorbells (TDT writes) of the generator per frame sent
  txirq/pkt  interrupts the generating driver took per frame sent (TXDW: its TX cleaning)
  stops      times the generator's TX queue was stopped because the ring was full (netif_stop_queue)
  ctx rx/gen/emu  context switches (voluntary + involuntary) during the run: of the
             receiving driver / the generating driver / the emulator process"""

PING_LEGEND = """\
  cl         this process, the client driving device A; echo: the driver process on device B
  irq/ping   interrupts per round trip taken by the client / by the echo driver
  ctx/ping   context switches per round trip of the client / the echo driver / the emulator"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=20000, help="flood: frames to send")
    ap.add_argument("--rate", type=float, default=2000, help="paced: frames per second")
    ap.add_argument("--paced-frames", type=int, default=2000)
    ap.add_argument("--pings", type=int, default=2000)
    args = ap.parse_args()
    if min(args.frames, args.paced_frames, args.pings) < 1 or args.rate <= 0:
        ap.error("--frames, --paced-frames and --pings must be at least 1, --rate positive")

    print(f"machine: {os.cpu_count()} CPUs, load average at start {load_average()}")
    print("64-byte frames, one emulator process (pair cable), one driver process per device\n")

    cases = [("interrupt", "0"), ("napi", "0"), ("napi", "conservative")]
    flood = [run_flood(m, args.frames, itr=i) for m, i in cases]
    paced = [run_flood(m, args.paced_frames, args.rate, itr=i) for m, i in cases]
    print(f"{'traffic':<16}{'mode':<11}{'itr':<14}{'rx pps':>9}{'missed':>8}{'irq/pkt':>9}{'pkt/poll':>9}"
          f"{'RDT/pkt':>9}{'TDT/pkt':>9}{'txirq/pkt':>10}{'stops':>7}{'ctx rx/gen/emu':>22}")
    for r in flood + paced:
        label = f"flood {r['frames']}" if not r["rate"] else f"paced {r['rate']:.0f}/s"
        print(f"{label:<16}{r['mode']:<11}{r['itr']:<14}{r['rx_rate_pps']:>9.0f}{r['missed']:>8}{r['rx_irq_per_pkt']:>9.3f}"
              f"{(format(r['pkts_per_poll'], '.1f') if r['rx_polls'] else '-'):>9}"
              f"{r['rx_doorbells_per_pkt']:>9.3f}{r['tx_doorbells_per_pkt']:>9.3f}"
              f"{r['tx_irq_per_pkt']:>10.3f}{r['queue_stops']:>7}"
              f"{str(r['ctx_rx']) + '/' + str(r['ctx_gen']) + '/' + str(r['ctx_emu']):>22}")
    print()
    print(FLOOD_LEGEND)

    irq_paced = paced[0]["rx_irq_per_pkt"]
    napi_flood = max(r["rx_irq_per_pkt"] for r in flood if r["mode"] == "napi")
    print(f"\ntargets: interrupt mode, paced: about 1 interrupt per packet (measured {irq_paced:.3f}); "
          f"NAPI under load: at most 0.05 (measured {napi_flood:.3f}); load average {load_average()}")
    print()
    pp = [run_pingpong(m, args.pings, i) for m, i in cases]
    print(f"{'ping-pong':<12}{'mode':<11}{'itr':<14}{'p50 us':>9}{'p99 us':>9}{'min us':>9}{'lost':>6}"
          f"{'irq/ping cl/echo':>18}{'ctx/ping cl/echo/emu':>24}")
    for r in pp:
        irq = f"{r['client_irq_per_ping']:.2f}/{r['echo_irq_per_ping']:.2f}"
        ctx = f"{r['ctx_client_per_ping']:.1f}/{r['ctx_echo_per_ping']:.1f}/{r['ctx_emu_per_ping']:.1f}"
        print(f"{r['pings']:<12}{r['mode']:<11}{r['itr']:<14}{r['p50_us']:>9.1f}{r['p99_us']:>9.1f}{r['min_us']:>9.1f}{r['lost']:>6}"
              f"{irq:>18}{ctx:>24}")
    print()
    print(PING_LEGEND)
    print(f"\nload average at end {load_average()}")
    return 0


if __name__ == "__main__":
    run_main(main)
