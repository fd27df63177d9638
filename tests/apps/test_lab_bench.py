"""`nicemu bench`: the SVG writer (valid XML, one series per path, axes with ticks), the
Markdown table (a row per point), and a --quick run of one size and one repetition that
completes and leaves no process or directory behind. Timings are never asserted."""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from lab.bench import PATHS, chart, markdown_table
from lab.svgchart import Series, line_chart

ROOT = Path(__file__).resolve().parents[2]
NS = {"s": "http://www.w3.org/2000/svg"}


def _points() -> list[dict]:
    pts = []
    for i, path in enumerate(PATHS):
        for size in (64, 512, 1518):
            base = 10 ** (3 + i) / (1 + size / 1000)
            pts.append({"path": path, "size": size, "rate": [base, base * 0.9, base * 1.1],
                        "p50": [10.0 * (i + 1)], "p99": [30.0 * (i + 1)], "cpu_ns": [1000.0 * (i + 1)]})
    return pts


def test_svg_is_valid_xml_with_one_series_per_path() -> None:
    svg = chart(_points(), note="machine: 2 CPUs <load & more>")
    root = ET.fromstring(svg)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    groups = root.findall(".//s:g[@class='series']", NS)
    assert [g.get("data-name") for g in groups] == list(PATHS)
    for g in groups:
        assert len(g.findall("s:polyline", NS)) == 1
        assert len(g.findall("s:circle", NS)) == 3  # one marker per size
        assert len(g.find("s:polyline", NS).get("points").split()) == 3
    xt = [t.text for t in root.findall(".//s:g[@class='xticks']/s:text", NS)]
    assert xt == ["64", "512", "1518"]
    yt = [t.text for t in root.findall(".//s:g[@class='yticks']/s:text", NS)]
    top = max(max(p["rate"]) for p in _points())  # 1.1e7 with five paths: the axis ends at 100M
    assert len(yt) >= 4 and yt[0] == "100" and yt[-1] == ("100M" if top > 1e7 else "10M")  # decades: a log axis
    texts = "".join(root.itertext())
    assert "frames/s (log scale)" in texts and "<load & more>" in texts


def test_svg_linear_axis_and_empty_chart() -> None:
    s = Series("one", {1.0: (5.0, 4.0, 6.0), 2.0: (7.0, 7.0, 7.0)})
    root = ET.fromstring(line_chart([s], title="t", x_label="x", y_label="y", log_y=False))
    yt = [float(t.text) for t in root.findall(".//{http://www.w3.org/2000/svg}g[@class='yticks']/{http://www.w3.org/2000/svg}text")]
    assert yt[0] == 0 and yt[-1] >= 7
    ET.fromstring(line_chart([], title="nothing", x_label="x", y_label="y"))  # still a document


def test_markdown_table_has_a_row_per_point() -> None:
    pts = _points()
    lines = markdown_table(pts).strip().splitlines()
    assert lines[0].startswith("| path | frame bytes | frames/s")
    rows = lines[2:]
    assert len(rows) == len(pts)
    assert all(r.count("|") == lines[0].count("|") for r in rows)
    assert rows[0].startswith("| kstack interrupt | 64 | 940 (846-1,034) |")


def _children_of(pid: int) -> list[int]:
    out = []
    for d in glob.glob("/proc/[0-9]*/status"):
        try:
            with open(d) as f:
                if any(ln.startswith("PPid:") and int(ln.split()[1]) == pid for ln in f):
                    out.append(int(d.split("/")[2]))
        except OSError:
            pass
    return out


@pytest.mark.slow
def test_quick_run_of_one_size_completes_and_leaves_nothing(tmp_path: Path) -> None:
    before = set(glob.glob("/tmp/bench-kstack-*")) | set(glob.glob("/tmp/nicemu-bench-*"))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.Popen([sys.executable, "-m", "lab", "bench", "--quick", "--sizes", "64", "--repeat", "1",
                          "--out", str(tmp_path / "out")], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = p.communicate(timeout=600)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, out
    for path in PATHS:
        assert f"| {path} | 64 |" in out
    assert "machine: 2 CPUs" in out or "machine: " in out
    md = (tmp_path / "out" / "bench.md").read_text()
    assert md.count("| 64 |") == len(PATHS) and "load average" in md
    root = ET.fromstring((tmp_path / "out" / "bench.svg").read_text())
    assert len(root.findall(".//s:g[@class='series']", NS)) == len(PATHS)
    assert _children_of(p.pid) == []
    after = set(glob.glob("/tmp/bench-kstack-*")) | set(glob.glob("/tmp/nicemu-bench-*"))
    assert after - before == set()
