"""The doorbell page's poll step (nicemu/vfio_user/pagepoll.py, _pagepoll.pyx): the compiled
step against its reference, and both against what the server did before it existed (each taken
slot through Nic.write32): slot rule, register files, DMA memory (frames and descriptors,
byte-exact), counters, timers and the interrupt line, on random sequences of doorbells, garbage
tails, interrupt masks and delay timers, for two linked devices."""
from __future__ import annotations

import mmap
import random
from types import SimpleNamespace

import pytest

from nicemu import DmaMemory
from nicemu import regs as R
from nicemu.nic import Nic
from nicemu.pci import COMMAND
from nicemu.vfio_user import doorbell as db
from nicemu.vfio_user import page_service as ps
from nicemu.vfio_user import pagepoll as pp

_pagepoll = pytest.importorskip("nicemu.vfio_user._pagepoll", reason="build with: python setup.py build_ext --inplace")

MEM = 1 << 20
TX_BASE, RX_BASE, TX_BUFS, RX_BUFS = 0x1000, 0x3000, 0x10000, 0x80000
MACS = ["52:54:00:00:05:00", "52:54:00:00:05:01"]


def test_slot_rule_compiled_equals_reference() -> None:
    rng = random.Random(1)
    for _ in range(20000):
        last = rng.getrandbits(64)
        word = last if rng.random() < 0.2 else rng.getrandbits(64)
        if rng.random() < 0.5:
            word = (word & 0xFFFFFFFF) | rng.choice([0, 1, 5, 0xFFFFFFFF, 0x80000000]) << 32
        handled = rng.choice([0, 1, 4, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, rng.getrandbits(32)])
        ring_len = rng.choice([0, 128, 8 * 16, 256 * 16, 0xFFFFFFFF, rng.getrandbits(32)])
        assert _pagepoll.slot_result(word, last, handled, ring_len) == pp.slot_result(word, last, handled, ring_len)


def test_event_rule_compiled_equals_reference() -> None:
    from array import array

    rng = random.Random(2)
    regs = array("I", bytes(R.BAR0_SIZE))
    for _ in range(20000):
        for off in (R.ICR, R.IMS, R.RDTR, R.TIDV):
            regs[off >> 2] = rng.choice([0, 0, rng.getrandbits(32), 1 << rng.randrange(32)])
        ev = rng.choice([0, rng.getrandbits(35), R.EV_RX_DONE, R.EV_TX_IDE, R.EV_RX_DONE | 0x4,
                         R.EV_TX_MORE | 1, rng.getrandbits(32)])
        assert _pagepoll.events_ok(regs, ev) == pp.events_ok(regs, ev)


class World:
    """Two linked Nics with their drivers' rings and a page each; `how`: "c" (compiled poll
    step), "ref" (its reference) or "write32" (the server before the poll step: every taken
    slot through Nic.write32, RDTs of both devices before a TDT)."""

    def __init__(self, how: str, engine: str) -> None:
        self.how = how
        self.now = [10_000]
        self.mems = [DmaMemory(MEM), DmaMemory(MEM)]
        self.nics = [Nic(m, mac=mac, clock=lambda: self.now[0], engine=engine) for m, mac in zip(self.mems, MACS)]
        self.nics[0].connect(self.nics[1])
        self.lines: list[tuple[int, bool]] = []
        for i, nic in enumerate(self.nics):
            nic.on_irq = lambda level, i=i: self.lines.append((i, level))
        self.mms = [mmap.mmap(-1, db.PAGE_SIZE) for _ in range(2)]
        kind = "python" if how == "ref" else "cython"
        self.pages = [db.make_page(mm, kind) for mm in self.mms]
        self.clients = [db.DoorbellPageRef(mm) for mm in self.mms]  # the drivers' side
        self.servers = []
        if how != "write32":
            self.poller = pp.make_poller(kind)
            assert isinstance(self.poller, pp.PagePollerRef) == (how == "ref")
        for i, nic in enumerate(self.nics):
            s = SimpleNamespace(nic=nic, name=f"nic{i}", posted_errors=0, messages=0, _conn_base=0,
                                _skipped_msgs=0, _page_port=None, _page_peer=None, last=[0, 0], doorbells=0, bad=0)
            if how != "write32":
                s._page_port = ps.make_port(s, self.poller, self.pages[i])
                self.poller.add(s._page_port)
            self.servers.append(s)

    def setup(self, rng_seed: int, tx_n: int, rx_n: int) -> None:
        for nic, mem in zip(self.nics, self.mems):
            nic.config_write(COMMAND, 0x6, 2)  # memory space + bus master
            for off, v in ((R.TDBAL, TX_BASE), (R.TDLEN, tx_n * 16), (R.RDBAL, RX_BASE), (R.RDLEN, rx_n * 16),
                           (R.RCTL, int(R.Rctl.EN | R.Rctl.SECRC | R.Rctl.BAM)), (R.TCTL, int(R.Tctl.EN | R.Tctl.PSP)),
                           (R.RXCSUM, 0x100)):
                nic.write32(off, v)
            for k in range(rx_n):
                mem.write(RX_BASE + 16 * k, R.RX_DESC.pack(RX_BUFS + k * 0x800, 0, 0, 0, 0, 0))

    def poll(self) -> None:
        if self.how == "write32":
            self._poll_write32()
            return
        for s in self.servers:
            s.messages = s.handled_msgs
            ps.refresh(s)
        ps.run(self.poller, self.poller.poll_all, self.servers)

    def _take(self, i: int, slot: int) -> int:
        """The server before the poll step (_page_apply): the slot rule, then Nic.write32."""
        s, nic = self.servers[i], self.nics[i]
        word = self.pages[i].load(slot)
        len_reg = R.TDLEN if slot == db.SLOT_TDT else R.RDLEN
        res, bad = pp.slot_result(word, s.last[slot], s.handled_msgs, nic.regs[len_reg >> 2])
        if res != pp.APPLIED:
            return res
        s.last[slot] = word
        s.doorbells += 1
        s.bad += bad
        nic.write32(R.TDT if slot == db.SLOT_TDT else R.RDT, word & 0xFFFF)
        return pp.APPLIED

    def _poll_write32(self) -> None:
        for i in range(2):
            self._take(i, db.SLOT_RDT)
            if self.pages[i].load(db.SLOT_TDT) != self.servers[i].last[db.SLOT_TDT]:
                waited = [self._take(j, db.SLOT_RDT) == pp.WAIT for j in range(2)]
                if not any(waited):  # a poll holds a TDT back while an RDT waits for messages
                    self._take(i, db.SLOT_TDT)

    def counters(self) -> list:
        out = []
        for s in self.servers:
            port = s._page_port
            out.append((s.doorbells, s.bad) if port is None else (port.doorbells, port.bad))
        return out

    def state(self) -> tuple:
        return (tuple(n.regs.tobytes() for n in self.nics), tuple(m.read(0, MEM) for m in self.mems),
                self.counters(), [n.next_deadline() for n in self.nics], [n.irq for n in self.nics],
                self.lines, [(n.engine.rx_written, n.engine.tx_descs_fetched, n.engine.dma_errors) for n in self.nics])

    def close(self) -> None:
        if self.how != "write32":
            for s in self.servers:
                self.poller.remove(s._page_port)
        for p in self.pages + self.clients:
            p.release()
        for mm in self.mms:
            mm.close()
        for m in self.mems:
            m.close()


def _frame(i: int, size: int, dst: str) -> bytes:
    body = bytes.fromhex(dst.replace(":", "")) + bytes(6) + b"\x88\xb5" + i.to_bytes(4, "big")
    return body + bytes((i * 13 + k) & 0xFF for k in range(size - len(body)))


def run_scenario(seed: int, engine: str, steps: int = 300) -> None:
    rng = random.Random(seed)
    tx_n, rx_n = rng.choice([16, 32, 64]), rng.choice([16, 32, 64])
    worlds = [World(how, engine) for how in ("c", "ref", "write32")]
    try:
        for w in worlds:
            w.setup(seed, tx_n, rx_n)
            for s in w.servers:
                s.handled_msgs = 0
        tails = [0, 0]
        rdts = [0, 0]
        seqs = [[0, 0], [0, 0]]
        handled = [0, 0]
        k = 0
        for step in range(steps):
            r = rng.random()
            dev = rng.randrange(2)
            if r < 0.35:  # frames queued on dev's TX ring and its TDT to the page
                n = rng.randrange(1, 6)
                for _ in range(n):
                    size = rng.choice([60, 64, rng.randrange(60, 1514)])
                    f = _frame(k, size, MACS[1 - dev] if rng.random() < 0.9 else "ff:ff:ff:ff:ff:ff")
                    k += 1
                    cmd = int(R.TxdCmd.EOP | R.TxdCmd.IFCS | R.TxdCmd.RS) | (int(R.TxdCmd.IDE) if rng.random() < 0.3 else 0)
                    for w in worlds:
                        w.mems[dev].write(TX_BUFS + tails[dev] * 0x800, f)
                        w.mems[dev].write(TX_BASE + 16 * tails[dev], R.TX_DESC.pack(TX_BUFS + tails[dev] * 0x800,
                                                                                    len(f), 0, cmd, 0, 0, 0))
                    tails[dev] = (tails[dev] + 1) % tx_n
                value = tails[dev] if rng.random() < 0.93 else rng.choice([0xFFFF, tx_n, rng.getrandbits(16)])
                _store(worlds, rng, dev, db.SLOT_TDT, value, seqs, handled)
            elif r < 0.6:  # buffers given back: RDT to the page
                for w in worlds:
                    for j in range(rx_n):
                        w.mems[dev].write(RX_BASE + 16 * j + 12, b"\x00")  # DD cleared: the driver took them
                rdts[dev] = (worlds[0].nics[dev].regs[R.RDH >> 2] - 1) % rx_n if rng.random() < 0.9 else rng.getrandbits(16)
                _store(worlds, rng, dev, db.SLOT_RDT, rdts[dev], seqs, handled)
            elif r < 0.7:  # a message taken by the server (after-counts move on)
                handled[dev] += 1
                for w in worlds:
                    w.servers[dev].handled_msgs = handled[dev]
            elif r < 0.8:  # the control plane: masks, delay timers, causes read
                off = rng.choice([R.IMS, R.IMC, R.RDTR, R.TIDV, R.ICR, R.ITR])
                value = rng.choice([0, 0, int(R.Icr.RXT0), int(R.Icr.TXDW), rng.getrandbits(16), 0xFFFFFFFF])
                read = off == R.ICR and rng.random() < 0.5
                for w in worlds:
                    if read:
                        w.nics[dev].read32(R.ICR)
                    else:
                        w.nics[dev].write32(off, value)
            elif r < 0.85:  # time passes: due timers fire
                dt = rng.choice([1_000, 50_000, 5_000_000])
                for w in worlds:
                    w.now[0] += dt
                    for nic in w.nics:
                        if nic.next_deadline() is not None and nic.next_deadline() <= w.now[0]:
                            nic.run_timers()
            for w in worlds:
                w.poll()
            states = [w.state() for w in worlds]
            assert states[0] == states[2], f"compiled poll step != write32 at step {step} (seed {seed})"
            assert states[1] == states[2], f"reference poll step != write32 at step {step} (seed {seed})"
        assert sum(n.engine.rx_written for n in worlds[0].nics) > 0  # frames did cross
    finally:
        for w in worlds:
            w.close()


def _store(worlds, rng, dev: int, slot: int, value: int, seqs, handled) -> None:
    seqs[dev][slot] = (seqs[dev][slot] + 1) & 0xFFFF
    after = handled[dev] + (1 if rng.random() < 0.1 else 0)  # sometimes written after a message still to come
    word = db.pack_slot(value, seqs[dev][slot], after)
    for w in worlds:
        w.clients[dev].client_write(slot, word)


@pytest.mark.parametrize("seed", range(12))
def test_poll_step_agrees_with_write32_cython_engine(seed: int) -> None:
    run_scenario(seed, "cython")


@pytest.mark.parametrize("seed", range(3))
def test_poll_step_agrees_with_write32_python_engine(seed: int) -> None:
    run_scenario(100 + seed, "python", steps=150)


def test_fast_path_is_taken_and_python_only_when_due() -> None:
    """With interrupts masked and no delay timers (a PMD), every doorbell is applied in place;
    with RDTR set, the RX events go to Python (the timer starts) and the result is the same."""
    w = World("c", "cython")
    try:
        w.setup(0, 16, 16)
        for s in w.servers:
            s.handled_msgs = 0
        calls = []
        orig = ps._act
        ps._act = lambda poller: (calls.append(poller.act_kind), orig(poller))
        try:
            f = _frame(1, 60, MACS[1])
            w.mems[0].write(TX_BUFS, f)
            w.mems[0].write(TX_BASE, R.TX_DESC.pack(TX_BUFS, len(f), 0, int(R.TxdCmd.EOP | R.TxdCmd.IFCS), 0, 0, 0))
            w.clients[1].client_write(db.SLOT_RDT, db.pack_slot(15, 1, 0))
            w.clients[0].client_write(db.SLOT_TDT, db.pack_slot(1, 1, 0))
            w.poll()
            assert calls == [] and w.nics[1].engine.rx_written == 1
            assert w.mems[1].read(RX_BUFS, 60) == f
            w.nics[1].write32(R.RDTR, 10)  # now a received frame starts a timer: Python's job
            w.mems[0].write(TX_BASE + 16, R.TX_DESC.pack(TX_BUFS, len(f), 0, int(R.TxdCmd.EOP | R.TxdCmd.IFCS), 0, 0, 0))
            w.clients[0].client_write(db.SLOT_TDT, db.pack_slot(2, 2, 0))
            w.poll()
            assert calls == [pp.EVENTS] and w.nics[1].next_deadline() is not None
        finally:
            ps._act = orig
    finally:
        w.close()
