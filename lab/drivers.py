"""`nicemu drivers`: the driver-level comparison (lab.l2demo): no stack, L2 frames echoed by
the kernel-style driver in interrupt mode, in NAPI mode and by the PMD."""
from __future__ import annotations

import argparse

from lab import l2demo


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    ps = sub.add_parser(
        "drivers", help="the drivers alone, no stack: interrupt mode, NAPI and a PMD echoing frames",
        description="Start one emulator process holding two devices back to back (with --cable "
                    "shm, one process each), a traffic generator on one and, in turn, the "
                    "kernel-style driver in interrupt mode, in NAPI mode and the kernel-bypass PMD "
                    "on the other, each driver in its own process; narrate what happens and end with "
                    "tables of rate, latency, interrupts, doorbells and register reads per packet "
                    "and context switches. Ctrl-C or SIGTERM stops everything cleanly.")
    l2demo.add_arguments(ps)
    return ps


def run(args: argparse.Namespace) -> int:
    return l2demo.main(args)
