"""Statistics registers: clear on read, 64-bit pairs cleared by reading the high dword, read-only,
saturating (SDM 13.7; reference "Statistics")."""
from __future__ import annotations

import pytest

from nicemu import regs as R

from conftest import BROADCAST, RxRing, TxRing, make_frame


@pytest.mark.parametrize("name,off", sorted(R.STATS_32.items()))
def test_32bit_statistic_clears_on_read(stub_nic, name, off):
    stub_nic.regs[off >> 2] = 0x12345678
    assert stub_nic.read32(off) == 0x12345678
    assert stub_nic.read32(off) == 0


@pytest.mark.parametrize("name,pair", sorted(R.STATS_64.items()))
def test_64bit_pair_cleared_by_reading_high(stub_nic, name, pair):
    low, high = pair
    assert high == low + 4
    stub_nic.regs[low >> 2] = 0x89ABCDEF
    stub_nic.regs[high >> 2] = 0x00000012
    assert stub_nic.read32(low) == 0x89ABCDEF
    assert stub_nic.read32(low) == 0x89ABCDEF  # reading the low dword clears nothing
    assert stub_nic.read32(high) == 0x12
    assert stub_nic.read32(low) == 0 and stub_nic.read32(high) == 0


def test_reading_high_first_loses_the_low_dword(stub_nic):
    """Software must read low then high: the high read clears the pair."""
    stub_nic.regs[R.GORCL >> 2] = 500
    assert stub_nic.read32(R.GORCH) == 0
    assert stub_nic.read32(R.GORCL) == 0


@pytest.mark.parametrize("off", sorted(list(R.STATS_32.values()) + [o for p in R.STATS_64.values() for o in p]))
def test_statistics_are_read_only(stub_nic, off):
    stub_nic.regs[off >> 2] = 7
    stub_nic.write32(off, 0xFFFFFFFF)
    stub_nic.write32(off, 0)
    assert stub_nic.peek32(off) == 7


def test_reset_clears_statistics(stub_nic):
    for off in R.STATS_32.values():
        stub_nic.regs[off >> 2] = 1
    stub_nic.write32(R.CTRL, int(R.Ctrl.RST))
    assert all(stub_nic.read32(off) == 0 for off in R.STATS_32.values())


def test_receive_counts_then_clear(nic):
    RxRing(nic).setup()
    nic.receive(make_frame(size=64))
    nic.receive(make_frame(dst=BROADCAST, size=100))
    assert nic.read32(R.GPRC) == 2
    assert nic.read32(R.GPRC) == 0
    assert nic.read32(R.BPRC) == 1
    assert nic.read32(R.PRC64) == 1
    assert nic.read32(R.PRC127) == 1
    assert nic.read32(R.GORCL) == 164
    assert nic.read32(R.GORCH) == 0
    assert nic.read32(R.GORCL) == 0
    assert nic.read32(R.TPR) == 2
    assert nic.read32(R.TORL) == 164 and nic.read32(R.TORH) == 0


def test_transmit_counts_then_clear(nic):
    TxRing(nic).setup().send([make_frame(size=60, fcs=False), make_frame(size=1514, fcs=False)])
    assert nic.read32(R.GPTC) == 2 and nic.read32(R.GPTC) == 0
    assert nic.read32(R.TPT) == 2
    assert nic.read32(R.PTC64) == 1 and nic.read32(R.PTC1522) == 1
    assert nic.read32(R.GOTCL) == 64 + 1518
    assert nic.read32(R.GOTCH) == 0
    assert nic.read32(R.GOTCL) == 0


def test_counters_saturate(nic):
    RxRing(nic).setup()
    nic.regs[R.GPRC >> 2] = 0xFFFFFFFF
    nic.receive(make_frame())
    assert nic.read32(R.GPRC) == 0xFFFFFFFF
    assert nic.read32(R.GPRC) == 0


def test_64bit_pair_carries_into_high(nic):
    RxRing(nic).setup()
    nic.regs[R.GORCL >> 2] = 0xFFFFFFF0
    nic.receive(make_frame(size=64))
    assert nic.read32(R.GORCL) == 0x30
    assert nic.read32(R.GORCH) == 1
    assert nic.read32(R.GORCL) == 0


def test_crc_error_counted_and_cleared(nic):
    RxRing(nic).setup()
    bad = bytearray(make_frame())
    bad[-1] ^= 0xFF
    nic.receive(bytes(bad))
    assert nic.read32(R.CRCERRS) == 1
    assert nic.read32(R.CRCERRS) == 0
    assert nic.read32(R.GPRC) == 0
