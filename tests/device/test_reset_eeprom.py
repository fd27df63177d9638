"""EEPROM image, EERD reads, and the reset state (power-on, CTRL.RST, Nic.reset())."""
from __future__ import annotations

import pytest

from nicemu import regs as R
from nicemu.eeprom import Eeprom, format_mac, parse_mac

from conftest import MAC, StubEngine

RST = int(R.Ctrl.RST)


def eerd_read(nic, addr: int) -> int:
    nic.write32(R.EERD, (addr << 8) | int(R.Eerd.START))
    value = nic.read32(R.EERD)
    assert value & R.Eerd.DONE
    assert (value >> 8) & 0xFF == addr
    return value >> 16


# --- EEPROM image -------------------------------------------------------------------------------


def test_eeprom_mac_words_and_checksum():
    e = Eeprom("52:54:00:12:34:56")
    assert list(e.words[:3]) == [0x5452, 0x1200, 0x5634]
    assert len(e.words) == 64
    assert sum(e.words) & 0xFFFF == 0xBABA
    assert e.checksum_ok()
    assert e.mac == bytes.fromhex("525400123456")


def test_eeprom_pci_identity_words():
    e = Eeprom(MAC)
    assert e.words[0x0B] == 0x001E  # subsystem ID
    assert e.words[0x0C] == 0x8086  # subsystem vendor ID
    assert e.words[0x0D] == 0x100E  # device ID
    assert e.words[0x0E] == 0x8086  # vendor ID


def test_eeprom_checksum_word_value():
    e = Eeprom("00:00:00:00:00:00")
    expected = (0xBABA - (0x001E + 0x8086 + 0x100E + 0x8086)) & 0xFFFF
    assert e.words[0x3F] == expected
    e.words[5] = 0x1234
    assert not e.checksum_ok()
    e.update_checksum()
    assert e.checksum_ok()


@pytest.mark.parametrize("mac", ["52:54:00:12:34", "52:54:00:12:34:56:78", "zz:54:00:12:34:56", "525400123456", "", "52:54:00:12:34:567"])
def test_bad_mac_rejected(mac):
    with pytest.raises(ValueError):
        parse_mac(mac)


def test_mac_forms():
    assert parse_mac("52-54-00-AB-cd-EF") == bytes.fromhex("525400abcdef")
    assert parse_mac(bytes(range(6))) == bytes(range(6))
    with pytest.raises(ValueError):
        parse_mac(b"\x00" * 5)
    assert format_mac(bytes.fromhex("525400abcdef")) == "52:54:00:ab:cd:ef"


def test_nic_mac_property(make_nic):
    nic = make_nic(mac="02:AA:bb:00:00:01", engine=StubEngine)
    assert nic.mac == "02:aa:bb:00:00:01"


# --- EERD -----------------------------------------------------------------------------------


def test_eerd_reads_mac_words(stub_nic):
    assert [eerd_read(stub_nic, a) for a in range(3)] == [0x5452, 0x1200, 0x5634]


def test_eerd_whole_image_sums_to_baba(stub_nic):
    words = [eerd_read(stub_nic, a) for a in range(64)]
    assert words == list(stub_nic.eeprom.words)
    assert sum(words) & 0xFFFF == 0xBABA


def test_eerd_exact_register_value(stub_nic):
    stub_nic.write32(R.EERD, (1 << 8) | 1)
    assert stub_nic.read32(R.EERD) == 0x1200_0000 | 0x0100 | 0x10


def test_eerd_address_beyond_63_reads_zero_with_done(stub_nic):
    for addr in (64, 0x80, 0xFF):
        stub_nic.write32(R.EERD, (addr << 8) | 1)
        assert stub_nic.read32(R.EERD) == (addr << 8) | 0x10


def test_eerd_without_start_reads_nothing(stub_nic):
    stub_nic.write32(R.EERD, (2 << 8) | 1)
    stub_nic.write32(R.EERD, 2 << 8)  # no START: DONE clear, no data
    assert stub_nic.read32(R.EERD) == 0x0200


def test_eeprom_survives_reset(stub_nic):
    eerd_read(stub_nic, 2)
    stub_nic.write32(R.CTRL, RST)
    assert stub_nic.read32(R.EERD) == 0  # the register resets...
    assert eerd_read(stub_nic, 0) == 0x5452  # ...the EEPROM does not


# --- reset state ----------------------------------------------------------------------------


def check_power_on_state(nic, link_up: bool = True) -> None:
    assert nic.read32(R.CTRL) == 0x00000241  # FD | SLU | SPEED 1000
    assert nic.read32(R.STATUS) == (0x83 if link_up else 0x81)  # FD | SPEED 1000 (| LU)
    assert nic.read32(R.PBA) == 0x00100030
    assert nic.read32(R.RAL(0)) == 0x12005452
    assert nic.read32(R.RAH(0)) == 0x80005634  # AV | bytes 4..5
    for off, reg in R.REGISTERS.items():
        if off in (R.CTRL, R.STATUS, R.PBA, R.RAL(0), R.RAH(0)):
            continue
        assert nic.peek32(off) == 0, reg.name
    assert not nic.irq
    assert nic.next_deadline() is None


def test_power_on_state(make_nic):
    nic = make_nic(engine=StubEngine, bus_master=False)
    check_power_on_state(nic)
    assert nic.engine.calls == ["reset"]  # the engine's packet buffers start empty
    assert nic.engine.bus_master is False


def test_board_pba_is_the_reset_value(clock):
    """A board may power up with another packet buffer split; every reset returns PBA to it."""
    from nicemu import Nic
    from nicemu.dma import DmaMemory

    with DmaMemory(1 << 16) as mem:
        nic = Nic(mem, clock=clock, engine=StubEngine, pba=(8 << 16) | 56)
        assert nic.read32(R.PBA) == 0x00080038
        nic.write32(R.PBA, R.PBA_DEFAULT)
        nic.write32(R.CTRL, R.Ctrl.RST)
        assert nic.read32(R.PBA) == 0x00080038
        nic.write32(R.PBA, R.PBA_DEFAULT)
        nic.reset()
        assert nic.read32(R.PBA) == 0x00080038


def test_ral_rah_from_other_mac(make_nic):
    nic = make_nic(mac="00:1b:21:0a:0b:0c", engine=StubEngine)
    assert nic.read32(R.RAL(0)) == 0x0A211B00
    assert nic.read32(R.RAH(0)) == 0x80000C0B


def dirty(nic) -> None:
    """Program everything a driver would, leave causes pending, line high, timers running."""
    for off, value in [
        (R.RCTL, 0x0400801A), (R.TCTL, 0x0103F0FA), (R.TIPG, 0x0060200A), (R.PBA, 0x00200020),
        (R.RDBAL, 0x1000), (R.RDLEN, 4096), (R.RDH, 5), (R.RDT, 7), (R.RDTR, 10), (R.RADV, 20),
        (R.TDBAL, 0x2000), (R.TDLEN, 4096), (R.TDH, 3), (R.TDT, 3), (R.TIDV, 8), (R.TADV, 32),
        (R.ITR, 976), (R.RXCSUM, 0x300), (R.MTA + 4 * 7, 0x100), (R.RAL(1), 0x01020304),
        (R.RAH(1), 0x80000506), (R.RAL(0), 0xDEADBEEF), (R.RAH(0), 0x1234), (R.CTRL_EXT, 0x1000),
        (R.IMS, 0x9D), (R.CTRL, 0x00000261),
    ]:
        nic.write32(off, value)
    nic.regs[R.CRCERRS >> 2] = 5
    nic.regs[R.GORCL >> 2] = 100
    nic.regs[R.GORCH >> 2] = 1
    nic.write32(R.ICS, 0x84)
    nic.engine.next_events["drain_rx"] = R.EV_RX_DONE
    nic.write32(R.RDT, 8)  # starts RDTR/RADV
    assert nic.irq and nic.next_deadline() is not None


def test_ctrl_rst_self_clears_and_restores_defaults(stub_nic):
    levels = []
    stub_nic.on_irq = levels.append
    dirty(stub_nic)
    stub_nic.engine.calls.clear()
    stub_nic.write32(R.CTRL, 0x00000261 | RST)
    assert stub_nic.read32(R.CTRL) & RST == 0  # self-clearing
    check_power_on_state(stub_nic)
    assert stub_nic.engine.calls == ["reset"]
    assert levels[-1] is False  # the line went down


def test_nic_reset_restores_defaults(stub_nic):
    dirty(stub_nic)
    stub_nic.reset()
    check_power_on_state(stub_nic)


def test_reset_with_link_down_keeps_lu_clear(stub_nic):
    stub_nic.set_link(False)
    stub_nic.write32(R.CTRL, RST)
    check_power_on_state(stub_nic, link_up=False)
    stub_nic.set_link(True)
    assert stub_nic.read32(R.STATUS) == 0x83


def test_ctrl_plain_write_keeps_bits(stub_nic):
    stub_nic.write32(R.CTRL, 0x00000261)  # + ASDE
    assert stub_nic.read32(R.CTRL) == 0x00000261
    assert stub_nic.engine.calls == []  # no reset without RST


def test_device_works_after_reset(stub_nic, clock):
    dirty(stub_nic)
    stub_nic.write32(R.CTRL, RST)
    stub_nic.write32(R.IMS, int(R.Icr.TXQE))
    stub_nic.write32(R.TCTL, int(R.Tctl.EN))
    stub_nic.engine.next_events["transmit"] = int(R.Icr.TXQE)
    stub_nic.write32(R.TDT, 1)
    assert stub_nic.irq
    assert stub_nic.read32(R.ICR) == int(R.Icr.TXQE)
