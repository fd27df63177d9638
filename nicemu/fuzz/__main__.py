"""``python -m nicemu.fuzz``: the long run of the fuzz targets, printing what each tried.

    python -m nicemu.fuzz                         # every target, 1000 iterations, seed from time
    python -m nicemu.fuzz --target shm --seed 7 --iterations 100000
    python -m nicemu.fuzz --seconds 600           # repeat with new seeds until time is up

Exit status 0 when every invariant held, 1 on the first failure (its seed is printed).
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback

from nicemu.fuzz import TARGETS, FuzzFailure, load_target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nicemu.fuzz", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", action="append", choices=sorted(TARGETS),
                    help="a target to run (repeatable; default: all)")
    ap.add_argument("--seed", type=int, default=None, help="first seed (default: from the clock)")
    ap.add_argument("--iterations", type=int, default=1000, help="iterations per run (default 1000)")
    ap.add_argument("--seconds", type=float, default=0.0,
                    help="keep running with seed+1, seed+2, ... until this many seconds passed")
    ap.add_argument("--verbose", "-v", action="store_true", help="print each case as it runs")
    args = ap.parse_args(argv)
    targets = args.target or list(TARGETS)
    seed = args.seed if args.seed is not None else time.time_ns() % 1_000_000_007
    deadline = time.monotonic() + args.seconds
    log = print if args.verbose else None
    runs = 0
    while True:
        for name in targets:
            print(f"== {name} seed {seed} iterations {args.iterations}", flush=True)
            t0 = time.monotonic()
            try:
                report = load_target(name)(seed, args.iterations, log)
            except FuzzFailure as e:
                print(f"FAILED {name} seed {seed}: {e}", flush=True)
                return 1
            except Exception:
                traceback.print_exc()
                print(f"FAILED {name} seed {seed}: unexpected exception "
                      f"(replay: python -m nicemu.fuzz --target {name} --seed {seed} "
                      f"--iterations {args.iterations})", flush=True)
                return 1
            print(report.summary(), f"\n  time:     {time.monotonic() - t0:.1f} s", flush=True)
        runs += 1
        if time.monotonic() >= deadline:
            break
        seed += 1
    print(f"{runs} round(s), every invariant held")
    return 0


if __name__ == "__main__":
    sys.exit(main())
