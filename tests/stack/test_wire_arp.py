"""wire.arp: golden request, the rules of parse()."""
import pytest

from wire import MalformedPacket
from wire.arp import ARPOP_REPLY, ARPOP_REQUEST, ArpPacket
from wire.ipv4 import addr_to_int

GOLDEN = bytes.fromhex("0001080006040001525400000001c6120001000000000000c6120002")


def test_golden_request():
    p = ArpPacket(ARPOP_REQUEST, bytes.fromhex("525400000001"), addr_to_int("198.18.0.1"),
                  bytes(6), addr_to_int("198.18.0.2"))
    assert p.emit() == GOLDEN
    q = ArpPacket.parse(GOLDEN + bytes(18))  # Ethernet padding after it
    assert q == p


def test_rejects():
    with pytest.raises(MalformedPacket, match="shorter"):
        ArpPacket.parse(GOLDEN[:7])
    with pytest.raises(MalformedPacket, match="cannot hold"):
        ArpPacket.parse(GOLDEN[:27])
    with pytest.raises(MalformedPacket, match="6/4"):
        ArpPacket.parse(GOLDEN[:4] + b"\x08\x04" + GOLDEN[6:] + bytes(8))


def test_reply_roundtrip():
    p = ArpPacket(ARPOP_REPLY, b"\x52\x54\0\0\0\2", 2, b"\x52\x54\0\0\0\1", 1)
    assert ArpPacket.parse(p.emit()) == p
