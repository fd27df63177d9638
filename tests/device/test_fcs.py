"""The Ethernet FCS: the pure-Python helpers, the Cython engine's CRC, and the device's use."""
from __future__ import annotations

import random
import struct
import zlib

import pytest

from nicemu.fcs import FCS_RESIDUE, append_fcs, check_fcs, fcs, strip_fcs

# IEEE 802.3 CRC-32 check value (the CRC of ASCII "123456789").
CHECK_INPUT = b"123456789"
CHECK_VALUE = 0xCBF43926


def test_check_value() -> None:
    assert fcs(CHECK_INPUT) == CHECK_VALUE


def test_fcs_is_appended_least_significant_byte_first() -> None:
    assert append_fcs(CHECK_INPUT) == CHECK_INPUT + bytes([0x26, 0x39, 0xF4, 0xCB])


def test_check_and_strip() -> None:
    frame = append_fcs(bytes(range(60)))
    assert check_fcs(frame)
    assert strip_fcs(frame) == bytes(range(60))
    assert not check_fcs(frame[:-1] + bytes([frame[-1] ^ 1]))
    assert not check_fcs(b"\x00\x01\x02")  # shorter than an FCS
    assert not check_fcs(b"")


def test_every_single_bit_error_is_detected() -> None:
    frame = append_fcs(bytes(range(1, 61)))
    for i in range(len(frame) * 8):
        bad = bytearray(frame)
        bad[i // 8] ^= 1 << (i % 8)
        assert not check_fcs(bad)


def test_residue_of_a_good_frame_is_constant() -> None:
    rng = random.Random(7)
    for n in (0, 1, 14, 60, 1514, 9000):
        frame = append_fcs(rng.randbytes(n))
        assert zlib.crc32(frame) == FCS_RESIDUE


@pytest.mark.parametrize("portable", [False, True])
def test_engine_crc_matches_zlib_at_every_length(portable: bool) -> None:
    """The Cython engine's CRC (carry-less multiply folding where the CPU has it, slicing-by-8
    for short buffers and tails; and the slicing-by-8 path alone) equals zlib.crc32."""
    crc32 = pytest.importorskip("nicemu._datapath").crc32
    rng = random.Random(1)
    data = rng.randbytes(20000)
    for n in list(range(0, 300)) + list(range(300, 2200, 7)) + [9018, 16384, 19999]:
        for off in (0, 1, 5, 8, 13):
            seed = rng.getrandbits(32)
            piece = data[off : off + n]
            assert crc32(piece, seed, portable) == zlib.crc32(piece, seed), (n, off)
    assert crc32(b"456789", zlib.crc32(b"123"), portable) == CHECK_VALUE  # continuing a CRC
    assert crc32(bytearray(CHECK_INPUT), 0, portable) == CHECK_VALUE
    assert crc32(struct.pack("<I", 0)) == zlib.crc32(b"\0\0\0\0")
