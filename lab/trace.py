"""`nicemu trace`: one packet followed through every stage, kernel path and bypass path.

Why: the demo's tables say *that* bypass is cheaper; this says *where*, stage by stage, with
the process each stage ran in and the state it touched. It runs a small topology of real
processes with tracing on (nicemu.tracepoint: NICEMU_TRACE=FILE, each process writes
FILE.<pid>; CLOCK_MONOTONIC is one clock for all of them):

    kernel path:  client --syscall--> kernel-a [interrupt] <-vfio-user-> emulator-k
                  (nic0 == nic1, back to back) <-vfio-user-> kernel-b [NAPI] --> udp_echo
    bypass path:  pmd-gen (nic2) <-> emulator-b (nic2 == nic3) <-> pmd-echo (nic3, busy-polls)

A warm-up datagram first (ARP, the echo's multishot receive armed), then ONE traced UDP
datagram from the client to the echo and back; ONE frame from the PMD generator to the PMD
echo and back. Compiled data paths carry no tracepoints, so a traced run uses their
pure-Python twins (emulator --engine python, KSTACK_RXFAST=py, KSTACK_TXFAST=py,
KSTACK_E1000TX=py, the PMD's --engine python): the times are those of the readable code, and the output says so.

Output: each path's timeline (+us from its first event, process, stage, state), then the
stages the issue names side by side at the echoing host (+us from the frame reaching its
device), a "-" where a path has no such stage. `--svg FILE` draws both timelines one above
the other on one time scale. Every process is stopped and the run directory removed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable
from xml.sax.saxutils import escape

ROOT = Path(__file__).resolve().parent.parent
MAC = ("52:54:00:12:34:01", "52:54:00:12:34:02", "52:54:00:12:34:03", "52:54:00:12:34:04")
ADDR_A, ADDR_B, PORT = "198.18.0.1", "198.18.0.2", 7007
UP_TIMEOUT = 30.0  # s for any process to come up or a packet to come back
TRACE_ENV = {"KSTACK_RXFAST": "py", "KSTACK_TXFAST": "py", "KSTACK_E1000TX": "py"}
HONESTY = ("traced run: the pure-Python twins ran (emulator --engine python, KSTACK_RXFAST=py, "
           "KSTACK_TXFAST=py, KSTACK_E1000TX=py, PMD --engine python) and every stage writes an event, so the times "
           "are those of the readable code: compare the shapes and the stages, not the microseconds.")

# tracepoint -> what it is, in the words of the issue where it names the stage
LABELS: dict[str, str] = {
    "app.syscall": "syscall from the app", "sys.enter": "syscall entry (SQ read)",
    "sock.copy_from_user": "copy from the application", "l4.udp_output": "L4 udp_sendmsg",
    "l3.ip_output": "L3 ip_output", "l2.neigh_output": "L2 neigh_output",
    "qdisc.enqueue": "qdisc enqueue", "qdisc.dequeue": "qdisc dequeue", "qdisc.bypass": "qdisc bypass",
    "drv.xmit": "driver ndo_start_xmit: TX ring", "drv.tx.doorbell": "driver TX doorbell (TDT)",
    "dev.tdt.doorbell": "device: TDT written", "dev.tx.dma": "device: TX walk + DMA",
    "dev.tx.fcs": "device: FCS appended", "dev.tx.wire": "wire out", "dev.tx.writeback": "device: TX write-back DD",
    "dev.rx.wire": "wire in", "dev.rx.fcs": "FCS check", "dev.rx.filter": "address filter",
    "dev.rx.pktbuf": "RX packet buffer", "dev.rx.dma": "DMA", "dev.rx.writeback": "descriptor write-back",
    "dev.icr.cause": "ICR cause", "dev.irq.raise": "interrupt raised", "dev.icr.read": "device: ICR read-clear",
    "drv.top_half": "top half", "drv.bottom_half": "bottom half", "drv.napi_poll": "NAPI poll",
    "drv.rx.desc_dd": "driver: RX descriptor DD", "drv.skb_alloc": "sk_buff alloc + copy",
    "l2.eth_type_trans": "L2 eth_type_trans", "l3.ip_rcv": "L3 ip_rcv", "l4.udp_rcv": "L4 udp_rcv",
    "sock.queue": "socket queue", "sock.copy_to_user": "copy to the application",
    "sys.cq.wakeup": "CQ wakeup (eventfd)", "app.recv": "recv returns in the app",
    "drv.rx.refill": "RX refill (RDT)", "drv.tx.clean": "TX clean (DD seen)",
    "pmd.rx_burst.dd": "poll: rx_burst saw DD", "pmd.app.echo": "the app's echo (zero copy)",
    "pmd.tx_burst": "tx_burst: TX descriptor", "pmd.tx.doorbell": "PMD TX doorbell (TDT)",
    "pmd.rx.refill": "RX refill (RDT)", "pmd.irq.wake": "woken by RXT0 (adaptive sleep)",
}

def _is(*names: str, **want: Any) -> Callable[[dict], bool]:
    return lambda e: e["stage"] in names and all(e["state"].get(k) == v for k, v in want.items())


# the stages at the echoing host, in order; each a test of an event
SIDE_BY_SIDE: list[tuple[str, Callable[[dict], bool]]] = [
    ("wire (in)", _is("dev.rx.wire")), ("FCS check", _is("dev.rx.fcs")),
    ("address filter", _is("dev.rx.filter")), ("RX packet buffer", _is("dev.rx.pktbuf")),
    ("DMA", _is("dev.rx.dma")), ("descriptor write-back", _is("dev.rx.writeback")),
    ("interrupt or poll", _is("dev.irq.raise", "pmd.rx_burst.dd")), ("top half", _is("drv.top_half")),
    ("bottom half/NAPI poll", _is("drv.bottom_half", "drv.napi_poll")),
    ("sk_buff", _is("drv.skb_alloc")), ("L2", _is("l2.eth_type_trans")), ("L3", _is("l3.ip_rcv")),
    ("L4", _is("l4.udp_rcv")), ("socket queue", _is("sock.queue", "sock.copy_to_user")),
    ("copy to the application", _is("app.recv", "pmd.app.echo")),
    ("syscall: sendto", lambda e: e["stage"] == "sys.enter" and _op_name(e["state"].get("op")) == "SENDTO"),
    ("copy from the application", _is("sock.copy_from_user")),
    ("L4/L3/L2 output", _is("l4.udp_output")), ("qdisc", _is("qdisc.enqueue", "qdisc.bypass")),
    ("driver", _is("drv.xmit", "pmd.tx_burst")), ("TX ring doorbell", _is("drv.tx.doorbell", "pmd.tx.doorbell")),
    ("device TX walk", _is("dev.tx.dma")), ("FCS", _is("dev.tx.fcs")), ("wire (out)", _is("dev.tx.wire")),
    ("TX write-back DD", _is("dev.tx.writeback")),
]

# The client of the kernel path: a warm-up datagram, then the traced one; marks its times.
CLIENT = textwrap.dedent("""
    import json, sys, time
    from kstack import socket as ks
    ks.connect_kernel(sys.argv[1])
    s = ks.socket(ks.AF_INET, ks.SOCK_DGRAM)
    s.settimeout(float(sys.argv[4]))
    dst = (sys.argv[2], int(sys.argv[3]))
    payload = bytes.fromhex(sys.argv[5])
    s.sendto(b"warm-up", dst); s.recvfrom(2048)
    time.sleep(0.3)
    print(json.dumps({"event": "mark", "t": time.monotonic_ns()}), flush=True)
    s.sendto(payload, dst)
    data, addr = s.recvfrom(2048)
    print(json.dumps({"event": "echoed", "ok": data == payload, "t": time.monotonic_ns()}), flush=True)
    s.close()
""")


class Proc:
    """A child in its own process group that dies with us (PR_SET_PDEATHSIG); stdout read
    line by line without threads, stderr kept in a file of the run directory."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], run_dir: Path) -> None:
        from lab.procs import pdeathsig_preexec

        self.name = name
        self._err = open(run_dir / f"{name}.err", "w+b")
        self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=self._err, env=env, cwd=ROOT,
                                      preexec_fn=pdeathsig_preexec(), process_group=0)
        self._buf = b""
        self.lines: list[str] = []
        self._seen = 0  # lines before this index were consumed by wait_line

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_line(self, pred: Callable[[str], bool], timeout: float = UP_TIMEOUT) -> str:
        """The next line not yet consumed for which pred holds (it and the lines before it
        are consumed); RuntimeError if none comes within `timeout`."""
        for k in range(self._seen, len(self.lines)):
            if pred(self.lines[k]):
                self._seen = k + 1
                return self.lines[k]
        self._seen = len(self.lines)
        end = time.monotonic() + timeout
        fd = self.popen.stdout.fileno()
        while time.monotonic() < end:
            r, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
            if not r:
                break
            data = os.read(fd, 65536)
            if not data:
                break
            self._buf += data
            while b"\n" in self._buf:
                raw, self._buf = self._buf.split(b"\n", 1)
                ln = raw.decode(errors="replace").rstrip()
                self.lines.append(ln)
                self._seen = len(self.lines)
                if pred(ln):
                    return ln
        raise RuntimeError(f"{self.name} (pid {self.pid}): no expected line within {timeout:.0f} s; "
                           f"it said: {self.tail()}")

    def event(self, name: str, timeout: float = UP_TIMEOUT) -> dict:
        ln = self.wait_line(lambda s: s.startswith("{") and json.loads(s).get("event") in (name, "error"),
                            timeout)
        ev = json.loads(ln)
        if ev["event"] == "error":
            raise RuntimeError(f"{self.name}: {ev.get('message')}")
        return ev

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            self._err.seek(0)
            return " | ".join(self._err.read().decode(errors="replace").strip().splitlines()[-5:]
                              + self.lines[-3:])
        return ""

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (a traced process writes its events at exit), SIGKILL if it lingers."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        self.popen.wait()
        self.popen.stdout.close()
        self._err.close()


def _env(run_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["NICEMU_TRACE"] = str(run_dir / "trace")
    env.update(TRACE_ENV)
    return env


def _emulator(name: str, run_dir: Path, env: dict, socks: tuple[str, str], macs: tuple[str, str],
              procs: list[Proc]) -> Proc:
    p = Proc(name, [sys.executable, "-m", "nicemu", "serve", "--engine", "python",
                    "--socket", socks[0], "--mac", macs[0], "--socket", socks[1], "--mac", macs[1],
                    "--pair"], env, run_dir)
    procs.append(p)
    p.wait_line(lambda s: s == "nicemu: ready")
    return p


def run_topology(run_dir: Path, payload: bytes) -> tuple[list[dict], dict[int, str], dict[str, Any]]:
    """Start everything, send the two packets, stop everything; returns the events of every
    process (sorted by time), pid -> process name, and the marks (times, MACs, pids)."""
    env = _env(run_dir)
    procs: list[Proc] = []
    marks: dict[str, Any] = {"macs": MAC}
    d = run_dir
    py = sys.executable
    try:
        _emulator("emulator-k", d, env, (str(d / "n0.sock"), str(d / "n1.sock")), MAC[:2], procs)
        _emulator("emulator-b", d, env, (str(d / "n2.sock"), str(d / "n3.sock")), MAC[2:], procs)
        ka, kb = str(d / "ka.sock"), str(d / "kb.sock")
        for name, dev, mode, addr, ks in (("kernel-a", "n0", "interrupt", ADDR_A, ka),
                                          ("kernel-b", "n1", "napi", ADDR_B, kb)):
            p = Proc(name, [py, "-m", "kstack.kernel", "--device", f"{d / dev}.sock,name=eth0,mode={mode}",
                            "--addr", f"eth0={addr}/24", "--syscall-socket", ks], env, d)
            procs.append(p)
            p.event("up")
        echo = Proc("udp_echo", [py, "-m", "kstack.apps.udp_echo", "--port", str(PORT), "--kernel", kb], env, d)
        procs.append(echo)
        echo.wait_line(lambda s: s.startswith("udp_echo: listening"))
        client = Proc("client", [py, "-c", CLIENT, ka, ADDR_B, str(PORT), str(UP_TIMEOUT), payload.hex()], env, d)
        procs.append(client)
        marks["kernel_t0"] = client.event("mark")["t"]
        got = client.event("echoed")
        if not got["ok"]:
            raise RuntimeError("the echo of the traced datagram was not the datagram sent")
        marks["kernel_t1"] = got["t"]
        client.popen.wait(UP_TIMEOUT)  # it exits by itself, writing its events (SIGTERM would lose them)

        pecho = Proc("pmd-echo", [py, "-m", "driver.pmd", "--socket", str(d / "n3.sock"), "--role", "echo",
                                  "--mode", "poll", "--engine", "python", "--interval", "60"], env, d)
        procs.append(pecho)
        pecho.event("up")
        marks["bypass_t0"] = time.monotonic_ns()
        gen = Proc("pmd-gen", [py, "-m", "driver.pmd", "--socket", str(d / "n2.sock"), "--role", "gen",
                               "--dst", MAC[3], "--count", "1", "--size", str(max(64, len(payload) + 46)),
                               "--mode", "adaptive", "--engine", "python", "--interval", "0.05"], env, d)
        procs.append(gen)
        gen.event("up")
        end = time.monotonic() + UP_TIMEOUT
        while gen.event("stats")["ipackets"] < 1:
            if time.monotonic() > end:
                raise RuntimeError("the bypass frame never came back")
        marks["bypass_t1"] = time.monotonic_ns()
    finally:
        for p in reversed(procs):  # applications first, the emulators last
            p.stop()
    names = {p.pid: p.name for p in procs}
    events: list[dict] = []
    from nicemu.tracepoint import read_events

    for f in run_dir.glob("trace.*"):
        events.extend(read_events(str(f)))
    events.sort(key=lambda e: e["t"])
    return events, names, marks


# --- what the events say -------------------------------------------------------------------

def split_paths(events: list[dict], names: dict[int, str], marks: dict[str, Any]) -> dict[str, list[dict]]:
    """The events of each path: its processes, between its marks."""
    kernel_procs = {"emulator-k", "kernel-a", "kernel-b", "udp_echo", "client"}
    bypass_procs = {"emulator-b", "pmd-echo", "pmd-gen"}
    out: dict[str, list[dict]] = {"kernel": [], "bypass": []}
    for e in events:
        who = names.get(e["pid"], "?")
        e["proc"] = who
        if who in kernel_procs and marks["kernel_t0"] <= e["t"] <= marks["kernel_t1"]:
            out["kernel"].append(e)
        elif who in bypass_procs and marks["bypass_t0"] <= e["t"] <= marks["bypass_t1"]:
            out["bypass"].append(e)
    # the bypass path starts with the generator's frame (not with the ports' bring-up)
    first = next((i for i, e in enumerate(out["bypass"]) if e["stage"] == "pmd.tx_burst"), 0)
    out["bypass"] = out["bypass"][first:]
    return out


def side_by_side(path: list[dict], echo_mac: str, echo_procs: set[str]) -> list[tuple[str, dict | None]]:
    """The issue's stages at the echoing host: from the frame reaching its device, the first
    event of each stage in order (None: this path has no such stage)."""
    start = next((i for i, e in enumerate(path)
                  if e["stage"] == "dev.rx.wire" and e["state"].get("dev") == echo_mac), None)
    if start is None:
        return [(name, None) for name, _ in SIDE_BY_SIDE]
    host = [e for e in path[start:] if e["proc"] in echo_procs]
    rows: list[tuple[str, dict | None]] = []
    pos = 0
    for name, test in SIDE_BY_SIDE:
        hit = next((k for k in range(pos, len(host)) if test(host[k])), None)
        rows.append((name, None if hit is None else host[hit]))
        if hit is not None:
            pos = hit
    return rows


def _state(e: dict, width: int = 70) -> str:
    st = dict(e["state"])
    if e["stage"] == "sys.enter" and isinstance(st.get("op"), int):
        st["op"] = _op_name(st["op"])
    text = " ".join(f"{k}={v}" for k, v in st.items())
    return text if len(text) <= width else text[: width - 3] + "..."


def _op_name(op: Any) -> str:
    from kstack.syscall.channel import Op

    try:
        return Op(op).name
    except (ValueError, TypeError):
        return str(op)


def format_text(paths: dict[str, list[dict]], marks: dict[str, Any]) -> str:
    load = os.getloadavg()[0]
    cpus = os.cpu_count() or 1
    lines = ["nicemu trace: one UDP datagram through kstack and back, one frame through the bypass PMD and back",
             *textwrap.wrap(HONESTY, 100),
             f"load average {load:.1f} on {cpus} CPUs" + (
                 ": more runnable processes than cores, so a long gap between two processes is mostly "
                 "a wait for a CPU, not work" if load > cpus else ""), ""]
    titles = {"kernel": f"kernel path: client -> kernel-a ({ADDR_A}, interrupt mode) -> emulator-k -> "
                        f"kernel-b ({ADDR_B}, NAPI) -> udp_echo -> back",
              "bypass": "bypass path: pmd-gen -> emulator-b -> pmd-echo (busy-polls, zero copy) -> back"}
    for key in ("kernel", "bypass"):
        ev = paths[key]
        lines.append(titles[key])
        lines.append(f"{'+us':>9}  {'process':<11} {'stage':<32} state")
        t0 = ev[0]["t"] if ev else 0
        for e in ev:
            label = LABELS.get(e["stage"], e["stage"])
            lines.append(f"{(e['t'] - t0) / 1000:9.1f}  {e['proc']:<11} {label:<32} {_state(e)}")
        lines.append(f"  {len(ev)} events in {len({e['proc'] for e in ev})} processes"
                     + (f", {(ev[-1]['t'] - t0) / 1000:.1f} us end to end" if ev else ""))
        lines.append("")
    lines.append("side by side at the echoing host (+us from the frame reaching its device; - : no such stage)")
    lines.append(f"{'stage':<26} {'kernel path':<36} {'bypass path'}")
    rows_k = side_by_side(paths["kernel"], MAC[1], {"emulator-k", "kernel-b", "udp_echo"})
    rows_b = side_by_side(paths["bypass"], MAC[3], {"emulator-b", "pmd-echo"})
    t_k = rows_k[0][1]["t"] if rows_k[0][1] else 0
    t_b = rows_b[0][1]["t"] if rows_b[0][1] else 0

    def cell(e: dict | None, t0: int) -> str:
        return "-" if e is None else f"{(e['t'] - t0) / 1000:8.1f}  {e['proc']}"

    for (name, ek), (_, eb) in zip(rows_k, rows_b):
        lines.append(f"{name:<26} {cell(ek, t_k):<36} {cell(eb, t_b)}")
    lines += textwrap.wrap(
        "kernel path: the frame raises an interrupt, the kernel copies it into an sk_buff, walks "
        "L2/L3/L4 and copies the payload to the application through the syscall channel; the reply "
        "is copied back in and goes down through the qdisc and the driver. Bypass path: the "
        "application polls the ring itself (ICR causes are set but IMS is 0: no interrupt), "
        "reads the frame where the device put it and sends that same buffer; no sk_buff, no "
        "protocol layer, no copy. The PMD asks for a TX write-back only once per 32 descriptors "
        "(tx_rs_thresh), so one frame gets none.", 100)
    return "\n".join(lines) + "\n"


# --- SVG (standard library only: written by hand) --------------------------------------------

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def format_svg(paths: dict[str, list[dict]]) -> str:
    """Both timelines one above the other on one time scale: per path one row per stage, a
    tick per event (its process in the colour, the details in a tooltip)."""
    left, width, row, top_pad = 250, 720, 13, 40
    spans = [(p[-1]["t"] - p[0]["t"]) if p else 0 for p in paths.values()]
    span = max(spans + [1])
    scale = width / span
    procs = sorted({e["proc"] for p in paths.values() for e in p})
    color = {name: _COLORS[i % len(_COLORS)] for i, name in enumerate(procs)}
    parts: list[str] = []
    y = 20
    parts.append(f'<text x="10" y="{y}" font-size="14" font-weight="bold">nicemu trace: one packet, '
                 f'kernel path above, bypass path below (one time scale)</text>')
    y += 10
    for key, title in (("kernel", "kernel path (kstack)"), ("bypass", "bypass path (PMD)")):
        ev = paths[key]
        stages: list[str] = []
        for e in ev:
            if e["stage"] not in stages:
                stages.append(e["stage"])
        y += top_pad
        parts.append(f'<text x="10" y="{y - 18}" font-size="13" font-weight="bold">{escape(title)}</text>')
        height = row * max(1, len(stages))
        t0 = ev[0]["t"] if ev else 0
        n_ticks = 8
        for k in range(n_ticks + 1):  # the time axis and its grid
            x = left + width * k / n_ticks
            parts.append(f'<line x1="{x:.1f}" y1="{y - 4}" x2="{x:.1f}" y2="{y + height}" stroke="#ddd"/>')
            parts.append(f'<text x="{x:.1f}" y="{y + height + 12}" font-size="9" text-anchor="middle">'
                         f'{span * k / n_ticks / 1000:.0f} us</text>')
        parts.append(f'<line x1="{left}" y1="{y + height}" x2="{left + width}" y2="{y + height}" stroke="#333"/>')
        for i, stage in enumerate(stages):
            ry = y + i * row + row - 3
            parts.append(f'<text x="{left - 6}" y="{ry}" font-size="9" text-anchor="end">'
                         f'{escape(LABELS.get(stage, stage))}</text>')
        for e in ev:
            i = stages.index(e["stage"])
            x = left + (e["t"] - t0) * scale
            ry = y + i * row
            tip = escape(f"+{(e['t'] - t0) / 1000:.1f} us {e['proc']} {e['stage']} {_state(e, 200)}")
            parts.append(f'<line x1="{x:.1f}" y1="{ry + 1}" x2="{x:.1f}" y2="{ry + row - 1}" '
                         f'stroke="{color[e["proc"]]}" stroke-width="2"><title>{tip}</title></line>')
        y += height + 18
    lx = 10
    y += 10
    for name in procs:  # the legend: which colour is which process
        parts.append(f'<rect x="{lx}" y="{y - 9}" width="10" height="10" fill="{color[name]}"/>')
        parts.append(f'<text x="{lx + 14}" y="{y}" font-size="10">{escape(name)}</text>')
        lx += 20 + 7 * len(name)
    total_h = y + 20
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 30}" height="{total_h}" '
            f'font-family="sans-serif">\n<rect width="100%" height="100%" fill="white"/>\n'
            + "\n".join(parts) + "\n</svg>\n")


# --- the command -----------------------------------------------------------------------------

def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    ps = sub.add_parser(
        "trace", help="follow one packet through every stage: kernel path and bypass path",
        description="Start a small traced topology (an emulator with two devices back to back, a "
                    "kstack kernel on each with a UDP echo; a PMD echo on a second pair), send ONE "
                    "UDP datagram through the kernel path and ONE frame through the bypass path, and "
                    "print each stage with its time, process and the state it touched. Traced runs "
                    "use the pure-Python twins of the compiled data paths. Everything is stopped and "
                    "removed afterwards.")
    ps.add_argument("--svg", metavar="FILE", help="also draw the two timelines, one above the other")
    ps.add_argument("--size", type=int, default=18, metavar="BYTES",
                    help="UDP payload of the traced datagram (default 18: a 64-byte frame)")
    return ps


def run(args: argparse.Namespace) -> int:
    from lab.procs import remove_parent_if_empty, run_directory

    if not 0 <= args.size <= 1472:
        print("nicemu trace: --size is 0..1472 (one frame)", file=sys.stderr)
        return 2
    run_dir, made_parent = run_directory()
    try:
        payload = bytes((i * 7) & 0xFF for i in range(args.size))
        try:
            events, names, marks = run_topology(run_dir, payload)
        except RuntimeError as e:
            print(f"nicemu trace: {e}", file=sys.stderr)
            return 1
        paths = split_paths(events, names, marks)
        sys.stdout.write(format_text(paths, marks))
        if args.svg:
            Path(args.svg).write_text(format_svg(paths))
            print(f"SVG written to {args.svg}")
        return 0
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        if made_parent:
            remove_parent_if_empty(run_dir)
