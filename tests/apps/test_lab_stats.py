"""`nicemu stats` against a real `nicemu up configs/hosts-pair.yaml`: counters from every
process (emulators through their control sockets, kernels through a STATS call), --watch
twice, and nothing left behind; the control socket and the STATS op on their own."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "hosts-pair.yaml"
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
UP_TIMEOUT = 60.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait(pred, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def topology(tmp_path: Path):
    """hosts-pair up in its own runtime directory; stopped (SIGTERM, then SIGKILL) at the end."""
    rt = tmp_path / "rt"
    out = open(tmp_path / "up.out", "w+")
    p = subprocess.Popen([sys.executable, "-m", "lab", "up", str(CONFIG), "--runtime-dir", str(rt)],
                         cwd=tmp_path, env=ENV, stdout=out, stderr=subprocess.STDOUT, process_group=0)
    try:
        def up() -> bool:
            out.seek(0)
            return "is up" in out.read() or p.poll() is not None
        _wait(up, UP_TIMEOUT, "nicemu up")
        assert p.poll() is None, (tmp_path / "up.out").read_text()
        yield p, rt
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        out.close()


def _stats(rt: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lab", "stats", str(CONFIG), "--runtime-dir", str(rt), *args],
                          env=ENV, capture_output=True, text=True, timeout=60)


def test_stats_from_every_process_once_and_watching(topology) -> None:
    up, rt = topology
    r = _stats(rt, "--json")
    assert r.returncode == 0, r.stderr
    snap = json.loads(r.stdout.strip().splitlines()[-1])
    kinds = {(p["kind"], p["name"]): p for p in snap["processes"]}
    assert set(kinds) >= {("supervisor", "nicemu up"), ("emulator", "nic0"), ("emulator", "nic1"),
                          ("host", "a"), ("host", "b"), ("app", "echo")}
    assert kinds[("supervisor", "nicemu up")]["pid"] == up.pid
    for p in snap["processes"]:
        assert "error" not in p, p
        assert p["costs"]["cpu_ns"] > 0 and p["costs"]["ctx_switches"] >= 0
    for name in ("nic0", "nic1"):
        a = kinds[("emulator", name)]["answer"]
        dev = a["stats"]["devices"][name]
        assert dev["client"] and dev["link"] and dev["rx_written"] > 0 and dev["cable"]["kind"] == "shm"
        assert a["process"]["cpu_ns"] > 0
    a = kinds[("host", "a")]["answer"]
    assert a["ethtool"]["eth0"]["tx_packets"] >= 3 and a["ethtool"]["eth0"]["GPTC"] >= 3
    assert a["snmp"]["IcmpOutEchos"] == 3  # the topology's ping
    assert a["devices"]["eth0"]["qdisc"]["kind"] == "pfifo_fast"
    assert any(n.get("lladdr") == "52:54:00:00:00:0b" for n in a["neighbours"])
    assert a["tcp"] == [] and a["syscall"]["syscalls"]["stats"] >= 1
    assert kinds[("host", "b")]["answer"]["snmp"]["IcmpInEchos"] == 3

    r = _stats(rt, "--watch", "0.3", "--count", "2")
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert text.count("nicemu stats: topology hosts-pair") == 2
    assert "after the previous round" in text and "since last: CPU +" in text
    for heading in ("== emulator process nic0", "== host a", "ethtool -S eth0:", "nstat (SNMP MIB):",
                    "tc -s qdisc show dev eth0 (pfifo_fast):", "ip neigh: 1 entry", "ss -tani: 0 sockets",
                    "== application echo"):
        assert heading in text, heading
    assert "(+1)" in text  # the second round sees the first round's STATS call

    pids = [p["pid"] for p in snap["processes"]]
    up.send_signal(signal.SIGTERM)
    assert up.wait(30) == 0
    for pid in pids:
        _wait(lambda: not _alive(pid), 10, f"pid {pid} to exit")
    assert not rt.exists()  # control sockets and all: the runtime directory is gone
    r = _stats(rt)
    assert r.returncode == 1 and "is not up" in r.stderr


def test_supervisor_killed_leaves_no_control_socket(topology) -> None:
    up, rt = topology
    assert sorted(p.name for p in rt.glob("ctl-*.sock")) == ["ctl-nic0.sock", "ctl-nic1.sock"]
    os.kill(up.pid, signal.SIGKILL)
    up.wait(10)
    _wait(lambda: not any(rt.glob("*")), 20, "the children to unlink their sockets")


def test_stats_op_and_control_socket_answer_only_what_they_promise(topology) -> None:
    from lab.stats_sources import query_emulator, query_kernel

    _up, rt = topology
    k = query_kernel(str(rt / "kernel-a.sock"))
    assert k["event"] == "stats" and "process" in k and "tcp" in k
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(5)
    s.connect(str(rt / "ctl-nic0.sock"))
    s.send(b"reboot")
    assert "error" in json.loads(s.recv(65536))
    s.close()
    assert query_emulator(str(rt / "ctl-nic0.sock"))["stats"]["devices"]["nic0"]["client"]
