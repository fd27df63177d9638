"""In-process cables: the pipe pair (CableEnd semantics: doorbell, backpressure, link) and
PairCable joining two real Nics (fast engine-to-engine path and the wrapped path)."""
from __future__ import annotations

import select

import pytest
from conftest import MAC_BYTES, PEER_MAC, RxRing, TxRing, make_frame

from nicemu import regs as R
from nicemu.cable import CableEnd, make_cable, plug, service, wrap_end
from nicemu.cable.pair import PairCable, pipe

PEER_BYTES = bytes.fromhex(PEER_MAC.replace(":", ""))


def readable(end) -> bool:
    return bool(select.select([end.fileno()], [], [], 0)[0])


def test_pipe_is_a_cable_end() -> None:
    a, b = make_cable("pipe")
    assert isinstance(a, CableEnd) and isinstance(b, CableEnd)
    assert a.link_up and b.link_up
    a.close()
    b.close()


def test_pipe_delivers_in_order_and_rings_the_doorbell() -> None:
    a, b = pipe()
    assert not readable(b)
    fs = [make_frame(payload=bytes([i])) for i in range(5)]
    for f in fs:
        assert a.send(f)
    assert readable(b)
    assert b.recv_frames() == fs
    assert not readable(b)
    assert b.recv_frames() == []
    a.close()
    b.close()


def test_pipe_backpressure_wakes_the_refused_sender() -> None:
    a, b = pipe(limit=3)
    f = make_frame()
    assert all(a.send(f) for _ in range(3))
    assert not a.send(f)
    assert not a.writable()
    assert not readable(a)
    assert len(b.recv_frames()) == 3
    assert readable(a)  # "writable again" shows up on the sender's descriptor
    assert a.recv_frames() == [] and a.writable()
    assert a.send(f)
    a.close()
    b.close()


def test_pipe_close_is_link_down_and_frames_are_lost() -> None:
    a, b = pipe()
    a.close()
    assert not b.link_up
    assert readable(b)
    assert b.recv_frames() == []
    assert b.send(make_frame())  # taken and lost, never refused
    b.close()
    a.close()  # idempotent


def test_pipe_bad_limit() -> None:
    with pytest.raises(ValueError, match="limit"):
        pipe(limit=0)


def test_make_cable_errors() -> None:
    with pytest.raises(ValueError, match="unknown cable kind 'coax'"):
        make_cable("coax")
    with pytest.raises(ValueError, match="pipe cable: .*colour"):
        make_cable("pipe", colour="red")
    with pytest.raises(ValueError, match="PairCable"):
        make_cable("pair")


def test_wrap_end_layers_faults_inside_capture_outside(tmp_path) -> None:
    from nicemu.cable.faults import FaultyEnd
    from nicemu.cable.capture import CapturedEnd

    a, b = pipe()
    w = wrap_end(a, capture=tmp_path / "a.pcap", faults_tx={"drop": 1.0, "seed": 1})
    assert isinstance(w, CapturedEnd) and isinstance(w.inner, FaultyEnd)
    assert wrap_end(b) is b  # nothing asked: nothing added
    with pytest.raises(ValueError, match="faults.drop"):
        wrap_end(b, faults_rx={"drop": 2})
    w.close()
    assert not b.link_up
    b.close()


# --- real devices ---------------------------------------------------------------------------


def setup_pair(a, b):
    return TxRing(a).setup(), RxRing(a).setup(), TxRing(b).setup(), RxRing(b).setup()


def test_fast_pair_carries_frames_both_ways(make_nic) -> None:
    a = make_nic()
    b = make_nic(mac=PEER_MAC)
    cable = PairCable(a, b)
    assert cable.fast and cable.fileno() is None
    assert a.read32(R.STATUS) & R.Status.LU and b.read32(R.STATUS) & R.Status.LU
    txa, rxa, txb, rxb = setup_pair(a, b)
    f_ab = make_frame(dst=PEER_BYTES, payload=b"a to b", fcs=False)[:60]
    f_ba = make_frame(dst=MAC_BYTES, payload=b"b to a", fcs=False)[:60]
    txa.send([f_ab])
    txb.send([f_ba])
    assert rxb.desc(0)[3] & R.RxdStatus.DD and rxb.data(0)[:60] == f_ab
    assert rxa.desc(0)[3] & R.RxdStatus.DD and rxa.data(0)[:60] == f_ba
    assert b.read32(R.GPRC) == 1 and a.read32(R.GPTC) == 1
    cable.close()
    assert not a.read32(R.STATUS) & R.Status.LU
    txa.send([f_ab])  # unplugged: transmitted and lost
    assert b.read32(R.GPRC) == 0 and a.read32(R.GPTC) == 1
    assert a.transmitted() == []


def test_wrapped_pair_is_synchronous_like_the_fast_one(make_nic, tmp_path) -> None:
    a = make_nic()
    b = make_nic(mac=PEER_MAC)
    # faults on b -> a (a rate no frame here reaches) put the cable on its Python ends
    cable = PairCable(a, b, capture_a=tmp_path / "a.pcap", faults_ba={"rate_bps": 10**12})
    assert not cable.fast and cable.needs_timers
    txa, rxa, txb, rxb = setup_pair(a, b)
    frames = [make_frame(dst=PEER_BYTES, payload=bytes([i]) * 8, fcs=False)[:60] for i in range(10)]
    txa.send(frames)
    got = [rxb.data(k)[:60] for k in range(10)]
    assert got == frames
    cable.close()
    assert not b.read32(R.STATUS) & R.Status.LU
    txa.send(frames[:1])
    assert b.read32(R.GPRC) == 10  # nothing more after the unplug


def test_pair_refuses_the_same_device(make_nic) -> None:
    a = make_nic()
    with pytest.raises(ValueError, match="same device"):
        PairCable(a, a)


def test_pipe_ends_with_plug_and_service_like_the_event_loop(make_nic) -> None:
    """Two Nics on pipe ends, serviced the way nicemu.emulator does it; a full pipe keeps
    frames in the sender's TX packet buffer until the receiver drains."""
    a = make_nic()
    b = make_nic(mac=PEER_MAC)
    ea, eb = pipe(limit=4)
    plug(a, ea)
    plug(b, eb)
    txa, rxa, txb, rxb = setup_pair(a, b)
    frames = [make_frame(dst=PEER_BYTES, payload=bytes([i]) * 8, fcs=False)[:60] for i in range(10)]
    sa: dict = {}
    sb: dict = {}
    txa.send(frames)  # 4 fit in the pipe, 6 wait in a's TX packet buffer
    assert len(eb.inbox) == 4
    for _ in range(10):
        if readable(eb):
            service(b, eb, sb)
        if readable(ea):
            service(a, ea, sa)
    assert [rxb.data(k)[:60] for k in range(10)] == frames
    assert b.read32(R.GPRC) == 10
    ea.close()
    assert readable(eb)
    service(b, eb, sb)
    assert not b.read32(R.STATUS) & R.Status.LU
    eb.close()


def test_wrapped_pipe_ends_in_the_emulator_loop(tmp_path) -> None:
    """Pipe ends with a delay and a capture, driven by nicemu.emulator's select loop with the
    real clock: the delayed frames arrive in order and the capture holds them."""
    import time
    import warnings

    from conftest import enable_bus_master

    from nicemu import DmaMemory
    from nicemu.emulator import Emulator
    from nicemu.nic import Nic
    from nicemu.cable.capture import read_pcap

    mems = [DmaMemory(1 << 20), DmaMemory(1 << 20)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        a = Nic(mems[0])
        b = Nic(mems[1], mac=PEER_MAC)
    for n in (a, b):
        enable_bus_master(n)
    ea, eb = pipe()
    ea = wrap_end(ea, faults_tx={"delay_ms": 5, "rate_bps": 10_000_000})
    eb = wrap_end(eb, capture=tmp_path / "b.pcap")
    emu = Emulator()
    try:
        emu.add_port(a, ea)
        emu.add_port(b, eb)
        txa, rxa, txb, rxb = setup_pair(a, b)
        frames = [make_frame(dst=PEER_BYTES, payload=bytes([i]) * 8, fcs=False)[:60] for i in range(10)]
        txa.send(frames)
        assert b.read32(R.GPRC) == 0  # all held by the delay
        deadline = time.monotonic() + 10
        got = 0
        while got < 10 and time.monotonic() < deadline:
            emu.run_once(0.5)
            got += b.read32(R.GPRC)
        assert got == 10
        assert [rxb.data(k)[:60] for k in range(10)] == frames
    finally:
        emu.close()
        for m in mems:
            m.close()
    _, recs = read_pcap(tmp_path / "b.pcap")
    assert [r.data[:60] for r in recs] == frames
