"""The kernel-style driver against in-process devices (driver.inprocess_bus.InProcessBus).

Layers: the DMA allocator, the ring helpers, the bring-up helpers (driver.hw), then the
driver (driver.e1000) on two Nics joined back to back with nic_a.connect(nic_b): frames both
ways in interrupt and NAPI mode, RX refill batching, TX batching, queue stop/wake, LSC, RX
overrun, allocation failures, frames that span buffers, moderation timers, statistics.
Everything is deterministic: in-process, a doorbell has done its work when it returns.
"""
from __future__ import annotations

import struct
import time
import warnings

import pytest

from driver import hw
from driver.dma_alloc import DmaAllocError, DmaAllocator, DmaBufferPool
from driver.e1000 import E1000, E1000Config, Mode
from driver.inprocess_bus import InProcessBus
from driver.pmd import CountingBus
from driver.rings import RxRing, TxRing, desc_unused
from kstack.netdevice import NETDEV_TX_BUSY, NETDEV_TX_OK
from kstack.skbuff import CHECKSUM_NONE, CHECKSUM_UNNECESSARY, SkBuff, default_pool
from nicemu import DmaMemory
from nicemu import regs as R
from nicemu.nic import Nic
from wire.mac import parse_mac

MAC_A = "52:54:00:00:aa:01"
MAC_B = "52:54:00:00:bb:02"
MEM = 4 << 20


def mac_bytes(mac: str) -> bytes:
    return parse_mac(mac)


def skb_of(data: bytes) -> SkBuff:
    """An sk_buff holding a frame to send (from the process's pool, as a stack's would be)."""
    return default_pool().from_bytes(data)


def frame(dst: str, src: str, seq: int = 0, size: int = 60, ethertype: int = 0x88B5) -> bytes:
    """An Ethernet frame of `size` bytes without FCS, the sequence number in its payload."""
    body = mac_bytes(dst) + mac_bytes(src) + struct.pack("!HI", ethertype, seq)
    return body + bytes(max(0, size - len(body)))


def make_nic(mac: str) -> Nic:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return Nic(DmaMemory(MEM), mac=mac)


class Side:
    """One device, its bus and its driver, plus what its receive callback got."""

    def __init__(self, nic: Nic, cfg: E1000Config) -> None:
        self.nic = nic
        self.bus = InProcessBus(nic)
        self.got: list[SkBuff] = []
        self.carrier: list[bool] = []
        self.wakes = 0
        self.drv = E1000(self.bus, cfg, receive=self.got.append, on_carrier=self.carrier.append,
                         on_tx_wake=self._wake)

    def _wake(self) -> None:
        self.wakes += 1

    def run(self, turns: int = 20, timeout: float = 0.0) -> int:
        return sum(self.drv.process(timeout) for _ in range(turns))

    def run_until(self, cond, limit: float = 5.0) -> None:
        """Run the event loop (waiting for interrupts) until cond() holds."""
        end = time.monotonic() + limit
        while not cond():
            assert time.monotonic() < end, "condition never held"
            self.drv.process(0.05)

    def close(self) -> None:
        self.drv.close()
        self.bus.close()
        self.nic.mem.close()


@pytest.fixture
def pair():
    """make(cfg_a, cfg_b) -> (a, b): two opened drivers on devices joined back to back."""
    sides: list[Side] = []

    def make(cfg_a: E1000Config | None = None, cfg_b: E1000Config | None = None) -> tuple[Side, Side]:
        na, nb = make_nic(MAC_A), make_nic(MAC_B)
        na.connect(nb)
        a, b = Side(na, cfg_a or E1000Config()), Side(nb, cfg_b or E1000Config())
        sides.extend((a, b))
        a.drv.open()
        b.drv.open()
        return a, b

    yield make
    for s in sides:
        s.close()


# --- DMA allocator ----------------------------------------------------------------------------

def test_allocator_aligns_splits_and_coalesces():
    with DmaMemory(1 << 16) as mem:
        al = DmaAllocator(mem)
        a = al.alloc(100, align=64)
        b = al.alloc(4096, align=4096)
        c = al.alloc(10, align=16)
        assert a % 64 == 0 and b % 4096 == 0 and c % 16 == 0
        assert len({a, b, c}) == 3 and al.allocations == 3
        # the gap below the 4096-aligned block is reused
        assert c < b
        for x in (b, a, c):
            al.free(x)
        assert al.free_bytes == 1 << 16 and al.allocations == 0
        assert al.alloc(1 << 16, align=1) == 0  # everything merged back into one range


def test_allocator_errors():
    with DmaMemory(8192) as mem:
        al = DmaAllocator(mem)
        al.alloc(8192)
        with pytest.raises(DmaAllocError):
            al.alloc(1)
        with pytest.raises(DmaAllocError):
            al.free(12345)
        with pytest.raises(ValueError):
            al.alloc(0)
        with pytest.raises(ValueError):
            al.alloc(8, align=3)
        with pytest.raises(ValueError):
            DmaAllocator(mem, base=4096, size=8192)  # runs past the region


def test_alloc_zeroed_and_buffer_pool():
    with DmaMemory(1 << 16) as mem:
        mem.write(0, b"\xff" * 256)
        al = DmaAllocator(mem)
        z = al.alloc_zeroed(256, align=128)
        assert mem.read(z, 256) == bytes(256)
        pool = DmaBufferPool(al, 2048, 4)
        bufs = [pool.get() for _ in range(4)]
        assert pool.get() is None and pool.available == 0
        assert all(b % 128 == 0 for b in bufs) and len(set(bufs)) == 4
        pool.put(bufs[2])
        assert pool.get() == bufs[2]
        with pytest.raises(DmaAllocError):
            pool.put(bufs[0] + 1)
        pool.release()
        assert al.allocations == 1  # only the zeroed block is left


# --- rings ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "ntu,ntc,want",
    [(0, 0, 7), (7, 0, 0), (3, 3, 7), (5, 2, 4), (2, 5, 2), (6, 7, 0)],
)
def test_desc_unused_is_linux_macro(ntu, ntc, want):
    # E1000_DESC_UNUSED: ((ntc > ntu) ? 0 : count) + ntc - ntu - 1, one slot always empty
    assert desc_unused(8, ntu, ntc) == want


def test_rx_ring_reads_status_first_and_post_clears_it():
    with DmaMemory(1 << 16) as mem:
        ring = RxRing(mem, 0x100, 8)
        ring.post(3, 0x8000)
        assert not ring.done(3)
        # the device writes the fields, then the status byte with DD
        R.RX_DESC.pack_into(ring.desc, 3 * 16, 0x8000, 60, 0xABCD, 0, 0x40, 0)
        assert not ring.done(3)
        ring.desc[3 * 16 + R.RXD_STATUS] = R.RxdStatus.DD | R.RxdStatus.EOP
        assert ring.done(3)
        assert ring.writeback(3) == (60, 0xABCD, 3, 0x40, 0)
        ring.clear_status(3)
        assert not ring.done(3)
        ring.release()


def test_tx_ring_post_and_done():
    with DmaMemory(1 << 16) as mem:
        ring = TxRing(mem, 0, 8)
        ring.post(0, 0x1000, 60, int(R.TxdCmd.EOP | R.TxdCmd.RS))
        addr, length, _cso, cmd, sta, _css, _sp = R.TX_DESC.unpack_from(ring.desc, 0)
        assert (addr, length, cmd, sta) == (0x1000, 60, 0x09, 0)
        assert not ring.done(0)
        ring.desc[R.TXD_STA] = R.TxdSta.DD
        assert ring.done(0)
        ring.clear(0)
        assert bytes(ring.desc[:16]) == bytes(16)
        ring.release()


# --- bring-up helpers -------------------------------------------------------------------------

@pytest.fixture
def one():
    nic = make_nic(MAC_A)
    bus = InProcessBus(nic)
    yield nic, bus
    bus.close()
    nic.mem.close()


def test_probe_enables_pci_resets_and_programs_filters(one):
    nic, bus = one
    nic.write32(R.IMS, R.ICR_VALID)  # state an earlier driver left behind
    nic.write32(R.ICS, int(R.Icr.LSC))
    assert nic.irq
    mac = hw.probe(bus)
    assert mac == MAC_A
    cmd = nic.config_read(0x04, 2)
    assert cmd & R.PciCommand.MASTER and cmd & R.PciCommand.MEMORY
    assert nic.peek32(R.IMS) == 0 and nic.peek32(R.ICR) == 0 and not nic.irq
    m = mac_bytes(MAC_A)
    assert nic.peek32(R.RAL(0)) == int.from_bytes(m[:4], "little")
    assert nic.peek32(R.RAH(0)) == int.from_bytes(m[4:], "little") | R.Rah.AV
    assert nic.peek32(R.RCTL) & R.Rctl.EN == 0 and nic.peek32(R.TCTL) & R.Tctl.EN == 0


def test_clear_filters_clears_other_addresses_and_mta(one):
    nic, bus = one
    hw.probe(bus)
    hw.set_receive_address(bus, 5, bytes.fromhex("020000000005"))
    nic.write32(R.MTA + 4 * 17, 0xFFFF)
    assert nic.peek32(R.RAH(5)) & R.Rah.AV
    hw.clear_filters(bus)
    assert nic.peek32(R.RAH(5)) == 0 and nic.peek32(R.RAL(5)) == 0
    assert nic.peek32(R.MTA + 4 * 17) == 0
    assert nic.peek32(R.RAH(0)) & R.Rah.AV  # entry 0 is kept


def test_probe_rejects_bad_eeprom_checksum(one):
    nic, bus = one
    nic.eeprom.words[7] ^= 1
    with pytest.raises(hw.HwError, match="checksum"):
        hw.probe(bus)


def test_ring_and_rctl_helpers(one):
    nic, bus = one
    hw.probe(bus)
    hw.setup_rx_ring(bus, 0x10000, 64)
    assert (nic.peek32(R.RDBAL), nic.peek32(R.RDLEN), nic.peek32(R.RDH), nic.peek32(R.RDT)) == (0x10000, 1024, 0, 0)
    with pytest.raises(ValueError):
        hw.setup_tx_ring(bus, 0x10000, 12)  # not a multiple of 8
    with pytest.raises(ValueError):
        hw.setup_tx_ring(bus, 0x10008, 8)  # not 16-byte aligned
    for size in hw.RX_BUFFER_SIZES:
        rctl = hw.enable_rx(bus, size)
        assert R.rx_buffer_size(rctl) == size and rctl & R.Rctl.EN and rctl & R.Rctl.BAM
    with pytest.raises(ValueError):
        hw.enable_rx(bus, 3000)
    tctl = hw.enable_tx(bus)
    assert tctl & R.Tctl.EN and tctl & R.Tctl.PSP and nic.peek32(R.TIPG) == hw.TIPG_DEFAULT
    assert hw.itr_for_rate(0) == 0 and hw.itr_for_rate(20000) == 195 and hw.itr_for_rate(1) == 0xFFFF


# --- the driver: bring-up ---------------------------------------------------------------------

def test_open_programs_device_like_linux(pair):
    a, b = pair(E1000Config(rx_ring_size=64, tx_ring_size=64, itr=8000, rdtr=0, radv=8, tidv=8, tadv=32))
    nic = a.nic
    assert a.drv.mac == MAC_A and a.drv.carrier and a.carrier == [True]
    assert nic.peek32(R.IMS) == hw.IMS_ENABLE_MASK
    assert nic.peek32(R.IMS) == int(R.Icr.RXT0 | R.Icr.TXDW | R.Icr.RXDMT0 | R.Icr.RXSEQ | R.Icr.LSC)
    rctl = nic.peek32(R.RCTL)
    assert rctl & R.Rctl.EN and rctl & R.Rctl.BAM and not rctl & R.Rctl.SECRC
    assert nic.peek32(R.TCTL) & (R.Tctl.EN | R.Tctl.PSP) == R.Tctl.EN | R.Tctl.PSP
    assert nic.peek32(R.RDLEN) == 64 * 16 and nic.peek32(R.TDLEN) == 64 * 16
    assert nic.peek32(R.RDT) == 63  # every descriptor but one has a buffer
    assert nic.peek32(R.ITR) == hw.itr_for_rate(8000)
    assert (nic.peek32(R.RADV), nic.peek32(R.TIDV), nic.peek32(R.TADV)) == (8, 8, 32)
    assert a.drv.stats.rx_doorbells == 1


class RecordingBus(CountingBus):
    """A Bus that logs every access in order: ("cr"|"cw"|"r"|"w", offset, value)."""

    def __init__(self, inner: InProcessBus) -> None:
        super().__init__(inner)
        self.log: list[tuple[str, int, int]] = []

    def read32(self, offset: int) -> int:
        value = super().read32(offset)
        self.log.append(("r", offset, value))
        return value

    def write32(self, offset: int, value: int) -> None:
        self.log.append(("w", offset, value))
        super().write32(offset, value)

    def config_read(self, offset: int, size: int = 4) -> int:
        value = super().config_read(offset, size)
        self.log.append(("cr", offset, value))
        return value

    def config_write(self, offset: int, value: int, size: int = 4) -> None:
        self.log.append(("cw", offset, value))
        super().config_write(offset, value, size)

    def first(self, kind: str, offset: int, pred=lambda v: True, after: int = -1) -> int:
        """Index of the first matching access after index `after`."""
        for k in range(after + 1, len(self.log)):
            op, off, value = self.log[k]
            if op == kind and off == offset and pred(value):
                return k
        raise AssertionError(f"no {kind} {offset:#x} after #{after}: {self.log[after + 1 : after + 6]}")

    def last(self, kind: str, offset: int) -> int:
        return max(k for k, (op, off, _) in enumerate(self.log) if op == kind and off == offset)


def test_bring_up_follows_linux_order(one):
    """e1000_probe + e1000_open, step by step, as the issue lists them: bus mastering, reset,
    interrupts masked and cleared, MAC through EERD, RAL0/RAH0 then the other filters cleared,
    rings, TX (TIPG, TCTL) and RX (ITR/RDTR/RADV with the receiver off, ring, RCTL, RDT), and
    IMS as the very last register write."""
    nic, inner = one
    bus = RecordingBus(inner)
    drv = E1000(bus, E1000Config(rx_ring_size=64, tx_ring_size=64, itr=8000))
    assert drv.open() == MAC_A
    try:
        bme = bus.first("cw", 0x04, lambda v: v & R.PciCommand.MASTER and v & R.PciCommand.MEMORY)
        rst = bus.first("w", R.CTRL, lambda v: v & R.Ctrl.RST, after=bme)
        mask = bus.first("w", R.IMC, lambda v: v == 0xFFFFFFFF, after=rst)
        clear = bus.first("r", R.ICR, after=mask)
        eerd = [k for k, (op, off, _) in enumerate(bus.log) if op == "w" and off == R.EERD]
        assert eerd[0] > clear and len(eerd) == R.EEPROM_WORDS + 3  # checksum words, then the MAC
        ral0 = bus.first("w", R.RAL(0), after=eerd[-1])
        rah0 = bus.first("w", R.RAH(0), lambda v: v & R.Rah.AV, after=ral0)
        mac = mac_bytes(MAC_A)
        assert bus.log[ral0][2] == int.from_bytes(mac[:4], "little")
        assert bus.log[rah0][2] == int.from_bytes(mac[4:], "little") | R.Rah.AV
        filters = [bus.first("w", R.RAH(n), lambda v: v == 0, after=rah0) for n in range(1, R.RA_ENTRIES)]
        filters += [bus.first("w", R.MTA + 4 * i, lambda v: v == 0, after=rah0) for i in range(R.MTA_WORDS)]
        rings = min(bus.first("w", off, after=max(filters)) for off in (R.TDBAL, R.RDBAL))
        assert rings > max(filters)
        tipg = bus.first("w", R.TIPG, lambda v: v == hw.TIPG_DEFAULT, after=bus.first("w", R.TDLEN))
        assert bus.first("w", R.TCTL, lambda v: v & R.Tctl.EN, after=tipg)
        rx_off = bus.first("w", R.RCTL, lambda v: v == 0, after=rings)
        itr = bus.first("w", R.ITR, lambda v: v == hw.itr_for_rate(8000), after=rx_off)
        rx_on = bus.first("w", R.RCTL, lambda v: v & R.Rctl.EN, after=bus.first("w", R.RDLEN, after=itr))
        assert bus.first("w", R.RDT, lambda v: v == 63, after=rx_on)
        writes = [k for k, (op, _, _) in enumerate(bus.log) if op == "w"]
        ims = bus.last("w", R.IMS)
        assert ims == writes[-1] and bus.log[ims][2] == hw.IMS_ENABLE_MASK
        assert [k for k in writes if bus.log[k][1] == R.IMS] == [ims]  # enabled once, at the end
        assert bus.log[-1][:2] == ("r", R.STATUS)  # then the carrier, from STATUS.LU
    finally:
        drv.close()


def test_close_returns_all_memory_and_reopens(pair):
    a, b = pair()
    al = a.drv.allocator
    a.drv.close()
    assert al.allocations == 0 and al.free_bytes == MEM
    assert a.nic.peek32(R.RCTL) == 0 and a.nic.peek32(R.IMS) == 0 and a.carrier == [True, False]
    a.drv.open()
    assert a.drv.xmit(skb_of(frame(MAC_B, MAC_A))) == NETDEV_TX_OK
    b.run()
    assert len(b.got) == 1


# --- frames both ways --------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [Mode.INTERRUPT, Mode.NAPI])
def test_frames_both_ways(pair, mode):
    a, b = pair(E1000Config(mode=mode), E1000Config(mode=mode))
    for seq in range(50):
        assert a.drv.xmit(skb_of(frame(MAC_B, MAC_A, seq, size=60 + seq))) == NETDEV_TX_OK
        assert b.drv.xmit(skb_of(frame(MAC_A, MAC_B, 1000 + seq, size=100))) == NETDEV_TX_OK
    a.run()
    b.run()
    assert [s.tobytes() for s in b.got] == [frame(MAC_B, MAC_A, seq, size=60 + seq) for seq in range(50)]
    assert [s.tobytes() for s in a.got] == [frame(MAC_A, MAC_B, 1000 + seq, size=100) for seq in range(50)]
    assert all(s.protocol == 0x88B5 for s in a.got + b.got)
    for side in (a, b):
        st = side.drv.ethtool_stats()
        assert st["rx_packets"] == 50 and st["tx_packets"] == 50
        assert st["GPRC"] == 50 and st["GPTC"] == 50 and st["hw_rx_packets"] == 50
        assert side.drv.tx_pending() == 0 and side.drv.tx_pool.available == side.drv.config.tx_ring_size


def test_short_frame_is_padded_and_fcs_trimmed(pair):
    a, b = pair()
    short = frame(MAC_B, MAC_A, 7, size=20)[:20]
    a.drv.xmit(skb_of(short))
    b.run()
    # the device pads to 60 bytes + FCS (TCTL.PSP); the driver trims the FCS
    assert len(b.got) == 1 and b.got[0].tobytes() == short + bytes(40)


def test_interrupt_mode_takes_one_interrupt_per_frame(pair):
    a, b = pair(E1000Config(mode="interrupt"), E1000Config(mode="interrupt", rdtr=0))
    for seq in range(20):
        a.drv.xmit(skb_of(frame(MAC_B, MAC_A, seq)))
        b.run(turns=2)
    assert len(b.got) == 20
    st = b.drv.stats
    assert st.interrupts == 20 and st.bottom_halves == 20 and st.polls == 0
    assert b.nic.peek32(R.IMS) == hw.IMS_ENABLE_MASK  # interrupt mode never masks


def test_interrupt_mode_bottom_half_takes_every_frame_and_refills_in_groups(pair):
    """One interrupt, one bottom half: all 200 completed descriptors (no NAPI budget), each an
    sk_buff handed up in order, buffers back to the device 16 at a time (13 RDT writes), and
    IMS never touched."""
    a, b = pair(cfg_b=E1000Config(mode="interrupt", rx_ring_size=256))
    for seq in range(200):
        a.drv.xmit(skb_of(frame(MAC_B, MAC_A, seq)), xmit_more=seq != 199)
    doorbells, writes = b.drv.stats.rx_doorbells, b.bus.writes
    assert b.drv.process(0) == 200
    st = b.drv.stats
    assert (st.interrupts, st.bottom_halves, st.polls) == (1, 1, 0)
    assert st.rx_doorbells - doorbells == 13  # ceil(200 / 16)
    assert b.bus.writes - writes == 13  # the RDT writes and nothing else: no IMC, no IMS
    assert b.nic.peek32(R.IMS) == hw.IMS_ENABLE_MASK and b.drv.rx_ring.unused() == 0
    assert [struct.unpack("!I", s.tobytes()[14:18])[0] for s in b.got] == list(range(200))
    assert all(isinstance(s, SkBuff) and s.len == 60 for s in b.got)


# --- NAPI ----------------------------------------------------------------------------------------

def test_napi_stays_polling_under_load_and_reenables_when_idle(pair):
    a, b = pair(cfg_b=E1000Config(mode="napi", budget=64))
    for seq in range(200):
        a.drv.xmit(skb_of(frame(MAC_B, MAC_A, seq)), xmit_more=seq != 199)
    assert b.nic.irq
    # the interrupt: top half masks everything and schedules the poll
    assert b.drv.process(0) == 64
    assert b.drv.napi_scheduled and b.nic.peek32(R.IMS) == 0
    # under load: each poll takes a full budget and stays in polling mode, no interrupt
    assert b.drv.process(0) == 64 and b.drv.napi_scheduled
    assert b.drv.process(0) == 64 and b.drv.napi_scheduled
    # the rest is under budget: napi complete, interrupts back on
    assert b.drv.process(0) == 8
    assert not b.drv.napi_scheduled and b.nic.peek32(R.IMS) == hw.IMS_ENABLE_MASK
    st = b.drv.ethtool_stats()
    assert st["interrupts"] == 1 and st["polls"] == 4 and st["napi_completes"] == 1
    assert st["poll_histogram"][-1] == 3 and st["packets_per_poll"] == 50.0
    assert [s.tobytes()[14:18] for s in b.got] == [struct.pack("!I", i) for i in range(200)]
    # idle: nothing happens without an interrupt
    assert b.run(turns=3) == 0 and b.drv.stats.interrupts == 1


def test_napi_poll_cleans_tx_without_a_budget(pair):
    """e1000_clean: TX completions are not counted against the budget; one poll frees all 200
    sent frames (budget 64) and, with nothing received, completes at once."""
    a, b = pair(E1000Config(mode="napi", budget=64, tidv=0))
    for seq in range(200):
        a.drv.xmit(skb_of(frame(MAC_B, MAC_A, seq)), xmit_more=seq != 199)
    assert a.drv.tx_pending() == 200
    assert a.drv.process(0) == 0  # TXDW -> top half -> one poll
    st = a.drv.stats
    assert (st.interrupts, st.polls, st.napi_completes, st.tx_packets) == (1, 1, 1, 200)
    assert a.drv.tx_pending() == 0 and a.nic.peek32(R.IMS) == hw.IMS_ENABLE_MASK
    assert a.drv.tx_pool.available == a.drv.config.tx_ring_size


def test_napi_reenable_sees_frames_that_arrived_while_masked(pair):
    a, b = pair()
    a.drv.xmit(skb_of(frame(MAC_B, MAC_A, 1)))
    assert b.drv.bus.wait_irq(0) and b.drv.intr()
    assert b.nic.peek32(R.IMS) == 0
    a.drv.xmit(skb_of(frame(MAC_B, MAC_A, 2)))  # arrives while masked: ICR.RXT0 pending
    assert not b.drv.bus.wait_irq(0)
    assert b.drv.poll() == 2  # both frames taken; under budget: IMS written again
    # ICR still holds RXT0 from the second frame: the IMS write raises the line again
    assert b.drv.bus.wait_irq(0)
    assert b.drv.intr() and b.drv.poll() == 0
    assert len(b.got) == 2


def test_rx_buffers_return_in_groups_of_16(pair):
    a, b = pair(cfg_b=E1000Config(rx_ring_size=256, budget=64))
    for seq in range(64):
        a.drv.xmit(skb_of(frame(MAC_B, MAC_A, seq)), xmit_more=True)
    a.drv.flush_tx()
    before = b.drv.stats.rx_doorbells
    writes_before = b.bus.writes
    assert b.drv.process(0) == 64
    assert b.drv.stats.rx_doorbells - before == 4  # 64 descriptors, one RDT write per 16
    assert b.nic.peek32(R.RDT) == (b.drv.rx_ring.next_to_use)
    assert b.drv.rx_ring.unused() == 0
    assert b.bus.writes - writes_before == 4 + 1  # the 4 RDT writes and the IMC of the top half


# --- TX ------------------------------------------------------------------------------------------

def test_tx_doorbell_once_per_batch(pair):
    a, b = pair()
    for seq in range(10):
        a.drv.xmit(skb_of(frame(MAC_B, MAC_A, seq)), xmit_more=True)
    assert a.drv.stats.tx_doorbells == 0 and b.run() == 0
    a.drv.flush_tx()
    assert a.drv.stats.tx_doorbells == 1
    b.run()
    assert len(b.got) == 10
    a.drv.flush_tx()  # nothing pending: no doorbell
    assert a.drv.stats.tx_doorbells == 1


def test_tx_queue_stops_when_ring_fills_and_wakes_on_completion(pair):
    a, b = pair(E1000Config(tx_ring_size=64, tx_wake_threshold=32, tidv=0))
    sent = 0
    while a.drv.xmit(skb_of(frame(MAC_B, MAC_A, sent))) == NETDEV_TX_OK:
        sent += 1
        assert sent < 100
    # 63 usable descriptors; the queue stops when fewer than 1 + 2 remain after a frame
    assert sent == 63 - a.drv.tx_desc_needed + 1
    assert a.drv.queue_stopped and a.drv.stats.tx_queue_stops == 1 and a.drv.stats.tx_busy == 1
    assert a.drv.xmit(skb_of(frame(MAC_B, MAC_A))) == NETDEV_TX_BUSY
    # the device has sent them all; only the cleanup (interrupt -> TX clean) frees the slots
    a.run(turns=2)
    assert not a.drv.queue_stopped and a.wakes == 1 and a.drv.stats.restart_queue == 1
    assert a.drv.stats.tx_packets == sent
    assert a.drv.xmit(skb_of(frame(MAC_B, MAC_A, 999))) == NETDEV_TX_OK
    b.run()
    assert len(b.got) == sent + 1


def test_a_busy_xmit_still_rings_for_frames_held_by_xmit_more(pair):
    """The check before queuing (count + 2 free) normally never fires, because the check
    after the previous frame already stopped the queue; if it does, the frames queued with
    xmit_more before it must not sit behind a doorbell nobody rings."""
    a, b = pair(E1000Config(tx_ring_size=64, tidv=0))
    a.drv.tx_desc_needed = 0  # disable the after-queuing stop: only the pre-check is left
    queued = 0
    while a.drv.xmit(skb_of(frame(MAC_B, MAC_A, queued)), xmit_more=True) == NETDEV_TX_OK:
        queued += 1
    assert queued == 63 - 2 and a.drv.queue_stopped and a.drv.stats.tx_busy == 1
    assert a.drv.stats.tx_doorbells == 1 and a.nic.peek32(R.TDT) == queued  # rung at the stop
    b.run()
    assert len(b.got) == queued


def test_tx_buffers_freed_only_after_dd():
    nic = make_nic(MAC_A)
    held: list[bytes] = []
    cable_ok = [False]

    def sink(f: bytes) -> bool:
        if cable_ok[0]:
            held.append(f)
        return cable_ok[0]

    nic.attach(sink)
    side = Side(nic, E1000Config(tx_ring_size=64, tidv=0))
    try:
        drv = side.drv
        drv.open()
        # 1514-byte frames: the 16 KB TX packet buffer holds ~10, the rest wait in the ring
        queued = 0
        while drv.xmit(skb_of(frame("ff:ff:ff:ff:ff:ff", MAC_A, queued, size=1514))) == NETDEV_TX_OK:
            queued += 1
        assert drv.queue_stopped
        side.run(turns=3)
        pending = drv.tx_pending()
        assert pending > 0 and drv.queue_stopped  # descriptors without DD are never freed
        assert drv.tx_pool.available == drv.config.tx_ring_size - pending
        assert drv.stats.tx_packets == queued - pending
        cable_ok[0] = True
        nic.tx_ready()
        side.run(turns=5)
        assert drv.tx_pending() == 0 and not drv.queue_stopped and side.wakes == 1
        assert drv.stats.tx_packets == queued and len(held) == queued
        assert drv.tx_pool.available == drv.config.tx_ring_size
    finally:
        side.close()


def test_jumbo_frame_spans_tx_descriptors(pair):
    cfg = E1000Config(long_packets=True, rx_buffer_len=16384, tx_buffer_len=2048, rx_ring_size=32)
    a, b = pair(cfg, E1000Config(long_packets=True, rx_buffer_len=16384, rx_ring_size=32))
    big = frame(MAC_B, MAC_A, 1, size=9000)
    writes = a.drv.stats.tx_doorbells
    assert a.drv.xmit(skb_of(big)) == NETDEV_TX_OK
    assert a.drv.tx_ring.next_to_use == 5  # ceil(9000 / 2048) descriptors, one doorbell
    assert a.drv.stats.tx_doorbells == writes + 1
    b.run()
    assert [s.tobytes() for s in b.got] == [big]
    a.run()
    assert a.drv.tx_pending() == 0 and a.drv.stats.tx_packets == 1


def test_bad_tx_lengths_are_dropped_and_counted(pair):
    a, b = pair()
    assert a.drv.xmit(skb_of(b"\x01" * 10)) == NETDEV_TX_OK
    assert a.drv.xmit(skb_of(bytes(1519))) == NETDEV_TX_OK
    assert a.drv.stats.tx_dropped == 2 and a.drv.tx_ring.next_to_use == 0


# --- RX corner cases ---------------------------------------------------------------------------

def test_frame_spanning_rx_buffers_is_dropped(pair):
    a, b = pair(E1000Config(long_packets=True), E1000Config(rx_buffer_len=256, long_packets=True))
    a.drv.xmit(skb_of(frame(MAC_B, MAC_A, 1, size=1000)))  # needs 4 buffers of 256
    a.drv.xmit(skb_of(frame(MAC_B, MAC_A, 2, size=100)))
    b.run()
    assert [s.tobytes() for s in b.got] == [frame(MAC_B, MAC_A, 2, size=100)]
    # one error for the frame (not one per piece); its 4 descriptors count as RX work
    assert b.drv.stats.rx_length_errors == 1 and b.drv.stats.rx_packets == 1
    assert b.drv.rx_ring.unused() == 0  # every piece's buffer went back to the device


def test_rx_alloc_failure_is_counted_and_frames_still_flow(pair):
    a, b = pair(cfg_b=E1000Config(rx_ring_size=64, rx_pool_buffers=40))
    assert b.drv.stats.alloc_rx_buff_failed == 1
    assert b.nic.peek32(R.RDT) == 40
    for seq in range(100):
        a.drv.xmit(skb_of(frame(MAC_B, MAC_A, seq)))
        if seq % 20 == 19:
            b.run(turns=3)
    b.run()
    assert len(b.got) == 100 and b.drv.stats.alloc_rx_buff_failed > 1


def test_rx_overrun_counted_when_consumer_is_slow(pair):
    a, b = pair(E1000Config(tidv=0), E1000Config(rx_ring_size=64))
    n = 1200  # 63 buffers + a 48 KB packet buffer (~700 small frames): the rest is missed
    for seq in range(n):
        assert a.drv.xmit(skb_of(frame(MAC_B, MAC_A, seq)), xmit_more=seq % 32 != 31 and seq != n - 1) == NETDEV_TX_OK
        if seq % 32 == 31:
            a.drv.process(0)  # the sender keeps up; the receiver does nothing
    assert a.drv.ethtool_stats()["GPTC"] == n
    st = b.drv.ethtool_stats()
    assert st["rx_no_buffer_count"] > 0 and st["RNBC"] > 0
    assert st["rx_missed_errors"] > 0 and st["MPC"] > 0
    missed = st["MPC"]
    b.run(turns=50)
    assert b.drv.stats.rx_overrun_interrupts >= 1  # ICR.RXO was pending at the first interrupt
    got = [struct.unpack("!I", s.tobytes()[14:18])[0] for s in b.got]
    assert len(got) == n - missed and got == sorted(got)


def test_rx_checksum_offload_verdict(pair):
    a, b = pair()
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + 8, 1, 0, 64, 17, 0,
                               bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2])))
    s = sum(struct.unpack("!10H", bytes(ip)))
    s = (s & 0xFFFF) + (s >> 16)
    struct.pack_into("!H", ip, 10, ~((s & 0xFFFF) + (s >> 16)) & 0xFFFF)
    payload = b"nicemu!!"
    udp = struct.pack("!HHHH", 1000, 2000, 16, 0) + payload
    pseudo = bytes(ip[12:20]) + struct.pack("!BBH", 0, 17, 16)
    data = pseudo + udp
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    udp = udp[:6] + struct.pack("!H", ~s & 0xFFFF) + udp[8:]
    good = mac_bytes(MAC_B) + mac_bytes(MAC_A) + b"\x08\x00" + bytes(ip) + udp
    bad = good[:-1] + bytes([good[-1] ^ 0xFF])
    a.drv.xmit(skb_of(good + bytes(60 - len(good)) if len(good) < 60 else good))
    a.drv.xmit(skb_of(bad + bytes(60 - len(bad)) if len(bad) < 60 else bad))
    b.run()
    assert [s.ip_summed for s in b.got] == [CHECKSUM_UNNECESSARY, CHECKSUM_NONE]
    assert b.got[0].protocol == 0x0800
    assert b.drv.stats.rx_csum_offload_good == 1 and b.drv.stats.rx_csum_offload_errors == 1


# --- link ------------------------------------------------------------------------------------------

def test_lsc_reports_carrier_down_and_up(pair):
    a, b = pair()
    b.nic.set_link(False)
    b.run(turns=3)
    assert b.carrier == [True, False] and not b.drv.carrier
    # no carrier: frames are dropped above the ring, as the noop qdisc does
    assert b.drv.xmit(skb_of(frame(MAC_A, MAC_B))) == NETDEV_TX_OK
    assert b.drv.stats.tx_dropped == 1 and b.drv.tx_ring.next_to_use == 0
    b.nic.set_link(True)
    b.run(turns=3)
    assert b.carrier == [True, False, True] and b.drv.carrier
    assert b.drv.stats.link_changes == 3
    b.drv.xmit(skb_of(frame(MAC_A, MAC_B, 5)))
    a.run()
    assert len(a.got) == 1


# --- moderation and the in-process bus's timers ----------------------------------------------------

def test_rdtr_delays_the_interrupt_and_wait_irq_fires_the_timer(pair):
    a, b = pair(cfg_b=E1000Config(mode="interrupt", rdtr=20_000, radv=0))  # ~20 ms packet timer
    a.drv.xmit(skb_of(frame(MAC_B, MAC_A, 1)))
    assert not b.bus.wait_irq(0)  # the frame is in the ring, RXT0 waits for the timer
    assert b.nic.next_deadline() is not None
    assert b.bus.wait_irq(5.0)
    assert b.drv.intr() and b.drv.bottom_half() == 1


def test_itr_limits_interrupt_rate(pair):
    a, b = pair(cfg_b=E1000Config(mode="interrupt", itr=50))  # at most one per 20 ms
    a.drv.xmit(skb_of(frame(MAC_B, MAC_A, 1)))
    assert b.drv.process(0) == 1
    a.drv.xmit(skb_of(frame(MAC_B, MAC_A, 2)))
    assert b.drv.process(0) == 0  # held off by ITR
    assert b.drv.process(5.0) == 1  # the hold-off ends: the interrupt comes
    assert b.drv.stats.interrupts == 2


def test_set_moderation_rejects_out_of_range(one):
    nic, bus = one
    with pytest.raises(ValueError):
        hw.set_moderation(bus, rdtr=0x10000)


def test_stats_accumulate_across_clear_on_read(pair):
    a, b = pair()
    for seq in range(10):
        a.drv.xmit(skb_of(frame(MAC_B, MAC_A, seq)))
    b.run()
    b.drv.update_stats()
    assert b.nic.peek32(R.GPRC) == 0  # read and so cleared
    for seq in range(5):
        a.drv.xmit(skb_of(frame(MAC_B, MAC_A, seq)))
    b.run()
    st = b.drv.ethtool_stats()
    assert st["GPRC"] == 15 and st["TPR"] == 15 and st["GORC"] == 15 * 64
    assert st["rx_bytes"] == 15 * 60


def test_config_validation():
    with pytest.raises(ValueError):
        E1000Config(rx_ring_size=100)
    with pytest.raises(ValueError):
        E1000Config(rx_buffer_len=3000)
    with pytest.raises(ValueError):
        E1000Config(mode="poll")
    with pytest.raises(ValueError):
        E1000Config(budget=0)


def test_inprocess_bus_signals_and_closes(one):
    nic, bus = one
    hw.probe(bus)
    assert not bus.wait_irq(0)
    nic.write32(R.IMS, int(R.Icr.LSC))
    nic.write32(R.ICS, int(R.Icr.LSC))
    assert bus.wait_irq(0) and not bus.wait_irq(0)  # the eventfd count is consumed
    assert bus.read32(R.ICR) == R.Icr.LSC
    bus.close()
    with pytest.raises(Exception):
        bus.read32(R.STATUS)


def test_failed_open_gives_memory_back():
    nic = make_nic(MAC_A)
    side = Side(nic, E1000Config())
    side.drv.allocator = DmaAllocator(nic.mem, 0, 600_000)  # too small for the RX pool
    try:
        with pytest.raises(DmaAllocError):
            side.drv.open()
        assert side.drv.allocator.allocations == 0 and not side.drv.is_open
    finally:
        side.bus.close()
        nic.mem.close()


def test_set_coalesce_at_run_time(pair):
    a, b = pair(E1000Config(tidv=8))
    a.drv.set_coalesce(itr=4000, rdtr=16, radv=64, tidv=0, tadv=0)
    n = a.nic
    assert (n.peek32(R.ITR), n.peek32(R.RDTR), n.peek32(R.RADV), n.peek32(R.TIDV)) == (hw.itr_for_rate(4000), 16, 64, 0)
    a.drv.xmit(skb_of(frame(MAC_B, MAC_A)))
    _, _, _, cmd, _, _, _ = R.TX_DESC.unpack_from(a.drv.tx_ring.desc, 0)
    assert cmd == int(R.TxdCmd.EOP | R.TxdCmd.IFCS | R.TxdCmd.RS)  # no IDE without TIDV


def test_watchdog_updates_statistics_periodically():
    na, nb = make_nic(MAC_A), make_nic(MAC_B)
    na.connect(nb)
    now = [100.0]
    a = Side(na, E1000Config())
    b = Side(nb, E1000Config(watchdog_interval=2.0))
    b.drv.clock = lambda: now[0]
    try:
        a.drv.open()
        b.drv.open()
        a.drv.xmit(skb_of(frame(MAC_B, MAC_A)))
        b.run(turns=2)
        assert b.drv.hw_stats["GPRC"] == 0 and nb.peek32(R.GPRC) == 1  # not read yet
        now[0] += 2.5
        b.run(turns=1)
        assert b.drv.hw_stats["GPRC"] == 1 and nb.peek32(R.GPRC) == 0  # read (and cleared) by the watchdog
    finally:
        a.close()
        b.close()


def test_interrupt_mode_bottom_half_cleans_tx_too(pair):
    a, b = pair(E1000Config(mode="interrupt", tidv=0))
    for seq in range(5):
        a.drv.xmit(skb_of(frame(MAC_B, MAC_A, seq)))
    assert a.drv.tx_pending() == 5
    assert a.drv.process(0) == 0  # TXDW: the bottom half frees the sent frames
    assert a.drv.tx_pending() == 0 and a.drv.stats.tx_packets == 5 and a.drv.stats.bottom_halves == 1


# --- dynamic interrupt moderation (e1000_update_itr / e1000_set_itr) ---------------------------

def test_update_itr_ranges():
    from driver.e1000 import BULK_LATENCY as BULK, LOW_LATENCY as LOW, LOWEST_LATENCY as LOWEST, update_itr

    assert update_itr(LOW, 0, 0) == LOW  # no traffic: no change
    assert update_itr(LOW, 1, 60) == LOWEST  # one small frame: lowest latency
    assert update_itr(LOW, 64, 64 * 1514) == BULK  # big frames in bulk
    assert update_itr(LOW, 64, 64 * 60) == LOW  # many small ones under 10000 bytes: stay
    assert update_itr(LOW, 200, 200 * 60) == LOWEST  # > 35 small packets over 10000 bytes
    assert update_itr(LOWEST, 1, 9000) == BULK  # jumbo
    assert update_itr(LOWEST, 2, 1200) == LOW
    assert update_itr(BULK, 2, 120) == LOW  # traffic fell off
    assert update_itr(BULK, 20, 30000) == BULK
    assert update_itr(BULK, 40, 40000) == LOW


def test_conservative_itr_falls_to_bulk_and_climbs_back_in_steps(pair):
    a, b = pair(E1000Config(tidv=0), E1000Config(itr="conservative"))
    itr = lambda: b.nic.peek32(R.ITR)  # noqa: E731
    assert b.drv.itr == 20000 and itr() == hw.itr_for_rate(20000)
    for seq in range(64):
        a.drv.xmit(skb_of(frame(MAC_B, MAC_A, seq, size=1514)), xmit_more=seq != 63)
    b.run_until(lambda: len(b.got) == 64 and not b.drv.napi_scheduled)
    assert b.drv.itr == 4000 and itr() == hw.itr_for_rate(4000)
    seen = []
    for seq in range(4):  # light traffic again: up by a quarter of the target each time
        a.drv.xmit(skb_of(frame(MAC_B, MAC_A, seq)))
        b.run_until(lambda: len(b.got) == 65 + seq and not b.drv.napi_scheduled)
        seen.append(b.drv.itr)
    assert seen == [9000, 14000, 19000, 20000]  # conservative: never 70000
    assert b.drv.ethtool_stats()["itr"] == 20000


def test_itr_setting_validation(pair):
    with pytest.raises(ValueError):
        E1000Config(itr="fast")
    assert E1000Config(itr="8000").itr == 8000
    a, b = pair()
    a.drv.set_coalesce(itr="dynamic")
    assert a.drv.itr == 20000 and a.nic.peek32(R.ITR) == hw.itr_for_rate(20000)
    with pytest.raises(ValueError):
        a.drv.set_coalesce(itr="fast")


def test_writeback_longer_than_the_buffer_is_an_error_not_a_read(one):
    nic, bus = one
    got = []
    drv = E1000(bus, E1000Config(rx_ring_size=8), receive=got.append)
    drv.open()
    try:
        ring = drv.rx_ring
        # a misbehaving device writes back descriptor 0 with a length past its 2 KB buffer
        R.RX_DESC.pack_into(ring.desc, 0, ring.buffer_addr[0], 4000, 0, 0, 0, 0)
        ring.desc[R.RXD_STATUS] = R.RxdStatus.DD | R.RxdStatus.EOP
        assert drv.clean_rx_irq(64) == 1
        assert got == [] and drv.stats.rx_errors == 1
        assert drv.rx_ring.unused() == 0  # the descriptor got its buffer back
    finally:
        drv.close()


# --- the seam with kstack: NetDevice, sk_buffs, qdisc, checksum offload ----------------------------

def _udp_frame(dst: str, src: str, payload: bytes) -> tuple[bytearray, int]:
    """An Ethernet + IPv4 + UDP frame whose UDP checksum field holds the pseudo-header sum
    (what the stack leaves for CHECKSUM_PARTIAL); returns it and the UDP header's offset."""
    from wire.checksum import fold, internet_checksum, pseudo_header_sum
    src_ip, dst_ip = bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2])
    ulen = 8 + len(payload)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, 7, 0, 64, 17, 0, src_ip, dst_ip))
    struct.pack_into("!H", ip, 10, internet_checksum(ip))
    udp = struct.pack("!HHHH", 1000, 2000, ulen, fold(pseudo_header_sum(src_ip, dst_ip, 17, ulen))) + payload
    return bytearray(mac_bytes(dst) + mac_bytes(src) + b"\x08\x00" + bytes(ip) + udp), 14 + 20


@pytest.mark.parametrize("tx_csum", [True, False])
def test_checksum_partial_is_offloaded_or_done_in_software(pair, tx_csum):
    """CHECKSUM_PARTIAL: with NETIF_F_IP_CSUM the legacy descriptor's IC/CSO/CSS make the
    device insert the UDP checksum; without, the driver computes it (skb_checksum_help).
    Either way the receiver's device finds it good (RXCSUM: CHECKSUM_UNNECESSARY)."""
    from kstack.netdevice import NetdevFeatures
    from kstack.skbuff import CHECKSUM_PARTIAL
    from wire.checksum import pseudo_header_sum, checksum_ok
    a, b = pair(E1000Config(tx_csum=tx_csum))
    assert bool(a.drv.features & NetdevFeatures.IP_CSUM) == tx_csum
    assert b.drv.features & NetdevFeatures.RXCSUM
    data, udp_off = _udp_frame(MAC_B, MAC_A, b"checksum offload test payload")
    skb = skb_of(bytes(data))
    skb.ip_summed = CHECKSUM_PARTIAL
    skb.csum_start = skb.data + udp_off
    skb.csum_offset = 6
    assert a.drv.xmit(skb) == NETDEV_TX_OK
    b.run()
    assert len(b.got) == 1 and b.got[0].ip_summed == CHECKSUM_UNNECESSARY
    got = b.got[0].tobytes()
    seg = got[udp_off:]
    assert checksum_ok(seg, pseudo_header_sum(got[26:30], got[30:34], 17, len(seg)))
    st = a.drv.stats
    assert (st.tx_csum_offload, st.tx_csum_help) == ((1, 0) if tx_csum else (0, 1))


def test_rx_skb_has_headroom_and_tx_skb_is_freed_after_dd(pair):
    """netdev_alloc_skb: NET_SKB_PAD + NET_IP_ALIGN of headroom, the copy counted; a sent
    sk_buff goes back to the pool only once its descriptor has DD (consumed, not dropped)."""
    from kstack.skbuff import NET_IP_ALIGN, NET_SKB_PAD, SkbPool
    a, b = pair()
    pool = SkbPool()
    skbs = [pool.from_bytes(frame(MAC_B, MAC_A, seq)) for seq in range(5)]
    for s in skbs:
        assert a.drv.xmit(s, xmit_more=True) == NETDEV_TX_OK
    assert pool.live == 5  # held by the ring until DD
    a.drv.flush_tx()
    a.run_until(lambda: pool.live == 0)
    assert pool.frees == 5 and not pool.drops
    b.run_until(lambda: len(b.got) == 5)
    assert all(s.headroom() == NET_SKB_PAD + NET_IP_ALIGN for s in b.got)
    assert b.drv.stats.rx_copied_bytes == 5 * 60 and a.drv.stats.tx_copied_bytes == 5 * 60


def test_no_carrier_drops_and_frees_with_a_reason(pair):
    from kstack.skbuff import SkbPool
    a, b = pair()
    pool = SkbPool()
    assert a.drv.xmit(pool.from_bytes(bytes(10))) == NETDEV_TX_OK  # shorter than a header
    assert pool.drops["TX_ERROR"] == 1 and pool.live == 0
    a.drv._set_carrier(False)  # as the watchdog does when STATUS.LU drops
    assert a.drv.xmit(pool.from_bytes(frame(MAC_B, MAC_A))) == NETDEV_TX_OK
    assert a.drv.stats.tx_dropped == 2 and pool.drops["DEV_READY"] == 1 and pool.live == 0


def _stack_side(nic: Nic, cfg: E1000Config):
    from kstack.stack import NetStack
    stack = NetStack()
    bus = InProcessBus(nic)
    drv = E1000(bus, cfg, name="eth0")
    stack.register_netdev(drv, qdisc="pfifo")
    got: list[bytes] = []

    def handler(skb) -> None:
        got.append(skb.tobytes())
        skb.consume()

    stack.dev_add_pack(0x88B5, handler)
    stack.dev_open(drv)
    return stack, drv, bus, got


def _loop_turn(drv: E1000, timeout: float = 0.0) -> None:
    """What kstack.kernel's loop does for one device: the top half when the eventfd is
    readable, the softirq work, pending qdisc work, the watchdog. (An emulator process runs
    its device's timers itself; in-process the test runs them.)"""
    import select
    drv.bus.nic.run_timers()
    if not drv.softirq_pending() and select.select([drv.irq_fd()], [], [], timeout)[0]:
        drv.handle_irq()
    if drv.softirq_pending():
        drv.run_softirq(64)
    if drv.qdisc.pending():
        drv.qdisc.run()
    drv.run_timers(time.monotonic())


def test_stack_over_the_driver_queues_stops_and_wakes():
    """Two stacks over two E1000s back to back: dev_queue_xmit -> qdisc -> ndo_start_xmit;
    a 64-descriptor ring stops the queue, the qdisc holds the rest (no drops), TX completion
    wakes the queue and the qdisc dequeues again; every frame arrives, in order, through the
    driver's event-loop hooks (irq_fd, handle_irq, run_softirq)."""
    na, nb = make_nic(MAC_A), make_nic(MAC_B)
    na.connect(nb)
    cfg = dict(rx_ring_size=256, tx_ring_size=64)
    sa, da, ba, _ = _stack_side(na, E1000Config(mode="interrupt", **cfg))
    sb, db, bb, got = _stack_side(nb, E1000Config(mode="napi", **cfg))
    try:
        assert da.carrier and db.carrier and da.dev_addr == mac_bytes(MAC_A)
        n = 200
        for seq in range(n):
            skb = sa.pool.from_bytes(frame(MAC_B, MAC_A, seq))
            skb.dev = da
            sa.dev_queue_xmit(skb)
        q = da.qdisc.stats()
        assert da.queue_stopped and q["qlen"] > 0 and q["drops"] == 0
        end = time.monotonic() + 10
        while len(got) < n:
            assert time.monotonic() < end, f"{len(got)} of {n} arrived"
            _loop_turn(da, 0.0)
            _loop_turn(db, 0.01)
        assert [struct.unpack("!I", f[:4])[0] for f in got] == list(range(n))  # Ethernet pulled
        q = da.qdisc.stats()
        assert q["packets"] == n and q["qlen"] == 0 and q["drops"] == 0
        assert da.counters["tx_queue_stops"] >= 1 and da.counters["tx_queue_wakes"] >= 1
        assert da.stats.restart_queue == da.counters["tx_queue_wakes"]
        end = time.monotonic() + 5
        while sa.pool.live:
            assert time.monotonic() < end
            _loop_turn(da, 0.01)
        assert sa.pool.frees == n and not sa.pool.drops
        assert sb.counters()["devices"]["eth0"]["stats"]["rx_packets"] == n
    finally:
        for stack, drv, bus in ((sa, da, ba), (sb, db, bb)):
            stack.dev_close(drv)
            bus.close()
        na.mem.close()
        nb.mem.close()


def test_a_done_descriptor_the_device_was_never_given_is_not_read(one):
    """A device that writes DD into every RX descriptor, also those the driver holds back
    (the one left unused so the tail never meets the head, and any the pool could not fill):
    the driver cleans only descriptors it gave to the device (next_to_clean up to
    next_to_use), so it never takes a descriptor that has no buffer behind it."""
    nic, bus = one
    got = []
    drv = E1000(bus, E1000Config(rx_ring_size=8), receive=got.append)
    drv.open()
    try:
        ring = drv.rx_ring
        assert ring.next_to_use == 7 and ring.buffer_addr[7] is None  # held back, no buffer
        for i in range(8):
            R.RX_DESC.pack_into(ring.desc, i * R.DESC_SIZE, ring.buffer_addr[i] or 0, 60, 0, 0, 0, 0)
            ring.desc[i * R.DESC_SIZE + R.RXD_STATUS] = R.RxdStatus.DD | R.RxdStatus.EOP
        assert drv.clean_rx_irq(64) == 7  # the seven it gave, not the eighth
        assert len(got) == 7 and drv.stats.rx_errors == 0
        assert ring.next_to_clean == 7 and ring.unused() == 0  # all seven given back
    finally:
        drv.close()
