"""What a driver needs from the bus the device sits on.

Two implementations keep the driver independent of where the device runs:
`driver.vfio_user_client.VfioUserBus` (the device is in an emulator process, reached over
vfio-user) and `driver.inprocess_bus.InProcessBus` (the device is a `nicemu.Nic` in this
process, for unit tests). The driver only ever talks to this interface.
"""
from __future__ import annotations

from typing import Protocol

from nicemu.dma import DmaMemory


class BusError(RuntimeError):
    """The device is gone or answered with an error (e.g. the emulator was killed)."""


class Bus(Protocol):
    mem: DmaMemory
    """Host memory the device may DMA to: bus address == address in this DmaMemory."""

    def read32(self, offset: int) -> int:
        """Non-posted BAR0 read: a round trip to the device."""

    def write32(self, offset: int, value: int) -> None:
        """Posted BAR0 write (a doorbell costs no round trip)."""

    def config_read(self, offset: int, size: int = 4) -> int: ...

    def config_write(self, offset: int, value: int, size: int = 4) -> None: ...

    def irq_fd(self) -> int:
        """An eventfd that becomes readable when the device raises INTx."""

    def wait_irq(self, timeout: float | None) -> bool:
        """Block until an interrupt is signalled (True) or the timeout passes (False);
        consumes the eventfd count."""

    def reset(self) -> None:
        """Function-level reset of the device (vfio-user DEVICE_RESET)."""

    def close(self) -> None: ...
