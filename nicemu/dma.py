"""Host memory as a bus-mastering device sees it.

A real NIC reaches host RAM only through the addresses the IOMMU maps for it. `DmaMemory`
models exactly that: a set of regions, each a shared mapping placed at a bus address. Any
access outside the mapped regions is a `DmaError`, never an access to something else.

The regions are memfd-backed shared mappings, so one region can be handed to another process
(vfio-user DMA_MAP passes its fd) and nothing is ever left behind in /dev/shm, even after
kill -9: the kernel frees a memfd when its last fd and mapping go away.
"""
from __future__ import annotations

import fcntl
import mmap
import os
from dataclasses import dataclass, field

__all__ = ["DmaError", "DmaMemory", "DmaRegion"]


class DmaError(ValueError):
    """A device access outside every mapped region (an IOMMU fault on real hardware)."""


@dataclass
class DmaRegion:
    """One mapped range: bus addresses [addr, addr + size) backed by `buf`."""

    addr: int
    size: int
    mm: mmap.mmap
    fd: int | None = None  # the memfd behind it, when this process created or received one
    view: memoryview = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.view = memoryview(self.mm)

    def contains(self, addr: int, n: int) -> bool:
        return self.addr <= addr and addr + n <= self.addr + self.size

    def close(self) -> None:
        self.view.release()
        try:
            self.mm.close()
        except BufferError:  # a consumer still holds a view; the mapping goes with it
            pass
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# A mapping whose file shrinks under it faults (SIGBUS) on the next access: a DMA fd must be
# sealed against shrinking before the device maps it, so no peer can crash the emulator that way.
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL


def _memfd_mapping(size: int, name: str) -> tuple[int, mmap.mmap]:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return fd, mm


class DmaMemory:
    """Bus address space made of shared-memory regions.

    `DmaMemory(size)` creates one region of `size` bytes at bus address 0 (the usual in-process
    case and the driver side's host memory). `DmaMemory()` starts empty; the emulator adds the
    ranges the driver maps with `map_fd` (vfio-user DMA_MAP) and removes them with `unmap`.

    `generation` changes on every map/unmap so fast paths that cache region pointers know
    when to look again.
    """

    def __init__(self, size: int | None = None, *, name: str = "nicemu-dma") -> None:
        self.regions: list[DmaRegion] = []
        self.generation = 0
        if size is not None:
            if size <= 0:
                raise ValueError(f"DMA memory size must be positive, got {size}")
            fd, mm = _memfd_mapping(size, name)
            self._add(DmaRegion(0, size, mm, fd))

    # --- the address space -------------------------------------------------------------

    @property
    def size(self) -> int:
        """Bytes mapped in all (for the single-region case: the region's size)."""
        return sum(r.size for r in self.regions)

    @property
    def fd(self) -> int:
        """The memfd of the first region (what a driver side passes in DMA_MAP)."""
        if not self.regions or self.regions[0].fd is None:
            raise DmaError("no region with a file descriptor is mapped")
        return self.regions[0].fd

    def map_fd(self, fd: int, addr: int, size: int, offset: int = 0, writable: bool = True) -> DmaRegion:
        """Map `size` bytes of `fd` from `offset` at bus address `addr` (takes ownership of fd)."""
        if size <= 0 or addr < 0 or offset < 0 or addr + size > 1 << 64:
            os.close(fd)
            raise DmaError(f"bad DMA mapping: addr={addr:#x} size={size:#x} offset={offset:#x}")
        for r in self.regions:
            if addr < r.addr + r.size and r.addr < addr + size:
                os.close(fd)
                raise DmaError(f"DMA mapping {addr:#x}+{size:#x} overlaps {r.addr:#x}+{r.size:#x}")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        try:
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            except OSError:
                seals = 0
            if not seals & fcntl.F_SEAL_SHRINK:
                raise DmaError("DMA fd must be a memfd sealed with F_SEAL_SHRINK (a file that can "
                               "shrink under the mapping would fault the device)")
            if os.fstat(fd).st_size < offset + size:
                raise DmaError(f"DMA mapping {offset:#x}+{size:#x} runs past the end of its fd")
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, prot, offset=offset)
        except (OSError, ValueError) as e:
            os.close(fd)
            if isinstance(e, DmaError):
                raise
            raise DmaError(f"cannot map DMA fd: {e}") from e
        return self._add(DmaRegion(addr, size, mm, fd))

    def unmap(self, addr: int, size: int) -> None:
        """Remove the mapping that is exactly [addr, addr + size)."""
        for i, r in enumerate(self.regions):
            if r.addr == addr and r.size == size:
                del self.regions[i]
                self.generation += 1
                r.close()
                return
        raise DmaError(f"no DMA mapping at {addr:#x} of size {size:#x}")

    def _add(self, region: DmaRegion) -> DmaRegion:
        self.regions.append(region)
        self.regions.sort(key=lambda r: r.addr)
        self.generation += 1
        return region

    def close(self) -> None:
        """Unmap everything (the memfds are freed when no process holds them any more)."""
        regions, self.regions = self.regions, []
        self.generation += 1
        for r in regions:
            r.close()

    def __enter__(self) -> "DmaMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- accesses ----------------------------------------------------------------------

    def region_for(self, addr: int, n: int) -> DmaRegion:
        """The region holding all of [addr, addr + n), or DmaError."""
        for r in self.regions:
            if r.contains(addr, n):
                return r
        raise DmaError(f"DMA access {addr:#x}+{n} is outside every mapped region")

    def view(self, addr: int, n: int) -> memoryview:
        """A writable zero-copy view of [addr, addr + n)."""
        r = self.region_for(addr, n)
        off = addr - r.addr
        return r.view[off : off + n]

    def read(self, addr: int, n: int) -> bytes:
        r = self.region_for(addr, n)
        off = addr - r.addr
        return bytes(r.view[off : off + n])

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        r = self.region_for(addr, n)
        off = addr - r.addr
        r.view[off : off + n] = data

    def contains(self, addr: int, n: int) -> bool:
        return any(r.contains(addr, n) for r in self.regions)
