"""wire.icmp: golden echo, checksum, error classification."""
import pytest

from test_wire_ipv4 import naive_csum
from wire import MalformedPacket
from wire.icmp import (ICMP_DEST_UNREACH, ICMP_ECHO, ICMP_ECHOREPLY, ICMP_TIME_EXCEEDED,
                       IcmpMessage, is_error_type)

GOLDEN = bytes.fromhex("08005435123400016162636465666768")


def test_golden_echo():
    assert IcmpMessage.echo(0x1234, 1, b"abcdefgh").emit() == GOLDEN
    assert naive_csum(GOLDEN) == 0
    m = IcmpMessage.parse(GOLDEN)
    assert (m.type, m.ident, m.sequence, m.data) == (ICMP_ECHO, 0x1234, 1, b"abcdefgh")


def test_rejects():
    with pytest.raises(MalformedPacket, match="shorter"):
        IcmpMessage.parse(GOLDEN[:7])
    with pytest.raises(MalformedPacket, match="checksum"):
        IcmpMessage.parse(GOLDEN[:-1] + b"i")


def test_error_types():
    assert is_error_type(ICMP_DEST_UNREACH) and is_error_type(ICMP_TIME_EXCEEDED)
    assert not is_error_type(ICMP_ECHO) and not is_error_type(ICMP_ECHOREPLY)
    assert is_error_type(200)  # unknown types are never answered
