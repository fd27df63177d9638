"""The two driver processes' command lines: every option has help and a shown default, and the
same ideas have the same names in both (--app, --seconds, --stats-interval), with the older
spellings (--role, --duration, --interval) still accepted."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from driver.kernel import build_parser


def _help(module: str) -> str:
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("module", ["driver.kernel", "driver.pmd"])
def test_help_gives_every_option_help_and_a_default(module: str) -> None:
    text = _help(module)
    options = text.split("options:", 1)[1]
    # one entry per option: a line starting with two spaces and a dash, then its help
    entries = re.split(r"\n  (?=-)", options)[1:]
    assert len(entries) > 5
    for entry in entries:
        name = entry.split()[0]
        if name in ("-h,", "--socket"):
            continue
        assert "(default:" in entry, f"{module} {name} shows no default:\n{entry}"
        first, _, rest = entry.partition("\n")
        assert len(first.split()) > 2 or rest.strip(), f"{module} {name} has no help"
    for name in ("--app", "--seconds", "--stats-interval", "--role", "--duration", "--interval"):
        assert name in options, f"{module} does not accept {name}"


def test_kernel_accepts_both_spellings() -> None:
    p = build_parser()
    new = p.parse_args(["--socket", "s", "--app", "sink", "--seconds", "2", "--stats-interval", "0.5"])
    old = p.parse_args(["--socket", "s", "--role", "sink", "--duration", "2", "--interval", "0.5"])
    for a in (new, old):
        assert (a.app, a.duration, a.stats_interval) == ("sink", 2.0, 0.5)
    assert p.parse_args(["--socket", "s"]).app == "count"


@pytest.mark.parametrize("args", [["--app", "count", "--seconds", "1", "--stats-interval", "1"],
                                  ["--role", "sink", "--duration", "1", "--interval", "1"]])
def test_pmd_accepts_both_spellings(args: list[str], tmp_path) -> None:
    # no device behind the socket: the options parse (exit 1 with an error event, not 2)
    r = subprocess.run([sys.executable, "-m", "driver.pmd", "--socket", str(tmp_path / "none.sock"), *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert json.loads(r.stdout.splitlines()[-1])["event"] == "error"
