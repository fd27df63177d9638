"""The demo's emulator: `nicemu serve --pair` (nic0 and nic1 back to back in one process) with
a bounded pcap capture of the cable between them.

    python -m lab.demo_emulator --socket A --mac M0 --socket B --mac M1 [--pcap FILE]
        [--snaplen 256] [--max-frames 100000]

Without --pcap the cable is nicemu's `pair` (engine to engine, no Python per frame). With it,
the cable is CapturedPair: each device's transmit sink hands the frame to the other device
synchronously, as the pair cable does, through nicemu's capture (nicemu.cable.capture.
CapturedEnd, both ends into one PcapWriter): one file with every frame either device put on the
cable, in time order, FCS included, classic libpcap format. Not nicemu.cable.pair.PairCable with
a capture: that one passes each frame through an in-process pipe with an eventfd the event loop
wakes on, which doubled the emulator's CPU per packet in the demo; here a frame costs one
Python call and a buffered write. Bounded so that a long run cannot fill the disk: each record
keeps at most --snaplen bytes of its frame, and after --max-frames records the frames are
counted, not written. The file is flushed every FLUSH_INTERVAL s, not after every frame.

Prints "nicemu: ready" when both devices listen; on SIGTERM/SIGINT it closes everything and
prints one JSON line {"event": "pcap", "path", "written", "not_written", "snaplen",
"max_frames", "truncated"} before it exits.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from nicemu.cable.capture import CapturedEnd, PcapWriter

DEFAULT_SNAPLEN = 256  # every header of the demo's frames; TCP's 1514-byte segments are cut
DEFAULT_MAX_FRAMES = 100_000  # at most 100,000 x (16 + 256) bytes: 27 MB; the demo writes ~40,000 small ones
FLUSH_INTERVAL = 0.25  # s


class BoundedPcapWriter(PcapWriter):
    """A PcapWriter that writes at most `max_frames` records (the rest are counted in
    `not_written`), cuts frames to `snaplen` (counted in `truncated`) and flushes at most every
    `flush_interval` s, and on close."""

    def __init__(self, path: str, *, snaplen: int, max_frames: int,
                 flush_interval: float = FLUSH_INTERVAL) -> None:
        super().__init__(path, snaplen=snaplen, flush_each=False)
        self.max_frames = max_frames
        self.not_written = 0
        self.truncated = 0
        self._flush_ns = int(flush_interval * 1e9)
        self._flushed_at = self.clock()

    def write(self, frame: bytes, ts_ns: int | None = None) -> None:
        if self.count >= self.max_frames:
            self.not_written += 1
            return
        if ts_ns is None:
            ts_ns = self.clock()
        if len(frame) > self.snaplen:
            self.truncated += 1
        super().write(frame, ts_ns)
        if ts_ns - self._flushed_at >= self._flush_ns:
            self._flushed_at = ts_ns
            self.flush()


class _Into:
    """A cable end whose send() delivers into a device at once (nothing is ever held, so
    nothing arrives later: recv_frames is always empty)."""

    kind = "pair"
    link_up = True

    def __init__(self, nic: Any) -> None:
        self.nic = nic

    def send(self, frame: bytes) -> bool:
        self.nic.receive(frame)
        return True

    def recv_frames(self) -> list[bytes]:
        return []

    def writable(self) -> bool:
        return True

    def fileno(self) -> None:
        return None

    def close(self) -> None:
        pass


class CapturedPair:
    """Two devices back to back, every frame on the cable written to one pcap: each direction
    is a CapturedEnd (directions="tx") around a direct delivery into the other device."""

    def __init__(self, nic_a: Any, nic_b: Any, writer: PcapWriter) -> None:
        self.nic_a, self.nic_b, self.writer = nic_a, nic_b, writer
        self.end_a = CapturedEnd(_Into(nic_b), writer, directions="tx", close_writer=False)
        self.end_b = CapturedEnd(_Into(nic_a), writer, directions="tx", close_writer=False)
        nic_a.attach(self.end_a.send)
        nic_b.attach(self.end_b.send)
        nic_a.set_link(True)
        nic_b.set_link(True)

    def close(self) -> None:
        from nicemu.cable.base import unplugged

        for nic in (self.nic_a, self.nic_b):
            nic.attach(unplugged)
            nic.set_link(False)
        self.writer.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.demo_emulator", description=__doc__.split("\n\n")[0])
    ap.add_argument("--socket", action="append", required=True, metavar="PATH", help="nic0's, then nic1's")
    ap.add_argument("--mac", action="append", required=True, metavar="MAC", help="nic0's, then nic1's")
    ap.add_argument("--pcap", metavar="FILE", help="capture the cable to FILE (default: no capture)")
    ap.add_argument("--snaplen", type=int, default=DEFAULT_SNAPLEN, help=f"bytes kept of each frame (default {DEFAULT_SNAPLEN})")
    ap.add_argument("--max-frames", type=int, default=DEFAULT_MAX_FRAMES,
                    help=f"frames written at most; later ones are counted (default {DEFAULT_MAX_FRAMES})")
    a = ap.parse_args(argv)
    if len(a.socket) != 2 or len(a.mac) != 2:
        ap.error("give --socket and --mac twice: nic0, then nic1")

    from nicemu.dma import DmaMemory
    from nicemu.emulator import Emulator
    from nicemu.nic import Nic

    emu = Emulator()
    emu.catch_signals()  # before "ready": a SIGTERM right after it must be handled
    writer: BoundedPcapWriter | None = None
    try:
        nics = []
        for i, (path, mac) in enumerate(zip(a.socket, a.mac)):
            nic = Nic(DmaMemory(), mac=mac, engine="auto")
            emu.add_device(f"nic{i}", nic, path)
            nics.append(nic)
        if a.pcap:
            writer = BoundedPcapWriter(a.pcap, snaplen=a.snaplen, max_frames=a.max_frames)
            for nic in nics:
                emu.add_nic(nic)
            emu.add_closeable(CapturedPair(nics[0], nics[1], writer))
        else:
            emu.add_pair(nics[0], nics[1])
    except BaseException:
        emu.close()
        if writer is not None:
            writer.close()
        raise
    for name, server in emu.servers.items():
        print(f"nicemu: {name} {server.nic.mac} on {server.socket_path}", flush=True)
    print("nicemu: ready", flush=True)
    try:
        emu.run()  # closes the pair cable, and with it the capture
    finally:
        if writer is not None:
            writer.close()
            print(json.dumps({"event": "pcap", "path": os.path.abspath(a.pcap), "written": writer.count,
                              "not_written": writer.not_written, "snaplen": a.snaplen,
                              "max_frames": a.max_frames, "truncated": writer.truncated}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
