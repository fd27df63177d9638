"""pcap capture: the file format byte by byte, the capture wrapper (both directions), a capture
of two real devices, and tshark checking the FCS of good and corrupted frames."""
from __future__ import annotations

import io
import shutil
import struct
import subprocess

import pytest
from conftest import PEER_MAC, FakeClock, RxRing, TxRing, make_frame

from nicemu import regs as R
from nicemu.cable.pair import PairCable, pipe
from nicemu.cable.capture import CapturedEnd, PcapWriter, read_pcap

TSHARK = shutil.which("tshark")
TCPDUMP = shutil.which("tcpdump")


def test_global_and_record_headers(tmp_path) -> None:
    p = tmp_path / "x.pcap"
    f = make_frame(size=64)
    with PcapWriter(p, fcs_in_header=False) as w:
        w.write(f, ts_ns=1_700_000_000_123_456_789)
    data = p.read_bytes()
    assert data[:24] == struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    assert data[24:40] == struct.pack("<IIII", 1_700_000_000, 123_456, 64, 64)
    assert data[40:] == f


def test_fcs_length_in_link_type_word(tmp_path) -> None:
    p = tmp_path / "x.pcap"
    PcapWriter(p).close()
    network, recs = read_pcap(p)
    assert network == 0x24000001  # LINKTYPE_ETHERNET, FCS length present, 4 bytes
    assert network & 0xFFFF == 1 and recs == []


def test_snaplen_truncates_but_keeps_original_length(tmp_path) -> None:
    p = tmp_path / "x.pcap"
    f = make_frame(size=200)
    with PcapWriter(p, snaplen=100) as w:
        w.write(f, ts_ns=5)
    _, recs = read_pcap(p)
    assert recs[0].data == f[:100] and recs[0].orig_len == 200 and recs[0].ts_ns == 0


def test_reader_rejects_garbage(tmp_path) -> None:
    with pytest.raises(ValueError, match="bad magic"):
        read_pcap(b"\x00" * 24)
    with pytest.raises(ValueError, match="shorter"):
        read_pcap(b"\xd4\xc3\xb2\xa1")
    p = tmp_path / "t.pcap"
    with PcapWriter(p) as w:
        w.write(make_frame(), ts_ns=0)
    with pytest.raises(ValueError, match="truncated record data"):
        read_pcap(p.read_bytes()[:-3])


def test_bad_options() -> None:
    a, b = pipe()
    with pytest.raises(ValueError, match="directions"):
        CapturedEnd(a, PcapWriter(io.BytesIO()), directions="up")
    with pytest.raises(ValueError, match="snaplen"):
        PcapWriter(io.BytesIO(), snaplen=0)
    a.close()
    b.close()


def test_captured_end_records_both_directions_in_time_order(tmp_path) -> None:
    clock = FakeClock(10_000_000_000)
    a, b = pipe()
    w = PcapWriter(tmp_path / "a.pcap", clock=clock)
    ca = CapturedEnd(a, w)
    out1, in1, out2 = make_frame(payload=b"1"), make_frame(payload=b"2"), make_frame(payload=b"3")
    assert ca.send(out1)
    clock.advance(1000)
    b.send(in1)
    assert ca.recv_frames() == [in1]
    clock.advance(1000)
    ca.send(out2)
    ca.close()
    b.close()
    _, recs = read_pcap(tmp_path / "a.pcap")
    assert [r.data for r in recs] == [out1, in1, out2]
    assert [r.ts_ns for r in recs] == [10_000_000_000, 10_000_001_000, 10_000_002_000]


def test_captured_end_refused_frames_are_not_captured(tmp_path) -> None:
    a, b = pipe(limit=1)
    ca = CapturedEnd(a, tmp_path / "a.pcap", directions="tx")
    f = make_frame()
    assert ca.send(f)
    assert not ca.send(f)  # the cable is full: not on the wire, not in the capture
    b.send(make_frame(payload=b"in"))
    ca.recv_frames()  # rx not captured with directions="tx"
    ca.close()
    b.close()
    assert [r.data for r in read_pcap(tmp_path / "a.pcap")[1]] == [f]


@pytest.mark.parametrize("path", ["capture ring", "captured ends"])
def test_capture_of_two_real_devices(make_nic, clock, tmp_path, path: str) -> None:
    """Without faults the engines stay linked and record into the capture ring (one copy in
    C per frame, both files get the records); with faults the ends are Python CapturedEnds.
    The files are the same either way."""
    a = make_nic()
    b = make_nic(mac=PEER_MAC)
    faults = {"faults_ba": {"rate_bps": 10**12}} if path == "captured ends" else {}
    cable = PairCable(a, b, capture_a=tmp_path / "a.pcap", capture_b=tmp_path / "b.pcap", **faults)
    assert cable.fast == (path == "capture ring") and cable.needs_timers
    if cable.fast:
        assert a.engine.capture is not None and a.engine.capture is b.engine.capture
    txa = TxRing(a).setup()
    RxRing(a).setup()
    txb = TxRing(b).setup()
    rx = RxRing(b).setup()
    dst_b = bytes.fromhex(PEER_MAC.replace(":", ""))
    dst_a = bytes.fromhex("525400123456")
    txa.send([make_frame(dst=dst_b, payload=b"ping", fcs=False)[:60]])
    txb.send([make_frame(dst=dst_a, payload=b"pong", fcs=False)[:60]])
    if cable.fast:
        assert cable.stats() == {"kind": "pair", "captured": 0, "not_captured": 0}  # not drained yet
    else:
        clock.advance(1_000_000)  # the rate line releases pong
        cable.run_timers()
    cable.close()
    if path == "capture ring":
        assert a.engine.capture is None and cable.stats()["captured"] == 2
    assert b.read32(R.GPRC) == 1 and a.read32(R.GPRC) == 1
    _, ra = read_pcap(tmp_path / "a.pcap")
    _, rb = read_pcap(tmp_path / "b.pcap")
    assert len(ra) == len(rb) == 2
    # a's capture: what a sent, then what it received; b's the other way round; FCS included
    assert ra[0].data == rb[0].data and ra[1].data == rb[1].data
    assert b"ping" in ra[0].data and b"pong" in ra[1].data
    assert rx.data(0) == ra[0].data  # exactly what reached b's RX ring (FCS too: no SECRC)


def tshark_fcs(path, *extra: str) -> list[tuple[str, str]]:
    r = subprocess.run(
        [TSHARK, "-r", str(path), "-o", "eth.check_fcs:TRUE", *extra,
         "-T", "fields", "-e", "frame.number", "-e", "eth.fcs.status"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return [tuple(line.split("\t")) for line in r.stdout.splitlines() if line.strip()]


@pytest.mark.skipif(TSHARK is None, reason="tshark is not installed (apt-get install tshark; .ci/run installs it)")
@pytest.mark.parametrize("fcs_in_header", [True, False])
def test_tshark_checks_the_fcs(tmp_path, fcs_in_header: bool) -> None:
    good1 = make_frame(payload=b"good", size=64)
    good2 = make_frame(payload=b"also good", size=1518)
    bad = bytearray(make_frame(payload=b"bad", size=128))
    bad[20] ^= 0x10  # one bit flipped: the FCS no longer matches
    p = tmp_path / "fcs.pcap"
    with PcapWriter(p, fcs_in_header=fcs_in_header) as w:
        for f in (good1, bytes(bad), good2):
            w.write(f)
    extra = () if fcs_in_header else ("-o", "eth.fcs:Always")
    # eth.fcs.status: 1 = good, 0 = bad
    assert tshark_fcs(p, *extra) == [("1", "1"), ("2", "0"), ("3", "1")]


@pytest.mark.skipif(TSHARK is None, reason="tshark is not installed (apt-get install tshark; .ci/run installs it)")
def test_tshark_reads_a_capture_with_faults(make_nic, clock, tmp_path) -> None:
    """A port capture through the bit-flip injector: tshark finds exactly the corrupted frames
    bad, and they are the ones the receiving device counted in CRCERRS."""
    a = make_nic()
    b = make_nic(mac=PEER_MAC)
    cable = PairCable(a, b, capture_b=tmp_path / "b.pcap", faults_ab={"corrupt": 0.4, "seed": 7})
    tx = TxRing(a, n=32).setup()
    RxRing(b, n=32).setup()
    dst = bytes.fromhex(PEER_MAC.replace(":", ""))
    tx.send([make_frame(dst=dst, payload=bytes([i]) * 10, fcs=False)[:60] for i in range(20)])
    crcerrs = b.read32(R.CRCERRS)
    cable.close()
    status = [s for _, s in tshark_fcs(tmp_path / "b.pcap")]
    assert len(status) == 20
    assert status.count("0") == crcerrs > 0


def tcpdump_frames(path) -> tuple[str, list[bytes]]:
    """`tcpdump -r FILE -xx`: its "reading from file" line and each packet's bytes from the hex dump."""
    r = subprocess.run([TCPDUMP, "-r", str(path), "-nn", "-e", "-xx"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    packets: list[bytes] = []
    for line in r.stdout.splitlines():
        if not line.startswith("\t0x"):
            packets.append(b"")
            continue
        packets[-1] += bytes.fromhex("".join(line.split(":", 1)[1].split()))
    return r.stderr, packets


@pytest.mark.skipif(TCPDUMP is None, reason="tcpdump is not installed (apt-get install tcpdump)")
@pytest.mark.parametrize("fcs_in_header", [True, False])
def test_tcpdump_reads_a_capture(tmp_path, fcs_in_header: bool) -> None:
    """libpcap reads the file as Ethernet (the FCS-length bits of the link-type word are an
    extension it understands) and hands every frame over whole, FCS included."""
    frames = [make_frame(payload=b"one", size=64), make_frame(payload=b"two", size=1518),
              make_frame(payload=b"three", size=77)]
    p = tmp_path / "t.pcap"
    with PcapWriter(p, fcs_in_header=fcs_in_header) as w:
        for f in frames:
            w.write(f)
    header, packets = tcpdump_frames(p)
    assert "link-type EN10MB (Ethernet)" in header
    assert packets == frames
