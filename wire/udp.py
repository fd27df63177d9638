"""UDP (RFC 768): the 8-byte header and its checksum over the IPv4 pseudo-header.

    source port, destination port, length (header + data, at least 8), checksum.
"If the computed checksum is zero, it is transmitted as all ones"; a transmitted zero means
the sender computed none, and the receiver must not check it.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from wire import MalformedPacket
from wire.checksum import fold, ones_sum, pseudo_header_sum
from wire.ipv4 import IPPROTO_UDP, IP_MAXPACKET, IPV4_MIN_HLEN

__all__ = ["UDP_HLEN", "UDP_MAX_PAYLOAD", "HDR", "UdpHeader", "udp_checksum"]

UDP_HLEN = 8
UDP_MAX_PAYLOAD = IP_MAXPACKET - IPV4_MIN_HLEN - UDP_HLEN  # 65507: larger is EMSGSIZE
HDR = struct.Struct("!HHHH")


def udp_checksum(segment: bytes | bytearray | memoryview, src: int, dst: int) -> int:
    """The checksum field for a UDP segment (its checksum field zero): never 0, which
    would mean "no checksum" (0 is sent as 0xFFFF)."""
    start = pseudo_header_sum(src.to_bytes(4, "big"), dst.to_bytes(4, "big"), IPPROTO_UDP, len(segment))
    c = ~fold(ones_sum(segment, start)) & 0xFFFF
    return c or 0xFFFF


@dataclass(slots=True)
class UdpHeader:
    sport: int
    dport: int
    length: int = UDP_HLEN
    checksum: int = 0

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview, src: int | None = None,
              dst: int | None = None) -> "UdpHeader":
        """Parse and check a segment (`data` is exactly the IP payload). The checksum is
        checked when src and dst are given and it is not zero."""
        if len(data) < UDP_HLEN:
            raise MalformedPacket(f"{len(data)} bytes are shorter than the UDP header")
        sport, dport, length, csum = HDR.unpack_from(data, 0)
        if length < UDP_HLEN:
            raise MalformedPacket(f"UDP length {length} is below 8")
        if length > len(data):
            raise MalformedPacket(f"UDP length {length} is longer than the {len(data)} bytes there")
        if csum and src is not None and dst is not None:
            start = pseudo_header_sum(src.to_bytes(4, "big"), dst.to_bytes(4, "big"), IPPROTO_UDP, length)
            if fold(ones_sum(data[:length], start)) != 0xFFFF:
                raise MalformedPacket("UDP checksum is wrong")
        return cls(sport, dport, length, csum)

    def emit(self, payload: bytes, src: int | None = None, dst: int | None = None) -> bytes:
        """Header + payload; with src and dst the checksum is computed, else it is zero."""
        length = UDP_HLEN + len(payload)
        seg = bytearray(HDR.pack(self.sport, self.dport, length, 0)) + payload
        if src is not None and dst is not None:
            c = udp_checksum(seg, src, dst)
            seg[6] = c >> 8
            seg[7] = c & 0xFF
        return bytes(seg)
