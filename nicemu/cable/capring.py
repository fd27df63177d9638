"""A capture ring: frames recorded where they cross a cable, for a pcap drained later.

Why: writing a pcap record from the send path costs a Python call and a file write per frame;
on the linked fast path (two data-path engines back to back, `nicemu serve --pair`) that is
more than the emulator's own work per frame. The ring makes the per-frame cost one clock read
and one copy of at most `snaplen` bytes, from C (nicemu/cable/_capring.pyx; the engines call it
from their send path when `engine.capture` is a ring), and the emulator's loop drains it into
the pcap file every so often (nicemu.cable.capture.RingCapture).

Behaviour (this pure-Python class, CapRingRef, is the specification; the compiled CapRing is
held to it by tests/cable/test_capring.py):
- fixed capacity in bytes: a record takes 16 bytes of header plus its captured bytes rounded
  up to 8; a frame that does not fit is counted in `not_captured` and not recorded (the ring
  never blocks a sender and never grows);
- each record: timestamp (ns, wall clock; or k * clock_step_ns for the k-th frame, in tests),
  original length, at most `snaplen` bytes of the frame;
- `fcs_owed`: the frame's last 4 bytes are not written yet (a linked Cython engine hands its
  peer a frame before its FCS, docs/datapath.md "Deferred FCS"): drain() writes them, as much of
  them as the snap length keeps, as the CRC-32 of the rest;
- drain(limit) empties the ring and returns (classic pcap records as bytes, records in them,
  how many of those are cut by the snap length, records beyond `limit` dropped).
"""
from __future__ import annotations

import time
import zlib

__all__ = ["CapRingRef", "HEADER", "make_ring"]

HEADER = 16  # a record's header, in the ring and in the pcap file


def _record_size(incl: int) -> int:
    return HEADER + ((incl + 7) & ~7)


class CapRingRef:
    """The capture ring in Python (see the module docstring)."""

    def __init__(self, capacity: int = 1 << 22, snaplen: int = 65535, clock_step_ns: int = 0) -> None:
        if not HEADER + 8 <= capacity <= 1 << 40:
            raise ValueError(f"capture ring capacity must be 24 bytes to 1 TiB, got {capacity}")
        if not 1 <= snaplen <= 0x7FFFFFFF:
            raise ValueError(f"capture snaplen must be 1 to 2**31 - 1, got {snaplen}")
        self.capacity = capacity
        self.snaplen = snaplen
        self._clock_step = clock_step_ns
        self._fake_now = 0
        self._records: list[tuple[int, int, bytes, bool]] = []  # ts_ns, orig_len, data, fcs_owed
        self.used = 0
        self.captured = 0
        self.not_captured = 0

    def push(self, frame: bytes, fcs_owed: bool = False) -> bool:
        n = len(frame)
        incl = min(n, self.snaplen)
        rec = _record_size(incl)
        if rec > self.capacity - self.used:
            self.not_captured += 1
            return False
        if self._clock_step:
            self._fake_now += self._clock_step
            ts = self._fake_now
        else:
            ts = time.time_ns()
        self._records.append((ts, n, bytes(frame[:incl]), fcs_owed))
        self.used += rec
        self.captured += 1
        return True

    def __len__(self) -> int:
        return len(self._records)

    def drain(self, limit: int = -1) -> tuple[bytes, int, int, int]:
        recs = self._records if limit < 0 else self._records[:limit]
        out = bytearray()
        truncated = 0
        for ts, n, data, owed in recs:
            incl = len(data)
            if owed and n >= 4 and incl > n - 4:
                fcs = zlib.crc32(data[: n - 4]).to_bytes(4, "little")
                data = data[: n - 4] + fcs[: incl - (n - 4)]
            sec, ns = divmod(ts, 1_000_000_000)
            out += (sec & 0xFFFFFFFF).to_bytes(4, "little") + (ns // 1000).to_bytes(4, "little")
            out += incl.to_bytes(4, "little") + n.to_bytes(4, "little") + data
            truncated += incl < n
        discarded = len(self._records) - len(recs)
        self._records = []
        self.used = 0
        return bytes(out), len(recs), truncated, discarded


def make_ring(capacity: int = 1 << 22, snaplen: int = 65535, *, compiled: bool = True, clock_step_ns: int = 0):
    """The compiled CapRing (a Cython engine can record into it without Python), or CapRingRef
    when compiled=False or the extension is not built (then Cython engines ignore it: they
    take only a CapRing; nicemu.cable.capture.RingCapture picks for its engines)."""
    if compiled:
        try:
            from nicemu.cable._capring import CapRing
        except ImportError:
            pass
        else:
            return CapRing(capacity, snaplen, clock_step_ns)
    return CapRingRef(capacity, snaplen, clock_step_ns)
