"""nicemu: an emulated Intel 82540EM ("e1000") Ethernet controller.

The public in-process API is `Nic` (the device) and `DmaMemory` (host memory as the device
reaches it). See docs/device.md.
"""
from nicemu.dma import DmaError, DmaMemory

__all__ = ["DmaError", "DmaMemory", "Nic"]


def __getattr__(name: str):
    # Imported lazily so that `nicemu.dma` and the wire helpers stay usable on their own.
    if name == "Nic":
        from nicemu.nic import Nic

        return Nic
    raise AttributeError(name)
