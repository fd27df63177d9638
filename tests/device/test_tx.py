"""Transmit, through the device's registers as a driver sees it (both engines).

SDM 3.3 (legacy descriptors, packet = descriptors up to EOP, IFCS, IC/CSO/CSS, RS -> DD),
13.4.33 (TCTL.EN, PSP), 3.4 (TXDW, TXQE), 13.7 (statistics), the TX packet buffer (PBA).
"""
from __future__ import annotations

import struct
import zlib

import pytest
from conftest import BROADCAST, MAC_BYTES, PEER_MAC, TxRing, RxRing, enable_bus_master, make_frame

from nicemu import regs as R
from nicemu.datapath_ref import ones_sum

EOP, IFCS, IC, RS, DEXT, IDE = (int(R.TxdCmd.EOP), int(R.TxdCmd.IFCS), int(R.TxdCmd.IC),
                                int(R.TxdCmd.RS), int(R.TxdCmd.DEXT), int(R.TxdCmd.IDE))
DST = bytes.fromhex("525400654321")


@pytest.fixture(params=["python", "cython"])
def dev(request, make_nic):
    return make_nic(engine=request.param)


def body(size: int, dst: bytes = DST) -> bytes:
    """A frame of `size` bytes without FCS (the device appends it)."""
    return make_frame(dst=dst, size=size, fcs=False)


def put_desc(nic, ring: TxRing, k: int, addr: int, data: bytes, cmd: int, cso: int = 0, css: int = 0) -> None:
    nic.mem.write(addr, data)
    nic.mem.write(ring.base + 16 * k, R.TX_DESC.pack(addr, len(data), cso, cmd, 0, css, 0))


def test_single_frame_gets_its_fcs_and_dd(dev) -> None:
    ring = TxRing(dev).setup()
    frame = body(60)
    ring.send([frame])
    assert dev.transmitted() == [frame + struct.pack("<I", zlib.crc32(frame))]
    assert dev.read32(R.TDH) == 1
    assert ring.sta(0) & R.TxdSta.DD
    icr = dev.read32(R.ICR)
    assert icr & R.Icr.TXDW and icr & R.Icr.TXQE


def test_without_ifcs_the_frame_goes_out_as_is(dev) -> None:
    ring = TxRing(dev).setup()
    frame = body(100)
    ring.send([frame], cmd=EOP | RS)
    assert dev.transmitted() == [frame]


def test_packet_spanning_descriptors(dev) -> None:
    ring = TxRing(dev).setup()
    frame = body(300)
    parts = [frame[:14], frame[14:100], b"", frame[100:]]
    for k, part in enumerate(parts):
        cmd = RS | (EOP | IFCS if k == len(parts) - 1 else 0)
        put_desc(dev, ring, k, ring.buf_base + k * 2048, part, cmd)
    dev.write32(R.TDT, len(parts))
    assert dev.transmitted() == [frame + struct.pack("<I", zlib.crc32(frame))]
    assert dev.read32(R.TDH) == len(parts)
    assert all(ring.sta(k) & R.TxdSta.DD for k in range(len(parts)))


def test_incomplete_packet_waits_for_its_eop(dev) -> None:
    ring = TxRing(dev).setup()
    frame = body(200)
    put_desc(dev, ring, 0, ring.buf_base, frame[:50], RS)
    dev.write32(R.TDT, 1)
    assert dev.transmitted() == []
    assert dev.read32(R.TDH) == 0  # not fetched until the packet is complete
    put_desc(dev, ring, 1, ring.buf_base + 2048, frame[50:], RS | EOP | IFCS)
    dev.write32(R.TDT, 2)
    assert dev.transmitted() == [frame + struct.pack("<I", zlib.crc32(frame))]


def test_psp_pads_short_frames_to_64_with_fcs(dev) -> None:
    ring = TxRing(dev).setup()  # TCTL.PSP
    short = body(20)
    ring.send([short])
    (out,) = dev.transmitted()
    padded = short + bytes(40)
    assert out == padded + struct.pack("<I", zlib.crc32(padded))
    assert len(out) == 64


def test_without_psp_short_frames_stay_short(dev) -> None:
    ring = TxRing(dev).setup()
    dev.write32(R.TCTL, int(R.Tctl.EN))
    short = body(20)
    ring.send([short])
    assert dev.transmitted() == [short + struct.pack("<I", zlib.crc32(short))]


def udp_packet(payload: bytes) -> tuple[bytes, int, int]:
    """An Ethernet/IPv4/UDP frame whose UDP checksum field holds the pseudo-header sum,
    as a driver prepares it for IC; returns (frame, css, cso)."""
    src, dst = bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2])
    udp_len = 8 + len(payload)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 1, 0, 64, 17, 0, src, dst))
    ip[10:12] = struct.pack("!H", ones_sum(bytes(ip)) ^ 0xFFFF)
    pseudo = ones_sum(src + dst + struct.pack("!BBH", 0, 17, udp_len))
    udp = struct.pack("!HHHH", 1000, 2000, udp_len, pseudo) + payload
    frame = DST + bytes.fromhex("525400123456") + b"\x08\x00" + bytes(ip) + udp
    return frame, 34, 40


def test_ic_inserts_the_checksum_at_cso(dev) -> None:
    ring = TxRing(dev).setup()
    frame, css, cso = udp_packet(bytes(range(50)))
    put_desc(dev, ring, 0, ring.buf_base, frame, EOP | IFCS | IC | RS, cso=cso, css=css)
    dev.write32(R.TDT, 1)
    (out,) = dev.transmitted()
    out = out[:-4]
    # the UDP checksum now verifies over pseudo-header + segment
    src, dst = out[26:30], out[30:34]
    seg = out[34:]
    assert ones_sum(src + dst + struct.pack("!BBH", 0, 17, len(seg)) + seg) == 0xFFFF
    assert out[:40] == frame[:40] and out[42:] == frame[42:]


def test_ic_outside_the_packet_is_ignored(dev) -> None:
    ring = TxRing(dev).setup()
    frame = body(60)
    put_desc(dev, ring, 0, ring.buf_base, frame, EOP | IC | RS, cso=59, css=10)  # CSO+2 > length
    put_desc(dev, ring, 1, ring.buf_base + 2048, frame, EOP | IC | RS, cso=20, css=60)  # CSS at end
    dev.write32(R.TDT, 2)
    assert dev.transmitted() == [frame, frame]


def test_rs_with_ide_delays_txdw(dev) -> None:
    ring = TxRing(dev).setup()
    dev.write32(R.TIDV, 1000)
    ring.send([body(60)], cmd=EOP | IFCS | RS | IDE)
    assert ring.sta(0) & R.TxdSta.DD
    assert not dev.read32(R.ICR) & R.Icr.TXDW  # TIDV runs instead (the Nic's timer)
    ring.send([body(60)], cmd=EOP | IFCS)  # no RS: no write-back, no TXDW
    assert not ring.sta(1) & R.TxdSta.DD
    assert dev.read32(R.ICR) == int(R.Icr.TXQE)


def test_engine_event_words(dev) -> None:
    """The engine reports TXDW for RS, EV_TX_IDE for RS|IDE, TXQE when the ring empties."""
    ring = TxRing(dev).setup()
    dev.mem.write(ring.buf_base, body(60))
    dev.mem.write(ring.base, R.TX_DESC.pack(ring.buf_base, 60, 0, EOP | RS | IDE, 0, 0, 0))
    dev.regs[R.TDT >> 2] = 1
    assert dev.engine.transmit() == R.EV_TX_IDE | int(R.Icr.TXQE)
    dev.mem.write(ring.base + 16, R.TX_DESC.pack(ring.buf_base, 60, 0, EOP | RS, 0, 0, 0))
    dev.regs[R.TDT >> 2] = 2
    assert dev.engine.transmit() == int(R.Icr.TXDW | R.Icr.TXQE)
    assert dev.engine.transmit() == 0  # nothing to do: no event


def test_tctl_en_clear_sends_nothing_until_enabled(dev) -> None:
    ring = TxRing(dev).setup()
    dev.write32(R.TCTL, int(R.Tctl.PSP))
    ring.send([body(60)])
    assert dev.transmitted() == [] and dev.read32(R.TDH) == 0
    dev.write32(R.TCTL, int(R.Tctl.EN | R.Tctl.PSP))
    assert len(dev.transmitted()) == 1 and dev.read32(R.TDH) == 1


def test_no_dma_without_bus_mastering(make_nic) -> None:
    for engine in ("python", "cython"):
        nic = make_nic(engine=engine, bus_master=False)
        ring = TxRing(nic).setup()
        ring.send([body(60)])
        assert nic.transmitted() == [] and nic.read32(R.TDH) == 0
        enable_bus_master(nic)
        nic.write32(R.TDT, 1)
        assert len(nic.transmitted()) == 1


def test_dext_descriptors_are_skipped_and_counted(dev) -> None:
    ring = TxRing(dev).setup()
    frame = body(80)
    dev.mem.write(ring.base, R.TX_DESC.pack(0, 0, 0, DEXT | RS, 0, 0, 0))  # a context descriptor
    put_desc(dev, ring, 1, ring.buf_base, frame, EOP | IFCS | RS)
    dev.write32(R.TDT, 2)
    assert dev.transmitted() == [frame + struct.pack("<I", zlib.crc32(frame))]
    assert ring.sta(0) & R.TxdSta.DD and ring.sta(1) & R.TxdSta.DD
    assert dev.engine.tx_dext_skipped == 1
    assert dev.read32(R.TDH) == 2


def test_statistics(dev) -> None:
    ring = TxRing(dev).setup()
    frames = [body(60), body(100), body(1514), body(60, dst=BROADCAST), body(60, dst=bytes.fromhex("01005e000001"))]
    ring.send(frames)
    sent = dev.transmitted()
    assert [len(f) for f in sent] == [64, 104, 1518, 64, 64]
    assert dev.read32(R.GPTC) == 5 and dev.read32(R.TPT) == 5
    octets = sum(len(f) for f in sent)
    assert dev.read32(R.GOTCL) == octets and dev.read32(R.GOTCH) == 0
    assert dev.read32(R.TOTL) == octets
    assert dev.read32(R.PTC64) == 3 and dev.read32(R.PTC127) == 1 and dev.read32(R.PTC1522) == 1
    assert dev.read32(R.BPTC) == 1 and dev.read32(R.MPTC) == 1
    assert dev.read32(R.GPTC) == 0  # clear on read


def test_counters_saturate(dev) -> None:
    ring = TxRing(dev).setup()
    dev.regs[R.GPTC >> 2] = 0xFFFFFFFF
    dev.regs[R.GOTCL >> 2] = 0xFFFFFFF0  # the 64-bit pair carries into the high dword
    ring.send([body(60)])
    assert dev.regs[R.GPTC >> 2] == 0xFFFFFFFF
    assert dev.regs[R.GOTCL >> 2] == 0x30 and dev.regs[R.GOTCH >> 2] == 1


class Cable:
    def __init__(self) -> None:
        self.ready = False
        self.frames: list[bytes] = []

    def __call__(self, frame: bytes) -> bool:
        if self.ready:
            self.frames.append(frame)
        return self.ready


def test_tx_packet_buffer_holds_frames_the_cable_refuses(dev) -> None:
    cable = Cable()
    dev.attach(cable)
    dev.write32(R.PBA, (1 << 16) | 48)  # 1 KB TX packet buffer: eleven 64-byte frames (80 bytes each)
    ring = TxRing(dev, n=32).setup()
    frames = [body(60, dst=bytes([2, 0, 0, 0, 0, i])) for i in range(20)]
    ring.send(frames)
    # the buffer took 12 frames (12 * 80 = 960 <= 1024), their descriptors are done
    assert dev.read32(R.TDH) == 12
    assert all(ring.sta(k) & R.TxdSta.DD for k in range(12)) and not ring.sta(12) & R.TxdSta.DD
    assert dev.read32(R.GPTC) == 0  # nothing on the wire yet
    cable.ready = True
    dev.tx_ready()
    assert dev.read32(R.TDH) == 20
    assert [f[:-4] for f in cable.frames] == frames  # in order, none lost
    assert dev.read32(R.GPTC) == 20


def test_tx_packet_buffer_is_emptied_by_reset(dev) -> None:
    cable = Cable()
    dev.attach(cable)
    ring = TxRing(dev).setup()
    ring.send([body(60)])
    dev.reset()
    enable_bus_master(dev)
    cable.ready = True
    dev.tx_ready()
    assert cable.frames == []


def test_connected_pair_delivers_into_the_peer_rx_ring(make_nic) -> None:
    for engine in ("python", "cython"):
        a = make_nic(engine=engine)
        b = make_nic(mac=PEER_MAC, engine=engine)
        a.connect(b)
        rx = RxRing(b).setup()
        b.write32(R.IMS, int(R.Icr.RXT0))
        tx = TxRing(a).setup()
        frames = [body(60), body(1514)]
        tx.send(frames)
        assert rx.data(0) == frames[0] + struct.pack("<I", zlib.crc32(frames[0]))
        assert rx.data(1)[:-4] == frames[1]
        assert b.read32(R.GPRC) == 2 and a.read32(R.GPTC) == 2
        assert b.irq  # the frames raised RXT0 in the receiving device
        assert a.transmitted() == []


def test_own_mac_is_not_special_on_tx(dev) -> None:
    ring = TxRing(dev).setup()
    ring.send([body(60, dst=MAC_BYTES)])
    assert len(dev.transmitted()) == 1


def test_a_sink_calling_back_into_the_device_is_harmless(dev) -> None:
    """A cable that rings the doorbell again from inside its send: the nested call does
    nothing, the walk in progress finishes normally."""
    got: list[bytes] = []

    def sink(frame: bytes) -> bool:
        got.append(frame)
        dev.tx_ready()
        dev.write32(R.TDT, dev.read32(R.TDT))
        return True

    dev.attach(sink)
    ring = TxRing(dev).setup()
    frames = [body(60 + i) for i in range(5)]
    ring.send(frames)
    assert [f[:-4] for f in got] == frames and dev.read32(R.TDH) == 5
    assert all(ring.sta(k) & R.TxdSta.DD for k in range(5))


# --- chains across doorbells, and the bound on one walk (docs/datapath.md "Transmit") ----------

def test_chain_completed_by_later_doorbells_is_fetched_once(dev) -> None:
    ring = TxRing(dev).setup()
    frame = body(300)
    parts = [frame[:100], frame[100:200], frame[200:]]
    fetched = []
    for k, part in enumerate(parts):
        put_desc(dev, ring, k, ring.buf_base + k * 2048, part, RS | (EOP | IFCS if k == 2 else 0))
        before = dev.engine.tx_descs_fetched
        dev.write32(R.TDT, k + 1)
        fetched.append(dev.engine.tx_descs_fetched - before)
        assert dev.read32(R.TDH) == (3 if k == 2 else 0)  # TDH stays at the packet until its EOP
    assert fetched == [1, 1, 1]  # each doorbell reads only the new descriptor
    assert dev.transmitted() == [frame + struct.pack("<I", zlib.crc32(frame))]
    assert all(ring.sta(k) & R.TxdSta.DD for k in range(3))


def test_a_fetched_descriptor_is_not_read_again(dev) -> None:
    """The device has its copy: a driver that rewrites a descriptor after handing it over
    (a bug) cannot change the packet, as on hardware with its descriptor cache."""
    ring = TxRing(dev).setup()
    frame = body(200)
    put_desc(dev, ring, 0, ring.buf_base, frame[:80], RS)
    dev.write32(R.TDT, 1)
    dev.mem.write(ring.base, R.TX_DESC.pack(ring.buf_base, 10, 0, RS, 0, 0, 0))  # too late
    put_desc(dev, ring, 1, ring.buf_base + 2048, frame[80:], RS | EOP | IFCS)
    dev.write32(R.TDT, 2)
    assert dev.transmitted() == [frame + struct.pack("<I", zlib.crc32(frame))]


def test_one_walk_fetches_at_most_the_budget_and_the_nic_continues(make_nic, clock) -> None:
    from nicemu.datapath_ref import TX_BUDGET

    for engine in ("python", "cython"):
        dev = make_nic(engine=engine)
        n = 2 * TX_BUDGET
        ring = TxRing(dev, n=n).setup()
        frame = body(60)
        dev.mem.write(ring.buf_base, frame)
        dev.mem.write(ring.base, R.TX_DESC.pack(ring.buf_base, 60, 0, EOP | IFCS, 0, 0, 0) * n)
        dev.write32(R.TDT, n - 1)
        assert dev.read32(R.TDH) == TX_BUDGET and dev.engine.tx_descs_fetched == TX_BUDGET
        assert len(dev.transmitted()) == TX_BUDGET
        assert dev.next_deadline() == clock()  # the rest is due at once, after other work
        dev.write32(R.TDT, n - 1)  # a doorbell meanwhile: the pending walk will get there
        assert dev.engine.tx_descs_fetched == TX_BUDGET
        dev.run_timers()
        assert dev.read32(R.TDH) == n - 1 and len(dev.transmitted()) == n - 1 - TX_BUDGET
        assert dev.next_deadline() is None and dev.read32(R.ICR) & R.Icr.TXQE
        # a reset forgets a pending walk
        dev.write32(R.TDT, (n - 1 + TX_BUDGET + 8) % n)
        assert dev.next_deadline() is not None and dev.read32(R.TDH) == TX_BUDGET - 1
        dev.reset()
        assert dev.next_deadline() is None


def test_tx_continuation_comes_after_ring_work_in_order(dev) -> None:
    """tx_ready() while a walk is pending flushes and walks on; nothing is sent twice."""
    from nicemu.datapath_ref import TX_BUDGET

    n = TX_BUDGET + 64
    ring = TxRing(dev, n=n).setup()
    frames = [body(60, dst=bytes([2, 0, 0, 0, k >> 8, k & 0xFF])) for k in range(n - 1)]
    for k, f in enumerate(frames):
        dev.mem.write(ring.buf_base + 64 * k, f)
    dev.mem.write(ring.base, b"".join(R.TX_DESC.pack(ring.buf_base + 64 * k, 60, 0, EOP | IFCS, 0, 0, 0)
                                      for k in range(n)))
    dev.write32(R.TDT, n - 1)
    dev.tx_ready()
    dev.run_timers()
    assert [f[:-4] for f in dev.transmitted()] == frames
    assert dev.read32(R.TDH) == n - 1 and dev.next_deadline() is None
