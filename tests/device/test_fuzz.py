"""The short run of every fuzz target (nicemu/fuzz): fixed seeds, so a failure here replays
with `python -m nicemu.fuzz --target NAME --seed SEED --iterations N`."""
from __future__ import annotations

import pytest

from nicemu.fuzz import TARGETS, FuzzReport, load_target

# iterations per target for the test run: enough to hit every kind of case the target draws
SHORT_RUN = {"device": 300, "vfio_user": 300, "shm": 2000, "topology": 300}
SEEDS = (1, 20261204)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_target_short_run(target: str, seed: int) -> None:
    report = load_target(target)(seed, SHORT_RUN[target], None)
    assert isinstance(report, FuzzReport)
    assert report.target == target and report.seed == seed
    assert report.iterations == SHORT_RUN[target]
    # the run drew more than one kind of input and the system said something about them
    assert len(report.cases) >= 2, report.summary()
    assert report.outcomes, report.summary()


def test_fuzz_command_runs_and_prints(capsys: pytest.CaptureFixture[str]) -> None:
    from nicemu.fuzz.__main__ import main
    assert main(["--target", "topology", "--seed", "3", "--iterations", "20"]) == 0
    out = capsys.readouterr().out
    assert "topology: seed 3, 20 iterations" in out and "every invariant held" in out
