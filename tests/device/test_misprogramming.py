"""Misprogramming never crashes the device and never touches memory outside DmaMemory.

Each case has a defined outcome (docs/datapath.md, "Misprogramming"), and after a reset the
device works again. Both engines. Memory outside the mapped regions cannot even be reached
by construction; these tests also check that nothing *inside* is written where it must not be.
"""
from __future__ import annotations

import os
import random
import struct
import zlib
from array import array

import pytest
from conftest import RxRing, TxRing, enable_bus_master, make_frame, sealed_memfd
from test_emulator_process import procs  # noqa: F401  (the fixture: processes reaped, /dev/shm checked)

from nicemu import DmaMemory
from nicemu import regs as R
from nicemu.nic import Nic

EOP, IFCS, RS = int(R.TxdCmd.EOP), int(R.TxdCmd.IFCS), int(R.TxdCmd.RS)
MEM = 1 << 20


@pytest.fixture(params=["python", "cython"])
def dev(request, make_nic):
    return make_nic(engine=request.param)


def body(size: int = 60) -> bytes:
    return make_frame(dst=bytes.fromhex("525400654321"), size=size, fcs=False)


def works_after_reset(nic) -> None:
    """CTRL.RST, program fresh rings, and one frame goes out and one comes in."""
    nic.write32(R.CTRL, int(R.Ctrl.RST))
    enable_bus_master(nic)
    nic.transmitted()
    tx = TxRing(nic).setup()
    tx.send([body()])
    assert len(nic.transmitted()) == 1
    rx = RxRing(nic).setup()
    frame = make_frame()
    nic.receive(frame)
    assert rx.data(0) == frame


def snapshot(nic) -> bytes:
    return nic.mem.read(0, nic.mem.size)


# --- TX -----------------------------------------------------------------------------------

def test_tx_ring_outside_memory_skips_descriptors(dev) -> None:
    TxRing(dev).setup()
    dev.write32(R.TDBAL, 0xFFFF0000)
    dev.write32(R.TDBAH, 0x7)
    before = snapshot(dev)
    dev.write32(R.TDT, 3)
    assert dev.read32(R.TDH) == 3  # skipped, not stuck
    assert dev.dma_errors == 3
    assert dev.transmitted() == [] and snapshot(dev) == before
    works_after_reset(dev)


def test_tx_ring_straddling_the_end_of_memory(dev) -> None:
    TxRing(dev).setup()
    dev.write32(R.TDBAL, MEM - 0x40)  # descriptors 0..3 inside, 4.. outside
    for k in range(4):
        dev.mem.write(MEM - 0x40 + 16 * k, R.TX_DESC.pack(0x80000, 60, 0, EOP | IFCS | RS, 0, 0, 0))
    dev.mem.write(0x80000, body())
    dev.write32(R.TDT, 6)
    assert len(dev.transmitted()) == 4 and dev.dma_errors == 2 and dev.read32(R.TDH) == 6
    works_after_reset(dev)


def test_rings_at_the_top_of_the_bus_address_space_do_not_wrap_to_zero(dev) -> None:
    """Descriptors past 2**64 - 1 are faults, never bus address 0 again (the Cython engine's
    64-bit arithmetic used to wrap there and send frames the driver never queued)."""
    mem = dev.mem
    mem.write(0x80000, body())
    for k in range(3):  # valid-looking descriptors at bus address 0, where a wrap would land
        mem.write(16 * k, R.TX_DESC.pack(0x80000, 60, 0, EOP | IFCS | RS, 0, 0, 0))
    TxRing(dev, n=8).setup()
    dev.write32(R.TDBAH, 0xFFFFFFFF)
    dev.write32(R.TDBAL, 0xFFFFFFE0)  # descriptors 0, 1 below 2**64; 2.. beyond it
    before = snapshot(dev)
    dev.write32(R.TDT, 5)
    assert dev.transmitted() == [] and dev.dma_errors == 5 and dev.read32(R.TDH) == 5
    RxRing(dev, n=8).setup()
    for k in range(3):
        mem.write(16 * k, R.RX_DESC.pack(0x40000, 0, 0, 0, 0, 0))
    before = snapshot(dev)
    dev.write32(R.RDBAH, 0xFFFFFFFF)
    dev.write32(R.RDBAL, 0xFFFFFFE0)
    dev.write32(R.RDH, 2)  # the first descriptor the device would use is past 2**64
    dev.write32(R.RDT, 6)
    dev.receive(make_frame())
    assert snapshot(dev) == before and dev.read32(R.RDH) == 2 and dev.engine.rx_dropped == 1
    works_after_reset(dev)


def test_tx_buffer_outside_memory_drops_the_packet(dev) -> None:
    ring = TxRing(dev).setup()
    dev.mem.write(ring.base, R.TX_DESC.pack(MEM - 10, 60, 0, EOP | IFCS | RS, 0, 0, 0))
    dev.mem.write(ring.base + 16, R.TX_DESC.pack(1 << 63, 60, 0, EOP | IFCS | RS, 0, 0, 0))
    dev.write32(R.TDT, 2)
    assert dev.transmitted() == []
    assert dev.read32(R.TDH) == 2 and ring.sta(0) & R.TxdSta.DD and ring.sta(1) & R.TxdSta.DD
    assert dev.dma_errors == 2 and dev.engine.tx_dropped == 2
    works_after_reset(dev)


def test_zero_length_tx_ring_with_tdt_set(dev) -> None:
    """QEMU CVE-2016-1981 / CVE-2021-20257: an infinite loop here. nicemu: nothing happens."""
    TxRing(dev).setup()
    dev.write32(R.TDLEN, 0)
    dev.write32(R.TDT, 5)
    assert dev.read32(R.TDH) == 0 and dev.transmitted() == []
    dev.write32(R.TDLEN, 100)  # below 128: rounds down to 0 descriptors
    assert dev.read32(R.TDLEN) == 0
    dev.write32(R.TDT, 7)
    assert dev.read32(R.TDH) == 0 and dev.transmitted() == []
    works_after_reset(dev)


def test_ring_length_not_a_multiple_of_128_is_rounded_down(dev) -> None:
    ring = TxRing(dev, n=8).setup()
    dev.write32(R.TDLEN, 8 * 16 + 100)  # 228: 8 descriptors
    frames = [body(60 + i) for i in range(7)]
    ring.send(frames)
    assert [f[:-4] for f in dev.transmitted()] == frames
    ring.send([body(99)])  # tail wraps 7 -> 0 in an 8-descriptor ring
    assert len(dev.transmitted()) == 1 and dev.read32(R.TDH) == 0
    # the engine rounds down even if the register held a raw value
    dev.regs[R.TDLEN >> 2] = 8 * 16 + 100
    ring.send([body()])
    assert len(dev.transmitted()) == 1
    works_after_reset(dev)


def test_rx_ring_length_not_a_multiple_of_128_is_rounded_down(dev) -> None:
    ring = RxRing(dev, n=8).setup()
    dev.write32(R.RDLEN, 8 * 16 + 100)  # 228: 8 descriptors
    assert dev.read32(R.RDLEN) == 128
    frames = [make_frame(size=64 + i) for i in range(7)]
    for f in frames:
        dev.receive(f)
    assert dev.read32(R.RDH) == 7 and [ring.data(k) for k in range(7)] == frames
    ring.give(7)  # tail 7 -> 6: the ring wraps after descriptor 7, not after 14
    dev.regs[R.RDLEN >> 2] = 8 * 16 + 100  # the engine rounds down a raw value too
    for f in frames[:2]:
        dev.receive(f)
    assert dev.read32(R.RDH) == 1 and ring.data(7) == frames[0] and ring.data(0) == frames[1]
    works_after_reset(dev)


@pytest.mark.parametrize("tdh, tdt", [(0, 40), (40, 3), (0xFFFF, 0)])
def test_tx_head_or_tail_beyond_the_ring_is_no_work(dev, tdh, tdt) -> None:
    ring = TxRing(dev).setup()
    for k in range(16):
        dev.mem.write(ring.base + 16 * k, R.TX_DESC.pack(ring.buf_base, 60, 0, EOP | RS, 0, 0, 0))
    dev.write32(R.TDH, tdh)
    dev.write32(R.TDT, tdt)
    assert dev.transmitted() == [] and dev.read32(R.TDH) == tdh
    works_after_reset(dev)


def test_tx_chain_without_eop_is_bounded(dev) -> None:
    ring = TxRing(dev, n=8).setup()
    for k in range(8):
        dev.mem.write(ring.base + 16 * k, R.TX_DESC.pack(ring.buf_base, 100, 0, RS | IFCS, 0, 0, 0))
    dev.write32(R.TDT, 3)
    assert dev.read32(R.TDH) == 0  # an incomplete packet: waits for the rest
    dev.write32(R.TDT, 7)  # a full ring (7 descriptors) and still no EOP: it can never end
    assert dev.read32(R.TDH) == 7 and dev.transmitted() == []
    assert dev.engine.tx_dropped == 1
    assert all(ring.sta(k) & R.TxdSta.DD for k in range(7))  # the driver gets its buffers back
    works_after_reset(dev)


def test_eopless_chain_on_the_largest_ring_is_fetched_once(make_nic) -> None:
    """The attack on a hostile peer's behalf (issue 7): a chain without EOP on the largest ring,
    rung a few descriptors at a time. Each doorbell fetches only the new descriptors (it used
    to walk the whole pending chain again: 65,526 descriptors, 35 ms a doorbell in Python)."""
    for engine in ("python", "cython"):
        mem = DmaMemory(2 << 20)
        dev = make_nic(engine=engine, mem=mem)
        n = R.RING_LEN_MASK // 16  # 65,528 descriptors
        mem.write(0, R.TX_DESC.pack(0x100000, 0, 0, RS | IFCS, 0, 0, 0) * n)
        dev.write32(R.TDBAL, 0)
        dev.write32(R.TDLEN, R.RING_LEN_MASK)
        dev.write32(R.TCTL, int(R.Tctl.EN))
        per_doorbell = set()
        for tail in range(7, n - 1, 7):
            before = dev.engine.tx_descs_fetched
            dev.write32(R.TDT, tail)
            per_doorbell.add(dev.engine.tx_descs_fetched - before)
            assert dev.read32(R.TDH) == 0  # nothing dropped while the chain may still end
        assert per_doorbell == {7}
        dev.write32(R.TDT, n - 1)  # n - 1 descriptors without EOP: this chain can never end
        assert dev.engine.tx_descs_fetched == n - 1 and dev.engine.tx_dropped == 1
        assert dev.read32(R.TDH) == n - 1 and dev.next_deadline() is None
        assert all(mem.read(16 * k + 12, 1)[0] & R.TxdSta.DD for k in range(0, n - 1, 997))
        works_after_reset(dev)
        mem.close()


def test_tx_chain_over_16384_bytes_is_dropped_as_soon_as_it_gets_there(dev) -> None:
    """No need to wait for the EOP of a packet that can never be sent: the descriptors fetched
    so far are written back and TDH moves on; the rest of the packet, up to its EOP, is consumed
    as it comes (one drop in all), and the next packet goes out."""
    ring = TxRing(dev, n=32).setup()
    dev.write32(R.PBA, 0x00300010)  # 48 KB TX: only the 16384 limit applies
    for k in range(12):  # 2000 bytes each, EOP on the last: 24000 bytes
        dev.mem.write(ring.base + 16 * k, R.TX_DESC.pack(ring.buf_base, 2000, 0, RS | (EOP if k == 11 else 0), 0, 0, 0))
    dev.write32(R.TDT, 9)  # 18000 bytes so far
    assert dev.read32(R.TDH) == 9 and dev.engine.tx_dropped == 1
    assert all(ring.sta(k) & R.TxdSta.DD for k in range(9))
    dev.write32(R.TDT, 11)
    assert dev.read32(R.TDH) == 11 and dev.engine.tx_descs_fetched == 11
    frame = body(60)
    dev.mem.write(ring.buf_base + 0x4000, frame)
    dev.mem.write(ring.base + 16 * 12, R.TX_DESC.pack(ring.buf_base + 0x4000, 60, 0, EOP | IFCS | RS, 0, 0, 0))
    dev.write32(R.TDT, 13)  # the dropped packet's EOP, then a good one
    assert dev.read32(R.TDH) == 13 and dev.engine.tx_dropped == 1
    assert [f[:-4] for f in dev.transmitted()] == [frame]
    assert all(ring.sta(k) & R.TxdSta.DD for k in range(13))
    works_after_reset(dev)


def test_tx_chain_over_the_tx_packet_buffer_is_dropped_as_soon_as_it_gets_there(dev) -> None:
    ring = TxRing(dev).setup()
    dev.write32(R.PBA, (2 << 16) | 46)  # 2 KB TX packet buffer
    for k in range(3):
        dev.mem.write(ring.base + 16 * k, R.TX_DESC.pack(ring.buf_base, 1500, 0, RS, 0, 0, 0))
    dev.write32(R.TDT, 1)
    assert dev.read32(R.TDH) == 0  # 1500 bytes fit: it waits for its EOP
    dev.write32(R.TDT, 3)
    assert dev.read32(R.TDH) == 3 and dev.engine.tx_dropped == 1 and dev.transmitted() == []
    works_after_reset(dev)


def test_tx_chain_fetched_state_follows_the_ring(dev) -> None:
    """What was fetched of a packet belongs to the ring and TDH it was fetched from: TDT moved
    back over it, TDH rewritten or a reset make the device fetch again (within one walk's
    budget); moving TDT back and forth costs no more than that."""
    ring = TxRing(dev).setup()
    frame = body(120)
    for k in range(3):
        put = frame[40 * k: 40 * k + 40]
        dev.mem.write(ring.buf_base + 64 * k, put)
        dev.mem.write(ring.base + 16 * k, R.TX_DESC.pack(ring.buf_base + 64 * k, 40, 0, RS | (EOP | IFCS if k == 2 else 0), 0, 0, 0))
    eng = dev.engine
    dev.write32(R.TDT, 2)
    assert eng.tx_descs_fetched == 2
    dev.write32(R.TDT, 1)  # back over a fetched descriptor: the device forgets the chain
    assert eng.tx_descs_fetched == 3 and dev.read32(R.TDH) == 0
    dev.write32(R.TDH, 0)  # the same TDH: nothing changes
    dev.write32(R.TDT, 3)
    assert eng.tx_descs_fetched == 5 and dev.read32(R.TDH) == 3
    assert [f[:-4] for f in dev.transmitted()] == [frame]
    for k in (3, 4, 5):  # a new chain without EOP
        dev.mem.write(ring.base + 16 * k, R.TX_DESC.pack(ring.buf_base, 40, 0, RS, 0, 0, 0))
    dev.write32(R.TDT, 5)
    assert eng.tx_descs_fetched == 7
    dev.write32(R.TDH, 4)  # TDH rewritten under it (misprogramming): fetched again from 4
    dev.write32(R.TDT, 6)
    assert eng.tx_descs_fetched == 9 and dev.read32(R.TDH) == 4 and dev.transmitted() == []
    dev.write32(R.CTRL, int(R.Ctrl.RST))  # a reset in the middle of the chain
    enable_bus_master(dev)
    ring = TxRing(dev).setup()
    ring.send([body(60)])
    assert len(dev.transmitted()) == 1 and dev.read32(R.TDH) == 1


def test_tx_packet_longer_than_16384_is_dropped(dev) -> None:
    ring = TxRing(dev, n=16).setup()
    dev.write32(R.PBA, 0x00300010)  # 48 KB TX so that only the 16384 limit applies
    for k in range(9):  # 9 descriptors of 2000 bytes = 18000 bytes
        cmd = RS | (EOP | IFCS if k == 8 else 0)
        dev.mem.write(ring.base + 16 * k, R.TX_DESC.pack(ring.buf_base, 2000, 0, cmd, 0, 0, 0))
    dev.write32(R.TDT, 9)
    assert dev.transmitted() == [] and dev.read32(R.TDH) == 9 and dev.engine.tx_dropped == 1
    frame = body(16380)  # 16384 with the FCS: the largest
    for k in range(9, 11):
        piece = frame[: 8190] if k == 9 else frame[8190:]
        addr = 0x20000 + (k - 9) * 0x4000
        dev.mem.write(addr, piece)
        dev.mem.write(ring.base + 16 * k, R.TX_DESC.pack(addr, len(piece), 0, RS | (EOP | IFCS if k == 10 else 0), 0, 0, 0))
    dev.write32(R.TDT, 11)
    (out,) = dev.transmitted()
    assert len(out) == 16384 and out == frame + struct.pack("<I", zlib.crc32(frame))
    works_after_reset(dev)


def test_tx_packet_longer_than_the_tx_packet_buffer_is_dropped(dev) -> None:
    ring = TxRing(dev).setup()
    dev.write32(R.PBA, (2 << 16) | 46)  # 2 KB TX packet buffer
    frame = body(2100)
    dev.mem.write(ring.buf_base, frame)
    dev.mem.write(ring.base, R.TX_DESC.pack(ring.buf_base, len(frame), 0, EOP | IFCS | RS, 0, 0, 0))
    dev.write32(R.TDT, 1)
    assert dev.transmitted() == [] and dev.read32(R.TDH) == 1 and dev.engine.tx_dropped == 1
    dev.write32(R.PBA, 0)  # no TX buffer at all: every packet is too long
    ring.tail = 1
    ring.send([body(60)])
    assert dev.transmitted() == [] and dev.engine.tx_dropped == 2 and dev.read32(R.TDH) == 2
    works_after_reset(dev)


# --- RX -----------------------------------------------------------------------------------

def test_rx_ring_outside_memory_drops_without_writing(dev) -> None:
    RxRing(dev).setup()
    dev.write32(R.RDBAL, 0xFFFFF000)
    before = snapshot(dev)
    for _ in range(3):
        dev.receive(make_frame())
    assert snapshot(dev) == before
    assert dev.read32(R.RDH) == 0 and dev.dma_errors == 3 and dev.engine.rx_dropped == 3
    works_after_reset(dev)


def test_rx_buffer_outside_memory_drops_without_writing(dev) -> None:
    ring = RxRing(dev, bufsize=256).setup(rctl=3 << R.RCTL_BSIZE_SHIFT)
    dev.mem.write(ring.base, R.RX_DESC.pack(MEM - 40, 0, 0, 0, 0, 0))  # 64 bytes do not fit
    dev.mem.write(ring.base + 16 * 2, R.RX_DESC.pack(1 << 50, 0, 0, 0, 0, 0))
    before = snapshot(dev)
    dev.receive(make_frame(size=64))
    assert snapshot(dev) == before and dev.dma_errors == 1 and dev.read32(R.RDH) == 0
    # a frame needing three buffers, the third one bad: nothing of it is written
    dev.mem.write(ring.base, R.RX_DESC.pack(ring.buf_base, 0, 0, 0, 0, 0))
    before = snapshot(dev)
    dev.receive(make_frame(size=600))
    assert snapshot(dev) == before and dev.dma_errors == 2 and dev.read32(R.RDH) == 0
    works_after_reset(dev)


def test_zero_length_rx_ring_frames_wait(dev) -> None:
    RxRing(dev).setup()
    dev.write32(R.RDLEN, 0)
    dev.receive(make_frame())
    assert dev.read32(R.RNBC) == 1 and dev.read32(R.RDH) == 0
    works_after_reset(dev)


@pytest.mark.parametrize("rdh, rdt", [(0, 40), (40, 3)])
def test_rx_head_or_tail_beyond_the_ring_is_no_buffers(dev, rdh, rdt) -> None:
    RxRing(dev).setup()
    dev.write32(R.RDH, rdh)
    before = snapshot(dev)
    dev.write32(R.RDT, rdt)
    dev.receive(make_frame())
    assert snapshot(dev) == before and dev.read32(R.RNBC) == 1 and dev.read32(R.RDH) == rdh
    works_after_reset(dev)


def test_frame_needing_more_buffers_than_the_ring_has_is_dropped(dev) -> None:
    ring = RxRing(dev, n=8, bufsize=256).setup(rctl=3 << R.RCTL_BSIZE_SHIFT)
    dev.receive(make_frame(size=1522))  # 6 buffers: fits in 7
    assert dev.read32(R.RDH) == 6
    dev.write32(R.RCTL, int(R.Rctl.EN | R.Rctl.LPE) | (3 << R.RCTL_BSIZE_SHIFT))
    ring.give(6)
    dev.receive(make_frame(size=3000))  # 12 buffers: never fits in an 8-descriptor ring
    assert dev.read32(R.RDH) == 6 and dev.engine.rx_dropped == 1
    frame = make_frame(size=64)
    dev.receive(frame)  # the queue is not blocked behind it
    assert ring.data(6) == frame
    works_after_reset(dev)


def test_rx_head_beyond_16_bits_and_tail_at_the_end(dev) -> None:
    ring = RxRing(dev).setup()
    dev.write32(R.RDH, 0x12345)  # 16-bit register: 0x2345, beyond a 16-descriptor ring
    assert dev.read32(R.RDH) == 0x2345
    dev.write32(R.RDT, 16)  # one past the last descriptor: beyond the ring too
    before = snapshot(dev)
    dev.receive(make_frame())
    assert snapshot(dev) == before and dev.read32(R.RNBC) == 1
    dev.write32(R.RDH, 0)
    dev.write32(R.RDT, 5)  # fixed by the driver: the waiting frame goes in
    assert dev.read32(R.RDH) == 1 and ring.data(0) == make_frame()
    works_after_reset(dev)


# --- register accesses -----------------------------------------------------------------------

def test_register_garbage_never_breaks_the_device(dev) -> None:
    """Unknown offsets inside BAR0 read 0 and ignore writes, unaligned offsets too; offsets
    outside BAR0 raise ValueError and change nothing. The device works after a reset."""
    rng = random.Random(7)
    known = set(R.REGISTERS)
    unknown = [off for off in range(0, R.BAR0_SIZE, 4) if off not in known]
    probes = rng.sample(unknown, 400) + [0x0004, 0x00CC, 0x0104, 0x2824, 0x3824, 0x40F8, 0x5600, 0x1FFFC]
    before = bytes(dev.regs)
    for off in probes:
        assert off not in known
        dev.write32(off, rng.getrandbits(32))
        assert dev.read32(off) == 0 and dev.peek32(off) == 0
    for off in rng.sample(range(R.BAR0_SIZE), 400):
        if off & 3:
            dev.write32(off, 0xFFFFFFFF)
            assert dev.read32(off) == 0
    for off in (-4, -1, R.BAR0_SIZE, R.BAR0_SIZE + 4, 1 << 40):
        with pytest.raises(ValueError):
            dev.write32(off, 0xFFFFFFFF)
        with pytest.raises(ValueError):
            dev.read32(off)
        with pytest.raises(ValueError):
            dev.peek32(off)
    assert bytes(dev.regs) == before  # nothing of the register file changed
    works_after_reset(dev)


def test_read_only_dma_region_is_never_written(make_nic) -> None:
    for engine in ("python", "cython"):
        mem = DmaMemory()
        fd = sealed_memfd(MEM)
        mem.map_fd(fd, 0, MEM, writable=False)
        nic = make_nic(engine=engine, mem=mem)
        nic.write32(R.RDBAL, 0x1000)
        nic.write32(R.RDLEN, 128)
        nic.write32(R.RCTL, int(R.Rctl.EN | R.Rctl.BAM))
        nic.write32(R.RDT, 5)
        nic.receive(make_frame())
        assert nic.dma_errors == 1 and nic.read32(R.RDH) == 0
        assert mem.read(0x1000, 128) == bytes(128)
        mem.close()


def test_unmapped_memory_is_noticed_by_the_engine(make_nic) -> None:
    """DMA_UNMAP while the device runs: the engine must not use the old mapping."""
    for engine in ("python", "cython"):
        mem = DmaMemory()
        fd = sealed_memfd(MEM)
        mem.map_fd(fd, 0, MEM)
        nic = make_nic(engine=engine, mem=mem)
        tx = TxRing(nic).setup()
        tx.send([body()])
        assert len(nic.transmitted()) == 1
        mem.unmap(0, MEM)
        nic.write32(R.TDT, 5)  # the driver rings a doorbell with its memory gone
        assert nic.transmitted() == [] and nic.dma_errors == 4 and nic.read32(R.TDH) == 5
        nic.receive(make_frame())
        fd = sealed_memfd(MEM)
        mem.map_fd(fd, 0, MEM)  # mapped again (fresh, zeroed)
        works_after_reset(nic)
        mem.close()


def test_a_frame_of_any_length_and_content_is_safe(dev) -> None:
    ring = RxRing(dev).setup(rctl=int(R.Rctl.SBP | R.Rctl.UPE | R.Rctl.MPE | R.Rctl.LPE | R.Rctl.BSEX) | (1 << 16))
    dev.write32(R.RXCSUM, 0x3FF)  # offload on, PCSS = 255
    rng = random.Random(3)
    for n in list(range(0, 80)) + [1522, 1523, 16383, 16384, 16385, 20000]:
        dev.receive(rng.randbytes(n))  # random bytes: almost all fail the FCS, SBP keeps them
        if dev.read32(R.RDH) == ring.tail:
            ring.give(ring.n - 1)
    assert dev.read32(R.RUC) == 64 and dev.read32(R.ROC) == 2  # sizes 0..63; 16385 and 20000
    assert dev.read32(R.CRCERRS) == 20  # the other 20: random bytes, stored with CE (SBP)
    # IPv4 headers that lie about their lengths
    for ihl, total in ((15, 20), (5, 65535), (5, 0), (6, 21)):
        ip = bytes([0x40 | ihl, 0]) + struct.pack("!H", total) + bytes(5) + b"\x06" + bytes(10)
        frame = make_frame(payload=b"", ethertype=0x0800, size=64, fcs=False)[:14] + ip
        dev.receive(frame + bytes(60 - len(frame)) + struct.pack("<I", zlib.crc32(frame + bytes(60 - len(frame)))))
    works_after_reset(dev)


def test_bad_arguments_from_python_raise_cleanly() -> None:
    from nicemu.datapath_ref import RefDatapath

    mods = [RefDatapath]
    try:
        from nicemu._datapath import Datapath

        mods.append(Datapath)
        with pytest.raises((ValueError, TypeError, BufferError)):
            Datapath(bytearray(16), DmaMemory(4096))  # a register file too small
    except ImportError:
        pass
    for cls in mods:
        mem = DmaMemory(4096)
        nic_regs = array("I", bytes(R.BAR0_SIZE))
        nic_regs[R.RCTL >> 2] = int(R.Rctl.EN)
        engine = cls(nic_regs, mem)
        with pytest.raises(TypeError):
            engine.receive(None)
        mem.close()


def test_nic_level_reset_keeps_the_engine_consistent(make_nic) -> None:
    for engine in ("python", "cython"):
        nic: Nic = make_nic(engine=engine)
        RxRing(nic).setup(give=0)
        for _ in range(5):
            nic.receive(make_frame())  # waiting in the RX packet buffer
        nic.reset()
        enable_bus_master(nic)
        rx = RxRing(nic).setup()  # the old frames were emptied with the buffer
        assert nic.read32(R.RDH) == 0
        frame = make_frame(size=100)
        nic.receive(frame)
        assert rx.data(0) == frame


# --- the same attack on a real emulator process with two devices -------------------------------

@pytest.mark.parametrize("engine", ["python", "cython"])
def test_eopless_chain_on_one_device_does_not_starve_the_other(procs, tmp_path, engine) -> None:
    """Device A's driver posts a chain without EOP on the largest ring and rings TDT 16,381
    times, four descriptors further each time, in rounds of 256 doorbells and one read; device
    B's driver, on the other device of the same process, asks for a register before each
    round. A's rounds are answered within the driver's reply timeout (each doorbell costs the
    four new descriptors, not the whole chain again), and every request of B is answered
    while A's doorbells are being processed: B's request sent before round r is answered by
    the time round r + 1 is (the emulator serves every ready client in each turn)."""
    import socket

    from driver.vfio_user_client import VfioUserBus
    from nicemu.vfio_user import protocol as p
    from nicemu.vfio_user.protocol import Command
    from test_emulator_process import MAC_A, MAC_B, read_stats

    sa, sb = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    proc = procs.serve("--engine", engine, "--socket", sa, "--mac", MAC_A, "--socket", sb, "--mac", MAC_B)
    with VfioUserBus(sa, 2 << 20) as a, VfioUserBus(sb, 1 << 16) as b:
        n = R.RING_LEN_MASK // 16  # 65,528 descriptors
        a.mem.write(0, R.TX_DESC.pack(0x100000, 0, 0, RS | IFCS, 0, 0, 0) * n)
        enable_bus_master(a)
        a.write32(R.TDBAL, 0)
        a.write32(R.TDLEN, R.RING_LEN_MASK)
        a.write32(R.TCTL, int(R.Tctl.EN))
        status = b.read32(R.STATUS)

        def ask_b(msg_id: int) -> None:  # a REGION_READ of STATUS whose reply is read later
            b.sock.sendall(p.HEADER.pack(msg_id, Command.REGION_READ, 32, 0, 0)
                           + p.REGION_ACCESS.pack(R.STATUS, p.BAR0_REGION, 4))

        def b_answered(msg_id: int) -> None:  # already in B's socket: no waiting
            reply = b.sock.recv(36, socket.MSG_DONTWAIT)
            hdr = p.HEADER.unpack_from(reply)
            assert len(reply) == 36 and hdr[0] == msg_id and not hdr[3] & p.Flags.ERROR
            assert int.from_bytes(reply[32:], "little") == status

        tails = list(range(4, n - 1, 4))
        rounds = [tails[r: r + 256] for r in range(0, len(tails), 256)]
        for r, doorbells in enumerate(rounds):
            ask_b(1000 + r)
            for tail in doorbells:
                a.write32(R.TDT, tail)
            assert a.read32(R.TDH) == 0  # the chain waits for its EOP; nothing dropped
            if r:
                b_answered(1000 + r - 1)
        a.write32(R.TDT, n - 1)  # n - 1 descriptors without EOP: dropped
        assert a.read32(R.TDH) == n - 1
        b_answered(1000 + len(rounds) - 1)
        assert len(rounds) == 64
    stats = read_stats(proc)["devices"]
    assert stats["nic0"]["tx_dropped"] == 1 and stats["nic0"]["dma_errors"] == 0
