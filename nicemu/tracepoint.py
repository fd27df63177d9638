"""Tracepoints, as Linux has them: named stages any layer may mark, recorded only when asked.

Every package may import this module (the device package too: it imports nothing of the
project). A stage is marked with

    if tracepoint.enabled:
        tracepoint.emit("rx.dma", idx=3, RDH=4)

which costs one module attribute check when tracing is off. When it is on, emit() appends
(CLOCK_MONOTONIC ns, pid, stage, state) to a per-process buffer: CLOCK_MONOTONIC is one clock
for every process on the machine, so events of several processes line up on one time axis.

Tracing is turned on per process by the environment: NICEMU_TRACE=FILE makes this process
write its events as JSON lines to FILE.<pid> when it exits (atexit), on flush(), and whenever
the buffer holds MAX_BUFFERED events (memory stays bounded). Processes inherit the variable,
so a traced run is the real processes with the real clock. enable()/disable() do the same in
one process (tests). Compiled (Cython) data paths carry no tracepoints: a traced run uses
their pure-Python twins.
"""
from __future__ import annotations

import atexit
import json
import os
import time
from typing import Any

__all__ = ["enabled", "emit", "enable", "disable", "flush", "events", "clear", "read_events",
           "ENV", "MAX_BUFFERED"]

ENV = "NICEMU_TRACE"
MAX_BUFFERED = 100_000  # events held in memory before they go to the file

enabled: bool = False  # THE check on hot paths: `if tracepoint.enabled:`
_buffer: list[tuple[int, int, str, dict[str, Any]]] = []
_path: str | None = None  # the FILE prefix; None: keep the events in memory only
_registered = False


def emit(stage: str, **state: Any) -> None:
    """Record `stage` now in this process, with the state it touched (JSON-able values)."""
    if not enabled:
        return
    _buffer.append((time.monotonic_ns(), os.getpid(), stage, state))
    if _path is not None and len(_buffer) >= MAX_BUFFERED:
        flush()


def enable(path: str | None = None) -> None:
    """Start recording; with `path`, flush() appends to `path`.<pid> (and does at exit)."""
    global enabled, _path, _registered
    _path = path
    enabled = True
    if path is not None and not _registered:
        atexit.register(flush)
        _registered = True


def disable() -> None:
    """Stop recording (what is buffered stays until flush() or clear())."""
    global enabled
    enabled = False


def events() -> list[tuple[int, int, str, dict[str, Any]]]:
    """The events buffered in this process, oldest first."""
    return list(_buffer)


def clear() -> None:
    _buffer.clear()


def flush() -> None:
    """Append the buffered events to FILE.<pid> as JSON lines and empty the buffer."""
    if _path is None or not _buffer:
        return
    pid = os.getpid()  # a forked child writes its own file, not its parent's
    lines = [json.dumps({"t": t, "pid": p, "stage": s, "state": st}, default=str)
             for t, p, s, st in _buffer]
    _buffer.clear()
    try:
        with open(f"{_path}.{pid}", "a") as f:
            f.write("\n".join(lines) + "\n")
    except OSError:
        pass  # the directory went away: a trace must never break the process it watches


def read_events(path: str) -> list[dict[str, Any]]:
    """The events of one FILE.<pid> (lines that do not parse are skipped: a killed writer)."""
    out: list[dict[str, Any]] = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


if os.environ.get(ENV):
    enable(os.environ[ENV])
