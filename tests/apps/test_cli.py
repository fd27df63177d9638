"""The `nicemu` command as a user runs it: exact messages and exit statuses of `serve` and
`show`, what `serve` creates on disk and that it removes all of it, and the SIGUSR1 stats line.

Every process a test starts is stopped and reaped here; every test checks the directories it
gave the command are left as they were.
"""
from __future__ import annotations

import json
import os
import select
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from nicemu import topology as T

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "PYTHONWARNINGS": "ignore::RuntimeWarning"}
TIMEOUT = 30.0  # generous: the machine is shared; nothing here measures time


def nicemu(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nicemu", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=TIMEOUT)


class Serving:
    """A `nicemu serve` process, up once it printed `nicemu: ready`; always reaped."""

    def __init__(self, *args: str) -> None:
        self.err_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"nicemu-cli-{uuid.uuid4().hex}.err"
        self.proc = subprocess.Popen([sys.executable, "-m", "nicemu", "serve", *args], cwd=ROOT, env=ENV,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=open(self.err_path, "w"))
        self.lines: list[str] = []
        self._buf = b""
        while "nicemu: ready" not in self.lines:
            self.lines.append(self.read_line())

    def read_line(self, timeout: float = TIMEOUT) -> str:
        fd = self.proc.stdout.fileno()
        end = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            r, _, _ = select.select([fd], [], [], max(0.0, left))
            chunk = os.read(fd, 4096) if r else b""
            if not chunk:
                raise AssertionError(f"no line from nicemu serve (exit {self.proc.poll()}): {self.err}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    @property
    def err(self) -> str:
        return self.err_path.read_text()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(TIMEOUT)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.err_path.unlink(missing_ok=True)


@pytest.fixture
def serve():
    started: list[Serving] = []

    def start(*args: str) -> Serving:
        s = Serving(*args)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# --- where sockets go: one directory level created, all of it removed (finding 1) -------------------


def test_serve_refuses_a_socket_whose_directory_has_no_parent(tmp_path: Path) -> None:
    sock = tmp_path / "missing" / "dir" / "nic0.sock"
    out = nicemu("serve", "--socket", str(sock))
    assert out.returncode == 2
    assert out.stderr == (f"nicemu: serve: --socket {sock}: the directory {tmp_path / 'missing'} does not "
                          f"exist; nicemu creates only the socket's own directory, {sock.parent} (create "
                          f"{tmp_path / 'missing'} first, or choose another path)\n")
    assert tree(tmp_path) == []


def test_serve_creates_only_the_sockets_own_directory_and_removes_it(serve, tmp_path: Path) -> None:
    a, b = tmp_path / "sub" / "a.sock", tmp_path / "sub" / "b.sock"  # two sockets, one new directory
    s = serve("--socket", str(a), "--socket", str(b))
    assert stat.S_IMODE(os.stat(tmp_path / "sub").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(a).st_mode) == 0o600
    assert s.stop() == 0, s.err
    assert tree(tmp_path) == []  # the directory goes too, though two servers used it
    assert s.err == ""


def test_serve_leaves_an_existing_socket_directory(serve, tmp_path: Path) -> None:
    d = tmp_path / "mine"
    d.mkdir(mode=0o700)
    s = serve("--socket", str(d / "nic0.sock"))
    assert s.stop() == 0
    assert d.is_dir() and stat.S_IMODE(os.stat(d).st_mode) == 0o700 and tree(d) == []


# --- who may write to the socket's directory (issue 7, defect 6) ----------------------------------


def assert_serve_refuses_dir(d: Path, fragment: str) -> None:
    """`serve --socket` in `d` exits 2 naming why, binds nothing and leaves `d` as it was."""
    mode, owner = stat.S_IMODE(os.stat(d).st_mode), os.stat(d).st_uid
    sock = d / "nic0.sock"
    out = nicemu("serve", "--socket", str(sock))
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"nicemu: serve: --socket {sock}: ") and fragment in out.stderr, out.stderr
    assert len(out.stderr.splitlines()) == 1 and "Traceback" not in out.stderr
    assert out.stdout == "" and list(d.iterdir()) == []
    assert (stat.S_IMODE(os.stat(d).st_mode), os.stat(d).st_uid) == (mode, owner)


@pytest.mark.parametrize("mode", [0o755, 0o777, 0o700])
def test_serve_refuses_a_socket_directory_another_user_owns(tmp_path: Path, mode: int) -> None:
    """The squatter owned the directory and could write to it: it renamed the socket away,
    bound its own and read the driver's first bytes."""
    d = tmp_path / "squat"
    d.mkdir()
    os.chmod(d, mode)
    os.chown(d, 65534, 65534)
    assert_serve_refuses_dir(d, "belongs to uid 65534, not to us")


@pytest.mark.parametrize("mode", [0o1777, 0o777, 0o770])
def test_serve_refuses_a_socket_directory_others_can_write(tmp_path: Path, mode: int) -> None:
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, mode)
    assert_serve_refuses_dir(d, "accessible to group/other")


def test_serve_refuses_a_socket_directory_in_a_parent_others_can_write(tmp_path: Path) -> None:
    parent = tmp_path / "open"
    parent.mkdir()
    os.chmod(parent, 0o777)
    (parent / "mine").mkdir(mode=0o700)
    assert_serve_refuses_dir(parent / "mine", "without the sticky bit")
    out = nicemu("serve", "--socket", str(parent / "new" / "nic0.sock"))  # nor is one made there
    assert out.returncode == 2 and "sticky" in out.stderr and tree(parent) == ["mine"]


def test_serve_config_refuses_a_runtime_dir_others_can_write(tmp_path: Path) -> None:
    rt = tmp_path / "rt"
    rt.mkdir()
    os.chmod(rt, 0o1777)
    cfg = tmp_path / "rt.yaml"
    cfg.write_text(f"runtime_dir: {rt}\ndevices:\n  nic0: {{}}\n")
    out = nicemu("serve", "--config", str(cfg))
    assert out.returncode == 2 and "runtime_dir: directory" in out.stderr and "group/other" in out.stderr
    assert stat.S_IMODE(os.stat(rt).st_mode) == 0o1777 and tree(tmp_path) == ["rt", "rt.yaml"]


@pytest.mark.parametrize("content", [b"devices: " + b"[" * 10_000 + b"]" * 10_000 + b"\n", b"\xff\xfe\x00"])
def test_serve_config_refuses_a_hostile_file_in_one_line(tmp_path: Path, content: bytes) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_bytes(content)
    out = nicemu("serve", "--config", str(cfg))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.splitlines()[0] == f"nicemu: {cfg}: 1 problem:" and len(out.stderr.splitlines()) == 2


def _base_state() -> bool:
    return T.runtime_base().exists()


def test_serve_config_removes_the_default_runtime_directory_it_created(serve, tmp_path: Path) -> None:
    """Finding 2: `serve --config` with the default /tmp/nicemu-$UID/<name> removes what it made
    (the base too, unless another run uses it); a later `nicemu up` makes and removes its own."""
    name = f"clitest-{uuid.uuid4().hex[:8]}"
    cfg = tmp_path / "srv.yaml"
    cfg.write_text(f"name: {name}\ndevices:\n  nic0: {{}}\n")
    rdir = T.default_runtime_dir(name)
    s = serve("--config", str(cfg))
    assert s.lines[0] == f"nicemu: nic0 52:54:00:12:34:56 on {rdir}/nic0.sock"
    assert stat.S_IMODE(os.stat(rdir).st_mode) == 0o700
    assert s.stop() == 0, s.err
    assert not rdir.exists()
    base = T.runtime_base()
    assert not base.exists() or any(base.iterdir()), f"{base} was left empty"

    up = subprocess.Popen([sys.executable, "-m", "nicemu", "up", str(cfg)], cwd=tmp_path, env=ENV,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while " is up (" not in line:
            line = up.stdout.readline()
            assert line, up.stderr.read()
        assert stat.S_IMODE(os.stat(rdir).st_mode) == 0o700
        up.send_signal(signal.SIGTERM)
        assert up.wait(TIMEOUT) == 0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        up.stdout.close()
        up.stderr.close()
    assert not rdir.exists()
    assert not base.exists() or any(base.iterdir()), f"{base} was left empty"


def test_serve_config_refuses_a_runtime_dir_without_parent(tmp_path: Path) -> None:
    cfg = tmp_path / "rt.yaml"
    rdir = tmp_path / "fresh-rt" / "sub"
    cfg.write_text(f"runtime_dir: {rdir}\ndevices:\n  nic0: {{}}\n")
    for cmd in (["serve", "--config", str(cfg)], ["up", str(cfg)]):
        out = nicemu(*cmd)
        assert out.returncode == 2, out.stderr
        assert out.stderr == (f"nicemu: {cfg}: 1 problem:\n  runtime_dir: the directory {rdir.parent} does "
                              f"not exist; nicemu creates only {rdir} itself (create {rdir.parent} first, "
                              "or choose another path)\n")
        assert tree(tmp_path) == ["rt.yaml"]


# --- messages (findings 3, 4, 5) ---------------------------------------------------------------------


def test_serve_refuses_a_socket_path_longer_than_sun_path(tmp_path: Path) -> None:
    sock = f"/tmp/{'a' * 120}.sock"
    out = nicemu("serve", "--socket", sock)
    assert out.returncode == 2
    assert out.stderr == (f"nicemu: serve: --socket {sock} is longer than 107 bytes, the limit of a unix "
                          "socket path\n")
    # the YAML check says the same
    cfg = tmp_path / "long.yaml"
    cfg.write_text(f"devices:\n  nic0: {{socket: {sock}}}\n")
    assert f"{sock} is longer than 107 bytes, the limit of a unix socket path" in nicemu("up", "--check", str(cfg)).stderr
    assert not os.path.exists(sock)


def test_serve_names_a_socket_given_twice(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    out = nicemu("serve", "--socket", str(sock), "--socket", str(sock))
    assert (out.returncode, out.stderr) == (2, f"nicemu: serve: --socket {sock} is given twice (each "
                                               "device needs its own socket)\n")
    assert tree(tmp_path) == []


def test_serve_on_a_live_socket_says_so_without_errno(serve, tmp_path: Path) -> None:
    sock = tmp_path / "nic0.sock"
    s = serve("--socket", str(sock))
    out = nicemu("serve", "--socket", str(sock), "--mac", "52:54:00:00:00:02")
    assert (out.returncode, out.stderr) == (1, f"nicemu: {sock} is served by another process\n")
    assert s.stop() == 0


def test_os_errors_reach_the_user_without_errno_prefix() -> None:
    assert T.os_error_text(OSError(98, "/x.sock is served by another process")) == "/x.sock is served by another process"
    assert T.os_error_text(FileNotFoundError(2, "No such file or directory", "/x")) == "/x: No such file or directory"
    assert T.os_error_text(OSError("plain message")) == "plain message"


@pytest.mark.parametrize("mac", ["01:00:00:00:00:01", "01:00:5e:00:00:01", "00:00:00:00:00:00", "52:54:00:12:34"])
def test_serve_checks_a_mac_as_a_topology_does(tmp_path: Path, mac: str) -> None:
    _, why = T.parse_mac(mac)
    assert why
    out = nicemu("serve", "--socket", str(tmp_path / "nic0.sock"), "--mac", mac)
    assert (out.returncode, out.stderr) == (2, f"nicemu: serve: --mac: {why}\n")
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f'devices:\n  nic0: {{mac: "{mac}"}}\n')
    assert f"devices.nic0.mac (line 2): {why}" in nicemu("up", "--check", str(cfg)).stderr
    assert tree(tmp_path) == ["m.yaml"]


def test_serve_refuses_two_devices_with_one_mac(tmp_path: Path) -> None:
    out = nicemu("serve", "--socket", str(tmp_path / "a.sock"), "--socket", str(tmp_path / "b.sock"),
                 "--mac", "52:54:00:12:34:57")  # the second device's default is ...:57 too
    assert (out.returncode, out.stderr) == (2, "nicemu: serve: devices nic0 and nic1 would both have MAC "
                                               "52:54:00:12:34:57; each port needs its own (give a --mac "
                                               "per --socket)\n")
    assert tree(tmp_path) == []


def test_show_rejects_a_multicast_mac() -> None:
    out = nicemu("show", "--mac", "01:00:00:00:00:01")
    assert out.returncode == 2 and "a port's own address must be unicast" in out.stderr


# --- names a user knows (finding 7) -----------------------------------------------------------------


@pytest.mark.parametrize("engine", ["python", "cython"])
def test_show_names_the_engine_as_the_engine_option_does(engine: str) -> None:
    if engine == "cython":
        pytest.importorskip("nicemu._datapath")
    out = nicemu("show", "--engine", engine)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].endswith(f"engine {engine}")


def test_stats_name_cables_by_their_yaml_kind(serve, tmp_path: Path) -> None:
    rt = tmp_path / "rt"
    cfg = tmp_path / "k.yaml"
    cfg.write_text(f"runtime_dir: {rt}\ndevices:\n  nic0: {{}}\n  nic1: {{}}\ncables:\n"
                   f"  - kind: unix\n    ends: [nic0, nic1]\n    capture: {{nic0: {tmp_path / 'nic0.pcap'}}}\n"
                   "    faults: {nic1: {drop: 0.5}}\n")
    s = serve("--config", str(cfg))
    s.proc.send_signal(signal.SIGUSR1)
    line = s.read_line()
    assert line.startswith("nicemu: stats ")
    devices = json.loads(line[len("nicemu: stats "):])["devices"]
    c0, c1 = devices["nic0"]["cable"], devices["nic1"]["cable"]
    assert (c0["kind"], c0["layer"], c0["inner"]["kind"]) == ("unix", "capture", "unix")
    assert "layer" not in c0["inner"]
    assert (c1["kind"], c1["layer"], c1["inner"]["kind"]) == ("unix", "faults", "unix")
    assert "End" not in line  # no class names
    assert s.stop() == 0, s.err
    assert tree(tmp_path) == ["k.yaml", "nic0.pcap"]


def test_every_cable_end_knows_its_yaml_kind() -> None:
    from nicemu.cable import cable_kind, layer_name, wrap_end
    from nicemu.cable.pair import PairCable, PipeEnd, pipe
    from nicemu.cable.shm import ShmCable, ShmCableEnd
    from nicemu.cable.tap import TapCableEnd
    from nicemu.cable.udp import UdpCableEnd
    from nicemu.cable.unix import UnixCableEnd

    assert {c.kind for c in (PipeEnd, PairCable, ShmCableEnd, UnixCableEnd, UdpCableEnd, TapCableEnd)} \
        == set(T.CABLE_KINDS)
    a, b = ShmCable.create(1 << 16)
    u = UdpCableEnd(local="127.0.0.1:0")
    p, q = pipe()
    try:
        assert [cable_kind(e) for e in (a, u, p)] == ["shm", "udp", "pair"]
        assert layer_name(a) is None
        w = wrap_end(p, faults_tx={"drop": 0.5})
        assert (cable_kind(w), layer_name(w)) == ("pair", "faults")
    finally:
        for e in (a, b, u, w, q):
            e.close()


def test_lab_cli_has_the_device_commands_and_every_lab_command(capsys) -> None:
    """The installed `nicemu` (lab.cli): nicemu's device commands plus one per lab.commands row."""
    from lab.cli import main
    from lab.commands import COMMANDS
    from nicemu.cli import SUBCOMMANDS

    for name in [n for n, _a, _r in SUBCOMMANDS] + list(COMMANDS):
        with pytest.raises(SystemExit) as ei:
            main([name, "--help"])
        assert ei.value.code == 0, name
        assert f"usage: nicemu {name}" in capsys.readouterr().out


def test_the_device_package_does_not_know_the_lab() -> None:
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2] / "nicemu"
    for f in root.glob("*.py"):
        text = f.read_text()
        assert "import lab" not in text and "from lab" not in text, f
    assert "demo" not in (root / "cli.py").read_text()
