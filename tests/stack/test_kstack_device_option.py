"""The kernel process's `--device SOCKET,key=value...` (kstack.kernel.parse_device): the keys
that are not the driver's E1000Config (gro/gso have their tests in test_kstack_gro.py)."""
from __future__ import annotations

import pytest

from kstack.kernel import DeviceSpec, OptionError, parse_device


def test_defaults() -> None:
    spec = parse_device("/tmp/x.sock", 2)
    assert spec == DeviceSpec("/tmp/x.sock", "eth2")
    assert (spec.mode, spec.qdisc, spec.txqueuelen, spec.doorbell_page) == ("napi", "pfifo_fast", 1000, False)


@pytest.mark.parametrize("raw, want", [("on", True), ("off", False), ("1", True), ("false", False), ("ON", True)])
def test_doorbell_page(raw: str, want: bool) -> None:
    spec = parse_device(f"/tmp/x.sock,name=eth1,doorbell_page={raw}", 0)
    assert spec.doorbell_page is want and spec.config == {}  # a bus setting, not the driver's


@pytest.mark.parametrize("bad, why", [("doorbell_page=maybe", "bad doorbell_page"), ("doorbell_page=", "not key=value"),
                                      ("doorbell=on", "unknown key"), ("mode=poll", "napi or interrupt"),
                                      ("txqueuelen=-1", "must not be negative")])
def test_refused(bad: str, why: str) -> None:
    with pytest.raises(OptionError, match=why):
        parse_device(f"/tmp/x.sock,{bad}", 0)
