"""The 82540EM's serial EEPROM: 64 16-bit words that hold the MAC address and a checksum.

SDM "EEPROM Interface" (its "EEPROM Address Map") and "EEPROM Read Register".
Words 0..2 hold the Ethernet address, least significant byte first (word i = mac[2i] |
mac[2i+1] << 8). Words 0x0B..0x0E hold the PCI subsystem ID, subsystem vendor ID, device ID
and vendor ID the controller loads at power-on. Word 0x3F is chosen so that the 16-bit sum of
words 0..0x3F is 0xBABA; drivers refuse an EEPROM whose sum is anything else.

Software reads a word through EERD: write (address << 8) | START, poll DONE, take bits 31:16.
The EEPROM is non-volatile: a device reset reloads registers from it but never changes it.
"""
from __future__ import annotations

from array import array

from nicemu import regs
from wire.mac import format_mac, parse_mac  # the one home of MAC parsing (re-exported here)

__all__ = ["Eeprom", "parse_mac", "format_mac"]


class Eeprom:
    """The EEPROM image. `words` is an array of 64 unsigned 16-bit words."""

    def __init__(self, mac: str | bytes | bytearray) -> None:
        m = parse_mac(mac)
        w = array("H", bytes(2 * regs.EEPROM_WORDS))
        for i in range(3):
            w[i] = m[2 * i] | m[2 * i + 1] << 8
        w[regs.EEPROM_SUBSYSTEM_ID] = regs.PCI_SUBSYSTEM_ID
        w[regs.EEPROM_SUBSYSTEM_VENDOR] = regs.PCI_SUBSYSTEM_VENDOR_ID
        w[regs.EEPROM_DEVICE_ID] = regs.PCI_DEVICE_ID
        w[regs.EEPROM_VENDOR_ID] = regs.PCI_VENDOR_ID
        self.words = w
        self.update_checksum()

    def update_checksum(self) -> None:
        """Choose word 0x3F so that words 0..0x3F sum to 0xBABA (what tools do after an edit)."""
        partial = sum(self.words[: regs.EEPROM_CHECKSUM_WORD])
        self.words[regs.EEPROM_CHECKSUM_WORD] = (regs.EEPROM_CHECKSUM - partial) & 0xFFFF

    def checksum_ok(self) -> bool:
        return sum(self.words) & 0xFFFF == regs.EEPROM_CHECKSUM

    def read(self, addr: int) -> int:
        """The word at `addr`; addresses past the last word read 0 (defined by nicemu: the
        82540EM's 64-word part has nothing there, and a read must still complete)."""
        if 0 <= addr < regs.EEPROM_WORDS:
            return self.words[addr]
        return 0

    @property
    def mac(self) -> bytes:
        return bytes(b for i in range(3) for b in (self.words[i] & 0xFF, self.words[i] >> 8))

    def receive_address(self) -> tuple[int, int]:
        """(RAL0, RAH0) as the controller loads them at reset: the MAC with Address Valid."""
        m = self.mac
        ral = m[0] | m[1] << 8 | m[2] << 16 | m[3] << 24
        rah = m[4] | m[5] << 8 | int(regs.Rah.AV)
        return ral, rah

    def eerd(self, value: int) -> int:
        """The EERD register after software writes `value` (SDM "EEPROM Read Register").

        With START: the read completes at once, so EERD holds DONE, the address and the data in
        bits 31:16. Without START nothing is read: EERD holds the address alone, DONE clear.
        """
        addr = (value >> 8) & 0xFF
        if value & regs.Eerd.START:
            return self.read(addr) << 16 | addr << 8 | int(regs.Eerd.DONE)
        return addr << 8
