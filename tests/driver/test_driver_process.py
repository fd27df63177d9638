"""The kernel-style driver in its own process against emulator processes (real sockets).

Each test starts `python -m nicemu serve` (two devices joined by an in-process `--pair`
cable, or two emulator processes joined by a unix cable for the unplug test) and drivers as
`python -m driver.kernel --socket ...` processes, which report JSON lines on stdout. The
test process itself also drives a device through VfioUserBus for the bring-up test.
Nothing is left behind: every process is reaped and the socket directory removed.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from driver import hw
from driver.e1000 import E1000, E1000Config
from kstack.skbuff import SkBuff, default_pool
from nicemu import regs as R

ROOT = Path(__file__).resolve().parents[2]
MAC0 = "52:54:00:12:34:56"
MAC1 = "52:54:00:12:34:57"
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


class Proc:
    """A child process whose stdout lines are collected by a reader thread."""

    def __init__(self, args: list[str], name: str) -> None:
        self.name = name
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=ENV, cwd=ROOT)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        for line in self.p.stdout:
            self.lines.put(line.rstrip("\n"))

    def line(self, predicate, timeout: float = 20.0) -> str:
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.name}: no matching line in {timeout}s; saw {self.seen[-5:]}; "
                                     f"stderr: {self.stderr_tail()}")
            try:
                ln = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self.p.poll() is not None and self.lines.empty():
                    raise AssertionError(f"{self.name} exited {self.p.returncode}; saw {self.seen[-5:]}; "
                                         f"stderr: {self.stderr_tail()}") from None
                continue
            self.seen.append(ln)
            if predicate(ln):
                return ln

    def event(self, name: str, timeout: float = 20.0, **match) -> dict:
        def pred(ln: str) -> bool:
            try:
                d = json.loads(ln)
            except ValueError:
                return False
            return d.get("event") == name and all(d.get(k) == v for k, v in match.items())

        return json.loads(self.line(pred, timeout))

    def stats(self) -> dict:
        self.p.send_signal(signal.SIGUSR1)
        return self.event("stats")

    def wait_stats(self, cond, timeout: float = 30.0) -> dict:
        """Ask for stats until cond(stats) holds."""
        end = time.monotonic() + timeout
        while True:
            st = self.stats()
            if cond(st):
                return st
            if time.monotonic() > end:
                raise AssertionError(f"{self.name}: condition never held; last stats {st}")
            time.sleep(0.05)

    def stop(self) -> dict | None:
        """SIGTERM; the driver's final stats line (None if it printed none)."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        try:
            self.p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        self._t.join(timeout=5)
        last = None
        while not self.lines.empty():
            ln = self.lines.get()
            self.seen.append(ln)
        for ln in self.seen:
            try:
                d = json.loads(ln)
            except ValueError:
                continue
            if d.get("event") == "stats":
                last = d
        return last

    def stderr_tail(self) -> str:
        if self.p.poll() is None:
            return "(running)"
        try:
            return self.p.stderr.read()[-2000:]
        except (OSError, ValueError):
            return ""

    def kill9(self) -> None:
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(timeout=10)
        self._t.join(timeout=5)


class Lab:
    """Processes and a private socket directory, all cleaned up at the end."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="nkdrv", dir="/tmp"))  # short: AF_UNIX paths
        self.procs: list[Proc] = []

    def emulator_pair(self) -> tuple[str, str]:
        """One emulator process, two devices back to back; returns their socket paths."""
        a, b = str(self.dir / "a.sock"), str(self.dir / "b.sock")
        emu = self.start([sys.executable, "-m", "nicemu", "serve", "--socket", a, "--mac", MAC0,
                          "--socket", b, "--mac", MAC1, "--pair"], "emulator")
        emu.line(lambda ln: ln == "nicemu: ready")
        self.emu = emu
        return a, b

    def start(self, args: list[str], name: str) -> Proc:
        p = Proc(args, name)
        self.procs.append(p)
        return p

    def driver(self, sock: str, *extra: str, name: str = "driver") -> Proc:
        p = self.start([sys.executable, "-m", "driver.kernel", "--socket", sock, *extra], name)
        up = p.event("up")
        p.mac = up["mac"]
        return p

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.p.poll() is None:
                p.stop()
        for p in self.procs:
            for f in (p.p.stdout, p.p.stderr):
                f.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def lab():
    lb = Lab()
    yield lb
    lb.close()
    assert all(p.p.poll() is not None for p in lb.procs)
    assert not lb.dir.exists()


def test_bringup_against_emulator_process(lab):
    from driver.vfio_user_client import VfioUserBus

    a, b = lab.emulator_pair()
    with VfioUserBus(a) as bus, VfioUserBus(b) as bus_b:
        assert hw.probe(bus) == MAC0
        drv = E1000(bus, E1000Config(rx_ring_size=64, tx_ring_size=64))
        assert drv.open() == MAC0 and drv.carrier
        assert bus.read32(R.IMS) == hw.IMS_ENABLE_MASK
        assert bus.read32(R.RDT) == 63  # every buffer but one given to the device
        assert bus.read32(R.RCTL) & (R.Rctl.EN | R.Rctl.BAM) == R.Rctl.EN | R.Rctl.BAM
        assert bus.read32(R.TCTL) & R.Tctl.EN and bus.read32(R.TIPG) == hw.TIPG_DEFAULT
        mac = bytes.fromhex(MAC0.replace(":", ""))
        assert bus.read32(R.RAL(0)) == int.from_bytes(mac[:4], "little")
        assert bus.read32(R.RAH(0)) == int.from_bytes(mac[4:], "little") | R.Rah.AV
        assert bus.config_read(0x04, 2) & R.PciCommand.MASTER
        # the peer device, brought up by a second driver here: a frame crosses the pair
        got: list[SkBuff] = []
        peer = E1000(bus_b, E1000Config(rx_ring_size=64, tx_ring_size=64), receive=got.append)
        assert peer.open() == MAC1
        frame = bytes.fromhex(MAC1.replace(":", "")) + mac + b"\x88\xb5" + bytes(46)
        assert drv.xmit(default_pool().from_bytes(frame)) == 0
        end = time.monotonic() + 10
        while not got and time.monotonic() < end:
            peer.process(0.1)
        assert [s.tobytes() for s in got] == [frame] and peer.stats.interrupts >= 1
        peer.close()
        drv.close()
        assert drv.allocator.allocations == 0 and peer.allocator.allocations == 0


@pytest.mark.parametrize("mode", ["interrupt", "napi"])
def test_frames_both_ways_back_to_back(lab, mode):
    a, b = lab.emulator_pair()
    echo = lab.driver(b, "--mode", mode, "--app", "echo", name="echo")
    n = 500  # fits in the RX ring plus the 48 KB packet buffer: nothing can be missed
    gen = lab.driver(a, "--mode", mode, "--app", "gen", "--count", str(n), "--dst", MAC1, name="gen")
    st = gen.wait_stats(lambda s: s["rx_frames"] >= n)
    assert st["gen_sent"] == n and st["rx_frames"] == n and st["tx_packets"] == n
    est = echo.stop()
    gst = gen.stop()
    assert est["rx_frames"] == n and est["tx_packets"] == n and est["MPC"] == 0
    assert gst["GPRC"] == n and gst["GPTC"] == n and est["GPRC"] == n
    assert est["interrupts"] > 0 and gst["interrupts"] > 0
    if mode == "napi":
        assert est["polls"] >= est["interrupts"] and est["napi_completes"] == est["interrupts"]
    else:
        assert est["polls"] == 0 and est["bottom_halves"] == est["interrupts"]


def test_tx_queue_stops_and_wakes_when_the_ring_fills(lab):
    a, b = lab.emulator_pair()
    lab.driver(b, name="sink")
    n = 3000
    gen = lab.driver(a, "--app", "gen", "--count", str(n), "--tx-ring", "64", "--dst", MAC1, name="gen")
    st = gen.wait_stats(lambda s: s["tx_packets"] == n)
    assert st["gen_sent"] == n and st["GPTC"] == n
    assert st["tx_queue_stops"] > 0 and st["restart_queue"] > 0
    assert st["tx_queue_stops"] == st["restart_queue"] and not st["queue_stopped"]
    assert st["tx_doorbells"] < n  # one TDT write per batch, not per frame


def test_napi_polls_under_load_and_reenables_interrupts_when_idle(lab):
    a, b = lab.emulator_pair()
    # a consumer slower than the generator: the ring always holds a full budget
    rx = lab.driver(b, "--mode", "napi", "--rx-delay", "0.0002", name="rx")
    gen = lab.driver(a, "--app", "gen", "--count", "2000", "--dst", MAC1, name="gen")
    gen.wait_stats(lambda s: s["tx_packets"] == 2000)
    st = rx.wait_stats(lambda s: not s["napi_scheduled"] and s["rx_frames"] > 0
                       and s["rx_packets"] + s["MPC"] == 2000)
    assert st["poll_histogram"][-1] > 0  # polls that took the whole budget stayed in polling
    assert st["napi_completes"] == st["interrupts"]
    assert st["ims"] == hw.IMS_ENABLE_MASK  # idle: interrupts enabled again
    assert st["interrupts"] < st["polls"]
    before = st["interrupts"]
    gen.stop()
    gen2 = lab.driver(a, "--app", "gen", "--count", "1", "--dst", MAC1, name="gen2")
    st = rx.wait_stats(lambda s: s["interrupts"] > before and not s["napi_scheduled"])
    assert st["ims"] == hw.IMS_ENABLE_MASK
    gen2.stop()


def test_rx_overrun_counted_when_the_consumer_is_slow(lab):
    a, b = lab.emulator_pair()
    rx = lab.driver(b, "--rx-ring", "64", "--rx-delay", "0.002", name="slow")
    gen = lab.driver(a, "--app", "gen", "--count", "2000", "--dst", MAC1, name="gen")
    g = gen.wait_stats(lambda s: s["tx_packets"] == 2000)
    assert g["GPTC"] == 2000
    # 63 buffers and a 48 KB packet buffer cannot hold 2000 frames: the rest is missed. Once
    # the slow consumer has drained the ring, every frame is accounted for exactly once.
    # ICR.RXO is latched while the NAPI poll runs masked; the interrupt that follows the poll's
    # IMS write (RXT0 pending too) reads it
    st = rx.wait_stats(lambda s: s["rx_packets"] + s["MPC"] == 2000 and s["rx_overrun_interrupts"] >= 1
                       and not s["napi_scheduled"])
    assert st["rx_no_buffer_count"] > 0 and st["rx_missed_errors"] > 0
    assert st["MPC"] == st["rx_missed_errors"] and st["RNBC"] == st["rx_no_buffer_count"]
    assert st["rx_frames"] == st["rx_packets"] == st["GPRC"] and st["TPR"] == 2000
    assert st["rx_errors"] == 0 and st["alloc_rx_buff_failed"] == 0


def test_lsc_on_cable_unplug(lab):
    """Two emulator processes joined by a unix cable: stopping one unplugs the other's cable."""
    cfg = lab.dir / "unix.yaml"
    cfg.write_text(
        f"runtime_dir: {lab.dir}\n"
        f"devices:\n  nic0:\n    mac: {MAC0}\n  nic1:\n    mac: {MAC1}\n"
        "cables:\n  - kind: unix\n    ends: [nic0, nic1]\n"
    )

    def emulator(proc: str) -> Proc:
        e = lab.start([sys.executable, "-m", "nicemu", "serve", "--config", str(cfg), "--process", proc], proc)
        e.line(lambda ln: ln == "nicemu: ready")
        return e

    emulator("nic0")
    e1 = emulator("nic1")
    drv = lab.driver(str(lab.dir / "nic0.sock"), name="driver")
    if not _carrier_up_seen(drv):  # the link is up once the peer end has said hello
        drv.event("carrier", up=True)
    e1.stop()  # the peer's emulator goes: its end says bye, our link drops
    drv.event("carrier", up=False)
    emulator("nic1")  # plugged in again: hello, link up
    drv.event("carrier", up=True)
    st = drv.stats()
    # up (at open, or when the peer said hello), down, up: exactly three changes
    assert st["carrier"] and st["link_changes"] == 3
    events = [json.loads(ln) for ln in drv.seen if ln.startswith("{")]
    carriers = [d["up"] for d in events if d.get("event") == "carrier"]
    assert carriers == [True, False, True]


def _carrier_up_seen(p: Proc) -> bool:
    for ln in p.seen:
        try:
            d = json.loads(ln)
        except ValueError:
            continue
        if d.get("event") == "carrier" and d.get("up"):
            return True
    return False


def test_driver_restart_after_kill9(lab):
    a, b = lab.emulator_pair()
    rx = lab.driver(b, name="rx1")
    gen = lab.driver(a, "--app", "gen", "--count", "100", "--dst", MAC1, name="gen1")
    rx.wait_stats(lambda s: s["rx_frames"] == 100)
    rx.kill9()  # no close(): the emulator sees the socket drop and resets the device
    gen.stop()
    rx2 = lab.driver(b, name="rx2")
    assert rx2.mac == MAC1
    gen2 = lab.driver(a, "--app", "gen", "--count", "100", "--dst", MAC1, name="gen2")
    st = rx2.wait_stats(lambda s: s["rx_frames"] == 100)
    assert st["GPRC"] == 100 and st["carrier"]
    gen2.stop()
    assert lab.emu.p.poll() is None  # the emulator lived through it


def test_driver_reports_a_vanished_device_and_exits(lab):
    a, b = lab.emulator_pair()
    drv = lab.driver(b, name="driver")
    lab.emu.stop()
    err = drv.event("error")
    assert "gone" in err["message"]
    assert drv.p.wait(timeout=10) == 1


@pytest.mark.parametrize("mode", ["interrupt", "napi"])
@pytest.mark.parametrize("traffic", [False, True])
def test_driver_exits_soon_after_kill9_of_the_emulator(lab, mode, traffic):
    """kill -9 of the emulator, idle or under traffic (NAPI then keeps polling with the
    interrupt masked), and statistics only every 30 s: each driver still sees the socket
    close (it waits on the eventfd and the socket together; a doorbell to a dead peer fails)
    and exits 1 with the error event, long before any statistics read would have told it."""
    a, b = lab.emulator_pair()
    drivers = [lab.driver(b, "--mode", mode, "--stats-interval", "30", name="sink")]
    if traffic:
        drivers.append(lab.driver(a, "--mode", mode, "--app", "gen", "--dst", MAC1,
                                  "--stats-interval", "30", name="gen"))
        drivers[0].wait_stats(lambda s: s["rx_frames"] > 0)
    lab.emu.kill9()
    for drv in drivers:
        assert "gone" in drv.event("error", timeout=5)["message"]
        assert drv.p.wait(timeout=5) == 1


def test_driver_process_rejects_bad_settings(lab):
    a, b = lab.emulator_pair()
    p = lab.start([sys.executable, "-m", "driver.kernel", "--socket", b, "--rx-ring", "100"], "bad")
    err = p.event("error")
    assert "multiple of 8" in err["message"] and p.p.wait(timeout=10) == 2
    p = lab.start([sys.executable, "-m", "driver.kernel", "--socket", str(lab.dir / "none.sock")], "nosock")
    assert "cannot connect" in p.event("error")["message"] and p.p.wait(timeout=10) == 1


def test_gen_size_counts_the_fcs_and_count_0_sends_without_end(lab):
    """--size is bytes on the wire with the FCS, as in driver.pmd and nicemu demo: 128 puts
    124-byte frames in the receiver's buffers (the device strips the FCS). --count 0: no end."""
    a, b = lab.emulator_pair()
    sink = lab.driver(b, name="sink")
    gen = lab.driver(a, "--app", "gen", "--count", "100", "--size", "128", "--dst", MAC1, name="gen")
    st = sink.wait_stats(lambda s: s["rx_frames"] >= 100)
    assert st["rx_frames"] == 100 and st["rx_app_bytes"] == 100 * 124
    gen.stop()
    endless = lab.driver(a, "--app", "gen", "--dst", MAC1, "--tx-ring", "64", name="endless")
    st = endless.wait_stats(lambda s: s["gen_sent"] >= 1000)  # 15 rings' worth: no --count end
    assert st["gen_sent"] >= 1000
    endless.stop()
    for bad, message in (("60", "--size 60 outside 64..1518 (bytes on the wire, FCS included)"),
                         ("1519", "--size 1519 outside 64..1518")):
        p = lab.start([sys.executable, "-m", "driver.kernel", "--socket", b, "--app", "gen",
                       "--size", bad], "bad")
        assert message in p.event("error")["message"] and p.p.wait(timeout=10) == 2


# --- a hostile emulator: the driver trusts no reply -----------------------------------------

def _hostile_emulator(path: str, version_payload: bytes, info_payload: bytes) -> threading.Thread:
    """Serve one connection on `path`, answering VERSION and DEVICE_GET_INFO as given."""
    from nicemu.vfio_user import protocol as vp

    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            conn.settimeout(10)
            while True:
                head = conn.recv(vp.HEADER_SIZE, socket.MSG_WAITALL)
                if len(head) < vp.HEADER_SIZE:
                    return
                msg_id, cmd, size, _, _ = vp.HEADER.unpack(head)
                if size > vp.HEADER_SIZE:
                    conn.recv(size - vp.HEADER_SIZE, socket.MSG_WAITALL)
                payload = version_payload if cmd == vp.Command.VERSION else info_payload
                conn.sendall(vp.pack_message(msg_id, cmd, payload, flags=vp.TYPE_REPLY))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def _version(caps_json: bytes) -> bytes:
    from nicemu.vfio_user import protocol as vp

    return vp.VERSION.pack(vp.VERSION_MAJOR, vp.VERSION_MINOR) + caps_json + b"\0"


@pytest.mark.parametrize("version, info", [
    (_version(b"[" * 5000), b""),  # nested past the JSON parser's recursion
    (_version(b'{"capabilities": 5}'), b""),  # not an object
    (_version(b'{"capabilities": {"max_data_xfer_size": Infinity}}'), b""),  # no integer
    (_version(b'{"capabilities": {"max_data_xfer_size": "x"}}'), b""),
    (_version(b"{}"), b"\x01\x02\x03"),  # DEVICE_GET_INFO of 3 bytes
])
def test_a_malformed_reply_from_the_emulator_is_a_bus_error(lab, version, info):
    from driver.bus import BusError
    from driver.vfio_user_client import VfioUserBus

    path = str(lab.dir / "hostile.sock")
    t = _hostile_emulator(path, version, info)
    with pytest.raises(BusError, match="malformed reply from the emulator"):
        VfioUserBus(path, timeout=5.0)
    t.join(10)
    assert not t.is_alive()


def test_an_emulator_that_dribbles_its_reply_is_cut_off(lab):
    """A reply that comes one byte at a time, each within the per-recv timeout, must still
    end in BusError after about `timeout`, not hold the driver for as long as it dribbles."""
    from driver.bus import BusError
    from driver.vfio_user_client import VfioUserBus
    from nicemu.vfio_user import protocol as vp

    path = str(lab.dir / "slow.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    stop = threading.Event()

    def serve() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            head = conn.recv(vp.HEADER_SIZE, socket.MSG_WAITALL)
            msg_id = vp.HEADER.unpack(head)[0]
            reply = vp.HEADER.pack(msg_id, vp.Command.VERSION, 1000, vp.TYPE_REPLY, 0) + bytes(984)
            for b in reply:  # a byte every 0.1 s: 100 s for the whole reply
                if stop.wait(0.1):
                    return
                conn.sendall(bytes([b]))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with pytest.raises(BusError, match="did not answer VERSION in 0.5 s"):
            VfioUserBus(path, timeout=0.5)
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive()
