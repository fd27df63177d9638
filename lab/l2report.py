"""The driver-level demo's figures: one Measurement per mode and phase, the tables, and the
lesson worded from this run's figures (every sentence follows from the numbers)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

from lab.l2echo import CPU_MIN_TICKS, DEFAULT_SIZE, MODES

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
                    f"frames ({_pp(a)} per packet) against {irq.interrupts:,} for {irq.echoed:,} "
                    f"({_pp(b)}) in interrupt mode: {_compare(a, b)} per packet")
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


def _pp(v: float) -> str:
    """A per-packet figure with enough digits: 12 interrupts in 100,000 frames is 0.00012,
    not 0.000."""
    return f"{v:.3f}" if v == 0 or v >= 0.001 else f"{v:.2g}"


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
            row += [_pp(m.per_packet(m.interrupts)), _pp(m.per_packet(m.doorbells)),
                    _pp(m.per_packet(m.mmio_reads)), f"{m.ctx.get('driver', 0):,}",
                    f"{m.ctx.get('generator', 0):,}", f"{m.ctx.get('emulator', 0):,}",
                    _share(m.cpu.get("driver", 0.0), m.wall) if cpu_measurable(m) else "n/a"]
            rows.append(row)
        out += _table(head, rows, (first + 3, first + 5, " context switches "))
    return "\n".join(out)

