"""wire.mac and wire.checksum: the helpers every layer shares."""
from __future__ import annotations

import random
import struct

import pytest

from wire.checksum import checksum_ok, internet_checksum, pseudo_header_sum
from wire.ethernet import ETH_HLEN, EtherType, EthernetHeader, ethertype_of
from wire.mac import BROADCAST, format_mac, is_multicast, nth_mac, parse_mac
from wire import MalformedPacket


def _ref_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


@pytest.mark.parametrize("text", ["52:54:00:12:34:56", "52-54-00-12-34-56", " 52:54:0:12:34:56 "])
def test_parse_mac_forms(text: str) -> None:
    assert parse_mac(text) == bytes.fromhex("525400123456")


@pytest.mark.parametrize("bad", ["", "52:54:00:12:34", "52:54:00:12:34:5g", "525400123456",
                                 "52:54:00:12:34:56:78", "1" * 400, "52:54:00:12:34:"])
def test_parse_mac_refuses_with_short_message(bad: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_mac(bad)
    assert len(str(e.value)) < 120  # a 400-character value is not quoted whole


def test_format_and_nth() -> None:
    assert format_mac(b"\x52\x54\x00\x12\x34\x56") == "52:54:00:12:34:56"
    assert nth_mac("52:54:00:12:34:56", 1) == "52:54:00:12:34:57"
    assert nth_mac("52:54:00:ff:ff:ff", 1) == "52:54:00:00:00:00"
    assert is_multicast(BROADCAST) and not is_multicast(parse_mac("52:54:00:00:00:01"))


def test_checksum_matches_rfc1071_reference() -> None:
    rng = random.Random(5)
    for _ in range(3000):
        data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 80)))
        assert internet_checksum(data) == _ref_checksum(data)
    for data in (b"", b"\x00" * 9, b"\xff" * 8, b"\xff\xff\x00\x01"):
        assert internet_checksum(data) == _ref_checksum(data)


def test_checksum_of_golden_ipv4_header() -> None:
    # RFC 1071-style worked example: an IPv4 header 198.18.0.1 -> 198.18.0.2, checksum zeroed
    hdr = bytes.fromhex("45000054abcd40004001" "0000" "c6120001c6120002")
    csum = internet_checksum(hdr)
    assert csum == _ref_checksum(hdr)
    full = hdr[:10] + csum.to_bytes(2, "big") + hdr[12:]
    assert checksum_ok(full) and internet_checksum(full) == 0


def test_pseudo_header_sum_used_for_udp() -> None:
    src, dst = bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2])
    udp = struct.pack("!HHHH", 1234, 7, 12, 0) + b"ping"
    csum = internet_checksum(udp, pseudo_header_sum(src, dst, 17, len(udp)))
    ref = _ref_checksum(src + dst + struct.pack("!BBH", 0, 17, len(udp)) + udp)
    assert csum == ref


def test_ethernet_header_roundtrip_and_truncation() -> None:
    h = EthernetHeader(BROADCAST, parse_mac("52:54:00:12:34:56"), EtherType.ARP)
    raw = h.emit()
    assert len(raw) == ETH_HLEN and EthernetHeader.parse(raw) == h
    assert ethertype_of(raw) == 0x0806 and ethertype_of(raw[:13]) == 0
    with pytest.raises(MalformedPacket):
        EthernetHeader.parse(raw[:13])
