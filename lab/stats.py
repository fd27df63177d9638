"""`nicemu stats CONFIG [--watch [SECONDS]] [--count N] [--all] [--json]`: the counters of a
running topology, from every process, as Linux's tools print them.

Per process (found by lab.stats_sources from the runtime directory's sockets): CPU ns from
/proc/PID/schedstat, run-queue wait and context switches; per emulator process its control
socket's answer (transport, data path and cable counters of each device); per kernel its
STATS answer: `ethtool -S` of each interface (the driver's and the device's statistics
registers), `nstat` (the SNMP MIB counters), `tc -s qdisc`, `ip neigh`, `ss -tani`, the
syscall channel's. Zero counters are left out unless --all, as nstat does. With --watch each
round after the first also shows what changed since the previous one, `(+N)`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Iterable, TextIO

from lab import stats_sources as S

__all__ = ["add_parser", "run", "collect", "render"]

DEFAULT_WATCH = 2.0


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("stats", help="counters of a running `nicemu up` topology, from every process",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="the topology file `nicemu up` runs")
    p.add_argument("--runtime-dir", metavar="DIR", help="as given to `nicemu up --runtime-dir`")
    p.add_argument("--watch", nargs="?", type=float, const=DEFAULT_WATCH, default=None, metavar="SECONDS",
                   help=f"print again every SECONDS (default {DEFAULT_WATCH:g}) until Ctrl-C")
    p.add_argument("--count", type=int, default=0, metavar="N", help="with --watch: stop after N rounds")
    p.add_argument("--all", action="store_true", help="show zero counters too")
    p.add_argument("--json", action="store_true", help="one JSON object per round instead of text")
    return p


# --- collecting ----------------------------------------------------------------------------------

def collect(topo: Any) -> dict[str, Any]:
    """One snapshot: every live process of `topo` with its costs and its answer."""
    procs = S.find_processes(topo)
    out: list[dict[str, Any]] = []
    for p in procs:
        row: dict[str, Any] = {"kind": p.kind, "name": p.name, "pid": p.pid, "devices": list(p.devices),
                               **p.extra, "costs": S.proc_costs(p.pid)}
        try:
            if p.kind == "emulator" and p.control:
                row["answer"] = S.query_emulator(p.control)
            elif p.kind == "host" and p.syscall_socket:
                row["answer"] = S.query_kernel(p.syscall_socket)
        except (OSError, ValueError) as e:
            row["error"] = f"{type(e).__name__}: {e}"
        out.append(row)
    return {"topology": topo.name, "runtime_dir": str(topo.runtime_dir), "time": time.time(), "processes": out}


# --- rendering -----------------------------------------------------------------------------------

def _flat(d: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _flat(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, d


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _counters(title: str, d: dict, prev: dict | None, show_all: bool, out: list[str], indent: str = "    ") -> None:
    """`title` then `key: value (+delta)` lines of the flattened dict `d`."""
    pflat = dict(_flat(prev)) if prev is not None else {}
    lines = []
    for k, v in _flat(d):
        if isinstance(v, list):
            continue
        if _num(v) and not v and not show_all:
            continue
        delta = ""
        if prev is not None and _num(v) and _num(pflat.get(k)) and v != pflat[k]:
            delta = f" (+{v - pflat[k]:g})" if v > pflat[k] else f" ({v - pflat[k]:g})"
        lines.append(f"{indent}{k}: {v}{delta}")
    if lines:
        out.append(f"  {title}")
        out.extend(lines)


def _costs_line(c: dict, prev: dict | None) -> str:
    if not c:
        return "  process: gone"
    line = (f"  process: CPU {c['cpu_ns'] / 1e6:.1f} ms (schedstat), run-queue wait {c['run_delay_ns'] / 1e6:.1f} ms, "
            f"context switches {c.get('nvcsw', 0)} voluntary / {c.get('nivcsw', 0)} involuntary")
    if prev:
        line += (f"; since last: CPU +{(c['cpu_ns'] - prev.get('cpu_ns', 0)) / 1e6:.1f} ms, "
                 f"+{c['ctx_switches'] - prev.get('ctx_switches', 0)} switches")
    return line


def _render_emulator(a: dict, pa: dict | None, show_all: bool, out: list[str]) -> None:
    for dev, d in a.get("stats", {}).get("devices", {}).items():
        prev = (pa or {}).get("stats", {}).get("devices", {}).get(dev) if pa else None
        out.append(f"  device {dev} {d.get('mac', '')}: link {'up' if d.get('link') else 'down'}, "
                   f"driver {'attached' if d.get('client') else 'not attached'}")
        _counters(f"{dev} transport, data path and cable (no SDM register):",
                  {k: v for k, v in d.items() if k not in ("mac", "link", "client")}, prev, show_all, out)


def _render_kernel(a: dict, pa: dict | None, show_all: bool, out: list[str]) -> None:
    p = pa or {}
    for dev, st in a.get("ethtool", {}).items():
        _counters(f"ethtool -S {dev}:", st, p.get("ethtool", {}).get(dev) if pa else None, show_all, out)
    _counters("nstat (SNMP MIB):", a.get("snmp", {}), p.get("snmp") if pa else None, show_all, out)
    for dev, d in a.get("devices", {}).items():
        q = d.get("qdisc", {})
        _counters(f"tc -s qdisc show dev {dev} ({q.get('kind', '?')}):",
                  {k: v for k, v in q.items() if k != "kind"},
                  p.get("devices", {}).get(dev, {}).get("qdisc") if pa else None, show_all, out)
        _counters(f"ip -s link show {dev}:", d.get("stats", {}),
                  p.get("devices", {}).get(dev, {}).get("stats") if pa else None, show_all, out)
    _counters("drops (by reason):", a.get("drops", {}), p.get("drops") if pa else None, show_all, out)
    _counters("sk_buff pool:", a.get("skb", {}), p.get("skb") if pa else None, show_all, out)
    neigh = a.get("neighbours", [])
    out.append(f"  ip neigh: {len(neigh)} entr{'y' if len(neigh) == 1 else 'ies'}")
    for n in neigh:
        out.append("    " + " ".join(f"{v}" if k in ("dst", "addr") else f"{k} {v}" for k, v in n.items()))
    tcp = a.get("tcp")
    if tcp is not None:
        out.append(f"  ss -tani: {len(tcp)} socket{'s' if len(tcp) != 1 else ''}")
        for t in tcp:
            rest = " ".join(f"{k}:{v}" for k, v in t.items() if k not in ("state", "local", "remote"))
            out.append(f"    {t.get('state')} {t.get('local')} {t.get('remote')} {rest}")
    sc = dict(a.get("syscall", {}))
    sc.pop("per_app", None)
    _counters("syscall channel:", sc, p.get("syscall") if pa else None, show_all, out)


def render(snap: dict, prev: dict | None = None, show_all: bool = False) -> str:
    """Text of one snapshot; with `prev`, the changes since it."""
    procs = snap["processes"]
    before = {(r["kind"], r["name"]): r for r in (prev or {}).get("processes", [])}
    out = [f"nicemu stats: topology {snap['topology']} ({snap['runtime_dir']}), "
           f"{len(procs)} process{'es' if len(procs) != 1 else ''}, "
           f"{time.strftime('%H:%M:%S', time.localtime(snap['time']))}"
           + (f", {snap['time'] - prev['time']:.1f} s after the previous round" if prev else "")]
    for r in procs:
        pr = before.get((r["kind"], r["name"])) if prev is not None else None
        what = {"supervisor": "supervisor", "emulator": "emulator process", "host": "host", "app": "application"}[r["kind"]]
        extra = f", devices {', '.join(r['devices'])}" if r["devices"] else ""
        if r["kind"] == "app":
            extra = f", {r.get('run')} on host {r.get('host')}"
        out.append(f"== {what} {r['name']} (pid {r['pid']}{extra}) ==")
        out.append(_costs_line(r["costs"], pr["costs"] if pr else None))
        if "error" in r:
            out.append(f"  no answer: {r['error']}")
        a = r.get("answer")
        pa = pr.get("answer") if pr else None
        if a is None:
            continue
        if r["kind"] == "emulator":
            _render_emulator(a, pa, show_all, out)
        elif r["kind"] == "host":
            _render_kernel(a, pa, show_all, out)
    return "\n".join(out)


# --- the command ---------------------------------------------------------------------------------

def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from nicemu import topology as T

    out = out or sys.stdout
    try:
        topo = T.load(args.config, runtime_dir=args.runtime_dir)
    except T.TopologyError as e:
        print(f"nicemu stats: {e}", file=sys.stderr)
        return 2
    prev = None
    rounds = 0
    try:
        while True:
            snap = collect(topo)
            if not snap["processes"]:
                print(f"nicemu stats: topology {topo.name} is not up (no live socket in {topo.runtime_dir})",
                      file=sys.stderr)
                return 1
            if args.json:
                print(json.dumps(snap, default=str), file=out, flush=True)
            else:
                print(render(snap, prev, args.all), file=out, flush=True)
            rounds += 1
            if args.watch is None or (args.count and rounds >= args.count):
                return 0
            prev = snap
            time.sleep(max(0.1, args.watch))
    except KeyboardInterrupt:
        return 130
