"""`nicemu bench [--sizes 64,128,...] [--repeat N] [--seconds S] [--quick] [--out DIR]`: the
paths side by side over frame sizes, in one run, with a Markdown table and an SVG chart.

Paths, each measured with the benchmarks' own functions (imported, not copied):
- kstack, interrupt mode (itr=0: one interrupt per event, no moderation) and kstack, NAPI with
  dynamic interrupt moderation: benchmarks/bench_kstack.py (an emulator pair, two kernel
  processes, udp_send and udp_sink applications; receive rate from kernel B's UdpInDatagrams in
  a window after a warm-up; CPU ns of all five processes per datagram; ping-pong p50/p99
  through a client application and udp_echo);
- the bypass PMD: benchmarks/bench_pmd.py (an emulator process with both devices, a generator
  and the PMD in this process; rx_rate and ping_pong; CPU ns of both processes per frame), with
  every doorbell a vfio-user message ("bypass PMD") and with the tails through the doorbell
  page the emulator polls ("bypass PMD + page", what `python -m driver.pmd` asks for by
  default: fastest with a CPU for each of the two, slowest when they must share one);
- Linux: benchmarks/linux_udp.py (Python sender and receiver processes over the real kernel's
  UDP on loopback; rate and pingpong; CPU ns of both per datagram).

Frame sizes count the FCS (64..1518): a UDP payload of size - 46 bytes, a PMD buffer of size
- 4. Every point is repeated: the median with min-max. Busy-polling processes never outnumber
the cores: only in the PMD rows, this one, and in the page rows also the emulator polling the
doorbell page while traffic runs (it sleeps 200 us after the last doorbell). The machine line (CPUs, load average
before and after) is printed and written with the table. Figures are never judged here.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["add_parser", "run", "markdown_table", "chart", "PATHS", "Point"]

ROOT = Path(__file__).resolve().parents[1]
SIZES = (64, 128, 256, 512, 1024, 1518)
PATHS = ("kstack interrupt", "kstack NAPI", "bypass PMD", "bypass PMD + page", "Linux UDP")
ETH_IP_UDP_FCS = 46

Point = dict[str, Any]  # path, size, rate[], p50[], p99[], cpu_ns[]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="kstack (interrupt, NAPI), the bypass PMD and Linux UDP side by side over frame sizes",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="frame sizes with FCS, 64..1518")
    p.add_argument("--repeat", type=int, default=3, help="repetitions of every point")
    p.add_argument("--seconds", type=float, default=2.0, help="measured window of each rate run")
    p.add_argument("--rounds", type=int, default=1000, help="ping-pong round trips per repetition")
    p.add_argument("--paths", default=",".join(PATHS), help="which paths, comma-separated")
    p.add_argument("--quick", action="store_true", help="0.5 s windows, 200 rounds (a smoke run)")
    p.add_argument("--out", default="bench-out", metavar="DIR", help="where bench.md, bench.svg, bench.json go")
    return p


# --- measuring --------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    la = os.getloadavg()
    return {"cpus": os.cpu_count(), "load": [round(x, 2) for x in la], "kernel": platform.release(),
            "python": platform.python_version(), "machine": platform.machine(),
            "cpu_model": _cpu_model()}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _imports() -> tuple[Any, Any, Any]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_kstack
    import bench_pmd
    import linux_udp
    return bench_kstack, bench_pmd, linux_udp


def _kstack(bk: Any, mode: str, sizes: list[int], a: argparse.Namespace, say: Callable[[str], None]) -> list[Point]:
    itr = "0" if mode == "interrupt" else "dynamic"
    name = f"kstack {'interrupt' if mode == 'interrupt' else 'NAPI'}"
    lab = bk.Lab()
    pts: list[Point] = []
    try:
        lab.up(mode, itr)
        port = 9000
        for size in sizes:
            pt: Point = {"path": name, "size": size, "rate": [], "p50": [], "p99": [], "cpu_ns": []}
            for _ in range(a.repeat):
                port += 1
                r = bk.kstack_rate(lab, a.seconds, a.warmup, port, payload=size - ETH_IP_UDP_FCS)
                pt["rate"].append(r["rate"])
                pt["cpu_ns"].append(r["per"]["CPU ns: all five"])
                port += 1
                pp = bk.kstack_pingpong(lab, a.rounds, port, payload=size - ETH_IP_UDP_FCS)
                pt["p50"].append(pp["p50_us"])
                pt["p99"].append(pp["p99_us"])
            say(_line(pt))
            pts.append(pt)
    finally:
        lab.close()
    return pts


def _pmd(bp: Any, sizes: list[int], a: argparse.Namespace, say: Callable[[str], None],
         page: bool = False) -> list[Point]:
    pts: list[Point] = []
    for size in sizes:
        pt: Point = {"path": "bypass PMD + page" if page else "bypass PMD", "size": size,
                     "rate": [], "p50": [], "p99": [], "cpu_ns": []}
        for _ in range(a.repeat):
            pair = bp.EmulatorPair(doorbell_page=page)
            try:
                r = bp.rx_rate(pair, a.seconds, size - 4, 128)
                pp = bp.ping_pong(pair, a.rounds, size - 4)
            finally:
                pair.close()
            pt["rate"].append(r["rate"])
            pt["cpu_ns"].append((r["cpu_self"] + r.get("cpu_emulator", 0.0)) * 1e9 / max(r["received"], 1))
            pt["p50"].append(pp["p50"])
            pt["p99"].append(pp["p99"])
        say(_line(pt))
        pts.append(pt)
    return pts


def _linux(lu: Any, sizes: list[int], a: argparse.Namespace, say: Callable[[str], None]) -> list[Point]:
    pts: list[Point] = []
    for size in sizes:
        pt: Point = {"path": "Linux UDP", "size": size, "rate": [], "p50": [], "p99": [], "cpu_ns": []}
        payload = size - ETH_IP_UDP_FCS
        for _ in range(a.repeat):
            r = lu.rate(payload, a.seconds)
            pp = lu.pingpong(payload, a.rounds)
            pt["rate"].append(r["rate"])
            pt["cpu_ns"].append(r["rx_cpu_ns_per_pkt"] + r["tx_cpu_ns_per_pkt"])
            pt["p50"].append(pp["p50_us"])
            pt["p99"].append(pp["p99_us"])
        say(_line(pt))
        pts.append(pt)
    return pts


# --- reporting --------------------------------------------------------------------------------

def _sp(v: list[float], fmt: str = "{:,.0f}") -> str:
    if not v:
        return "-"
    m = statistics.median(v)
    if len(v) == 1:
        return fmt.format(m)
    return f"{fmt.format(m)} ({fmt.format(min(v))}-{fmt.format(max(v))})"


def _line(pt: Point) -> str:
    return (f"  {pt['path']:<16} {pt['size']:>5} B: {_sp(pt['rate'])} frames/s, p50 {_sp(pt['p50'], '{:.1f}')} us, "
            f"p99 {_sp(pt['p99'], '{:.1f}')} us, {_sp(pt['cpu_ns'])} CPU ns/frame")


def markdown_table(points: list[Point]) -> str:
    """One row per (path, size): median (min-max) of the repetitions."""
    rows = ["| path | frame bytes | frames/s | Mbit/s (frames) | RTT p50 us | RTT p99 us | CPU ns per frame (all processes) | n |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for pt in points:
        mbit = [r * pt["size"] * 8 / 1e6 for r in pt["rate"]]
        rows.append(f"| {pt['path']} | {pt['size']} | {_sp(pt['rate'])} | {_sp(mbit, '{:,.1f}')} | "
                    f"{_sp(pt['p50'], '{:.1f}')} | {_sp(pt['p99'], '{:.1f}')} | {_sp(pt['cpu_ns'])} | {len(pt['rate'])} |")
    return "\n".join(rows) + "\n"


def chart(points: list[Point], note: str = "") -> str:
    from lab.svgchart import Series, line_chart

    series: dict[str, Series] = {}
    for pt in points:
        if pt["rate"]:
            s = series.setdefault(pt["path"], Series(pt["path"]))
            s.points[pt["size"]] = (statistics.median(pt["rate"]), min(pt["rate"]), max(pt["rate"]))
    return line_chart(list(series.values()), title="UDP receive rate by frame size", x_label="frame size (bytes, with FCS)",
                      y_label="frames/s", log_y=True, note=note)


def _machine_text(m0: dict, m1: dict) -> str:
    return (f"machine: {m0['cpus']} CPUs ({m0['cpu_model']}, {m0['machine']}), Linux {m0['kernel']}, Python {m0['python']}; "
            f"load average {' '.join(map(str, m0['load']))} before, {' '.join(map(str, m1['load']))} after")


def run(args: argparse.Namespace) -> int:
    try:
        sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    except ValueError:
        print("nicemu bench: --sizes takes integers, e.g. 64,128,1518", file=sys.stderr)
        return 2
    if not sizes or any(not 64 <= s <= 1518 for s in sizes) or args.repeat < 1:
        print("nicemu bench: frame sizes are 64..1518 and --repeat at least 1", file=sys.stderr)
        return 2
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    bad = [p for p in paths if p not in PATHS]
    if bad:
        print(f"nicemu bench: unknown path(s) {', '.join(bad)} (have: {', '.join(PATHS)})", file=sys.stderr)
        return 2
    if args.quick:
        args.seconds, args.rounds = min(args.seconds, 0.5), min(args.rounds, 200)
    args.warmup = 0.3 if args.quick else 0.5
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Every process a benchmark starts dies with us (PR_SET_PDEATHSIG), and their sockets go in
    # one run directory (the benchmarks' tempfile.mkdtemp) that a watcher removes when we are
    # gone, even after kill -9.
    from lab.procs import reaped_tempdir

    with reaped_tempdir("_bench"):  # before any thread starts: its watcher forks
        return _run(args, sizes, paths, out)


def _run(args: argparse.Namespace, sizes: list[int], paths: list[str], out: Path) -> int:

    def say(line: str) -> None:
        print(line, flush=True)

    m0 = machine()
    say(f"nicemu bench: sizes {', '.join(map(str, sizes))}; {args.repeat} repetition(s), {args.seconds:g} s windows, "
        f"{args.rounds} ping-pong rounds; median (min-max)")
    say(_machine_text(m0, m0).split("; load")[0] + f"; load average {' '.join(map(str, m0['load']))}")
    bk, bp, lu = _imports()
    points: list[Point] = []
    t0 = time.monotonic()
    failed: list[str] = []
    try:
        for path in paths:
            say(f"{path}:")
            try:
                if path == "kstack interrupt":
                    points += _kstack(bk, "interrupt", sizes, args, say)
                elif path == "kstack NAPI":
                    points += _kstack(bk, "napi", sizes, args, say)
                elif path == "bypass PMD":
                    points += _pmd(bp, sizes, args, say)
                elif path == "bypass PMD + page":
                    points += _pmd(bp, sizes, args, say, page=True)
                else:
                    points += _linux(lu, sizes, args, say)
            except (RuntimeError, OSError, ValueError, KeyError) as e:  # one path failing is reported, not fatal
                why = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
                failed.append(f"{path}: {why}")
                say(f"  FAILED: {why}")
    except KeyboardInterrupt:
        say("nicemu bench: interrupted; writing what was measured")
    m1 = machine()
    mtext = _machine_text(m0, m1)
    loaded = max(m0["load"][0], m1["load"][0]) > (m0["cpus"] or 1) * 0.5
    caveat = ("the machine was loaded: figures are lower and wider than on an idle one" if loaded else "")
    md = [f"# nicemu bench, {time.strftime('%Y-%m-%d %H:%M')}", "", mtext + ".",
          f"{args.repeat} repetition(s) per point, {args.seconds:g} s rate windows, {args.rounds} ping-pong rounds; "
          f"median (min-max); {time.monotonic() - t0:.0f} s in all." + (f" Note: {caveat}." if caveat else ""), "",
          markdown_table(points), "![frames/s by frame size](bench.svg)", ""]
    md += [f"Failed: {f}" for f in failed]
    (out / "bench.md").write_text("\n".join(md))
    (out / "bench.svg").write_text(chart(points, note=mtext))
    (out / "bench.json").write_text(json.dumps({"machine_before": m0, "machine_after": m1, "args": {
        k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}, "points": points}, indent=1))
    say("")
    say(markdown_table(points))
    say(mtext + (f"; {caveat}" if caveat else ""))
    for f in failed:
        say(f"failed: {f}")
    say(f"nicemu bench: wrote {out / 'bench.md'}, {out / 'bench.svg'}, {out / 'bench.json'}")
    return 1 if failed else 0
