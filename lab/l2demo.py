"""`nicemu drivers`: two emulated NICs back to back, a driver per process, three ways to drive a NIC.

What runs (every box is its own process; `--cable shm` splits the emulator in two):

    generator (nic0) --vfio-user--> [emulator: nic0 ==pair cable== nic1] <--vfio-user-- driver under test (nic1)

- The emulator is `nicemu serve`, started, watched and stopped by nicemu.supervisor from a
  topology this module writes for the run (the same machinery as `nicemu up`).
- The generator drives nic0 with the poll-mode driver (driver.pmd). It sends frames to nic1
  and counts them as they come back, never more than a window unanswered; whenever it has to
  wait it arms nic0's RX interrupt and sleeps on it, so it never busy-polls (on a 2-core
  machine only the PMD under test and the emulator may keep a core busy). It is the same for
  every mode, so the differences in the table come from nic1's driver alone.
- The driver under test drives nic1 and echoes every frame back: the kernel-style driver
  (driver.e1000) in interrupt mode (`irq`), the same driver in NAPI mode (`napi`), and the
  kernel-bypass PMD busy-polling (`pmd`). A fresh process per mode.

Each mode is measured twice: a stream (`--frames` frames, `--window` in flight: throughput,
where frames arrive in bursts and every driver batches) and a ping-pong (`--pings` frames, one
in flight: latency, where every frame is an event of its own and costs what an event costs).

Measurement: each child prints JSON lines on stdout. Just before a phase starts and just after
its last frame is back, the controller takes a snapshot of the driver's counters (interrupts,
RDT/TDT doorbells, register reads through a counting bus) and of every process's context
switches and CPU time (/proc/PID/status, /proc/PID/stat); the tables show the differences.
CPU time comes in clock ticks, so a phase shorter than CPU_MIN_TICKS of them gets no CPU figure
("n/a") and the closing lesson compares nothing it could not measure; every sentence of the
lesson is worded from this run's figures (lesson_sentences).
A window below the RX ring size can never overrun it, so every phase must move exactly its
frames each way; anything else is reported and the exit status is 1.

Cleanup: every child runs in its own process group (a terminal's Ctrl-C reaches only the
controller, which then stops them in order) with PR_SET_PDEATHSIG, so they go even if the
controller is killed with SIGKILL. On exit, Ctrl-C or SIGTERM: the drivers get SIGTERM (SIGKILL
after a grace period, or at once on a second Ctrl-C), then the supervisor stops the emulator,
which unlinks its sockets, and the run's directory is removed, and with it the per-user parent
/tmp/nicemu-UID if this run created it and nothing else is in it (rmdir: a directory another
run uses is never touched). DMA memory and cable rings are memfds: nothing is ever created in
/dev/shm.

"""
from __future__ import annotations

import argparse
import io
import json
import os
import select
import shutil
import signal
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Sequence, TextIO

from lab.l2echo import (CPU_MIN_TICKS, DEFAULT_FRAMES, DEFAULT_PINGS, DEFAULT_SIZE, DEFAULT_WINDOW,
                        FCS_LEN, MAC0, MAC1, MAX_SECONDS, MAX_WINDOW, MODES, RING_SIZE, STALL_SECONDS,
                        UP_TIMEOUT, child_main)
from lab.l2report import (Measurement, _clock_ticks, _ms, _plural, _share, cpu_measurable, format_tables,
                          lesson_sentences)
from lab.procs import (CHILD_STOP_TIMEOUT, PARENT_MARK, Child, DemoError, Interrupted, ProcSample,
                       pdeathsig_preexec, proc_sample, remove_parent_if_empty, run_directory,
                       stdout_to_devnull)

__all__ = ["main", "add_arguments", "run", "child_main", "proc_sample", "format_tables",
           "lesson_sentences", "Measurement", "MODES"]

_run_directory = run_directory  # the names the tests know
_remove_parent_if_empty = remove_parent_if_empty

MODE_STORIES = {
    "irq": (
        "The kernel-style driver (driver.e1000) in interrupt mode. A frame that lands raises "
        "RXT0 at once (RDTR 0, no ITR throttling) and the device signals the driver's eventfd. "
        "The top half reads ICR - a round trip to the device that also acknowledges the "
        "interrupt - and the bottom half takes every completed RX descriptor, copies each frame "
        "into an sk_buff, hands it to the echo application, gives buffers back to the device "
        "(one RDT write per 16, and one at the end of each round, so one frame at a time costs one) "
        "and cleans TX. Interrupts stay enabled throughout: one "
        "interrupt per packet when packets come one at a time; under load each bottom half "
        "takes whatever piled up, but frames landing meanwhile interrupt again."
    ),
    "napi": (
        "The same driver in NAPI mode. The top half masks the device's interrupts (IMC) and "
        "schedules a poll; a poll cleans TX and takes at most 64 frames (the budget). While "
        "polls fill their budget the driver keeps polling with interrupts off; when one comes "
        "up short it re-enables them (IMS) and sleeps. Under load a whole burst can cost one "
        "interrupt; one packet at a time every poll comes up short, so each packet takes an "
        "interrupt as in interrupt mode, plus the IMC and IMS writes around its poll: the "
        "ping-pong figures show what that adds up to."
    ),
    "pmd": (
        "The kernel-bypass poll-mode driver (driver.pmd), as DPDK and ixy do it. The "
        "application owns the device: its interrupts stay masked (IMS 0) and it spins on the DD "
        "bits of its RX descriptors in its own memory, never reading a register on the fast "
        "path. It echoes each frame from the very buffer it arrived in (zero copy), writes RDT "
        "once per 32 buffers given back and TDT once per burst. The price: it keeps a core busy "
        "even when no frame comes."
    ),
}


TOPOLOGY = """\
# Written by `nicemu demo` for one run; removed as soon as the emulator has read it.
devices:
  nic0:
    mac: {mac0}
  nic1:
    mac: {mac1}
cables:
  - kind: {cable}
    ends: [nic0, nic1]
"""


class Demo:
    """Runs the whole demo: emulator, generator, one driver process per mode, the tables."""

    def __init__(self, opts: argparse.Namespace, out: TextIO | None = None) -> None:
        self.opts = opts
        self.out = out or sys.stdout
        self.quiet = opts.quiet
        self.results: list[Measurement] = []
        self.sup: Any = None
        self.run_dir: Path | None = None
        self.created_parent = False  # /tmp/nicemu-UID did not exist before this run
        self.children: list[Child] = []
        self.generator: Child | None = None
        self.stop_signal: int | None = None
        self.signals_seen = 0
        self.sockets: dict[str, str] = {}
        root = str(Path(__file__).resolve().parent.parent)
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (root, self.env.get("PYTHONPATH", "")) if p)
        self.env["PYTHONUNBUFFERED"] = "1"

    # --- narration ----------------------------------------------------------------------

    def say(self, text: str, tag: str = "") -> None:
        if self.quiet:
            return
        prefix = f"[{tag}] " if tag else ""
        print(textwrap.fill(text, width=100, initial_indent=prefix, subsequent_indent=" " * len(prefix),
                            break_on_hyphens=False, break_long_words=False) if text else "",
              file=self.out, flush=True)

    # --- signals ------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: Any) -> None:
        """Only flags (no exception in the middle of a fork or a cleanup): the waits look at
        them every 0.1 s. A second signal makes the stop impatient (SIGKILL at once)."""
        self.signals_seen += 1
        if self.stop_signal is None:
            self.stop_signal = signum
        if self.sup is not None:
            self.sup.signals_seen += 1
            if self.sup.stop_requested is None:
                self.sup.stop_requested = signum

    def _check(self) -> None:
        if self.stop_signal is not None:
            raise Interrupted(self.stop_signal)

    # --- the whole run ------------------------------------------------------------------

    def run(self) -> int:
        handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        old = {s: signal.signal(s, self._on_signal) for s in handled}
        rc = 0
        try:
            try:
                self._intro()
                self._start_emulator()
                self._start_generator()
                for mode in self.opts.modes:
                    self._run_mode(mode)
                self._print_tables()
                rc = 0 if all(r.complete for r in self.results) else 1
            except Interrupted as e:
                print(f"nicemu drivers: {signal.Signals(e.signum).name}: stopping", file=sys.stderr, flush=True)
                rc = 128 + e.signum
            except DemoError as e:
                reason = str(e)
                if self.sup is not None and any(c.poll() is not None for c in self.sup.children):
                    try:
                        self._check_alive()
                    except DemoError as why:  # a dead emulator explains the drivers' complaints
                        reason = f"{why}; {e}" if str(why) != reason else reason
                print(f"nicemu drivers: {reason}", file=sys.stderr, flush=True)
                rc = 1
            finally:
                self._cleanup()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        if self.opts.json:
            print(json.dumps([r.as_dict() for r in self.results]), file=self.out, flush=True)
        return rc

    def _intro(self) -> None:
        o = self.opts
        phases = [f"a stream of {o.frames} frames with up to {o.window} in flight (throughput)"] if o.frames else []
        if o.pings:
            phases.append(f"a ping-pong of {o.pings} frames one at a time (latency)")
        where = ("both devices in one emulator process (a pair cable)" if o.cable == "pair" else
                 "each device in an emulator process of its own (an shm cable)")
        self.say(f"nicemu drivers: two emulated Intel 82540EM NICs joined back to back, {where}; "
                 f"every driver runs in a process of its own. nic0 is driven by a traffic "
                 f"generator, nic1 by the driver under test, which echoes every frame back. In each "
                 f"mode ({', '.join(o.modes)}) the generator sends {' and '.join(phases)}, "
                 f"{o.size}-byte frames, and we count what it costs nic1's driver. The link rate is not "
                 f"modeled: frames cross the cable as fast as the processes move them, so a rate in "
                 f"bits per second can exceed the 1 Gbit/s the device reports.")
        self.say("")

    def _start_emulator(self) -> None:
        from nicemu import topology as T
        from nicemu.supervisor import Supervisor

        from nicemu.supervisor import SupervisorError

        try:
            self.run_dir, self.created_parent = run_directory()
            config = self.run_dir / "demo.yaml"
            config.write_text(TOPOLOGY.format(mac0=MAC0, mac1=MAC1, cable=self.opts.cable))
        except OSError as e:
            raise DemoError(f"cannot prepare the run's directory: {e}") from None
        try:
            topo = T.load(config, runtime_dir=self.run_dir)
        except T.TopologyError as e:  # our own file: only a bug gets here
            raise DemoError(e.render()) from None
        self.sup = Supervisor(topo, stop_timeout=CHILD_STOP_TIMEOUT, ready_timeout=UP_TIMEOUT,
                              log_level="error", out=io.StringIO(), err=sys.stderr)
        if self.stop_signal is not None:
            self.sup.stop_requested = self.stop_signal
        try:
            with stdout_to_devnull():
                self.sup.start()
        except SupervisorError as e:
            raise DemoError(f"cannot start the emulator: {e}") from None
        if not self.sup.wait_ready():
            self._check()
            raise DemoError("the emulator did not start (see above)")
        config.unlink()  # every emulator process has read it by now
        self.sockets = {name: str(d.socket) for name, d in topo.devices.items()}
        pids = ", ".join(str(c.pid) for c in self.sup.children)
        if self.opts.cable == "pair":
            self.say(f"Started the emulator (nicemu serve, pid {pids}): one process holding both "
                     f"devices, nic0 ({MAC0}) and nic1 ({MAC1}), joined by a `pair` cable: what one "
                     f"device transmits goes straight into the other's receive path.", "setup")
        else:
            self.say(f"Started two emulator processes (nicemu serve, pids {pids}): nic0 ({MAC0}) in "
                     f"one and nic1 ({MAC1}) in the other, joined by a `shm` cable: shared-memory rings "
                     f"between the processes, with an eventfd doorbell only when the far side sleeps."
                     + (f" With {os.cpu_count()} cores, the busy-polling PMD now competes with two "
                        f"emulator processes: expect its lead to shrink." if (os.cpu_count() or 1) <= 2
                        and "pmd" in self.opts.modes else ""), "setup")
        self.say(f"Each device waits for its driver on a vfio-user socket: "
                 f"{' and '.join(self.sockets.values())}. Through it a driver maps its own memory for "
                 f"the device to DMA into, writes registers (posted: no reply, like a PCIe write), "
                 f"reads them (a round trip, like a PCIe read) and gets the interrupt as an eventfd.",
                 "setup")

    def _spawn(self, name: str, argv: list[str], stdin: bool = False) -> Child:
        self._check()
        child = Child(name, [sys.executable, "-m", "lab.l2echo", *argv], self.env,
                       pdeathsig_preexec(), stdin=stdin)
        self.children.append(child)
        return child

    def _start_generator(self) -> None:
        o = self.opts
        self.generator = gen = self._spawn("generator", [
            "generator", "--socket", self.sockets["nic0"], "--dst", MAC1, "--size", str(o.size),
            "--max-seconds", str(o.max_seconds)], stdin=True)
        gen.info = self._wait(gen, "up", UP_TIMEOUT)
        self.say(f"Started the generator on nic0 (pid {gen.pid}): a small poll-mode program that "
                 f"sends frames to nic1 and counts them as they come back. When it has to wait it "
                 f"enables nic0's RX interrupt and sleeps on it, so it never busy-polls: on 2 cores "
                 f"only the PMD under test and the emulator may keep a core busy. It is the same in "
                 f"every mode, so the differences below come from nic1's driver.", "setup")

    def _run_mode(self, mode: str) -> None:
        o = self.opts
        self.say("")
        self.say(MODE_STORIES[mode], mode)
        drv = self._spawn(f"{mode} driver", ["responder", "--socket", self.sockets["nic1"], "--mode", mode])
        try:
            drv.info = self._wait(drv, "up", UP_TIMEOUT)
            self.say(f"driver process up (pid {drv.pid}), nic1 brought up: MAC {drv.info.get('mac')}.", mode)
            phases = ([("stream", o.frames, o.window)] if o.frames else []) + (
                [("ping-pong", o.pings, 1)] if o.pings else [])
            for phase, frames, window in phases:
                m = self._measure(drv, Measurement(mode, phase, frames, window))
                self.results.append(m)
                self._narrate(m)
        finally:
            drv.stop(kill_now=self.signals_seen > 1)
            self.children.remove(drv)

    def _measure(self, drv: Child, m: Measurement) -> Measurement:
        """Snapshot, one exchange, snapshot: the differences are the phase's cost."""
        procs = {"driver": drv.pid, "generator": self.generator.pid}
        procs.update({f"emulator{i}": c.pid for i, c in enumerate(self.sup.children)})
        base = self._counters(drv)
        before = self._samples(procs)
        t0 = time.monotonic()
        self.generator.send(f"go {m.frames} {m.window}")
        done = self._wait(self.generator, "done", self.opts.max_seconds + 15)
        m.wall = time.monotonic() - t0
        after = self._samples(procs)
        final = self._counters(drv)

        m.driver = {k: v - base[k] for k, v in final.items()
                    if isinstance(v, int) and not isinstance(v, bool) and isinstance(base.get(k), int)}
        m.generator = done
        m.sent, m.received, m.echoed = done["sent"], done["received"], m.driver.get("rx", 0)
        m.seconds, m.rate, m.rtt_us = done["seconds"], done["rate"], done.get("rtt_us", {})
        m.interrupts = m.driver.get("interrupts", 0)
        m.doorbells = m.driver.get("rx_doorbells", 0) + m.driver.get("tx_doorbells", 0)
        m.mmio_reads = m.driver.get("mmio_reads", 0)
        for role in ("driver", "generator", "emulator"):
            names = [r for r in procs if r.startswith(role)]
            m.ctx[role] = sum(after[r].ctx_switches - before[r].ctx_switches for r in names)
            m.cpu[role] = sum(after[r].cpu_seconds - before[r].cpu_seconds for r in names)

        if m.sent != m.frames:
            m.problems.append(f"the generator sent {m.sent} of {m.frames}")
        if m.echoed != m.frames:
            m.problems.append(f"nic1's driver received {m.echoed} of {m.frames}")
        if m.received != m.frames:
            m.problems.append(f"{m.received} of {m.frames} came back")
        if done.get("bytes_back") != m.received * (self.opts.size - FCS_LEN):
            m.problems.append(f"{done.get('bytes_back')} bytes came back, not "
                              f"{m.received} x {self.opts.size - FCS_LEN}")
        if done.get("out_of_order") or done.get("stale"):
            m.problems.append(f"{done.get('out_of_order')} echoes out of order, {done.get('stale')} "
                              f"left over from an earlier exchange")
        if done.get("stalled"):
            m.problems.append(f"nothing came back for {STALL_SECONDS:g} s")
        return m

    def _samples(self, procs: dict[str, int]) -> dict[str, ProcSample]:
        try:
            return {role: proc_sample(pid) for role, pid in procs.items()}
        except OSError:  # one of them is gone: say which
            self._check_alive()
            raise DemoError(f"cannot read /proc for {procs}") from None

    def _counters(self, drv: Child) -> dict:
        """A snapshot of the driver's counters (SIGUSR1 -> one "counters" line)."""
        drv.popen.send_signal(signal.SIGUSR1)
        return self._wait(drv, "counters", 10.0)

    def _wait(self, child: Child, event: str, timeout: float) -> dict:
        """Wait for `event` from `child`, reading every child's output meanwhile. Raises
        DemoError if it dies or time runs out, Interrupted on a stop signal."""
        deadline = time.monotonic() + timeout
        while True:
            ev = child.take(event)
            if ev is not None:
                return ev
            self._check()
            self._check_alive()
            left = deadline - time.monotonic()
            if left <= 0:
                raise DemoError(f"{child.name} (pid {child.pid}): no {event!r} report in {timeout:g} s")
            fds = {fd: c for c in self.children for fd in c.fds}
            if not fds:
                time.sleep(min(0.1, left))
                continue
            ready, _, _ = select.select(list(fds), [], [], min(0.1, left))
            for fd in ready:
                fds[fd].pump(fd)

    def _check_alive(self) -> None:
        """Every process of the demo must live until we stop it: the emulator first (its
        death is why the drivers complain), then any child whose last words are read."""
        dead = next((c for c in self.sup.children if c.poll() is not None), None) if self.sup else None
        if dead is not None:
            rc = dead.status or 0
            how = f"was killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with status {rc}"
            raise DemoError(f"the emulator (nicemu serve, pid {dead.pid}) {how}")
        for c in self.children:
            if not c.fds and not c.alive():
                raise DemoError(c.why_dead())

    def _narrate(self, m: Measurement) -> None:
        if cpu_measurable(m):
            cpu = f"was on a CPU {_share(m.cpu.get('driver', 0.0), m.wall)} of the time"
        else:
            cpu = (f"its CPU time is not measured: {_ms(m.wall)} is too short for CPU time counted "
                   f"in {_ms(1 / _clock_ticks())} ticks")
        if m.phase == "stream":
            self.say(f"stream: {m.received} frames out and back in {m.seconds:.2f} s with up to "
                     f"{m.window} in flight: {m.rate:,.0f} frames/s. Per packet, nic1's driver took "
                     f"{m.per_packet(m.interrupts):.4f} interrupts ({_plural(m.interrupts, 'interrupt')} "
                     f"in all), rang {m.per_packet(m.doorbells):.3f} doorbells and read "
                     f"{m.per_packet(m.mmio_reads):.4f} registers; it was switched out "
                     f"{_plural(m.ctx['driver'], 'time')} and {cpu}.", m.mode)
        else:
            extra = ""
            if m.interrupts > 1.05 * m.echoed:
                extra = (" (more than one: when the echo's transmit completes after the driver went "
                         "back to sleep, TXDW interrupts again to have TX cleaned)")
            self.say(f"ping-pong: {m.received} frames, one in flight: round trip "
                     f"{m.rtt_us.get('p50', 0):,.0f} us median, {m.rtt_us.get('p99', 0):,.0f} us at the "
                     f"99th percentile. Per packet, nic1's driver took {m.per_packet(m.interrupts):.2f} "
                     f"interrupts{extra}, rang {m.per_packet(m.doorbells):.2f} doorbells (nothing to "
                     f"batch) and read {m.per_packet(m.mmio_reads):.2f} registers; it was switched out "
                     f"{m.per_packet(m.ctx['driver']):.1f} times per packet and {cpu}.", m.mode)
        if m.problems:
            self.say(f"INCOMPLETE: {'; '.join(m.problems)}.", m.mode)

    def _print_tables(self) -> None:
        print(file=self.out)
        print(format_tables(self.results, self.opts.size), file=self.out, flush=True)
        if self.quiet:
            return
        print(textwrap.dedent("""
            irq/pkt, doorbells/pkt, reads/pkt: per frame nic1's driver received: interrupts it took,
              RDT+TDT register writes, register reads (each read is a round trip to the emulator)
            context switches: voluntary + involuntary (/proc/PID/status) during the phase, of nic1's
              driver, the generator and the emulator; driver cpu: its CPU time / the phase's wall time
              ("n/a": the phase took under {min_cpu}, too short for CPU time counted in {tick} ticks)""")
              .rstrip().format(min_cpu=_ms(CPU_MIN_TICKS / _clock_ticks()), tick=_ms(1 / _clock_ticks())),
              file=self.out, flush=True)
        self._lesson()

    def _lesson(self) -> None:
        """One paragraph that reads the tables aloud: every sentence follows from the figures
        measured in this run, and a figure that could not be measured (a phase too short for
        CPU time, an incomplete phase) is said to be missing instead of compared."""
        parts = lesson_sentences(self.results)
        if parts:
            self.say("")
            self.say(" ".join(parts), "lesson")

    # --- cleanup ------------------------------------------------------------------------

    def _cleanup(self) -> None:
        """Drivers first (they reset their devices), then the emulator, then our files."""
        for child in list(self.children):
            try:
                child.stop(kill_now=self.signals_seen > 1)
            except Exception as e:  # keep cleaning whatever happens
                print(f"nicemu drivers: stopping {child.name}: {e}", file=sys.stderr)
        self.children.clear()
        if self.sup is not None:
            try:
                self.sup.stop()
            except Exception as e:
                print(f"nicemu drivers: stopping the emulator: {e}", file=sys.stderr)
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            if self.created_parent:
                remove_parent_if_empty(self.run_dir)
        self.say("")
        self.say("Stopped every driver, the generator and the emulator; sockets and the run's "
                 "directory removed.", "done")


# =====================================================================================
# Command line
# =====================================================================================

def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"a comma-separated list of {', '.join(MODES)}, got {text!r}")
    return modes


def _count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {v}")
    return v


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of `nicemu demo` (cli.py builds the subcommand around them)."""
    ap.add_argument("--frames", type=_count, default=DEFAULT_FRAMES, metavar="N",
                    help=f"frames of the stream in each mode, out and back (default {DEFAULT_FRAMES})")
    ap.add_argument("--pings", type=_count, default=DEFAULT_PINGS, metavar="N",
                    help=f"frames of the ping-pong in each mode, one at a time (default {DEFAULT_PINGS}; "
                         f"0 skips it)")
    ap.add_argument("--size", type=int, default=DEFAULT_SIZE, metavar="BYTES",
                    help=f"frame size on the wire including the 4-byte FCS, 64..1518 (default "
                         f"{DEFAULT_SIZE}: 60 bytes of header and payload + FCS)")
    ap.add_argument("--modes", type=_modes, default=list(MODES), metavar="LIST",
                    help="which modes to run, in this order: irq,napi,pmd (default all three)")
    ap.add_argument("--window", type=_count, default=DEFAULT_WINDOW, metavar="N",
                    help=f"frames in flight in the stream, 1..{MAX_WINDOW} (default {DEFAULT_WINDOW})")
    ap.add_argument("--cable", choices=("pair", "shm"), default="pair",
                    help="pair: both devices in one emulator process (default); shm: each in its "
                         "own, joined by shared-memory rings")
    ap.add_argument("--max-seconds", type=float, default=MAX_SECONDS, metavar="S",
                    help=f"end an exchange after this long even if frames are missing (default "
                         f"{MAX_SECONDS:g})")
    ap.add_argument("--quiet", action="store_true", help="print only the tables")
    ap.add_argument("--json", action="store_true",
                    help="also print every figure of every phase as one JSON line at the end")


def _check_options(opts: argparse.Namespace) -> str | None:
    if not 64 <= opts.size <= 1518:
        return f"--size {opts.size}: a frame is 64..1518 bytes with its FCS"
    if not 1 <= opts.window <= MAX_WINDOW:
        return f"--window {opts.window}: 1..{MAX_WINDOW} (the RX ring holds {RING_SIZE - 1} frames)"
    if opts.frames == 0 and opts.pings == 0:
        return "--frames 0 and --pings 0: nothing to send"
    if opts.max_seconds <= 0:
        return "--max-seconds must be positive"
    return None


def run(opts: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run the demo with parsed options; returns the exit status (2: bad options)."""
    problem = _check_options(opts)
    if problem:
        print(f"nicemu drivers: {problem}", file=sys.stderr)
        return 2
    return Demo(opts, out).run()


def main(argv: Sequence[str] | argparse.Namespace | None = None) -> int:
    """`nicemu demo [options]` (a Namespace from cli.py, or an argv list)."""
    if isinstance(argv, argparse.Namespace):
        return run(argv)
    ap = argparse.ArgumentParser(prog="lab.l2echo", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))

