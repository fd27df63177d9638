"""PCI configuration space of the emulated 82540EM (nicemu/pci.py via Nic.config_*)."""
from __future__ import annotations

import pytest

from nicemu import regs as R
from nicemu.pci import PciConfig


@pytest.fixture
def cfg(stub_nic):
    return stub_nic


def test_identity(cfg):
    assert cfg.config_read(0x00, 2) == 0x8086
    assert cfg.config_read(0x02, 2) == 0x100E
    assert cfg.config_read(0x00) == 0x100E8086
    assert cfg.config_read(0x08) >> 8 == 0x020000  # class code: Ethernet controller
    assert cfg.config_read(0x0B, 1) == 0x02
    assert cfg.config_read(0x0A, 1) == 0x00
    assert cfg.config_read(0x0E, 1) == 0x00  # header type 0, single function
    assert cfg.config_read(0x2C, 2) == 0x8086  # subsystem vendor
    assert cfg.config_read(0x2E, 2) == 0x001E  # subsystem: PRO/1000 MT Desktop
    assert cfg.config_read(0x3D, 1) == 1  # interrupt pin A
    assert cfg.config_read(0x34, 1) == 0  # no capability list


def test_identity_is_read_only(cfg):
    cfg.config_write(0x00, 0xFFFFFFFF)
    cfg.config_write(0x08, 0xFFFFFFFF)
    cfg.config_write(0x2C, 0)
    cfg.config_write(0x3D, 5, 1)
    assert cfg.config_read(0x00) == 0x100E8086
    assert cfg.config_read(0x08) == 0x02000000
    assert cfg.config_read(0x2C) == 0x001E8086
    assert cfg.config_read(0x3D, 1) == 1


def test_bar0_is_32bit_memory_non_prefetchable_at_power_on(cfg):
    bar = cfg.config_read(0x10)
    assert bar == 0
    assert bar & 1 == 0  # memory space
    assert bar & 0x6 == 0  # 32-bit
    assert bar & 0x8 == 0  # not prefetchable


def test_bar0_sizing_reads_back_128k_mask(cfg):
    cfg.config_write(0x10, 0xFFFFFFFF)
    mask = cfg.config_read(0x10)
    assert mask == 0xFFFE0000
    assert (~mask & 0xFFFFFFFF) + 1 == 128 * 1024
    cfg.config_write(0x10, 0xFEBC0000)  # the address firmware assigns
    assert cfg.config_read(0x10) == 0xFEBC0000
    assert cfg.pci.bar0 == 0xFEBC0000
    cfg.config_write(0x10, 0xFEBC1234)  # bits below 128 KiB are hard-wired 0
    assert cfg.config_read(0x10) == 0xFEBC0000


def test_other_bars_and_rom_are_not_implemented(cfg):
    for off in (0x14, 0x18, 0x1C, 0x20, 0x24, 0x30):
        cfg.config_write(off, 0xFFFFFFFF)
        assert cfg.config_read(off) == 0, hex(off)


def test_command_register_memory_and_bus_master_writable(make_nic):
    from conftest import StubEngine

    cfg = make_nic(engine=StubEngine, bus_master=False)
    assert cfg.config_read(0x04, 2) == 0  # power-on: no decoding, no bus mastering
    assert PciConfig().command == 0
    cfg.config_write(0x04, 0xFFFF, 2)  # only MEMORY (bit 1) and MASTER (bit 2) stick
    assert cfg.config_read(0x04, 2) == 0x0006
    assert cfg.pci.memory_enabled and cfg.pci.bus_master
    cfg.config_write(0x04, 0x0002, 2)
    assert cfg.config_read(0x04, 2) == 0x0002
    assert not cfg.pci.bus_master


def test_bus_master_enable_gates_engine_dma(make_nic):
    from conftest import StubEngine

    nic = make_nic(engine=StubEngine, bus_master=False)
    assert nic.engine.bus_master is False
    nic.config_write(0x04, int(R.PciCommand.MASTER), 2)
    assert nic.engine.bus_master is True
    nic.config_write(0x04, int(R.PciCommand.MEMORY), 2)
    assert nic.engine.bus_master is False
    nic.config_write(0x04, 0x0104, 4)  # a dword write over COMMAND/STATUS works too
    assert nic.engine.bus_master is True


def test_bus_master_enable_resumes_waiting_work(make_nic):
    from conftest import StubEngine

    nic = make_nic(engine=StubEngine, bus_master=False)
    nic.engine.calls.clear()
    nic.config_write(0x04, int(R.PciCommand.MASTER), 2)  # rising edge: TX ring and RX buffer
    assert nic.engine.calls == ["transmit", "drain_rx"]
    nic.config_write(0x04, int(R.PciCommand.MASTER | R.PciCommand.MEMORY), 2)  # no edge
    nic.config_write(0x3C, 5, 1)
    assert nic.engine.calls == ["transmit", "drain_rx"]


def test_fixture_enables_bus_mastering(cfg):
    assert cfg.config_read(0x04, 2) == 0x0006
    assert cfg.engine.bus_master is True


def test_scratch_bytes_writable(cfg):
    cfg.config_write(0x3C, 0x0B, 1)  # interrupt line
    cfg.config_write(0x0C, 0x10, 1)  # cache line size
    cfg.config_write(0x0D, 0x40, 1)  # latency timer
    assert cfg.config_read(0x3C, 1) == 0x0B
    assert cfg.config_read(0x0C, 2) == 0x4010


@pytest.mark.parametrize("size", [1, 2, 4])
def test_any_offset_any_size_inside_256(cfg, size):
    assert cfg.config_read(0x01, size) == int.from_bytes(cfg.pci.data[1 : 1 + size], "little")
    assert cfg.config_read(256 - size, size) == 0
    cfg.config_write(256 - size, 0xFFFFFFFF, size)  # ignored, no error


def test_unaligned_multibyte_read(cfg):
    assert cfg.config_read(0x01, 2) == 0x0E80  # byte 1 of vendor (0x80), byte 0 of device (0x0E)
    assert cfg.config_read(0x02, 4) == (0x100E | (cfg.config_read(0x04, 2) << 16))


@pytest.mark.parametrize(
    "offset,size",
    [(256, 1), (255, 2), (253, 4), (-1, 1), (0, 3), (0, 8), (0, 0)],
)
def test_out_of_range_or_bad_size_raises(cfg, offset, size):
    with pytest.raises(ValueError):
        cfg.config_read(offset, size)
    with pytest.raises(ValueError):
        cfg.config_write(offset, 0, size)


def test_write_value_masked_to_size(cfg):
    cfg.config_write(0x3C, 0x1234, 1)
    assert cfg.config_read(0x3C, 1) == 0x34
    assert cfg.config_read(0x3D, 1) == 1  # the next byte is untouched


def test_status_interrupt_bit_follows_line(cfg):
    assert cfg.config_read(0x06, 2) & 0x8 == 0
    cfg.write32(R.IMS, int(R.Icr.LSC))
    cfg.write32(R.ICS, int(R.Icr.LSC))
    assert cfg.irq
    assert cfg.config_read(0x06, 2) & 0x8 == 0x8
    cfg.read32(R.ICR)
    assert cfg.config_read(0x06, 2) & 0x8 == 0


def test_reset_keeps_config_space(cfg):
    cfg.config_write(0x10, 0xFEBC0000)
    cfg.reset()
    cfg.write32(R.CTRL, int(R.Ctrl.RST))
    assert cfg.config_read(0x10) == 0xFEBC0000
    assert cfg.config_read(0x04, 2) == 0x0006
    assert cfg.engine.bus_master is True
