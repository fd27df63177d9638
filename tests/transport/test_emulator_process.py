"""End to end with real processes: `python -m nicemu serve` in one process, a driver
(VfioUserBus) in this one or in a child, over a real AF_UNIX socket; kill -9 of either side.

Every process a test starts is killed and reaped by its fixture; /dev/shm is checked unchanged.
"""
from __future__ import annotations

import errno
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from conftest import RxRing, TxRing, enable_bus_master, make_frame, with_fcs
from driver.bus import BusError
from driver.vfio_user_client import VfioUserBus
from nicemu import regs as R
from nicemu.vfio_user import protocol as p
from nicemu.vfio_user.protocol import Command
from test_vfio_user_server import BAD_REQUESTS, Raw

ROOT = Path(__file__).resolve().parents[2]
MAC_A = "52:54:00:aa:00:01"
MAC_B = "52:54:00:aa:00:02"
MEM = 1 << 20
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "PYTHONWARNINGS": "ignore::RuntimeWarning"}


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    """One line of the child's stdout, read unbuffered (os.read) so select() stays truthful."""
    fd = proc.stdout.fileno()
    end = time.monotonic() + timeout
    line = b""
    while time.monotonic() < end:
        r, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
        if r:
            ch = os.read(fd, 1)
            if not ch:
                break
            if ch == b"\n":
                return line.decode()
            line += ch
    proc.poll()
    proc.errfile.seek(0)
    err = proc.errfile.read()
    raise AssertionError(f"no line from the process in {timeout} s (exit {proc.returncode}): {line!r} {err}")


class Procs:
    """Starts processes and guarantees they are gone at the end (SIGKILL + wait)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str]) -> subprocess.Popen:
        # stderr to a file: a pipe nobody reads could fill and block the emulator's logging
        err = tempfile.TemporaryFile(mode="w+")
        proc = subprocess.Popen(args, cwd=ROOT, env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=err, text=True)
        proc.errfile = err  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def serve(self, *args: str) -> subprocess.Popen:
        proc = self.start([sys.executable, "-m", "nicemu", "serve", *args])
        while True:
            line = _read_line(proc, 20)
            if line.strip() == "nicemu: ready":
                return proc

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            for f in (proc.stdout, proc.errfile):
                if f:
                    f.close()


@pytest.fixture
def procs():
    shm_before = set(os.listdir("/dev/shm"))
    p = Procs()
    yield p
    p.cleanup()
    assert set(os.listdir("/dev/shm")) - shm_before == set(), "a shared-memory segment was left in /dev/shm"


def connect(path: str) -> VfioUserBus:
    """A driver's bus to the device at `path` (no retry: a device whose previous driver is gone,
    even by kill -9 a moment ago, must accept at once)."""
    return VfioUserBus(path, MEM)


# --- the command line ---------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["--help"], ["show", "--help"], ["serve", "--help"], ["up", "--help"]])
def test_help_on_every_command(args):
    out = subprocess.run([sys.executable, "-m", "nicemu", *args], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0 and "usage: nicemu" in out.stdout


def test_every_subcommand_has_help(capsys):
    """Whatever SUBCOMMANDS holds (a new command included), `nicemu CMD --help` exits 0."""
    from nicemu.cli import SUBCOMMANDS, main

    for name, _add, _run in SUBCOMMANDS:
        with pytest.raises(SystemExit) as ei:
            main([name, "--help"])
        assert ei.value.code == 0, name
        assert f"usage: nicemu {name}" in capsys.readouterr().out


def test_show_prints_the_register_file():
    out = subprocess.run([sys.executable, "-m", "nicemu", "show", "--mac", MAC_A], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "PCI 8086:100e" in out.stdout and "BAR0 128 KiB" in out.stdout
    assert f"MAC (EEPROM via EERD) {MAC_A}" in out.stdout
    assert "STATUS      0x00000083  FD|LU|SPEED_1000" in out.stdout
    assert "PBA         0x00100030" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["serve"], "give --socket PATH"),
    (["serve", "--socket", "/tmp/x.sock", "--mac", "zz:00"], "serve: --mac: 'zz:00' is not a MAC address"),
    (["serve", "--socket", "/tmp/x.sock", "--pair"], "--pair joins exactly two devices"),
    (["serve", "--process", "a"], "--process needs --config"),
])
def test_serve_usage_errors(args, message):
    out = subprocess.run([sys.executable, "-m", "nicemu", *args], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert not os.path.exists("/tmp/x.sock")


def test_serve_with_a_bad_config_names_every_problem(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text('devices:\n  nic0: {mac: "zz", colour: red}\n')
    out = subprocess.run([sys.executable, "-m", "nicemu", "serve", "--config", str(cfg)], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "devices.nic0.colour" in out.stderr and "devices.nic0.mac" in out.stderr


def test_serve_config_runs_one_process_of_a_topology(procs, tmp_path):
    cfg = tmp_path / "one.yaml"
    sock = tmp_path / "run" / "nic0.sock"
    cfg.write_text(f'devices:\n  nic0: {{mac: "{MAC_A}", socket: {sock}}}\n')
    proc = procs.serve("--config", str(cfg), "--process", "nic0")
    with connect(str(sock)) as bus:
        assert bus.config_read(0x02, 2) == 0x100E
        assert not bus.read32(R.STATUS) & R.Status.LU  # no cable in this topology: link down
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0 and not sock.exists()


def test_serve_on_a_socket_in_use_fails_clearly(procs, tmp_path):
    sock = str(tmp_path / "nic.sock")
    procs.serve("--socket", sock, "--mac", MAC_A)
    out = subprocess.run([sys.executable, "-m", "nicemu", "serve", "--socket", sock], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "served by another process" in out.stderr


# --- a driver programs a device in another process ------------------------------------------------

def test_driver_programs_a_device_in_another_process(procs, tmp_path):
    sock = str(tmp_path / "run" / "nic0.sock")
    procs.serve("--socket", sock, "--mac", MAC_A)
    assert oct(os.stat(sock).st_mode & 0o777) == "0o600"
    with connect(sock) as bus:
        assert bus.config_read(0x00, 2) == 0x8086 and bus.config_read(0x02, 2) == 0x100E
        words = []
        for addr in range(3):
            bus.write32(R.EERD, addr << 8 | R.Eerd.START)
            words.append(bus.read32(R.EERD) >> 16)
        assert ":".join(f"{w >> s & 0xFF:02x}" for w in words for s in (0, 8)) == MAC_A
        enable_bus_master(bus)
        bus.write32(R.IMS, R.Icr.TXDW)
        tx = TxRing(bus).setup()
        frames = [make_frame(dst=b"\xff" * 6, size=60 + 10 * i) for i in range(5)]
        tx.send(frames)
        assert bus.wait_irq(5.0)  # TXDW for the RS descriptors
        assert bus.read32(R.TDH) == 5
        assert all(tx.sta(k) & R.TxdSta.DD for k in range(5))
        assert bus.read32(R.GPTC) == 5 and bus.read32(R.TPT) == 5
        assert bus.read32(R.BPTC) == 5
        octets = bus.read32(R.GOTCL) | bus.read32(R.GOTCH) << 32
        assert octets == sum(len(f) + 4 for f in frames)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_the_emulator_and_unlinks_its_socket(procs, tmp_path, sig):
    sock = str(tmp_path / "run" / "nic0.sock")
    proc = procs.serve("--socket", sock)
    bus = connect(sock)
    proc.send_signal(sig)
    assert proc.wait(10) == 0
    assert not os.path.exists(sock) and not os.path.exists(tmp_path / "run")
    with pytest.raises(BusError):
        bus.read32(R.STATUS)
    bus.close()


CHILD_DRIVER = textwrap.dedent("""
    import sys, time
    from driver.vfio_user_client import VfioUserBus
    bus = VfioUserBus(sys.argv[1], 1 << 20)
    bus.config_write(0x04, 0x6, 2)
    bus.write32(0x0410, 0xABCD)          # TIPG
    bus.write32(0x00D0, 0x1)             # IMS
    assert bus.read32(0x0410) == 0xABCD
    print("programmed", flush=True)
    time.sleep(60)
""")


def test_kill9_of_the_driver_resets_the_device_for_the_next(procs, tmp_path):
    sock = str(tmp_path / "nic0.sock")
    procs.serve("--socket", sock, "--mac", MAC_A)
    child = procs.start([sys.executable, "-c", CHILD_DRIVER, sock])
    assert _read_line(child, 20).strip() == "programmed"
    child.kill()
    child.wait(10)
    with connect(sock) as bus:  # accepted at once: the emulator sees the hang-up first
        assert bus.read32(R.TIPG) == 0 and bus.read32(R.IMS) == 0
        assert bus.config_read(0x04, 2) & R.PciCommand.MASTER == 0
        tx = TxRing(bus)
        enable_bus_master(bus)
        tx.setup().send([make_frame(size=60)])
        assert bus.read32(R.TDH) == 1 and bus.read32(R.GPTC) == 1


def test_kill9_of_the_emulator_gives_the_driver_bus_errors(procs, tmp_path):
    sock = str(tmp_path / "nic0.sock")
    proc = procs.serve("--socket", sock)
    bus = connect(sock)
    bus.write32(R.IMS, R.Icr.TXDW)
    assert bus.read32(R.IMS) == R.Icr.TXDW
    proc.kill()
    proc.wait(10)
    t0 = time.monotonic()
    with pytest.raises(BusError, match="emulator gone"):
        bus.wait_irq(30.0)  # would sleep 30 s if the socket were not watched
    assert time.monotonic() - t0 < 5
    with pytest.raises(BusError, match="emulator gone"):
        bus.read32(R.STATUS)
    with pytest.raises(BusError, match="emulator gone"):
        bus.write32(R.TIPG, 1)
    bus.close()
    # a new emulator on the same path replaces the stale socket kill -9 left
    procs.serve("--socket", sock)
    with connect(sock) as bus2:
        assert bus2.read32(R.STATUS) & R.Status.FD


def test_back_to_back_pair_in_one_emulator_process(procs, tmp_path):
    sa, sb = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    procs.serve("--socket", sa, "--mac", MAC_A, "--socket", sb, "--mac", MAC_B, "--pair")
    with connect(sa) as a, connect(sb) as b:
        enable_bus_master(a)
        enable_bus_master(b)
        rx = RxRing(b).setup()
        b.write32(R.IMS, R.Icr.RXT0)
        tx = TxRing(a).setup()
        frame = make_frame(dst=bytes.fromhex(MAC_B.replace(":", "")), src=bytes.fromhex(MAC_A.replace(":", "")),
                           size=80)
        tx.send([frame])
        assert a.read32(R.TDH) == 1
        assert b.wait_irq(5.0)
        assert b.read32(R.RDH) == 1
        assert rx.desc(0)[3] & R.RxdStatus.DD
        assert rx.data(0) == with_fcs(frame)
        assert b.read32(R.GPRC) == 1 and a.read32(R.GPTC) == 1


# --- two emulator processes joined by a cable (nicemu up) -------------------------------------------

TWO_PROCESS_CONFIG = """
devices:
  nic0: {{mac: "{a}"}}
  nic1: {{mac: "{b}"}}
cables:
  - kind: {kind}
    ends: [nic0, nic1]
"""


UDP_CONFIG = """
devices:
  nic0: {{mac: "{a}"}}
  nic1: {{mac: "{b}"}}
cables:
  - {{kind: udp, ends: [nic0], local: "127.0.0.1:{p0}", remote: "127.0.0.1:{p1}"}}
  - {{kind: udp, ends: [nic1], local: "127.0.0.1:{p1}", remote: "127.0.0.1:{p0}"}}
"""


def _free_udp_ports(n: int) -> list[int]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.parametrize("kind", ["shm", "unix", "udp"])
def test_frame_crosses_a_cable_between_two_emulator_processes(procs, tmp_path, kind):
    cfg = tmp_path / f"{kind}.yaml"
    if kind == "udp":  # over loopback only
        p0, p1 = _free_udp_ports(2)
        cfg.write_text(UDP_CONFIG.format(a=MAC_A, b=MAC_B, p0=p0, p1=p1))
    else:
        cfg.write_text(TWO_PROCESS_CONFIG.format(a=MAC_A, b=MAC_B, kind=kind))
    run = tmp_path / "run"
    sup = procs.start([sys.executable, "-m", "nicemu", "up", str(cfg), "--runtime-dir", str(run)])
    sa, sb = str(run / "nic0.sock"), str(run / "nic1.sock")
    end = time.monotonic() + 30
    while not (os.path.exists(sa) and os.path.exists(sb)):
        assert sup.poll() is None, "nicemu up exited"
        assert time.monotonic() < end, "sockets did not appear"
        time.sleep(0.05)
    with connect_when_up(sa) as a, connect_when_up(sb) as b:
        enable_bus_master(a)
        enable_bus_master(b)
        rx = RxRing(b).setup()
        b.write32(R.IMS, R.Icr.RXT0)
        tx = TxRing(a).setup()
        frames = [make_frame(dst=bytes.fromhex(MAC_B.replace(":", "")), size=64 + i) for i in range(3)]
        tx.send(frames)
        got = 0
        end = time.monotonic() + 10
        while got < 3 and time.monotonic() < end:  # one interrupt may cover several frames
            b.wait_irq(1.0)
            b.read32(R.ICR)
            got = b.read32(R.RDH)
        assert got == 3
        assert [rx.data(k) for k in range(3)] == [with_fcs(f) for f in frames]
        assert b.read32(R.GPRC) == 3 and a.read32(R.GPTC) == 3
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(20) == 0
    assert not os.path.exists(sa) and not os.path.exists(sb)


def connect_when_up(path: str, timeout: float = 20.0) -> VfioUserBus:
    """Connect once the socket accepts (`nicemu up` reports no readiness on stdout; a child
    may still be between bind and listen)."""
    end = time.monotonic() + timeout
    while True:
        try:
            return connect(path)
        except BusError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


# --- what a driver cannot see in registers: DMA errors, in the log and the SIGUSR1 stats -------

def read_stats(proc: subprocess.Popen) -> dict:
    """SIGUSR1 -> the emulator prints one `nicemu: stats {json}` line; return the JSON."""
    proc.send_signal(signal.SIGUSR1)
    line = _read_line(proc, 20)
    assert line.startswith("nicemu: stats "), line
    return json.loads(line[len("nicemu: stats "):])


OUTSIDE = 0x4000_0000  # far beyond the 1 MiB the driver DMA_MAPs at bus address 0


def test_descriptors_outside_the_mapping_are_counted_dma_errors_across_processes(procs, tmp_path):
    sa, sb = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    proc = procs.serve("--socket", sa, "--mac", MAC_A, "--socket", sb, "--mac", MAC_B, "--pair")
    with connect(sa) as a, connect(sb) as b:
        enable_bus_master(a)
        enable_bus_master(b)
        rx = RxRing(b, n=8).setup()
        b.mem.write(rx.base, R.RX_DESC.pack(OUTSIDE, 0, 0, 0, 0, 0))  # b's first RX buffer: unmapped
        tx = TxRing(a, n=8).setup()
        frame = make_frame(dst=bytes.fromhex(MAC_B.replace(":", "")), size=64, fcs=False)[:60]
        cmd = int(R.TxdCmd.EOP | R.TxdCmd.IFCS | R.TxdCmd.RS)
        # descriptor 0: a buffer outside the mapping (skipped, never read); 1: a good frame
        a.mem.write(tx.buf_base + 2048, frame)
        a.mem.write(tx.base, R.TX_DESC.pack(OUTSIDE, 60, 0, cmd, 0, 0, 0))
        a.mem.write(tx.base + 16, R.TX_DESC.pack(tx.buf_base + 2048, 60, 0, cmd, 0, 0, 0))
        a.write32(R.TDT, 2)
        assert a.read32(R.TDH) == 2  # both descriptors consumed ...
        assert a.read32(R.GPTC) == 1  # ... one frame sent
        assert b.read32(R.RDH) == 0 and not rx.desc(0)[3] & R.RxdStatus.DD  # b's unmapped buffer: dropped
        stats = read_stats(proc)
        assert stats["pid"] == proc.pid
        assert stats["devices"]["nic0"]["dma_errors"] == 1 and stats["devices"]["nic0"]["client"]
        assert stats["devices"]["nic1"]["dma_errors"] == 1 and stats["devices"]["nic1"]["rx_dropped"] == 1
        assert stats["devices"]["nic0"]["dma_regions"] == 1
        # the emulator goes on: with the buffer fixed, the next frame lands
        b.mem.write(rx.base, R.RX_DESC.pack(rx.buf_base, 0, 0, 0, 0, 0))
        a.mem.write(tx.base + 32, R.TX_DESC.pack(tx.buf_base + 2048, 60, 0, cmd, 0, 0, 0))
        a.write32(R.TDT, 3)
        assert a.read32(R.TDH) == 3 and b.read32(R.RDH) == 1
        assert rx.desc(0)[3] & R.RxdStatus.DD and rx.data(0) == with_fcs(frame)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    proc.errfile.seek(0)
    log = proc.errfile.read()
    assert "nic0: 1 DMA error(s)" in log and "nic1: 1 DMA error(s)" in log, log
    assert "Traceback" not in log


# --- broken messages to an emulator in another process: it keeps serving -------------------------

def test_bad_messages_across_processes_get_errors_and_the_emulator_keeps_serving(procs, tmp_path):
    sock, other = str(tmp_path / "nic0.sock"), str(tmp_path / "nic1.sock")
    proc = procs.serve("--socket", sock, "--mac", MAC_A, "--socket", other, "--mac", MAC_B)
    neighbour = connect(other)  # a driver on the other device of the same process
    neighbour.write32(R.TIPG, 0x77)
    raw = Raw(sock)
    status = raw.read32(R.STATUS)
    # every malformed request of the in-process suite: wrong sizes, unknown commands, bad
    # regions, offsets out of range ... each an Error reply, and the stream stays in step
    for name, err, command, payload in BAD_REQUESTS:
        hdr, body = raw.request(command, payload)
        assert hdr[3] == p.REPLY_ERROR and hdr[4] == err and body == b"", name
    # an oversized payload: refused unread (E2BIG) and skipped
    size = p.MAX_MSG_SIZE + 4096
    msg_id = raw.send(Command.REGION_WRITE, p.REGION_ACCESS.pack(0, 0, size - 32) + bytes(size - 32))
    assert raw.recv()[0] == (msg_id, Command.REGION_WRITE, 16, p.REPLY_ERROR, errno.E2BIG)
    # a posted write out of range: no reply (it is posted), counted
    raw.send(Command.REGION_WRITE, p.REGION_ACCESS.pack(0x20000, 0, 4) + bytes(4), flags=p.Flags.NO_REPLY)
    assert raw.read32(R.STATUS) == status
    # a second client while this one is served: EBUSY, and the first is undisturbed
    with pytest.raises(BusError, match="busy"):
        connect(sock)
    assert raw.read32(R.STATUS) == status
    stats = read_stats(proc)["devices"]["nic0"]
    assert stats["error_replies"] == len(BAD_REQUESTS) + 1
    assert stats["posted_errors"] == 1 and stats["clients_refused"] == 1
    # a short header (size field below 16): an Error reply, then a clean disconnect
    raw.sock.sendall(p.HEADER.pack(1, Command.REGION_READ, 8, 0, 0))
    assert p.HEADER.unpack(raw.recv_exact(16))[3:] == (p.REPLY_ERROR, errno.EINVAL)
    assert raw.closed_by_peer()
    raw.close()
    # clients that disconnect mid-message: inside the header, and inside the payload
    for partial in (b"\x01\x00\x09", p.HEADER.pack(9, Command.REGION_WRITE, 36, 0, 0) + bytes(7)):
        with connect(sock) as bus:
            bus.write32(R.TIPG, 0x1234)
            assert bus.read32(R.TIPG) == 0x1234
            bus.sock.sendall(partial)
        with connect(sock) as bus:  # accepted, and the device was reset for it
            assert bus.read32(R.TIPG) == 0 and bus.read32(R.STATUS) == status
    assert proc.poll() is None
    for _ in range(50):  # the last client's hang-up and our signal race: ask until it is seen
        stats = read_stats(proc)["devices"]["nic0"]
        if not stats["client"]:
            break
        time.sleep(0.02)
    assert stats["clients_served"] == 5 and not stats["client"] and stats["dma_regions"] == 0
    # the other device of the process never noticed
    assert neighbour.read32(R.TIPG) == 0x77 and neighbour.config_read(0x02, 2) == 0x100E
    neighbour.close()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    proc.errfile.seek(0)
    assert "Traceback" not in proc.errfile.read()


# --- hostile clients (issue 7): what an attack run did, and what the emulator must do instead --

def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _memfd_mappings(pid: int) -> list[str]:
    """The emulator's mappings of memfds (a driver's DMA memory); it creates none itself."""
    with open(f"/proc/{pid}/maps") as f:
        return [line.strip() for line in f if "/memfd:" in line]


def _send_fds_retrying(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """send_fds, waiting while the kernel refuses more fds in flight (ETOOMANYREFS: the
    per-user limit of fds sent but not yet received is RLIMIT_NOFILE)."""
    for _ in range(2000):
        try:
            socket.send_fds(sock, [data], fds)
            return
        except OSError as e:
            if e.errno != errno.ETOOMANYREFS:
                raise
            time.sleep(0.001)
    raise AssertionError("the emulator does not take the fds in flight")


@pytest.mark.parametrize("command", [Command.REGION_WRITE, Command.DMA_MAP], ids=["no-fd-command", "DMA_MAP"])
def test_fds_trickled_into_one_message_are_bounded(procs, tmp_path, command):
    """The attack: a large header, then 1-byte pieces with 8 fds each (20,000 fds). The
    emulator must hold at most max_msg_fds for the message, drop the client, and keep the
    other device answering throughout."""
    sock, other = str(tmp_path / "nic0.sock"), str(tmp_path / "nic1.sock")
    proc = procs.serve("--socket", sock, "--mac", MAC_A, "--socket", other, "--mac", MAC_B)
    neighbour = connect(other)
    neighbour.write32(R.TIPG, 0x77)
    raw = Raw(sock)
    base = _fd_count(proc.pid)  # the listeners, the neighbour's connection and memfd, raw's connection
    raw.sock.sendall(p.HEADER.pack(7, command, 1 << 20, 0, 0))
    r, w = os.pipe()
    peak, pieces = 0, 0
    try:
        for pieces in range(1, 2501):  # 20,000 fds if nothing stops it
            _send_fds_retrying(raw.sock, b"\0", [r, w] * 4)
            if pieces % 25 == 0:
                peak = max(peak, _fd_count(proc.pid))
                assert neighbour.read32(R.TIPG) == 0x77
        raise AssertionError("the emulator took 20,000 fds for one message")
    except (BrokenPipeError, ConnectionResetError):
        pass  # dropped: what must happen
    finally:
        os.close(r)
        os.close(w)
    # the message's fds (<= max_msg_fds) plus, for an instant, one read's worth of ancillary
    # fds before the server drops the client: MAX_HELD_FDS, never the 20,000
    from nicemu.vfio_user.server import MAX_HELD_FDS
    assert peak <= base + MAX_HELD_FDS
    # the Error reply (id 0, command 0) if it got out before the close, then EOF
    try:
        data = raw.sock.recv(64)
        assert data in (b"", p.pack_error(0, 0, errno.EINVAL)), data
    except ConnectionResetError:
        pass
    raw.close()
    assert neighbour.read32(R.TIPG) == 0x77
    for _ in range(100):  # the drop and our close race with the stats signal: ask until seen
        stats = read_stats(proc)["devices"]["nic0"]
        if not stats["client"]:
            break
        time.sleep(0.02)
    assert stats["clients_dropped"] == 1 and stats["fds_refused"] == 2 * p.MAX_MSG_FDS, stats
    assert _fd_count(proc.pid) == base - 1  # raw's connection and every fd it sent are gone
    with connect(sock) as bus:  # and the device serves the next driver
        assert bus.read32(R.STATUS) & R.Status.FD
    neighbour.close()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    proc.errfile.seek(0)
    assert "Traceback" not in proc.errfile.read()


def test_accept_failing_with_emfile_backs_off_and_is_logged_once(procs, tmp_path):
    """Out of descriptors, accept() fails and the listening socket stays readable: the
    emulator must stop polling it for a while (not spin and log at full speed), keep serving
    the other device, and accept again once descriptors are free."""
    import resource

    sock, other = str(tmp_path / "nic0.sock"), str(tmp_path / "nic1.sock")
    proc = procs.serve("--socket", sock, "--mac", MAC_A, "--socket", other, "--mac", MAC_B)
    neighbour = connect(other)
    neighbour.write32(R.TIPG, 0x77)
    soft, hard = resource.prlimit(proc.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (_fd_count(proc.pid), hard))  # no fd is free
    waiting = []
    try:
        for _ in range(3):  # queued by the kernel; the emulator cannot accept them
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(sock)
            waiting.append(s)
        for _ in range(40):  # meanwhile the other device answers
            assert neighbour.read32(R.TIPG) == 0x77
            time.sleep(0.01)
        stats = read_stats(proc)["devices"]["nic0"]
        # a few retries with a doubling backoff; a loop spinning on accept() makes thousands
        assert 1 <= stats["accept_errors"] < 40, stats
    finally:
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (soft, hard))
    # descriptors are back: the first waiting client is accepted and served, the others EBUSY
    first = waiting[0]
    first.sendall(p.HEADER.pack(1, Command.VERSION, 16 + 4, 0, 0) + struct.pack("=HH", 0, 1))
    hdr = p.HEADER.unpack(first.recv(16))
    assert hdr[0] == 1 and hdr[3] == p.MsgType.REPLY
    for s in waiting[1:]:
        assert s.recv(16) == p.pack_error(0, 0, errno.EBUSY)
    for s in waiting:
        s.close()
    neighbour.close()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    proc.errfile.seek(0)
    log = proc.errfile.read()
    assert log.count("nic0: accept failed") == 1, log
    assert log.count("nic0: accepting connections again") == 1, log
    assert "Traceback" not in log


KILLED_DRIVER = textwrap.dedent("""
    import sys, time
    from driver.vfio_user_client import VfioUserBus
    bus = VfioUserBus(sys.argv[1], 128 << 20)
    bus.config_write(0x04, 0x6, 2)       # bus master on: the engine takes pointers into the memory
    bus.write32(0x2818, 0)               # an RDT doorbell
    assert bus.read32(0x0008) & 1        # STATUS: the writes are done
    print("mapped", flush=True)
    time.sleep(60)
""")


def test_a_killed_clients_memory_is_unmapped_at_once(procs, tmp_path):
    sock = str(tmp_path / "nic0.sock")
    proc = procs.serve("--socket", sock, "--mac", MAC_A)
    child = procs.start([sys.executable, "-c", KILLED_DRIVER, sock])
    assert _read_line(child, 20).strip() == "mapped"
    assert len(_memfd_mappings(proc.pid)) == 1  # the driver's 128 MiB
    child.kill()
    child.wait(10)
    for _ in range(100):  # until the emulator has seen the hang-up: no doorbell, no new client
        stats = read_stats(proc)["devices"]["nic0"]
        if not stats["client"]:
            break
        time.sleep(0.02)
    assert stats["dma_regions"] == 0
    assert _memfd_mappings(proc.pid) == []  # unmapped (and its fd closed) at once
    assert not any("memfd:" in os.readlink(f"/proc/{proc.pid}/fd/{fd}")
                   for fd in os.listdir(f"/proc/{proc.pid}/fd"))
