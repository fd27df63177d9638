"""`nicemu demo`'s table and closing lines, from its Samples: medians of the repetitions with
their spread, per packet echoed, and sentences worded from this run's figures."""
from __future__ import annotations

import math
import statistics
from typing import Callable, Sequence

from lab.paths import Sample

NA = float("nan")


def _kstack(s: Sample, name: str) -> float:
    c = s.counters
    v = {
        "interrupts": c.get("ethtool.eth0.interrupts", 0),
        "syscalls": c.get("syscall.syscalls_total", 0),
        "copied": c.get("syscall.bytes_copied_in", 0) + c.get("syscall.bytes_copied_out", 0)
                  + c.get("ethtool.eth0.rx_copied_bytes", 0) + c.get("ethtool.eth0.tx_copied_bytes", 0),
        "skbs": c.get("skb.skb_allocs", 0),
        "reads": NA,  # kstack's driver does not count its register reads (an ICR read per interrupt)
        "doorbells": c.get("ethtool.eth0.rx_doorbells", 0) + c.get("ethtool.eth0.tx_doorbells", 0),
    }
    return v[name]


def _pmd(s: Sample, name: str) -> float:
    c = s.counters
    return {"interrupts": c.get("interrupts", 0), "syscalls": 0, "copied": 0, "skbs": 0,
            "reads": c.get("mmio_reads", 0),
            "doorbells": c.get("rx_doorbells", 0) + c.get("tx_doorbells", 0)}[name]


def _linux(s: Sample, name: str, payload: int) -> float:
    # the echo process: one recvfrom and one sendto; the payload copied in and out; loopback
    # has no device: no interrupt, register or doorbell; its sk_buffs are not counted from Python
    return {"interrupts": NA, "syscalls": 2 * s.echoed, "copied": 2 * payload * s.echoed, "skbs": NA,
            "reads": NA, "doorbells": NA}[name]


def count(s: Sample, name: str, payload: int) -> float:
    """Echo-side count `name` per packet echoed."""
    if s.path == "linux":
        v = _linux(s, name, payload)
    elif s.path == "bypass pmd":
        v = _pmd(s, name)
    else:
        v = _kstack(s, name)
    return s.per(v)


def cpu(s: Sample, side: str) -> float:
    """CPU ns per packet of one side: echo (nic1's driver, stack and echo server), client
    (kernel A and the client), emulator."""
    roles = {"emulator": ["emulator"], "client": ["kernel A", "client"]}.get(side)
    if roles is None:
        roles = [r for r in s.cpu_ns if r not in ("emulator", "kernel A", "client")]
    if not any(r in s.cpu_ns for r in roles):
        return NA
    return s.per(sum(s.cpu_ns.get(r, 0) for r in roles))


def echo_ctx(s: Sample) -> float:
    return s.per(sum(v for r, v in s.ctx.items() if r not in ("emulator", "kernel A", "client")))


def fmt(v: float) -> str:
    """Enough digits for small counts (12 in 100,000 is 0.00012, not 0.000)."""
    if v != v:
        return "-"
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 0.1:
        return f"{v:.2f}"
    return f"{v:.2g}"


def cell(values: list[float]) -> str:
    """median [min-max] of the repetitions (the spread only when it differs)."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return "-"
    med, lo, hi = statistics.median(vals), min(vals), max(vals)
    if fmt(lo) == fmt(hi):
        return fmt(med)
    return f"{fmt(med)} [{fmt(lo)}-{fmt(hi)}]"


def median(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return statistics.median(vals) if vals else NA


ROWS: list[tuple[str, str, Callable[[Sample, int], float]]] = [
    ("echoes/s", "stream", lambda s, p: s.client.get("rate", NA)),
    ("round trip p50 us", "ping", lambda s, p: s.client.get("p50_us", NA)),
    ("round trip p99 us", "ping", lambda s, p: s.client.get("p99_us", NA)),
    ("per packet, echo side:", "", lambda s, p: NA),
    ("  interrupts", "stream", lambda s, p: count(s, "interrupts", p)),
    ("  context switches", "stream", lambda s, p: echo_ctx(s)),
    ("  syscalls", "stream", lambda s, p: count(s, "syscalls", p)),
    ("  bytes copied", "stream", lambda s, p: count(s, "copied", p)),
    ("  sk_buff allocations", "stream", lambda s, p: count(s, "skbs", p)),
    ("  register reads", "stream", lambda s, p: count(s, "reads", p)),
    ("  doorbells (RDT+TDT)", "stream", lambda s, p: count(s, "doorbells", p)),
    ("CPU ns per packet:", "", lambda s, p: NA),
    ("  echo side (driver, stack, app)", "stream", lambda s, p: cpu(s, "echo")),
    ("  client side (kernel A + client)", "stream", lambda s, p: cpu(s, "client")),
    ("  emulator (both NICs, the cable)", "stream", lambda s, p: cpu(s, "emulator")),
]


def table(samples: Sequence[Sample], paths: Sequence[str], payload: int) -> str:
    """A row per figure, a column per path: median [min-max] of the repetitions."""
    head = ["", *paths]
    rows = []
    for title, phase, get in ROWS:
        if not phase:
            rows.append([title] + [""] * len(paths))
            continue
        row = [title]
        for path in paths:
            ss = [s for s in samples if s.path == path and (s.window == 1) == (phase == "ping")]
            row.append(cell([get(s, payload) for s in ss]))
        rows.append(row)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    out = ["  ".join([head[0].ljust(widths[0])] + [h.rjust(w) for h, w in zip(head[1:], widths[1:])]),
           "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]).rstrip())
    return "\n".join(out)


def closing(samples: Sequence[Sample], payload: int) -> list[str]:
    """What made bypass faster, and how kstack stands against Linux, in this run's figures."""
    def med(path: str, get: Callable[[Sample], float], ping: bool = False) -> float:
        return median([get(s) for s in samples if s.path == path and (s.window == 1) == ping])

    out: list[str] = []
    rate = {p: med(p, lambda s: s.client.get("rate", NA)) for p in ("kstack irq", "kstack napi", "bypass pmd", "linux")}
    rtt = {p: med(p, lambda s: s.client.get("p50_us", NA), True) for p in rate}
    k, b = "kstack napi", "bypass pmd"
    if not math.isnan(rate[k]) and not math.isnan(rate[b]) and rate[k] > 0:
        r = rate[b] / rate[k]
        out.append(f"Bypass echoed {r:.1f} times as many datagrams per second as kstack with NAPI "
                   f"({fmt(rate[b])} against {fmt(rate[k])}), round trip {fmt(rtt[b])} us against "
                   f"{fmt(rtt[k])} us (medians).")
        parts = []
        for name, what in (("syscalls", "syscalls"), ("copied", "bytes copied"), ("skbs", "sk_buff allocations"),
                           ("interrupts", "interrupts")):
            a = med(k, lambda s: count(s, name, payload))
            z = med(b, lambda s: count(s, name, payload))
            if not math.isnan(a) and a > 0:
                parts.append(f"{fmt(a)} {what} per packet became {fmt(z)}")
        ca, cb = med(k, lambda s: cpu(s, "echo")), med(b, lambda s: cpu(s, "echo"))
        xa, xb = med(k, echo_ctx), med(b, echo_ctx)
        lead = ("What made it faster, on the echo side: " if r >= 1 else
                "Bypass was not faster in this run's stream: its busy-polling PMD competed for the "
                "CPUs with the emulator, kernel A and the client (see the load). What it removed, "
                "on the echo side: ")
        out.append(lead + "; ".join(parts)
                   + f"; context switches went from {fmt(xa)} to {fmt(xb)} per packet and the echo "
                     f"side's CPU from {fmt(ca)} to {fmt(cb)} ns per packet.")
        out.append("The price: the PMD never sleeps. It spins on its descriptors and keeps a core "
                   "busy with or without traffic, which is why the demo runs it alone beside the "
                   "emulator (never more busy-polling processes than cores).")
    i, n = "kstack irq", "kstack napi"
    ia, na = med(i, lambda s: count(s, "interrupts", payload)), med(n, lambda s: count(s, "interrupts", payload))
    if not math.isnan(ia) and not math.isnan(na):
        if na < 0.8 * ia:
            why = "a poll takes what piled up while interrupts were masked"
        else:
            why = ("no saving here: at this rate each interrupt finds only a few packets, so a poll "
                   "ends as soon as it starts (NAPI pays off when frames arrive faster than one "
                   "interrupt's work: see nicemu drivers, or nicemu bench)")
        out.append(f"NAPI against interrupt mode under the same load: {fmt(na)} interrupts per packet "
                   f"against {fmt(ia)}: {why}.")
    l = "linux"
    if not math.isnan(rate[l]) and not math.isnan(rate[k]) and rate[l] > 0:
        out.append(f"The real Linux kernel (its UDP on loopback, the same Python client and a Python "
                   f"echo server) echoed {fmt(rate[l])} datagrams/s, round trip {fmt(rtt[l])} us: "
                   f"kstack with NAPI reached {rate[k] / rate[l]:.2f} of its rate; the kernel is C, "
                   f"kstack and the emulated NIC are Python processes.")
    return out
