"""InProcessBus: the `driver.bus.Bus` interface over a `nicemu.Nic` in this process.

For unit tests and in-process demos: the driver code is exactly the code that runs against
an emulator process over vfio-user (driver.vfio_user_client.VfioUserBus); only the transport
differs. Register accesses are direct calls (synchronous, as in QEMU: a TDT write has
transmitted when it returns). The interrupt is an eventfd, as over vfio-user: it is written
when the Nic reports its INTx line high (`nic.on_irq(True)`), which the Nic also does again
when the line is still high after an ICR read or an IMS write (the vfio-user subset's rule).

Time: the Nic's delay timers and ITR hold-off only fire when `nic.run_timers()` is called.
`wait_irq(timeout)` sleeps on the eventfd no longer than the Nic's next deadline and runs the
timers as they fall due, so a driver waiting here sees moderated interrupts on time.

Counters `reads` / `writes` count register accesses (a benchmark's "register reads").
"""
from __future__ import annotations

import os
import select
import time

from driver.bus import BusError
from nicemu.dma import DmaMemory

__all__ = ["InProcessBus"]


class InProcessBus:
    """A Bus over an in-process Nic. Close it to release the eventfd (the Nic stays)."""

    def __init__(self, nic) -> None:
        self.nic = nic
        self.mem: DmaMemory = nic.mem
        self._efd: int | None = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._clock = getattr(nic, "clock", None) or time.monotonic_ns
        self.reads = 0
        self.writes = 0
        self.irqs_signalled = 0
        nic.on_irq = self._on_irq
        if nic.irq:  # the line is already up: a level-triggered line is seen at once
            self._signal()

    # --- interrupt line -> eventfd ----------------------------------------------------------

    def _on_irq(self, level: bool) -> None:
        if level:
            self._signal()

    def _signal(self) -> None:
        if self._efd is not None:
            self.irqs_signalled += 1
            os.eventfd_write(self._efd, 1)

    def _consume(self) -> bool:
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            return False
        return True

    # --- Bus --------------------------------------------------------------------------------

    def read32(self, offset: int) -> int:
        self._check_open()
        self.reads += 1
        return self.nic.read32(offset)

    def write32(self, offset: int, value: int) -> None:
        self._check_open()
        self.writes += 1
        self.nic.write32(offset, value & 0xFFFFFFFF)

    def config_read(self, offset: int, size: int = 4) -> int:
        self._check_open()
        return self.nic.config_read(offset, size)

    def config_write(self, offset: int, value: int, size: int = 4) -> None:
        self._check_open()
        self.nic.config_write(offset, value, size)

    def irq_fd(self) -> int:
        self._check_open()
        return self._efd

    def wait_irq(self, timeout: float | None) -> bool:
        """Wait for the interrupt (True) or `timeout` seconds (False), firing the Nic's
        timers as their deadlines pass. timeout 0 polls; None waits for ever."""
        self._check_open()
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            self.nic.run_timers()  # a timer that fell due raises the line -> eventfd
            if self._consume():
                return True
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                return False
            wait = left
            deadline = self.nic.next_deadline()
            if deadline is not None:  # sleep no longer than the next device timer
                until = max(0.0, (deadline - self._clock()) / 1e9)
                wait = until if wait is None else min(wait, until)
            select.select([self._efd], [], [], wait)

    def reset(self) -> None:
        self._check_open()
        self.nic.reset()

    def close(self) -> None:
        if self._efd is not None:
            if self.nic.on_irq == self._on_irq:
                self.nic.on_irq = None
            os.close(self._efd)
            self._efd = None

    def _check_open(self) -> None:
        if self._efd is None:
            raise BusError("the bus is closed")

    def __enter__(self) -> "InProcessBus":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
