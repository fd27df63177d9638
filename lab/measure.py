"""What the demo and every benchmark print about the machine and measure about a process
(benchmarks/_common.py re-exports this module: both measure the same way).

Honest figures: the CPU count and load average with every table, CPU time in nanoseconds from
/proc/PID/schedstat (not 10 ms ticks), context switches from /proc/PID/status, repetitions
summarised as median and spread.
"""
from __future__ import annotations

import os
import platform
import statistics
from dataclasses import dataclass

__all__ = ["machine_line", "cpu_ns", "run_delay_ns", "ctx_switches", "ProcCost", "spread", "percentile",
           "load_warning", "idle_cpu"]


def machine_line() -> str:
    """One line: CPUs, load average, kernel, Python."""
    la = os.getloadavg()
    return (f"machine: {os.cpu_count()} CPUs, load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}, "
            f"Linux {platform.release()}, Python {platform.python_version()}")


def _schedstat_sum(pid: int | str, field: int) -> int:
    """Field `field` of /proc/PID/task/*/schedstat summed over the threads; -1 if it is gone."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return -1
    total = 0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[field])
        except (OSError, ValueError, IndexError):
            pass
    return total


def cpu_ns(pid: int | str = "self") -> int:
    """CPU time the process has run, in ns (first field of /proc/PID/schedstat; threads of a
    multi-threaded process are summed from /proc/PID/task/*/schedstat). -1 if it is gone."""
    return _schedstat_sum(pid, 0)


def run_delay_ns(pid: int | str = "self") -> int:
    """Time the process was runnable but waited for a CPU, in ns (second field of
    /proc/PID/schedstat, threads summed): on a shared machine, what the load took from it.
    -1 if it is gone."""
    return _schedstat_sum(pid, 1)


def ctx_switches(pid: int | str = "self") -> int:
    """Voluntary + involuntary context switches so far; -1 if the process is gone."""
    total = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
    except OSError:
        return -1
    return total


@dataclass
class ProcCost:
    """CPU ns, context switches and run-queue wait of one process between two readings."""

    pid: int | str
    cpu0: int = 0
    cs0: int = 0
    rd0: int = 0
    cpu: int = 0
    cs: int = 0
    run_delay: int = 0  # ns runnable but waiting for a CPU

    def start(self) -> "ProcCost":
        self.cpu0, self.cs0, self.rd0 = cpu_ns(self.pid), ctx_switches(self.pid), run_delay_ns(self.pid)
        return self

    def stop(self) -> "ProcCost":
        c, s, r = cpu_ns(self.pid), ctx_switches(self.pid), run_delay_ns(self.pid)
        self.cpu, self.cs, self.run_delay = max(0, c - self.cpu0), max(0, s - self.cs0), max(0, r - self.rd0)
        return self


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    k = min(len(v) - 1, max(0, round(p / 100 * (len(v) - 1))))
    return v[k]


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    """'median (min-max, n=N)' of repetitions."""
    if not values:
        return "-"
    med = statistics.median(values)
    return f"{fmt.format(med)} ({fmt.format(min(values))}-{fmt.format(max(values))}, n={len(values)})"


def load_warning() -> str | None:
    """A sentence when the machine is too busy for figures to mean much: a 1-minute load
    average above the CPU count means runnable processes queue for a CPU, and every figure
    then includes that wait. None when the load is below it."""
    cpus = os.cpu_count() or 1
    load = os.getloadavg()[0]
    if load <= cpus:
        return None
    return (f"the load average ({load:.2f}) is above the CPU count ({cpus}): other work competes "
            f"for the CPUs, so the times, rates and CPU figures of this run are unreliable (counts per packet are not)")


def idle_cpu(pids: dict[str, int], seconds: float = 0.3) -> dict[str, float]:
    """Fraction of a CPU each process uses with no traffic: a busy-poller shows about 1."""
    import time

    costs = {k: ProcCost(p).start() for k, p in pids.items()}
    t0 = time.perf_counter()
    time.sleep(seconds)
    dt = time.perf_counter() - t0
    return {k: c.stop().cpu / 1e9 / dt for k, c in costs.items()}
