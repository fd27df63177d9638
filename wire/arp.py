"""ARP (RFC 826) for IPv4 over Ethernet: the packet, its constants.

    ar$hrd 16 bits  hardware address space (1 = Ethernet)
    ar$pro 16 bits  protocol address space (an EtherType: 0x0800 for IP)
    ar$hln  8 bits  byte length of each hardware address
    ar$pln  8 bits  byte length of each protocol address
    ar$op  16 bits  opcode (ares_op$REQUEST | ares_op$REPLY)
    ar$sha, ar$spa, ar$tha, ar$tpa   sender/target hardware and protocol addresses
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from wire import MalformedPacket

__all__ = ["ARPHRD_ETHER", "ARPOP_REQUEST", "ARPOP_REPLY", "ARP_HDR_LEN", "ARP_ETH_IP_LEN",
           "ArpPacket"]

ARPHRD_ETHER = 1  # "Ethernet (10Mb)" in the hardware type registry
ARPOP_REQUEST = 1  # ares_op$REQUEST
ARPOP_REPLY = 2  # ares_op$REPLY
ARP_HDR_LEN = 8  # the fixed part, before the addresses
ARP_ETH_IP_LEN = 28  # with 6-byte hardware and 4-byte protocol addresses

_FIXED = struct.Struct("!HHBBH")
_ETH_IP = struct.Struct("!HHBBH6sI6sI")


@dataclass(slots=True)
class ArpPacket:
    """An ARP packet; addresses as bytes (hardware) and ints (IPv4) when hln=6, pln=4."""

    op: int
    sha: bytes
    spa: int
    tha: bytes
    tpa: int
    hrd: int = ARPHRD_ETHER
    pro: int = 0x0800
    hln: int = 6
    pln: int = 4

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> "ArpPacket":
        """Parse an ARP packet for Ethernet and IPv4; anything else is MalformedPacket (RFC
        826: "if the pair <protocol type, sender protocol address> is not one we speak, drop")."""
        if len(data) < ARP_HDR_LEN:
            raise MalformedPacket(f"{len(data)} bytes are shorter than the ARP header")
        hrd, pro, hln, pln, op = _FIXED.unpack_from(data, 0)
        if len(data) < ARP_HDR_LEN + 2 * (hln + pln):
            raise MalformedPacket(f"{len(data)} bytes cannot hold the addresses (hln {hln}, pln {pln})")
        if hln != 6 or pln != 4:
            raise MalformedPacket(f"address lengths {hln}/{pln} are not Ethernet/IPv4 (6/4)")
        _, _, _, _, _, sha, spa, tha, tpa = _ETH_IP.unpack_from(data, 0)
        return cls(op, sha, spa, tha, tpa, hrd, pro, hln, pln)

    def emit(self) -> bytes:
        return _ETH_IP.pack(self.hrd, self.pro, self.hln, self.pln, self.op, self.sha, self.spa,
                            self.tha, self.tpa)
