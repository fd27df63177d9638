"""The processes of `nicemu demo` and one measured exchange through each path.

Emulated paths share one set-up: an emulator (`nicemu serve --pair`, nic0 and nic1 back to
back in one process, with --pcap a bounded capture of the cable through the engines' capture
ring), kernel A (kstack, NAPI) on nic0 with the echo client, and on nic1, in turn,
kernel B in interrupt mode with kstack.apps.udp_echo, kernel B in NAPI mode with udp_echo, and
the bypass PMD echoing UDP itself (lab.l2echo responder --udp). The reference path is two Python
processes over the real Linux kernel's UDP on loopback (lab.echo_client, lab.linux_echo).

Every child is a lab.procs.Child: its own process group, PR_SET_PDEATHSIG, stopped in order.
"""
from __future__ import annotations

import os
import select
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lab.measure import ProcCost
from lab.procs import Child, DemoError, Interrupted, pdeathsig_preexec

MAC0, MAC1 = "52:54:00:12:34:56", "52:54:00:12:34:57"
IP_A, IP_B = "198.18.0.1", "198.18.0.2"
PORT = 7
UP_TIMEOUT = 30.0
PCAP_SNAPLEN = 256  # every header of the demo's frames; TCP's 1514-byte segments are cut
PCAP_FRAMES = 100_000  # at most 100,000 x (16 + 256) bytes: 27 MB; the demo writes ~40,000 small ones

# path name -> how nic1 is driven (None: the real kernel, no emulator)
PATHS = {"kstack irq": "interrupt", "kstack napi": "napi", "bypass pmd": "pmd", "linux": None}


@dataclass
class Sample:
    """One measured exchange through one path: the client's report, the echo side's counter
    differences and every process's CPU ns and context switches."""

    path: str
    window: int
    client: dict
    counters: dict = field(default_factory=dict)  # per the whole exchange, echo side
    cpu_ns: dict[str, int] = field(default_factory=dict)  # role -> ns
    ctx: dict[str, int] = field(default_factory=dict)  # role -> context switches

    @property
    def echoed(self) -> int:
        return self.client.get("echoed", 0)

    def per(self, value: float) -> float:
        return value / self.echoed if self.echoed else float("nan")


class Lab:
    """Starts, waits for and stops the demo's processes; `stop_signal` set by a signal
    handler makes every wait raise Interrupted."""

    def __init__(self, run_dir: Path, env: dict[str, str], pcap: str | None = None,
                 pcap_frames: int | None = None) -> None:
        self.dir = run_dir
        self.env = env
        self.pcap = pcap  # the cable's capture file (absolute), or None
        self.pcap_frames = pcap_frames
        self.pcap_report: dict | None = None  # the emulator's closing "pcap" event
        self.children: list[Child] = []
        self.stop_signal: int | None = None
        self.kill_now = False
        self.emu = self.ka = None  # type: Child | None

    # --- processes ---------------------------------------------------------------------

    def spawn(self, name: str, argv: list[str]) -> Child:
        if self.stop_signal is not None:
            raise Interrupted(self.stop_signal)
        child = Child(name, [sys.executable, *argv], self.env, pdeathsig_preexec())
        self.children.append(child)
        return child

    def stop(self, child: Child | None) -> None:
        if child is not None and child in self.children:
            child.stop(kill_now=self.kill_now)
            self.children.remove(child)

    def close(self) -> None:
        for child in reversed(list(self.children)):  # apps and drivers before the emulator
            try:
                self.stop(child)
            except Exception as e:  # keep cleaning whatever happens
                print(f"nicemu demo: stopping {child.name}: {e}", file=sys.stderr)
        if self.emu is not None and self.pcap:  # its last words: how much of the cable it wrote
            try:
                self.pcap_report = self.emu.take("pcap")
            except DemoError:
                self.pcap_report = None

    def wait(self, child: Child, pred: Callable[[Child], dict | None], what: str,
             timeout: float = UP_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            got = pred(child)
            if got is not None:
                return got
            if self.stop_signal is not None:
                raise Interrupted(self.stop_signal)
            for c in self.children:
                if not c.fds and not c.alive():
                    raise DemoError(c.why_dead())
            left = deadline - time.monotonic()
            if left <= 0:
                raise DemoError(f"{child.name} (pid {child.pid}): no {what} in {timeout:g} s")
            fds = {fd: c for c in self.children for fd in c.fds}
            ready, _, _ = select.select(list(fds), [], [], min(0.1, left))
            for fd in ready:
                fds[fd].pump(fd)

    def event(self, child: Child, name: str, timeout: float = UP_TIMEOUT) -> dict:
        return self.wait(child, lambda c: c.take(name), repr(name), timeout)

    def text(self, child: Child, start: str, timeout: float = UP_TIMEOUT) -> dict:
        def pred(c: Child) -> dict | None:
            while c.text:
                line = c.text.popleft()
                if line.startswith(start):
                    return {"line": line}
            return None
        return self.wait(child, pred, repr(start), timeout)

    def snapshot(self, child: Child, name: str) -> dict:
        child.popen.send_signal(signal.SIGUSR1)
        return self.event(child, name, 10.0)

    # --- the emulated side ---------------------------------------------------------------

    def up(self) -> None:
        """The emulator and kernel A (the client's, NAPI) once for every emulated path."""
        a, b = str(self.dir / "nic0.sock"), str(self.dir / "nic1.sock")
        self.sock_b = b
        argv = ["-m", "nicemu", "serve", "--socket", a, "--mac", MAC0, "--socket", b, "--mac", MAC1, "--pair"]
        if self.pcap:
            argv += ["--pcap", self.pcap, "--snaplen", str(PCAP_SNAPLEN),
                     "--pcap-frames", str(PCAP_FRAMES if self.pcap_frames is None else self.pcap_frames)]
        self.emu = self.spawn("emulator", argv)
        self.text(self.emu, "nicemu: ready")
        self.ka_sock = str(self.dir / "ka.sock")
        argv = ["-m", "kstack.kernel", "--device", f"{a},name=eth0,mode=napi",
                "--addr", f"eth0={IP_A}/24", "--syscall-socket", self.ka_sock]
        self.ka = self.spawn("kernel A", argv)
        self.event(self.ka, "up")

    def echo_side(self, mode: str) -> tuple[list[Child], Child]:
        """nic1's driver and echo server for `mode`; returns (processes, the one with counters)."""
        if mode == "pmd":
            pmd = self.spawn("bypass PMD", ["-m", "lab.l2echo", "responder", "--socket", self.sock_b,
                                            "--mode", "pmd", "--udp", IP_B])
            self.event(pmd, "up")
            return [pmd], pmd
        kb_sock = str(self.dir / "kb.sock")
        kb = self.spawn(f"kernel B ({mode})", [
            "-m", "kstack.kernel", "--device", f"{self.sock_b},name=eth0,mode={mode}",
            "--addr", f"eth0={IP_B}/24", "--syscall-socket", kb_sock])
        self.event(kb, "up")
        echo = self.spawn("udp_echo", ["-m", "kstack.apps.udp_echo", "--port", str(PORT), "--kernel", kb_sock])
        self.text(echo, "udp_echo: listening")
        return [kb, echo], kb

    def client(self, argv: list[str]) -> Child:
        if self.stop_signal is not None:
            raise Interrupted(self.stop_signal)
        child = Child("echo client", [sys.executable, "-m", "lab.echo_client", "--wait-go", *argv],
                      self.env, pdeathsig_preexec(), stdin=True)
        self.children.append(child)
        return child


def _costs(pids: dict[str, int]) -> dict[str, ProcCost]:
    return {k: ProcCost(p).start() for k, p in pids.items()}


def measure(lab: Lab, path: str, procs: dict[str, Child], counted: Child | None, client_argv: list[str],
            window: int, snap_event: str) -> Sample:
    """Snapshot the echo side, run the client to its report, snapshot again."""
    client = lab.client(client_argv)
    lab.event(client, "ready", 60.0)  # warmed up: ARP resolved, every process running
    before = lab.snapshot(counted, snap_event) if counted else {}
    costs = _costs({k: c.pid for k, c in procs.items()})
    client.send("go")
    rep = lab.event(client, "report", 120.0)
    for c in costs.values():
        c.stop()
    after = lab.snapshot(counted, snap_event) if counted else {}
    lab.stop(client)
    cpu = {k: c.cpu for k, c in costs.items()}
    ctx = {k: c.cs for k, c in costs.items()}
    cpu["client"], ctx["client"] = rep["cpu_ns"], rep["ctx"]  # its own, over the measured rounds
    return Sample(path, window, rep, _diff(before, after), cpu, ctx)


def _diff(a: dict, b: dict, prefix: str = "") -> dict:
    """Numeric leaves of b minus a, flattened with '.'."""
    out: dict = {}
    for k, v in b.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_diff(a.get(k, {}) if isinstance(a.get(k), dict) else {}, v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            w = a.get(k, 0)
            out[key] = v - (w if isinstance(w, (int, float)) else 0)
    return out


def environment() -> dict[str, str]:
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env
