"""DmaMemory: the device reaches only mapped ranges, and nothing else."""
from __future__ import annotations

import mmap
import os

import pytest

from nicemu.dma import DmaError, DmaMemory

from conftest import sealed_memfd


def test_single_region_read_write_view():
    with DmaMemory(4096) as mem:
        assert mem.size == 4096
        mem.write(100, b"abcd")
        assert mem.read(100, 4) == b"abcd"
        v = mem.view(100, 4)
        v[0:1] = b"X"  # zero copy: the view is the memory
        assert mem.read(100, 4) == b"Xbcd"
        v.release()
        assert mem.contains(4092, 4) and not mem.contains(4093, 4)


@pytest.mark.parametrize("addr, n", [(4093, 4), (4096, 1), (-1, 2), (1 << 40, 16)])
def test_access_outside_every_region_is_a_dma_error(addr, n):
    with DmaMemory(4096) as mem:
        with pytest.raises(DmaError):
            mem.read(addr, n)
        with pytest.raises(DmaError):
            mem.write(addr, bytes(n))


def test_map_fd_at_a_bus_address_and_unmap():
    with DmaMemory() as mem:
        assert mem.size == 0
        gen = mem.generation
        fd = sealed_memfd(8192)
        shared = mmap.mmap(fd, 8192)
        mem.map_fd(os.dup(fd), 0x100000, 8192)
        os.close(fd)
        assert mem.generation != gen
        mem.write(0x100010, b"hello")
        assert shared[0x10:0x15] == b"hello"  # the same pages as the other process's mapping
        with pytest.raises(DmaError):
            mem.read(0x0, 4)
        with pytest.raises(DmaError, match="no DMA mapping"):
            mem.unmap(0x100000, 4096)  # must match a mapping exactly
        mem.unmap(0x100000, 8192)
        with pytest.raises(DmaError):
            mem.read(0x100010, 1)
        shared.close()


def test_overlapping_mapping_refused():
    with DmaMemory() as mem:
        mem.map_fd(sealed_memfd(8192), 0x1000, 8192)
        with pytest.raises(DmaError, match="overlaps"):
            mem.map_fd(sealed_memfd(4096), 0x2000, 4096)
        assert len(mem.regions) == 1


def test_unsealed_fd_refused_so_a_peer_cannot_shrink_it_under_the_device():
    fd = os.memfd_create("unsealed", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4096)
    with DmaMemory() as mem:
        with pytest.raises(DmaError, match="F_SEAL_SHRINK"):
            mem.map_fd(fd, 0, 4096)
        assert mem.regions == []


def test_fd_shorter_than_the_mapping_refused():
    with DmaMemory() as mem:
        with pytest.raises(DmaError, match="past the end"):
            mem.map_fd(sealed_memfd(4096), 0, 8192)


def test_own_memory_is_sealed_against_shrinking():
    with DmaMemory(4096) as mem:
        with pytest.raises(PermissionError):
            os.ftruncate(mem.fd, 0)
