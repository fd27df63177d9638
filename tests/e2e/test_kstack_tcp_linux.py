"""kstack TCP with the real Linux kernel as its peer: the emulated device's port is a TAP inside
a network namespace the test creates (198.18.0.1/24 on the Linux side, 198.18.0.2/24 on
kstack's) and removes with everything else (the emulator, whose exit removes the TAP, the
kstack kernel, every application, the captures and the socket files).

- Linux connects to a kstack listener (kstack.apps.tcp_bulk sink; a plain Python socket sends
  from the namespace) while a kstack application (tcp_bulk send) connects to a Linux listener
  (a plain Python socket sink in the namespace): 20 MB each way at the same time, checked by
  SHA-256 (KSTACK_TCP_LINUX_BYTES sets another size for quick local runs).
- Both captures of that run read by tshark: kstack's own (--pcap, as tcpdump on eth0) shows
  Linux's and kstack's SYNs both carrying MSS, window scaling, SACK-permitted and timestamps,
  timestamps on every data segment both ways, windows scaled above 64 KiB; the wire capture
  (the cable's, after the device inserted the offloaded checksums) has no malformed segment
  and no bad checksum (tcp.check_checksum on).
- curl in the namespace fetches a file and a generated 3 MB body from kstack's http_server on
  one keep-alive connection; the bodies' SHA-256 match.
- A lossy cable (1% drop and 1% reordering both ways, 1% corruption towards kstack): 5 MB
  each way still byte-exact (KSTACK_TCP_LINUX_LOSSY_BYTES); SACK blocks seen in the capture
  from both sides, SACK recovery on both kernels (kstack's counters, Linux's
  /proc/net/netstat), and the corrupted frames counted as CRC errors by the device.

Every wait is bounded; nothing asserts a time.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from kstack.apps.http_common import generated_body
from kstack.apps.tcp_bulk import stream_sha256
from kstack_procs import APP_TIMEOUT, KernelLab, NetnsPeer, Proc, ip
from nicemu.cable.tap import tap_available
from test_kstack_e2e import find_key

REASON = tap_available() or (None if shutil.which("ip") else "the `ip` command is missing")
pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(REASON is not None, reason=f"needs root, /dev/net/tun and ip netns: {REASON}"),
]
needs_tshark = pytest.mark.skipif(not shutil.which("tshark"), reason="tshark is not installed (.ci/run installs it)")
needs_curl = pytest.mark.skipif(not shutil.which("curl"), reason="curl is not installed (.ci/run installs it)")

LINUX, KSTACK = "198.18.0.1", "198.18.0.2"
KSTACK_PORT, LINUX_PORT, HTTP_PORT = 5001, 5002, 8080
BULK_BYTES = int(os.environ.get("KSTACK_TCP_LINUX_BYTES", 20_000_000))  # each way
LOSSY_BYTES = int(os.environ.get("KSTACK_TCP_LINUX_LOSSY_BYTES", 5_000_000))
BULK_TIMEOUT = max(APP_TIMEOUT, BULK_BYTES / 100_000)  # 8 Mbit/s at the least: never a hang


# A bulk sender or sink over the Linux kernel's TCP (a plain Python socket, run in the
# namespace): the same seeded stream as kstack.apps.tcp_bulk, one JSON line at the end.
LINUX_BULK = textwrap.dedent(
    """
    import hashlib, json, socket, sys, time
    from kstack.apps.tcp_bulk import stream
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    h = hashlib.sha256()
    n = 0
    t0 = time.monotonic()
    if mode == "send":
        total, seed = int(sys.argv[4]), int(sys.argv[5])
        s = socket.create_connection((host, port), timeout=60)
        for b in stream(seed, total):
            s.sendall(b)
            h.update(b)
            n += len(b)
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):  # the sink's EOF: everything was taken
            pass
        s.close()
    else:
        L = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        L.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        L.bind((host, port))
        L.listen(1)
        L.settimeout(60)
        print("ready", flush=True)
        c, _ = L.accept()
        c.settimeout(60)
        while True:
            b = c.recv(262144)
            if not b:
                break
            h.update(b)
            n += len(b)
        c.close()
        L.close()
    dt = time.monotonic() - t0
    print(json.dumps({"mode": mode, "bytes": n, "sha256": h.hexdigest(), "seconds": dt}), flush=True)
    """
)


class TcpPeer(NetnsPeer):
    """A namespace with a TAP whose other side is the emulated device (faults and a wire
    capture on that cable if asked), and a kstack kernel on the device with its own capture."""

    def __init__(self, klab: KernelLab) -> None:
        super().__init__(klab)
        self.wire = klab.dir / "wire.pcap"  # the cable's: what the port sent and received

    def start(self, mode: str = "napi", faults: dict | None = None, wire: bool = False) -> None:
        extra: dict = {}
        if faults:
            extra["faults"] = faults
        if wire:
            extra["capture"] = {"k0": str(self.wire)}
        self.start_kernel(mode, LINUX, KSTACK, **extra)

    def start_in_ns(self, name: str, *cmd: str) -> Proc:
        """A process in the namespace, reaped with the lab's."""
        return self.klab.start(["ip", "netns", "exec", self.ns, *cmd], name)

    def netstat(self) -> dict[str, int]:
        """Linux's /proc/net/snmp and /proc/net/netstat in the namespace, as nstat names them."""
        return self.counters("/proc/net/snmp", "/proc/net/netstat")



@pytest.fixture
def peer(klab):
    lp = TcpPeer(klab)
    try:
        yield lp
    finally:
        lp.close()
        assert lp.ns not in ip("netns", "list").stdout
        assert lp.tap not in ip("-br", "link").stdout
        assert not klab.dir.exists()  # sockets, the topology, the captures


def finish(p: Proc, timeout: float) -> dict:
    """Wait for a process the lab started to exit 0; its last JSON line."""
    try:
        p.p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{p.name} still running after {timeout:.0f} s; saw {p.seen[-5:]}") from None
    p._t.join(timeout=5)
    while not p.lines.empty():
        p.seen.append(p.lines.get())
    assert p.p.returncode == 0, (p.seen[-5:], p.stderr_tail())
    return json.loads([ln for ln in p.seen if ln.startswith("{")][-1])


def bulk_with_linux(peer: TcpPeer, nbytes: int) -> dict:
    """Linux -> a kstack listener and kstack -> a Linux listener, nbytes each way at once."""
    sink_k = peer.klab.app_bg("kstack.apps.tcp_bulk", "sink", "--port", str(KSTACK_PORT), "-i", "0",
                              "--timeout", "60", "--kernel", peer.ksock, name="kstack-sink",
                              ready="tcp_bulk: listening")
    sink_l = peer.start_in_ns("linux-sink", sys.executable, "-c", LINUX_BULK, "sink", LINUX, str(LINUX_PORT))
    sink_l.line(lambda ln: ln == "ready")
    send_l = peer.start_in_ns("linux-send", sys.executable, "-c", LINUX_BULK, "send", KSTACK,
                              str(KSTACK_PORT), str(nbytes), "31")
    send_k = peer.klab.app_bg("kstack.apps.tcp_bulk", "send", LINUX, "--port", str(LINUX_PORT),
                              "--bytes", str(nbytes), "--seed", "32", "-i", "0", "--timeout", "60",
                              "--kernel", peer.ksock, name="kstack-send")
    out = {name: finish(p, BULK_TIMEOUT) for name, p in
           (("linux_send", send_l), ("kstack_send", send_k), ("kstack_sink", sink_k), ("linux_sink", sink_l))}
    to_kstack, to_linux = stream_sha256(31, nbytes), stream_sha256(32, nbytes)
    assert out["linux_send"]["bytes"] == out["kstack_sink"]["bytes"] == nbytes
    assert out["linux_send"]["sha256"] == out["kstack_sink"]["sha256"] == to_kstack
    assert out["kstack_send"]["bytes"] == out["linux_sink"]["bytes"] == nbytes
    assert out["kstack_send"]["sha256"] == out["linux_sink"]["sha256"] == to_linux
    assert out["kstack_sink"]["flows"][0]["peer"].startswith(LINUX + ":")
    return out


# --- reading captures -------------------------------------------------------------------------

FIELDS = ["ip.src", "tcp.srcport", "tcp.dstport", "tcp.flags.syn", "tcp.flags.ack", "tcp.len",
          "tcp.options.mss_val", "tcp.options.wscale.shift", "tcp.options.sack_perm",
          "tcp.options.timestamp.tsval", "tcp.options.sack_le", "tcp.window_size",
          "tcp.window_size_scalefactor"]


def tcp_segments(pcap) -> list[dict[str, str]]:
    """One dict per TCP segment of the capture: FIELDS (first occurrence; '' when absent)."""
    cmd = ["tshark", "-n", "-r", str(pcap), "-o", "tcp.analyze_sequence_numbers:FALSE",
           "-o", "tcp.desegment_tcp_streams:FALSE", "-Y", "tcp", "-T", "fields", "-E", "occurrence=f",
           "-E", "separator=\t"]
    for f in FIELDS:
        cmd += ["-e", f]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return [dict(zip(FIELDS, ln.split("\t"))) for ln in r.stdout.splitlines()]


def bad_segments(pcap, flt: str = "") -> str:
    """What tshark prints for malformed packets or bad TCP checksums (nothing, we hope)."""
    expr = "_ws.malformed || tcp.checksum.status == 2"
    if flt:
        expr = f"({expr}) && {flt}"
    r = subprocess.run(["tshark", "-n", "-r", str(pcap), "-o", "tcp.check_checksum:TRUE",
                        "-o", "tcp.analyze_sequence_numbers:FALSE", "-Y", expr],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def check_syns(segs: list[dict], port: int, client: str) -> None:
    """The SYN of `client` to `port` and the SYN-ACK carry MSS, WS, SACK-permitted and TS."""
    syn = [s for s in segs if s["tcp.flags.syn"] == "1" and s["tcp.flags.ack"] == "0"
           and s["ip.src"] == client and s["tcp.dstport"] == str(port)]
    synack = [s for s in segs if s["tcp.flags.syn"] == "1" and s["tcp.flags.ack"] == "1"
              and s["ip.src"] != client and s["tcp.srcport"] == str(port)]
    assert syn and synack, (port, client)
    for s in (syn[0], synack[0]):
        assert s["tcp.options.mss_val"] == "1460", s
        assert s["tcp.options.wscale.shift"] != "", s
        assert s["tcp.options.sack_perm"] != "", s
        assert s["tcp.options.timestamp.tsval"] != "", s


# --- tests ------------------------------------------------------------------------------------

@needs_tshark
def test_20mb_each_way_linux_to_a_kstack_listener_and_kstack_to_a_linux_listener(peer):
    peer.start("napi", wire=True)
    linux0 = peer.netstat()
    bulk_with_linux(peer, BULK_BYTES)
    st = peer.k.stats()
    snmp = st["snmp"]
    assert snmp["TcpActiveOpens"] == 1 and snmp["TcpPassiveOpens"] == 1
    assert snmp.get("TcpInCsumErrors", 0) == 0 and snmp.get("TcpInErrs", 0) == 0
    linux = peer.netstat()
    assert linux["TcpActiveOpens"] - linux0["TcpActiveOpens"] == 1
    assert linux["TcpPassiveOpens"] - linux0["TcpPassiveOpens"] == 1
    assert linux["TcpInErrs"] == linux0["TcpInErrs"] and linux["TcpInCsumErrors"] == linux0["TcpInCsumErrors"]
    final = peer.k.stop()
    assert peer.k.p.returncode == 0 and final["skb"]["skb_live"] == 0
    peer.klab.emu.stop()  # the wire capture is complete

    segs = tcp_segments(peer.pcap)
    check_syns(segs, KSTACK_PORT, LINUX)  # Linux's SYN, kstack's SYN-ACK
    check_syns(segs, LINUX_PORT, KSTACK)  # kstack's SYN, Linux's SYN-ACK
    for side in (LINUX, KSTACK):
        mine = [s for s in segs if s["ip.src"] == side and s["tcp.flags.syn"] == "0"]
        data = [s for s in mine if int(s["tcp.len"] or 0) > 0]
        assert sum(int(s["tcp.len"]) for s in data) >= BULK_BYTES
        assert all(s["tcp.options.timestamp.tsval"] for s in data), side  # TS on every data segment
        assert all(s["tcp.options.timestamp.tsval"] for s in mine), side  # and on every ACK
        scales = {s["tcp.window_size_scalefactor"] for s in mine}
        assert scales and all(int(x) > 1 for x in scales), (side, scales)
        assert max(int(s["tcp.window_size"]) for s in mine) > 65535, side  # a window WS made possible
    bad = bad_segments(peer.pcap, f"ip.src == {LINUX}")  # kstack's own TX may be CHECKSUM_PARTIAL
    assert bad == "", bad[:2000]
    bad = bad_segments(peer.wire)  # on the wire: the device inserted kstack's checksums
    assert bad == "", bad[:2000]
    wire = tcp_segments(peer.wire)
    assert sum(int(s["tcp.len"] or 0) for s in wire if s["ip.src"] == KSTACK) >= BULK_BYTES


@needs_curl
def test_curl_fetches_pages_from_the_kstack_http_server(peer, tmp_path):
    peer.start("interrupt")
    root = tmp_path / "www"
    root.mkdir()
    page = b"<html><body>kstack over Linux</body></html>\n" * 2000
    (root / "index.html").write_bytes(page)
    srv = peer.klab.app_bg("kstack.apps.http_server", "--port", str(HTTP_PORT), "--root", str(root),
                           "--kernel", peer.ksock, name="http_server", ready="http_server: listening")
    n = 3_000_000
    out1, out2 = tmp_path / "index.out", tmp_path / "bytes.out"
    base = f"http://{KSTACK}:{HTTP_PORT}"
    r = peer.run("curl", "-sS", "--fail", "--max-time", "60", "-w", "%{http_code} %{num_connects}\\n",
                 "-o", str(out1), f"{base}/index.html", "-o", str(out2), f"{base}/bytes/{n}", timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split() == ["200", "1", "200", "0"], r.stdout  # the second on the same connection
    assert hashlib.sha256(out1.read_bytes()).hexdigest() == hashlib.sha256(page).hexdigest()
    assert hashlib.sha256(out2.read_bytes()).hexdigest() == hashlib.sha256(generated_body(0, n)).hexdigest()
    r = peer.run("curl", "-sS", "--max-time", "30", "-o", "/dev/null", "-w", "%{http_code}",
                 f"{base}/nothing-here")
    assert r.returncode == 0 and r.stdout == "404", r.stdout + r.stderr
    srv.p.send_signal(15)
    served = finish(srv, 30)
    assert served["requests"] == 3 and served["errors"] == 0
    st = peer.k.stats()
    assert st["snmp"]["TcpPassiveOpens"] == 2 and st["snmp"].get("TcpInCsumErrors", 0) == 0


@needs_tshark
def test_a_lossy_cable_with_linux_still_byte_exact_with_sack_both_ways(peer):
    faults = {"drop": 0.01, "reorder": 0.01}
    peer.start("napi", faults={"k0": {**faults, "seed": 7},  # kstack -> Linux
                               "peer": {**faults, "corrupt": 0.01, "seed": 8}})  # Linux -> kstack
    linux0 = peer.netstat()
    bulk_with_linux(peer, LOSSY_BYTES)
    st = peer.k.stats()
    snmp = st["snmp"]
    assert snmp.get("TcpRetransSegs", 0) > 0 and snmp.get("TcpExtTCPSackRecovery", 0) > 0, snmp
    linux = peer.netstat()
    assert linux["TcpRetransSegs"] > linux0["TcpRetransSegs"]
    assert linux.get("TcpExtTCPSackRecovery", 0) > linux0.get("TcpExtTCPSackRecovery", 0)
    assert sum(find_key(st, "rx_crc_errors")) > 0  # the corrupted frames, counted by the device
    final = peer.k.stop()
    assert peer.k.p.returncode == 0 and final["skb"]["skb_live"] == 0
    segs = tcp_segments(peer.pcap)
    check_syns(segs, KSTACK_PORT, LINUX)
    check_syns(segs, LINUX_PORT, KSTACK)
    for side in (LINUX, KSTACK):  # each receiver told its sender about the holes
        sacks = [s for s in segs if s["ip.src"] == side and s["tcp.options.sack_le"]]
        assert sacks, side
    bad = bad_segments(peer.pcap, f"ip.src == {LINUX}")  # the device dropped the corrupted ones
    assert bad == "", bad[:2000]
