"""`gro`, `gso` and `doorbell_page` of a host's interface in a topology (ethtool -K DEV gro/gso
for kstack's software offloads; the driver's tails through the doorbell page): checked with the
rest of the file, and handed to the kernel as its `--device ...,gro=on|off,gso=on|off,
doorbell_page=on|off`, which kstack.kernel parses back; left out, the kernel keeps its default
(NICEMU_GRO / NICEMU_GSO; the page off)."""
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
    assert eth0.gro is None and eth0.gso is None and eth0.doorbell_page is None
    opt = _device_opt(H.kernel_command(topo, topo.hosts["a"]))
    assert "gro=" not in opt and "gso=" not in opt and "doorbell_page=" not in opt
    from kstack.kernel import parse_device
    assert parse_device(opt, 0).doorbell_page is False


@pytest.mark.parametrize("value", [True, False])
def test_doorbell_page_is_passed_to_the_kernel(value: bool) -> None:
    topo = parse(DEVICES + IF_A % f", doorbell_page: {str(value).lower()}")
    assert topo.hosts["a"].interfaces["eth0"].doorbell_page is value
    opt = _device_opt(H.kernel_command(topo, topo.hosts["a"]))
    assert opt.endswith(f",doorbell_page={'on' if value else 'off'}")
    from kstack.kernel import parse_device
    assert parse_device(opt, 0).doorbell_page is value


@pytest.mark.parametrize("key, value", [("gro", "enabled"), ("gso", 1), ("gro", "null"), ("doorbell_page", 2)])
def test_a_value_that_is_not_true_or_false_is_refused(key: str, value) -> None:
    one_problem(DEVICES + IF_A % f", {key}: {value}", f"hosts.a.interfaces.eth0.{key}", "true or false")
