"""kill -9 of `nicemu bench` mid-run leaves nothing behind: every process a benchmark started
(emulator, kstack kernels, their applications, forked Linux UDP peers) dies with it
(PR_SET_PDEATHSIG), and the run's directory, where the benchmarks' sockets live, is removed by
the watcher (lab.procs.Reaper) within a few seconds; nothing new stays in /dev/shm."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _ppids() -> dict[int, int]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            out[int(d)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    return out


def _descendants(pid: int) -> set[int]:
    pp = _ppids()
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for c, parent in pp.items():
            if parent == p and c not in found:
                found.add(c)
                todo.append(c)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _run_and_kill(tmp_path: Path, paths: str, wait_for: str, settle: float, sockets: bool = True,
                  timing: tuple[str, ...] = ("--quick",)) -> None:
    shm_before = set(os.listdir("/dev/shm"))
    p = subprocess.Popen([sys.executable, "-m", "lab", "bench", "--sizes", "64", "--repeat", "2", *timing,
                          "--paths", paths, "--out", str(tmp_path / "out")],
                         cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = Path(f"/tmp/nicemu-{os.getuid()}/_bench-{p.pid}")
    lines: list[str] = []
    seen = threading.Event()

    def read() -> None:
        for line in p.stdout:
            lines.append(line)
            if wait_for in line:
                seen.set()

    t = threading.Thread(target=read, daemon=True)
    t.start()
    try:
        assert seen.wait(120), "".join(lines)
        kids: set[int] = set()
        end = time.monotonic() + settle
        while time.monotonic() < end:  # every process it has at some moment of the run
            kids |= _descendants(p.pid)
            time.sleep(0.05)
        assert p.poll() is None, "the benchmark ended before it was killed:\n" + "".join(lines)
        assert kids, "no child process seen"
        assert run_dir.is_dir(), f"no run directory {run_dir}"
        if sockets:
            assert any(run_dir.iterdir()), "the benchmarks' sockets are not in the run directory"
        p.kill()
        p.wait(10)
        deadline = time.monotonic() + 6.0
        while time.monotonic() < deadline:
            left = [k for k in kids if _alive(k)]
            if not left and not run_dir.exists():
                break
            time.sleep(0.1)
        left = [k for k in kids if _alive(k)]
        assert not left, f"processes left after kill -9: {left}"
        assert not run_dir.exists(), f"{run_dir} left after kill -9: {list(run_dir.rglob('*'))}"
        new_shm = set(os.listdir("/dev/shm")) - shm_before
        assert not new_shm, f"/dev/shm entries left: {new_shm}"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        t.join(5)


def test_kill_9_mid_kstack_leaves_no_process_no_directory_no_shm(tmp_path: Path) -> None:
    # in the middle of the kstack NAPI rate run: emulator, two kernels, udp_send, udp_sink
    _run_and_kill(tmp_path, "kstack NAPI,bypass PMD", "kstack NAPI:", 3.0)


def test_kill_9_mid_pmd_leaves_nothing(tmp_path: Path) -> None:
    # the PMD's emulator process (bench_pmd.EmulatorPair) and its sockets
    _run_and_kill(tmp_path, "bypass PMD", "bypass PMD:", 1.0)


def test_kill_9_mid_linux_udp_leaves_nothing(tmp_path: Path) -> None:
    # Linux UDP's forked sender (rate: the first second), then its forked echo process, which
    # runs until told to stop (ping-pong: 100,000 rounds, several seconds)
    _run_and_kill(tmp_path, "Linux UDP", "Linux UDP:", 2.5, sockets=False,
                  timing=("--seconds", "0.3", "--rounds", "100000"))


def _run_script_and_kill(tmp_path: Path, script: str, *args: str, settle: float = 1.5) -> None:
    """A benchmark run as a script (not under `nicemu bench`): its tempfile run directory is
    /tmp/nicemu-UID/_bench-PID (benchmarks/_common.run_main), removed by the watcher after
    kill -9; its children die with it."""
    shm_before = set(os.listdir("/dev/shm"))
    p = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=tmp_path, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = Path(f"/tmp/nicemu-{os.getuid()}/_bench-{p.pid}")
    try:
        end = time.monotonic() + 60
        while not (run_dir.is_dir() and any(run_dir.rglob("*.sock"))):
            assert p.poll() is None, f"{script} ended before it made its sockets"
            assert time.monotonic() < end, f"no sockets in {run_dir}"
            time.sleep(0.05)
        kids: set[int] = set()
        end = time.monotonic() + settle
        while time.monotonic() < end:
            kids |= _descendants(p.pid)
            time.sleep(0.05)
        assert p.poll() is None and kids, "the benchmark ended before it was killed, or had no child"
        p.kill()
        p.wait(10)
        deadline = time.monotonic() + 6.0
        while time.monotonic() < deadline and (any(_alive(k) for k in kids) or run_dir.exists()):
            time.sleep(0.1)
        assert not [k for k in kids if _alive(k)], "processes left after kill -9"
        assert not run_dir.exists(), f"{run_dir} left after kill -9: {list(run_dir.rglob('*'))}"
        assert not set(os.listdir("/dev/shm")) - shm_before, "/dev/shm entries left"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_kill_9_of_bench_kstack_run_directly_leaves_nothing(tmp_path: Path) -> None:
    _run_script_and_kill(tmp_path, "bench_kstack.py", "--rate-only", "--repeat", "1", "--seconds", "3",
                         "--modes", "napi", settle=2.0)


def test_kill_9_of_bench_driver_irq_run_directly_leaves_nothing(tmp_path: Path) -> None:
    _run_script_and_kill(tmp_path, "bench_driver_irq.py", settle=1.0)


def test_kill_9_of_bench_pmd_run_directly_leaves_nothing(tmp_path: Path) -> None:
    _run_script_and_kill(tmp_path, "bench_pmd.py", "--seconds", "2", settle=1.0)
