"""The internet checksum (RFC 1071) and the TCP/UDP pseudo-header (RFC 768, RFC 9293).

The checksum is the 16-bit one's complement of the one's complement sum of 16-bit words; an
odd byte at the end is padded with a zero. A header or segment that carries its checksum sums
to 0xFFFF, so `internet_checksum(data) == 0` checks it.
"""
from __future__ import annotations

import struct

__all__ = ["ones_sum", "fold", "internet_checksum", "pseudo_header_sum", "checksum_ok"]


def ones_sum(data: bytes | bytearray | memoryview, start: int = 0) -> int:
    """The unfolded sum of `data`'s 16-bit big-endian words plus `start` (fold() it after)."""
    n = len(data)
    if n & 1:
        data = bytes(data) + b"\x00"
        n += 1
    # int.from_bytes of the whole buffer, then add its 16-bit words by folding: fast in CPython
    # because it stays in C. Sum of words = value mod 0xFFFF (with 0xFFFF kept distinct below).
    total = start
    if n:
        v = int.from_bytes(data, "big")
        s = v % 0xFFFF
        if s == 0 and v != 0:
            s = 0xFFFF
        total += s
    return total


def fold(total: int) -> int:
    """Fold carries into 16 bits (end-around carry)."""
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def internet_checksum(data: bytes | bytearray | memoryview, start: int = 0) -> int:
    """The checksum field value for `data` (with its checksum field zero), or 0 when `data`
    already carries a correct checksum."""
    return ~fold(ones_sum(data, start)) & 0xFFFF


def pseudo_header_sum(src: bytes, dst: bytes, protocol: int, length: int) -> int:
    """The unfolded sum of the IPv4 pseudo-header: source, destination, zero, protocol,
    TCP/UDP length (RFC 768)."""
    return ones_sum(src + dst + struct.pack("!BBH", 0, protocol, length))


def checksum_ok(data: bytes | bytearray | memoryview, start: int = 0) -> bool:
    """True when `data`, checksum field included, sums to all ones."""
    return fold(ones_sum(data, start)) == 0xFFFF


