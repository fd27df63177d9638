"""A small allocator of bus addresses inside the driver's DMA memory.

The driver side owns host memory (a `nicemu.dma.DmaMemory`, mapped for the device with
vfio-user DMA_MAP). Rings and packet buffers must live there, at bus addresses the device can
reach. `DmaAllocator` hands out aligned ranges of that memory, the way the kernel's
dma_alloc_coherent() does for a real driver: it only does bookkeeping; it never touches the
bytes, so the caller clears what it needs cleared.

It is first-fit over a sorted free list with coalescing on free: simple, and fast enough for
set-up time (rings, buffer pools). Per-packet allocation comes from a pool carved out once:
`DmaBufferPool` below for the kernel driver, driver.mempool for the PMD.

    alloc = DmaAllocator(mem)               # manage all of mem's first region
    ring = alloc.alloc(256 * 16, align=128) # a bus address
    alloc.free(ring)
"""
from __future__ import annotations

import bisect

from nicemu.dma import DmaMemory

__all__ = ["DmaAllocator", "DmaAllocError", "DmaBufferPool"]


class DmaAllocError(MemoryError):
    """No free range is large enough (or a bad free)."""


class DmaAllocator:
    """First-fit allocator of [base, base + size) bus addresses in `mem`.

    `base` and `size` default to the whole region that contains `base` (bus address 0 for a
    `DmaMemory(n)`). Two allocators over disjoint ranges of one memory can coexist (e.g. the
    kernel driver and a test's own buffers).
    """

    def __init__(self, mem: DmaMemory, base: int = 0, size: int | None = None) -> None:
        region = mem.region_for(base, 1)
        if size is None:
            size = region.addr + region.size - base
        if size <= 0 or not region.contains(base, size):
            raise ValueError(f"allocator range {base:#x}+{size:#x} is not inside one mapped region")
        self.mem = mem
        self.base = base
        self.size = size
        # free ranges as two parallel sorted lists (start addresses, lengths)
        self._free_start: list[int] = [base]
        self._free_len: list[int] = [size]
        self._used: dict[int, tuple[int, int]] = {}  # addr -> (range start, range length)

    @property
    def free_bytes(self) -> int:
        return sum(self._free_len)

    @property
    def allocations(self) -> int:
        return len(self._used)

    def alloc(self, size: int, align: int = 64) -> int:
        """Reserve `size` bytes at an address that is a multiple of `align` (a power of two).

        Returns the bus address; raises DmaAllocError when no free range fits.
        """
        if size <= 0:
            raise ValueError(f"allocation size must be positive, got {size}")
        if align <= 0 or align & (align - 1):
            raise ValueError(f"alignment must be a power of two, got {align}")
        for i, (start, length) in enumerate(zip(self._free_start, self._free_len)):
            addr = (start + align - 1) & ~(align - 1)
            if addr + size > start + length:
                continue
            end = addr + size
            # split the free range into [start, addr) and [end, start + length)
            del self._free_start[i], self._free_len[i]
            if end < start + length:
                self._free_start.insert(i, end)
                self._free_len.insert(i, start + length - end)
            if addr > start:
                self._free_start.insert(i, start)
                self._free_len.insert(i, addr - start)
            self._used[addr] = (addr, size)
            return addr
        raise DmaAllocError(
            f"no {size} bytes (align {align}) free in DMA memory {self.base:#x}+{self.size:#x} "
            f"({self.free_bytes} bytes free in {len(self._free_start)} ranges)"
        )

    def free(self, addr: int) -> None:
        """Give back an address `alloc` returned; neighbours merge back into one free range."""
        try:
            start, length = self._used.pop(addr)
        except KeyError:
            raise DmaAllocError(f"free of {addr:#x}, which is not allocated") from None
        i = bisect.bisect_left(self._free_start, start)
        # merge with the following free range
        if i < len(self._free_start) and self._free_start[i] == start + length:
            length += self._free_len[i]
            del self._free_start[i], self._free_len[i]
        # merge with the preceding free range
        if i > 0 and self._free_start[i - 1] + self._free_len[i - 1] == start:
            self._free_len[i - 1] += length
        else:
            self._free_start.insert(i, start)
            self._free_len.insert(i, length)

    def alloc_zeroed(self, size: int, align: int = 64) -> int:
        """`alloc`, then clear the bytes (descriptor rings must start with DD clear)."""
        addr = self.alloc(size, align)
        self.mem.view(addr, size)[:] = bytes(size)
        return addr


class DmaBufferPool:
    """Fixed-size packet buffers carved out of DMA memory once, handed out as a stack of bus
    addresses (ixy's mempool, without the per-buffer metadata).

    `get()` returns None when the pool is empty: a driver counts that as an allocation
    failure and tries again later, as e1000_alloc_rx_buffers does ("better luck next round").
    """

    def __init__(self, allocator: DmaAllocator, buf_size: int, count: int, align: int = 128) -> None:
        if buf_size <= 0 or count <= 0:
            raise ValueError(f"pool of {count} buffers of {buf_size} bytes")
        stride = (buf_size + align - 1) & ~(align - 1)
        self.allocator = allocator
        self.buf_size = buf_size
        self.count = count
        self.base = allocator.alloc(stride * count, align)
        self._stride = stride
        self._free: list[int] = [self.base + i * stride for i in reversed(range(count))]

    def get(self) -> int | None:
        return self._free.pop() if self._free else None

    def put(self, addr: int) -> None:
        off = addr - self.base
        if off < 0 or off % self._stride or off // self._stride >= self.count:
            raise DmaAllocError(f"{addr:#x} is not a buffer of this pool")
        self._free.append(addr)

    @property
    def available(self) -> int:
        return len(self._free)

    def release(self) -> None:
        """Return the whole pool's memory to the allocator."""
        self.allocator.free(self.base)
        self._free = []
