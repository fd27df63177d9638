"""driver/mempool.py: the PMD's packet-buffer pool and its Mbuf view."""
from __future__ import annotations

import pytest

from driver.dma_alloc import DmaAllocator
from driver.mempool import BUF_SIZE, HEADROOM, Mbuf, Mempool, MempoolError
from nicemu.dma import DmaError
from nicemu.regs import RxdErrors, RxdStatus


@pytest.fixture
def pool(mem) -> Mempool:
    return Mempool.allocate(DmaAllocator(mem, base=0x1000), 16)


def test_layout_in_dma_memory(mem, pool) -> None:
    assert pool.addr % 128 == 0 and pool.addr >= 0x1000
    assert pool.buf_size == BUF_SIZE == HEADROOM + 2048
    assert mem.contains(pool.addr, pool.num_bufs * pool.buf_size)
    m = pool.alloc()
    assert m.buf_addr == pool.addr + m.idx * BUF_SIZE
    assert m.data_addr == m.buf_addr + HEADROOM
    assert pool.index_of(m.data_addr + 5) == m.idx
    with pytest.raises(MempoolError):
        pool.index_of(pool.addr + 16 * BUF_SIZE)


def test_stack_alloc_free_and_exhaustion(pool) -> None:
    got = [pool.alloc_index() for _ in range(16)]
    assert got == list(range(16))  # buffer 0 first, then in address order
    assert pool.available == 0 and pool.in_use == 16
    assert pool.alloc() is None and pool.alloc_index() == -1
    pool.free_index(7)
    pool.free_index(3)
    assert pool.alloc_index() == 3  # a stack: last freed, first reused (cache-warm)
    assert pool.alloc_index() == 7
    for i in got:
        pool.free_index(i)
    assert pool.available == 16
    pool.check()


def test_alloc_resets_metadata(pool) -> None:
    m = pool.alloc()
    m.set_data(b"x" * 100)
    m.adj(10)
    pool.ol_flags[m.idx] = 0x1234
    m.free()
    again = pool.alloc()
    assert again == m
    assert (again.data_off, again.data_len, again.refcnt, again.ol_flags) == (HEADROOM, 0, 1, 0)


def test_refcount_and_double_free(pool) -> None:
    m = pool.alloc()
    m.ref()
    assert m.refcnt == 2
    m.free()
    assert pool.available == 15  # still referenced once
    m.free()
    assert pool.available == 16
    with pytest.raises(MempoolError, match="double free"):
        m.free()
    with pytest.raises(MempoolError, match="is free"):
        m.ref()
    with pytest.raises(MempoolError):
        pool.free_index(16)
    with pytest.raises(MempoolError):
        pool.mbuf(-1)
    pool.check()


def test_data_is_zero_copy(mem, pool) -> None:
    m = pool.alloc()
    m.set_data(b"hello, wire")
    assert mem.read(m.data_addr, 11) == b"hello, wire"  # the bytes are in DMA memory
    mem.write(m.data_addr, b"J")  # a device write shows through the view
    assert bytes(m) == b"Jello, wire"
    m.data[0:1] = b"Y"
    assert mem.read(m.data_addr, 1) == b"Y"


def test_headroom_tailroom_operations(pool) -> None:
    m = pool.alloc()
    m.set_data(bytes(range(20)))
    assert m.headroom == HEADROOM and m.tailroom == BUF_SIZE - HEADROOM - 20
    hdr = m.prepend(4)
    hdr[:] = b"\xaa\xbb\xcc\xdd"
    assert len(m) == 24 and bytes(m)[:5] == b"\xaa\xbb\xcc\xdd\x00"
    m.adj(4)
    assert bytes(m) == bytes(range(20))
    m.trim(5)
    assert bytes(m) == bytes(range(15))
    tail = m.append(3)
    tail[:] = b"end"
    assert bytes(m)[-3:] == b"end" and len(m) == 18
    with pytest.raises(MempoolError):
        m.prepend(HEADROOM + 1)
    with pytest.raises(MempoolError):
        m.append(m.tailroom + 1)
    with pytest.raises(MempoolError):
        m.adj(19)
    with pytest.raises(MempoolError):
        m.trim(-1)
    with pytest.raises(MempoolError):
        m.set_data(bytes(BUF_SIZE - HEADROOM + 1))
    assert len(m) == 18  # failed operations change nothing


def test_checksum_offload_flags(pool) -> None:
    m = pool.alloc()
    assert m.ip_checksum == m.l4_checksum == "unknown"
    pool.ol_flags[m.idx] = RxdStatus.DD | RxdStatus.EOP | RxdStatus.IPCS | RxdStatus.TCPCS
    assert (m.ip_checksum, m.l4_checksum) == ("good", "good")
    pool.ol_flags[m.idx] |= RxdErrors.TCPE << 8
    assert (m.ip_checksum, m.l4_checksum) == ("good", "bad")
    pool.ol_flags[m.idx] = RxdStatus.DD | RxdStatus.EOP | RxdStatus.IXSM
    assert m.ip_checksum == "unknown"


def test_bad_geometry_is_refused(mem) -> None:
    with pytest.raises(MempoolError):
        Mempool(mem, 0, 0)
    with pytest.raises(MempoolError):
        Mempool(mem, 0, 4, buf_size=128, headroom=128)
    with pytest.raises(DmaError):
        Mempool(mem, (1 << 20) - BUF_SIZE, 2)  # runs past the end of DMA memory
    with pytest.raises(MemoryError):
        Mempool.allocate(DmaAllocator(mem), 1000)  # 2 MiB does not fit in 1 MiB


def test_check_detects_corruption(pool) -> None:
    a = pool.alloc()
    pool.check()
    pool.refcnt[a.idx] = 0  # leaked: neither free nor referenced
    with pytest.raises(MempoolError):
        pool.check()


def test_mbuf_identity(pool) -> None:
    m = pool.alloc()
    assert Mbuf(pool, m.idx) == m and hash(Mbuf(pool, m.idx)) == hash(m)
    assert pool.alloc() != m
