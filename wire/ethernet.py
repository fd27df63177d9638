"""Ethernet II (IEEE 802.3 with DIX framing): the 14-byte header, EtherTypes, frame sizes.

Sizes follow Linux's if_ether.h: ETH_HLEN (header), ETH_ZLEN (minimum frame without FCS),
ETH_DATA_LEN (the 1500-byte MTU), ETH_FRAME_LEN (maximum without FCS), ETH_FCS_LEN.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from wire import MalformedPacket
from wire.mac import MAC_LEN

__all__ = ["EtherType", "ETH_ALEN", "ETH_HLEN", "ETH_ZLEN", "ETH_DATA_LEN", "ETH_FRAME_LEN",
           "ETH_FCS_LEN", "ETH_MIN_MTU", "EthernetHeader", "ethertype_of"]

ETH_ALEN = MAC_LEN
ETH_HLEN = 14
ETH_ZLEN = 60  # minimum frame without FCS: shorter ones are padded on TX
ETH_DATA_LEN = 1500  # the default MTU
ETH_FRAME_LEN = 1514  # maximum frame without FCS at the default MTU
ETH_FCS_LEN = 4
ETH_MIN_MTU = 68  # RFC 791: every IPv4 host must take 68-byte datagrams unfragmented

_HDR = struct.Struct("!6s6sH")


class EtherType(enum.IntEnum):
    """EtherTypes used here (IEEE registry; names as Linux's ETH_P_*)."""

    IPV4 = 0x0800  # ETH_P_IP
    ARP = 0x0806  # ETH_P_ARP
    VLAN = 0x8100  # ETH_P_8021Q
    IPV6 = 0x86DD  # ETH_P_IPV6
    LOCAL_EXP1 = 0x88B5  # IEEE 802 local experimental 1: nicemu's test traffic


def ethertype_of(frame: bytes | memoryview) -> int:
    """The EtherType (or 802.3 length) field of a frame; 0 for a frame shorter than a header."""
    return frame[12] << 8 | frame[13] if len(frame) >= ETH_HLEN else 0


@dataclass(frozen=True, slots=True)
class EthernetHeader:
    dst: bytes
    src: bytes
    ethertype: int

    @classmethod
    def parse(cls, frame: bytes | memoryview) -> "EthernetHeader":
        if len(frame) < ETH_HLEN:
            raise MalformedPacket(f"frame of {len(frame)} bytes is shorter than the Ethernet header")
        dst, src, et = _HDR.unpack_from(frame, 0)
        return cls(dst, src, et)

    def emit(self) -> bytes:
        return _HDR.pack(self.dst, self.src, self.ethertype)
