"""ICR/ICS/IMS/IMC, the INTx line and on_irq, link changes, and the Nic <-> engine contract."""
from __future__ import annotations

import sys
import warnings

import pytest

from nicemu import regs as R
from nicemu.nic import Nic, make_engine

from conftest import RxRing, StubEngine, TxRing, make_frame

TXDW, TXQE, LSC, RXSEQ, RXDMT0, RXO, RXT0 = 0x01, 0x02, 0x04, 0x08, 0x10, 0x40, 0x80


@pytest.fixture
def levels(stub_nic):
    seen: list[bool] = []
    stub_nic.on_irq = seen.append
    return seen


# --- ICR / ICS / IMS / IMC -------------------------------------------------------------------


def test_icr_read_returns_pending_and_clears(stub_nic):
    stub_nic.write32(R.ICS, TXDW | RXT0)
    assert stub_nic.read32(R.ICR) == 0x81
    assert stub_nic.read32(R.ICR) == 0


def test_icr_read_clears_even_masked_causes(stub_nic):
    stub_nic.write32(R.IMS, RXT0)
    stub_nic.write32(R.ICS, TXDW | RXT0 | LSC)
    assert stub_nic.read32(R.ICR) == 0x85  # ICR shows every pending cause, masked or not
    assert stub_nic.read32(R.ICR) == 0


def test_icr_write_one_to_clear(stub_nic):
    stub_nic.write32(R.ICS, TXDW | TXQE | RXT0)
    stub_nic.write32(R.ICR, TXQE | RXO)  # RXO was not pending: no effect
    assert stub_nic.peek32(R.ICR) == 0x81
    stub_nic.write32(R.ICR, 0xFFFFFFFF)
    assert stub_nic.read32(R.ICR) == 0


def test_ics_sets_only_modeled_causes(stub_nic):
    stub_nic.write32(R.ICS, 0xFFFFFFFF)
    assert stub_nic.read32(R.ICR) == 0x80DF == R.ICR_VALID


def test_ics_and_imc_are_write_only(stub_nic):
    stub_nic.write32(R.ICS, RXT0)
    stub_nic.write32(R.IMS, RXT0 | LSC)
    assert stub_nic.read32(R.ICS) == 0
    assert stub_nic.read32(R.IMC) == 0
    assert stub_nic.read32(R.ICR) == RXT0  # reading ICS did not clear anything


def test_ims_sets_imc_clears(stub_nic):
    stub_nic.write32(R.IMS, RXT0 | TXDW)
    stub_nic.write32(R.IMS, LSC)
    assert stub_nic.read32(R.IMS) == 0x85
    stub_nic.write32(R.IMC, TXDW | RXO)
    assert stub_nic.read32(R.IMS) == 0x84
    stub_nic.write32(R.IMC, 0xFFFFFFFF)
    assert stub_nic.read32(R.IMS) == 0
    stub_nic.write32(R.IMS, 0xFFFFFFFF)
    assert stub_nic.read32(R.IMS) == 0x80DF


# --- the line -------------------------------------------------------------------------------


def test_line_is_icr_and_ims(stub_nic, levels):
    stub_nic.write32(R.ICS, TXDW)  # pending but masked
    assert not stub_nic.irq and levels == []
    stub_nic.write32(R.IMS, TXDW)  # unmasking a pending cause raises the line
    assert stub_nic.irq and levels == [True]
    stub_nic.write32(R.IMC, TXDW)  # masking it lowers the line, ICR keeps the cause
    assert not stub_nic.irq and levels == [True, False]
    assert stub_nic.peek32(R.ICR) == TXDW
    stub_nic.write32(R.IMS, TXDW)
    assert stub_nic.irq and levels == [True, False, True]
    assert stub_nic.read32(R.ICR) == TXDW  # reading ICR lowers it
    assert not stub_nic.irq and levels == [True, False, True, False]


def test_line_follows_w1c(stub_nic, levels):
    stub_nic.write32(R.IMS, TXDW | RXT0)
    stub_nic.write32(R.ICS, TXDW | RXT0)
    stub_nic.write32(R.ICR, TXDW)
    assert stub_nic.irq  # RXT0 still pending and enabled
    stub_nic.write32(R.ICR, RXT0)
    assert not stub_nic.irq
    assert levels == [True, False]


def test_more_causes_while_high_do_not_signal_again(stub_nic, levels):
    stub_nic.write32(R.IMS, 0xFF)
    stub_nic.write32(R.ICS, TXDW)
    stub_nic.write32(R.ICS, RXT0)
    stub_nic.write32(R.ICS, LSC)
    assert levels == [True]


def test_ims_write_while_high_resignals(stub_nic, levels):
    stub_nic.write32(R.IMS, RXT0)
    stub_nic.write32(R.ICS, RXT0)
    assert levels == [True]
    stub_nic.write32(R.IMS, LSC)  # still high after an IMS write: signalled again
    assert levels == [True, True]
    assert stub_nic.irq


def test_ims_write_while_low_does_not_signal(stub_nic, levels):
    stub_nic.write32(R.IMS, RXT0)
    assert levels == []


def test_icr_read_with_nothing_pending_is_quiet(stub_nic, levels):
    stub_nic.write32(R.IMS, 0xFF)
    assert stub_nic.read32(R.ICR) == 0
    assert levels == []


def test_on_irq_may_read_icr_reentrantly(stub_nic):
    """An in-process interrupt handler reads ICR from inside on_irq, as a top half does."""
    seen = []

    def handler(level: bool) -> None:
        seen.append(level)
        if level:
            seen.append(stub_nic.read32(R.ICR))

    stub_nic.on_irq = handler
    stub_nic.write32(R.IMS, RXT0)
    stub_nic.write32(R.ICS, RXT0)
    assert seen == [True, False, RXT0]
    assert not stub_nic.irq


# --- link ---------------------------------------------------------------------------------------


def test_set_link_changes_lu_and_raises_lsc(stub_nic, levels):
    stub_nic.write32(R.IMS, LSC)
    assert stub_nic.read32(R.STATUS) & 0x2
    stub_nic.set_link(False)
    assert stub_nic.read32(R.STATUS) == 0x81
    assert stub_nic.irq and levels == [True]
    assert stub_nic.read32(R.ICR) == LSC
    stub_nic.set_link(False)  # no change, no LSC
    assert stub_nic.read32(R.ICR) == 0
    stub_nic.set_link(True)
    assert stub_nic.read32(R.STATUS) == 0x83
    assert stub_nic.read32(R.ICR) == LSC
    assert stub_nic.link_up


def test_status_is_read_only(stub_nic):
    stub_nic.write32(R.STATUS, 0)
    assert stub_nic.read32(R.STATUS) == 0x83


# --- the engine contract ----------------------------------------------------------------------


def test_tdt_write_transmits(stub_nic):
    e = stub_nic.engine
    e.calls.clear()
    stub_nic.write32(R.TDT, 0x12345)
    assert e.calls == ["transmit"]
    assert stub_nic.read32(R.TDT) == 0x2345  # 16-bit index


def test_rdt_write_drains(stub_nic):
    e = stub_nic.engine
    e.calls.clear()
    stub_nic.write32(R.RDT, 0x10007)
    assert e.calls == ["drain_rx"]
    assert stub_nic.read32(R.RDT) == 7


def test_tctl_rctl_with_en_start_the_engine(stub_nic):
    e = stub_nic.engine
    e.calls.clear()
    stub_nic.write32(R.TCTL, 0x0103F0F8)  # EN clear
    stub_nic.write32(R.RCTL, 0x8000)
    assert e.calls == []
    stub_nic.write32(R.TCTL, 0x0103F0FA)
    stub_nic.write32(R.RCTL, 0x8002)
    assert e.calls == ["transmit", "drain_rx"]
    assert stub_nic.read32(R.TCTL) == 0x0103F0FA
    assert stub_nic.read32(R.RCTL) == 0x8002


def test_events_raise_causes_and_never_leak_timer_bits(stub_nic, levels):
    e = stub_nic.engine
    stub_nic.write32(R.IMS, 0xFF)
    e.next_events["transmit"] = TXQE | R.EV_TX_IDE  # TIDV = 0: TXDW at once
    stub_nic.write32(R.TDT, 1)
    assert stub_nic.read32(R.ICR) == TXQE | TXDW
    e.next_events["receive"] = RXDMT0 | R.EV_RX_DONE  # RDTR = 0: RXT0 at once
    stub_nic.receive(make_frame())
    assert stub_nic.read32(R.ICR) == RXDMT0 | RXT0
    e.next_events["drain_rx"] = RXO
    stub_nic.write32(R.RDT, 1)
    assert stub_nic.read32(R.ICR) == RXO
    e.next_events["tx_resume"] = TXQE
    stub_nic.tx_ready()
    assert e.calls[-1] == "tx_resume"
    assert stub_nic.read32(R.ICR) == TXQE
    assert levels == [True, False] * 4


def test_receive_passes_the_frame_to_the_engine(stub_nic):
    stub_nic.receive(make_frame())
    assert stub_nic.engine.calls[-1] == "receive"


def test_attach_transmitted_dma_errors_delegate(stub_nic):
    e = stub_nic.engine

    def sink(frame: bytes) -> bool:
        return True

    stub_nic.attach(sink)
    assert e.sink is sink
    stub_nic.attach(None)
    assert e.sink is None
    e.sent = [b"x" * 64]
    assert stub_nic.transmitted() == [b"x" * 64]
    assert stub_nic.transmitted() == []
    e.dma_errors = 3
    assert stub_nic.dma_errors == 3


def test_connect_links_both_engines_and_services_peer_events(make_nic):
    a = make_nic(engine=StubEngine)
    b = make_nic(mac="52:54:00:65:43:21", engine=StubEngine)
    a.connect(b)
    assert a.engine.peer is b.engine and b.engine.peer is a.engine
    b.write32(R.IMS, RXT0)
    b.engine.pending_events = R.EV_RX_DONE  # what a's frames raised in b's engine
    b.engine.calls.clear()
    a.write32(R.TDT, 1)
    assert b.engine.calls == ["take_events"]
    assert b.irq and b.read32(R.ICR) == RXT0
    with pytest.raises(ValueError):
        a.connect(a)


def test_reconnect_and_disconnect(make_nic):
    a, b, c = (make_nic(mac=f"52:54:00:00:00:0{k}", engine=StubEngine) for k in range(1, 4))
    a.connect(b)
    a.connect(c)  # a leaves b
    assert a.engine.peer is c.engine and c.engine.peer is a.engine
    assert b.engine.peer is None
    c.disconnect()
    assert a.engine.peer is None and c.engine.peer is None
    a.engine.calls.clear()
    c.engine.calls.clear()
    a.write32(R.TDT, 1)
    assert c.engine.calls == []  # no peer to service any more
    a.disconnect()  # not connected: nothing to do


# --- engine selection -------------------------------------------------------------------------


def test_python_engine_is_the_reference(mem, clock):
    from nicemu.datapath_ref import RefDatapath

    nic = Nic(mem, clock=clock, engine="python")
    assert isinstance(nic.engine, RefDatapath)
    assert nic.engine.regs is nic.regs and nic.engine.mem is mem


def test_auto_falls_back_with_a_warning(mem, clock, monkeypatch):
    from nicemu.datapath_ref import RefDatapath

    monkeypatch.setitem(sys.modules, "nicemu._datapath", None)  # as if the extension were not built
    with pytest.warns(RuntimeWarning, match="Cython"):
        nic = Nic(mem, clock=clock, engine="auto")
    assert isinstance(nic.engine, RefDatapath)
    with pytest.raises(ImportError):
        Nic(mem, clock=clock, engine="cython")


def test_auto_prefers_cython(mem, clock):
    mod = pytest.importorskip("nicemu._datapath")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nic = Nic(mem, clock=clock, engine="auto")
    assert isinstance(nic.engine, mod.Datapath)


def test_bad_engine_name(mem):
    with pytest.raises(ValueError):
        Nic(mem, engine="fpga")
    with pytest.raises(ValueError):
        make_engine("", None, mem)


# --- with the real engine ---------------------------------------------------------------------


def test_loopback_pair_interrupts(make_nic):
    """Two devices back to back: a's TDT write raises TXDW/TXQE in a and RXT0 in b."""
    a = make_nic()
    b = make_nic(mac="52:54:00:65:43:21")
    a.connect(b)
    for nic in (a, b):
        nic.write32(R.IMS, RXT0 | TXDW | TXQE)
    rx = RxRing(b).setup()
    tx = TxRing(a).setup()
    b_levels: list[bool] = []
    b.on_irq = b_levels.append
    tx.send([make_frame(dst=bytes.fromhex("525400654321"), size=60, fcs=False)])
    assert a.irq and a.read32(R.ICR) == TXDW | TXQE
    assert b.irq and b_levels == [True]
    assert b.read32(R.ICR) == RXT0
    assert rx.desc(0)[1] == 64 and rx.desc(0)[3] & 0x3 == 0x3  # length with FCS, DD | EOP


def test_icr_causes_from_real_receive(nic):
    nic.write32(R.IMS, RXT0 | RXO)
    RxRing(nic, n=8).setup()
    nic.receive(make_frame())
    assert nic.irq
    assert nic.read32(R.ICR) & RXT0
    assert not nic.irq
