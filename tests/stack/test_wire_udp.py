"""wire.udp: golden segment, the pseudo-header checksum, zero means none."""
import pytest

from test_wire_ipv4 import naive_csum
from wire import MalformedPacket
from wire.ipv4 import addr_to_int
from wire.udp import UDP_MAX_PAYLOAD, UdpHeader, udp_checksum

SRC, DST = addr_to_int("198.18.0.1"), addr_to_int("198.19.0.2")
GOLDEN = bytes.fromhex("9c400007000cf89470696e67")  # 40000 -> 7, "ping"


def pseudo(seg: bytes) -> bytes:
    return SRC.to_bytes(4, "big") + DST.to_bytes(4, "big") + bytes([0, 17]) + len(seg).to_bytes(2, "big")


def test_golden():
    assert UdpHeader(40000, 7).emit(b"ping", SRC, DST) == GOLDEN
    assert naive_csum(pseudo(GOLDEN) + GOLDEN) == 0
    h = UdpHeader.parse(GOLDEN, SRC, DST)
    assert (h.sport, h.dport, h.length) == (40000, 7, 12)
    assert UDP_MAX_PAYLOAD == 65507


def test_bad_checksum_and_zero_checksum():
    bad = GOLDEN[:6] + b"\x12\x34" + GOLDEN[8:]
    with pytest.raises(MalformedPacket, match="checksum"):
        UdpHeader.parse(bad, SRC, DST)
    none = GOLDEN[:6] + b"\x00\x00" + GOLDEN[8:]
    assert UdpHeader.parse(none, SRC, DST).checksum == 0  # RFC 768: zero = not computed


def test_lengths_that_lie():
    with pytest.raises(MalformedPacket, match="shorter"):
        UdpHeader.parse(GOLDEN[:7])
    with pytest.raises(MalformedPacket, match="below 8"):
        UdpHeader.parse(GOLDEN[:4] + b"\x00\x04" + GOLDEN[6:])
    with pytest.raises(MalformedPacket, match="longer"):
        UdpHeader.parse(GOLDEN[:4] + b"\x00\x40" + GOLDEN[6:])


def test_computed_zero_is_sent_as_ones():
    # find a payload whose checksum computes to 0 (sum 0xFFFF): then 0xFFFF goes on the wire
    seg = bytearray(UdpHeader(1, 2).emit(b"\0\0"))
    c = udp_checksum(seg, SRC, DST)
    # put the complement of the current sum into the payload so the total folds to 0xFFFF
    seg[8:10] = c.to_bytes(2, "big")
    assert udp_checksum(seg, SRC, DST) == 0xFFFF
