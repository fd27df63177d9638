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


# --- saturation of every counter the device counts (both engines) ------------------------------

NOT_COUNTED = {"ALGNERRC", "SYMERRS", "RXERRC", "COLC", "RFC", "RJC"}  # no source on a virtual cable
U32 = 0xFFFFFFFF


def every_counter_traffic(nic) -> None:
    """Frames that move every statistic nicemu counts, both directions."""
    from conftest import with_fcs

    rx = RxRing(nic).setup(rctl=int(R.Rctl.MPE), give=0)  # no RX buffers: frames wait (RNBC)
    for size in (64, 100, 200, 400, 800, 1500):  # PRC64 .. PRC1522, GPRC, GORC
        nic.receive(make_frame(size=size))
    nic.receive(make_frame(dst=BROADCAST))  # BPRC
    nic.receive(make_frame(dst=bytes.fromhex("01005e000001")))  # MPRC
    nic.receive(make_frame(size=63))  # RUC
    nic.receive(make_frame(size=1523))  # ROC
    bad = bytearray(make_frame())
    bad[-1] ^= 1
    nic.receive(bytes(bad))  # CRCERRS
    nic.write32(R.PBA, (16 << 16) | 1)  # RX packet buffer 1 KB, already over-full: MPC
    nic.receive(make_frame())
    rx.give(15)
    tx = TxRing(nic).setup()
    frames = [make_frame(size=s, fcs=False) for s in (60, 100, 200, 400, 800, 1500)]
    frames += [make_frame(dst=BROADCAST, fcs=False), make_frame(dst=bytes.fromhex("01005e000001"), fcs=False)]
    tx.send(frames)  # GPTC, TPT, GOTC, TOT, PTC64 .. PTC1522, BPTC, MPTC


@pytest.mark.parametrize("engine", ["python", "cython"])
def test_the_traffic_moves_every_modeled_counter(make_nic, engine):
    nic = make_nic(engine=engine)
    every_counter_traffic(nic)
    moved = {name for name, off in R.STATS_32.items() if nic.peek32(off)}
    moved |= {name for name, (low, high) in R.STATS_64.items() if nic.peek32(low) or nic.peek32(high)}
    assert moved == (set(R.STATS_32) - NOT_COUNTED) | set(R.STATS_64)
    assert nic.read32(R.RNBC) == 8 and nic.read32(R.MPC) == 1 and nic.read32(R.TPR) == 12


@pytest.mark.parametrize("engine", ["python", "cython"])
def test_every_counter_saturates(make_nic, engine):
    """32-bit counters stop at 0xFFFFFFFF, 64-bit pairs at 2**64 - 1; reading then clears."""
    nic = make_nic(engine=engine)
    for off in R.STATS_32.values():
        nic.regs[off >> 2] = U32
    for low, high in R.STATS_64.values():
        nic.regs[low >> 2] = nic.regs[high >> 2] = U32
    every_counter_traffic(nic)
    for name, off in R.STATS_32.items():
        assert nic.read32(off) == U32, name
        assert nic.read32(off) == 0, name
    for name, (low, high) in R.STATS_64.items():
        assert (nic.read32(low), nic.read32(high)) == (U32, U32), name
        assert (nic.read32(low), nic.read32(high)) == (0, 0), name


@pytest.mark.parametrize("engine", ["python", "cython"])
def test_counters_reach_saturation_exactly(make_nic, engine):
    nic = make_nic(engine=engine)
    RxRing(nic).setup()
    nic.regs[R.GPRC >> 2] = U32 - 2
    nic.regs[R.GORCL >> 2] = nic.regs[R.GORCH >> 2] = U32
    nic.regs[R.GORCL >> 2] = U32 - 100  # 2**64 - 101: the second 64-byte frame saturates the pair
    for _ in range(3):
        nic.receive(make_frame(size=64))
    assert nic.read32(R.GPRC) == U32
    assert (nic.read32(R.GORCL), nic.read32(R.GORCH)) == (U32, U32)


@pytest.mark.parametrize("engine", ["python", "cython"])
def test_octets_count_from_destination_through_fcs_also_with_secrc(make_nic, engine):
    """GORC/TOR: destination address through the FCS, whether or not RCTL.SECRC strips it from
    the buffer (QEMU leaves the FCS out with SECRC). GOTC/TOT: the frame as sent, FCS included."""
    for secrc in (0, int(R.Rctl.SECRC)):
        nic = make_nic(engine=engine)
        ring = RxRing(nic).setup(rctl=secrc)
        for size in (64, 1518):
            nic.receive(make_frame(size=size))
        assert [ring.desc(k)[1] for k in range(2)] == ([60, 1514] if secrc else [64, 1518])
        assert (nic.read32(R.GORCL), nic.read32(R.GORCH)) == (64 + 1518, 0)
        assert (nic.read32(R.TORL), nic.read32(R.TORH)) == (64 + 1518, 0)
    TxRing(nic).setup().send([make_frame(size=60, fcs=False), make_frame(size=1514, fcs=False)])
    assert (nic.read32(R.GOTCL), nic.read32(R.GOTCH)) == (64 + 1518, 0)
    assert (nic.read32(R.TOTL), nic.read32(R.TOTH)) == (64 + 1518, 0)
