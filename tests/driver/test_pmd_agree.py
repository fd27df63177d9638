"""The Cython PMD core (driver/_pmd.pyx) and its Python reference (driver/pmd_ref.py) agree.

Both run the same random sequence of device deliveries, rx bursts, frees, tx bursts, device
transmissions and reclaims, each against its own copy of DMA memory and a small scripted device
model that follows the SDM's ring rules. After every step, return values, ring state, counters,
doorbell writes, mempool metadata and every byte of DMA memory must be identical; the frames
the application receives and the device transmits are also checked against what was sent.
"""
from __future__ import annotations

import random
import struct
from array import array

import pytest

from driver.dma_alloc import DmaAllocator
from driver.mempool import Mempool
from driver.pmd_ref import RefCore
from nicemu.dma import DmaMemory
from nicemu.regs import (DESC_SIZE, RDT, TDT, RxdErrors, RxdStatus, TxdCmd, TxdSta)

_pmd = pytest.importorskip("driver._pmd", reason="build with: cythonize -i -3 driver/_pmd.pyx")

_QHHBBH = struct.Struct("<QHHBBH")
_QHBBBBH = struct.Struct("<QHBBBBH")


class ScriptedDevice:
    """The device side of the rings, reduced to the SDM rules the driver depends on."""

    def __init__(self, mem: DmaMemory, rx_ring: int, rx_count: int, tx_ring: int, tx_count: int) -> None:
        self.mem = mem
        self.rx_ring, self.rx_count, self.tx_ring, self.tx_count = rx_ring, rx_count, tx_ring, tx_count
        self.rdh = self.rdt = self.tdh = self.tdt = 0
        self.doorbells: list[tuple[int, int]] = []
        self.transmitted: list[bytes] = []
        self.no_buffer = 0

    def write32(self, off: int, value: int) -> None:
        self.doorbells.append((off, value))
        if off == RDT:
            self.rdt = value
        elif off == TDT:
            self.tdt = value
        else:
            raise AssertionError(f"unexpected register write {off:#x}")

    def deliver(self, frame: bytes, errors: int = 0, split: bool = False) -> bool:
        """DMA one frame: fields first, status (DD) last. `split` spans two descriptors."""
        parts = [frame[: len(frame) // 2], frame[len(frame) // 2 :]] if split else [frame]
        free = (self.rdt - self.rdh) % self.rx_count
        if free < len(parts):
            self.no_buffer += 1
            return False
        for k, part in enumerate(parts):
            d = self.rx_ring + self.rdh * DESC_SIZE
            addr = _QHHBBH.unpack(self.mem.read(d, 16))[0]
            self.mem.write(addr, part)
            last = k == len(parts) - 1
            status = RxdStatus.DD | (RxdStatus.EOP if last else 0) | RxdStatus.IXSM
            # length, checksum, status still 0, errors, special; then the status byte alone
            self.mem.write(d + 8, struct.pack("<HHBBH", len(part), 0, 0, errors if last else 0, 0))
            self.mem.write(d + 12, bytes([status]))
            self.rdh = (self.rdh + 1) % self.rx_count
        return True

    def transmit(self, k: int) -> None:
        """Process up to k descriptors from TDH toward TDT; DD written back only with RS."""
        pkt = b""
        for _ in range(k):
            if self.tdh == self.tdt:
                break
            d = self.tx_ring + self.tdh * DESC_SIZE
            addr, length, _cso, cmd, _sta, _css, _sp = _QHBBBBH.unpack(self.mem.read(d, 16))
            assert cmd & TxdCmd.IFCS and not cmd & TxdCmd.DEXT
            pkt += self.mem.read(addr, length)
            if cmd & TxdCmd.EOP:
                self.transmitted.append(pkt)
                pkt = b""
            if cmd & TxdCmd.RS:
                self.mem.write(d + 12, bytes([TxdSta.DD]))
            self.tdh = (self.tdh + 1) % self.tx_count


class Env:
    """One DMA memory, pool, device and core (Cython or reference)."""

    def __init__(self, core_cls, rx_count: int, tx_count: int, pool_size: int, rx_thresh: int, rs_thresh: int):
        self.mem = DmaMemory(1 << 20)
        alloc = DmaAllocator(self.mem)
        rx_ring = alloc.alloc_zeroed(rx_count * DESC_SIZE, 128)
        tx_ring = alloc.alloc_zeroed(tx_count * DESC_SIZE, 128)
        self.pool = Mempool.allocate(alloc, pool_size)
        self.dev = ScriptedDevice(self.mem, rx_ring, rx_count, tx_ring, tx_count)
        self.core = core_cls(self.pool, rx_ring, rx_count, tx_ring, tx_count, self.dev.write32,
                             rx_free_thresh=rx_thresh, tx_rs_thresh=rs_thresh)
        self.dev.rdt = self.core.rx_init()
        self.out = array("I", [0]) * 256
        self.held: list[int] = []  # mbufs the application owns

    def state(self) -> tuple:
        c, p = self.core, self.pool
        return (
            c.rx_next, c.rx_hold, c.rx_discard, c.tx_next, c.tx_clean, c.tx_in_flight(),
            c.ipackets, c.ibytes, c.opackets, c.obytes, c.ierrors, c.rx_nombuf,
            c.rx_doorbells, c.tx_doorbells, bytes(c.rx_slot), bytes(c.tx_slot),
            bytes(p.data_off), bytes(p.data_len), bytes(p.refcnt), bytes(p.ol_flags),
            bytes(p.stack[: p.available]), p.available, tuple(self.dev.doorbells),
            tuple(self.dev.transmitted), self.dev.rdh, self.dev.tdh, tuple(self.held),
        )


def _run(seed: int, steps: int = 400) -> None:
    rng = random.Random(seed)
    rx_count, tx_count = rng.choice([(64, 64), (32, 64), (64, 128)])
    rs_thresh = rng.choice([8, 16, 32])
    rx_thresh = rng.choice([1, 8, 32])
    # small pools exercise rx_nombuf; 40 spare buffers still outnumber the < rs_thresh TX
    # buffers a partly filled batch keeps, so the final drain can always make progress
    pool_size = rx_count + rng.choice([40, 200])
    envs = [Env(cls, rx_count, tx_count, pool_size, rx_thresh, rs_thresh) for cls in (RefCore, _pmd.Core)]
    expected_rx: list[bytes] = []  # frames delivered intact, in order
    for step in range(steps):
        op = rng.random()
        results = []
        if op < 0.25:  # the wire delivers frames
            frames = []
            for _ in range(rng.randrange(0, 40)):
                frame = rng.randbytes(rng.randrange(60, 1519))
                errors = rng.choice([0] * 12 + [RxdErrors.CE, RxdErrors.RXE, RxdErrors.IPE])
                split = rng.random() < 0.05
                frames.append((frame, errors, split))
            for env in envs:
                results.append([env.dev.deliver(f, e, s) for f, e, s in frames])
            for (frame, errors, split), ok in zip(frames, results[0]):
                if ok and not split and not errors & ~RxdErrors.IPE:
                    expected_rx.append(frame)
        elif op < 0.5:  # the application polls
            n = rng.randrange(0, 65)
            for env in envs:
                got = env.core.rx_burst(env.out, n)
                idx = list(env.out[:got])
                env.held.extend(idx)
                results.append((got, idx, [bytes(env.pool.mbuf(i).data) for i in idx]))
            for data in results[0][2]:
                assert data == expected_rx.pop(0)
        elif op < 0.65:  # it frees some of what it holds
            k = rng.randrange(0, len(envs[0].held) + 1)
            for env in envs:
                batch = array("I", env.held[:k])
                env.core.free_bulk(batch, len(batch))
                del env.held[:k]
        elif op < 0.8:  # it sends: received mbufs (forwarding) or new ones
            k = rng.randrange(0, 48)
            new = rng.random() < 0.5
            length = rng.randrange(1, 2049)
            for env in envs:
                if new:
                    batch = array("I", [0]) * k
                    if env.core.alloc_bulk(batch, k, length) == 0:
                        batch = array("I")
                else:
                    batch = array("I", env.held[:k])
                    del env.held[: len(batch)]
                sent = env.core.tx_burst(batch, len(batch))
                env.held.extend(batch[sent:])  # unsent mbufs stay the application's
                results.append((len(batch), sent, list(batch)))
        elif op < 0.92:  # the device transmits
            k = rng.randrange(0, 80)
            for env in envs:
                env.dev.transmit(k)
        elif op < 0.94:
            for env in envs:
                results.append(env.core.tx_reclaim())
        elif op < 0.96:
            for env in envs:
                room = env.core.tx_room()
                assert room == env.core.tx_count - 1 - env.core.tx_in_flight()
                results.append(room)
        else:
            for env in envs:
                results.append(env.core.rx_flush())
        if results:
            assert results[0] == results[1], f"seed {seed} step {step}: {results}"
        assert envs[0].state() == envs[1].state(), f"seed {seed} step {step} op {op:.2f}"
        for env in envs:
            env.pool.check()
    # drain: every frame delivered intact reaches the application, in order, exactly once
    for env in envs:
        env.core.free_bulk(array("I", env.held), len(env.held))
        env.held.clear()
        env.dev.transmit(env.dev.tx_count)
        env.core.tx_reclaim()
        received = []
        while got := env.core.rx_burst(env.out, 64):
            received += [bytes(env.pool.mbuf(i).data) for i in env.out[:got]]
            env.core.free_bulk(env.out, got)
        assert received == expected_rx
        assert not env.core.rx_ready()
    a, b = envs
    assert a.state() == b.state()
    assert bytes(a.mem.regions[0].mm) == bytes(b.mem.regions[0].mm)
    for env in envs:
        env.mem.close()


@pytest.mark.parametrize("seed", range(12))
def test_cython_core_agrees_with_reference(seed: int) -> None:
    _run(seed)


def test_transmitted_bytes_are_the_mbuf_data() -> None:
    """Zero copy TX: what the device reads is exactly the mbuf's data, for both cores."""
    for cls in (RefCore, _pmd.Core):
        env = Env(cls, 64, 64, 256, 32, 32)
        batch = array("I", [0]) * 40
        assert env.core.alloc_bulk(batch, 40, 100) == 40
        frames = []
        for i in batch:
            m = env.pool.mbuf(i)
            m.data[:] = bytes([i & 0xFF]) * 100
            frames.append(bytes(m.data))
        assert env.core.tx_burst(batch, 40) == 40
        assert env.dev.doorbells == [(TDT, 40)]  # one doorbell for the whole burst
        env.dev.transmit(64)
        assert env.dev.transmitted == frames
        env.mem.close()


@pytest.mark.parametrize("cls", [RefCore, "cython"])
def test_bad_bursts_are_refused_whole(cls) -> None:
    cls = _pmd.Core if cls == "cython" else cls
    env = Env(cls, 64, 64, 128, 32, 32)
    batch = array("I", [0]) * 4
    assert env.core.alloc_bulk(batch, 4, 60) == 4
    before = env.state()
    bad = array("I", [batch[0], 9999])
    with pytest.raises(ValueError, match="not in the pool"):
        env.core.tx_burst(bad, 2)
    env.core.free_bulk(batch, 1, 3)
    with pytest.raises(ValueError, match="is free"):
        env.core.tx_burst(batch, 4)
    with pytest.raises(ValueError):
        env.core.tx_burst(array("H", [0]), 1)
    with pytest.raises(ValueError):
        env.core.rx_burst(env.out, len(env.out) + 1)
    with pytest.raises(ValueError):
        env.core.alloc_bulk(batch, 1, 5000)
    with pytest.raises(ValueError, match="appears 2 times"):
        env.core.tx_burst(array("I", [batch[0], batch[1], batch[0]]), 3)  # one reference, sent twice
    with pytest.raises(ValueError, match="appears 2 times"):
        env.core.free_bulk(array("I", [batch[1], batch[1]]), 2)
    assert env.dev.doorbells == [] and env.core.tx_in_flight() == 0
    assert before[3:6] == env.state()[3:6]
    assert [env.pool.refcnt[i] for i in batch] == [1, 1, 1, 0]  # failed checks spent nothing
    env.pool.mbuf(batch[0]).ref()  # two references: it may be sent twice (a flood)
    assert env.core.tx_burst(array("I", [batch[0], batch[0]]), 2) == 2
    env.dev.transmit(64)
    with pytest.raises(ValueError):
        cls(env.pool, 0, 60, 1024, 64, env.dev.write32)  # ring size not a multiple of 8
    with pytest.raises(ValueError):
        cls(env.pool, 0, 64, 1024, 64, env.dev.write32, tx_rs_thresh=24)  # does not divide
    env.mem.close()
