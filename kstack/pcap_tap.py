"""A packet tap that writes a pcap file: what `tcpdump -i DEV -w FILE` does in Linux.

The stack hands every tap a clone of each frame going in (before eth_type_trans) and out
(at dev_queue_xmit, before the qdisc), as AF_PACKET taps get clones in dev_queue_xmit_nit
and __netif_receive_skb_core: the bytes are shared, not copied, and a layer that later
changes the original copies first (skb_cow), so the capture shows the frame as it was. The
tap writes the clone's bytes and frees it.

The file is classic pcap with link type Ethernet (1), as tcpdump writes it: frames from the
destination MAC up to the end of the payload, no FCS (the device adds and strips that).
The writer is nicemu.cable.capture's (one pcap writer in the project); timestamps are wall-clock time
when the frame passed the tap.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable

from nicemu.cable.capture import PcapWriter

if TYPE_CHECKING:
    from kstack.netdevice import NetDevice
    from kstack.skbuff import SkBuff
    from kstack.stack import NetStack

__all__ = ["PcapTap", "DIRECTIONS"]

DIRECTIONS = ("both", "in", "out")  # tcpdump -Q inout | in | out


class PcapTap:
    """Capture `dev`'s frames into `path` until close(). `direction`: "both", "in" or
    "out". `snaplen`: bytes kept per frame (tcpdump -s). `flush_each`: write every record
    through at once (tcpdump -U), so a capture survives kill -9 of the kernel process."""

    def __init__(self, stack: "NetStack", dev: "NetDevice", path: str | os.PathLike[str], *,
                 direction: str = "both", snaplen: int = 262144, flush_each: bool = True) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction {direction!r}: one of {', '.join(DIRECTIONS)}")
        self.dev = dev
        self.direction = direction
        self.writer = PcapWriter(path, snaplen=snaplen, fcs_in_header=False, flush_each=flush_each)
        self.frames_in = 0
        self.frames_out = 0
        self.bytes = 0
        self._remove: Callable[[], None] | None = stack.add_tap(dev, self._tap)

    def _tap(self, skb: "SkBuff", outgoing: bool) -> None:
        try:
            if self.direction == "both" or (self.direction == "out") == outgoing:
                self.writer.write(skb.view())
                self.bytes += skb.len
                if outgoing:
                    self.frames_out += 1
                else:
                    self.frames_in += 1
        finally:
            skb.consume()  # the clone is the tap's to free

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        """Stop capturing and close the file (idempotent)."""
        if self._remove is not None:
            self._remove()
            self._remove = None
        self.writer.close()

    def stats(self) -> dict[str, int | str]:
        return {"file": str(self.writer.path), "frames_in": self.frames_in,
                "frames_out": self.frames_out, "bytes": self.bytes}

    def __enter__(self) -> "PcapTap":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
