"""docs/tutorial.md's programs (docs/examples/) run as printed against real topologies, and the
next-step lines `nicemu serve` and `nicemu up` print; configs/faults-hosts.yaml fills its
captures by itself. Everything started here is stopped and reaped; sockets live in tmp dirs."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "examples"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
TIMEOUT = 60.0


class Proc:
    """A child whose stdout is read line by line; always stopped and reaped."""

    def __init__(self, args: list[str], cwd: Path = ROOT) -> None:
        self.p = subprocess.Popen(args, cwd=cwd, env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        self.lines: list[str] = []
        self._buf = b""

    def until(self, pred, timeout: float = TIMEOUT) -> str:
        end = time.monotonic() + timeout
        fd = self.p.stdout.fileno()
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                self.lines.append(line.decode(errors="replace"))
                if pred(self.lines[-1]):
                    return self.lines[-1]
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching line; saw {self.lines[-10:]}")
            r, _, _ = select.select([fd], [], [], left)
            chunk = os.read(fd, 65536) if r else b""
            if not chunk and r:
                raise AssertionError(f"exited {self.p.wait()}; saw {self.lines[-10:]}")
            self._buf += chunk

    def stop(self) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        try:
            rc = self.p.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.p.pid, signal.SIGKILL)
            rc = self.p.wait()
        self.p.stdout.close()
        return rc


def run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env={**ENV, **env}, capture_output=True, text=True, timeout=120)


@pytest.fixture
def rundir(tmp_path: Path) -> Path:
    d = tmp_path / "rt"
    d.mkdir(mode=0o700)
    return d


def test_bypass_example_against_a_served_pair_with_an_echo(rundir: Path) -> None:
    s0, s1 = rundir / "nic0.sock", rundir / "nic1.sock"
    serve = Proc([sys.executable, "-m", "nicemu", "serve", "--socket", str(s0), "--socket", str(s1), "--pair"])
    echo = None
    try:
        serve.until(lambda ln: ln == "nicemu: ready")
        # what serve says to do next: the driver commands and the pid for SIGUSR1
        assert any(f"python -m driver.kernel --socket {s1}" in ln and "python -m driver.pmd" in ln
                   for ln in serve.lines)
        assert any(f"kill -USR1 {serve.p.pid}" in ln for ln in serve.lines)
        echo = Proc([sys.executable, "-m", "driver.pmd", "--socket", str(s1), "--app", "echo"])
        mac1 = echo.until(lambda ln: '"up"' in ln).split('"mac": "')[1].split('"')[0]
        r = run([sys.executable, str(EXAMPLES / "bypass_ping.py"), str(s0), mac1, "5"])
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert "sent 5 frames, 5 came back" in r.stdout
    finally:
        if echo is not None:
            assert echo.stop() == 0
        assert serve.stop() == 0


def test_kstack_example_against_hosts_pair(rundir: Path, tmp_path: Path) -> None:
    up = Proc([sys.executable, "-m", "nicemu", "up", str(ROOT / "configs" / "hosts-pair.yaml"),
               "--runtime-dir", str(rundir)], cwd=tmp_path)
    try:
        up.until(lambda ln: " is up (" in ln, timeout=120)
        up.until(lambda ln: "nicemu stats" in ln)
        assert any(f"runtime directory {rundir}" in ln for ln in up.lines)
        r = run([sys.executable, str(EXAMPLES / "kstack_udp_client.py"), "198.18.0.2"],
                NICEMU_KERNEL=str(rundir / "kernel-a.sock"))
        assert r.returncode == 0, (r.stdout, r.stderr)
        for i in range(3):
            assert f"198.18.0.2:7 echoed 'hello {i}'" in r.stdout
    finally:
        assert up.stop() == 0


def test_faults_hosts_config_fills_its_captures(rundir: Path, tmp_path: Path) -> None:
    up = Proc([sys.executable, "-m", "nicemu", "up", str(ROOT / "configs" / "faults-hosts.yaml"),
               "--runtime-dir", str(rundir)], cwd=tmp_path)
    try:
        up.until(lambda ln: " is up (" in ln, timeout=180)
    finally:
        assert up.stop() == 0
    for name in ("nic0.pcap", "nic1.pcap"):
        assert (tmp_path / name).stat().st_size > 24 + 100 * 16  # header + well over 100 records
