"""The BAR0 register file: the table, decoding, masking of each register, misprogramming."""
from __future__ import annotations

import pytest

from nicemu import regs as R

from conftest import RxRing, TxRing, make_frame

# The reference's register map (e1000-subset.md "Register map" and "Statistics").
REFERENCE_MAP = {
    "CTRL": 0x0000, "STATUS": 0x0008, "EECD": 0x0010, "EERD": 0x0014, "CTRL_EXT": 0x0018,
    "MDIC": 0x0020, "ICR": 0x00C0, "ITR": 0x00C4, "ICS": 0x00C8, "IMS": 0x00D0, "IMC": 0x00D8,
    "RCTL": 0x0100, "TCTL": 0x0400, "TIPG": 0x0410, "PBA": 0x1000, "RDBAL": 0x2800,
    "RDBAH": 0x2804, "RDLEN": 0x2808, "RDH": 0x2810, "RDT": 0x2818, "RDTR": 0x2820,
    "RADV": 0x282C, "TDBAL": 0x3800, "TDBAH": 0x3804, "TDLEN": 0x3808, "TDH": 0x3810,
    "TDT": 0x3818, "TIDV": 0x3820, "TADV": 0x382C, "RXCSUM": 0x5000, "MTA[0]": 0x5200,
    "MTA[127]": 0x53FC, "RAL[0]": 0x5400, "RAH[0]": 0x5404, "RAL[15]": 0x5478, "RAH[15]": 0x547C,
    "CRCERRS": 0x4000, "ALGNERRC": 0x4004, "SYMERRS": 0x4008, "RXERRC": 0x400C, "MPC": 0x4010,
    "COLC": 0x4028, "PRC64": 0x405C, "PRC127": 0x4060, "PRC255": 0x4064, "PRC511": 0x4068,
    "PRC1023": 0x406C, "PRC1522": 0x4070, "GPRC": 0x4074, "BPRC": 0x4078, "MPRC": 0x407C,
    "GPTC": 0x4080, "GORCL": 0x4088, "GORCH": 0x408C, "GOTCL": 0x4090, "GOTCH": 0x4094,
    "RNBC": 0x40A0, "RUC": 0x40A4, "RFC": 0x40A8, "ROC": 0x40AC, "RJC": 0x40B0, "TORL": 0x40C0,
    "TORH": 0x40C4, "TOTL": 0x40C8, "TOTH": 0x40CC, "TPR": 0x40D0, "TPT": 0x40D4,
    "PTC64": 0x40D8, "PTC127": 0x40DC, "PTC255": 0x40E0, "PTC511": 0x40E4, "PTC1023": 0x40E8,
    "PTC1522": 0x40EC, "MPTC": 0x40F0, "BPTC": 0x40F4,
}


# --- the table ----------------------------------------------------------------------------------


def test_table_has_every_reference_register():
    for name, off in REFERENCE_MAP.items():
        assert off in R.REGISTERS, name
        assert R.REGISTERS[off].name == name
    assert len(R.REGISTERS) == 30 + 128 + 32 + 31 + 8


def test_table_rows_are_well_formed():
    names = set()
    for off, reg in R.REGISTERS.items():
        assert off % 4 == 0 and 0 <= off < R.BAR0_SIZE
        assert reg.name not in names
        names.add(reg.name)
        assert 0 <= reg.reset <= 0xFFFFFFFF


def test_table_reset_values():
    nonzero = {R.REGISTER_NAMES[o]: r.reset for o, r in R.REGISTERS.items() if r.reset}
    assert nonzero == {"CTRL": 0x241, "STATUS": 0x81, "PBA": 0x00100030}


# --- decoding -----------------------------------------------------------------------------------


@pytest.mark.parametrize("off", [0x0004, 0x000C, 0x0038, 0x00E0, 0x2828, 0x3828, 0x5600, 0x5800, 0x1FFFC])
def test_unknown_offsets_read_zero_and_ignore_writes(stub_nic, off):
    assert off not in R.REGISTERS
    stub_nic.write32(off, 0xFFFFFFFF)
    assert stub_nic.read32(off) == 0
    assert stub_nic.regs[off >> 2] == 0
    assert stub_nic.engine.calls == []


@pytest.mark.parametrize("off", [1, 2, 3, R.ICR + 1, R.TDT + 2, R.RDT + 3, R.GPRC + 1, 0x1FFFF])
def test_unaligned_offsets_read_zero_and_ignore_writes(stub_nic, off):
    stub_nic.write32(R.ICS, 0x80)
    stub_nic.regs[R.GPRC >> 2] = 9
    before = bytes(stub_nic.regs)
    assert stub_nic.read32(off) == 0
    stub_nic.write32(off, 0xFFFFFFFF)
    assert bytes(stub_nic.regs) == before  # no register changed, nothing was cleared
    assert stub_nic.engine.calls == []  # no doorbell rang


@pytest.mark.parametrize("off", [0x20000, 0x20004, 0x100000, -4, -1])
def test_offsets_outside_bar0_raise(stub_nic, off):
    with pytest.raises(ValueError):
        stub_nic.read32(off)
    with pytest.raises(ValueError):
        stub_nic.write32(off, 0)
    with pytest.raises(ValueError):
        stub_nic.peek32(off)


def test_values_masked_to_32_bits(stub_nic):
    stub_nic.write32(R.MTA, 0x1_2345_6789)
    assert stub_nic.read32(R.MTA) == 0x23456789
    stub_nic.write32(R.MTA + 4, -1)
    assert stub_nic.read32(R.MTA + 4) == 0xFFFFFFFF


# --- per-register write behavior ----------------------------------------------------------------


@pytest.mark.parametrize(
    "off",
    [R.CTRL_EXT, R.TIPG, R.PBA, R.RDBAH, R.TDBAH, R.RXCSUM, R.MTA, R.MTA + 0x1FC, R.RAL(0), R.RAL(15)],
)
def test_plain_registers_round_trip(stub_nic, off):
    stub_nic.write32(off, 0xA5A55A5A)
    assert stub_nic.read32(off) == 0xA5A55A5A
    stub_nic.write32(off, 0)
    assert stub_nic.read32(off) == 0


@pytest.mark.parametrize("off", [R.RDLEN, R.TDLEN])
def test_ring_length_keeps_bits_19_7(stub_nic, off):
    stub_nic.write32(off, 1000)  # not a multiple of 128: rounded down to 7 * 128
    assert stub_nic.read32(off) == 896
    stub_nic.write32(off, 0xFFFFFFFF)
    assert stub_nic.read32(off) == 0x000FFF80
    stub_nic.write32(off, 127)
    assert stub_nic.read32(off) == 0
    stub_nic.write32(off, 4096)
    assert stub_nic.read32(off) == 4096


@pytest.mark.parametrize("off", [R.RDBAL, R.TDBAL])
def test_ring_base_is_16_byte_aligned(stub_nic, off):
    stub_nic.write32(off, 0x1234567F)
    assert stub_nic.read32(off) == 0x12345670


@pytest.mark.parametrize("off", [R.RDH, R.TDH, R.RDT, R.TDT])
def test_head_and_tail_are_16_bits(stub_nic, off):
    stub_nic.write32(off, 0xFFFF0005)
    assert stub_nic.read32(off) == 5
    stub_nic.write32(off, 0x1FFFF)
    assert stub_nic.read32(off) == 0xFFFF


def test_rah_keeps_av_as_and_address(stub_nic):
    stub_nic.write32(R.RAH(3), 0xFFFFFFFF)
    assert stub_nic.read32(R.RAH(3)) == 0x8003FFFF


def test_eecd_is_read_only(stub_nic):
    stub_nic.write32(R.EECD, 0xFFFFFFFF)
    assert stub_nic.read32(R.EECD) == 0


def test_mdic_completes_with_error_no_phy(stub_nic):
    stub_nic.write32(R.MDIC, 0x08220000 | 0x1234)  # read PHY 1 register 2
    assert stub_nic.read32(R.MDIC) == 0x08220000 | 0x50000000  # READY | ERROR, no data


def test_peek_has_no_side_effect(stub_nic):
    stub_nic.write32(R.ICS, 0x80)
    stub_nic.regs[R.GORCL >> 2] = 3
    stub_nic.regs[R.GORCH >> 2] = 4
    assert stub_nic.peek32(R.ICR) == 0x80
    assert stub_nic.peek32(R.GORCH) == 4
    assert stub_nic.peek32(R.GORCL) == 3
    assert stub_nic.peek32(R.ICR + 1) == 0
    assert stub_nic.read32(R.ICR) == 0x80


# --- misprogramming with the real engine: defined outcomes, and the device keeps working ----------


def test_zero_length_tx_ring_with_tdt_set(nic):
    nic.write32(R.TCTL, int(R.Tctl.EN))
    nic.write32(R.TDLEN, 0)
    nic.write32(R.TDT, 5)  # CVE-2016-1981 shape: must return, send nothing
    assert nic.read32(R.TDH) == 0
    assert nic.transmitted() == []


def test_tail_beyond_ring(nic):
    nic.write32(R.TCTL, int(R.Tctl.EN))
    nic.write32(R.TDLEN, 128)
    nic.write32(R.TDT, 0x9999)
    assert nic.transmitted() == []
    nic.write32(R.RCTL, int(R.Rctl.EN | R.Rctl.BAM))
    nic.write32(R.RDLEN, 128)
    nic.write32(R.RDT, 0x9999)
    nic.receive(make_frame())
    assert nic.read32(R.RDH) == 0


def test_ring_outside_memory_counts_dma_errors(nic):
    nic.write32(R.TCTL, int(R.Tctl.EN))
    nic.write32(R.TDBAL, 0xFFFF0000)
    nic.write32(R.TDBAH, 0x1)
    nic.write32(R.TDLEN, 128)
    nic.write32(R.TDT, 1)
    assert nic.dma_errors >= 1
    assert nic.transmitted() == []


def test_device_works_after_misprogramming_and_reset(nic):
    nic.write32(R.TCTL, int(R.Tctl.EN))
    nic.write32(R.TDBAL, 0xFFFFFFF0)
    nic.write32(R.TDLEN, 0xFFFFFFFF)
    nic.write32(R.TDT, 3)
    nic.write32(R.RDLEN, 1)
    nic.write32(R.CTRL, int(R.Ctrl.RST))
    rx = RxRing(nic).setup()
    TxRing(nic).setup().send([make_frame(size=60, fcs=False)])
    sent = nic.transmitted()
    assert len(sent) == 1 and len(sent[0]) == 64
    nic.receive(sent[0])  # addressed to ourselves
    assert rx.desc(0)[1] == 64 and rx.data(0) == sent[0]


def test_no_dma_without_bus_master(make_nic):
    nic = make_nic(bus_master=False)
    rx = RxRing(nic).setup()
    TxRing(nic).setup().send([make_frame(size=60, fcs=False)])
    assert nic.transmitted() == []
    nic.receive(make_frame())
    assert rx.desc(0)[3] == 0  # no descriptor written
    assert nic.read32(R.RDH) == 0
    nic.config_write(0x04, 0x6, 2)  # bus mastering on: the waiting work proceeds
    assert len(nic.transmitted()) == 1  # the queued descriptor is sent
    assert rx.desc(0)[3] & 1  # the frame that waited in the RX packet buffer is DMA'd
