"""`nicemu up` with real processes: sockets, clients, frames across cables, and clean stops.

Every test starts `python -m nicemu up CONFIG --runtime-dir <tmp>` and checks afterwards that
no process and no socket is left, whichever way the topology ended (SIGTERM, Ctrl-C, a child
killed, the supervisor killed with SIGKILL, a child that ignores SIGTERM).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time
import uuid
import zlib
from pathlib import Path

import pytest

from nicemu import regs as R

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
START_TIMEOUT = 30.0  # generous: the machine is shared; nothing here measures time
STOP_TIMEOUT = 15.0

MAC0 = "52:54:00:12:34:56"
MAC1 = "52:54:00:12:34:57"


# --- process helpers --------------------------------------------------------------------------


def alive(pid: int) -> bool:
    """True while pid is a process that has not exited (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def wait_for(cond, timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


class Up:
    """A running `nicemu up` with its output in files (no pipe can fill up and block it)."""

    def __init__(self, config: Path, rt: Path, tmp: Path, *extra: str) -> None:
        self.rt = rt
        self.out_path, self.err_path = tmp / "up.out", tmp / "up.err"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nicemu", "up", str(config), "--runtime-dir", str(rt), *extra],
            cwd=tmp, stdout=open(self.out_path, "w"), stderr=open(self.err_path, "w"),
            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.DEVNULL)
        self.children: list[int] = []

    @property
    def out(self) -> str:
        return self.out_path.read_text()

    @property
    def err(self) -> str:
        return self.err_path.read_text()

    def wait_up(self, nprocs: int) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"nicemu up exited with {self.proc.returncode}:\n{self.out}\n{self.err}")
            return " is up (" in self.out

        wait_for(ready, START_TIMEOUT, "nicemu up to be up")
        self.children = children_of(self.proc.pid)
        assert len(self.children) == nprocs, (self.children, self.out)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self) -> int:
        return self.proc.wait(timeout=STOP_TIMEOUT)

    def assert_all_gone(self) -> None:
        for pid in self.children:
            wait_for(lambda: not alive(pid), STOP_TIMEOUT, f"child {pid} to exit")
        socks = [p for p in self.rt.rglob("*")] if self.rt.exists() else []
        assert socks == [], socks

    def kill_everything(self) -> None:
        """Test cleanup, whatever happened: nothing may outlive a test."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.children:
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture
def start_up(tmp_path: Path):
    shm_before = set(os.listdir("/dev/shm"))
    ups: list[Up] = []

    def start(config: Path, *extra: str, rt: Path | None = None) -> Up:
        u = Up(config, rt or tmp_path / "rt", tmp_path, *extra)
        ups.append(u)
        return u

    yield start
    for u in ups:
        u.kill_everything()
    assert set(os.listdir("/dev/shm")) - shm_before == set(), "a segment was left in /dev/shm"


def write_config(tmp_path: Path, text: str, name: str = "topo.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


# --- a minimal driver: rings programmed over the Bus, as conftest does in-process ---------------


def open_bus(path: Path):
    from driver.vfio_user_client import VfioUserBus

    bus = VfioUserBus(str(path), mem_size=1 << 20)
    bus.config_write(0x04, int(R.PciCommand.MEMORY | R.PciCommand.MASTER), size=2)
    return bus


RX_BASE, RX_BUF, TX_BASE, TX_BUF, N = 0x1000, 0x10000, 0x800, 0x80000, 8


def rx_setup(bus) -> None:
    for k in range(N):
        bus.mem.write(RX_BASE + 16 * k, R.RX_DESC.pack(RX_BUF + 2048 * k, 0, 0, 0, 0, 0))
    bus.write32(R.RDBAL, RX_BASE)
    bus.write32(R.RDBAH, 0)
    bus.write32(R.RDLEN, N * 16)
    bus.write32(R.RDH, 0)
    bus.write32(R.RDT, N - 1)
    bus.write32(R.RCTL, int(R.Rctl.EN | R.Rctl.BAM))
    bus.read32(R.STATUS)  # a read flushes the posted writes


def tx_send(bus, frame: bytes) -> None:
    bus.write32(R.TDBAL, TX_BASE)
    bus.write32(R.TDBAH, 0)
    bus.write32(R.TDLEN, N * 16)
    bus.write32(R.TDH, 0)
    bus.write32(R.TDT, 0)
    bus.write32(R.TCTL, int(R.Tctl.EN | R.Tctl.PSP))
    bus.mem.write(TX_BUF, frame)
    cmd = int(R.TxdCmd.EOP | R.TxdCmd.IFCS | R.TxdCmd.RS)
    bus.mem.write(TX_BASE, R.TX_DESC.pack(TX_BUF, len(frame), 0, cmd, 0, 0, 0))
    bus.write32(R.TDT, 1)
    bus.read32(R.STATUS)


def rx_wait(bus, timeout: float = 10.0) -> bytes:
    def dd() -> bool:
        return bool(R.RX_DESC.unpack(bus.mem.read(RX_BASE, 16))[3] & int(R.RxdStatus.DD))

    wait_for(dd, timeout, "a frame in the RX ring")
    _addr, length, _csum, status, errors, _sp = R.RX_DESC.unpack(bus.mem.read(RX_BASE, 16))
    assert status & int(R.RxdStatus.EOP) and errors == 0
    return bus.mem.read(RX_BUF, length)


def frame_for(dst: str = MAC1, src: str = MAC0) -> bytes:
    body = bytes.fromhex(dst.replace(":", "")) + bytes.fromhex(src.replace(":", "")) + b"\x88\xb5"
    return body + b"nicemu up says hello".ljust(46, b"\0")


def send_and_receive(rt: Path) -> None:
    """A client on each device: nic0 transmits, the frame lands in nic1's RX ring, FCS and all."""
    b0, b1 = open_bus(rt / "nic0.sock"), open_bus(rt / "nic1.sock")
    try:
        assert b1.read32(R.STATUS) & int(R.Status.LU)
        rx_setup(b1)
        frame = frame_for()
        tx_send(b0, frame)
        got = rx_wait(b1)
        assert got == frame + struct.pack("<I", zlib.crc32(frame))
    finally:
        b0.close()
        b1.close()


def stats_lines(out: str) -> list[dict]:
    """The SIGUSR1 stats of the emulator processes: complete `nicemu: stats {json}` lines."""
    complete = out[: out.rfind("\n") + 1]
    return [json.loads(line[len("nicemu: stats "):]) for line in complete.splitlines()
            if line.startswith("nicemu: stats ")]


def with_fcs(frame: bytes) -> bytes:
    return frame + struct.pack("<I", zlib.crc32(frame))


def check_socket_modes(rt: Path, names: list[str]) -> None:
    assert stat.S_IMODE(os.stat(rt).st_mode) == 0o700
    for n in names:
        st = os.lstat(rt / f"{n}.sock")
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, n


# --- the tests ---------------------------------------------------------------------------------


def test_pair_up_serves_both_devices_and_sigterm_stops_everything(start_up, tmp_path: Path) -> None:
    up = start_up(CONFIGS / "pair.yaml")
    up.wait_up(nprocs=1)  # a pair cable keeps both devices in one process
    rt = up.rt
    check_socket_modes(rt, ["nic0", "nic1"])
    bus = open_bus(rt / "nic0.sock")
    try:
        ral, rah = bus.read32(R.RAL(0)), bus.read32(R.RAH(0))
        mac = struct.pack("<IH", ral, rah & 0xFFFF)
        assert mac == bytes.fromhex(MAC0.replace(":", ""))
    finally:
        bus.close()
    send_and_receive(rt)
    up.signal(signal.SIGUSR1)  # the pair's devices report their link and cable too
    wait_for(lambda: len(stats_lines(up.out)) == 1, STOP_TIMEOUT, "one stats line")
    devices = stats_lines(up.out)[0]["devices"]
    assert sorted(devices) == ["nic0", "nic1"]
    assert all(d["link"] is True and d["cable"]["kind"] == "pair" for d in devices.values()), devices
    up.signal(signal.SIGTERM)
    assert up.wait() == 0, up.err
    up.assert_all_gone()
    assert not rt.exists()  # the runtime directory it created is removed too
    assert "Traceback" not in up.err
    assert "stopped" in up.out


def test_shm_cable_between_two_processes_and_ctrl_c(start_up) -> None:
    up = start_up(CONFIGS / "shm.yaml")
    up.wait_up(nprocs=2)
    check_socket_modes(up.rt, ["nic0", "nic1"])
    send_and_receive(up.rt)  # crosses from one emulator process to the other over the memfd rings
    up.signal(signal.SIGUSR1)  # passed on: each emulator process prints its counters
    wait_for(lambda: len(stats_lines(up.out)) == 2, STOP_TIMEOUT, "two stats lines")
    stats = stats_lines(up.out)
    assert sorted(s["pid"] for s in stats) == sorted(up.children)
    devices = {name: d for s in stats for name, d in s["devices"].items()}
    assert sorted(devices) == ["nic0", "nic1"]
    assert all(d["link"] and d["dma_errors"] == 0 and d["cable"]["kind"] == "shm"
               for d in devices.values()), devices
    up.signal(signal.SIGINT)
    assert up.wait() == 0, up.err
    up.assert_all_gone()
    assert "Traceback" not in up.err


def test_unix_cable_between_two_processes(start_up) -> None:
    up = start_up(CONFIGS / "unix.yaml")
    up.wait_up(nprocs=2)
    send_and_receive(up.rt)
    up.signal(signal.SIGTERM)
    assert up.wait() == 0, up.err
    up.assert_all_gone()  # the unix cable's own socket files too


@pytest.mark.parametrize("kind", ["shm", "unix"])
def test_a_dying_child_stops_the_topology(start_up, kind: str) -> None:
    up = start_up(CONFIGS / f"{kind}.yaml")
    up.wait_up(nprocs=2)
    victim, other = up.children
    os.kill(victim, signal.SIGKILL)
    assert up.wait() == 1
    assert "was killed by SIGKILL; stopping the others" in up.err
    assert f"pid {victim}" in up.err
    up.assert_all_gone()
    assert not alive(other)
    assert "Traceback" not in up.err


@pytest.mark.parametrize("kind", ["shm", "unix"])
def test_children_follow_a_killed_supervisor(start_up, kind: str) -> None:
    up = start_up(CONFIGS / f"{kind}.yaml")
    up.wait_up(nprocs=2)
    up.signal(signal.SIGKILL)
    up.proc.wait(timeout=STOP_TIMEOUT)
    for pid in up.children:  # PR_SET_PDEATHSIG: SIGTERM, so they still clean up after themselves
        wait_for(lambda: not alive(pid), STOP_TIMEOUT, f"child {pid} to follow the supervisor")
    try:
        wait_for(lambda: not any(up.rt.rglob("*")), STOP_TIMEOUT, "the children to unlink their sockets")
    except AssertionError:
        raise AssertionError(f"left: {list(up.rt.glob('*'))}\nstderr:\n{up.err}\nstdout:\n{up.out}")


def test_a_child_that_ignores_sigterm_is_killed_after_the_timeout(start_up) -> None:
    up = start_up(CONFIGS / "shm.yaml", "--stop-timeout", "1")
    up.wait_up(nprocs=2)
    stuck = up.children[0]
    os.kill(stuck, signal.SIGSTOP)  # a stopped process cannot act on SIGTERM
    up.signal(signal.SIGTERM)
    assert up.wait() == 0, up.err
    assert f"(pid {stuck}) did not stop; killing it" in up.err
    up.assert_all_gone()  # the supervisor removed the socket the killed child could not


def test_a_second_up_of_the_same_topology_is_refused(start_up, tmp_path: Path) -> None:
    first = start_up(CONFIGS / "pair.yaml")
    first.wait_up(nprocs=1)
    other = tmp_path / "second"
    other.mkdir()
    second = Up(CONFIGS / "pair.yaml", first.rt, other)
    try:
        assert second.proc.wait(timeout=START_TIMEOUT) == 1
        assert "already up?" in second.err
        assert "Traceback" not in second.err
    finally:
        second.kill_everything()
    assert all(alive(p) for p in first.children)
    send_and_receive(first.rt)  # the first topology was not disturbed
    first.signal(signal.SIGTERM)
    assert first.wait() == 0


def test_a_child_that_cannot_start_is_reported(start_up, tmp_path: Path) -> None:
    import socket

    p0, p1 = free_udp_ports(2)
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", p1))  # nic1's process cannot bind its cable: no check can see that before
    cfg = write_config(tmp_path, f"""
        devices:
          nic0: {{mac: "{MAC0}"}}
          nic1: {{mac: "{MAC1}"}}
        cables:
          - {{kind: udp, ends: [nic0], local: "127.0.0.1:{p0}", remote: "127.0.0.1:{p1}"}}
          - {{kind: udp, ends: [nic1], local: "127.0.0.1:{p1}", remote: "127.0.0.1:{p0}"}}
    """)
    try:
        up = start_up(cfg)
        assert up.wait() == 1
    finally:
        taken.close()
    assert "process 'nic1'" in up.err and "while starting" in up.err
    assert "udp cable: cannot bind" in up.err and "in use" in up.err  # the child's own reason
    for pid in children_of(up.proc.pid):
        assert not alive(pid)
    up.assert_all_gone()


def test_bad_config_lists_every_problem_and_exits_2(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, """
        devices:
          nic0: {mac: "01:00:5e:00:00:01"}
          nic1: {macc: "52:54:00:12:34:57"}
        cables:
          - {kind: pair, ends: [nic0, nic2]}
    """)
    r = subprocess.run([sys.executable, "-m", "nicemu", "up", str(cfg)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=START_TIMEOUT)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "3 problems" in r.stderr
    assert "devices.nic0.mac (line 3)" in r.stderr and "multicast" in r.stderr
    assert "devices.nic1.macc (line 4): unknown key for a device; did you mean 'mac'?" in r.stderr
    assert "cables[0].ends[1]" in r.stderr and "unknown device 'nic2'" in r.stderr


def test_serve_config_reports_problems_too(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NICEMU_RUNTIME_DIR": str(tmp_path / "rt")}
    cfg = write_config(tmp_path, "devices: {a: {pba: {rx_kb: 70}}}\n")
    r = subprocess.run([sys.executable, "-m", "nicemu", "serve", "--config", str(cfg)],
                       capture_output=True, text=True, env=env, timeout=START_TIMEOUT)
    assert r.returncode == 2 and "devices.a.pba.rx_kb" in r.stderr and "Traceback" not in r.stderr
    # an unknown process, and a shm end whose memory only `nicemu up` can create
    r = subprocess.run([sys.executable, "-m", "nicemu", "serve", "--config", str(CONFIGS / "shm.yaml"),
                        "--process", "nic3"], capture_output=True, text=True, env=env, timeout=START_TIMEOUT)
    assert r.returncode == 2 and "no process 'nic3'" in r.stderr and "did you mean" in r.stderr
    r = subprocess.run([sys.executable, "-m", "nicemu", "serve", "--config", str(CONFIGS / "shm.yaml"),
                        "--process", "nic1"], capture_output=True, text=True, env=env, timeout=START_TIMEOUT)
    assert r.returncode == 2 and "created by `nicemu up`" in r.stderr and "Traceback" not in r.stderr
    assert not list((tmp_path / "rt").glob("*.sock"))


def test_check_prints_the_plan_and_starts_nothing(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "nicemu", "up", str(CONFIGS / "shm.yaml"), "--check",
                        "--runtime-dir", str(tmp_path / "rt")], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=START_TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert "2 processes, 2 devices" in r.stdout
    assert f"nic1  {MAC1}  {tmp_path / 'rt' / 'nic1.sock'}" in r.stdout
    assert "cables[0] shm nic0 - nic1 ring_bytes=1048576" in r.stdout
    assert not (tmp_path / "rt").exists()


# --- build_emulator in this process (what each child runs) -------------------------------------


def test_build_emulator_whole_topology_in_one_process(tmp_path: Path, monkeypatch) -> None:
    from nicemu.topology import build_emulator

    monkeypatch.chdir(tmp_path)
    rt = tmp_path / "rt"
    emu = build_emulator(CONFIGS / "faults.yaml", None, runtime_dir=rt)  # pair + captures + faults
    try:
        assert sorted(emu.servers) == ["nic0", "nic1"]
        assert stat.S_IMODE(os.stat(rt).st_mode) == 0o700
        a, b = emu.servers["nic0"].nic, emu.servers["nic1"].nic
        assert (a.mac, b.mac) == (MAC0, MAC1)
    finally:
        emu.close()
    assert not rt.exists()  # it made the runtime directory, so it removed it
    from nicemu.cable.capture import read_pcap

    for n in ("nic0", "nic1"):  # the captures were opened (relative to the current directory)
        assert read_pcap(tmp_path / f"{n}.pcap")[1] == []


def test_build_emulator_one_process_of_several(tmp_path: Path) -> None:
    from nicemu.topology import build_emulator

    cfg = write_config(tmp_path, f"""
        runtime_dir: {tmp_path / 'rt'}
        devices:
          a: {{process: left, pba: {{rx_kb: 40}}}}
          b: {{process: left}}
          c: {{}}
        cables:
          - {{kind: pair, ends: [a, b]}}
    """)
    emu = build_emulator(cfg, "left")
    try:
        assert sorted(emu.servers) == ["a", "b"]
        assert emu.servers["a"].nic.read32(R.PBA) == (24 << 16) | 40
        assert emu.servers["b"].nic.read32(R.PBA) == R.PBA_DEFAULT
    finally:
        emu.close()
    emu = build_emulator(cfg, "c")
    try:
        nic = emu.servers["c"].nic
        assert not nic.read32(R.STATUS) & int(R.Status.LU)  # no cable: link down
    finally:
        emu.close()


# --- more cable kinds, captures and faults across processes ------------------------------------


def free_udp_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def test_udp_cable_between_two_processes(start_up, tmp_path: Path) -> None:
    p0, p1 = free_udp_ports(2)
    cfg = write_config(tmp_path, f"""
        devices:
          nic0: {{mac: "{MAC0}"}}
          nic1: {{mac: "{MAC1}"}}
        cables:
          - {{kind: udp, ends: [nic0], local: "127.0.0.1:{p0}", remote: "127.0.0.1:{p1}"}}
          - {{kind: udp, ends: [nic1], local: "127.0.0.1:{p1}", remote: "127.0.0.1:{p0}"}}
    """)
    up = start_up(cfg)
    up.wait_up(nprocs=2)
    send_and_receive(up.rt)
    up.signal(signal.SIGTERM)
    assert up.wait() == 0, up.err
    up.assert_all_gone()


def test_captures_and_faults_work_across_processes(start_up, tmp_path: Path) -> None:
    from nicemu.cable.capture import read_pcap

    cfg = write_config(tmp_path, f"""
        devices:
          nic0: {{mac: "{MAC0}"}}
          nic1: {{mac: "{MAC1}"}}
        cables:
          - kind: shm
            ends: [nic0, nic1]
            capture: {{nic0: caps/nic0.pcap, nic1: caps/nic1.pcap}}
            faults:
              nic0: {{corrupt: 1.0, seed: 5}}   # every frame nic0 sends gets a bit flipped
    """)
    (tmp_path / "caps").mkdir()
    up = start_up(cfg)
    up.wait_up(nprocs=2)
    b0, b1 = open_bus(up.rt / "nic0.sock"), open_bus(up.rt / "nic1.sock")
    try:
        rx_setup(b1)
        b1.read32(R.CRCERRS)  # clear on read
        frame = frame_for()
        tx_send(b0, frame)
        wait_for(lambda: b1.read32(R.CRCERRS) == 1, 10.0, "nic1 to count the corrupted frame")
        assert not R.RX_DESC.unpack(b1.mem.read(RX_BASE, 16))[3] & int(R.RxdStatus.DD)  # dropped
    finally:
        b0.close()
        b1.close()
    up.signal(signal.SIGTERM)
    assert up.wait() == 0, up.err
    up.assert_all_gone()
    sent = read_pcap(tmp_path / "caps/nic0.pcap")[1]
    got = read_pcap(tmp_path / "caps/nic1.pcap")[1]
    good = frame + struct.pack("<I", zlib.crc32(frame))
    assert [r.data for r in sent] == [good]  # nic0's port sent it intact ...
    assert len(got) == 1 and got[0].data != good and len(got[0].data) == len(good)  # ... nic1 saw bit flips
    # the files the emulator processes wrote, read by the real tools
    if shutil.which("tshark"):
        for name, want in (("nic0", "1"), ("nic1", "0")):  # eth.fcs.status: 1 good, 0 bad
            r = subprocess.run(["tshark", "-r", str(tmp_path / f"caps/{name}.pcap"), "-o", "eth.check_fcs:TRUE",
                                "-T", "fields", "-e", "eth.fcs.status"], capture_output=True, text=True,
                               timeout=120)
            assert r.returncode == 0 and r.stdout.split() == [want], (name, r.stdout, r.stderr)
    if shutil.which("tcpdump"):
        r = subprocess.run(["tcpdump", "-r", str(tmp_path / "caps/nic0.pcap"), "-nn", "-e"], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0 and "EN10MB" in r.stderr and f"{MAC0} > {MAC1}" in r.stdout, r.stderr


def _have_tap() -> str | None:
    try:
        from nicemu.cable.tap import tap_available
    except ImportError:
        return "nicemu.cable.tap is missing"
    why = tap_available()
    if why is None and subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        why = "ip netns is not available"
    return why


@pytest.fixture
def netns():
    """A network namespace of this test's own, always deleted (and checked gone)."""
    ns = f"nicemu-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
        assert ns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def tap_topology(start_up, tmp_path: Path, ns: str) -> tuple[Up, str]:
    """`nicemu up` of one device whose port is a TAP created inside `ns` (198.18.0.1/24, up)."""
    tap = f"nmup{uuid.uuid4().hex[:8]}"
    cfg = write_config(tmp_path, f"""
        devices:
          nic0: {{mac: "{MAC0}"}}
        cables:
          - {{kind: tap, ends: [nic0], name: {tap}, netns: {ns}}}
    """)
    up = start_up(cfg)
    up.wait_up(nprocs=1)
    for cmd in (["addr", "add", "198.18.0.1/24", "dev", tap], ["link", "set", tap, "up"]):
        subprocess.run(["ip", "-n", ns, *cmd], check=True)
    return up, tap


def tap_exists(ns: str, tap: str) -> bool:
    return subprocess.run(["ip", "-n", ns, "link", "show", tap], capture_output=True).returncode == 0


RAW_RECV = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
    s.bind((sys.argv[1], 0))
    s.settimeout(20)
    print("ready", flush=True)
    print(s.recv(65535).hex(), flush=True)
""")


@pytest.mark.netns
@pytest.mark.skipif(_have_tap() is not None, reason=str(_have_tap()))
def test_tap_cable_in_a_network_namespace(start_up, tmp_path: Path, netns: str) -> None:
    up, tap = tap_topology(start_up, tmp_path, netns)
    bus = open_bus(up.rt / "nic0.sock")
    try:
        rx_setup(bus)
        # The kernel side writes a frame into the TAP (a raw socket inside the namespace) ...
        frame = frame_for(dst=MAC0, src="02:00:00:00:00:01")
        code = (f"import socket; s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); "
                f"s.bind(({tap!r}, 0)); s.send(bytes.fromhex({frame.hex()!r}))")
        subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", code], check=True, timeout=30)
        got = rx_wait(bus)
        assert got == frame + struct.pack("<I", zlib.crc32(frame))  # ... out of the RX ring, FCS added
        # ... and a frame the device transmits is read by a raw socket on the TAP, FCS stripped
        reader = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", RAW_RECV, tap],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert reader.stdout.readline().strip() == "ready"
            sent = frame_for(dst="02:00:00:00:00:01", src=MAC0)
            tx_send(bus, sent)
            assert bytes.fromhex(reader.stdout.readline().strip()) == sent, reader.stderr.read()
        finally:
            if reader.poll() is None:
                reader.kill()
            reader.wait(10)
            reader.stdout.close()
            reader.stderr.close()
    finally:
        bus.close()
    up.signal(signal.SIGTERM)
    assert up.wait() == 0, up.err
    up.assert_all_gone()
    assert not tap_exists(netns, tap)  # the TAP went with its emulator


@pytest.mark.netns
@pytest.mark.skipif(_have_tap() is not None, reason=str(_have_tap()))
@pytest.mark.parametrize("victim", ["child", "supervisor"])
def test_kill_9_with_a_tap_leaves_no_process_socket_or_tap(start_up, tmp_path: Path, netns: str,
                                                           victim: str) -> None:
    up, tap = tap_topology(start_up, tmp_path, netns)
    assert tap_exists(netns, tap)
    (child,) = up.children
    if victim == "child":
        os.kill(child, signal.SIGKILL)
        assert up.wait() == 1
        assert "was killed by SIGKILL" in up.err
    else:
        up.signal(signal.SIGKILL)
        up.proc.wait(timeout=STOP_TIMEOUT)
    wait_for(lambda: not alive(child), STOP_TIMEOUT, "the emulator process to be gone")
    wait_for(lambda: not tap_exists(netns, tap), STOP_TIMEOUT, "the TAP to disappear")
    wait_for(lambda: not any(up.rt.glob("*.sock")), STOP_TIMEOUT, "the sockets to be removed")
    assert tap not in subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout


def test_build_emulator_honours_a_stop_before_run(tmp_path: Path) -> None:
    """A SIGTERM that arrives while a child is still building (before run() owns the signals)
    must still stop it and unlink its sockets, not be lost."""
    from nicemu.topology import build_emulator

    before = signal.getsignal(signal.SIGTERM)
    emu = build_emulator(CONFIGS / "pair.yaml", None, runtime_dir=tmp_path / "rt")
    assert sorted(p.name for p in (tmp_path / "rt").iterdir()) == ["nic0.sock", "nic1.sock"]
    os.kill(os.getpid(), signal.SIGTERM)  # caught by the early handler: remembered, not fatal
    emu.run()  # returns at once and closes
    assert not (tmp_path / "rt").exists()  # sockets unlinked, the directory it made removed
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handler is back


def test_a_second_ctrl_c_kills_at_once(start_up) -> None:
    up = start_up(CONFIGS / "shm.yaml", "--stop-timeout", "600")  # only the second Ctrl-C can end it
    up.wait_up(nprocs=2)
    stuck = up.children[1]
    os.kill(stuck, signal.SIGSTOP)
    up.signal(signal.SIGINT)
    wait_for(lambda: "SIGINT: stopping" in up.out, STOP_TIMEOUT, "the first Ctrl-C to be seen")
    wait_for(lambda: not alive(up.children[0]), STOP_TIMEOUT, "the other child to stop")
    up.signal(signal.SIGINT)
    assert up.wait() == 0, up.err
    assert f"(pid {stuck}) did not stop; killing it" in up.err
    up.assert_all_gone()


def test_build_emulator_names_a_missing_capture_directory(tmp_path: Path) -> None:
    from nicemu.topology import TopologyError, build_emulator

    cfg = write_config(tmp_path, f"""
        runtime_dir: {tmp_path / 'rt'}
        devices: {{a: {{}}, b: {{}}}}
        cables: [{{kind: pair, ends: [a, b], capture: {{b: {tmp_path / 'nowhere' / 'b.pcap'}}}}}]
    """)
    with pytest.raises(TopologyError) as ei:
        build_emulator(cfg)
    assert ei.value.problems[0].path == "cables[0].capture.b"
    assert "does not exist" in ei.value.problems[0].message
    assert not (tmp_path / "rt").exists()  # nothing was created


# --- every example config in configs/ really comes up ------------------------------------------


def _udp_ports_free(*ports: int) -> bool:
    import socket

    for port in ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        finally:
            s.close()
    return True


@pytest.mark.parametrize("name, nprocs", [("pair", 1), ("shm", 2), ("unix", 2), ("udp", 2), ("faults", 1)])
def test_example_config_comes_up_and_carries_a_frame(start_up, name: str, nprocs: int) -> None:
    if name == "udp" and not _udp_ports_free(47601, 47602):
        pytest.skip("configs/udp.yaml's ports 47601/47602 are in use on this host")
    up = start_up(CONFIGS / f"{name}.yaml")  # cwd is the test's tmp dir: captures land there
    up.wait_up(nprocs=nprocs)
    send_and_receive(up.rt)
    up.signal(signal.SIGTERM)
    assert up.wait() == 0, up.err
    up.assert_all_gone()
    assert "Traceback" not in up.err


@pytest.mark.netns
@pytest.mark.skipif(_have_tap() is not None, reason=str(_have_tap()))
def test_example_tap_config_comes_up(start_up) -> None:
    ns = "nicemu-tap"  # the namespace configs/tap.yaml names
    if ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split():
        pytest.skip(f"a network namespace {ns} exists already; not touching it")
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        up = start_up(CONFIGS / "tap.yaml")
        up.wait_up(nprocs=1)
        assert tap_exists(ns, "nm-tap0")
        up.signal(signal.SIGTERM)
        assert up.wait() == 0, up.err
        up.assert_all_gone()
        assert not tap_exists(ns, "nm-tap0")
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def tx_send_many(bus, frames: list[bytes]) -> None:
    """Program the TX ring and send `frames` (at most N - 1) with one TDT write."""
    assert len(frames) < N
    bus.write32(R.TDBAL, TX_BASE)
    bus.write32(R.TDBAH, 0)
    bus.write32(R.TDLEN, N * 16)
    bus.write32(R.TDH, 0)
    bus.write32(R.TDT, 0)
    bus.write32(R.TCTL, int(R.Tctl.EN | R.Tctl.PSP))
    cmd = int(R.TxdCmd.EOP | R.TxdCmd.IFCS | R.TxdCmd.RS)
    for k, frame in enumerate(frames):
        bus.mem.write(TX_BUF + 2048 * k, frame)
        bus.mem.write(TX_BASE + 16 * k, R.TX_DESC.pack(TX_BUF + 2048 * k, len(frame), 0, cmd, 0, 0, 0))
    bus.write32(R.TDT, len(frames))
    bus.read32(R.STATUS)


def rx_collect(bus, count: int, settle: float = 0.3) -> list[bytes]:
    """The frames in the RX ring once `count` have arrived, and nothing more for `settle` s
    (a check that no extra frame comes, not a timing assertion)."""
    def n_done() -> int:
        k = 0
        while k < N - 1 and R.RX_DESC.unpack(bus.mem.read(RX_BASE + 16 * k, 16))[3] & int(R.RxdStatus.DD):
            k += 1
        return k

    wait_for(lambda: n_done() >= count, 10.0, f"{count} frames in the RX ring")
    time.sleep(settle)
    out = []
    for k in range(n_done()):
        length = R.RX_DESC.unpack(bus.mem.read(RX_BASE + 16 * k, 16))[1]
        out.append(bus.mem.read(RX_BUF + 2048 * k, length))
    return out


def test_faults_per_direction_with_seeds_across_processes(start_up, tmp_path: Path) -> None:
    """Each direction of a shm cable between two emulator processes gets its own seeded fault:
    nic0 -> nic1 loses exactly the frames the seed says, nic1 -> nic0 duplicates every frame."""
    import random

    cfg = write_config(tmp_path, f"""
        devices:
          nic0: {{mac: "{MAC0}"}}
          nic1: {{mac: "{MAC1}"}}
        cables:
          - kind: shm
            ends: [nic0, nic1]
            faults:
              nic0: {{drop: 0.5, seed: 11}}
              nic1: {{duplicate: 1.0, seed: 12}}
    """)
    up = start_up(cfg)
    up.wait_up(nprocs=2)
    b0, b1 = open_bus(up.rt / "nic0.sock"), open_bus(up.rt / "nic1.sock")
    try:
        rx_setup(b0)
        rx_setup(b1)
        to1 = [frame_for(dst=MAC1, src=MAC0)[:-1] + bytes([k]) for k in range(7)]
        to0 = [frame_for(dst=MAC0, src=MAC1)[:-1] + bytes([k]) for k in range(3)]
        rng = random.Random(11)  # one draw per frame, dropped below the probability
        kept = [f for f in to1 if not rng.random() < 0.5]
        assert 0 < len(kept) < 7
        tx_send_many(b0, to1)
        tx_send_many(b1, to0)
        assert rx_collect(b1, len(kept)) == [with_fcs(f) for f in kept]
        assert rx_collect(b0, 6) == [with_fcs(f) for f in to0 for _ in range(2)]
    finally:
        b0.close()
        b1.close()
    up.signal(signal.SIGUSR1)
    wait_for(lambda: len(stats_lines(up.out)) == 2, STOP_TIMEOUT, "two stats lines")
    devices = {name: d for st in stats_lines(up.out) for name, d in st["devices"].items()}
    assert devices["nic0"]["cable"]["faults_tx"]["dropped"] == 7 - len(kept)
    assert devices["nic1"]["cable"]["faults_tx"]["duplicated"] == 3
    up.signal(signal.SIGTERM)
    assert up.wait() == 0, up.err
    up.assert_all_gone()


# --- "up" means every child is ready; messages and directories ----------------------------------


@pytest.mark.parametrize("name, nprocs", [("unix", 2), ("shm", 2)])
def test_up_is_printed_after_every_child_is_ready(start_up, name: str, nprocs: int) -> None:
    up = start_up(CONFIGS / f"{name}.yaml")
    up.wait_up(nprocs=nprocs)
    lines = up.out.splitlines()
    is_up = next(i for i, line in enumerate(lines) if " is up (" in line)
    ready = [i for i, line in enumerate(lines) if line == "nicemu: ready"]
    assert len(ready) == nprocs, up.out
    assert max(ready) < is_up, up.out  # each child's "ready" line came before "is up"
    up.signal(signal.SIGTERM)
    assert up.wait() == 0, up.err
    up.assert_all_gone()


def test_wait_ready_needs_the_childs_word_not_only_its_sockets(tmp_path: Path) -> None:
    """A child binds its device sockets before it opens its cables: only its readiness pipe
    says it is done. A pipe closed without a word is a child that is dying."""
    import io

    from nicemu import topology as T
    from nicemu.supervisor import Child, Supervisor

    class FakePopen:
        def __init__(self, pid: int) -> None:
            self.pid, self.returncode = pid, None

        def poll(self):
            return self.returncode

    topo = T.load(write_config(tmp_path, "devices:\n  nic0: {}\n  nic1: {}\n"), runtime_dir=tmp_path / "rt")
    err = io.StringIO()
    sup = Supervisor(topo, ready_timeout=0.3, out=io.StringIO(), err=err)
    r0, w0 = os.pipe()
    r1, w1 = os.pipe()
    c0, c1 = Child("nic0", ("nic0",), FakePopen(10)), Child("nic1", ("nic1",), FakePopen(11))
    c0.ready_fd, c1.ready_fd = r0, r1
    sup.children = [c0, c1]
    try:
        os.write(w0, b"ready\n")
        assert not sup.wait_ready()
        assert c0.ready and not c1.ready
        assert err.getvalue() == "nicemu up: process 'nic1' (devices nic1) not ready after 0.3 s; stopping\n"
        os.close(w1)  # nic1 dies before it is ready
        w1 = None
        c1.popen.returncode = 3
        sup.ready_timeout = 10
        assert not sup.wait_ready()
        assert "process 'nic1' (pid 11, devices nic1) exited with status 3 while starting" in err.getvalue()
    finally:
        for fd in (w0, w1, c0.ready_fd, c1.ready_fd):
            if fd is not None:
                os.close(fd)


def test_up_quotes_only_an_excerpt_of_a_file_that_is_not_a_topology(tmp_path: Path) -> None:
    for cfg in (Path("/etc/passwd"), write_config(tmp_path, "x" * 5000 + "\n" + "y" * 100, "long.yaml")):
        out = subprocess.run([sys.executable, "-m", "nicemu", "up", str(cfg)], cwd=tmp_path, text=True,
                             capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=30)
        assert out.returncode == 2
        first, problem = out.stderr.splitlines()
        assert first == f"nicemu: {cfg}: 1 problem:"
        assert problem.startswith("  (top level): the top level must be a mapping with `devices:` and "
                                  "`cables:`, got a text of ")
        assert problem.endswith("'...") and len(problem) < 200, problem


def test_up_runtime_dir_option_needs_an_existing_parent(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, "devices:\n  nic0: {}\n")
    rdir = tmp_path / "no" / "rt"
    out = subprocess.run([sys.executable, "-m", "nicemu", "up", str(cfg), "--runtime-dir", str(rdir)],
                         cwd=tmp_path, text=True, capture_output=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=30)
    assert out.returncode == 2
    assert out.stderr == (f"nicemu: {cfg}: 1 problem:\n  runtime_dir: the directory {rdir.parent} does not "
                          f"exist; nicemu creates only {rdir} itself (create {rdir.parent} first, or choose "
                          "another path)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["topo.yaml"]


# --- hostile and careless configs (issue 7, defects 5 and 8): refused before anything starts -------


def run_nicemu(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nicemu", *args], cwd=tmp_path, text=True,
                          capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          timeout=START_TIMEOUT)


def assert_refused_before_starting(tmp_path: Path, cfg: Path, fragment: str, *extra: str) -> str:
    """`up --check` and `up` refuse alike: exit 2, one line per problem, no traceback, nothing
    printed of a plan (so no process was started) and nothing created."""
    before = sorted(p.name for p in tmp_path.iterdir())
    for check in (["--check"], []):
        r = run_nicemu(tmp_path, "up", str(cfg), *extra, *check)
        assert r.returncode == 2, (check, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and fragment in r.stderr, r.stderr
        assert r.stdout == "", r.stdout  # not even the plan: no process started
        assert all(len(line) < 400 for line in r.stderr.splitlines()), r.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == before
    return r.stderr


@pytest.mark.parametrize("mode", [0o1777, 0o755])
def test_up_refuses_an_existing_runtime_dir_that_is_not_private_and_leaves_its_mode(tmp_path: Path,
                                                                                     mode: int) -> None:
    """Defect 5: `up` made an existing 1777 runtime directory 0700 (/tmp itself, with
    runtime_dir: /tmp). Only what it creates is its to change."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, mode)
    cfg = write_config(tmp_path, f"runtime_dir: {shared}\ndevices:\n  nic0: {{}}\n")
    err = assert_refused_before_starting(tmp_path, cfg, "runtime_dir: directory")
    assert "accessible to group/other" in err
    assert stat.S_IMODE(os.stat(shared).st_mode) == mode and list(shared.iterdir()) == []
    # the same through --runtime-dir
    cfg2 = write_config(tmp_path, "devices:\n  nic0: {}\n", "plain.yaml")
    assert_refused_before_starting(tmp_path, cfg2, "group/other", "--runtime-dir", str(shared))
    assert stat.S_IMODE(os.stat(shared).st_mode) == mode


def test_up_refuses_a_runtime_dir_of_another_user(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    cfg = write_config(tmp_path, f"runtime_dir: {theirs}\ndevices:\n  nic0: {{}}\n")
    assert_refused_before_starting(tmp_path, cfg, "belongs to uid 65534")


def test_up_check_refuses_what_up_refuses(tmp_path: Path) -> None:
    """Defect 8: `up --check` passed three configs `up` rejected, one of them (a missing capture
    directory) only after an emulator process had started."""
    (tmp_path / "afile").write_text("")
    cases = [
        (f"runtime_dir: {tmp_path}/no/rt\ndevices: {{nic0: {{}}}}\n", f"the directory {tmp_path}/no does not exist"),
        (f"runtime_dir: {tmp_path}/afile\ndevices: {{nic0: {{}}}}\n", f"{tmp_path}/afile is not a directory"),
        (f"runtime_dir: {tmp_path}/rt\ndevices: {{nic0: {{}}, nic1: {{}}}}\ncables:\n"
         f"  - {{kind: pair, ends: [nic0, nic1], capture: {{nic1: {tmp_path}/none/nic1.pcap}}}}\n",
         f"cables[0].capture.nic1: the directory {tmp_path}/none does not exist"),
    ]
    for i, (text, fragment) in enumerate(cases):
        assert_refused_before_starting(tmp_path, write_config(tmp_path, text, f"c{i}.yaml"), fragment)


def test_up_refuses_two_hundred_devices_without_starting_any(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, "devices:\n" + "".join(f"  n{i}: {{}}\n" for i in range(200)))
    assert_refused_before_starting(tmp_path, cfg, "200 devices; a topology may have at most 64",
                                   "--runtime-dir", str(tmp_path / "rt"))


@pytest.mark.parametrize("what", ["fifo", "/dev/zero", "nesting", "bomb"])
def test_up_refuses_hostile_files_quickly_and_without_a_traceback(tmp_path: Path, what: str) -> None:
    """A FIFO blocked forever, /dev/zero was read whole (MemoryError), 10,000 levels of nesting
    were a RecursionError traceback; an alias bomb must be refused, not expanded."""
    if what == "fifo":
        cfg = tmp_path / "fifo.yaml"
        os.mkfifo(cfg)
        fragment = "not a regular file (a FIFO)"
    elif what == "/dev/zero":
        cfg, fragment = Path("/dev/zero"), "not a regular file (a character device)"
    elif what == "nesting":
        cfg = write_config(tmp_path, "devices: " + "[" * 10_000 + "]" * 10_000 + "\n", "deep.yaml")
        fragment = "nested deeper than"
    else:
        levels = ['l0: &l0 [a, a, a, a, a, a, a, a, a, a]'] + [
            f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 9)]
        cfg = write_config(tmp_path, "\n".join(levels) + "\ndevices: {nic0: {}}\n", "bomb.yaml")
        fragment = "once its aliases are expanded"
    assert_refused_before_starting(tmp_path, cfg, fragment, "--runtime-dir", str(tmp_path / "rt"))
