"""Receive, through the device's registers as a driver sees it (both engines).

SDM 3.2 (receive descriptors, buffer sizes, EOP, write-back), 13.4.22 (RCTL: EN, LPE, SBP,
BSIZE/BSEX, SECRC, RDMTS), 3.2.9 / 13.4.36 (RX checksum offload), 13.7 (statistics), the RX
packet buffer (PBA) with RNBC, MPC and RXO.
"""
from __future__ import annotations

import struct

import pytest
from conftest import BROADCAST, MAC_BYTES, RxRing, enable_bus_master, make_frame, with_fcs

from nicemu import regs as R
from nicemu.datapath_ref import RefDatapath, ones_sum

DD, EOP, IXSM, TCPCS, IPCS = (int(R.RxdStatus.DD), int(R.RxdStatus.EOP), int(R.RxdStatus.IXSM),
                              int(R.RxdStatus.TCPCS), int(R.RxdStatus.IPCS))
CE, TCPE, IPE = int(R.RxdErrors.CE), int(R.RxdErrors.TCPE), int(R.RxdErrors.IPE)


@pytest.fixture(params=["python", "cython"])
def dev(request, make_nic):
    return make_nic(engine=request.param)


def test_frame_lands_with_its_fcs(dev) -> None:
    ring = RxRing(dev).setup()
    frame = make_frame(size=64)
    dev.receive(frame)
    addr, length, csum, status, errors, special = ring.desc(0)
    assert (length, status, errors, special) == (64, DD | EOP | IXSM, 0, 0)
    assert ring.data(0) == frame  # the FCS bytes are written too
    assert dev.read32(R.RDH) == 1
    assert dev.read32(R.ICR) & R.Icr.RXT0  # RDTR = 0: at once


def test_secrc_strips_the_fcs_from_length_and_buffer(dev) -> None:
    ring = RxRing(dev).setup(rctl=int(R.Rctl.SECRC))
    dev.mem.write(ring.buf_base, b"\xee" * 120)
    frame = make_frame(size=100)
    dev.receive(frame)
    assert ring.desc(0)[1] == 96
    assert dev.mem.read(ring.buf_base, 100) == frame[:-4] + b"\xee" * 4
    assert dev.read32(R.GORCL) == 100  # octet counters still count the FCS


@pytest.mark.parametrize("bsize, bsex, size", [(0, 0, 2048), (1, 0, 1024), (2, 0, 512), (3, 0, 256),
                                               (1, 1, 16384), (2, 1, 8192), (3, 1, 4096)])
def test_buffer_sizes(dev, bsize, bsex, size) -> None:
    rctl = (bsize << R.RCTL_BSIZE_SHIFT) | (int(R.Rctl.BSEX) if bsex else 0) | int(R.Rctl.LPE)
    ring = RxRing(dev, n=32, buf_base=0x20000, bufsize=size if size <= 2048 else 0).setup(rctl=rctl)
    frame = make_frame(size=3000)
    dev.receive(frame)
    need = -(-3000 // size)
    descs = [ring.desc(k) for k in range(need)]
    assert [d[1] for d in descs] == [min(size, 3000 - k * size) for k in range(need)]
    assert [d[3] for d in descs] == [DD] * (need - 1) + [DD | EOP | IXSM]
    assert dev.read32(R.RDH) == need
    if size <= 2048:
        assert b"".join(ring.data(k) for k in range(need)) == frame


def test_frame_spanning_descriptors_wraps_around_the_ring(dev) -> None:
    ring = RxRing(dev, n=8, bufsize=256).setup(rctl=3 << R.RCTL_BSIZE_SHIFT)
    dev.receive(make_frame(size=1500))  # 6 buffers of 256 bytes
    assert dev.read32(R.RDH) == 6
    ring.give(6)  # tail 7 -> 5
    frame = make_frame(size=700)  # 3 buffers: 6, 7, 0
    dev.receive(frame)
    assert dev.read32(R.RDH) == 1
    assert ring.data(6) + ring.data(7) + ring.data(0) == frame
    assert ring.desc(0)[3] == DD | EOP | IXSM and ring.desc(7)[3] == DD


def test_receiver_disabled_drops_silently(dev) -> None:
    ring = RxRing(dev).setup()
    dev.write32(R.RCTL, int(R.Rctl.BAM))
    dev.receive(make_frame())
    assert ring.desc(0)[3] == 0 and dev.read32(R.TPR) == 0
    assert dev.engine.rx_dropped == 1


def test_size_checks(dev) -> None:
    ring = RxRing(dev).setup()
    dev.receive(make_frame(size=63))
    dev.receive(make_frame(size=10))
    assert dev.read32(R.RUC) == 2
    dev.receive(make_frame(size=1523))
    assert dev.read32(R.ROC) == 1
    dev.receive(make_frame(size=1522))  # the largest without LPE
    assert dev.read32(R.RDH) == 1 and ring.desc(0)[1] == 1522
    assert dev.read32(R.TPR) == 4  # every frame the MAC saw
    dev.write32(R.RCTL, int(R.Rctl.EN | R.Rctl.LPE | R.Rctl.BSEX) | (1 << R.RCTL_BSIZE_SHIFT))
    dev.receive(make_frame(size=16384))
    assert dev.read32(R.RDH) == 2
    dev.receive(make_frame(size=16385))
    assert dev.read32(R.ROC) == 1 and dev.read32(R.RDH) == 2


def test_bad_fcs_is_counted_and_dropped(dev) -> None:
    ring = RxRing(dev).setup()
    frame = bytearray(make_frame(size=64))
    frame[20] ^= 1
    dev.receive(bytes(frame))
    assert dev.read32(R.CRCERRS) == 1 and dev.read32(R.RDH) == 0 and dev.read32(R.GPRC) == 0


def test_sbp_stores_bad_frames_with_ce(dev) -> None:
    ring = RxRing(dev).setup(rctl=int(R.Rctl.SBP))
    frame = bytearray(make_frame(size=64))
    frame[-1] ^= 0xFF
    dev.receive(bytes(frame))
    assert dev.read32(R.CRCERRS) == 1 and dev.read32(R.RDH) == 1
    _, length, _, status, errors, _ = ring.desc(0)
    assert (length, status, errors) == (64, DD | EOP | IXSM, CE)
    assert ring.data(0) == bytes(frame)
    assert dev.read32(R.GPRC) == 0  # not a good packet


def test_no_descriptor_frame_waits_in_the_packet_buffer(dev) -> None:
    ring = RxRing(dev).setup(give=0)  # RDH == RDT: the device has no buffers
    frames = [make_frame(size=64 + i) for i in range(3)]
    for f in frames:
        dev.receive(f)
    assert dev.read32(R.RNBC) == 3 and dev.read32(R.RDH) == 0
    assert dev.read32(R.GPRC) == 3  # received into the packet buffer
    ring.give(2)
    assert dev.read32(R.RDH) == 2
    assert [ring.data(0), ring.data(1)] == frames[:2]
    ring.give(5)
    assert ring.data(2) == frames[2]
    assert dev.read32(R.ICR) & R.Icr.RXT0


def test_full_packet_buffer_drops_with_mpc_and_rxo(dev) -> None:
    RxRing(dev).setup(give=0)
    dev.write32(R.PBA, (16 << 16) | 1)  # 1 KB RX packet buffer: twelve 64-byte frames (80 bytes each)
    dev.write32(R.IMS, int(R.Icr.RXO))
    for i in range(12):
        dev.receive(make_frame(size=64))
    assert dev.read32(R.MPC) == 0 and not dev.irq
    dev.receive(make_frame(size=64))
    assert dev.read32(R.MPC) == 1 and dev.read32(R.RNBC) == 12
    assert dev.irq and dev.read32(R.ICR) & R.Icr.RXO
    assert dev.read32(R.GPRC) == 12


def test_frames_wait_while_bus_mastering_is_off(make_nic) -> None:
    for engine in ("python", "cython"):
        nic = make_nic(engine=engine, bus_master=False)
        ring = RxRing(nic).setup()
        frame = make_frame()
        nic.receive(frame)
        assert nic.read32(R.RDH) == 0 and nic.read32(R.RNBC) == 0
        enable_bus_master(nic)  # the Nic drains when bus mastering comes on
        nic.write32(R.RDT, ring.tail)
        assert ring.data(0) == frame


@pytest.mark.parametrize("rdmts, threshold", [(0, 8), (1, 4), (2, 2), (3, 1)])  # 3: reserved, 1/16
def test_rxdmt0_when_free_descriptors_reach_the_threshold(dev, rdmts, threshold) -> None:
    ring = RxRing(dev, n=16).setup(rctl=rdmts << R.RCTL_RDMTS_SHIFT)  # 15 free
    raised_at = None
    for k in range(15):
        dev.receive(make_frame())
        if dev.read32(R.ICR) & R.Icr.RXDMT0 and raised_at is None:
            raised_at = 15 - (k + 1)
    assert raised_at == threshold


def test_statistics(dev) -> None:
    RxRing(dev).setup(rctl=int(R.Rctl.MPE))
    sizes = [64, 65, 127, 128, 300, 600, 1500]
    for s in sizes:
        dev.receive(make_frame(size=s))
    dev.receive(make_frame(dst=BROADCAST, size=64))
    dev.receive(make_frame(dst=bytes.fromhex("01005e000001"), size=64))
    dev.receive(make_frame(dst=bytes.fromhex("020000000002"), size=64))  # filtered out
    assert dev.read32(R.GPRC) == 9 and dev.read32(R.TPR) == 10
    good = sum(sizes) + 128
    assert dev.read32(R.GORCL) == good and dev.read32(R.GORCH) == 0
    assert dev.read32(R.TORL) == good + 64 and dev.read32(R.TORH) == 0
    assert [dev.read32(o) for o in (R.PRC64, R.PRC127, R.PRC255, R.PRC511, R.PRC1023, R.PRC1522)] == [3, 2, 1, 1, 1, 1]
    assert dev.read32(R.BPRC) == 1 and dev.read32(R.MPRC) == 1
    assert dev.read32(R.GPRC) == 0


def test_counters_saturate_and_carry(dev) -> None:
    RxRing(dev).setup()
    dev.regs[R.GPRC >> 2] = 0xFFFFFFFE
    dev.regs[R.GORCL >> 2] = 0xFFFFFFC0
    dev.regs[R.TORL >> 2] = dev.regs[R.TORH >> 2] = 0xFFFFFFFF
    for _ in range(3):
        dev.receive(make_frame(size=64))
    assert dev.regs[R.GPRC >> 2] == 0xFFFFFFFF
    assert (dev.regs[R.GORCH >> 2], dev.regs[R.GORCL >> 2]) == (1, 0x80)
    assert dev.regs[R.TORL >> 2] == dev.regs[R.TORH >> 2] == 0xFFFFFFFF


# --- checksum offload ---------------------------------------------------------------------

def ipv4(proto: int, l4: bytes, bad_ip: bool = False) -> bytes:
    src, dst = bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2])
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, proto, 0, src, dst))
    ip[10:12] = struct.pack("!H", ones_sum(bytes(ip)) ^ 0xFFFF ^ (1 if bad_ip else 0))
    return bytes(ip) + l4


def l4_segment(proto: int, payload: bytes, bad: bool = False, zero: bool = False) -> bytes:
    src, dst = bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2])
    if proto == 6:
        seg = bytearray(struct.pack("!HHIIBBHHH", 1, 2, 3, 4, 0x50, 0x10, 100, 0, 0)) + payload
        off = 16
    else:
        seg = bytearray(struct.pack("!HHHH", 1, 2, 8 + len(payload), 0)) + payload
        off = 6
    if not zero:
        c = ones_sum(src + dst + struct.pack("!BBH", 0, proto, len(seg)) + bytes(seg)) ^ 0xFFFF
        seg[off : off + 2] = struct.pack("!H", (c or 0xFFFF) ^ (1 if bad else 0))
    return bytes(seg)


def eth(payload: bytes, ethertype: int = 0x0800) -> bytes:
    body = MAC_BYTES + bytes.fromhex("020000000001") + struct.pack("!H", ethertype) + payload
    return with_fcs(body + bytes(max(0, 60 - len(body))))


@pytest.mark.parametrize("frame, rxcsum, status, errors", [
    (eth(ipv4(6, l4_segment(6, b"x" * 30))), 0x300, IPCS | TCPCS, 0),
    (eth(ipv4(6, l4_segment(6, b"x" * 30), bad_ip=True)), 0x300, IPCS | TCPCS, IPE),
    (eth(ipv4(6, l4_segment(6, b"x" * 30, bad=True))), 0x300, IPCS | TCPCS, TCPE),
    (eth(ipv4(17, l4_segment(17, b"y" * 31))), 0x300, IPCS | TCPCS, 0),
    (eth(ipv4(17, l4_segment(17, b"y" * 31, bad=True))), 0x300, IPCS | TCPCS, TCPE),
    (eth(ipv4(17, l4_segment(17, b"y" * 31, zero=True))), 0x300, IPCS, 0),  # UDP without checksum
    (eth(ipv4(6, l4_segment(6, b"x" * 30))), 0x100, IPCS, 0),  # IPOFL only
    (eth(ipv4(6, l4_segment(6, b"x" * 30, bad=True))), 0x200, TCPCS, TCPE),  # TUOFL only
    (eth(ipv4(6, l4_segment(6, b"x" * 30))), 0, IXSM, 0),  # offload off
    (eth(b"\x60" + bytes(60), 0x86DD), 0x300, IXSM, 0),  # not IPv4
    (eth(ipv4(1, bytes(20))), 0x200, IXSM, 0),  # ICMP: nothing checked
])
def test_rx_checksum_offload(dev, frame, rxcsum, status, errors) -> None:
    ring = RxRing(dev).setup()
    dev.write32(R.RXCSUM, rxcsum)
    dev.receive(frame)
    _, length, csum, st, er, _ = ring.desc(0)
    assert (st, er) == (DD | EOP | status, errors)
    if rxcsum:  # the packet checksum: ones'-complement sum from PCSS (0) over the frame
        assert csum == ones_sum(frame[:-4])
    else:
        assert csum == 0


class RecordingView:
    """A memoryview stand-in that logs every write as (bus address, length), in order."""

    def __init__(self, view: memoryview, addr: int, log: list[tuple[int, int]]) -> None:
        self.view, self.addr, self.log = view, addr, log

    def __len__(self) -> int:
        return len(self.view)

    def __bytes__(self) -> bytes:
        return bytes(self.view)

    def __getitem__(self, key):
        return self.view[key]

    def __setitem__(self, key, value) -> None:
        if isinstance(key, slice):
            start, stop, _ = key.indices(len(self.view))
            self.log.append((self.addr + start, stop - start))
        else:
            self.log.append((self.addr + key, 1))
        self.view[key] = value


@pytest.mark.parametrize("size, bufsize, rctl", [(64, 2048, 0), (600, 256, 3 << R.RCTL_BSIZE_SHIFT)])
def test_descriptor_fields_are_written_before_the_status_byte(make_nic, size, bufsize, rctl) -> None:
    """The ordering rule, observed on every memory write of the reference engine (the Cython
    engine writes the same fields in the same order, the status byte with a release store:
    test_datapath_agree.py checks its source). For each descriptor: the buffer, then length,
    checksum, errors and special, then the status byte (DD) last."""
    nic = make_nic(engine="python")
    ring = RxRing(nic, bufsize=bufsize).setup(rctl=rctl)
    writes: list[tuple[int, int]] = []
    engine: RefDatapath = nic.engine
    orig = engine._view

    def spy(addr: int, n: int, write: bool):
        v = orig(addr, n, write)
        return RecordingView(v, addr, writes) if v is not None and write else v

    engine._view = spy
    frame = make_frame(size=size)
    nic.receive(frame)
    need = -(-size // bufsize)
    assert dev_rdh(nic) == need
    per_desc = len(writes) // need
    for k in range(need):
        mine = writes[k * per_desc : (k + 1) * per_desc]
        desc = ring.base + 16 * k
        assert mine[0] == (ring.buf_base + k * bufsize, min(bufsize, size - k * bufsize))  # data first
        assert mine[-1] == (desc + 12, 1)  # the status byte last
        touched = {a + i for a, n in mine[1:-1] for i in range(n)}
        assert touched == set(range(desc + 8, desc + 16)) - {desc + 12}
    assert b"".join(ring.data(k) for k in range(need)) == frame


def dev_rdh(nic) -> int:
    return nic.peek32(R.RDH)
