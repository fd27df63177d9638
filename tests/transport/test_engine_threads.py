"""Engine threads (`NICEMU_ENGINE_THREADS=1`, nicemu/vfio_user/page_service.py EngineThreads):
each device's doorbell page polled by its own thread. A device reset (CTRL.RST) and a client
disconnect while frames stream into it, then frames byte-exact and counters exact; the same
with the loop's poller (the default). kill -9 of either side mid-stream with engine threads:
test_doorbell_page.py."""
from __future__ import annotations

import os
import random
import time

import pytest

from driver.pmd import Pmd
from driver.vfio_user_client import VfioUserBus
from nicemu import regs as R

from test_doorbell_page import PairProc, _frame

pytest.importorskip("nicemu.vfio_user._pagepoll", reason="build with: python setup.py build_ext --inplace")

MODES = {"threads": {"NICEMU_ENGINE_THREADS": "1"}, "loop": {"NICEMU_ENGINE_THREADS": "0"}}


@pytest.fixture(params=list(MODES))
def pair(request):
    shm = set(os.listdir("/dev/shm"))
    e = PairProc(env=MODES[request.param])
    e.mode = request.param
    yield e
    e.close()
    assert set(os.listdir("/dev/shm")) - shm == set()


def _stream(gen: Pmd, pmd: Pmd, frames: list[bytes]) -> list[bytes]:
    got: list[bytes] = []
    k = 0
    end = time.monotonic() + 30
    while len(got) < len(frames) and time.monotonic() < end:
        n = min(32, len(frames) - k)
        if n and k + n - len(got) <= 96:
            mbufs = [gen.alloc().set_data(f) for f in frames[k : k + n]]
            s = gen.tx_burst(mbufs)
            for m in mbufs[s:]:
                m.free()
            k += s
        for m in pmd.rx_burst(64):
            got.append(bytes(m))
            m.free()
    return got


def _settle(gen: Pmd, pmd: Pmd) -> None:
    """Let what is in flight land (a read flushes the generator's doorbells), drain it."""
    gen.bus.read32(R.STATUS)
    empty = 0
    while empty < 20:
        ms = pmd.rx_burst(64)
        for m in ms:
            m.free()
        empty = 0 if ms else empty + 1
        time.sleep(0.001)


def _exact(gen: Pmd, pmd: Pmd, seed: int, count: int = 800) -> None:
    """`count` frames gen -> pmd: all received, byte-exact and in order, and the device's
    counters (GPRC, MPC, GPTC) exactly that many from a clean start."""
    _settle(gen, pmd)
    pmd.stats_reset()
    gen.stats_reset()
    rng = random.Random(seed)
    sent = [_frame(seed * 10_000 + i, rng.randrange(60, 1515)) for i in range(count)]
    got = _stream(gen, pmd, sent)
    if got != sent:
        pmd.stats_update()
        gen.stats_update()
        missing = [i for i, f in enumerate(sent) if f not in set(got)]
        regs = {n: pmd.bus.read32(getattr(R, n)) for n in ("RDH", "RDT", "RDLEN", "TDH", "TDT")}
        page = pmd.bus.inner.page
        words = [hex(page.load(0)), hex(page.load(1)), page.need_wake()] if page is not None else None
        pytest.fail(f"{len(got)} of {len(sent)} frames, missing {missing[:20]}; receiver regs {regs} page {words}"
                    f" msgs {pmd.bus.inner._sent}; hw_mpc {pmd.xstats()['hw_mpc']} "
                    f"hw_rnbc {pmd.xstats()['hw_rnbc']}")
    pmd.stats_update()
    gen.stats_update()
    x, gx = pmd.xstats(), gen.xstats()
    assert (x["hw_gprc"], x["hw_mpc"], gx["hw_gptc"]) == (count, 0, count)
    st = pmd.stats()
    assert (st.ipackets, st.ibytes, st.ierrors) == (count, sum(map(len, sent)), 0)


def test_reset_and_disconnect_under_traffic_then_exact(pair) -> None:
    b0 = VfioUserBus(pair.socks[0], 32 << 20, doorbell_page=True)
    b1 = VfioUserBus(pair.socks[1], 32 << 20, doorbell_page=True)
    try:
        gen = Pmd(b0, rx_count=256, tx_count=256)
        pmd = Pmd(b1, rx_count=256, tx_count=256)
        _exact(gen, pmd, 1)
        for round_ in range(3):
            # CTRL.RST of nic1 (a new PMD probes it) while nic0 streams into it
            for i in range(150):
                gen.send(_frame(i, 60))
            pmd2 = Pmd(b1, rx_count=256, tx_count=256)  # CTRL.RST, rings anew: under traffic
            for i in range(150):
                gen.send(_frame(i, 60))
            pmd = pmd2
            _exact(gen, pmd, 10 + round_)
            # CTRL.RST of nic0, the sender, mid-stream: a new generator
            for i in range(100):
                gen.send(_frame(i, 60))
            gen = Pmd(b0, rx_count=256, tx_count=256)
            _exact(gen, pmd, 20 + round_)
        # the receiving client disconnects mid-stream and a new one connects
        for i in range(200):
            gen.send(_frame(i, 60))
        b1.close()
        b1 = VfioUserBus(pair.socks[1], 32 << 20, doorbell_page=True)
        assert b1.doorbell_page
        pmd = Pmd(b1, rx_count=256, tx_count=256)
        _exact(gen, pmd, 30)
        gen.close()
        pmd.close()
    finally:
        b0.close()
        b1.close()
    assert pair.p.poll() is None  # the emulator is still up
    threads = len(os.listdir(f"/proc/{pair.p.pid}/task"))
    assert threads >= 3 if pair.mode == "threads" else threads == 1  # the loop (+ an engine thread per device)
