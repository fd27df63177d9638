"""Packet capture in the classic libpcap format, FCS included, and a capture wrapper for any
cable end.

Why classic pcap: tcpdump, tshark and Wireshark all read it, and it is simple enough to write
byte by byte (https://www.tcpdump.org/manpages/pcap-savefile.5.html). The global header is
magic 0xa1b2c3d4 (microsecond timestamps), version 2.4, snaplen, and the link type
LINKTYPE_ETHERNET (1). Each record is ts_sec, ts_usec, captured length, original length.

The frames are what the wire carries, so every record ends with the 4-byte FCS. The pcap
format can say so: the top bits of the link-type word (pcap-savefile(5), "LinkType and
additional information"; libpcap's LT_FCS_DATALINK_EXT) hold the P bit (0x04000000, "FCS
length present") and the FCS length in 16-bit units in bits 28..31 (2 -> 4 bytes), i.e. the
word is 0x24000001 (`fcs_in_header=True`, the default). libpcap (tcpdump) and Wireshark's
reader mask it down to link type 1 and tshark then knows the last 4 bytes are the FCS; with
`fcs_in_header=False` the word is exactly 1 and tshark must be told (`-o eth.fcs:Always`).
Either way tshark checks the FCS with:

    tshark -r port.pcap -o eth.check_fcs:TRUE -T fields -e frame.number -e eth.fcs.status

(see docs/cables.md; with fcs_in_header=False add `-o eth.fcs:Always`.) eth.fcs.status is
"1" (good) or "0" (bad). Classic pcap has no direction field: `CapturedEnd` writes what the
port sends and what it receives into one file in time order; use two wrappers with
`directions="tx"`/`"rx"` to get one file per direction.
"""
from __future__ import annotations

import os
import struct
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, NamedTuple, Sequence

from nicemu.cable.base import CableEnd

__all__ = [
    "LINKTYPE_ETHERNET",
    "PCAP_MAGIC",
    "CapturedEnd",
    "PcapRecord",
    "PcapWriter",
    "RingCapture",
    "read_pcap",
]

PCAP_MAGIC = 0xA1B2C3D4
LINKTYPE_ETHERNET = 1
FCS_PRESENT = 1 << 26  # the "P" (FCS length present) bit of the link-type word
FCS_LEN_4 = 2 << 28  # FCS length in 16-bit units, bits 28..31 (2 -> 4 bytes)
GLOBAL_HEADER = struct.Struct("<IHHiIII")  # magic, major, minor, thiszone, sigfigs, snaplen, network
RECORD_HEADER = struct.Struct("<IIII")  # ts_sec, ts_usec, incl_len, orig_len


class PcapRecord(NamedTuple):
    ts_ns: int
    data: bytes
    orig_len: int


class PcapWriter:
    """Writes frames to a classic pcap file. `path` may be a path or a binary file object.

    flush_each: flush after every record, so a capture survives kill -9 of the emulator and
    can be followed live (`tail -c +1 -f port.pcap | tshark -r -`). Costs a write per frame.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | BinaryIO,
        *,
        snaplen: int = 65535,
        fcs_in_header: bool = True,
        flush_each: bool = True,
        clock: Callable[[], int] | None = None,
    ) -> None:
        if not 0 < snaplen <= 0x7FFFFFFF:
            raise ValueError(f"pcap snaplen must be positive, got {snaplen}")
        self.snaplen = snaplen
        self.flush_each = flush_each
        self.clock = clock or time.time_ns  # pcap timestamps are wall-clock time
        self.count = 0
        if isinstance(path, (str, os.PathLike)):
            self.path: Path | None = Path(path)
            self._f: BinaryIO = open(self.path, "wb")
            self._owns = True
        else:
            self.path = None
            self._f = path
            self._owns = False
        network = LINKTYPE_ETHERNET | ((FCS_PRESENT | FCS_LEN_4) if fcs_in_header else 0)
        self._f.write(GLOBAL_HEADER.pack(PCAP_MAGIC, 2, 4, 0, 0, snaplen, network))
        if flush_each:
            self._f.flush()

    def write(self, frame: bytes, ts_ns: int | None = None) -> None:
        """Append one frame (FCS included), stamped ts_ns (default: the clock now)."""
        if self._f is None:
            raise ValueError("pcap writer is closed")
        if ts_ns is None:
            ts_ns = self.clock()
        sec, ns = divmod(ts_ns, 1_000_000_000)
        incl = min(len(frame), self.snaplen)
        self._f.write(RECORD_HEADER.pack(sec & 0xFFFFFFFF, ns // 1000, incl, len(frame)))
        self._f.write(frame[:incl])
        self.count += 1
        if self.flush_each:
            self._f.flush()

    def write_records(self, records: bytes, count: int) -> None:
        """Append `count` records already in this format (RECORD_HEADER, then the bytes, at
        most snaplen of them): what a capture ring's drain() returns (nicemu.cable.capring)."""
        if self._f is None:
            raise ValueError("pcap writer is closed")
        self._f.write(records)
        self.count += count
        if self.flush_each:
            self._f.flush()

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()

    def close(self) -> None:
        if self._f is None:
            return
        f, self._f = self._f, None
        if self._owns:
            f.close()
        else:
            f.flush()

    def __enter__(self) -> "PcapWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_pcap(path: str | os.PathLike[str] | bytes) -> tuple[int, list[PcapRecord]]:
    """Parse a classic pcap file (either byte order, micro- or nanosecond magic).

    Returns (link-type word, records). Truncated or malformed files raise ValueError saying
    where; for tests and tools, not a hot path."""
    data = path if isinstance(path, bytes) else Path(path).read_bytes()
    if len(data) < GLOBAL_HEADER.size:
        raise ValueError(f"pcap: file shorter than the {GLOBAL_HEADER.size}-byte global header")
    magic_le = struct.unpack_from("<I", data)[0]
    for endian in "<>":
        magic = struct.unpack_from(endian + "I", data)[0]
        if magic in (0xA1B2C3D4, 0xA1B23C4D):
            break
    else:
        raise ValueError(f"pcap: bad magic {magic_le:#010x}")
    nano = magic == 0xA1B23C4D
    hdr = struct.Struct(endian + "IHHiIII")
    rec = struct.Struct(endian + "IIII")
    _, _major, _minor, _, _, _snaplen, network = hdr.unpack_from(data)
    off = hdr.size
    out: list[PcapRecord] = []
    while off < len(data):
        if off + rec.size > len(data):
            raise ValueError(f"pcap: truncated record header at offset {off}")
        sec, frac, incl, orig = rec.unpack_from(data, off)
        off += rec.size
        if off + incl > len(data):
            raise ValueError(f"pcap: truncated record data at offset {off}")
        ts = sec * 1_000_000_000 + (frac if nano else frac * 1000)
        out.append(PcapRecord(ts, data[off : off + incl], orig))
        off += incl
    return network, out


class CapturedEnd:
    """A CableEnd that records what passes through another one into a PcapWriter.

    Placed outermost (on the NIC's side of any fault injector), it shows the port's view:
    every frame the NIC transmitted (accepted by the cable) and every frame the NIC received,
    as the NIC received it (corrupted ones included).

    directions: "both" (default), "tx" (what the port sends) or "rx" (what it receives).
    close_writer: close the writer with the end (False when several ends share one writer).
    """

    def __init__(
        self,
        inner: CableEnd,
        writer: PcapWriter | str | os.PathLike[str],
        *,
        directions: str = "both",
        close_writer: bool = True,
    ) -> None:
        if directions not in ("both", "tx", "rx"):
            raise ValueError(f"capture directions must be 'both', 'tx' or 'rx', got {directions!r}")
        self.inner = inner
        self.writer = writer if isinstance(writer, PcapWriter) else PcapWriter(writer)
        self._tx = directions in ("both", "tx")
        self._rx = directions in ("both", "rx")
        self._close_writer = close_writer

    @property
    def link_up(self) -> bool:
        return self.inner.link_up

    def fileno(self) -> int | None:
        return self.inner.fileno()

    def send(self, frame: bytes) -> bool:
        if not self.inner.send(frame):
            return False  # not on the wire yet: it is captured when the cable takes it
        if self._tx:
            self.writer.write(frame)
        return True

    def recv_frames(self) -> list[bytes]:
        frames = self.inner.recv_frames()
        if self._rx and frames:
            now = self.writer.clock()
            for f in frames:
                self.writer.write(f, now)
        return frames

    def writable(self) -> bool:
        return self.inner.writable()

    def run_timers(self) -> None:
        rt = getattr(self.inner, "run_timers", None)
        if rt is not None:
            rt()

    def next_deadline(self) -> int | None:
        nd = getattr(self.inner, "next_deadline", None)
        return nd() if nd is not None else None

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            if self._close_writer:
                self.writer.close()


class RingCapture:
    """The capture of a linked pair of engines (`nicemu serve --pair --pcap`): one capture ring
    (nicemu.cable.capring) shared by both engines, which record every frame they put on the
    wire into it (both directions, in time order) with a clock read and one copy of at most
    `snaplen` bytes; the emulator's loop drains it into one pcap file (PcapWriter) as a timer
    source, `interval_ns` after the first frame waiting, and on close.

    Bounded: a frame that finds the ring full (`capacity` bytes) is not captured; after
    `max_frames` records (None: no limit) the rest are dropped at the drain; both are counted
    in report()["not_written"]. report() is the closing JSON line of `nicemu serve --pcap`.

    `also`: more files that get the same records (a topology's `pair` cable with a capture on
    each port: on a cable without faults both ports see the same frames)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        also: Sequence[str | os.PathLike[str]] = (),
        snaplen: int = 65535,
        max_frames: int | None = None,
        capacity: int = 1 << 23,
        interval_ns: int = 100_000_000,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        from nicemu.cable.capring import make_ring

        if max_frames is not None and max_frames < 0:
            raise ValueError(f"capture max_frames must be >= 0, got {max_frames}")
        self.writer = PcapWriter(path, snaplen=snaplen, flush_each=False)
        self.path = self.writer.path
        self.also: list[PcapWriter] = []
        try:
            for p in also:
                self.also.append(PcapWriter(p, snaplen=snaplen, flush_each=False))
        except BaseException:
            for w in (self.writer, *self.also):
                w.close()
            raise
        self.snaplen = snaplen
        self.max_frames = max_frames
        self.interval_ns = interval_ns
        self.clock = clock
        self._compiled = make_ring(capacity, snaplen)
        self._ref = None  # a pure-Python ring, made only if a Python engine is attached
        self._capacity = capacity
        self.engines: list[Any] = []
        self.dropped = 0  # records beyond max_frames
        self.truncated = 0  # records written shorter than their frame
        self._due: int | None = None

    def attach(self, *engines: Any) -> None:
        """Record what these data-path engines send (a Nic's .engine)."""
        from nicemu.cable.capring import CapRingRef

        for e in engines:
            try:
                e.capture = self._compiled
            except TypeError:  # a Python engine with a compiled ring, or the reverse
                if self._ref is None:
                    self._ref = CapRingRef(self._capacity, self.snaplen)
                e.capture = self._ref
            self.engines.append(e)

    def _rings(self) -> list[Any]:
        return [r for r in (self._compiled, self._ref) if r is not None]

    def fileno(self) -> None:
        return None

    def next_deadline(self) -> int | None:
        if not (len(self._compiled) or (self._ref is not None and len(self._ref))):
            self._due = None
            return None
        if self._due is None:
            self._due = self.clock() + self.interval_ns
        return self._due

    def run_timers(self) -> None:
        if self._due is not None and self.clock() >= self._due:
            self.drain()

    def drain(self) -> int:
        """Write what the ring holds (up to max_frames in all); returns records written."""
        self._due = None
        parts = []
        count = self.writer.count
        for ring in self._rings():
            left = -1 if self.max_frames is None else max(0, self.max_frames - count)
            blob, n, cut, dropped = ring.drain(left)
            self.dropped += dropped
            self.truncated += cut
            count += n
            if n:
                parts.append((blob, n))
        if len(parts) == 2:  # mixed engines: two rings, each in time order
            records = _merge(parts[0][0], parts[1][0])
            parts = [(b"".join(records), len(records))]
        written = 0
        for blob, n in parts:
            for w in (self.writer, *self.also):
                w.write_records(blob, n)
            written += n
        if written:
            for w in (self.writer, *self.also):
                w.flush()
        return written

    @property
    def not_captured(self) -> int:
        """Frames the full ring refused."""
        return sum(r.not_captured for r in self._rings())

    def report(self) -> dict:
        return {"event": "pcap", "path": os.path.abspath(self.path) if self.path else None,
                "written": self.writer.count, "not_written": self.dropped + self.not_captured,
                "not_captured": self.not_captured, "snaplen": self.snaplen,
                "max_frames": self.max_frames, "truncated": self.truncated}

    def close(self) -> None:
        """Detach from the engines, write what is left, close the file."""
        if self.writer._f is None:
            return
        for e in self.engines:
            e.capture = None
        try:
            self.drain()
        finally:
            for w in (self.writer, *self.also):
                w.close()


def _merge(a: bytes, b: bytes) -> list[bytes]:
    """The pcap records of two blobs, in timestamp order."""
    def split(blob: bytes) -> list[tuple[tuple[int, int], bytes]]:
        out, off = [], 0
        while off < len(blob):
            sec, usec, incl, _ = RECORD_HEADER.unpack_from(blob, off)
            out.append(((sec, usec), blob[off : off + RECORD_HEADER.size + incl]))
            off += RECORD_HEADER.size + incl
        return out

    return [r for _, r in sorted(split(a) + split(b), key=lambda t: t[0])]
