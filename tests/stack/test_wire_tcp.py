"""wire.tcp: golden segment, options both ways, unknown options skipped, malformed ones refused."""
import pytest

from test_wire_ipv4 import naive_csum
from wire import MalformedPacket
from wire.ipv4 import addr_to_int
from wire.tcp import TH_ACK, TH_PSH, TH_SYN, TcpSegment, tcp_checksum

SRC, DST = addr_to_int("198.18.0.1"), addr_to_int("198.19.0.2")


def pseudo(seg: bytes) -> bytes:
    return SRC.to_bytes(4, "big") + DST.to_bytes(4, "big") + bytes([0, 6]) + len(seg).to_bytes(2, "big")


def test_golden_syn_layout_is_linuxs():
    s = TcpSegment(40000, 80, 0x01020304, 0, TH_SYN, 64240, mss=1460, sack_permitted=True,
                   tsval=7, tsecr=0, wscale=7)
    b = s.emit(SRC, DST)
    # data offset 10 words; options: MSS, SACK-perm + TS, NOP + WS (as Linux lays them out)
    assert b[12] == 0xA0 and b[13] == TH_SYN
    assert b[20:40] == bytes.fromhex("020405b4" "0402080a" "00000007" "00000000" "01030307")
    assert naive_csum(pseudo(b) + b) == 0
    p = TcpSegment.parse(b, SRC, DST)
    assert (p.sport, p.dport, p.seq, p.flags, p.window) == (40000, 80, 0x01020304, TH_SYN, 64240)
    assert (p.mss, p.wscale, p.sack_permitted, p.tsval, p.tsecr) == (1460, 7, True, 7, 0)


def test_data_segment_with_sack_blocks_round_trips():
    s = TcpSegment(1, 2, 100, 200, TH_ACK | TH_PSH, 500, b"payload", tsval=1, tsecr=2,
                   sack=((300, 400), (500, 600)))
    p = TcpSegment.parse(s.emit(SRC, DST), SRC, DST)
    assert bytes(p.payload) == b"payload" and p.sack == ((300, 400), (500, 600))
    assert p.seg_len == 7 and p.mss is None and p.wscale is None


def test_checksum_checked():
    b = bytearray(TcpSegment(1, 2, 3, 4, TH_ACK, 5, b"x").emit(SRC, DST))
    b[-1] ^= 1
    with pytest.raises(MalformedPacket, match="checksum"):
        TcpSegment.parse(bytes(b), SRC, DST)
    TcpSegment.parse(bytes(b))  # without addresses it is not checked
    assert tcp_checksum(bytes(20), SRC, DST) != 0


def raw(opts: bytes, payload: bytes = b"") -> bytes:
    assert len(opts) % 4 == 0
    hdr = TcpSegment(1, 2, 3, 4, TH_ACK, 5).emit()
    off = (20 + len(opts)) // 4
    return hdr[:12] + bytes([off << 4]) + hdr[13:20] + opts + payload


def test_unknown_option_skipped_and_eol_ends():
    p = TcpSegment.parse(raw(bytes([30, 6, 1, 2, 3, 4]) + bytes([2, 4, 5, 0xB4, 1, 1])))
    assert p.mss == 1460
    p = TcpSegment.parse(raw(bytes([1, 0, 2, 4, 5, 0xB4, 0, 0])))  # EOL: the rest is padding
    assert p.mss is None


@pytest.mark.parametrize("opts, why", [
    (bytes([2, 3, 5, 0]), "MSS"),
    (bytes([2, 0, 0, 0]), "length 0"),
    (bytes([1, 1, 1, 30]), "no length"),
    (bytes([30, 9, 0, 0]), "invalid"),
    (bytes([5, 6, 0, 0, 0, 0, 0, 0]), "SACK"),
    (bytes([8, 8, 0, 0, 0, 0, 0, 0]), "timestamps"),
    (bytes([3, 2, 1, 1]), "window scale"),
    (bytes([4, 3, 0, 0]), "SACK-permitted"),
])
def test_malformed_options(opts, why):
    with pytest.raises(MalformedPacket, match=why):
        TcpSegment.parse(raw(opts))


def test_lengths_that_lie():
    b = TcpSegment(1, 2, 3, 4, TH_ACK, 5).emit()
    with pytest.raises(MalformedPacket, match="shorter"):
        TcpSegment.parse(b[:19])
    with pytest.raises(MalformedPacket, match="below 5"):
        TcpSegment.parse(b[:12] + b"\x40" + b[13:])
    with pytest.raises(MalformedPacket, match="past"):
        TcpSegment.parse(b[:12] + b"\xf0" + b[13:])


def test_timestamp_only_fast_layout_matches_the_option_walk():
    # emit: the one-pack layout is NOP NOP TS as options_bytes lays it out
    s = TcpSegment(1, 2, 0xFFFFFFF0, 9, TH_ACK | TH_PSH, 77, b"abc", tsval=0xDEADBEEF, tsecr=5)
    b = s.emit(SRC, DST)
    assert b[20:32] == s.options_bytes() and b[12] == 0x80 and naive_csum(pseudo(b) + b) == 0
    assert b[32:] == b"abc" and s.emit()[:16] == b[:16]
    # parse: the same fields as the walk gives for an equivalent layout (TS then NOP NOP)
    fast = TcpSegment.parse(b, SRC, DST)
    walked = TcpSegment.parse(b[:20] + b[22:32] + b"\x01\x01" + b[32:])
    for f in ("sport", "dport", "seq", "ack", "flags", "window", "tsval", "tsecr", "mss", "sack"):
        assert getattr(fast, f) == getattr(walked, f)
    assert bytes(fast.payload) == bytes(walked.payload) == b"abc"
    # no options: one pack, odd payload padded for the checksum
    b = TcpSegment(1, 2, 3, 4, TH_ACK, 5, b"odd").emit(SRC, DST)
    assert len(b) == 23 and naive_csum(pseudo(b) + b + b"\x00") == 0


def test_checksum_error_after_header_errors():
    b = TcpSegment(1, 2, 3, 4, TH_ACK, 5, tsval=1, tsecr=2).emit(SRC, DST)
    with pytest.raises(MalformedPacket, match="past"):
        TcpSegment.parse(b[:12] + b"\xf0" + b[13:], SRC, DST)
