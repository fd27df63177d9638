"""What every shipped application shares: the kernel option, stopping, the final JSON line."""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import Any

from kstack import socket as ksocket


def add_kernel_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", metavar="PATH", default=None,
                   help=f"the kernel's channel socket (default: ${ksocket.ENV})")


def open_kernel(args: argparse.Namespace) -> None:
    """Connect now, so that a missing kernel is a clear error before any work."""
    try:
        ksocket.connect_kernel(args.kernel)
    except OSError as e:
        print(f"{sys.argv[0]}: cannot reach the kernel: {e}", file=sys.stderr)
        raise SystemExit(2) from None


class Stop:
    """Set by SIGTERM or SIGINT, so a server ends its loop and still reports."""

    def __init__(self) -> None:
        self.set = False
        signal.signal(signal.SIGTERM, self._on)
        signal.signal(signal.SIGINT, self._on)

    def _on(self, *_: object) -> None:
        self.set = True


def report(app: str, result: dict[str, Any]) -> None:
    """The final machine-readable line: the results and this process's own costs."""
    print(json.dumps({"app": app, **result, "costs": ksocket.costs()}, sort_keys=True), flush=True)


def now() -> float:
    return time.monotonic()
