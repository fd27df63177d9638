"""Interrupt moderation driven by the injected clock: ITR throttling, RDTR/RADV -> RXT0,
TIDV/TADV -> TXDW (SDM 13.4.18, 13.4.28-29, 13.4.39-40; reference "Interrupt moderation")."""
from __future__ import annotations

import pytest

from nicemu import regs as R

from conftest import RxRing, TxRing, make_frame

TXDW, TXQE, RXDMT0, RXT0 = 0x01, 0x02, 0x10, 0x80
US = 1024  # one delay-timer unit (1.024 us) in ns
EOP_IFCS_RS = int(R.TxdCmd.EOP | R.TxdCmd.IFCS | R.TxdCmd.RS)
IDE = int(R.TxdCmd.IDE)


def _engines() -> list:
    try:
        import nicemu._datapath  # noqa: F401
    except ImportError:
        return ["python", pytest.param("cython", marks=pytest.mark.skip(reason="extension not built"))]
    return ["python", "cython"]


@pytest.fixture(params=_engines())
def nic(make_nic, request):
    """Both engines: the timers are the Nic's, the events that start them the engine's."""
    return make_nic(engine=request.param)


@pytest.fixture
def levels(nic):
    seen: list[bool] = []
    nic.on_irq = seen.append
    return seen


# --- ITR ---------------------------------------------------------------------------------------


def test_itr_zero_does_not_throttle(nic, clock, levels):
    nic.write32(R.IMS, TXDW)
    for _ in range(3):
        nic.write32(R.ICS, TXDW)
        assert nic.irq
        nic.read32(R.ICR)
        clock.advance(1)
    assert levels == [True, False] * 3
    assert nic.next_deadline() is None


def test_itr_gap(nic, clock, levels):
    nic.write32(R.ITR, 1000)  # 256 us
    nic.write32(R.IMS, TXDW)
    t0 = clock.now
    nic.write32(R.ICS, TXDW)  # none before it: at once
    assert levels == [True]
    assert nic.read32(R.ICR) == TXDW
    clock.advance(100_000)
    nic.write32(R.ICS, TXDW)  # inside the gap: held off
    assert not nic.irq and levels == [True, False]
    assert nic.next_deadline() == t0 + 256_000
    clock.now = t0 + 255_999
    nic.run_timers()
    assert not nic.irq
    clock.now = t0 + 256_000
    nic.run_timers()
    assert nic.irq and levels == [True, False, True]
    assert nic.next_deadline() is None
    assert nic.read32(R.ICR) == TXDW


def test_itr_interrupt_after_the_gap_fires_at_once(nic, clock, levels):
    nic.write32(R.ITR, 4)  # 1024 ns
    nic.write32(R.IMS, RXT0)
    nic.write32(R.ICS, RXT0)
    nic.read32(R.ICR)
    clock.advance(1024)
    nic.write32(R.ICS, RXT0)
    assert nic.irq and levels == [True, False, True]


def test_itr_gap_counts_from_the_last_assertion(nic, clock, levels):
    nic.write32(R.ITR, 10)  # 2560 ns
    nic.write32(R.IMS, RXT0)
    nic.write32(R.ICS, RXT0)
    clock.advance(2000)
    nic.read32(R.ICR)
    clock.advance(1000)  # 3000 ns after the line rose: the gap has passed
    nic.write32(R.ICS, RXT0)
    assert nic.irq


def test_itr_held_off_cause_cleared_before_deadline(nic, clock, levels):
    nic.write32(R.ITR, 100)
    nic.write32(R.IMS, TXDW)
    nic.write32(R.ICS, TXDW)
    nic.read32(R.ICR)
    nic.write32(R.ICS, TXDW)
    assert nic.next_deadline() is not None
    nic.write32(R.ICR, TXDW)  # software cleared it while held off
    assert nic.next_deadline() is None
    clock.advance(100 * 256)
    nic.run_timers()
    assert not nic.irq and levels == [True, False]


def test_itr_held_off_cause_masked_then_unmasked(nic, clock, levels):
    nic.write32(R.ITR, 100)
    nic.write32(R.IMS, TXDW)
    t0 = clock.now
    nic.write32(R.ICS, TXDW)
    nic.read32(R.ICR)
    nic.write32(R.ICS, TXDW)
    nic.write32(R.IMC, TXDW)
    assert nic.next_deadline() is None
    clock.advance(10_000)
    nic.write32(R.IMS, TXDW)  # still inside the gap
    assert not nic.irq and nic.next_deadline() == t0 + 25_600
    clock.now = t0 + 25_600
    nic.run_timers()
    assert nic.irq


def test_itr_write_changes_a_held_off_deadline(nic, clock):
    nic.write32(R.ITR, 1000)
    nic.write32(R.IMS, TXDW)
    t0 = clock.now
    nic.write32(R.ICS, TXDW)
    nic.read32(R.ICR)
    nic.write32(R.ICS, TXDW)
    assert nic.next_deadline() == t0 + 256_000
    clock.advance(1000)
    nic.write32(R.ITR, 2)  # 512 ns: already past
    assert nic.irq
    assert nic.read32(R.ITR) == 2


def test_itr_is_16_bits(nic):
    nic.write32(R.ITR, 0xABCD1234)
    assert nic.read32(R.ITR) == 0x1234


def test_itr_with_real_frames(nic, clock, levels):
    """Frames arriving every 10 us with ITR = 50 us: one interrupt per 50 us at most."""
    nic.write32(R.ITR, 50_000 // 256 + 1)  # 196 units = 50.176 us
    nic.write32(R.IMS, RXT0)
    rx = RxRing(nic, n=64).setup()
    assert rx.tail == 63
    rises = []
    for k in range(20):
        nic.receive(make_frame())
        nic.run_timers()
        if nic.irq:
            rises.append(clock.now)
            nic.read32(R.ICR)  # the driver handles it at once
        clock.advance(10_000)
    gaps = [b - a for a, b in zip(rises, rises[1:])]
    assert rises[0] == 1_000_000_000
    assert gaps and all(g >= 50_176 for g in gaps)
    assert len(rises) == 4  # t0, then each 60 us (the first 10 us tick after 50.176 us)


# --- RDTR / RADV -------------------------------------------------------------------------------


def rx_setup(nic, rdtr: int, radv: int) -> RxRing:
    nic.write32(R.IMS, RXT0)
    nic.write32(R.RDTR, rdtr)
    nic.write32(R.RADV, radv)
    return RxRing(nic, n=32).setup()


def test_rdtr_zero_is_immediate(nic, levels):
    rx_setup(nic, 0, 100)
    nic.receive(make_frame())
    assert nic.irq and nic.read32(R.ICR) == RXT0
    assert nic.next_deadline() is None


def test_rdtr_restarted_by_each_packet(nic, clock):
    rx_setup(nic, 10, 0)
    t0 = clock.now
    nic.receive(make_frame())
    assert not nic.irq and nic.next_deadline() == t0 + 10 * US
    clock.advance(5000)
    nic.receive(make_frame())  # restarts the packet timer
    assert nic.next_deadline() == t0 + 5000 + 10 * US
    clock.now = t0 + 10 * US
    nic.run_timers()
    assert not nic.irq and nic.peek32(R.ICR) == 0
    clock.now = t0 + 5000 + 10 * US
    nic.run_timers()
    assert nic.irq and nic.read32(R.ICR) == RXT0
    assert nic.next_deadline() is None


def test_radv_caps_the_delay(nic, clock):
    rx_setup(nic, 10, 25)
    t0 = clock.now
    for k in range(5):  # a packet every 5 us keeps restarting RDTR
        nic.receive(make_frame())
        nic.run_timers()
        assert not nic.irq
        clock.advance(5000)
    assert clock.now == t0 + 25_000
    assert nic.next_deadline() == t0 + 25 * US  # RADV (25.6 us) comes before RDTR (30.24 us)
    clock.now = t0 + 25 * US - 1
    nic.run_timers()
    assert not nic.irq
    clock.now = t0 + 25 * US
    nic.run_timers()
    assert nic.irq and nic.read32(R.ICR) == RXT0
    assert nic.next_deadline() is None  # both timers stop when RXT0 fires


def test_radv_restarts_with_the_next_first_packet(nic, clock):
    rx_setup(nic, 10, 12)
    nic.receive(make_frame())
    clock.advance(10 * US)
    nic.run_timers()
    assert nic.read32(R.ICR) == RXT0
    clock.advance(100_000)
    t1 = clock.now
    nic.receive(make_frame())
    assert nic.next_deadline() == t1 + 10 * US
    clock.advance(6 * US)
    nic.receive(make_frame())
    assert nic.next_deadline() == t1 + 12 * US  # RADV from the first packet after RXT0


def test_delay_timers_only_start_when_a_frame_reaches_the_ring(nic, clock):
    rx = rx_setup(nic, 10, 0)
    rx.give(0)
    nic.write32(R.RDH, 0)
    nic.write32(R.RDT, 0)  # no free descriptor: the frame waits in the RX packet buffer
    nic.receive(make_frame())
    assert nic.next_deadline() is None
    t1 = clock.advance(3000)
    nic.write32(R.RDT, 4)  # buffers: the frame is DMA'd now, and the timer starts
    assert nic.next_deadline() == t1 + 10 * US


def test_rdtr_fpd_flushes_now(nic, clock):
    rx_setup(nic, 100, 200)
    nic.receive(make_frame())
    assert not nic.irq
    nic.write32(R.RDTR, 0x80000000 | 100)
    assert nic.irq and nic.read32(R.ICR) == RXT0
    assert nic.read32(R.RDTR) == 100  # FPD self-clears
    assert nic.next_deadline() is None
    nic.write32(R.RDTR, 0x80000000 | 100)  # nothing pending: nothing raised
    assert not nic.irq and nic.peek32(R.ICR) == 0


def test_delay_registers_are_16_bits(nic):
    for off in (R.RDTR, R.RADV, R.TIDV, R.TADV):
        nic.write32(off, 0x7FFF1234)
        assert nic.read32(off) == 0x1234


def test_rxt0_held_by_itr(nic, clock):
    """RXT0 from the packet timer still obeys ITR."""
    nic.write32(R.ITR, 100)  # 25.6 us
    rx_setup(nic, 1, 0)
    t0 = clock.now
    nic.write32(R.ICS, RXT0)
    nic.read32(R.ICR)
    nic.receive(make_frame())
    clock.advance(US)
    nic.run_timers()  # RXT0 is raised, the line waits for the ITR gap
    assert nic.peek32(R.ICR) == RXT0 and not nic.irq
    assert nic.next_deadline() == t0 + 25_600
    clock.now = t0 + 25_600
    nic.run_timers()
    assert nic.irq


# --- TIDV / TADV -------------------------------------------------------------------------------


def tx_setup(nic, tidv: int, tadv: int) -> TxRing:
    nic.write32(R.IMS, TXDW)
    nic.write32(R.TIDV, tidv)
    nic.write32(R.TADV, tadv)
    return TxRing(nic).setup()


def test_tidv_zero_is_immediate(nic):
    tx = tx_setup(nic, 0, 0)
    tx.send([make_frame(size=60, fcs=False)], cmd=EOP_IFCS_RS | IDE)
    assert nic.read32(R.ICR) == TXDW | TXQE


def test_rs_without_ide_is_not_delayed(nic):
    tx = tx_setup(nic, 50, 100)
    tx.send([make_frame(size=60, fcs=False)])
    assert nic.read32(R.ICR) == TXDW | TXQE
    assert nic.next_deadline() is None


def test_tidv_restarted_and_tadv_caps(nic, clock):
    tx = tx_setup(nic, 8, 20)
    t0 = clock.now
    tx.send([make_frame(size=60, fcs=False)], cmd=EOP_IFCS_RS | IDE)
    assert nic.read32(R.ICR) == TXQE  # TXQE at once, TXDW delayed
    assert tx.sta(0) & 1  # DD written back
    assert nic.next_deadline() == t0 + 8 * US
    clock.advance(6 * US)
    tx.send([make_frame(size=60, fcs=False)], cmd=EOP_IFCS_RS | IDE)
    assert nic.next_deadline() == t0 + 14 * US
    clock.advance(6 * US)
    nic.run_timers()
    tx.send([make_frame(size=60, fcs=False)], cmd=EOP_IFCS_RS | IDE)
    assert nic.read32(R.ICR) == TXQE
    assert nic.next_deadline() == t0 + 20 * US  # TADV from the first descriptor
    clock.now = t0 + 20 * US
    nic.run_timers()
    assert nic.read32(R.ICR) == TXDW
    assert nic.next_deadline() is None
    assert len(nic.transmitted()) == 3


def test_tidv_fpd_flushes_now(nic, clock):
    tx = tx_setup(nic, 50, 0)
    tx.send([make_frame(size=60, fcs=False)], cmd=EOP_IFCS_RS | IDE)
    nic.read32(R.ICR)
    nic.write32(R.TIDV, 0x80000000 | 50)
    assert nic.read32(R.ICR) == TXDW
    assert nic.read32(R.TIDV) == 50


def test_next_deadline_is_the_nearest(nic, clock):
    tx = tx_setup(nic, 30, 0)
    rx_setup(nic, 10, 0)
    t0 = clock.now
    tx.send([make_frame(size=60, fcs=False)], cmd=EOP_IFCS_RS | IDE)
    assert nic.next_deadline() == t0 + 30 * US
    nic.receive(make_frame())
    assert nic.next_deadline() == t0 + 10 * US
    clock.advance(10 * US)
    nic.run_timers()
    assert nic.next_deadline() == t0 + 30 * US
    clock.advance(20 * US)
    nic.run_timers()
    assert nic.read32(R.ICR) & (RXT0 | TXDW) == RXT0 | TXDW


def test_reset_cancels_timers(nic, clock):
    rx_setup(nic, 10, 20)
    nic.receive(make_frame())
    nic.write32(R.ITR, 100)
    assert nic.next_deadline() is not None
    nic.write32(R.CTRL, int(R.Ctrl.RST))
    assert nic.next_deadline() is None
    clock.advance(1_000_000)
    nic.run_timers()
    assert nic.peek32(R.ICR) == 0 and not nic.irq


def test_run_timers_with_nothing_pending(nic, clock):
    nic.run_timers()
    assert nic.peek32(R.ICR) == 0


# --- next_deadline: cached, and exact after every change ---------------------------------------


def _earliest_timer(nic) -> int | None:
    """The brute-force answer: the earliest of the timers the Nic holds."""
    timers = [t for t in (nic._rdtr_at, nic._radv_at, nic._tidv_at, nic._tadv_at, nic._itr_at) if t is not None]
    return min(timers) if timers else None


def test_next_deadline_is_exact_after_every_timer_change(nic, clock):
    """Random register writes, frames both ways, clock steps, timer runs and resets: after each
    one, next_deadline() (kept up to date, not recomputed per call) is the earliest timer."""
    import random

    rng = random.Random(4)
    sent: list[bytes] = []
    nic.attach(lambda f: sent.append(f) or True)
    rx = RxRing(nic, n=16).setup(give=15)
    tx = TxRing(nic, n=16).setup()
    seen_deadlines = set()

    def reprogram() -> None:
        nic.config_write(0x04, int(R.PciCommand.MEMORY | R.PciCommand.MASTER), size=2)
        rx.tail = tx.tail = 0
        rx.setup(give=15)
        tx.setup()

    ops = [
        lambda: nic.write32(R.RDTR, rng.choice([0, 1, 5, 40, R.DELAY_FPD, R.DELAY_FPD | 7])),
        lambda: nic.write32(R.RADV, rng.choice([0, 3, 80])),
        lambda: nic.write32(R.TIDV, rng.choice([0, 2, 30, R.DELAY_FPD])),
        lambda: nic.write32(R.TADV, rng.choice([0, 4, 60])),
        lambda: nic.write32(R.ITR, rng.choice([0, 10, 400])),
        lambda: nic.write32(R.IMS, rng.choice([TXDW, RXT0, TXDW | RXT0 | RXDMT0])),
        lambda: nic.write32(R.IMC, rng.choice([TXDW, RXT0, 0xFFFFFFFF])),
        lambda: nic.write32(R.ICS, rng.choice([TXDW, RXT0, TXQE])),
        lambda: nic.write32(R.ICR, rng.choice([TXDW, RXT0, 0xFFFFFFFF])),
        lambda: nic.read32(R.ICR),
        lambda: nic.receive(make_frame(size=rng.choice([60, 200])) + b"\0" * 4),  # FCS checked: may be bad
        lambda: nic.receive(__import__("conftest").with_fcs(make_frame(size=60))),
        lambda: rx.give(rng.choice([1, 3])) if (rx.tail + 3) % rx.n != nic.peek32(R.RDH) else None,
        lambda: tx.send([make_frame(size=60)], cmd=rng.choice([EOP_IFCS_RS, EOP_IFCS_RS | IDE]))
        if (tx.tail + 2) % tx.n != nic.peek32(R.TDH) else None,
        lambda: clock.advance(rng.choice([1, 500, 20_000, 300_000])),
        lambda: nic.run_timers(),
        lambda: (nic.write32(R.CTRL, int(R.Ctrl.RST)), reprogram()),
    ]
    weights = [3, 2, 3, 2, 3, 3, 2, 3, 2, 3, 2, 4, 3, 4, 6, 6, 1]
    for step in range(3000):
        rng.choices(ops, weights)[0]()
        assert nic.next_deadline() == _earliest_timer(nic), step
        seen_deadlines.add(nic.next_deadline() is None)
    assert seen_deadlines == {True, False}  # the walk both armed timers and saw them all end
