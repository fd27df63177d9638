"""A line chart as SVG text, standard library only: the figure `nicemu bench` writes.

Why by hand: the project takes no plotting dependency, and a chart of a few series over a few
x values needs only axes, ticks, labels, one polyline per series with its points, error bars
(min..max of the repetitions) and a legend. The y axis can be logarithmic (the paths differ
by orders of magnitude). Every text is XML-escaped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

__all__ = ["Series", "line_chart"]

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
W, H = 760, 440
LEFT, RIGHT, TOP, BOTTOM = 80, 190, 40, 60


@dataclass
class Series:
    """One line: its name and, per x, (median, low, high); a missing point is left out."""

    name: str
    points: dict[float, tuple[float, float, float]] = field(default_factory=dict)


def _fmt(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:g}M"
    if v >= 1e3:
        return f"{v / 1e3:g}k"
    return f"{v:g}"


def _log_ticks(lo: float, hi: float) -> list[float]:
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    return [10.0 ** e for e in range(a, b + 1)]


def _lin_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    step = 10 ** math.floor(math.log10(max(hi - lo, 1e-12) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 2)]


def line_chart(series: list[Series], *, title: str, x_label: str, y_label: str,
               log_y: bool = True, note: str = "") -> str:
    """The SVG document (text) of `series` against their x values."""
    xs = sorted({x for s in series for x in s.points})
    ys = [v for s in series for p in s.points.values() for v in p if v > 0 or not log_y]
    if not xs or not ys:
        xs, ys = xs or [0.0, 1.0], ys or [1.0, 10.0]
    if log_y:
        ticks = _log_ticks(min(ys), max(ys))
        y0, y1 = math.log10(ticks[0]), math.log10(ticks[-1])
        ty = lambda v: math.log10(max(v, ticks[0]))  # noqa: E731
    else:
        ticks = _lin_ticks(min(0.0, min(ys)), max(ys))
        y0, y1 = ticks[0], ticks[-1]
        ty = lambda v: v  # noqa: E731
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    xpos = {x: LEFT + (pw * i / max(len(xs) - 1, 1) if len(xs) > 1 else pw / 2) for i, x in enumerate(xs)}

    def py(v: float) -> float:
        return TOP + ph - (ty(v) - y0) / ((y1 - y0) or 1) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           f'font-family="sans-serif" font-size="12">',
           f'<title>{escape(title)}</title>',
           f'<rect x="0" y="0" width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2:.0f}" y="22" text-anchor="middle" font-size="15">{escape(title)}</text>',
           f'<g class="axes" stroke="black"><line x1="{LEFT}" y1="{TOP + ph}" x2="{LEFT + pw}" y2="{TOP + ph}"/>'
           f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + ph}"/></g>']
    out.append('<g class="yticks">')
    for t in ticks:
        y = py(t)
        out.append(f'<line x1="{LEFT - 5}" y1="{y:.1f}" x2="{LEFT + pw}" y2="{y:.1f}" stroke="#ddd"/>'
                   f'<text x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">{escape(_fmt(t))}</text>')
    out.append('</g><g class="xticks">')
    for x, X in xpos.items():
        out.append(f'<line x1="{X:.1f}" y1="{TOP + ph}" x2="{X:.1f}" y2="{TOP + ph + 5}" stroke="black"/>'
                   f'<text x="{X:.1f}" y="{TOP + ph + 20}" text-anchor="middle">{escape(f"{x:g}")}</text>')
    out.append('</g>')
    out.append(f'<text x="{LEFT + pw / 2:.0f}" y="{H - 18}" text-anchor="middle">{escape(x_label)}</text>')
    out.append(f'<text x="18" y="{TOP + ph / 2:.0f}" text-anchor="middle" '
               f'transform="rotate(-90 18 {TOP + ph / 2:.0f})">{escape(y_label + (" (log scale)" if log_y else ""))}</text>')
    for i, s in enumerate(series):
        c = COLORS[i % len(COLORS)]
        pts = [(xpos[x], s.points[x]) for x in xs if x in s.points]
        out.append(f'<g class="series" data-name="{escape(s.name, {chr(34): "&quot;"})}" stroke="{c}" fill="{c}">')
        if len(pts) > 1:
            out.append('<polyline fill="none" stroke-width="2" points="'
                       + " ".join(f"{X:.1f},{py(m):.1f}" for X, (m, _lo, _hi) in pts) + '"/>')
        for X, (m, lo, hi) in pts:
            out.append(f'<line x1="{X:.1f}" y1="{py(lo):.1f}" x2="{X:.1f}" y2="{py(hi):.1f}" stroke-width="1"/>'
                       f'<circle cx="{X:.1f}" cy="{py(m):.1f}" r="3"/>')
        ly = TOP + 10 + 20 * i
        out.append(f'<line x1="{W - RIGHT + 15}" y1="{ly}" x2="{W - RIGHT + 40}" y2="{ly}" stroke-width="2"/>'
                   f'<text x="{W - RIGHT + 46}" y="{ly + 4}" stroke="none" fill="black">{escape(s.name)}</text></g>')
    if note:
        out.append(f'<text x="{LEFT}" y="{H - 4}" font-size="10" fill="#555">{escape(note)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
