"""Descriptor rings as the driver sees them: views over DMA memory plus the driver's two
positions, `next_to_use` (the next descriptor the driver fills) and `next_to_clean` (the
next one whose DD bit it waits for), as in Linux's struct e1000_rx_ring / e1000_tx_ring.

Ownership: the device owns descriptors from its head up to the tail the driver wrote; the
driver owns the rest. The driver always leaves one descriptor unused, so that "ring full"
(tail one behind head) never looks like "ring empty" (tail == head): `unused()` is
Linux's E1000_DESC_UNUSED and already subtracts that one.

Memory ordering: the device writes a descriptor's other fields first and its status byte
(with DD) last. So the driver reads the status byte alone first, and reads length, errors
and the rest only once DD is set. Python's memoryview reads are plain loads in program order;
on x86 (TSO) loads are not reordered with older loads, which is the acquire we need here.
"""
from __future__ import annotations

from nicemu.dma import DmaMemory
from nicemu.regs import (
    DESC_SIZE, RX_DESC, RXD_STATUS, TX_DESC, TXD_STA, RxdStatus, TxdSta,
)

__all__ = ["DescRing", "RxRing", "TxRing", "desc_unused"]

_RXD_DD = int(RxdStatus.DD)
_TXD_DD = int(TxdSta.DD)


def desc_unused(count: int, next_to_use: int, next_to_clean: int) -> int:
    """Descriptors the driver may fill (E1000_DESC_UNUSED): one slot always stays empty."""
    return (0 if next_to_clean > next_to_use else count) + next_to_clean - next_to_use - 1


class DescRing:
    """`count` 16-byte descriptors at bus address `base`."""

    def __init__(self, mem: DmaMemory, base: int, count: int) -> None:
        self.base = base
        self.count = count
        self.desc = mem.view(base, count * DESC_SIZE)
        self.desc[:] = bytes(count * DESC_SIZE)  # no stale DD bits from an earlier user
        self.next_to_use = 0
        self.next_to_clean = 0

    def unused(self) -> int:
        return desc_unused(self.count, self.next_to_use, self.next_to_clean)

    def release(self) -> None:
        self.desc.release()


class RxRing(DescRing):
    """Legacy RX descriptors; `buffer_addr[i]` is the DMA buffer behind descriptor i."""

    def __init__(self, mem: DmaMemory, base: int, count: int) -> None:
        super().__init__(mem, base, count)
        self.buffer_addr: list[int | None] = [None] * count

    def post(self, i: int, addr: int) -> None:
        """Give descriptor i a buffer; status 0 so that a stale DD is never seen."""
        RX_DESC.pack_into(self.desc, i * DESC_SIZE, addr, 0, 0, 0, 0, 0)

    def done(self, i: int) -> bool:
        """DD, from the status byte alone: read it before any other field."""
        return bool(self.desc[i * DESC_SIZE + RXD_STATUS] & _RXD_DD)

    def writeback(self, i: int) -> tuple[int, int, int, int, int]:
        """(length, csum, status, errors, special), to be called only after DD was seen."""
        _, length, csum, status, errors, special = RX_DESC.unpack_from(self.desc, i * DESC_SIZE)
        return length, csum, status, errors, special

    def clear_status(self, i: int) -> None:
        self.desc[i * DESC_SIZE + RXD_STATUS] = 0


class TxRing(DescRing):
    """Legacy TX descriptors. Per descriptor: its DMA buffer; per packet (on its first
    descriptor): `next_to_watch`, the index of its EOP descriptor whose DD says the whole
    packet is done, and the sk_buff to free then."""

    def __init__(self, mem: DmaMemory, base: int, count: int) -> None:
        super().__init__(mem, base, count)
        self.buffer_addr: list[int | None] = [None] * count
        self.next_to_watch: list[int | None] = [None] * count
        self.skb: list[object | None] = [None] * count

    def post(self, i: int, addr: int, length: int, cmd: int, cso: int = 0, css: int = 0) -> None:
        """Fill descriptor i (STA cleared: DD comes back only when the device is done).
        With IC in cmd, the device sums from byte CSS to the end and stores it at CSO."""
        TX_DESC.pack_into(self.desc, i * DESC_SIZE, addr, length, cso, cmd, 0, css, 0)

    def done(self, i: int) -> bool:
        return bool(self.desc[i * DESC_SIZE + TXD_STA] & _TXD_DD)

    def clear(self, i: int) -> None:
        TX_DESC.pack_into(self.desc, i * DESC_SIZE, 0, 0, 0, 0, 0, 0, 0)
