"""wire.ipv4: golden header, parse rules for untrusted bytes, address helpers."""
import pytest

from wire import MalformedPacket
from wire.ipv4 import (IP_DF, IP_MF, Ipv4Header, addr_to_int, aton, decrease_ttl,
                       format_prefix, ntoa, parse_prefix, prefix_mask)

GOLDEN = bytes.fromhex("450000201c4640004011925ec6120001c6130002")


def naive_csum(data: bytes) -> int:
    """RFC 1071 the slow way, independent of wire.checksum."""
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += data[i] << 8 | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def test_golden_emit_and_checksum():
    h = Ipv4Header(src=addr_to_int("198.18.0.1"), dst=addr_to_int("198.19.0.2"), protocol=17,
                   ident=0x1C46, flags_frag=IP_DF)
    assert h.emit(payload_len=12) == GOLDEN
    assert naive_csum(GOLDEN[:10] + b"\0\0" + GOLDEN[12:]) == 0x925E
    assert naive_csum(GOLDEN) == 0


def test_parse_golden_with_padding():
    h = Ipv4Header.parse(GOLDEN + bytes(12) + bytes(14))  # payload + Ethernet padding
    assert (ntoa(h.src), ntoa(h.dst), h.protocol, h.total_length) == ("198.18.0.1", "198.19.0.2", 17, 32)
    assert h.dont_fragment and not h.more_fragments and h.frag_offset == 0


@pytest.mark.parametrize("mutate, rule", [
    (lambda b: b[:19], "shorter"),
    (lambda b: bytes([0x65]) + b[1:], "version"),
    (lambda b: bytes([0x44]) + b[1:], "IHL"),
    (lambda b: bytes([0x46]) + b[1:20], "IHL 6 runs past"),
    (lambda b: b[:10] + b"\x00\x00" + b[12:], "checksum"),
])
def test_parse_rejects(mutate, rule):
    with pytest.raises(MalformedPacket, match=rule.split()[0]):
        Ipv4Header.parse(mutate(GOLDEN + bytes(12)))


def test_total_length_that_lies():
    h = Ipv4Header(1, 2, 17, total_length=100)
    raw = h.emit()
    with pytest.raises(MalformedPacket, match="longer"):
        Ipv4Header.parse(raw + bytes(10))
    short = Ipv4Header(1, 2, 17, total_length=10).emit()
    with pytest.raises(MalformedPacket, match="shorter than the header"):
        Ipv4Header.parse(short)


def test_fragment_fields():
    h = Ipv4Header(1, 2, 17, flags_frag=IP_MF | 185)
    assert h.more_fragments and h.frag_offset == 1480


def test_addresses_and_prefixes():
    assert aton("198.18.0.1") == b"\xc6\x12\x00\x01"
    assert ntoa(b"\xc6\x13\xff\xfe") == "198.19.255.254"
    assert ntoa(0xC6120001) == "198.18.0.1"
    assert parse_prefix("198.18.0.1/24") == (0xC6120001, 24)
    assert parse_prefix("198.18.0.1") == (0xC6120001, 32)
    assert prefix_mask(0) == 0 and prefix_mask(24) == 0xFFFFFF00 and prefix_mask(32) == 0xFFFFFFFF
    assert format_prefix(0xC6120000, 15) == "198.18.0.0/15"
    for bad in ("198.18.0", "198.18.0.256", "a.b.c.d", "1.2.3.4.5", " ", "198.18.0.1/33", "1.2.3.4/x"):
        with pytest.raises(ValueError):
            parse_prefix(bad)


def test_decrease_ttl_incremental_checksum():
    b = bytearray(GOLDEN)
    assert decrease_ttl(b, 0) == 63
    assert naive_csum(bytes(b)) == 0
    b2 = bytearray(Ipv4Header(1, 2, 17, ttl=1, total_length=20).emit())
    assert decrease_ttl(b2, 0) == 0 and naive_csum(bytes(b2)) == 0
