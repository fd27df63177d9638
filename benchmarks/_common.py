"""The benchmarks' machine line and process measurements: they live in lab.measure (shared
with `nicemu demo`, so the demo and the benchmarks measure the same way); re-exported here."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lab.measure import (ProcCost, cpu_ns, ctx_switches, machine_line, percentile,  # noqa: E402,F401
                         run_delay_ns, spread)

__all__ = ["machine_line", "cpu_ns", "run_delay_ns", "ctx_switches", "ProcCost", "spread", "percentile"]
