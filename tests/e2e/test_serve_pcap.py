"""`nicemu serve --pair --pcap FILE`: the linked pair's capture ring, drained by the emulator's
loop into a classic pcap. Two PMDs (this process, over vfio-user) send frames both ways through
the engine-to-engine fast path (their IFCS frames cross with the FCS owed, written by the
drain); the file is parsed here (global header, records, every whole frame's FCS) and read by
tshark when it is installed; the closing JSON line counts what was written and what was not."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
MAC0, MAC1 = "52:54:00:00:02:00", "52:54:00:00:02:01"
M0, M1 = bytes.fromhex(MAC0.replace(":", "")), bytes.fromhex(MAC1.replace(":", ""))

pytest.importorskip("driver._pmd", reason="python setup.py build_ext --inplace")
pytest.importorskip("nicemu.cable._capring", reason="python setup.py build_ext --inplace")


def _frame(dst: bytes, src: bytes, i: int, size: int) -> bytes:
    body = dst + src + b"\x88\xb5" + i.to_bytes(4, "big")
    return body + bytes((i + k) & 0xFF for k in range(size - len(body)))


def _wait(cond, what: str, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_serve_pair_pcap_writes_the_cable(tmp_path: Path) -> None:
    from driver.pmd import Pmd
    from driver.vfio_user_client import VfioUserBus

    s0, s1 = str(tmp_path / "s" / "nic0.sock"), str(tmp_path / "s" / "nic1.sock")
    pcap = tmp_path / "cable.pcap"
    p = subprocess.Popen([sys.executable, "-m", "nicemu", "serve", "--socket", s0, "--mac", MAC0, "--socket", s1,
                          "--mac", MAC1, "--pair", "--pcap", str(pcap), "--snaplen", "200", "--pcap-frames", "250"],
                         env=ENV, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sent_ab = [_frame(M1, M0, i, 60 + (i * 37) % 1455) for i in range(200)]
    sent_ba = [_frame(M0, M1, i, 60) for i in range(100)]
    try:
        _wait(lambda: os.path.exists(s1) or p.poll() is not None, "the emulator's sockets")
        assert p.poll() is None, p.stderr.read()
        bus0, bus1 = VfioUserBus(s0, 8 << 20), VfioUserBus(s1, 8 << 20)
        try:
            a, b = Pmd(bus0, rx_count=256, tx_count=256), Pmd(bus1, rx_count=256, tx_count=256)
            for k in range(0, 200, 50):
                assert a.tx_burst([a.alloc().set_data(f) for f in sent_ab[k:k + 50]]) == 50
                got = 0
                end = time.monotonic() + 10
                while got < 50 and time.monotonic() < end:
                    for m in b.rx_burst(64):
                        got += 1
                        m.free()
                assert got == 50
            # the loop's timer drains the ring (100 ms after a frame waits), not only the close
            _wait(lambda: pcap.stat().st_size >= 24 + 200 * 16 + 60, "a timed drain")
            assert b.tx_burst([b.alloc().set_data(f) for f in sent_ba]) == 100
            a.bus.read32(0x8)  # a read flushes the posted doorbell
            a.close()
            b.close()
        finally:
            bus0.close()
            bus1.close()
    finally:
        p.terminate()
        out, err = p.communicate(timeout=20)
    assert p.returncode == 0, err[-2000:]
    rep = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert rep and rep[-1]["event"] == "pcap", out
    rep = rep[-1]
    assert rep["path"] == str(pcap) and rep["snaplen"] == 200 and rep["max_frames"] == 250
    assert rep["written"] == 250 and rep["not_written"] == 50 and rep["not_captured"] == 0

    data = pcap.read_bytes()
    magic, major, minor, _zone, _sig, snaplen, network = struct.unpack_from("<IHHiIII", data)
    assert (magic, major, minor, snaplen, network) == (0xA1B2C3D4, 2, 4, 200, 0x24000001)
    records, off, last = [], 24, (0, 0)
    while off < len(data):
        sec, usec, incl, orig = struct.unpack_from("<IIII", data, off)
        off += 16
        assert (sec, usec) >= last and usec < 1_000_000
        last = (sec, usec)
        records.append((incl, orig, data[off:off + incl]))
        off += incl
    assert off == len(data) and len(records) == 250
    assert abs(sec - time.time()) < 60  # wall-clock stamps
    expect = sent_ab + sent_ba  # the pair's frames in the order they crossed, FCS appended
    cut = 0
    for (incl, orig, frame), f in zip(records, expect):
        whole = f + zlib.crc32(f).to_bytes(4, "little")
        assert orig == len(whole) and incl == min(orig, 200) and frame == whole[:incl]
        if incl < orig:
            cut += 1
        else:
            assert zlib.crc32(frame[:-4]) == int.from_bytes(frame[-4:], "little")
    assert rep["truncated"] == cut > 0

    tshark = shutil.which("tshark")
    if tshark is None:
        pytest.skip("tshark is not installed: checked by the parser above only")
    t = subprocess.run([tshark, "-r", str(pcap), "-o", "eth.check_fcs:TRUE", "-T", "fields",
                        "-e", "frame.len", "-e", "eth.fcs.status"], capture_output=True, text=True, timeout=120)
    assert t.returncode == 0, t.stderr
    rows = [r.split("\t") for r in t.stdout.splitlines()]
    assert len(rows) == 250
    assert sum(r[1] == "1" for r in rows) == 250 - cut and not any(r[1] == "0" for r in rows)


@pytest.mark.parametrize("args, why", [
    (["--pcap", "x.pcap"], "--pcap captures the --pair cable"),
    (["--pair", "--pcap", "x.pcap", "--snaplen", "0"], "--snaplen must be positive"),
])
def test_serve_pcap_usage_errors(tmp_path: Path, args: list[str], why: str) -> None:
    socks = ["--socket", str(tmp_path / "s" / "a.sock"), "--socket", str(tmp_path / "s" / "b.sock")]
    p = subprocess.run([sys.executable, "-m", "nicemu", "serve", *socks, *args], env=ENV, cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and why in p.stderr
    assert list(tmp_path.iterdir()) == []


def test_config_pair_capture_rides_on_the_capture_ring(tmp_path: Path) -> None:
    """A topology's `pair` cable with a capture on each port and no faults keeps the engines
    linked (frames engine to engine in C) and records into the capture ring: both files get
    the same records, the stats line counts them, SIGTERM writes the rest."""
    import signal

    from driver.pmd import Pmd
    from driver.vfio_user_client import VfioUserBus

    cfg = tmp_path / "pair.yaml"
    cfg.write_text(f"runtime_dir: {tmp_path / 'run'}\n"
                   f"devices:\n  nic0: {{mac: \"{MAC0}\"}}\n  nic1: {{mac: \"{MAC1}\"}}\n"
                   "cables:\n  - kind: pair\n    ends: [nic0, nic1]\n"
                   "    capture: {nic0: nic0.pcap, nic1: nic1.pcap}\n")
    p = subprocess.Popen([sys.executable, "-m", "nicemu", "serve", "--config", str(cfg)], env=ENV, cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    s0, s1 = str(tmp_path / "run" / "nic0.sock"), str(tmp_path / "run" / "nic1.sock")
    sent = [_frame(M1, M0, i, 60 + (i * 53) % 1455) for i in range(120)]
    try:
        _wait(lambda: os.path.exists(s1) or p.poll() is not None, "the emulator's sockets")
        assert p.poll() is None, p.stderr.read()
        bus0, bus1 = VfioUserBus(s0, 8 << 20), VfioUserBus(s1, 8 << 20)
        try:
            a, b = Pmd(bus0, rx_count=256, tx_count=256), Pmd(bus1, rx_count=256, tx_count=256)
            got: list[bytes] = []
            for k in range(0, 120, 40):
                assert a.tx_burst([a.alloc().set_data(f) for f in sent[k:k + 40]]) == 40
                end = time.monotonic() + 10
                while len(got) < k + 40 and time.monotonic() < end:
                    for m in b.rx_burst(64):
                        got.append(bytes(m))
                        m.free()
            assert got == sent
            _wait(lambda: (tmp_path / "nic1.pcap").stat().st_size >= 24 + 120 * 16 + 120 * 60, "a timed drain")
            p.send_signal(signal.SIGUSR1)
            a.close()
            b.close()
        finally:
            bus0.close()
            bus1.close()
    finally:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=20)
    assert p.returncode == 0, err[-2000:]
    stats = [json.loads(ln.split(" ", 2)[2]) for ln in out.splitlines() if ln.startswith("nicemu: stats ")]
    assert stats, out
    cables = [d["cable"] for d in stats[-1]["devices"].values()]
    assert cables and all(c == {"kind": "pair", "captured": 120, "not_captured": 0} for c in cables), cables
    files = [(tmp_path / n).read_bytes() for n in ("nic0.pcap", "nic1.pcap")]
    assert files[0] == files[1]
    data, off, frames = files[0], 24, []
    assert struct.unpack_from("<I", data, 20)[0] == 0x24000001  # Ethernet, FCS present (4 bytes)
    while off < len(data):
        _s, _u, incl, orig = struct.unpack_from("<IIII", data, off)
        frames.append(data[off + 16:off + 16 + incl])
        off += 16 + incl
    assert frames == [f + zlib.crc32(f).to_bytes(4, "little") for f in sent]
