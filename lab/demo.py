"""`nicemu demo` (for now the driver-level demo, lab.l2demo)."""
from __future__ import annotations

import argparse

from lab import l2demo


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    ps = sub.add_parser(
        "demo", help="two NICs back to back: interrupt mode, NAPI and a PMD, measured",
        description="Start an emulator with two devices back to back, a traffic generator on one "
                    "and, in turn, the kernel-style driver in interrupt mode, in NAPI mode and the "
                    "kernel-bypass PMD on the other, each driver in its own process; narrate what "
                    "happens and end with tables of rate, latency, interrupts, doorbells and "
                    "register reads per packet and context switches. Ctrl-C or SIGTERM stops "
                    "everything cleanly.")
    l2demo.add_arguments(ps)
    return ps


def run(args: argparse.Namespace) -> int:
    return l2demo.main(args)
