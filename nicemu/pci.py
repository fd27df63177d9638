"""The 82540EM's PCI configuration space (type 0 header, 256 bytes).

SDM "PCI Local Bus Interface" (its "PCI Configuration" section). What nicemu exposes:
- identity: vendor 0x8086, device 0x100E, class 0x020000 (Ethernet controller), header type 0,
  subsystem 0x8086:0x001E (loaded from the EEPROM, as the controller does);
- BAR0: 128 KiB, 32-bit memory, not prefetchable. Sizing works as on hardware: write
  0xFFFFFFFF, read back 0xFFFE0000 (the address bits below the size are hard-wired to 0);
- COMMAND: memory space enable (bit 1) and bus master enable (bit 2) are writable; only while
  bus mastering is enabled does the device DMA (the Nic passes `bus_master` to its engine);
- STATUS: bit 3 (interrupt status) follows the INTx line;
- interrupt pin A; the interrupt line byte, cache line size and latency timer are scratch.

Everything else reads as the header fixes it, and writes to it are ignored: the other BARs,
the expansion ROM and the capability list are not implemented (reads 0).
"""
from __future__ import annotations

import struct

from nicemu import regs

__all__ = ["PciConfig", "CONFIG_SIZE"]

CONFIG_SIZE = 256

# header offsets (PCI Local Bus 3.0, 6.1)
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_CODE = 0x09  # 3 bytes: prog-if, subclass, class
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

BAR0_SIZE = regs.BAR0_SIZE
BAR0_MASK = ~(BAR0_SIZE - 1) & 0xFFFFFFFF  # 0xFFFE0000: bits that hold the address
BAR_MEM_32 = 0x0  # bits 2:1 = 00: 32-bit memory BAR, bit 3 = 0: not prefetchable
STATUS_INTERRUPT = 0x0008  # STATUS bit 3: the device asserts INTx
COMMAND_WRITABLE = int(regs.PciCommand.MEMORY | regs.PciCommand.MASTER)
INTERRUPT_PIN_A = 1
REVISION = 0x00


def _power_on_image() -> tuple[bytearray, bytearray]:
    """(config bytes, writable-bit mask per byte) at power-on."""
    cfg = bytearray(CONFIG_SIZE)
    wmask = bytearray(CONFIG_SIZE)
    struct.pack_into("<HH", cfg, VENDOR_ID, regs.PCI_VENDOR_ID, regs.PCI_DEVICE_ID)
    cfg[REVISION_ID] = REVISION
    cfg[CLASS_CODE : CLASS_CODE + 3] = regs.PCI_CLASS_ETHERNET.to_bytes(3, "little")
    cfg[HEADER_TYPE] = 0x00
    struct.pack_into("<I", cfg, BAR0, BAR_MEM_32)
    struct.pack_into("<HH", cfg, SUBSYSTEM_VENDOR_ID, regs.PCI_SUBSYSTEM_VENDOR_ID, regs.PCI_SUBSYSTEM_ID)
    cfg[INTERRUPT_PIN] = INTERRUPT_PIN_A
    struct.pack_into("<H", wmask, COMMAND, COMMAND_WRITABLE)
    struct.pack_into("<I", wmask, BAR0, BAR0_MASK)
    for off in (CACHE_LINE_SIZE, LATENCY_TIMER, INTERRUPT_LINE):
        wmask[off] = 0xFF
    return cfg, wmask


class PciConfig:
    """256 bytes of configuration space with per-bit write masks."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Power-on state: COMMAND 0 (no memory decoding, no bus mastering), BAR0 unassigned."""
        self.data, self._wmask = _power_on_image()

    @staticmethod
    def _check(offset: int, size: int) -> None:
        if size not in (1, 2, 4):
            raise ValueError(f"PCI config access size must be 1, 2 or 4, got {size}")
        if offset < 0 or offset + size > CONFIG_SIZE:
            raise ValueError(f"PCI config access {offset:#x}+{size} is outside the 256-byte space")

    def read(self, offset: int, size: int = 4) -> int:
        self._check(offset, size)
        return int.from_bytes(self.data[offset : offset + size], "little")

    def write(self, offset: int, value: int, size: int = 4) -> None:
        """Write the writable bits of `value` (masked to `size` bytes); the rest are ignored."""
        self._check(offset, size)
        new = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        d, m = self.data, self._wmask
        for i in range(size):
            j = offset + i
            d[j] = (d[j] & ~m[j] & 0xFF) | (new[i] & m[j])

    @property
    def command(self) -> int:
        return self.data[COMMAND] | self.data[COMMAND + 1] << 8

    @property
    def bus_master(self) -> bool:
        return bool(self.data[COMMAND] & regs.PciCommand.MASTER)

    @property
    def memory_enabled(self) -> bool:
        return bool(self.data[COMMAND] & regs.PciCommand.MEMORY)

    @property
    def bar0(self) -> int:
        """The bus address software assigned to BAR0 (0 until it does)."""
        return struct.unpack_from("<I", self.data, BAR0)[0] & BAR0_MASK

    def set_interrupt_status(self, asserted: bool) -> None:
        if asserted:
            self.data[STATUS] |= STATUS_INTERRUPT
        else:
            self.data[STATUS] &= ~STATUS_INTERRUPT & 0xFF
