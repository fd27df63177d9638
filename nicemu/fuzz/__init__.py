"""Seeded fuzzing of everything that takes input from another process or a file.

Every target is a module here with one function::

    def run(seed: int, iterations: int, log: Callable[[str], None] | None = None) -> FuzzReport

It draws all its choices from ``random.Random(seed)`` (the standard library only), so a failure
replays from its seed; it checks its invariants itself (nothing crashes or hangs, every drop is
counted, memory and fds stay bounded) and raises ``FuzzFailure`` naming the seed and the case
when one breaks. The tests run each target briefly; ``python -m nicemu.fuzz`` runs them long
and prints what each tried.

A new target is one module plus one row in TARGETS.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["TARGETS", "FuzzReport", "FuzzFailure", "load_target"]

# name -> module (imported on use, so one target's imports never slow another's)
TARGETS: dict[str, str] = {
    "device": "nicemu.fuzz.device",          # frames, register writes, descriptor rings
    "vfio_user": "nicemu.fuzz.vfio_user",    # messages to a real emulator process
    "shm": "nicemu.fuzz.shm",                # shm cable rings written by a hostile producer
    "topology": "nicemu.fuzz.topology",      # topology files
}


class FuzzFailure(AssertionError):
    """An invariant broke. The message names the target, the seed and the case, so that
    ``python -m nicemu.fuzz --target T --seed S`` replays it."""


@dataclass
class FuzzReport:
    """What a run tried and what the system under test said about it."""

    target: str
    seed: int
    iterations: int = 0
    cases: dict[str, int] = field(default_factory=dict)      # kind of input -> how many tried
    outcomes: dict[str, int] = field(default_factory=dict)   # counter or verdict -> how many

    def tried(self, kind: str, n: int = 1) -> None:
        self.cases[kind] = self.cases.get(kind, 0) + n

    def saw(self, outcome: str, n: int = 1) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + n

    def summary(self) -> str:
        cases = ", ".join(f"{k} {v}" for k, v in sorted(self.cases.items()))
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
        return (f"{self.target}: seed {self.seed}, {self.iterations} iterations\n"
                f"  tried:    {cases or '-'}\n  outcomes: {outcomes or '-'}")


def load_target(name: str) -> Callable[..., FuzzReport]:
    """The run() function of a target."""
    if name not in TARGETS:
        raise KeyError(f"unknown fuzz target {name!r} (known: {', '.join(TARGETS)})")
    return importlib.import_module(TARGETS[name]).run
