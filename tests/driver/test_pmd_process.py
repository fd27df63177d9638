"""The PMD against devices in an emulator process (vfio-user over real sockets).

`python -m nicemu serve --pair` runs two devices cabled back to back; this process drives
both through VfioUserBus (the PMD under test on nic1, a peer PMD on nic0), or runs the PMD as
its own process (`python -m driver.pmd`) for the echo, adaptive-sleep and kill -9 tests.
Every process is reaped and the socket directory removed.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from driver.bus import BusError
from driver.pmd import Pmd
from driver.vfio_user_client import VfioUserBus
from nicemu import regs as R

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
MAC0, MAC1 = "52:54:00:00:01:00", "52:54:00:00:01:01"
M0, M1 = bytes.fromhex(MAC0.replace(":", "")), bytes.fromhex(MAC1.replace(":", ""))

pytest.importorskip("driver._pmd", reason="build with: cythonize -i -3 driver/_pmd.pyx")


def frame(dst: bytes, src: bytes, i: int, size: int = 60) -> bytes:
    body = dst + src + b"\x88\xb5" + i.to_bytes(4, "big")
    return body + bytes(size - len(body))


def wait_for(cond, timeout: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class Emulator:
    """`nicemu serve` with two devices joined by an in-process pair cable."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="nicemu-pmd-")
        self.sock0 = os.path.join(self.dir, "s", "nic0.sock")
        self.sock1 = os.path.join(self.dir, "s", "nic1.sock")
        self.p = subprocess.Popen(
            [sys.executable, "-m", "nicemu", "serve", "--socket", self.sock0, "--mac", MAC0,
             "--socket", self.sock1, "--mac", MAC1, "--pair"],
            env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: os.path.exists(self.sock1) or self.p.poll() is not None, what="emulator sockets")
        if self.p.poll() is not None:
            raise AssertionError(f"emulator exited: {self.p.stderr.read()}")

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.p.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class PmdProc:
    """`python -m driver.pmd` in its own process; JSON lines on stdout."""

    def __init__(self, *args: str) -> None:
        self.p = subprocess.Popen([sys.executable, "-m", "driver.pmd", *args], env=ENV, cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        os.set_blocking(self.p.stdout.fileno(), True)

    def event(self, name: str, timeout: float = 20.0, pred=lambda d: True) -> dict:
        """The next `name` line for which pred(line) holds (older lines are skipped)."""
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.p.stdout, selectors.EVENT_READ)
        end = time.monotonic() + timeout
        try:
            while time.monotonic() < end:
                if sel.select(0.2):
                    line = self.p.stdout.readline()
                    if not line:
                        break
                    d = json.loads(line)
                    if d.get("event") == name and pred(d):
                        return d
        finally:
            sel.close()
        raise AssertionError(f"no {name!r} from the PMD process; stderr: {self.p.stderr.read() if self.p.poll() is not None else ''}")

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()
        self.p.stdout.close()
        self.p.stderr.close()


@pytest.fixture
def emu():
    e = Emulator()
    yield e
    e.close()


def poll_until(pmd: Pmd, want: int, timeout: float = 10.0) -> list[bytes]:
    got: list[bytes] = []
    end = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < end:
        for m in pmd.rx_burst(64):
            got.append(bytes(m))
            m.free()
    return got


def test_frames_both_ways_through_the_pmd_with_no_register_reads(emu) -> None:
    bus0, bus1 = VfioUserBus(emu.sock0, 8 << 20), VfioUserBus(emu.sock1, 8 << 20)
    try:
        peer, pmd = Pmd(bus0, rx_count=256, tx_count=256), Pmd(bus1, rx_count=256, tx_count=256)
        assert (peer.mac, pmd.mac) == (MAC0, MAC1)
        reads = pmd.bus.reads
        rng = random.Random(5)
        sent = [frame(M1, M0, i, rng.randrange(60, 1515)) for i in range(1000)]
        got: list[bytes] = []
        for k in range(0, 1000, 100):  # the peer sends bursts; the PMD polls each one in
            mbufs = [peer.alloc().set_data(f) for f in sent[k : k + 100]]
            assert peer.tx_burst(mbufs) == 100
            got += poll_until(pmd, 100)
        assert got == sent
        back = [frame(M0, M1, i) for i in range(300)]
        got = []
        for k in range(0, 300, 50):  # each burst received before the next: 300 frames would
            # overrun the 256-slot ring if the emulator lags behind (a loaded machine)
            assert pmd.tx_burst([pmd.alloc().set_data(f) for f in back[k : k + 50]]) == 50
            got += poll_until(peer, 50)
        assert got == back
        assert pmd.bus.reads == reads  # the whole exchange: not one register read
        assert bus1.wait_irq(0) is False  # and not one interrupt
        x = pmd.xstats()
        assert x["rx_doorbells"] <= 1000 // 32 + 1 and x["tx_doorbells"] == 6
        pmd.stats_update()
        st = pmd.stats()
        assert (st.ipackets, st.opackets, st.imissed, st.ierrors) == (1000, 300, 0, 0)
        assert pmd.bus.read32(R.IMS) == 0
        peer.close()
        pmd.close()
    finally:
        bus0.close()
        bus1.close()


def test_imissed_when_the_pmd_does_not_poll(emu) -> None:
    bus0, bus1 = VfioUserBus(emu.sock0, 8 << 20), VfioUserBus(emu.sock1, 8 << 20)
    try:
        peer, pmd = Pmd(bus0, rx_count=256, tx_count=256), Pmd(bus1, rx_count=64, tx_count=64)
        total = 0
        for k in range(20):
            mbufs = [peer.alloc().set_data(frame(M1, M0, total + i)) for i in range(128)]
            sent = peer.tx_burst(mbufs)
            for m in mbufs[sent:]:
                m.free()
            total += sent
            peer.bus.read32(R.STATUS)  # a read flushes the posted doorbell: all delivered
        pmd.stats_update()
        missed = pmd.stats().imissed
        assert missed > 0
        got = poll_until(pmd, total - missed, 10)
        assert len(got) + missed == total
        peer.close()
        pmd.close()
    finally:
        bus0.close()
        bus1.close()


def test_echo_process_in_adaptive_mode_sleeps_when_idle(emu) -> None:
    echo = PmdProc("--socket", emu.sock1, "--role", "echo", "--mode", "adaptive", "--interval", "0.2")
    bus0 = VfioUserBus(emu.sock0, 8 << 20)
    try:
        assert echo.event("up")["mac"] == MAC1
        peer = Pmd(bus0, rx_count=64, tx_count=64)
        for i in range(20):  # ping-pong: each frame comes back turned around
            assert peer.send(frame(M1, M0, i))
            assert poll_until(peer, 1, 10) == [frame(M0, M1, i)]
        # idle: the echo process falls asleep on RXT0
        s = echo.event("stats", pred=lambda d: d["ipackets"] == 20 and d["sleeps"] >= 1)
        assert s["opackets"] == 20
        # and wakes on traffic: a frame to a sleeping port raises RXT0 (a few tries, in case
        # one lands in the short polling window between two sleeps)
        for i in range(21, 26):
            time.sleep(0.05)
            assert peer.send(frame(M1, M0, i))
            assert poll_until(peer, 1, 10) == [frame(M0, M1, i)]
            s = echo.event("stats", pred=lambda d, i=i: d["ipackets"] == i)
            if s["interrupts"] >= 1:
                break
        assert s["interrupts"] >= 1 and s["opackets"] == s["ipackets"]
        echo.p.send_signal(signal.SIGTERM)
        done = echo.event("done")
        assert done["ipackets"] == s["ipackets"] and done["mmio_reads"] > 0
        assert echo.p.wait(10) == 0
        peer.close()
    finally:
        echo.close()
        bus0.close()


def test_pmd_restart_after_kill_9(emu) -> None:
    first = PmdProc("--socket", emu.sock1, "--role", "sink", "--mode", "poll")
    try:
        first.event("up")
        first.p.send_signal(signal.SIGKILL)
        first.p.wait(10)
    finally:
        first.close()
    # the emulator reset the device and dropped the dead process's memory; start again
    deadline = time.monotonic() + 10
    while True:
        try:
            bus1 = VfioUserBus(emu.sock1, 8 << 20)
            break
        except BusError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    bus0 = VfioUserBus(emu.sock0, 8 << 20)
    try:
        peer, pmd = Pmd(bus0, rx_count=64, tx_count=64), Pmd(bus1, rx_count=64, tx_count=64)
        frames = [frame(M1, M0, i) for i in range(10)]
        assert peer.tx_burst([peer.alloc().set_data(f) for f in frames]) == 10
        assert poll_until(pmd, 10) == frames
        peer.close()
        pmd.close()
    finally:
        bus0.close()
        bus1.close()


def test_emulator_death_is_a_clear_bus_error(emu) -> None:
    bus1 = VfioUserBus(emu.sock1, 8 << 20, timeout=2.0)
    try:
        pmd = Pmd(bus1, rx_count=64, tx_count=64)
        emu.p.send_signal(signal.SIGKILL)
        emu.p.wait(10)
        assert pmd.rx_burst() == []  # polling memory still works: nothing arrives
        with pytest.raises(BusError):
            pmd.stats_update()
        pmd.close()  # and shutting down does not raise
        assert pmd.pool.available == pmd.pool.num_bufs
    finally:
        bus1.close()


def test_generator_process_feeds_a_polling_pmd(emu) -> None:
    gen = PmdProc("--socket", emu.sock0, "--role", "gen", "--mode", "poll", "--dst", MAC1,
                  "--size", "64", "--interval", "0.2")  # on the wire with the FCS: 60 bytes arrive
    bus1 = VfioUserBus(emu.sock1, 8 << 20)
    try:
        pmd = Pmd(bus1, rx_count=512, tx_count=64)
        gen.event("up")
        want = frame(M1, M0, 0)[:14] + bytes(46)
        reads = pmd.bus.reads
        got = 0
        end = time.monotonic() + 20
        while got < 20000 and time.monotonic() < end:
            for m in pmd.rx_burst(64):
                assert bytes(m) == want
                m.free()
                got += 1
        assert got >= 20000 and pmd.bus.reads == reads  # polled memory only
        gen.p.send_signal(signal.SIGTERM)
        done = gen.event("done")
        assert done["opackets"] >= got and done["ierrors"] == 0
        # the generator waits for room for a whole burst of 64: one TDT write per 64 frames
        assert done["opackets"] == 64 * done["tx_doorbells"] and done["mmio_reads"] > 0
        assert pmd.stats().ipackets == got and pmd.xstats()["rx_doorbells"] <= got // 32 + 1
        pmd.close()
    finally:
        gen.close()
        bus1.close()


@pytest.mark.parametrize("mode", [None, "poll"])
def test_generator_sends_its_count_without_sleeping_in_any_mode(emu, mode: str | None) -> None:
    """The default (adaptive) mode must not put a generator to sleep on an RX interrupt that
    never comes: it sends exactly --count frames with no sleep and no interrupt, then only
    receives (adaptive: sleeping when idle)."""
    count = 1000  # fits the 1024-descriptor RX ring: none can be missed, however late we poll;
    # not a multiple of the 64-frame burst, so the last burst is a short one
    bus1 = VfioUserBus(emu.sock1, 8 << 20)
    pmd = Pmd(bus1, rx_count=1024, tx_count=64)  # receiving before the first frame leaves
    gen = PmdProc("--socket", emu.sock0, "--role", "gen", "--dst", MAC1, "--size", "128",
                  "--count", str(count), "--interval", "0.2", *(["--mode", mode] if mode else []))
    try:
        assert gen.event("up")["mode"] == (mode or "adaptive")
        sent = gen.event("sent")
        # every frame queued without sleeping on RX or taking an interrupt
        assert (sent["opackets"], sent["sleeps"], sent["interrupts"]) == (count, 0, 0), sent
        got, sizes = 0, set()
        end = time.monotonic() + 20
        while got < count and time.monotonic() < end:
            for m in pmd.rx_burst(64):
                sizes.add(len(m))
                m.free()
                got += 1
        assert got == count and sizes == {124}  # 128 on the wire: 124 + the FCS the device strips
        # and no more: after its count the generator only receives
        later = gen.event("stats", pred=lambda d: d["sleeps"] > 0) if mode is None else gen.event("stats")
        assert later["opackets"] == count
        assert pmd.rx_burst(64) == [] and pmd.stats().ipackets == count
        assert pmd.stats_update().get("MPC", 0) == 0
        gen.p.send_signal(signal.SIGTERM)
        assert gen.event("done")["opackets"] == count
        assert gen.p.wait(10) == 0
        pmd.close()
    finally:
        gen.close()
        bus1.close()


@pytest.mark.parametrize("size", ["60", "1519"])
def test_generator_size_is_bytes_on_the_wire(emu, size: str) -> None:
    p = PmdProc("--socket", emu.sock0, "--role", "gen", "--size", size)
    try:
        msg = p.event("error")["message"]
        assert f"--size {size} outside 64..1518" in msg and "FCS included" in msg
        assert p.p.wait(10) == 2
    finally:
        p.close()


def test_pmd_process_reports_a_missing_device_and_a_vanishing_one(emu) -> None:
    p = PmdProc("--socket", os.path.join(emu.dir, "none.sock"))
    try:
        assert "cannot connect" in p.event("error")["message"]
        assert p.p.wait(10) == 1
    finally:
        p.close()
    sink = PmdProc("--socket", emu.sock1, "--role", "sink", "--mode", "adaptive", "--interval", "0.2")
    try:
        sink.event("up")
        emu.p.send_signal(signal.SIGKILL)  # the emulator dies under a running PMD application
        emu.p.wait(10)
        assert "device gone" in sink.event("error")["message"]  # its next statistics read fails
        assert sink.p.wait(10) == 1
    finally:
        sink.close()


@pytest.mark.parametrize("mode, role", [("poll", "sink"), ("poll", "echo"), ("adaptive", "sink")])
def test_pmd_process_exits_soon_after_kill_9_of_the_emulator(emu, mode: str, role: str) -> None:
    """A polling port never reads a register between statistics (--interval 30 here): the
    loop must still notice the transport going away (a look at the socket every 0.1 s, or
    the socket in adaptive mode's wait set), say so with the error event and exit 1 - long
    before its next statistics read would have found out."""
    app = PmdProc("--socket", emu.sock1, "--role", role, "--mode", mode, "--interval", "30")
    try:
        app.event("up")
        emu.p.send_signal(signal.SIGKILL)
        emu.p.wait(10)
        assert "device gone" in app.event("error", timeout=5)["message"]
        assert app.p.wait(5) == 1
    finally:
        app.close()
