"""Cables: what a NIC port plugs into. See docs/cables.md.

Every cable end implements `CableEnd` (nicemu.cable.base): send(frame) -> bool, fileno(),
recv_frames(), writable(), link_up, close(); frames always carry their FCS.

`KINDS` below is the only list of cable kinds: YAML kind -> the module that is that kind. A
kind's module (nicemu/cable/<kind>.py) declares everything about it, so adding a kind is one
file plus one row here:

    ENDS = (lo, hi)             how many devices of a topology it joins
    KEYS = ("key", ...)         its own YAML keys (besides kind, ends, capture, faults)
    SAME_PROCESS = False        True: its devices must run in one process (pair)
    def check(cc) -> dict       validate its keys (cc: nicemu.topology.validate.CableCheck),
                                report problems with cc.err, return CableSpec.options
    def build(cable, local, ctx) -> [(device, end)]
                                open this process's ends (ctx: nicemu.topology.build.BuildContext)
    def make(**options)         `make_cable(kind, **options)`, options named as the YAML keys
    def host_problems(cable) -> [(key, message)]    optional: what the host lacks for it

`make_cable("pipe", limit=256)` gives two in-process ends (nicemu.cable.pair.pipe); two Nics
in one process use `PairCable(nic_a, nic_b, ...)` (kind `pair`).

`wrap_end(end, capture=..., faults_tx=..., faults_rx=...)` adds fault injection (inside,
nicemu.cable.faults) and a pcap capture (outside, nicemu.cable.capture, so the capture shows
what the port saw) to any end. Those wrappers import the base; nothing here or in the base
imports them at import time.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any, Callable, Mapping

from nicemu.cable.base import CableEnd, CableError, plug, service

__all__ = ["CableEnd", "CableError", "KINDS", "cable_kind", "kind_module", "layer_name", "make_cable", "plug",
           "service", "wrap_end"]

KINDS: dict[str, str] = {  # YAML kind -> module; the one list of cable kinds
    "pair": "nicemu.cable.pair",
    "shm": "nicemu.cable.shm",
    "unix": "nicemu.cable.unix",
    "udp": "nicemu.cable.udp",
    "tap": "nicemu.cable.tap",
}


def kind_module(kind: str) -> ModuleType:
    """The module of a registered kind (imported on first use: validating a topology must not
    need, say, the shm extension loaded). KeyError for an unknown kind."""
    return importlib.import_module(KINDS[kind])


def layer_name(end: Any) -> str | None:
    """"faults" or "capture" for a wrapper layer (named as its YAML key), None for a cable end."""
    from nicemu.cable.capture import CapturedEnd
    from nicemu.cable.faults import FaultyEnd

    if isinstance(end, FaultyEnd):
        return "faults"
    if isinstance(end, CapturedEnd):
        return "capture"
    return None


def cable_kind(end: Any) -> str:
    """The YAML kind (pair, shm, unix, udp, tap) of the cable an end belongs to, looking through
    fault and capture layers; an end of unknown type is named by its class."""
    for _ in range(8):
        inner = getattr(end, "inner", None)
        if inner is None or inner is end:
            break
        end = inner
    kind = getattr(end, "kind", None)
    return kind if isinstance(kind, str) else type(end).__name__


def make_cable(kind: str, **options: Any) -> Any:
    """Open a cable of `kind` ("pipe" or a kind of KINDS, through its module's `make`). Unknown
    kinds or options raise ValueError (TypeError for an unknown keyword is turned into a message
    naming the option)."""
    if kind == "pipe":
        from nicemu.cable.pair import pipe as factory
    elif kind in KINDS:
        factory = kind_module(kind).make
    else:
        raise ValueError(f"unknown cable kind {kind!r} (known: pipe, {', '.join(KINDS)})")
    try:
        return factory(**options)
    except TypeError as e:
        raise ValueError(f"{kind} cable: {e}") from None


def wrap_end(
    end: CableEnd,
    *,
    capture: str | os.PathLike[str] | None = None,
    faults_tx: Mapping[str, Any] | None = None,
    faults_rx: Mapping[str, Any] | None = None,
    clock: Callable[[], int] | None = None,
) -> CableEnd:
    """Faults (if any are active) inside, capture outside. Closes `end` if wrapping fails."""
    from nicemu.cable.capture import CapturedEnd
    from nicemu.cable.faults import FaultConfig, FaultyEnd

    try:
        tx = FaultConfig.from_dict(faults_tx)
        rx = FaultConfig.from_dict(faults_rx)
        if tx.active or rx.active:
            end = FaultyEnd(end, tx=tx, rx=rx, clock=clock)
        if capture is not None:
            end = CapturedEnd(end, capture)
    except BaseException:
        end.close()
        raise
    return end
