"""`nicemu demo` captures the emulated cable by default: ./nicemu-demo.pcap, bounded (snap length,
frame cap, the frames not written counted and said), --pcap FILE / --no-pcap. The file is
parsed here (global header, records, Ethernet/IPv4/UDP of the demo's echoes, the FCS of every
whole frame) and, when tshark is installed, read by tshark as well."""
from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
IP_A, IP_B = bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2])
SMALL = ["--rounds", "100", "--pings", "20", "--repeat", "1"]


def _demo(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "lab", "demo", *SMALL, *args], cwd=cwd, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _parse(path: Path) -> tuple[tuple, list[tuple[int, int, int, int, bytes]]]:
    """The global header fields and (ts_sec, ts_usec, incl_len, orig_len, data) per record,
    checked as pcap-savefile(5) describes them: nothing here trusts nicemu's reader."""
    data = path.read_bytes()
    assert len(data) >= 24, "shorter than a pcap global header"
    header = struct.unpack_from("<IHHiIII", data)
    records = []
    off = 24
    while off < len(data):
        assert off + 16 <= len(data), f"truncated record header at {off}"
        sec, usec, incl, orig = struct.unpack_from("<IIII", data, off)
        off += 16
        assert off + incl <= len(data), f"truncated record at {off}"
        records.append((sec, usec, incl, orig, data[off:off + incl]))
        off += incl
    return header, records


def _udp(frame: bytes) -> tuple[bytes, bytes, int, int, bytes] | None:
    """(src ip, dst ip, src port, dst port, payload) of an Ethernet/IPv4/UDP frame, else None."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
        return None
    ihl = (frame[14] & 0x0F) * 4
    u = 14 + ihl
    sport, dport, ulen = struct.unpack_from("!HHH", frame, u)
    return frame[26:30], frame[30:34], sport, dport, frame[u + 8:u + ulen]


def _echoed(out: str) -> int:
    """The echoes the demo counted on its emulated paths (the linux path has no cable)."""
    return sum(int(n.replace(",", "")) for path, n in
               re.findall(r"^\[(kstack irq|kstack napi|bypass pmd)\] run \d+/\d+ \S+: ([\d,]+) echoed", out, re.M))


def test_demo_writes_a_pcap_of_the_cable_by_default(tmp_path: Path) -> None:
    p = _demo(tmp_path, "--paths", "kstack napi,bypass pmd,linux")
    pcap = tmp_path / "nicemu-demo.pcap"
    assert pcap.is_file(), p.stdout[-2000:]
    out = " ".join(p.stdout.split())
    assert f"captured to {pcap}" in out and "--no-pcap" in out  # said before the figures
    header, records = _parse(pcap)
    magic, major, minor, _zone, _sigfigs, snaplen, network = header
    assert (magic, major, minor) == (0xA1B2C3D4, 2, 4)
    assert snaplen == 256
    assert network & 0xFFFF == 1 and network == 0x24000001  # Ethernet, 4-byte FCS in every frame
    m = re.search(r"\[pcap\] ([\d,]+) frames of the cable written to (\S+?)[.;] ", out)
    assert m, out[-1500:]
    assert int(m.group(1).replace(",", "")) == len(records) and m.group(2) == str(pcap)
    assert f"tshark -r {pcap}" in p.stdout

    requests = replies = cut = 0
    last = (0, 0)
    for sec, usec, incl, orig, frame in records:
        assert incl == len(frame) == min(orig, snaplen) and 64 <= orig <= 1518
        assert (sec, usec) >= last, "records out of time order"
        last = (sec, usec)
        if incl < orig:
            cut += 1
            continue
        assert zlib.crc32(frame[:-4]) == int.from_bytes(frame[-4:], "little"), "bad FCS"
        u = _udp(frame[:-4])
        if u is None:
            continue
        src, dst, sport, dport, payload = u
        if (src, dst, dport) == (IP_A, IP_B, 7) and len(payload) == 18:
            requests += 1
        elif (src, dst, sport) == (IP_B, IP_A, 7) and len(payload) == 18:
            replies += 1
    echoed = _echoed(p.stdout)
    assert echoed > 0
    # every echo measured on the two emulated paths crossed this cable twice (warm-ups besides)
    assert replies >= echoed and requests >= replies, (requests, replies, echoed)
    assert cut > 0  # the TCP transfer's full-size segments are cut to the snap length
    assert "cut to 256 bytes" in out

    tshark = shutil.which("tshark")
    if tshark is None:
        pytest.skip("tshark is not installed: the file was checked by the parser above only")
    t = subprocess.run([tshark, "-r", str(pcap), "-o", "eth.check_fcs:TRUE", "-T", "fields", "-E", "separator=,",
                        "-e", "eth.fcs.status", "-e", "ip.src", "-e", "udp.srcport", "-e", "udp.dstport",
                        "-e", "udp.length"],
                       capture_output=True, text=True, timeout=120)
    assert t.returncode == 0, t.stderr
    rows = [r.split(",") for r in t.stdout.splitlines()]
    assert len(rows) == len(records)
    assert all(r[0] in ("1", "") for r in rows) and sum(r[0] == "1" for r in rows) == len(records) - cut
    assert sum(r[1] == "198.18.0.2" and r[2] == "7" and r[4] == "26" for r in rows) == replies


def test_pcap_is_bounded_and_says_what_it_left_out(tmp_path: Path) -> None:
    where = tmp_path / "cap.pcap"
    p = _demo(tmp_path, "--paths", "bypass pmd", "--pcap", "cap.pcap", "--pcap-frames", "50")
    _header, records = _parse(where)
    assert len(records) == 50
    out = " ".join(p.stdout.split())
    m = re.search(r"50 frames of the cable written to (\S+?); ([\d,]+) later frames not written \(the limit is 50", out)
    assert m and m.group(1) == str(where), out[-1500:]
    assert int(m.group(2).replace(",", "")) >= 2 * _echoed(p.stdout) - 50
    assert not (tmp_path / "nicemu-demo.pcap").exists()


def test_no_pcap_writes_nothing_and_linux_alone_has_no_cable(tmp_path: Path) -> None:
    p = _demo(tmp_path, "--paths", "bypass pmd", "--no-pcap")
    assert "[pcap]" not in p.stdout and "captured to" not in p.stdout
    p = _demo(tmp_path, "--paths", "linux")  # no emulator: no cable to capture, no file
    assert "[pcap]" not in p.stdout
    assert list(tmp_path.iterdir()) == []


def test_a_pcap_that_cannot_be_written_is_a_usage_error(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "lab", "demo", "--pcap", str(tmp_path / "no" / "x.pcap")],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "does not exist" in p.stderr and "--no-pcap" in p.stderr
    assert list(tmp_path.iterdir()) == []
