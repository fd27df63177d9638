"""A minimal sk_buff: what the driver hands up on receive and takes on transmit.

Linux's struct sk_buff carries far more; the modeled stack (kstack) extends this later.
Here: the frame bytes from the destination MAC up to the end of the payload (no FCS), the
EtherType (`protocol`, as eth_type_trans sets it) and the checksum verdict of RX offload.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SkBuff", "CHECKSUM_NONE", "CHECKSUM_UNNECESSARY", "ETH_HLEN"]

CHECKSUM_NONE = 0  # the stack must verify the checksum itself
CHECKSUM_UNNECESSARY = 1  # the device checked the TCP/UDP checksum and found it good

ETH_HLEN = 14


@dataclass(slots=True)
class SkBuff:
    data: bytes
    protocol: int = 0
    ip_summed: int = CHECKSUM_NONE

    @classmethod
    def from_frame(cls, frame: bytes, ip_summed: int = CHECKSUM_NONE) -> "SkBuff":
        """An sk_buff for a received Ethernet frame; `protocol` is its EtherType (or the
        802.3 length field, as is: this model does no LLC)."""
        proto = frame[12] << 8 | frame[13] if len(frame) >= ETH_HLEN else 0
        return cls(frame, proto, ip_summed)

    @property
    def len(self) -> int:
        return len(self.data)
