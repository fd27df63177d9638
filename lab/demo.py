"""`nicemu demo`: why kernel bypass is faster, in one run and in numbers.

The same UDP echo traffic (18-byte payloads: 64-byte frames) through four paths:
  kstack irq   kstack (python -m kstack.kernel) with the e1000 driver in interrupt mode
  kstack napi  the same kernel with the driver in NAPI mode
  bypass pmd   the bypass PMD answering UDP itself, busy-polling nic1 (lab.l2echo --udp)
  linux        the real Linux kernel's UDP on loopback, driven from Python: the reference
then ping and a short TCP transfer through kstack. Each path is measured --repeat times in two
phases: a ping-pong (one datagram in flight: latency) and a stream (--window in flight: rate and
per-packet costs). The client is the same program for all four (lab.echo_client), over kstack
kernel A for the emulated paths. Costs are read around the measured rounds only: the echo
side's counters (SIGUSR1 snapshots) and every process's CPU ns from /proc/PID/schedstat.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import textwrap
import time
from typing import Any

from lab import paths as P
from lab import report
from lab.measure import idle_cpu, load_warning, machine_line
from lab.procs import DemoError, Interrupted, remove_parent_if_empty, run_directory

DEFAULT_ROUNDS = 1500
DEFAULT_PINGS = 300
DEFAULT_REPEAT = 3
DEFAULT_WINDOW = 16
PAYLOAD = 18
DEFAULT_PCAP = "nicemu-demo.pcap"
DEFAULT_SNAPLEN, DEFAULT_MAX_FRAMES = P.PCAP_SNAPLEN, P.PCAP_FRAMES


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    ps = sub.add_parser(
        "demo", help="kstack (interrupts, NAPI), kernel bypass and real Linux: the same UDP echo, measured",
        description=__doc__.split("\n\n")[0] + " The same UDP echo through kstack in interrupt mode, "
        "kstack with NAPI, the bypass PMD and the real Linux kernel; per packet: interrupts, context "
        "switches, syscalls, bytes copied, sk_buffs, register reads, doorbells and CPU ns of each "
        "process; then ping and a TCP transfer through kstack. Ctrl-C or SIGTERM stops everything.")
    ps.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, metavar="N",
                    help=f"datagrams of each stream (default {DEFAULT_ROUNDS})")
    ps.add_argument("--pings", type=int, default=DEFAULT_PINGS, metavar="N",
                    help=f"round trips of each ping-pong (default {DEFAULT_PINGS})")
    ps.add_argument("--repeat", type=int, default=DEFAULT_REPEAT, metavar="N",
                    help=f"repetitions of each phase: median and spread (default {DEFAULT_REPEAT})")
    ps.add_argument("--window", type=int, default=DEFAULT_WINDOW, metavar="N",
                    help=f"datagrams in flight in the stream (default {DEFAULT_WINDOW})")
    ps.add_argument("--paths", default=",".join(P.PATHS), metavar="LIST",
                    help=f"which paths, in order (default {','.join(P.PATHS)})")
    ps.add_argument("--no-extras", action="store_true", help="skip ping and the TCP transfer")
    ps.add_argument("--pcap", metavar="FILE", default=DEFAULT_PCAP,
                    help=f"capture the emulated cable (nic0 to nic1, both directions) to FILE, overwritten "
                         f"(default ./{DEFAULT_PCAP}); bounded: {DEFAULT_SNAPLEN} bytes of each frame, at most "
                         f"--pcap-frames frames")
    ps.add_argument("--no-pcap", action="store_true", help="no capture")
    ps.add_argument("--pcap-frames", type=int, default=DEFAULT_MAX_FRAMES, metavar="N",
                    help=f"frames written at most; later ones are only counted (default {DEFAULT_MAX_FRAMES:,})")
    ps.add_argument("--json", action="store_true", help="also print every sample as one JSON line at the end")
    return ps


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
        self.samples: list[P.Sample] = []
        self.lab: P.Lab | None = None
        self.run_dir: Any = None
        self.made_parent = False
        self.extras: list[str] = []
        self.pcap = pcap_path(args)  # absolute, or None (--no-pcap, or no place to write it)

    def say(self, text: str, tag: str = "") -> None:
        prefix = f"[{tag}] " if tag else ""
        print(textwrap.fill(text, width=100, initial_indent=prefix, subsequent_indent=" " * len(prefix),
                            break_on_hyphens=False, break_long_words=False) if text else "", flush=True)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.lab is not None:
            if self.lab.stop_signal is not None:
                self.lab.kill_now = True  # a second signal: no more patience
            self.lab.stop_signal = self.lab.stop_signal or signum

    def run(self) -> int:
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        rc = 0
        try:
            self.run_dir, self.made_parent = run_directory()
            self.lab = P.Lab(self.run_dir, P.environment(), self.pcap, self.args.pcap_frames)
            self._intro()
            for path in self.paths:
                self._path(path)
            self._summary()
        except Interrupted as e:
            print(f"nicemu demo: {signal.Signals(e.signum).name}: stopping", file=sys.stderr, flush=True)
            rc = 128 + e.signum
        except DemoError as e:
            print(f"nicemu demo: {e}", file=sys.stderr, flush=True)
            rc = 1
        finally:
            self._cleanup()
            for s, h in old.items():
                signal.signal(s, h)
        if self.args.json:
            print(json.dumps([vars(s) for s in self.samples]), flush=True)
        return rc

    def _intro(self) -> None:
        a = self.args
        self.say(f"nicemu demo: the same UDP echo ({PAYLOAD}-byte payloads, 64-byte frames) through "
                 f"{', '.join(self.paths)}. Each path: {a.repeat} repetitions of a ping-pong ({a.pings} "
                 f"round trips, one in flight) and a stream ({a.rounds} datagrams, {a.window} in flight); "
                 f"figures are medians [min-max].")
        self.say(machine_line())
        warn = load_warning()
        if warn:
            self.say(f"WARNING: {warn}.")
        self.say("The link rate is not modeled: frames cross the emulated cable as fast as the "
                 "processes move them.")
        if self.pcap and any(P.PATHS.get(p) for p in self.paths):
            self.say(f"The cable between nic0 and nic1 is captured to {self.pcap} (both directions, FCS "
                     f"included; {DEFAULT_SNAPLEN} bytes of each frame, the first {self.args.pcap_frames:,} "
                     f"frames). The devices' engines copy each frame into a capture ring on their fast "
                     f"path (a clock read and one copy, no Python) and the emulator writes the ring to "
                     f"the file every 100 ms (docs/cables.md has its measured cost per frame); "
                     f"--no-pcap for figures without it.")
        self.say("")

    def _path(self, path: str) -> None:
        lab, a = self.lab, self.args
        mode = P.PATHS.get(path, "?")
        if path not in P.PATHS:
            raise DemoError(f"unknown path {path!r} (one of {', '.join(P.PATHS)})")
        self.say("")
        if mode is None:
            echo = lab.spawn("linux echo", ["-m", "lab.linux_echo"])
            port = lab.event(echo, "up")["port"]
            self.say(f"A Python echo server (pid {echo.pid}) on the real kernel's UDP at 127.0.0.1:{port}; "
                     f"the same client as for the other paths, on Linux's sockets.", path)
            procs, counted, target = {"linux echo": echo}, None, ["127.0.0.1", str(port)]
        else:
            if lab.emu is None:
                lab.up()
                self.say(f"One emulator process (nicemu serve --pair; pid {lab.emu.pid}) holds both devices, "
                         f"nic0 ({P.MAC0}) and nic1 ({P.MAC1}), joined by a pair cable; kstack kernel A "
                         f"(pid {lab.ka.pid}, NAPI, {P.IP_A}) drives nic0 and carries the echo client. "
                         f"Sockets: {lab.dir}/nic0.sock and {lab.dir}/nic1.sock.", "setup")
                idle = idle_cpu({"emulator": lab.emu.pid, "kernel A": lab.ka.pid})
                self.say("With no traffic (share of a CPU): " + ", ".join(f"{k} {v:.2f}" for k, v in idle.items())
                         + f"; {os.cpu_count()} CPUs.", "setup")
            side, counted = lab.echo_side(mode)
            procs = {c.name: c for c in side}
            procs.update({"emulator": lab.emu, "kernel A": lab.ka})
            target = [P.IP_B, str(P.PORT), "--kernel", lab.ka_sock]
            if mode == "pmd":
                self.say(f"The bypass PMD (pid {side[0].pid}) owns nic1: interrupts masked, it spins on its "
                         f"RX descriptors and answers UDP (and ARP) for {P.IP_B} in the buffer the frame "
                         f"arrived in: no kernel, no syscall, no copy. It is the only busy-polling process.",
                         path)
            else:
                self.say(f"kstack kernel B (pid {side[0].pid}, driver in {mode} mode, {P.IP_B}) on nic1 and "
                         f"kstack.apps.udp_echo (pid {side[1].pid}) on its socket API: each datagram "
                         f"goes device -> driver -> sk_buff -> IP -> UDP -> socket -> syscall -> "
                         f"application and back.", path)
        snap = "counters" if mode == "pmd" else "stats"
        for rep in range(a.repeat):
            for window, n in ((1, a.pings), (a.window, a.rounds)):
                if n <= 0:
                    continue
                s = P.measure(lab, path, procs, counted,
                              [*target, "--rounds", str(n), "--window", str(window), "--payload", str(PAYLOAD)],
                              window, snap)
                self.samples.append(s)
                c = s.client
                what = (f"p50 {report.fmt(c['p50_us'])} us" if window == 1 else
                        f"{report.fmt(c['rate'])} echoes/s")
                lost = f", {c['lost']} lost" if c.get("lost") else ""
                self.say(f"run {rep + 1}/{a.repeat} {'ping-pong' if window == 1 else 'stream'}: "
                         f"{c['echoed']:,} echoed, {what}{lost}", path)
        if mode == "napi" and not a.no_extras:
            self._extras(side)
        for c in reversed([c for c in procs.values() if c not in (lab.emu, lab.ka)]):
            lab.stop(c)

    def _extras(self, side: list) -> None:
        """ping and a TCP transfer through kstack, A to B (kernel B in NAPI mode)."""
        lab = self.lab
        kb_sock = str(lab.dir / "kb.sock")
        ping = lab.spawn("ping", ["-m", "kstack.apps.ping", "-c", "3", "-i", "0.1", "--kernel", lab.ka_sock, P.IP_B])
        lab.wait(ping, lambda c: None if c.alive() or c.fds else {}, "exit", 30)
        lines = [ln for ln in ping.text if "packets transmitted" in ln or "rtt" in ln]
        lab.stop(ping)
        self.say("ping through kstack: " + (" ".join(lines) or "no summary"), "ping")
        srv = lab.spawn("tcp sink", ["-m", "kstack.apps.tcp_bulk", "sink", "--kernel", kb_sock])
        time.sleep(0.5)
        cli = lab.spawn("tcp sender", ["-m", "kstack.apps.tcp_bulk", "send", P.IP_B, "--bytes", "300000",
                                       "--kernel", lab.ka_sock])
        rep = lab.event(cli, "report", 60)
        lab.stop(cli)
        lab.stop(srv)
        nbytes, secs = rep.get("bytes", 0), rep.get("seconds", 0.0)
        rate = f", {nbytes * 8 / secs / 1e6:.1f} Mbit/s" if secs else ""
        self.say(f"TCP transfer through kstack, A to B (tcp_bulk): {nbytes:,} bytes in {secs:.3f} s{rate}.", "tcp")

    def _summary(self) -> None:
        print(flush=True)
        print(report.table(self.samples, self.paths, PAYLOAD), flush=True)
        print(flush=True)
        for line in report.closing(self.samples, PAYLOAD):
            self.say(line, "why")
        self.say("The benchmarks (benchmarks/bench_pmd.py) measure the PMD with an in-process generator "
                 "and no stack on the client side; here every path has the same Python client over "
                 "kstack kernel A, whose cost is in every round trip, so bypass's lead is smaller here.",
                 "note")
        self.say(machine_line() + ("; " + w if (w := load_warning()) else ""), "note")

    def _cleanup(self) -> None:
        if self.lab is not None:
            self.lab.close()
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            if self.made_parent:
                remove_parent_if_empty(self.run_dir)
        self.say("")
        self._pcap_line()
        self.say("Stopped every process (echo servers, drivers, kernels, the emulator); sockets and the "
                 "run's directory removed.", "done")

    def _pcap_line(self) -> None:
        if not self.pcap or self.lab is None or self.lab.emu is None:
            return  # no emulated path ran: no capture was made
        rep = self.lab.pcap_report
        if rep is None:
            self.say(f"The capture in {self.pcap} may be incomplete: the emulator did not say how much "
                     f"it wrote.", "pcap")
            return
        full = rep.get("not_captured", 0)  # the capture ring was full between two drains
        later = rep["not_written"] - full
        more = (f"; {later:,} later frames not written (the limit is {rep['max_frames']:,}: "
                f"--pcap-frames)" if later else "")
        more += f"; {full:,} not captured (the capture ring was full)" if full else ""
        cut = f"; {rep['truncated']:,} cut to {rep['snaplen']} bytes" if rep.get("truncated") else ""
        self.say(f"{rep['written']:,} frames of the cable written to {self.pcap}{more}{cut}. Read it "
                 f"with:", "pcap")
        print(f"       tshark -r {self.pcap}", flush=True)  # on one line, to copy


def pcap_path(args: argparse.Namespace) -> str | None:
    """The capture file, absolute: --pcap FILE, or ./nicemu-demo.pcap; None with --no-pcap."""
    if getattr(args, "no_pcap", False) or not args.pcap:
        return None
    return os.path.abspath(args.pcap)


def pcap_problem(path: str) -> str | None:
    """Why `path` cannot be written (checked before anything starts), or None."""
    d = os.path.dirname(path)
    if os.path.isdir(path):
        return f"{path} is a directory"
    if not os.path.isdir(d):
        return f"the directory {d} does not exist"
    if not os.access(d, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        return f"{path} cannot be written (permission denied)"
    return None


def run(args: argparse.Namespace) -> int:
    if args.repeat < 1 or args.window < 1 or args.rounds < 0 or args.pings < 0 or args.pcap_frames < 0:
        print("nicemu demo: --repeat and --window must be >= 1, --rounds, --pings and --pcap-frames >= 0",
              file=sys.stderr)
        return 2
    path = pcap_path(args)
    why = pcap_problem(path) if path else None
    if why and args.pcap != DEFAULT_PCAP:
        print(f"nicemu demo: --pcap: {why} (or --no-pcap)", file=sys.stderr)
        return 2
    if why:  # the default place is not writable: the demo runs without a capture and says so
        print(f"nicemu demo: no capture of the cable: {why}; give --pcap FILE to have one", flush=True)
        args.no_pcap = True
    return Demo(args).run()
