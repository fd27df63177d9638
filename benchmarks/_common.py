"""The benchmarks' machine line and process measurements: they live in lab.measure (shared
with `nicemu demo`, so the demo and the benchmarks measure the same way); re-exported here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from multiprocessing import get_context
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lab.measure import (ProcCost, cpu_ns, ctx_switches, machine_line, percentile,  # noqa: E402,F401
                         run_delay_ns, spread)
from lab.procs import die_with, pdeathsig_preexec, reaped_tempdir  # noqa: E402,F401  every child dies with us

__all__ = ["machine_line", "cpu_ns", "run_delay_ns", "ctx_switches", "ProcCost", "spread", "percentile",
           "run_json", "timed_rounds", "run_main", "start_echo", "die_with", "pdeathsig_preexec"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_json(script: str, what: str, *args: str) -> dict:
    """Run benchmarks/<script> WHAT ARGS in a fresh interpreter; its last stdout line, as JSON."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), what, *args],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "TMPDIR": tempfile.gettempdir()},  # our watched run directory
                       preexec_fn=pdeathsig_preexec())
    if r.returncode:
        raise RuntimeError(f"{script} {what}: {r.stderr.strip()[-500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def timed_rounds(once: Callable[[], None], rounds: int, warmup: int = 200) -> tuple[list[float], int, int]:
    """`once` warmup times, then rounds times timed: (round-trip times in us, this process's
    CPU ns and context switches over the timed rounds)."""
    for _ in range(warmup):
        once()
    rtts = []
    cs0, c0 = ctx_switches(), cpu_ns()
    for _ in range(rounds):
        t = time.perf_counter_ns()
        once()
        rtts.append((time.perf_counter_ns() - t) / 1000)
    c1, cs1 = cpu_ns(), ctx_switches()
    return rtts, c1 - c0, cs1 - cs0


def start_echo(target: Callable) -> tuple[Any, Any, int]:
    """A forked process running target(port_queue, stop_event): (the process, its stop event,
    the port it put on the queue)."""
    ctx = get_context("fork")
    q, stop = ctx.Queue(), ctx.Event()
    p = ctx.Process(target=die_with, args=(os.getpid(), target, q, stop))
    p.start()
    return p, stop, q.get(timeout=10)


def run_main(main: Callable[[], int]) -> None:
    """sys.exit(main()), and a ^C said plainly (every process a benchmark starts is stopped).
    What the benchmark makes with tempfile (sockets, run directories) goes in a run directory
    that is removed at the end, and by a watcher if the benchmark is killed with SIGKILL
    (lab.procs.reaped_tempdir); under `nicemu bench` the one of that run is used."""
    try:
        if tempfile.gettempdir().startswith(f"/tmp/nicemu-{os.getuid()}/_bench-"):
            sys.exit(main())  # already in a watched run directory (nicemu bench's)
        with reaped_tempdir("_bench"):
            code = main()
        sys.exit(code)
    except KeyboardInterrupt:
        print("interrupted: every process started was stopped", file=sys.stderr)
        sys.exit(130)
