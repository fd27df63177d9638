"""Bring-up helpers for the 82540EM, shared by the kernel-style driver and the PMD.

Each function does one step of what Linux's e1000 does in e1000_probe / e1000_reset_hw /
e1000_configure_tx / e1000_setup_rctl / e1000_configure_rx, through nothing but a
`driver.bus.Bus`. Register and bit names come from nicemu.regs (the SDM's names).

Order of a bring-up (see driver.e1000.E1000.open for the full sequence):

    mac = probe(bus)                         # PCI enable, reset, mask, EEPROM MAC, filters
    setup_rx_ring(bus, rx_base, rx_count)    # RDBAL/RDBAH/RDLEN, RDH = RDT = 0
    setup_tx_ring(bus, tx_base, tx_count)    # TDBAL/TDBAH/TDLEN, TDH = TDT = 0
    enable_tx(bus)                           # TIPG, TCTL.EN | PSP
    enable_rx(bus, 2048)                     # RCTL.EN | BAM, buffer size
    ... fill RX descriptors, write RDT ...
    irq_enable(bus)                          # IMS (kernel driver only; the PMD polls)
"""
from __future__ import annotations

import time

from driver.bus import Bus
from nicemu import regs
from nicemu.regs import Ctrl, Eerd, Icr, PciCommand, Rah, Rctl, Rxcsum, Status, Tctl
from wire.mac import format_mac  # re-exported: hw.format_mac

__all__ = [
    "IMS_ENABLE_MASK", "HwError", "probe", "reset", "read_eeprom", "read_mac",
    "set_receive_address", "clear_filters", "setup_rx_ring", "setup_tx_ring", "enable_rx",
    "disable_rx", "enable_tx", "disable_tx", "set_moderation", "itr_for_rate", "irq_enable",
    "irq_disable", "link_up", "read_stats", "format_mac", "RX_BUFFER_SIZES", "TIPG_DEFAULT",
]

# The causes Linux's e1000 enables (E1000_IMS_ENABLE_MASK).
IMS_ENABLE_MASK = int(Icr.RXT0 | Icr.TXDW | Icr.RXDMT0 | Icr.RXSEQ | Icr.LSC)

PCI_COMMAND = 0x04

# TIPG for the 82540 on copper (Linux DEFAULT_82543_TIPG_*): IPGT 8, IPGR1 8, IPGR2 6.
TIPG_IPGT = 8
TIPG_IPGR1 = 8
TIPG_IPGR2 = 6
TIPG_DEFAULT = TIPG_IPGT | TIPG_IPGR1 << 10 | TIPG_IPGR2 << 20

# TCTL collision threshold and distance (Linux E1000_COLLISION_THRESHOLD 15, full-duplex
# E1000_COLLISION_DISTANCE 63); irrelevant at full duplex but programmed as hardware expects.
TCTL_CT_SHIFT = 4
TCTL_COLD_SHIFT = 12
COLLISION_THRESHOLD = 15
COLLISION_DISTANCE = 63

# RCTL.BSIZE/BSEX encodings, the inverse of regs.rx_buffer_size
_BSIZE_BITS = {
    2048: 0,
    1024: 1 << regs.RCTL_BSIZE_SHIFT,
    512: 2 << regs.RCTL_BSIZE_SHIFT,
    256: 3 << regs.RCTL_BSIZE_SHIFT,
    16384: int(Rctl.BSEX) | 1 << regs.RCTL_BSIZE_SHIFT,
    8192: int(Rctl.BSEX) | 2 << regs.RCTL_BSIZE_SHIFT,
    4096: int(Rctl.BSEX) | 3 << regs.RCTL_BSIZE_SHIFT,
}
RX_BUFFER_SIZES = tuple(sorted(_BSIZE_BITS))

RESET_TIMEOUT = 1.0  # seconds for CTRL.RST to self-clear
EERD_TIMEOUT = 0.5  # seconds for EERD.DONE


class HwError(RuntimeError):
    """The device did not behave as the SDM says (reset stuck, EEPROM bad, ...)."""


def _wait_for(bus: Bus, offset: int, mask: int, want: int, timeout: float, what: str) -> int:
    """Poll a register until (value & mask) == want; HwError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = bus.read32(offset)
        if value & mask == want:
            return value
        if time.monotonic() > deadline:
            raise HwError(f"{what}: register {offset:#06x} = {value:#010x} after {timeout}s")
        time.sleep(0.0001)


def reset(bus: Bus) -> None:
    """Global device reset as e1000_reset_hw does it: mask interrupts, stop RX/TX, CTRL.RST,
    wait for the bit to self-clear, then mask again and clear pending causes (a reset can
    leave causes latched, and the reload of the EEPROM may raise LSC)."""
    bus.write32(regs.IMC, 0xFFFFFFFF)
    bus.write32(regs.RCTL, 0)
    bus.write32(regs.TCTL, int(Tctl.PSP))
    ctrl = bus.read32(regs.CTRL)  # also flushes the posted writes above
    bus.write32(regs.CTRL, ctrl | Ctrl.RST)
    _wait_for(bus, regs.CTRL, int(Ctrl.RST), 0, RESET_TIMEOUT, "CTRL.RST did not self-clear")
    bus.write32(regs.IMC, 0xFFFFFFFF)
    bus.read32(regs.ICR)  # reading ICR clears every pending cause


def read_eeprom(bus: Bus, word: int) -> int:
    """One 16-bit EEPROM word through EERD: write (addr << 8) | START, poll DONE, bits 31:16."""
    if not 0 <= word < regs.EEPROM_WORDS:
        raise ValueError(f"EEPROM word {word} outside 0..{regs.EEPROM_WORDS - 1}")
    bus.write32(regs.EERD, word << Eerd.ADDR_SHIFT | Eerd.START)
    value = _wait_for(bus, regs.EERD, int(Eerd.DONE), int(Eerd.DONE), EERD_TIMEOUT, "EERD.DONE never set")
    return value >> Eerd.DATA_SHIFT & 0xFFFF


def read_mac(bus: Bus, check: bool = True) -> bytes:
    """The MAC from EEPROM words 0..2 (word i = mac[2i] | mac[2i+1] << 8).

    With `check`, first validate the checksum as e1000_validate_eeprom_checksum does: words
    0..0x3F must sum to 0xBABA, else the EEPROM (and so the MAC) cannot be trusted.
    """
    if check:
        total = sum(read_eeprom(bus, w) for w in range(regs.EEPROM_WORDS)) & 0xFFFF
        if total != regs.EEPROM_CHECKSUM:
            raise HwError(f"EEPROM checksum is {total:#06x}, expected {regs.EEPROM_CHECKSUM:#06x}")
    words = [read_eeprom(bus, w) for w in range(3)]
    mac = bytes(b for w in words for b in (w & 0xFF, w >> 8))
    if mac[0] & 1 or mac == bytes(6):
        raise HwError(f"EEPROM holds an invalid unicast MAC {format_mac(mac)}")
    return mac


def set_receive_address(bus: Bus, index: int, mac: bytes | None) -> None:
    """Program RAL/RAH[index] with `mac` and Address Valid, or clear it (mac None).

    RAL holds bytes 0..3 (byte 0 in bits 7:0), RAH bits 15:0 bytes 4..5. RAH is written last
    and AV with it, so the device never matches a half-written address.
    """
    if mac is None:
        bus.write32(regs.RAH(index), 0)  # invalidate first
        bus.write32(regs.RAL(index), 0)
        return
    ral = mac[0] | mac[1] << 8 | mac[2] << 16 | mac[3] << 24
    rah = mac[4] | mac[5] << 8 | int(Rah.AV)
    bus.write32(regs.RAL(index), ral)
    bus.write32(regs.RAH(index), rah)


def clear_filters(bus: Bus) -> None:
    """Clear receive addresses 1..15 and the multicast table (e1000_init_rx_addrs, MTA clear)."""
    for n in range(1, regs.RA_ENTRIES):
        set_receive_address(bus, n, None)
    for i in range(regs.MTA_WORDS):
        bus.write32(regs.MTA + 4 * i, 0)


def probe(bus: Bus) -> str:
    """Find and reset the device; return its MAC as "aa:bb:cc:dd:ee:ff".

    e1000_probe: enable memory space and bus mastering (pci_set_master), reset the MAC,
    mask and clear interrupts, read the MAC from the EEPROM, program RAL0/RAH0 with AV,
    clear the other receive addresses and the MTA. Leaves RX and TX disabled.
    """
    vendor = bus.config_read(0x00, 2)
    device = bus.config_read(0x02, 2)
    if (vendor, device) != (regs.PCI_VENDOR_ID, regs.PCI_DEVICE_ID):
        raise HwError(f"not an 82540EM: PCI id {vendor:04x}:{device:04x}")
    cmd = bus.config_read(PCI_COMMAND, 2)
    bus.config_write(PCI_COMMAND, cmd | PciCommand.MEMORY | PciCommand.MASTER, 2)
    reset(bus)
    mac = read_mac(bus)
    set_receive_address(bus, 0, mac)
    clear_filters(bus)
    return format_mac(mac)


def _check_ring(base: int, count: int) -> None:
    # RDLEN/TDLEN must be a multiple of 128 bytes (8 descriptors), the base 16-byte aligned.
    if count < 8 or count % 8 or count * regs.DESC_SIZE > regs.RING_LEN_MASK + 0x7F:
        raise ValueError(f"ring of {count} descriptors: must be a multiple of 8, at most 65528")
    if base % 16:
        raise ValueError(f"ring base {base:#x} must be 16-byte aligned")


def setup_rx_ring(bus: Bus, base: int, count: int) -> None:
    """Point the device at an RX descriptor ring of `count` entries at bus address `base`.
    Head and tail start at 0: RDH == RDT means the device owns no buffers yet."""
    _check_ring(base, count)
    bus.write32(regs.RDBAL, base & 0xFFFFFFFF)
    bus.write32(regs.RDBAH, base >> 32)
    bus.write32(regs.RDLEN, count * regs.DESC_SIZE)
    bus.write32(regs.RDH, 0)
    bus.write32(regs.RDT, 0)


def setup_tx_ring(bus: Bus, base: int, count: int) -> None:
    """Point the device at a TX descriptor ring; TDH == TDT == 0 means nothing to send."""
    _check_ring(base, count)
    bus.write32(regs.TDBAL, base & 0xFFFFFFFF)
    bus.write32(regs.TDBAH, base >> 32)
    bus.write32(regs.TDLEN, count * regs.DESC_SIZE)
    bus.write32(regs.TDH, 0)
    bus.write32(regs.TDT, 0)


def enable_rx(
    bus: Bus,
    bsize: int = 2048,
    *,
    broadcast: bool = True,
    promisc: bool = False,
    allmulti: bool = False,
    strip_fcs: bool = False,
    long_packets: bool = False,
    rx_csum: bool = True,
) -> int:
    """Program RXCSUM and RCTL as e1000_setup_rctl/e1000_configure_rx do, receiver on.

    RDMTS is 1/2 (RXDMT0 when half the ring is left), MO 0, loopback off. Without
    `strip_fcs` the device writes the 4 FCS bytes into the buffer and counts them in the
    length (as Linux's e1000 runs it; the driver trims them). Returns the RCTL value.
    """
    try:
        rctl = _BSIZE_BITS[bsize]
    except KeyError:
        raise ValueError(f"RX buffer size {bsize} is not one of {RX_BUFFER_SIZES}") from None
    bus.write32(regs.RXCSUM, int(Rxcsum.IPOFL | Rxcsum.TUOFL) if rx_csum else 0)
    rctl |= Rctl.EN
    if broadcast:
        rctl |= Rctl.BAM
    if promisc:
        rctl |= Rctl.UPE | Rctl.MPE
    elif allmulti:
        rctl |= Rctl.MPE
    if strip_fcs:
        rctl |= Rctl.SECRC
    if long_packets or bsize > 2048:
        rctl |= Rctl.LPE
    bus.write32(regs.RCTL, int(rctl))
    return int(rctl)


def disable_rx(bus: Bus) -> None:
    bus.write32(regs.RCTL, 0)


def enable_tx(bus: Bus) -> int:
    """TIPG, then TCTL = EN | PSP with CT and COLD (e1000_configure_tx). Returns TCTL."""
    bus.write32(regs.TIPG, TIPG_DEFAULT)
    tctl = (
        int(Tctl.EN | Tctl.PSP)
        | COLLISION_THRESHOLD << TCTL_CT_SHIFT
        | COLLISION_DISTANCE << TCTL_COLD_SHIFT
    )
    bus.write32(regs.TCTL, tctl)
    return tctl


def disable_tx(bus: Bus) -> None:
    bus.write32(regs.TCTL, int(Tctl.PSP))


def itr_for_rate(interrupts_per_second: int) -> int:
    """The ITR value for at most that many interrupts a second (0 = no throttling).
    ITR counts 256 ns units: Linux writes 10^9 / (rate * 256)."""
    if interrupts_per_second <= 0:
        return 0
    return min(regs.ITR_INTERVAL, max(1, 1_000_000_000 // (interrupts_per_second * regs.ITR_UNIT_NS)))


def set_moderation(
    bus: Bus,
    *,
    itr: int | None = None,
    rdtr: int | None = None,
    radv: int | None = None,
    tidv: int | None = None,
    tadv: int | None = None,
) -> None:
    """Interrupt moderation, like `ethtool -C`: `itr` in interrupts/s (0 = off), the delay
    timers in their register units of 1.024 us (RDTR/RADV for RXT0, TIDV/TADV for TXDW of
    descriptors with IDE). None leaves a register as it is."""
    if itr is not None:
        bus.write32(regs.ITR, itr_for_rate(itr))
    for off, value in ((regs.RDTR, rdtr), (regs.RADV, radv), (regs.TIDV, tidv), (regs.TADV, tadv)):
        if value is not None:
            if not 0 <= value <= regs.DELAY_TIMER:
                raise ValueError(f"delay timer value {value} outside 0..{regs.DELAY_TIMER}")
            bus.write32(off, value)


def irq_enable(bus: Bus, mask: int = IMS_ENABLE_MASK) -> None:
    bus.write32(regs.IMS, mask)


def irq_disable(bus: Bus) -> None:
    """Mask every cause (IMC = ~0), as e1000_irq_disable and the NAPI top half do."""
    bus.write32(regs.IMC, 0xFFFFFFFF)


def link_up(bus: Bus) -> bool:
    return bool(bus.read32(regs.STATUS) & Status.LU)


def read_stats(bus: Bus) -> dict[str, int]:
    """Read (and so clear) every statistics register, named as the SDM names them.

    64-bit pairs are read low dword first: reading the high dword clears the pair, so the
    other order would lose the low half.
    """
    out = {name: bus.read32(off) for name, off in regs.STATS_32.items()}
    for name, (low, high) in regs.STATS_64.items():
        lo = bus.read32(low)
        out[name] = lo | bus.read32(high) << 32
    return out

