"""The real Linux kernel as kstack's peer: the emulated device's port is a TAP inside a network
namespace the test creates (198.18.0.1/24 on the Linux side, 198.18.0.2/24 on kstack's), and
removes with everything else: the emulator, the kstack kernel, every application, the TAP,
the capture and the socket files.

Linux pings kstack with 56, 1472 and 4000 bytes (the last fragmented both ways: kstack's
IpReasmOKs/IpFragCreates and Linux's /proc/net/snmp agree), kstack's ping reaches Linux, ARP
resolves both ways (`ip neigh` in the namespace, kstack's neighbour table), UDP both ways with
a plain Python socket on the Linux side, and tshark reads kstack's capture (--pcap) with no
malformed packet. Every wait is bounded; nothing asserts a time."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

from kstack_procs import MAC0, KernelLab, NetnsPeer, ip, payloads
from nicemu.cable.tap import tap_available

REASON = tap_available() or (None if shutil.which("ip") else "the `ip` command is missing")
pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(REASON is not None, reason=f"needs root, /dev/net/tun and ip netns: {REASON}"),
]

LINUX, KSTACK = "198.18.0.1", "198.18.0.2"
PORT = 7007  # kstack's udp_echo
LINUX_PORT = 9009  # the Linux side's echo server


class LinuxPeer(NetnsPeer):
    """A namespace with a TAP whose other side is the emulated device, and a kstack kernel on
    that device."""

    def __init__(self, klab: KernelLab, mode: str = "napi") -> None:
        super().__init__(klab)
        self.mode = mode

    def start(self) -> None:
        self.start_kernel(self.mode, LINUX, KSTACK)
        self.tap_mac = self.run("cat", f"/sys/class/net/{self.tap}/address").stdout.strip()

    def snmp(self) -> dict[str, int]:
        """Linux's /proc/net/snmp in the namespace, as nstat names it (IpReasmOKs, ...)."""
        return self.counters("/proc/net/snmp")


@pytest.fixture
def peer(klab, request):
    lp = LinuxPeer(klab, getattr(request, "param", "napi"))
    try:
        lp.start()
        yield lp
    finally:
        lp.close()
        assert lp.ns not in ip("netns", "list").stdout
        assert lp.tap not in ip("-br", "link").stdout
        assert not klab.dir.exists()  # sockets, the topology, the capture


# ping through the Linux kernel's own raw ICMP socket, for hosts without iputils' ping: the
# kernel fragments the request and reassembles the reply; prints iputils' reply and summary lines
LINUX_PING = textwrap.dedent(
    """
    import os, socket, struct, sys, time
    dest, size, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    def csum(b):
        b += bytes(len(b) & 1)
        s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
        s = (s >> 16) + (s & 0xFFFF)
        s += s >> 16
        return ~s & 0xFFFF
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    got = 0
    for seq in range(1, count + 1):
        body = bytes((8 + i) & 0xFF for i in range(size))
        hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
        s.sendto(struct.pack("!BBHHH", 8, 0, csum(hdr + body), ident, seq) + body, (dest, 0))
        end = time.monotonic() + 5
        while time.monotonic() < end:
            s.settimeout(max(0.01, end - time.monotonic()))
            try:
                data, addr = s.recvfrom(65535)
            except socket.timeout:
                break
            ihl = (data[0] & 15) * 4
            icmp = data[ihl:]
            t, c, _, rid, rseq = struct.unpack_from("!BBHHH", icmp)
            if t == 0 and rid == ident and rseq == seq and icmp[8:] == body and csum(icmp) == 0:
                got += 1
                print(f"{len(icmp)} bytes from {addr[0]}: icmp_seq={seq} ttl={data[8]}", flush=True)
                break
        time.sleep(0.1)
    loss = 100 * (count - got) // count
    print(f"{count} packets transmitted, {got} received, {loss}% packet loss, time 0ms")
    sys.exit(0 if got else 1)
    """
)


def linux_ping(peer: LinuxPeer, size: int, count: int = 3) -> str:
    """Linux pings kstack: iputils' ping when installed, else the kernel's raw ICMP socket."""
    if shutil.which("ping"):
        cmd = ["ping", "-n", "-c", str(count), "-i", "0.2", "-W", "5", "-w", "30", "-s", str(size), KSTACK]
    else:
        cmd = [sys.executable, "-c", LINUX_PING, KSTACK, str(size), str(count)]
    r = peer.run(*cmd)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{count} packets transmitted, {count} received, 0% packet loss" in r.stdout, r.stdout
    return r.stdout


@pytest.mark.parametrize("peer", ["napi", "interrupt"], indirect=True)
def test_linux_pings_kstack_56_1472_and_4000_bytes(peer):
    for size in (56, 1472):
        out = linux_ping(peer, size)
        assert f"{size + 8} bytes from {KSTACK}: icmp_seq=1 ttl=64" in out, out
    st = peer.k.stats()
    assert st["snmp"].get("IpReasmOKs", 0) == 0 and st["snmp"].get("IpFragCreates", 0) == 0  # 1500 fits
    assert st["snmp"]["IcmpOutEchoReps"] == 6
    linux_before = peer.snmp()
    out = linux_ping(peer, 4000)
    assert f"4008 bytes from {KSTACK}" in out, out
    st = peer.k.stats()
    # 4028 bytes of IP: fragments of 1480, 1480 and 1068 bytes each way
    assert st["snmp"]["IpReasmOKs"] == 3 and st["snmp"]["IpReasmReqds"] == 9
    assert st["snmp"]["IpFragOKs"] == 3 and st["snmp"]["IpFragCreates"] == 9
    assert st["snmp"]["IcmpInEchos"] == 9 and st["snmp"]["IcmpOutEchoReps"] == 9
    linux = peer.snmp()
    assert linux["IpReasmOKs"] - linux_before["IpReasmOKs"] == 3
    assert linux["IpFragCreates"] - linux_before["IpFragCreates"] == 9
    assert st["snmp"].get("IpInHdrErrors", 0) == 0 and st["skb"]["skb_live"] == 0


def test_kstack_pings_linux_and_arp_resolves_both_ways(peer):
    r = peer.klab.app("kstack.apps.ping", "-c", "3", "-i", "0.1", "-W", "5", "--kernel", peer.ksock, LINUX)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 packets transmitted, 3 received, 0% packet loss" in r.stdout, r.stdout
    assert f"bytes from {LINUX}: icmp_seq=1 ttl=64" in r.stdout
    r = peer.klab.app("kstack.apps.ping", "-c", "2", "-i", "0.1", "-W", "5", "-s", "4000", "--kernel",
                      peer.ksock, LINUX)
    assert r.returncode == 0 and "2 received" in r.stdout, r.stdout + r.stderr
    # kstack resolved Linux (its request, Linux's reply) ...
    st = peer.k.stats()
    mine = [n for n in st["neighbours"] if n["dst"] == LINUX]
    assert len(mine) == 1 and mine[0]["lladdr"] == peer.tap_mac, st["neighbours"]
    assert mine[0]["state"] in ("REACHABLE", "STALE", "DELAY", "PROBE")
    # ... and Linux knows kstack's MAC (learnt from kstack's request, or its own resolution)
    linux_ping(peer, 56, count=1)
    neigh = peer.run("ip", "neigh", "show", KSTACK).stdout
    assert MAC0 in neigh.lower() and "FAILED" not in neigh, neigh
    assert st["snmp"]["IpReasmOKs"] == 2 and st["snmp"]["IpFragCreates"] == 6


LINUX_ECHO = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((sys.argv[1], int(sys.argv[2])))
    s.settimeout(30)
    print("ready", flush=True)
    for _ in range(int(sys.argv[3])):
        data, addr = s.recvfrom(65535)
        s.sendto(data, addr)
    print("done", flush=True)
    """
)

LINUX_CLIENT = textwrap.dedent(
    """
    import json, socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    out = {"sent": 0, "echoed": 0, "lost": 0, "wrong": 0}
    for p in (bytes.fromhex(x) for x in sys.argv[3].split(",")):
        s.sendto(p, (sys.argv[1], int(sys.argv[2])))
        out["sent"] += 1
        try:
            data, addr = s.recvfrom(65535)
        except socket.timeout:
            out["lost"] += 1
            continue
        out["echoed" if data == p and addr == (sys.argv[1], int(sys.argv[2])) else "wrong"] += 1
    print(json.dumps(out), flush=True)
    """
)


def test_udp_both_ways_with_a_linux_socket(peer):
    sizes = [1, 100, 1472, 4000, 9000]
    data = payloads(sizes, seed=5)
    # Linux -> kstack: kstack's udp_echo, a plain socket in the namespace
    echo = peer.klab.app_bg("kstack.apps.udp_echo", "--port", str(PORT), "--kernel", peer.ksock, name="udp_echo",
                            ready="udp_echo: listening")
    r = peer.run(sys.executable, "-c", LINUX_CLIENT, KSTACK, str(PORT), ",".join(d.hex() for d in data))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"sent": 5, "echoed": 5, "lost": 0, "wrong": 0}
    echo.stop()
    # kstack -> Linux: a plain socket echoes in the namespace, kstack's client checks the bytes
    srv = peer.klab.start(["ip", "netns", "exec", peer.ns, sys.executable, "-c", LINUX_ECHO, LINUX,
                           str(LINUX_PORT), str(len(data))], "linux-echo")
    srv.line(lambda ln: ln == "ready")
    got = peer.klab.udp_client(peer.ksock, LINUX, LINUX_PORT, data, wait=5.0)
    assert got == {"sent": 5, "echoed": 5, "lost": 0, "wrong": 0, "sizes": sizes}
    srv.line(lambda ln: ln == "done")
    assert srv.p.wait(timeout=10) == 0
    st = peer.k.stats()
    assert st["snmp"]["UdpInDatagrams"] == 10 and st["snmp"].get("UdpInErrors", 0) == 0
    assert st["snmp"].get("UdpInCsumErrors", 0) == 0 and st["skb"]["skb_live"] == 0


def test_tshark_reads_the_kstack_capture_without_malformed_packets(peer):
    if not shutil.which("tshark"):
        pytest.skip("tshark is not installed")
    linux_ping(peer, 4000, count=2)
    r = peer.klab.app("kstack.apps.ping", "-c", "2", "-i", "0.1", "-W", "5", "-s", "3000", "--kernel",
                      peer.ksock, LINUX)
    assert r.returncode == 0, r.stdout + r.stderr
    r = peer.run(sys.executable, "-c", LINUX_CLIENT, KSTACK, "9", "00ff")  # no listener: port unreachable
    assert r.returncode == 0 and json.loads(r.stdout)["lost"] == 1
    final = peer.k.stop()
    assert peer.k.p.returncode == 0 and final["pcap"]["eth0"]["frames_in"] > 0
    tshark = ["tshark", "-n", "-r", str(peer.pcap)]
    bad = subprocess.run([*tshark, "-Y", "_ws.malformed"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 0 and bad.stdout == "", bad.stdout + bad.stderr
    def count(flt: str) -> int:
        r = subprocess.run([*tshark, "-Y", flt], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return len(r.stdout.splitlines())
    assert count("arp") >= 2  # a request and a reply at least
    assert count("ip.flags.mf == 1") >= 2 * (2 * 2 + 2 * 2)  # fragments both ways, both pings
    assert count("icmp.type == 3 && icmp.code == 3") == 1  # kstack's port unreachable


def test_a_reply_just_over_the_mtu_is_fragmented(peer):
    """1476 bytes of data make a 1504-byte datagram: both kernels must fragment it (an MTU
    of 1504 once let kstack send it whole)."""
    linux_ping(peer, 1476, count=1)
    st = peer.k.stats()
    assert st["snmp"]["IpReasmOKs"] == 1 and st["snmp"]["IpFragOKs"] == 1 and st["snmp"]["IpFragCreates"] == 2
