"""`gro` and `gso` of a host's interface in a topology (ethtool -K DEV gro/gso for kstack's
software offloads): checked with the rest of the file, and handed to the kernel as its
`--device ...,gro=on|off,gso=on|off`, which kstack.kernel parses back into the driver's
configuration; left out, the kernel keeps its default (NICEMU_GRO / NICEMU_GSO)."""
from __future__ import annotations

import pytest

from nicemu import topology_hosts as H
from test_up_hosts import DEVICES, one_problem, parse

IF_A = "hosts:\n  a:\n    interfaces:\n      eth0: {device: nic0, addresses: [198.18.0.1/24]%s}\n"


def _device_opt(cmd: list[str]) -> str:
    return cmd[cmd.index("--device") + 1]


def test_gro_and_gso_are_parsed_and_passed_to_the_kernel() -> None:
    topo = parse(DEVICES + IF_A % ", gro: false, gso: true")
    eth0 = topo.hosts["a"].interfaces["eth0"]
    assert (eth0.gro, eth0.gso) == (False, True)
    opt = _device_opt(H.kernel_command(topo, topo.hosts["a"]))
    assert opt.endswith(",gro=off,gso=on")
    from kstack.kernel import parse_device
    spec = parse_device(opt, 0)
    assert (spec.config["gro"], spec.config["gso"]) == (False, True)


def test_left_out_the_kernel_keeps_its_default() -> None:
    topo = parse(DEVICES + IF_A % "")
    eth0 = topo.hosts["a"].interfaces["eth0"]
    assert eth0.gro is None and eth0.gso is None
    opt = _device_opt(H.kernel_command(topo, topo.hosts["a"]))
    assert "gro=" not in opt and "gso=" not in opt


@pytest.mark.parametrize("key, value", [("gro", "enabled"), ("gso", 1), ("gro", "null")])
def test_a_value_that_is_not_true_or_false_is_refused(key: str, value) -> None:
    one_problem(DEVICES + IF_A % f", {key}: {value}", f"hosts.a.interfaces.eth0.{key}", "true or false")
