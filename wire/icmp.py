"""ICMP for IPv4 (RFC 792): the 8-byte header, types and codes as Linux's icmp.h names them.

    type 8 bits, code 8 bits, checksum 16 bits (over the whole ICMP message),
    then 4 bytes whose meaning depends on the type (identifier and sequence number for echo,
    "unused" or the next-hop MTU for destination unreachable, zero for time exceeded),
    then data (for errors: the offending IP header and its first 64 bits of payload).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from wire import MalformedPacket
from wire.checksum import internet_checksum

__all__ = [
    "ICMP_ECHOREPLY", "ICMP_DEST_UNREACH", "ICMP_SOURCE_QUENCH", "ICMP_REDIRECT", "ICMP_ECHO",
    "ICMP_TIME_EXCEEDED", "ICMP_PARAMETERPROB", "ICMP_TIMESTAMP", "ICMP_TIMESTAMPREPLY",
    "ICMP_INFO_REQUEST", "ICMP_INFO_REPLY", "ICMP_ADDRESS", "ICMP_ADDRESSREPLY", "NR_ICMP_TYPES",
    "ICMP_NET_UNREACH", "ICMP_HOST_UNREACH", "ICMP_PROT_UNREACH", "ICMP_PORT_UNREACH",
    "ICMP_FRAG_NEEDED", "ICMP_SR_FAILED", "NR_ICMP_UNREACH", "ICMP_EXC_TTL", "ICMP_EXC_FRAGTIME",
    "ICMP_HDR_LEN", "IcmpMessage", "is_error_type", "HDR",
]

ICMP_ECHOREPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_SOURCE_QUENCH = 4
ICMP_REDIRECT = 5
ICMP_ECHO = 8
ICMP_TIME_EXCEEDED = 11
ICMP_PARAMETERPROB = 12
ICMP_TIMESTAMP = 13
ICMP_TIMESTAMPREPLY = 14
ICMP_INFO_REQUEST = 15
ICMP_INFO_REPLY = 16
ICMP_ADDRESS = 17
ICMP_ADDRESSREPLY = 18
NR_ICMP_TYPES = 18

# Destination Unreachable codes (RFC 792, RFC 1122 3.2.2.1)
ICMP_NET_UNREACH = 0
ICMP_HOST_UNREACH = 1
ICMP_PROT_UNREACH = 2
ICMP_PORT_UNREACH = 3
ICMP_FRAG_NEEDED = 4  # "fragmentation needed and DF set"; RFC 1191 puts the MTU in bytes 6-7
ICMP_SR_FAILED = 5
NR_ICMP_UNREACH = 15

# Time Exceeded codes
ICMP_EXC_TTL = 0  # "time to live exceeded in transit"
ICMP_EXC_FRAGTIME = 1  # "fragment reassembly time exceeded"

ICMP_HDR_LEN = 8
HDR = struct.Struct("!BBHI")  # type, code, checksum, rest of header

_ERRORS = frozenset({ICMP_DEST_UNREACH, ICMP_SOURCE_QUENCH, ICMP_REDIRECT, ICMP_TIME_EXCEEDED,
                     ICMP_PARAMETERPROB})


def is_error_type(t: int) -> bool:
    """An ICMP error message (RFC 1122 3.2.2: no error is sent about one of these). Unknown
    types count as errors, as Linux's icmp_pointers marks them, so nothing answers them."""
    return t in _ERRORS or t > NR_ICMP_TYPES


@dataclass(slots=True)
class IcmpMessage:
    type: int
    code: int
    rest: int = 0  # the 4 bytes after the checksum, as a big-endian int
    data: bytes = b""
    checksum: int = 0

    @property
    def ident(self) -> int:
        return self.rest >> 16

    @property
    def sequence(self) -> int:
        return self.rest & 0xFFFF

    @classmethod
    def echo(cls, ident: int, seq: int, data: bytes = b"", reply: bool = False) -> "IcmpMessage":
        return cls(ICMP_ECHOREPLY if reply else ICMP_ECHO, 0, (ident & 0xFFFF) << 16 | seq & 0xFFFF, data)

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview, check_csum: bool = True) -> "IcmpMessage":
        if len(data) < ICMP_HDR_LEN:
            raise MalformedPacket(f"{len(data)} bytes are shorter than the ICMP header")
        if check_csum and internet_checksum(data) != 0:
            raise MalformedPacket("ICMP checksum is wrong")
        t, c, csum, rest = HDR.unpack_from(data, 0)
        return cls(t, c, rest, bytes(data[ICMP_HDR_LEN:]), csum)

    def emit(self) -> bytes:
        msg = bytearray(HDR.pack(self.type, self.code, 0, self.rest))
        msg += self.data
        c = internet_checksum(msg)
        msg[2] = c >> 8
        msg[3] = c & 0xFF
        return bytes(msg)
