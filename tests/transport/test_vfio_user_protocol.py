"""The vfio-user codec alone (sans-IO): headers, payload layouts, framing, limits."""
from __future__ import annotations

import errno
import struct

import pytest

from nicemu.vfio_user import protocol as p
from nicemu.vfio_user.protocol import Command, Decoder, FramingError, ProtocolError


def test_header_layout_matches_the_spec():
    # id u16, command u16, size u32, flags u32, error u32: 16 bytes, no padding
    raw = p.HEADER.pack(0x1234, 9, 32, 1, 0)
    assert len(raw) == p.HEADER_SIZE == 16
    assert raw == struct.pack("=HHIII", 0x1234, 9, 32, 1, 0)


@pytest.mark.parametrize("st, size", [
    (p.DMA_MAP, 32), (p.DMA_UNMAP, 24), (p.DEVICE_INFO, 16), (p.REGION_INFO, 32),
    (p.IRQ_INFO, 16), (p.IRQ_SET, 20), (p.REGION_ACCESS, 16), (p.VERSION, 4),
])
def test_payload_sizes_match_the_spec(st, size):
    assert st.size == size


def test_command_numbers_match_the_spec():
    assert [int(c) for c in Command] == [1, 2, 3, 4, 5, 7, 8, 9, 10, 13]


def test_pack_error_is_a_bare_header_reply():
    raw = p.pack_error(7, Command.REGION_READ, errno.EINVAL)
    assert p.HEADER.unpack(raw) == (7, 9, 16, 1 | 0x20, errno.EINVAL)


def test_decoder_yields_complete_messages_split_anywhere():
    msgs = [p.pack_message(i, Command.REGION_WRITE, p.REGION_ACCESS.pack(4 * i, 0, 4) + struct.pack("<I", i),
                           flags=p.Flags.NO_REPLY) for i in range(50)]
    stream = b"".join(msgs)
    for chunk in (1, 3, 16, 17, 36, 1000):
        dec = Decoder()
        got = []
        for off in range(0, len(stream), chunk):
            dec.feed(stream[off : off + chunk])
            got += [(m.msg_id, m.command, bytes(m.payload), m.start, m.no_reply) for m in dec.messages()]
        assert [g[0] for g in got] == list(range(50))
        assert all(g[1] == Command.REGION_WRITE and g[4] for g in got)
        assert got[7][2] == p.REGION_ACCESS.pack(28, 0, 4) + struct.pack("<I", 7)
        assert [g[3] for g in got] == [36 * i for i in range(50)]  # stream offsets
        assert dec.pending() == 0


def test_decoder_keeps_a_partial_message_pending():
    dec = Decoder()
    msg = p.pack_message(1, Command.DEVICE_RESET)
    dec.feed(msg[:10])
    assert list(dec.messages()) == []
    assert dec.pending() == 10


def test_decoder_compacts_across_a_long_stream():
    dec = Decoder(max_msg_size=256)  # a small buffer forces compaction many times
    n = 0
    for i in range(2000):
        dec.feed(p.pack_message(i & 0xFFFF, Command.VERSION, bytes(i % 200)))
        for m in dec.messages():
            assert m.msg_id == n and len(m.payload) == n % 200
            n += 1
    assert n == 2000


def test_size_below_header_is_a_framing_error():
    dec = Decoder()
    dec.feed(p.HEADER.pack(1, Command.VERSION, 8, 0, 0))
    with pytest.raises(FramingError) as e:
        list(dec.messages())
    assert e.value.errno == errno.EINVAL


def test_oversized_message_is_refused_then_skipped():
    dec = Decoder(max_msg_size=1024)
    big = p.pack_message(5, Command.REGION_WRITE, bytes(4000))
    after = p.pack_message(6, Command.DEVICE_RESET)
    dec.feed(big[:100])
    with pytest.raises(ProtocolError) as e:
        list(dec.messages())
    assert e.value.errno == errno.E2BIG
    assert dec.last_oversized == (5, Command.REGION_WRITE, 0)
    # the rest of the big message is dropped as it arrives; the next message is intact
    for off in range(100, len(big), 700):
        dec.feed(big[off : off + 700])
        assert list(dec.messages()) == []
    dec.feed(after)
    assert [m.msg_id for m in dec.messages()] == [6]


def test_max_size_message_fits():
    dec = Decoder()
    payload = p.REGION_ACCESS.pack(0, 0, p.MAX_DATA_XFER_SIZE) + bytes(p.MAX_DATA_XFER_SIZE)
    raw = p.pack_message(1, Command.REGION_WRITE, payload)
    assert len(raw) <= p.MAX_MSG_SIZE
    dec.feed(b"x" * 0)
    dec.feed(raw[:5])
    dec.feed(raw[5:])
    (m,) = list(dec.messages())
    assert len(m.payload) == len(payload)


def test_version_round_trip_and_capabilities():
    payload = p.pack_version(0, 1, p.server_capabilities())
    assert payload.endswith(b"\0")
    major, minor, caps = p.parse_version(payload)
    assert (major, minor) == (0, 1)
    assert caps["capabilities"]["max_data_xfer_size"] == p.MAX_DATA_XFER_SIZE
    assert p.parse_version(struct.pack("=HH", 0, 1)) == (0, 1, {})


@pytest.mark.parametrize("bad", [b"\0", struct.pack("=HH", 0, 1) + b"{not json", struct.pack("=HH", 0, 1) + b"[1]",
                                 struct.pack("=HH", 0, 1) + b"\xff\xfe"])
def test_bad_version_payloads_are_einval(bad):
    with pytest.raises(ProtocolError) as e:
        p.parse_version(bad)
    assert e.value.errno == errno.EINVAL


V01 = struct.pack("=HH", 0, 1)


@pytest.mark.parametrize("bad", [
    V01 + b"[" * 100_000,                                   # the attack: RecursionError in json.loads
    V01 + b"[" * 2000 + b"]" * 2000,                        # deep, though under the size limit
    V01 + b'{"a":' * (p.MAX_JSON_DEPTH + 1) + b"1" + b"}" * (p.MAX_JSON_DEPTH + 1),
    V01 + b'{"a": "' + b"x" * p.MAX_VERSION_JSON + b'"}',  # too long, however flat
], ids=["100000-deep", "2000-deep", "one-too-deep", "too-long"])
def test_version_json_is_bounded_before_it_is_parsed(bad):
    with pytest.raises(ProtocolError) as e:
        p.parse_version(bad)
    assert e.value.errno == errno.EINVAL


def test_version_json_at_the_limits_is_accepted():
    deep = b'{"a":' * p.MAX_JSON_DEPTH + b"1" + b"}" * p.MAX_JSON_DEPTH
    assert p.parse_version(V01 + deep + b"\0")[2]["a"]["a"]
    brackets_in_strings = b'{"a": "[[[[[[[[[[[[{{{{{{{{{{\\"]]]]]]]]]"}'
    assert p.parse_version(V01 + brackets_in_strings)[2]["a"].startswith("[[[")
    assert p.json_depth('[{"a": [1, {"b": "]]]"}]}]') == 4


def test_expect_argsz():
    p.expect_argsz(Command.DMA_MAP, 32, 32)
    p.expect_argsz(Command.DMA_MAP, 40, 32)
    with pytest.raises(ProtocolError, match="DMA_MAP argsz 8 is smaller than 32"):
        p.expect_argsz(Command.DMA_MAP, 8, 32)


def test_decoder_names_the_message_it_skips():
    dec = Decoder(max_msg_size=1024)
    dec.feed(p.pack_message(1, Command.DEVICE_RESET))
    assert dec.peek_header() == (1, Command.DEVICE_RESET, 16, 0, 0)
    list(dec.messages())
    assert dec.peek_header() is None and dec.consumed_pos == 16
    dec.feed(p.pack_message(2, Command.REGION_WRITE, bytes(2000))[:100])
    with pytest.raises(ProtocolError):
        list(dec.messages())
    assert dec.skipping and dec.skip_start == 16


def test_expect_size():
    p.expect_size(Command.DEVICE_GET_INFO, bytes(16), 16)
    with pytest.raises(ProtocolError, match="DEVICE_GET_INFO payload is 15 bytes, expected 16"):
        p.expect_size(Command.DEVICE_GET_INFO, bytes(15), 16)


def test_message_properties():
    dec = Decoder()
    dec.feed(p.pack_message(3, Command.REGION_READ, bytes(16), flags=p.MsgType.REPLY))
    (m,) = list(dec.messages())
    assert m.is_reply and not m.no_reply and m.end == 32
    assert p.command_name(9) == "REGION_READ" and p.command_name(99) == "command 99"
