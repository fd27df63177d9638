"""The Ethernet frame check sequence (IEEE 802.3 clause 3.2.9), in pure Python.

The FCS is the CRC-32 of zlib.crc32 (reflected polynomial 0xEDB88320, initial value and final
XOR 0xFFFFFFFF) over the destination address through the end of the payload, sent least
significant byte first: ``frame + struct.pack("<I", zlib.crc32(frame))``.

A property the receive side uses: the CRC over a frame *including* a correct FCS is always the
same constant, ``FCS_RESIDUE`` (0x2144DF1C), so a receiver checks a frame with one CRC pass and
one compare, without splitting off the last four bytes.
"""
from __future__ import annotations

import struct
import zlib

from wire.ethernet import ETH_FCS_LEN

__all__ = ["FCS_LEN", "FCS_RESIDUE", "fcs", "append_fcs", "check_fcs", "strip_fcs"]

FCS_LEN = ETH_FCS_LEN
FCS_RESIDUE = 0x2144DF1C  # zlib.crc32(frame + fcs) for every frame with a good FCS

_LE32 = struct.Struct("<I")


def fcs(frame: bytes | bytearray | memoryview) -> int:
    """The FCS of `frame` (no FCS included) as an integer."""
    return zlib.crc32(frame) & 0xFFFFFFFF


def append_fcs(frame: bytes | bytearray | memoryview) -> bytes:
    """`frame` with its FCS appended, as the MAC puts it on the wire."""
    return bytes(frame) + _LE32.pack(zlib.crc32(frame))


def check_fcs(frame_with_fcs: bytes | bytearray | memoryview) -> bool:
    """True when the last four bytes are the FCS of the bytes before them."""
    if len(frame_with_fcs) < FCS_LEN:
        return False
    body = memoryview(frame_with_fcs)[:-FCS_LEN]
    return _LE32.unpack_from(frame_with_fcs, len(frame_with_fcs) - FCS_LEN)[0] == zlib.crc32(body)


def strip_fcs(frame_with_fcs: bytes | bytearray | memoryview) -> bytes:
    """The frame without its FCS (no check: see check_fcs)."""
    return bytes(frame_with_fcs[:-FCS_LEN])
