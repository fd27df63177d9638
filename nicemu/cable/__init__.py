"""Cables: what a NIC port plugs into. See docs/cables.md.

Every cable end implements `CableEnd` (nicemu.cable.base): send(frame) -> bool, fileno(),
recv_frames(), writable(), link_up, close(); frames always carry their FCS.

    make_cable(kind, **options)

opens a cable by kind, with the options as keyword arguments named as the YAML keys:

    kind    options                             returns
    pipe    limit=256                           (end_a, end_b): in-process CableEnds
    shm     ring_bytes=1 MiB                    (end_a, end_b): shared memory, movable to
                                                 another process (ShmCableEnd.from_fds)
    unix    path, peer, pulse_ms=250            one end: AF_UNIX datagrams
    udp     local="127.0.0.1:0", remote=None    one end: UDP datagrams
    tap     name="nicemu%d", netns=None         one end: a Linux TAP device

Two Nics in one process use `PairCable(nic_a, nic_b, ...)` (kind `pair`, nicemu.cable.pair),
which takes the devices rather than returning ends.

`wrap_end(end, capture=..., faults_tx=..., faults_rx=...)` adds fault injection (inside) and
a pcap capture (outside, so the capture shows what the port saw) to any end.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

from nicemu.cable.base import CableEnd, CableError, plug, service

__all__ = ["CableEnd", "CableError", "KINDS", "cable_kind", "layer_name", "make_cable", "plug", "service",
           "wrap_end"]

KINDS = ("pipe", "shm", "unix", "udp", "tap")


def layer_name(end: Any) -> str | None:
    """"faults" or "capture" for a wrapper layer (named as its YAML key), None for a cable end."""
    from nicemu.faults import FaultyEnd
    from nicemu.pcap import CapturedEnd

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
    """Open a cable of `kind` (see the table above). Unknown kinds or options raise ValueError
    (TypeError for an unknown keyword is turned into a message naming the option)."""
    if kind == "pipe":
        from nicemu.cable.pair import pipe as factory
    elif kind == "shm":
        from nicemu.cable.shm import ShmCable

        factory = ShmCable.create
    elif kind == "unix":
        from nicemu.cable.unix import UnixCableEnd as factory
    elif kind == "udp":
        from nicemu.cable.udp import UdpCableEnd as factory
    elif kind == "tap":
        from nicemu.cable.tap import TapCableEnd as factory
    elif kind == "pair":
        raise ValueError("a pair cable joins two Nics: use nicemu.cable.pair.PairCable(nic_a, nic_b, ...)")
    else:
        raise ValueError(f"unknown cable kind {kind!r} (known: {', '.join(KINDS)})")
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
    from nicemu.faults import FaultConfig, FaultyEnd
    from nicemu.pcap import CapturedEnd

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
