"""A pool of packet buffers (mbufs) in DMA memory, for the poll-mode driver.

As in ixy and DPDK, every packet lives in a fixed-size buffer carved once out of memory the
device can reach; allocating a buffer is popping an index off a stack, freeing it is pushing the
index back. A buffer never moves, so the RX descriptor's buffer address IS the mbuf's memory
(zero copy) and the same buffer can be handed to a TX descriptor (forwarding without a copy).

The per-buffer metadata DPDK keeps in `struct rte_mbuf` (data offset, data length, reference
count, offload flags) lives here in compact parallel arrays indexed by buffer number, so the
Cython fast path (driver/_pmd.pyx) reads and writes it without creating a Python object per
packet. `Mbuf` is only a view (pool, index) for the application-facing API.

Layout of one element (`buf_size` bytes, default 2176 = 128 headroom + 2048 data room, DPDK's
RTE_PKTMBUF_HEADROOM and RTE_MBUF_DEFAULT_DATAROOM):

    buf_addr                buf_addr + data_off            + data_len
    | headroom (prepend)    | packet data ...                | tailroom ... |
"""
from __future__ import annotations

from array import array
from typing import TYPE_CHECKING

from nicemu.dma import DmaMemory
from nicemu.regs import RxdErrors, RxdStatus

if TYPE_CHECKING:
    from driver.dma_alloc import DmaAllocator

__all__ = ["Mbuf", "Mempool", "MempoolError", "HEADROOM", "DATA_ROOM", "BUF_SIZE"]

HEADROOM = 128  # room to prepend headers without moving the packet (RTE_PKTMBUF_HEADROOM)
DATA_ROOM = 2048  # one RX buffer as RCTL.BSIZE 00 programs it: any frame up to 1522 fits
BUF_SIZE = HEADROOM + DATA_ROOM
BUF_ALIGN = 128  # elements start on cache-line pairs; descriptor rings need only 16


class MempoolError(ValueError):
    """A misuse of the pool: double free, a foreign buffer, data outside the buffer."""


class Mempool:
    """`num_bufs` buffers of `buf_size` bytes at bus address `addr` in `mem`.

    The metadata arrays are public because the PMD cores (Cython and reference) operate on
    them directly; everything else should use `alloc`/`free` and `Mbuf`.
    """

    def __init__(self, mem: DmaMemory, addr: int, num_bufs: int, buf_size: int = BUF_SIZE,
                 headroom: int = HEADROOM) -> None:
        if num_bufs <= 0 or num_bufs >= 1 << 32:
            raise MempoolError(f"a pool needs 1 .. 2**32-1 buffers, got {num_bufs}")
        if not 0 <= headroom < buf_size or buf_size > 0xFFFF:
            raise MempoolError(f"bad buffer geometry: buf_size={buf_size} headroom={headroom}")
        region = mem.region_for(addr, num_bufs * buf_size)  # DmaError when outside the memory
        self.mem = mem
        self.region = region
        self.addr = addr
        self.num_bufs = num_bufs
        self.buf_size = buf_size
        self.headroom = headroom
        self.data_off = array("H", [headroom]) * num_bufs
        self.data_len = array("H", [0]) * num_bufs
        self.refcnt = array("H", [0]) * num_bufs
        # RX status bits in the low byte, RX error bits in the high byte, as the descriptor had them
        self.ol_flags = array("H", [0]) * num_bufs
        # the free stack: stack[0:avail[0]] are free buffer indices, the top is stack[avail[0]-1];
        # `avail` is a one-element array so the Cython core and Python share the one counter
        self.stack = array("I", range(num_bufs - 1, -1, -1))  # buffer 0 is handed out first
        self.avail = array("I", [num_bufs])

    @classmethod
    def allocate(cls, allocator: "DmaAllocator", num_bufs: int, buf_size: int = BUF_SIZE,
                 headroom: int = HEADROOM) -> "Mempool":
        """Carve a pool out of the driver's DMA memory (rte_pktmbuf_pool_create)."""
        addr = allocator.alloc(num_bufs * buf_size, BUF_ALIGN)
        return cls(allocator.mem, addr, num_bufs, buf_size, headroom)

    # --- accounting -------------------------------------------------------------------

    @property
    def available(self) -> int:
        """Free buffers (rte_mempool_avail_count)."""
        return self.avail[0]

    @property
    def in_use(self) -> int:
        return self.num_bufs - self.avail[0]

    def buf_addr(self, idx: int) -> int:
        """Bus address of buffer `idx`'s first byte (the start of its headroom)."""
        return self.addr + idx * self.buf_size

    def index_of(self, bus_addr: int) -> int:
        """Which buffer holds bus address `bus_addr` (for checks: descriptor -> mbuf)."""
        idx, _ = divmod(bus_addr - self.addr, self.buf_size)
        if not 0 <= idx < self.num_bufs:
            raise MempoolError(f"bus address {bus_addr:#x} is not in this pool")
        return idx

    # --- alloc / free (per packet, Python: the application API, not the fast path) --------

    def alloc_index(self) -> int:
        """Pop a buffer index, reset as rte_pktmbuf_reset does; -1 when the pool is empty."""
        n = self.avail[0]
        if n == 0:
            return -1
        n -= 1
        self.avail[0] = n
        idx = self.stack[n]
        self.refcnt[idx] = 1
        self.data_off[idx] = self.headroom
        self.data_len[idx] = 0
        self.ol_flags[idx] = 0
        return idx

    def alloc(self) -> "Mbuf | None":
        """An empty mbuf, or None when the pool is exhausted (rte_pktmbuf_alloc)."""
        idx = self.alloc_index()
        return None if idx < 0 else Mbuf(self, idx)

    def free_index(self, idx: int) -> None:
        """Drop one reference; the buffer returns to the pool when none is left."""
        if not 0 <= idx < self.num_bufs:
            raise MempoolError(f"buffer index {idx} is not in this pool of {self.num_bufs}")
        r = self.refcnt[idx]
        if r == 0:
            raise MempoolError(f"double free of mbuf {idx}")
        self.refcnt[idx] = r - 1
        if r == 1:
            n = self.avail[0]
            self.stack[n] = idx
            self.avail[0] = n + 1

    def mbuf(self, idx: int) -> "Mbuf":
        """A view of an allocated buffer (what rx_burst wraps its indices in)."""
        if not 0 <= idx < self.num_bufs:
            raise MempoolError(f"buffer index {idx} is not in this pool of {self.num_bufs}")
        return Mbuf(self, idx)

    def check(self) -> None:
        """Verify the free stack against the reference counts (tests, debugging)."""
        free = self.stack[: self.avail[0]]
        if len(set(free)) != len(free):
            raise MempoolError("a buffer is on the free stack twice")
        for idx in free:
            if self.refcnt[idx] != 0:
                raise MempoolError(f"free buffer {idx} has refcnt {self.refcnt[idx]}")
        busy = self.num_bufs - len(free)
        if busy != sum(1 for r in self.refcnt if r):
            raise MempoolError("a referenced buffer is missing from the accounting")

    def __repr__(self) -> str:
        return (f"Mempool(addr={self.addr:#x}, bufs={self.num_bufs}, buf_size={self.buf_size}, "
                f"available={self.available})")


class Mbuf:
    """One packet buffer seen from the application: zero-copy access and rte_pktmbuf_* ops.

    The view holds no state of its own; two Mbuf objects for the same index are the same mbuf.
    """

    __slots__ = ("pool", "idx")

    def __init__(self, pool: Mempool, idx: int) -> None:
        self.pool = pool
        self.idx = idx

    # --- where the bytes are -------------------------------------------------------------
    @property
    def buf_addr(self) -> int:
        """Bus address of the whole buffer (headroom included)."""
        return self.pool.addr + self.idx * self.pool.buf_size

    @property
    def data_addr(self) -> int:
        """Bus address of the first packet byte: what an RX/TX descriptor points at."""
        return self.buf_addr + self.pool.data_off[self.idx]

    @property
    def data_off(self) -> int:
        return self.pool.data_off[self.idx]

    @property
    def data_len(self) -> int:
        return self.pool.data_len[self.idx]

    @property
    def refcnt(self) -> int:
        return self.pool.refcnt[self.idx]

    @property
    def headroom(self) -> int:
        return self.pool.data_off[self.idx]

    @property
    def tailroom(self) -> int:
        p, i = self.pool, self.idx
        return p.buf_size - p.data_off[i] - p.data_len[i]

    def __len__(self) -> int:
        return self.pool.data_len[self.idx]

    @property
    def data(self) -> memoryview:
        """The packet bytes, writable, without a copy."""
        return self.pool.mem.view(self.data_addr, self.pool.data_len[self.idx])

    def __bytes__(self) -> bytes:
        return bytes(self.data)

    # --- rte_pktmbuf_* -------------------------------------------------------------------
    def set_data(self, payload: bytes | bytearray | memoryview) -> "Mbuf":
        """Replace the packet with `payload` (copied in), keeping the headroom."""
        p, i = self.pool, self.idx
        n = len(payload)
        if n > p.buf_size - p.data_off[i]:
            raise MempoolError(f"{n} bytes do not fit in mbuf {i} ({p.buf_size - p.data_off[i]} free)")
        p.data_len[i] = n
        p.mem.write(self.data_addr, payload)
        return self

    def append(self, n: int) -> memoryview:
        """Grow the packet at the tail by `n` bytes and return them (rte_pktmbuf_append)."""
        p, i = self.pool, self.idx
        if not 0 <= n <= self.tailroom:
            raise MempoolError(f"cannot append {n} bytes: tailroom is {self.tailroom}")
        start = self.data_addr + p.data_len[i]
        p.data_len[i] += n
        return p.mem.view(start, n)

    def prepend(self, n: int) -> memoryview:
        """Grow the packet at the head by `n` bytes of headroom (rte_pktmbuf_prepend)."""
        p, i = self.pool, self.idx
        if not 0 <= n <= p.data_off[i]:
            raise MempoolError(f"cannot prepend {n} bytes: headroom is {p.data_off[i]}")
        p.data_off[i] -= n
        p.data_len[i] += n
        return p.mem.view(self.data_addr, n)

    def adj(self, n: int) -> None:
        """Remove `n` bytes from the head, e.g. a header already parsed (rte_pktmbuf_adj)."""
        p, i = self.pool, self.idx
        if not 0 <= n <= p.data_len[i]:
            raise MempoolError(f"cannot remove {n} of {p.data_len[i]} bytes")
        p.data_off[i] += n
        p.data_len[i] -= n

    def trim(self, n: int) -> None:
        """Remove `n` bytes from the tail (rte_pktmbuf_trim)."""
        p, i = self.pool, self.idx
        if not 0 <= n <= p.data_len[i]:
            raise MempoolError(f"cannot trim {n} of {p.data_len[i]} bytes")
        p.data_len[i] -= n

    def ref(self) -> "Mbuf":
        """Take another reference (rte_mbuf_refcnt_update(m, 1)): e.g. send it and keep it."""
        p, i = self.pool, self.idx
        if p.refcnt[i] == 0:
            raise MempoolError(f"mbuf {i} is free")
        if p.refcnt[i] == 0xFFFF:
            raise MempoolError(f"mbuf {i} reference count overflow")
        p.refcnt[i] += 1
        return self

    def free(self) -> None:
        """Drop this reference (rte_pktmbuf_free)."""
        self.pool.free_index(self.idx)

    # --- receive offload results ------------------------------------------------------------
    @property
    def ol_flags(self) -> int:
        """RX descriptor status (bits 7:0) and errors (bits 15:8) of the frame."""
        return self.pool.ol_flags[self.idx]

    @property
    def ip_checksum(self) -> str:
        """'good', 'bad' or 'unknown': the device's IPv4 header checksum check (RXCSUM.IPOFL)."""
        f = self.pool.ol_flags[self.idx]
        if f & RxdStatus.IXSM or not f & RxdStatus.IPCS:
            return "unknown"
        return "bad" if (f >> 8) & RxdErrors.IPE else "good"

    @property
    def l4_checksum(self) -> str:
        """'good', 'bad' or 'unknown': the device's TCP/UDP checksum check (RXCSUM.TUOFL)."""
        f = self.pool.ol_flags[self.idx]
        if f & RxdStatus.IXSM or not f & RxdStatus.TCPCS:
            return "unknown"
        return "bad" if (f >> 8) & RxdErrors.TCPE else "good"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mbuf) and other.pool is self.pool and other.idx == self.idx

    def __hash__(self) -> int:
        return hash((id(self.pool), self.idx))

    def __repr__(self) -> str:
        return f"Mbuf({self.idx}, off={self.data_off}, len={self.data_len}, ref={self.refcnt})"
