"""Receive address filtering (SDM 3.2.1, 13.4.22 RCTL, 13.5 MTA/RAL/RAH), both engines.

Order (docs/reference/e1000-subset.md "Receive filtering"): broadcast is accepted only if
RCTL.BAM (no other filter passes it); multicast with MPE; unicast with UPE; an exact RAL/RAH match
(AV set, AS = 00); a multicast whose MTA hash bit (RCTL.MO) is set. Nothing else passes.
"""
from __future__ import annotations

import pytest
from conftest import BROADCAST, MAC_BYTES, RxRing, make_frame

from nicemu import regs as R

MCAST = bytes.fromhex("01aa00123456")  # the reference's example address
OTHER = bytes.fromhex("020000000002")


@pytest.fixture(params=["python", "cython"])
def dev(request, make_nic):
    nic = make_nic(engine=request.param)
    RxRing(nic, n=64).setup()  # RCTL = EN | BAM
    return nic


def accepted(nic, dst: bytes) -> bool:
    before = nic.regs[R.RDH >> 2]
    nic.receive(make_frame(dst=dst))
    return nic.regs[R.RDH >> 2] != before


def set_rctl(nic, bits: int) -> None:
    nic.write32(R.RCTL, int(R.Rctl.EN) | bits)


def test_own_address_from_the_eeprom(dev) -> None:
    assert accepted(dev, MAC_BYTES)
    assert not accepted(dev, OTHER)


def test_broadcast_needs_bam(dev) -> None:
    assert accepted(dev, BROADCAST)
    set_rctl(dev, 0)
    assert not accepted(dev, BROADCAST)


def test_broadcast_without_bam_is_rejected_by_every_other_filter(dev) -> None:
    """The reference: "Broadcast is accepted only if RCTL.BAM" (nicemu follows it where the SDM's
    RCTL.BAM text would let MPE or an MTA/exact match pass it, as QEMU does)."""
    h = (0xFF | 0xFF << 8) >> 4 & 0xFFF  # ff:ff's MTA hash under MO 0
    dev.write32(R.MTA + 4 * (h >> 5), 1 << (h & 31))
    dev.write32(R.RAL(5), 0xFFFFFFFF)
    dev.write32(R.RAH(5), 0xFFFF | int(R.Rah.AV))  # an exact entry for ff:ff:ff:ff:ff:ff
    dev.read32(R.TPR)
    for bits in (0, R.Rctl.MPE, R.Rctl.UPE, R.Rctl.MPE | R.Rctl.UPE | R.Rctl.SBP):
        set_rctl(dev, int(bits))
        assert not accepted(dev, BROADCAST), bits
    assert dev.read32(R.TPR) == 4  # the MAC saw them
    assert [dev.read32(o) for o in (R.GPRC, R.BPRC, R.MPRC, R.RNBC, R.MPC)] == [0, 0, 0, 0, 0]
    set_rctl(dev, int(R.Rctl.BAM))  # the same frame, BAM alone
    assert accepted(dev, BROADCAST)
    assert dev.read32(R.BPRC) == 1 and dev.read32(R.GPRC) == 1


def test_bam_passes_only_broadcast(dev) -> None:
    set_rctl(dev, int(R.Rctl.BAM))
    assert not accepted(dev, MCAST)
    assert not accepted(dev, bytes.fromhex("ffffffffffFE"))  # all-ones but one bit: a group address
    assert not accepted(dev, OTHER)


def test_mpe_accepts_every_multicast_but_no_unicast(dev) -> None:
    assert not accepted(dev, MCAST)
    set_rctl(dev, int(R.Rctl.MPE))
    assert accepted(dev, MCAST)
    assert accepted(dev, bytes.fromhex("333300000001"))
    assert not accepted(dev, OTHER)


def test_upe_accepts_every_unicast_but_no_multicast(dev) -> None:
    set_rctl(dev, int(R.Rctl.UPE))
    assert accepted(dev, OTHER)
    assert not accepted(dev, MCAST)


@pytest.mark.parametrize("mo, bit", [(0, 0x563), (1, 0xAC6), (2, 0x58D), (3, 0x634)])
def test_mta_hash(dev, mo, bit) -> None:
    set_rctl(dev, mo << R.RCTL_MO_SHIFT)
    assert not accepted(dev, MCAST)
    dev.write32(R.MTA + 4 * (bit >> 5), 1 << (bit & 31))
    assert accepted(dev, MCAST)
    for other_mo in {0, 1, 2, 3} - {mo}:  # the same table bit under another MO does not match
        set_rctl(dev, other_mo << R.RCTL_MO_SHIFT)
        assert not accepted(dev, MCAST)


def test_mta_is_not_used_for_unicast(dev) -> None:
    for i in range(R.MTA_WORDS):
        dev.write32(R.MTA + 4 * i, 0xFFFFFFFF)
    assert not accepted(dev, OTHER)
    assert accepted(dev, MCAST)


def test_all_sixteen_receive_addresses(dev) -> None:
    macs = [bytes([0x02, 0, 0, 0, 0x10, n]) for n in range(16)]
    for n, mac in enumerate(macs[1:], start=1):
        dev.write32(R.RAL(n), int.from_bytes(mac[:4], "little"))
        dev.write32(R.RAH(n), int.from_bytes(mac[4:], "little") | int(R.Rah.AV))
    assert all(accepted(dev, mac) for mac in macs[1:])
    dev.write32(R.RAH(15), int.from_bytes(macs[15][4:], "little"))  # AV clear: entry ignored
    assert not accepted(dev, macs[15])
    dev.write32(R.RAH(15), int.from_bytes(macs[15][4:], "little") | int(R.Rah.AV) | R.RAH_AS & 0x10000)
    assert not accepted(dev, macs[15])  # AS = 01: a source address entry, not a destination one


def test_multicast_address_in_an_exact_entry(dev) -> None:
    dev.write32(R.RAL(3), int.from_bytes(MCAST[:4], "little"))
    dev.write32(R.RAH(3), int.from_bytes(MCAST[4:], "little") | int(R.Rah.AV))
    assert accepted(dev, MCAST)


def test_filtered_frames_count_only_as_received_by_the_mac(dev) -> None:
    dev.read32(R.TPR)
    assert not accepted(dev, OTHER)
    assert dev.read32(R.TPR) == 1 and dev.read32(R.GPRC) == 0
