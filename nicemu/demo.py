"""`nicemu demo`: two emulated NICs back to back, a driver per process, three ways to drive a NIC.

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

Child roles (started by the controller; runnable by hand for experiments):
    python -m nicemu.demo responder --socket PATH --mode irq|napi|pmd
    python -m nicemu.demo generator --socket PATH --dst MAC [--size BYTES]
        stdin: a line "go FRAMES WINDOW" per exchange; EOF ends it
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence, TextIO

from wire.ethernet import ETH_FCS_LEN, EtherType
from wire.mac import parse_mac

__all__ = ["main", "add_arguments", "run", "child_main", "proc_sample", "format_tables",
           "lesson_sentences", "Measurement", "MODES"]

MODES = ("irq", "napi", "pmd")
MAC0 = "52:54:00:12:34:56"  # nic0: the generator's device
MAC1 = "52:54:00:12:34:57"  # nic1: the device of the driver under test
RING_SIZE = 1024  # descriptors per RX and TX ring, for every driver of the demo
DEFAULT_FRAMES = 100000
DEFAULT_PINGS = 2000
DEFAULT_SIZE = 64  # bytes on the wire, FCS included (the classic "64-byte frames")
DEFAULT_WINDOW = 512  # frames in flight in the stream
MAX_WINDOW = RING_SIZE - 32  # below the RX ring: a window that fits can never overrun it
ETHERTYPE = int(EtherType.LOCAL_EXP1).to_bytes(2, "big")  # IEEE 802 local experimental EtherType
FCS_LEN = ETH_FCS_LEN
BURST = 32  # frames per rx/tx burst in the generator and the PMD responder
IDLE_WAIT = 0.1  # s: longest sleep of a child's loop, so it sees signals and stdin promptly
STALL_SECONDS = 5.0  # the generator gives up when no frame came back for this long
MAX_SECONDS = 60.0  # and ends an exchange after this long whatever happens
UP_TIMEOUT = 30.0  # s for a child to connect and bring its device up (a loaded machine)
CHILD_STOP_TIMEOUT = 3.0  # s a child gets after SIGTERM before SIGKILL
# CPU time comes from /proc in clock ticks (10 ms at the usual 100 Hz), read at both ends of a
# phase: a share of the phase's wall time is good to +-10% only over 20 ticks or more. Shorter
# phases get no CPU figure and no conclusion drawn from one.
CPU_MIN_TICKS = 20

# What each mode is, for the narration (driver.e1000's and driver.pmd's docstrings say more).
MODE_STORIES = {
    "irq": (
        "The kernel-style driver (driver.e1000) in interrupt mode. A frame that lands raises "
        "RXT0 at once (RDTR 0, no ITR throttling) and the device signals the driver's eventfd. "
        "The top half reads ICR - a round trip to the device that also acknowledges the "
        "interrupt - and the bottom half takes every completed RX descriptor, copies each frame "
        "into an sk_buff, hands it to the echo application, gives buffers back to the device "
        "(one RDT write per 16) and cleans TX. Interrupts stay enabled throughout: one "
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


# =====================================================================================
# Child processes: the driver under test (`responder`) and the traffic generator
# =====================================================================================

def _emit(obj: dict) -> None:
    """One report line for the controller."""
    print(json.dumps(obj), flush=True)


class _ChildSignals:
    """SIGTERM/SIGINT ask the loop to stop; SIGUSR1 asks for a counters report. Handlers only
    set flags: the loops look at them at least every IDLE_WAIT seconds."""

    def __init__(self) -> None:
        self.stop = False
        self.report = False
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGUSR1, self._on_report)

    def _on_stop(self, _signum: int, _frame: Any) -> None:
        self.stop = True

    def _on_report(self, _signum: int, _frame: Any) -> None:
        self.report = True


def _run_child(args: argparse.Namespace) -> int:
    """One child of `nicemu demo`: connect to its device, run its role there, and turn a
    device that cannot be reached or goes away into an "error" line and exit status 1.

    The responder (the driver under test: _respond_kernel or _respond_pmd) brings nic1 up in
    `args.mode` and echoes every frame back. It reports "up" after bring-up, "counters" on
    SIGUSR1 and once more at exit (SIGTERM/SIGINT); counter values are totals since bring-up,
    and the controller subtracts two snapshots. The generator: _generate."""
    from driver.bus import BusError
    from driver.vfio_user_client import VfioUserBus

    sig = _ChildSignals()
    try:
        raw = VfioUserBus(args.socket, mem_size=8 << 20)
    except BusError as e:
        _emit({"event": "error", "message": str(e)})
        return 1
    try:
        if args.role == "generator":
            return _generate(raw, args, sig)
        if args.mode == "pmd":
            return _respond_pmd(raw, sig)
        return _respond_kernel(raw, args.mode, sig)
    except BusError as e:
        _emit({"event": "error", "message": f"device gone: {e}"})
        return 1
    finally:
        raw.close()


def _respond_kernel(raw: Any, mode: str, sig: _ChildSignals) -> int:
    """driver.e1000 under driver.kernel's echo application, on a bus that counts register
    accesses (the driver itself counts interrupts and doorbells)."""
    from driver.e1000 import E1000, E1000Config
    from driver.kernel import DriverApp
    from driver.pmd import CountingBus

    bus = CountingBus(raw)
    drv = E1000(bus, E1000Config(mode="interrupt" if mode == "irq" else "napi",
                                 rx_ring_size=RING_SIZE, tx_ring_size=RING_SIZE))
    app = DriverApp(drv, "echo", txqueuelen=RING_SIZE)
    mac = drv.open()
    _emit({"event": "up", "pid": os.getpid(), "mac": mac, "mode": mode, "carrier": drv.carrier})

    def counters() -> dict:
        st = drv.stats
        return {
            "rx": st.rx_packets, "tx": st.tx_packets,
            "interrupts": st.interrupts + st.spurious_interrupts,
            "spurious_interrupts": st.spurious_interrupts,
            "rx_doorbells": st.rx_doorbells, "tx_doorbells": st.tx_doorbells,
            "mmio_reads": bus.reads, "mmio_writes": bus.writes,
            "polls": st.polls, "napi_completes": st.napi_completes, "bottom_halves": st.bottom_halves,
            "tx_queue_stops": st.tx_queue_stops, "dropped": app.qdisc_drops + st.tx_dropped,
        }

    try:
        while not sig.stop:
            app.after_turn()  # echo what the last turn received: one TDT write for all of it
            drv.process(0.0 if drv.napi_scheduled else IDLE_WAIT)
            if sig.report:
                sig.report = False
                _emit({"event": "counters", **counters()})
        final = counters()
        drv.update_stats()  # after the snapshot: these reads are bookkeeping, not traffic
        final["rx_missed"] = drv.hw_stats["MPC"]
        _emit({"event": "counters", "final": True, **final})
    finally:
        drv.close()
    return 0


def _respond_pmd(raw: Any, sig: _ChildSignals) -> int:
    """driver.pmd busy-polling nic1: each burst turned around in place and sent back."""
    from driver.pmd import Pmd

    pmd = Pmd(raw, RING_SIZE, RING_SIZE, mode="poll", burst=BURST)
    _emit({"event": "up", "pid": os.getpid(), "mac": pmd.mac, "mode": "pmd", "engine": pmd.engine})
    core = pmd.core
    pool = pmd.pool
    view = pool.mem.view(pool.addr, pool.num_bufs * pool.buf_size)  # the whole pool, zero copy
    data_off = pool.data_off
    buf_size = pool.buf_size
    out = array("I", [0]) * BURST
    rx_burst = pmd.rx_burst_idx
    tx_burst = pmd.tx_burst_idx
    dropped = 0

    def counters() -> dict:
        return {
            "rx": core.ipackets, "tx": core.opackets, "interrupts": pmd.interrupts,
            "rx_doorbells": core.rx_doorbells, "tx_doorbells": core.tx_doorbells,
            "mmio_reads": pmd.bus.reads, "mmio_writes": pmd.bus.writes,
            "empty_polls": pmd.empty_polls, "dropped": dropped,
        }

    try:
        while not sig.stop:
            n = rx_burst(out, BURST)
            if n:
                for k in range(n):  # swap destination and source MAC (the application's work)
                    i = out[k]
                    off = i * buf_size + data_off[i]
                    h = view[off : off + 12].tobytes()
                    view[off : off + 12] = h[6:] + h[:6]
                sent = tx_burst(out, n)
                if sent < n:  # the TX ring is full: drop the rest, as an L2 forwarder does
                    pmd.free_bulk(out, n - sent, sent)
                    dropped += n - sent
            if sig.report:
                sig.report = False
                _emit({"event": "counters", **counters()})
        final = counters()
        final["rx_missed"] = pmd.stats_update().get("MPC", 0)
        _emit({"event": "counters", "final": True, **final})
    finally:
        pmd.close()
    return 0


def _generate(raw: Any, args: argparse.Namespace, sig: _ChildSignals) -> int:
    """Drive nic0 with the PMD; for each line "go FRAMES WINDOW" on stdin, exchange FRAMES
    frames with the echoing peer (at most WINDOW in flight) and report "done"."""
    from driver.pmd import Pmd

    pmd = Pmd(raw, RING_SIZE, RING_SIZE, mode="poll", burst=BURST)
    try:
        end = time.monotonic() + 10
        while not pmd.link_up():  # the cable's far end comes up with its emulator
            if time.monotonic() > end or sig.stop:
                _emit({"event": "error", "message": "nic0: no link after 10 s"})
                return 1
            time.sleep(0.05)
        _emit({"event": "up", "pid": os.getpid(), "mac": pmd.mac, "engine": pmd.engine})
        exchanges = _Exchanges(pmd, args, sig)
        for command in _commands(sig):
            words = command.split()
            if len(words) == 3 and words[0] == "go" and words[1].isdigit() and words[2].isdigit():
                _emit({"event": "done", **exchanges.run(int(words[1]), int(words[2]))})
            elif words:
                _emit({"event": "error", "message": f"unknown command {command!r}"})
    finally:
        pmd.close()
    return 0


def _commands(sig: _ChildSignals) -> Iterator[str]:
    """Lines from stdin until EOF or a stop signal (never blocking longer than IDLE_WAIT)."""
    buf = b""
    fd = sys.stdin.fileno()
    while not sig.stop:
        ready, _, _ = select.select([fd], [], [], IDLE_WAIT)
        if not ready:
            continue
        data = os.read(fd, 4096)
        if not data:
            return
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line.decode(errors="replace").strip()


class _Exchanges:
    """nic0's side of the traffic: frames numbered in sequence (the numbers run on from one
    exchange to the next, so a late echo of an earlier one is recognized), echoes checked
    for order, round-trip times measured."""

    def __init__(self, pmd: Any, args: argparse.Namespace, sig: _ChildSignals) -> None:
        self.pmd = pmd
        self.args = args
        self.sig = sig
        self.next_seq = 0

    def run(self, total: int, window: int) -> dict:
        """Send `total` frames to args.dst, never more than `window` unanswered, and take the
        echoes back. Waits by sleeping on RXT0 (Pmd.sleep), never by spinning.

        Round-trip times: echoes come back in order, so a FIFO of (send time, frames) per TX
        burst tells each received frame when it left; with window 1 that is a ping-pong."""
        pmd, args, sig = self.pmd, self.args, self.sig
        core = pmd.core
        pool = pmd.pool
        view = pool.mem.view(pool.addr, pool.num_bufs * pool.buf_size)
        data_off = pool.data_off
        buf_size = pool.buf_size
        header = parse_mac(args.dst) + parse_mac(pmd.mac) + ETHERTYPE
        length = args.size - FCS_LEN  # the device appends the FCS (IFCS)
        window = max(1, window)
        tx_idx = array("I", [0]) * BURST
        rx_idx = array("I", [0]) * BURST
        before = {"sleeps": pmd.sleeps, "interrupts": pmd.interrupts, "reads": pmd.bus.reads,
                  "writes": pmd.bus.writes, "ibytes": core.ibytes}
        seq0 = next_seq = self.next_seq
        expect = seq0  # the next sequence number due back
        out_of_order = stale = 0
        in_flight: deque[list[int]] = deque()  # [send time ns, frames of that burst not back yet]
        rtts: list[int] = []
        clock = time.monotonic_ns
        sent = received = 0
        first_tx = last_rx = 0
        stalled = False
        start = last_progress = clock()
        limit = int(args.max_seconds * 1e9)
        stall = int(args.stall_seconds * 1e9)
        while received < total and not sig.stop:
            room = min(window - (sent - received), total - sent, BURST)
            queued = 0
            if room > 0 and core.alloc_bulk(tx_idx, room, length):
                for k in range(room):  # header and sequence number (the buffer may hold an old echo)
                    i = tx_idx[k]
                    off = i * buf_size + data_off[i]
                    view[off : off + 22] = header + (next_seq + k).to_bytes(8, "big")
                t = clock()  # before the doorbell: if we are preempted after it, the echo may be back
                queued = core.tx_burst(tx_idx, room, 0)
                if queued < room:
                    core.free_bulk(tx_idx, room - queued, queued)
                next_seq += queued
                if queued:
                    in_flight.append([t, queued])
                    if not first_tx:
                        first_tx = t
                sent += queued
            got = core.rx_burst(rx_idx, BURST)
            if got:
                now = clock()
                fresh = got
                for k in range(got):  # each echo must be the next one due: none lost, none twice
                    i = rx_idx[k]
                    off = i * buf_size + data_off[i] + 14
                    seq = int.from_bytes(view[off : off + 8], "big")
                    if seq != expect:
                        if seq < seq0:  # an echo left over from an earlier exchange
                            stale += 1
                            fresh -= 1
                            continue
                        out_of_order += 1
                    expect = seq + 1
                core.free_bulk(rx_idx, got, 0)
                received += fresh
                last_rx = last_progress = now
                got = fresh
                while got and in_flight:
                    burst = in_flight[0]
                    n = min(got, burst[1])
                    rtts.extend([now - burst[0]] * n)
                    got -= n
                    burst[1] -= n
                    if not burst[1]:
                        in_flight.popleft()
                continue
            if clock() - start > limit:
                break
            if not queued:  # nothing came back and nothing more may go: sleep until a frame lands
                if not pmd.sleep(IDLE_WAIT) and clock() - last_progress > stall:
                    stalled = True
                    break
        core.tx_reclaim()
        self.next_seq = next_seq
        seconds = (last_rx - first_tx) / 1e9 if first_tx and last_rx else 0.0
        rtts.sort()
        return {
            "sent": sent, "received": received, "window": window, "seconds": round(seconds, 6),
            "rate": round(received / seconds, 1) if seconds > 0 else 0.0,
            "rtt_us": {q: round(rtts[min(len(rtts) - 1, int(len(rtts) * f))] / 1000, 1)
                       for q, f in (("min", 0.0), ("p50", 0.5), ("p99", 0.99), ("max", 1.0))} if rtts else {},
            "bytes_back": core.ibytes - before["ibytes"], "stalled": stalled,
            "out_of_order": out_of_order, "stale": stale,
            "sleeps": pmd.sleeps - before["sleeps"], "interrupts": pmd.interrupts - before["interrupts"],
            "mmio_reads": pmd.bus.reads - before["reads"], "mmio_writes": pmd.bus.writes - before["writes"],
        }


def _child_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m nicemu.demo",
                                 description="The child processes of `nicemu demo`.")
    sub = ap.add_subparsers(dest="role", required=True)
    r = sub.add_parser("responder", help="the driver under test: echo every frame back")
    r.add_argument("--socket", required=True)
    r.add_argument("--mode", choices=MODES, required=True)
    g = sub.add_parser("generator", help="the traffic generator (a PMD that sleeps when it waits)")
    g.add_argument("--socket", required=True)
    g.add_argument("--dst", required=True, help="the responder's MAC")
    g.add_argument("--size", type=int, default=DEFAULT_SIZE,
                   help="frame size on the wire including the 4-byte FCS")
    g.add_argument("--stall-seconds", type=float, default=STALL_SECONDS)
    g.add_argument("--max-seconds", type=float, default=MAX_SECONDS)
    return ap


def child_main(argv: Sequence[str] | None = None) -> int:
    return _run_child(_child_parser().parse_args(argv))


# =====================================================================================
# The controller: `nicemu demo`
# =====================================================================================

class DemoError(RuntimeError):
    """Something the user should read: a child died, a device went away, a timeout."""


class _Interrupted(Exception):
    """SIGINT/SIGTERM/SIGHUP arrived: stop everything and exit with 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class ProcSample:
    """What /proc says about one process at one moment."""

    ctx_switches: int  # voluntary + involuntary
    cpu_seconds: float  # user + system


def proc_sample(pid: int) -> ProcSample:
    """Context switches from /proc/PID/status, CPU time from /proc/PID/stat."""
    ctx = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                ctx += int(line.split()[1])
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": field 3 is fields[0]
    ticks = int(fields[11]) + int(fields[12])  # fields 14 and 15: utime, stime
    return ProcSample(ctx, ticks / os.sysconf("SC_CLK_TCK"))


class _Child:
    """A child process reporting JSON lines on stdout, read without threads or blocking
    (no threads: the children are started with a preexec_fn, which threads make unsafe)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], preexec: Any,
                 stdin: bool = False) -> None:
        self.name = name
        self.popen = subprocess.Popen(
            argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=env, preexec_fn=preexec, process_group=0)
        self._stdout = self.popen.stdout.fileno()
        self.fds = {self._stdout: bytearray(), self.popen.stderr.fileno(): bytearray()}
        for fd in self.fds:
            os.set_blocking(fd, False)
        self.events: deque[dict] = deque()
        self.stderr_tail: deque[str] = deque(maxlen=15)
        self.info: dict = {}  # its "up" event

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def pump(self, fd: int) -> None:
        """Read what `fd` has; complete stdout lines become events."""
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            rest = self.fds.pop(fd, b"")
            if rest:
                self._line(fd, bytes(rest))
            return
        buf = self.fds[fd]
        buf += data
        while (nl := buf.find(b"\n")) >= 0:
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            self._line(fd, line)

    def _line(self, fd: int, line: bytes) -> None:
        text = line.decode(errors="replace").rstrip()
        if fd == self._stdout:
            try:
                ev = json.loads(text)
            except ValueError:
                ev = None
            if isinstance(ev, dict) and "event" in ev:
                self.events.append(ev)
                return
        if text:
            self.stderr_tail.append(text)

    def take(self, name: str) -> dict | None:
        """The first queued event called `name` (others before it are dropped); an "error"
        event raises DemoError."""
        while self.events:
            ev = self.events.popleft()
            if ev["event"] == "error":
                raise DemoError(f"{self.name} (pid {self.pid}): {ev.get('message')}")
            if ev["event"] == name:
                return ev
        return None

    def send(self, line: str) -> None:
        try:
            self.popen.stdin.write(line.encode() + b"\n")
            self.popen.stdin.flush()
        except OSError:
            pass  # it died: the wait for its answer says so

    def why_dead(self) -> str:
        rc = self.popen.returncode
        how = (f"was killed by {signal.Signals(-rc).name}" if rc is not None and rc < 0
               else f"exited with status {rc}")
        tail = "\n    ".join(self.stderr_tail)
        return f"{self.name} (pid {self.pid}) {how}" + (f"; it said:\n    {tail}" if tail else "")

    def stop(self, kill_now: bool = False, timeout: float = CHILD_STOP_TIMEOUT) -> None:
        """SIGTERM (or SIGKILL), wait, SIGKILL if it lingers; reap; close the pipes."""
        if self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGKILL if kill_now else signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
        self.popen.wait()
        for fd in list(self.fds):  # keep its last words for an error message
            self.pump(fd)
        for f in (self.popen.stdout, self.popen.stderr):
            with contextlib.suppress(OSError):
                f.close()
        self.fds.clear()


@dataclass
class Measurement:
    """One phase of one mode: what nic1's driver did with `frames` frames each way."""

    mode: str
    phase: str  # "stream" or "ping-pong"
    frames: int  # asked for, each way
    window: int
    sent: int = 0  # by the generator
    echoed: int = 0  # received (and sent back) by the driver under test
    received: int = 0  # back at the generator
    seconds: float = 0.0  # first frame sent to last frame back
    rate: float = 0.0  # frames back per second
    rtt_us: dict[str, float] = field(default_factory=dict)  # min, p50, p99, max
    interrupts: int = 0
    doorbells: int = 0  # RDT + TDT writes
    mmio_reads: int = 0
    ctx: dict[str, int] = field(default_factory=dict)  # process role -> context switches
    cpu: dict[str, float] = field(default_factory=dict)  # process role -> CPU seconds
    wall: float = 0.0  # seconds between the two snapshots
    driver: dict = field(default_factory=dict)  # the driver's counter differences
    generator: dict = field(default_factory=dict)  # the generator's "done" report
    problems: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.problems

    def per_packet(self, value: float) -> float:
        return value / self.echoed if self.echoed else 0.0

    def as_dict(self) -> dict:
        return {
            "mode": self.mode, "phase": self.phase, "frames": self.frames, "window": self.window,
            "sent": self.sent, "echoed": self.echoed, "received": self.received,
            "seconds": self.seconds, "rate": self.rate, "rtt_us": self.rtt_us,
            "interrupts": self.interrupts, "doorbells": self.doorbells, "mmio_reads": self.mmio_reads,
            "interrupts_per_packet": round(self.per_packet(self.interrupts), 4),
            "doorbells_per_packet": round(self.per_packet(self.doorbells), 4),
            "mmio_reads_per_packet": round(self.per_packet(self.mmio_reads), 4),
            "context_switches": self.ctx, "cpu_seconds": {k: round(v, 3) for k, v in self.cpu.items()},
            "wall_seconds": round(self.wall, 3), "driver": self.driver, "generator": self.generator,
            "problems": self.problems,
        }


def _pdeathsig_preexec() -> Any:
    """Children die with the controller, even when it is killed with SIGKILL (the
    supervisor's PR_SET_PDEATHSIG preexec_fn, which `nicemu up` uses for its children)."""
    from nicemu.supervisor import _pdeathsig_preexec as preexec

    return preexec(os.getpid())


@contextlib.contextmanager
def _stdout_to_devnull() -> Iterator[None]:
    """Processes started inside inherit /dev/null as stdout (the emulator's banner lines
    would otherwise land in the middle of the narration)."""
    sys.stdout.flush()
    saved = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


PARENT_MARK = "made-parent"  # in a run's directory: that run created /tmp/nicemu-UID


def _run_directory() -> tuple[Path, bool]:
    """A private directory for this run's config and sockets: /tmp/nicemu-UID/_demo-PID (no
    topology's runtime directory starts with "_"), and whether this run is to remove the
    per-user parent /tmp/nicemu-UID at the end if it is empty then: it created the parent, or
    it swept away the directory of a dead demo that had (marked by a PARENT_MARK file).

    The controller removes its directory when it ends; one left by a demo that was killed with
    SIGKILL (its children are gone too: PR_SET_PDEATHSIG) is removed by the next demo."""
    from nicemu.supervisor import _listening_paths
    from nicemu.topology import default_runtime_dir, ensure_private_dir

    mine = default_runtime_dir(f"_demo-{os.getpid()}")
    created_parent = not mine.parent.exists()
    parent = ensure_private_dir(mine.parent)
    listening = _listening_paths() or set()
    for old in parent.glob("_demo-*"):
        pid = old.name[len("_demo-") :]
        if not pid.isdigit() or Path(f"/proc/{pid}").exists():
            continue  # that demo is still running
        if any(str(sock) in listening for sock in old.glob("*.sock")):
            continue  # something still serves there: not ours to remove
        if (old / PARENT_MARK).exists():
            created_parent = True  # it would have removed the parent: we do it in its place
        shutil.rmtree(old, ignore_errors=True)
    for attempt in range(5):
        try:
            ensure_private_dir(mine)
            break
        except FileNotFoundError:  # another run removed the (empty) parent just now: again
            if attempt == 4:
                raise
            created_parent = True
    if created_parent:
        (mine / PARENT_MARK).touch()
    return mine, created_parent


def _remove_parent_if_empty(run_dir: Path) -> None:
    """Remove the per-user parent of `run_dir` if it is empty. rmdir removes only an empty
    directory, atomically: a parent that another run (a demo, `nicemu up`) has put anything
    in is left alone. A run that made the parent and is about to make its own directory in
    it may lose the parent in between; _run_directory retries for that case."""
    with contextlib.suppress(OSError):  # not empty, or already gone: either way, not ours
        os.rmdir(run_dir.parent)


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
        self.children: list[_Child] = []
        self.generator: _Child | None = None
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
            raise _Interrupted(self.stop_signal)

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
            except _Interrupted as e:
                print(f"nicemu demo: {signal.Signals(e.signum).name}: stopping", file=sys.stderr, flush=True)
                rc = 128 + e.signum
            except DemoError as e:
                reason = str(e)
                if self.sup is not None and any(c.poll() is not None for c in self.sup.children):
                    try:
                        self._check_alive()
                    except DemoError as why:  # a dead emulator explains the drivers' complaints
                        reason = f"{why}; {e}" if str(why) != reason else reason
                print(f"nicemu demo: {reason}", file=sys.stderr, flush=True)
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
        self.say(f"nicemu demo: two emulated Intel 82540EM NICs joined back to back; every device "
                 f"and every driver runs in a process of its own. nic0 is driven by a traffic "
                 f"generator, nic1 by the driver under test, which echoes every frame back. In each "
                 f"mode ({', '.join(o.modes)}) the generator sends {' and '.join(phases)}, "
                 f"{o.size}-byte frames, and we count what it costs nic1's driver.")
        self.say("")

    def _start_emulator(self) -> None:
        from nicemu import topology as T
        from nicemu.supervisor import Supervisor

        from nicemu.supervisor import SupervisorError

        try:
            self.run_dir, self.created_parent = _run_directory()
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
            with _stdout_to_devnull():
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

    def _spawn(self, name: str, argv: list[str], stdin: bool = False) -> _Child:
        self._check()
        child = _Child(name, [sys.executable, "-m", "nicemu.demo", *argv], self.env,
                       _pdeathsig_preexec(), stdin=stdin)
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

    def _measure(self, drv: _Child, m: Measurement) -> Measurement:
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

    def _counters(self, drv: _Child) -> dict:
        """A snapshot of the driver's counters (SIGUSR1 -> one "counters" line)."""
        drv.popen.send_signal(signal.SIGUSR1)
        return self._wait(drv, "counters", 10.0)

    def _wait(self, child: _Child, event: str, timeout: float) -> dict:
        """Wait for `event` from `child`, reading every child's output meanwhile. Raises
        DemoError if it dies or time runs out, _Interrupted on a stop signal."""
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
                print(f"nicemu demo: stopping {child.name}: {e}", file=sys.stderr)
        self.children.clear()
        if self.sup is not None:
            try:
                self.sup.stop()
            except Exception as e:
                print(f"nicemu demo: stopping the emulator: {e}", file=sys.stderr)
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            if self.created_parent:
                _remove_parent_if_empty(self.run_dir)
        self.say("")
        self.say("Stopped every driver, the generator and the emulator; sockets and the run's "
                 "directory removed.", "done")


def _clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def cpu_measurable(m: "Measurement") -> bool:
    """Whether the phase lasted long enough for CPU time counted in clock ticks to mean
    anything (CPU_MIN_TICKS ticks: +-10%)."""
    return m.wall >= CPU_MIN_TICKS / _clock_ticks()


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def _compare(a: float, b: float, more: str = "more", fewer: str = "fewer") -> str:
    """How a compares with b, in words that follow from the numbers: the difference in percent
    ("4% more"), or the ratio from about twice as many."""
    if b == 0:
        return "as many" if a == 0 else more
    r = a / b
    if round(abs(r - 1) * 100) == 0:
        return "as many"
    if r > 1:
        return f"{r:.1f} times as many" if r >= 1.95 else f"{(r - 1) * 100:.0f}% {more}"
    return f"{(1 - r) * 100:.0f}% {fewer}"


def lesson_sentences(results: Sequence["Measurement"]) -> list[str]:
    """The lesson of a run, sentence by sentence, from its measurements."""
    by = {(r.mode, r.phase): r for r in results if r.complete}
    parts: list[str] = []
    irq, napi, pmd = (by.get((mode, "stream")) for mode in MODES)
    if pmd and irq and irq.rate:
        r = pmd.rate / irq.rate
        how = (f"{r:.1f} times as many frames per second as" if r >= 1.05 else
               "about as many frames per second as" if r >= 0.95 else
               f"fewer frames per second ({r:.2f} times as many) than")
        parts.append(f"In the stream the PMD moved {how} the interrupt-driven driver "
                     f"({pmd.rate:,.0f} against {irq.rate:,.0f}), with "
                     f"{_plural(pmd.interrupts, 'interrupt')} and {_plural(pmd.mmio_reads, 'register read')}.")
    if napi and irq:
        a, b = napi.per_packet(napi.interrupts), irq.per_packet(irq.interrupts)
        sentence = (f"Under load NAPI took {_plural(napi.interrupts, 'interrupt')} for {napi.echoed:,} "
                    f"frames ({a:.3f} per packet) against {irq.interrupts:,} for {irq.echoed:,} "
                    f"({b:.3f}) in interrupt mode: {_compare(a, b)} per packet")
        if a < 0.95 * b:
            sentence += ", as it keeps interrupts masked while its polls fill their budget."
        elif a <= 1.05 * b:
            sentence += ": its polls seldom filled their budget, so it re-enabled interrupts about as often."
        else:
            sentence += "."
        parts.append(sentence)
    ping_irq, ping_napi, ping_pmd = (by.get((mode, "ping-pong")) for mode in MODES)
    if ping_irq and ping_irq.echoed:
        sentence = (f"One frame at a time, every packet cost the interrupt-driven driver "
                    f"{ping_irq.per_packet(ping_irq.interrupts):.2f} interrupts, "
                    f"{ping_irq.per_packet(ping_irq.mmio_reads):.2f} register reads and "
                    f"{ping_irq.per_packet(ping_irq.ctx.get('driver', 0)):.1f} context switches")
        if ping_pmd and ping_pmd.rtt_us:
            a, b = ping_irq.rtt_us.get("p50", 0), ping_pmd.rtt_us.get("p50", 0)
            sentence += (f"; its median round trip was {a:,.0f} us against {b:,.0f} us through the PMD "
                         f"(medians of {ping_irq.echoed:,} and {ping_pmd.echoed:,} round trips).")
        else:
            sentence += "."
        parts.append(sentence)
    if ping_napi and ping_irq and ping_napi.echoed and ping_irq.echoed:
        a, b = ping_napi.per_packet(ping_napi.interrupts), ping_irq.per_packet(ping_irq.interrupts)
        c, d = ping_napi.per_packet(ping_napi.mmio_reads), ping_irq.per_packet(ping_irq.mmio_reads)
        e, f = ping_napi.per_packet(ping_napi.doorbells), ping_irq.per_packet(ping_irq.doorbells)
        parts.append(f"NAPI one frame at a time: {a:.2f} interrupts, {c:.2f} register reads and {e:.2f} "
                     f"doorbells per packet against {b:.2f}, {d:.2f} and {f:.2f} in interrupt mode "
                     f"({_compare(a, b)} interrupts, {_compare(c, d)} reads).")
    if ping_pmd and ping_irq:
        short = [m for m in (ping_pmd, ping_irq) if not cpu_measurable(m)]
        if short:
            parts.append(f"What polling costs in CPU is not measured here: the ping-pong phases took "
                         f"{_ms(ping_irq.wall)} (interrupt mode) and {_ms(ping_pmd.wall)} (PMD), too short for CPU "
                         f"time counted in {_ms(1 / _clock_ticks())} ticks (each needs "
                         f"{_ms(CPU_MIN_TICKS / _clock_ticks())}; run more --pings).")
        else:
            p = min(1.0, ping_pmd.cpu.get("driver", 0.0) / ping_pmd.wall)
            q = min(1.0, ping_irq.cpu.get("driver", 0.0) / ping_irq.wall)
            shares = (f"the PMD was on a CPU {p:.0%} of the time, the interrupt-driven driver {q:.0%}")
            if p > q + 0.1:
                parts.append(f"The price of polling: waiting for those frames one at a time, {shares}.")
            else:
                parts.append(f"Waiting for those frames one at a time, {shares}: no price of polling "
                             f"shows in this run.")
    return parts


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def _share(cpu: float, wall: float) -> str:
    """CPU time as a share of wall time (CPU time comes in clock ticks: capped at 100%)."""
    return f"{min(100.0, 100 * cpu / wall):.0f}%" if wall > 0 else "-"


def _table(head: Sequence[str], rows: list[Sequence[str]], group: tuple[int, int, str]) -> list[str]:
    """Columns right-aligned (the first left-aligned); `group` = (first, last, title): a
    title line over columns first..last."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = []
    first, last, title = group
    left = sum(w + 2 for w in widths[:first])
    span = sum(w + 2 for w in widths[first : last + 1]) - 2
    lines.append((" " * left + title.center(span, "-")).rstrip())
    for k, row in enumerate([head, *rows]):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def format_tables(results: Sequence[Measurement], size: int = DEFAULT_SIZE) -> str:
    """The summary: a table per phase, a row per mode (an incomplete row is marked '!')."""
    out: list[str] = []
    for phase in ("stream", "ping-pong"):
        ms = [m for m in results if m.phase == phase]
        if not ms:
            continue
        if out:
            out.append("")
        if phase == "stream":
            out.append(f"stream: {ms[0].frames} frames of {size} bytes each way, up to {ms[0].window} in flight")
            head = ("mode", "frames", "frames/s")
        else:
            out.append(f"ping-pong: {ms[0].frames} frames of {size} bytes each way, one at a time")
            head = ("mode", "frames", "rtt p50 us", "rtt p99 us")
        first = len(head)
        head += ("irq/pkt", "doorbells/pkt", "reads/pkt", "driver", "generator", "emulator", "driver cpu")
        rows = []
        for m in ms:
            row = [m.mode + ("" if m.complete else " !"), str(m.received)]
            if phase == "stream":
                row.append(f"{m.rate:,.0f}")
            else:
                row += [f"{m.rtt_us.get('p50', 0):,.0f}", f"{m.rtt_us.get('p99', 0):,.0f}"]
            row += [f"{m.per_packet(m.interrupts):.3f}", f"{m.per_packet(m.doorbells):.3f}",
                    f"{m.per_packet(m.mmio_reads):.3f}", f"{m.ctx.get('driver', 0):,}",
                    f"{m.ctx.get('generator', 0):,}", f"{m.ctx.get('emulator', 0):,}",
                    _share(m.cpu.get("driver", 0.0), m.wall) if cpu_measurable(m) else "n/a"]
            rows.append(row)
        out += _table(head, rows, (first + 3, first + 5, " context switches "))
    return "\n".join(out)


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
        print(f"nicemu demo: {problem}", file=sys.stderr)
        return 2
    return Demo(opts, out).run()


def main(argv: Sequence[str] | argparse.Namespace | None = None) -> int:
    """`nicemu demo [options]` (a Namespace from cli.py, or an argv list)."""
    if isinstance(argv, argparse.Namespace):
        return run(argv)
    ap = argparse.ArgumentParser(prog="nicemu demo", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":  # the child roles: python -m nicemu.demo responder|generator ...
    sys.exit(child_main())
