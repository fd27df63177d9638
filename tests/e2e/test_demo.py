"""`nicemu demo` end to end: real processes, real sockets, real signals.

The main test runs `python -m nicemu demo` with small frame counts and reads what a user
reads: the narration (which names every process and socket), the two tables, and the exit
status; `--json` gives the same figures exactly, for the checks the tables round. The signal
tests stop a demo in the middle of a mode (SIGINT during interrupt mode, SIGTERM while the PMD
busy-polls) and a kill -9 of the controller; each checks that no process, socket, run
directory or /dev/shm entry is left.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lab import l2demo as demo

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "PYTHONUNBUFFERED": "1"}
FRAMES = 3000
PINGS = 200
SOCKETS = re.compile(r"(/\S+)/nic0\.sock and (/\S+)/nic1\.sock")
PID = re.compile(r"\bpids? ([\d, ]+)\)")


def _dev_shm() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return set()


def _processes_mentioning(text: str) -> list[str]:
    """Live processes whose command line contains `text` (the run directory is in every
    child's: the emulator's --config, the drivers' --socket)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(f"{entry}: {cmd}")
    return found


def _assert_nothing_left(run_dir: str, pids: list[int], shm_before: set[str]) -> None:
    deadline = time.monotonic() + 5  # a SIGKILLed controller's children need a moment
    while time.monotonic() < deadline and (_processes_mentioning(run_dir) or Path(run_dir).exists()):
        time.sleep(0.1)
    assert _processes_mentioning(run_dir) == []
    for pid in pids:  # gone (or the pid now belongs to an unrelated process)
        assert not Path(f"/proc/{pid}").exists() or _cmdline(pid).find("nicemu") < 0, pid
    assert not Path(run_dir).exists(), os.listdir(run_dir)
    assert _dev_shm() - shm_before == set()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _pids(text: str) -> list[int]:
    return [int(p) for m in PID.finditer(text) for p in m.group(1).split(",") if p.strip().isdigit()]


def _table_rows(out: str, title: str) -> dict[str, list[str]]:
    """The rows of the table whose title line starts with `title`, by mode."""
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(title))
    assert "context switches" in lines[start + 1]
    header = lines[start + 2].split()
    assert header[:2] == ["mode", "frames"]
    assert header[-5:] == ["driver", "generator", "emulator", "driver", "cpu"]
    assert set(lines[start + 3]) <= {"-", " "}
    rows = {}
    for ln in lines[start + 4 :]:
        if not ln.strip():
            break
        cells = ln.split()
        rows[cells[0]] = cells
    return rows


class _Reader:
    """Collects a child's stdout lines on a thread, so a test can wait for one."""

    def __init__(self, p: subprocess.Popen) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._t = threading.Thread(target=self._run, args=(p,), daemon=True)
        self._t.start()

    def _run(self, p: subprocess.Popen) -> None:
        for line in p.stdout:
            self.lines.put(line)

    def until(self, pattern: str, timeout: float) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            self.seen.append(line)
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no line matching {pattern!r} in {timeout} s; saw:\n{''.join(self.seen[-20:])}")

    def rest(self) -> str:
        self._t.join(timeout=10)
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return "".join(self.seen)


# --- the whole demo -------------------------------------------------------------------------

def test_demo_exchanges_every_frame_in_every_mode_and_leaves_nothing() -> None:
    shm_before = _dev_shm()
    parent = Path(f"/tmp/nicemu-{os.getuid()}")
    parent_before = parent.exists()
    p = subprocess.run([sys.executable, "-m", "lab", "drivers", "--frames", str(FRAMES),
                        "--pings", str(PINGS), "--json"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    out = p.stdout
    assert p.returncode == 0, f"stdout:\n{out}\nstderr:\n{p.stderr}"

    # the narration says what runs where
    sockets = SOCKETS.search(" ".join(out.split()))
    assert sockets, out
    run_dir = sockets.group(1)
    assert sockets.group(2) == run_dir
    for words in ("pair", "interrupt mode", "reads ICR", "NAPI", "budget", "DD", "zero copy",
                  "never busy-polls", "lesson"):
        assert words in out, words

    # the tables: a row per mode, every frame out and back, plausible figures
    stream = _table_rows(out, "stream:")
    ping = _table_rows(out, "ping-pong:")
    assert list(stream) == list(ping) == ["irq", "napi", "pmd"]
    for mode in demo.MODES:
        assert int(stream[mode][1]) == FRAMES
        assert int(ping[mode][1]) == PINGS
        assert float(stream[mode][2].replace(",", "")) > 0  # frames/s
        assert float(ping[mode][2].replace(",", "")) > 0  # rtt p50
    # columns after the rate (stream) / rtt p99 (ping-pong): irq/pkt doorbells/pkt reads/pkt
    assert float(ping["irq"][4]) >= 0.9  # one frame at a time: an interrupt (and more) per packet
    assert float(ping["napi"][4]) >= 0.9
    assert float(ping["irq"][6]) >= 0.9  # every interrupt costs an ICR read
    assert float(stream["pmd"][3]) == 0.0 and float(ping["pmd"][4]) == 0.0  # no interrupt
    assert float(stream["pmd"][5]) == 0.0 and float(ping["pmd"][6]) == 0.0  # no register read
    assert float(ping["pmd"][5]) > 0  # doorbells

    # the exact figures
    figures = json.loads(out.strip().splitlines()[-1])
    assert [(m["mode"], m["phase"]) for m in figures] == [
        (mode, phase) for mode in demo.MODES for phase in ("stream", "ping-pong")]
    for m in figures:
        n = FRAMES if m["phase"] == "stream" else PINGS
        assert (m["sent"], m["echoed"], m["received"]) == (n, n, n), m
        assert m["generator"]["bytes_back"] == n * (demo.DEFAULT_SIZE - 4)
        assert m["problems"] == []
        assert m["generator"]["out_of_order"] == m["generator"]["stale"] == 0
        assert m["doorbells"] > 0
        assert m["driver"]["dropped"] == 0
        for role in ("driver", "generator", "emulator"):
            assert m["context_switches"][role] >= 0 and m["cpu_seconds"][role] >= 0
        if m["mode"] == "pmd":
            assert m["interrupts"] == 0 and m["mmio_reads"] == 0
        else:
            assert m["interrupts"] > 0
            assert m["mmio_reads"] >= m["interrupts"]  # an ICR read per interrupt
        if m["phase"] == "ping-pong":
            assert 0 < m["rtt_us"]["min"] <= m["rtt_us"]["p50"] <= m["rtt_us"]["p99"] <= m["rtt_us"]["max"]
            assert m["doorbells_per_packet"] >= 1  # nothing to batch: a TDT (and RDT) per frame
            if m["mode"] != "pmd":  # it sleeps until the interrupt wakes it, for every packet
                assert m["context_switches"]["driver"] >= PINGS / 2
    irq_ping = next(m for m in figures if m["mode"] == "irq" and m["phase"] == "ping-pong")
    assert irq_ping["interrupts"] >= PINGS
    _assert_nothing_left(run_dir, _pids(out), shm_before)
    assert Path(run_dir).parent == parent
    if not parent_before:  # the demo made /tmp/nicemu-UID: gone, unless another run uses it now
        assert not parent.exists() or os.listdir(parent), "an empty /tmp/nicemu-UID was left"


def test_short_phases_get_no_cpu_figure_and_no_conclusion(tmp_path: Path) -> None:
    """20 pings take a few ms: CPU time in 10 ms ticks says nothing about them, so the table
    prints n/a and the lesson says the CPU cost was not measured instead of "0% vs 100%"."""
    p = subprocess.run([sys.executable, "-m", "lab", "drivers", "--frames", "0", "--pings", "20",
                        "--modes", "irq,pmd"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, f"{p.stdout}\n{p.stderr}"
    rows = _table_rows(p.stdout, "ping-pong:")
    assert rows["irq"][-1] == rows["pmd"][-1] == "n/a"
    lesson = " ".join(p.stdout.split("[lesson]")[1].split("[done]")[0].split())
    assert "not measured here" in lesson and "run more --pings" in lesson
    assert "price of polling" not in lesson.lower() and "%" not in lesson


# --- the lesson, sentence by sentence from the figures -------------------------------------------

def _m(mode: str, phase: str, n: int, wall: float, cpu: float, **kw) -> demo.Measurement:
    return demo.Measurement(mode, phase, n, 1 if phase == "ping-pong" else 64, sent=n, echoed=n,
                            received=n, wall=wall, cpu={"driver": cpu},
                            ctx={"driver": n, "generator": n, "emulator": n}, **kw)


def test_lesson_follows_from_the_figures() -> None:
    tick = 1 / os.sysconf("SC_CLK_TCK")
    long_wall = demo.CPU_MIN_TICKS * tick * 2
    runs = [
        _m("irq", "stream", 1000, 1.0, 0.5, rate=10000.0, interrupts=500, mmio_reads=500),
        _m("napi", "stream", 1000, 1.0, 0.5, rate=12000.0, interrupts=100, mmio_reads=100),
        _m("pmd", "stream", 1000, 1.0, 1.0, rate=50000.0),
        _m("irq", "ping-pong", 100, long_wall, 0.1 * long_wall, interrupts=135, mmio_reads=135,
           doorbells=200, rtt_us={"p50": 300.0}),
        _m("napi", "ping-pong", 100, long_wall, 0.1 * long_wall, interrupts=141, mmio_reads=141,
           doorbells=200, rtt_us={"p50": 310.0}),
        _m("pmd", "ping-pong", 100, long_wall, long_wall, doorbells=100, rtt_us={"p50": 200.0}),
    ]
    text = " ".join(demo.lesson_sentences(runs))
    assert "the PMD moved 5.0 times as many frames per second as the interrupt-driven driver" in text
    assert "(0.100 per packet) against 500 for 1,000 (0.500) in interrupt mode: 80% fewer per packet" in text
    # 1.41 vs 1.35 interrupts per packet: worded from the numbers, not "a bit more" by rule
    assert "1.41 interrupts, 1.41 register reads and 2.00 doorbells per packet against 1.35" in text
    assert "(4% more interrupts, 4% more reads)" in text
    assert "The price of polling" in text and "PMD was on a CPU 100%" in text
    assert "interrupt-driven driver 10%" in text

    # the same run with the roles reversed: no sentence may still claim the PMD won
    runs[2].rate = 9000.0
    runs[1].interrupts = 520
    runs[5].cpu = {"driver": 0.1 * long_wall}
    text = " ".join(demo.lesson_sentences(runs))
    assert "fewer frames per second (0.90 times as many) than the interrupt-driven driver" in text
    assert "4% more per packet: its polls seldom filled their budget" in text
    assert "keeps interrupts masked" not in text
    assert "no price of polling shows in this run" in text

    # a phase too short for clock ticks: no CPU comparison, and it says why
    runs[3].wall = runs[5].wall = tick
    text = " ".join(demo.lesson_sentences(runs))
    assert "not measured here" in text and "%" not in text.split("What polling costs")[1]

    # an incomplete phase is no ground for a conclusion
    runs[2].problems = ["990 of 1000 came back"]
    assert "frames per second as" not in " ".join(demo.lesson_sentences(runs))


def test_run_directory_removes_the_parent_it_made_only_when_empty(tmp_path: Path, monkeypatch) -> None:
    from nicemu import topology

    parent = tmp_path / "nicemu-uid"
    monkeypatch.setattr(topology, "default_runtime_dir", lambda name: parent / name)
    run_dir, created = demo._run_directory()
    assert created and run_dir.parent == parent and run_dir.is_dir()
    other = parent / "lab"  # another run (nicemu up, a second demo) puts its directory there
    other.mkdir()
    shutil.rmtree(run_dir)
    demo._remove_parent_if_empty(run_dir)
    assert other.is_dir()  # not empty: left alone
    run_dir2, created2 = demo._run_directory()
    assert not created2  # it existed: never ours to remove
    assert not (run_dir2 / demo.PARENT_MARK).exists()
    other.rmdir()
    shutil.rmtree(run_dir2)
    demo._remove_parent_if_empty(run_dir2)
    assert not parent.exists()

    # a demo killed with SIGKILL made the parent: the next demo sweeps its directory away and
    # removes the parent in its place
    dead = parent / "_demo-999999999"  # no such pid
    parent.mkdir(mode=0o700)  # as nicemu makes it (an existing one is never chmodded)
    dead.mkdir()
    (dead / demo.PARENT_MARK).touch()
    run_dir3, created3 = demo._run_directory()
    assert created3 and not dead.exists() and (run_dir3 / demo.PARENT_MARK).exists()


def test_quiet_prints_only_the_tables(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "lab", "drivers", "--quiet", "--modes", "pmd,irq",
                        "--frames", "500", "--pings", "0", "--size", "1518", "--window", "64"],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    assert lines[0] == "stream: 500 frames of 1518 bytes each way, up to 64 in flight"
    assert lines[2].split()[:3] == ["mode", "frames", "frames/s"]
    assert [ln.split()[0] for ln in lines[4:]] == ["pmd", "irq"]  # in the order asked
    assert all(ln.split()[1] == "500" for ln in lines[4:])
    assert len(lines) == 6  # no narration, no ping-pong table


def test_shm_cable_puts_each_device_in_its_own_emulator() -> None:
    shm_before = _dev_shm()
    p = subprocess.run([sys.executable, "-m", "lab", "drivers", "--cable", "shm", "--modes", "napi",
                        "--frames", "1000", "--pings", "50", "--json"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"{p.stdout}\n{p.stderr}"
    assert "two emulator processes" in p.stdout
    figures = json.loads(p.stdout.strip().splitlines()[-1])
    assert [(m["phase"], m["received"], m["echoed"]) for m in figures] == [
        ("stream", 1000, 1000), ("ping-pong", 50, 50)]
    run_dir = SOCKETS.search(" ".join(p.stdout.split())).group(1)
    _assert_nothing_left(run_dir, _pids(p.stdout), shm_before)


# --- stopping it -----------------------------------------------------------------------------

@pytest.mark.parametrize("sig, mode", [(signal.SIGINT, "irq"), (signal.SIGTERM, "pmd")])
def test_signal_mid_run_stops_everything(sig: int, mode: str) -> None:
    """Ctrl-C while the interrupt-mode driver works, SIGTERM while the PMD spins: exit 128 +
    signal, every process gone, the sockets and the run directory removed."""
    shm_before = _dev_shm()
    p = subprocess.Popen([sys.executable, "-m", "lab", "drivers", "--modes", mode,
                          "--frames", "5000000", "--pings", "0"],
                         cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        r = _Reader(p)
        head = r.until(r"nic1\.sock", 60) + r.until(r"driver process up", 60)
        time.sleep(0.5)  # frames are flowing now
        run_dir = SOCKETS.search(" ".join("".join(r.seen).split())).group(1)
        assert _processes_mentioning(run_dir), "the demo's processes should be running"
        p.send_signal(sig)
        rc = p.wait(timeout=30)
        out = r.rest()
        err = p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert rc == 128 + sig, f"{out}\n{err}"
    assert signal.Signals(sig).name in err
    assert "Traceback" not in err
    assert "Stopped every driver" in out
    _assert_nothing_left(run_dir, _pids(head + out), shm_before)


def test_kill_9_of_the_controller_takes_the_children_down() -> None:
    """PR_SET_PDEATHSIG: the drivers, the generator and the emulator go with a SIGKILLed
    controller; the emulator unlinks its sockets; the next demo removes the dead run's
    directory."""
    shm_before = _dev_shm()
    p = subprocess.Popen([sys.executable, "-m", "lab", "drivers", "--modes", "napi",
                          "--frames", "5000000", "--pings", "0"],
                         cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        r = _Reader(p)
        r.until(r"driver process up", 60)
        run_dir = SOCKETS.search(" ".join("".join(r.seen).split())).group(1)
        p.kill()
        p.wait(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    deadline = time.monotonic() + 10
    while _processes_mentioning(run_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_mentioning(run_dir) == []
    deadline = time.monotonic() + 5
    while any(f.endswith(".sock") for f in os.listdir(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [f for f in os.listdir(run_dir) if f.endswith(".sock")]
    assert _dev_shm() - shm_before == set()
    # the next demo sweeps the dead run's directory away
    made_parent = (Path(run_dir) / demo.PARENT_MARK).exists()
    q = subprocess.run([sys.executable, "-m", "lab", "drivers", "--quiet", "--modes", "irq",
                        "--frames", "100", "--pings", "0"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert q.returncode == 0, q.stderr
    assert not Path(run_dir).exists()
    parent = Path(run_dir).parent
    if made_parent:  # the dead demo made /tmp/nicemu-UID: the next one removes it in its place
        assert not parent.exists() or os.listdir(parent), "an empty /tmp/nicemu-UID was left"


# --- options and pieces, in this process ------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--size", "63"], "--size 63"),
    (["--size", "1519"], "--size 1519"),
    (["--window", "0"], "--window 0"),
    (["--window", "5000"], "--window 5000"),
    (["--frames", "0", "--pings", "0"], "nothing to send"),
])
def test_bad_options_exit_2_with_a_message(args: list[str], message: str, capsys) -> None:
    assert demo.main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--modes", "irq,dpdk"], ["--modes", ""], ["--frames", "-1"],
                                  ["--frames", "many"], ["--cable", "udp"]])
def test_bad_arguments_are_usage_errors(args: list[str]) -> None:
    p = subprocess.run([sys.executable, "-m", "lab", "drivers", *args], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2
    assert "usage: nicemu drivers" in p.stderr


def test_proc_sample_reads_context_switches_and_cpu_time() -> None:
    a = demo.proc_sample(os.getpid())
    time.sleep(0.01)  # a voluntary context switch
    t = time.process_time() + 0.05
    while time.process_time() < t:  # some CPU time
        pass
    b = demo.proc_sample(os.getpid())
    assert b.ctx_switches > a.ctx_switches
    assert b.cpu_seconds > a.cpu_seconds


def test_tables_have_a_row_per_mode_and_mark_incomplete_ones() -> None:
    ok = demo.Measurement("irq", "stream", 1000, 64, sent=1000, echoed=1000, received=1000,
                          seconds=0.5, rate=2000.0, interrupts=250, doorbells=125, mmio_reads=250,
                          ctx={"driver": 600, "generator": 20, "emulator": 900},
                          cpu={"driver": 0.25, "generator": 0.1, "emulator": 0.2}, wall=0.5)
    short = demo.Measurement("pmd", "stream", 1000, 64, sent=1000, echoed=990, received=990,
                             seconds=0.1, rate=9900.0, problems=["990 of 1000 came back"], wall=0.1,
                             cpu={"driver": 0.1})
    ping = demo.Measurement("napi", "ping-pong", 10, 1, sent=10, echoed=10, received=10,
                            rtt_us={"min": 90.0, "p50": 120.0, "p99": 300.0, "max": 310.0},
                            interrupts=17, doorbells=20, mmio_reads=17, wall=0.01)
    text = demo.format_tables([ok, short, ping], size=64)
    lines = text.splitlines()
    assert lines[0] == "stream: 1000 frames of 64 bytes each way, up to 64 in flight"
    assert lines[1].strip().strip("-").strip() == "context switches"
    assert lines[4].split() == ["irq", "1000", "2,000", "0.250", "0.125", "0.250", "600", "20", "900", "50%"]
    assert lines[5].split()[:4] == ["pmd", "!", "990", "9,900"]
    assert lines[5].split()[-1] == "n/a"  # 0.1 s: too short for CPU time in clock ticks
    assert "ping-pong: 10 frames of 64 bytes each way, one at a time" in lines
    assert lines[-1].split()[:7] == ["napi", "10", "120", "300", "1.700", "2.000", "1.700"]
    assert not ok.problems and ok.complete and not short.complete


def test_parsed_namespace_from_the_cli_runs_the_same_checks(capsys) -> None:
    ap = argparse.ArgumentParser()
    demo.add_arguments(ap)
    opts = ap.parse_args(["--size", "20"])
    assert demo.main(opts) == 2
    assert "--size 20" in capsys.readouterr().err


# --- nicemu demo: kstack (irq, NAPI), bypass and Linux on one UDP echo ------------------------

NEW_SOCKETS = re.compile(r"Sockets: (/\S+)/nic0\.sock")


def test_demo_compares_four_paths_with_every_figure_and_leaves_nothing() -> None:
    shm_before = _dev_shm()
    p = subprocess.run([sys.executable, "-m", "lab", "demo", "--rounds", "200", "--pings", "30",
                        "--repeat", "2", "--json", "--no-pcap"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    out = p.stdout
    assert p.returncode == 0, f"{out}\n{p.stderr}"
    assert "machine: " in out and "load average" in out and "CPUs" in out
    assert "link rate is not modeled" in out
    header = next(ln for ln in out.splitlines() if ln.strip().startswith("kstack irq"))
    assert header.split() == ["kstack", "irq", "kstack", "napi", "bypass", "pmd", "linux"]
    for row in ("echoes/s", "round trip p50 us", "interrupts", "context switches", "syscalls",
                "bytes copied", "sk_buff allocations", "register reads", "doorbells (RDT+TDT)",
                "echo side (driver, stack, app)", "client side (kernel A + client)", "emulator"):
        assert any(ln.strip().startswith(row) for ln in out.splitlines()), row
    assert "[why]" in out and "[ping]" in out and "[tcp]" in out and "[note]" in out
    assert "3 received" in out
    samples = json.loads(out.strip().splitlines()[-1])
    assert {s["path"] for s in samples} == {"kstack irq", "kstack napi", "bypass pmd", "linux"}
    assert len(samples) == 4 * 2 * 2  # paths x repetitions x phases
    for s in samples:
        assert s["client"]["echoed"] + s["client"]["lost"] == (30 if s["window"] == 1 else 200), s
        if s["path"] == "bypass pmd":
            assert s["counters"]["interrupts"] == 0 and s["counters"]["mmio_reads"] == 0
        elif s["path"].startswith("kstack"):
            assert s["counters"]["syscall.syscalls_total"] > 0 and s["counters"]["skb.skb_allocs"] > 0
        assert all(v >= 0 for v in s["cpu_ns"].values())
    run_dir = NEW_SOCKETS.search(" ".join(out.split())).group(1)
    _assert_nothing_left(run_dir, [], shm_before)


def test_demo_sigterm_mid_run_leaves_nothing() -> None:
    shm_before = _dev_shm()
    p = subprocess.Popen([sys.executable, "-m", "lab", "demo", "--rounds", "100000", "--pings", "10",
                          "--repeat", "1", "--no-pcap"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        r = _Reader(p)
        try:
            r.until(r"ping-pong: ", 120)
        except AssertionError as e:
            p.kill()  # its children die with it (PR_SET_PDEATHSIG)
            p.wait()
            raise AssertionError(f"{e}\nstderr:\n{p.stderr.read()}") from None
        time.sleep(0.5)  # the stream is running
        run_dir = NEW_SOCKETS.search(" ".join("".join(r.seen).split())).group(1)
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=30)
        out, err = r.rest(), p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert rc == 128 + signal.SIGTERM, f"{out}\n{err}"
    assert "SIGTERM" in err and "Traceback" not in err
    assert "Stopped every process" in out
    _assert_nothing_left(run_dir, [], shm_before)
