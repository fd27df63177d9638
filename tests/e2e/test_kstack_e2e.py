"""kstack end to end with real processes: an emulator with devices back to back, a kernel
process (`python -m kstack.kernel`) per host, applications in their own processes.

- Two hosts (198.18.0.1/24, 198.18.0.2/24) in NAPI and in interrupt mode: ping (iputils'
  summary, 0% loss), UDP echo byte-exact from 0 to 8000 bytes, 4000-byte datagrams fragmented
  both ways (IpFragCreates / IpReasmOKs), nothing held afterwards.
- The same with a cable that drops 30% of one direction (configs/kstack-lossy.yaml): ping
  reports the loss it saw and the kernels' and the cable's counters agree; UDP echo loses
  datagrams and nothing hangs.
- Three hosts A -- R -- B (configs/kstack-router.yaml), R forwarding: ping with ttl 63, a UDP
  exchange with fragments through the router, ICMP time exceeded for `ping -t 1`.

Every wait is bounded (application timeouts, socket timeouts, event timeouts); nothing asserts
a time."""
from __future__ import annotations

import json
import signal

import pytest

from kstack_procs import ROOT, KernelLab, payloads, ping_summary, two_kernels

PORT = 7007
UDP_SIZES = [1, 0, 18, 64, 512, 1472, 1473, 4000, 8000, 4000]
BIG = 1472  # the largest UDP payload one 1500-byte frame carries


def frags(size: int, mtu: int = 1500) -> int:
    """IPv4 fragments of a UDP datagram with `size` bytes of payload (20-byte headers)."""
    data = size + 8
    if data + 20 <= mtu:
        return 1
    per = (mtu - 20) // 8 * 8
    return -(-data // per)


def ping(klab: KernelLab, ksock: str, dest: str, *args: str) -> tuple[int, str, dict]:
    r = klab.app("kstack.apps.ping", *args, "--kernel", ksock, dest)
    result = json.loads(r.stdout.strip().splitlines()[-1]) if r.stdout.strip().startswith("PING") else {}
    return r.returncode, r.stdout + r.stderr, result


def udp_echo(klab: KernelLab, ksock: str, port: int = PORT, name: str = "udp_echo"):
    return klab.app_bg("kstack.apps.udp_echo", "--port", str(port), "--kernel", ksock, name=name,
                       ready="udp_echo: listening")


def stop_app(p) -> dict:
    """SIGTERM a background application; its final JSON line."""
    p.p.send_signal(signal.SIGTERM)
    p.p.wait(timeout=20)
    p._t.join(timeout=5)
    while not p.lines.empty():
        p.seen.append(p.lines.get())
    assert p.p.returncode == 0, p.seen[-5:]
    return json.loads([ln for ln in p.seen if ln.startswith("{")][-1])


def emulator_stats(klab: KernelLab) -> dict:
    klab.emu.p.send_signal(signal.SIGUSR1)
    ln = klab.emu.line(lambda s: s.startswith("nicemu: stats "))
    return json.loads(ln[len("nicemu: stats "):])


def find_key(obj, key: str) -> list:
    """Every value under `key` anywhere in a nested dict/list."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                out.append(v)
            out.extend(find_key(v, key))
    elif isinstance(obj, list):
        for v in obj:
            out.extend(find_key(v, key))
    return out


def stop_all(*kernels) -> list[dict]:
    finals = [k.stop() for k in kernels]
    for k in kernels:
        assert k.p.returncode == 0, k.seen[-3:]
    return finals


# --- two hosts -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["napi", "interrupt"])
def test_two_hosts_ping_udp_echo_and_fragments(klab, mode):
    ka, kb, ka_sock, kb_sock = two_kernels(klab, mode, mode)
    code, out, res = ping(klab, ka_sock, "198.18.0.2", "-c", "5", "-i", "0.05", "-W", "5")
    assert code == 0, out
    assert "5 packets transmitted, 5 received, 0% packet loss" in out
    assert out.count("bytes from 198.18.0.2: icmp_seq=") == 5 and "ttl=64" in out
    assert res["transmitted"] == 5 and res["received"] == 5

    echo = udp_echo(klab, kb_sock)
    data = payloads(UDP_SIZES, seed=1)
    got = klab.udp_client(ka_sock, "198.18.0.2", PORT, data, wait=5.0)
    assert got == {"sent": len(data), "echoed": len(data), "lost": 0, "wrong": 0, "sizes": UDP_SIZES}
    echoed = stop_app(echo)
    assert echoed["echoed"] == len(data) and echoed["bytes"] == sum(UDP_SIZES)

    sa, sb = ka.stats(), kb.stats()
    big = [n for n in UDP_SIZES if n > BIG]
    n_frag = sum(frags(n) for n in big)
    for s in (sa, sb):  # each side fragments what it sends and reassembles what it receives
        snmp = s["snmp"]
        assert snmp.get("IpFragOKs", 0) == len(big) and snmp.get("IpFragCreates", 0) == n_frag
        assert snmp.get("IpReasmOKs", 0) == len(big) and snmp.get("IpReasmReqds", 0) == n_frag
        assert snmp.get("IpReasmFails", 0) == 0 and snmp.get("UdpInErrors", 0) == 0
        assert snmp.get("UdpInDatagrams", 0) == len(data)
        assert s["skb"]["skb_live"] == 0  # nothing held once the traffic is over
        assert s["devices"]["eth0"]["stats"]["rx_errors"] == 0
    assert sb["snmp"]["IcmpInEchos"] == 5 and sb["snmp"]["IcmpOutEchoReps"] == 5
    assert sa["snmp"]["IcmpInEchoReps"] == 5
    assert sa["drops"].get("UNHANDLED_PROTO", 0) == 0 and sb["drops"].get("NO_SOCKET", 0) == 0
    assert [n["state"] for n in sa["neighbours"] if n["dst"] == "198.18.0.2"] in (
        ["REACHABLE"], ["STALE"], ["DELAY"])
    for s in (sa, sb):
        assert s["ethtool"]["eth0"]["interrupts"] > 0
    stop_all(ka, kb)


def test_udp_send_to_udp_sink_both_apps_in_their_own_processes(klab):
    """The shipped sender and sink: every datagram arrives (no loss on a clean cable at a
    paced rate), counted in order."""
    ka, kb, ka_sock, kb_sock = two_kernels(klab, "napi", "interrupt")
    sink = klab.app_bg("kstack.apps.udp_sink", "--port", str(PORT), "--count", "200", "--idle", "10",
                       "--kernel", kb_sock, name="udp_sink", ready="udp_sink: listening")
    r = klab.app("kstack.apps.udp_send", "198.18.0.2", str(PORT), "--count", "200", "--size", "100",
                 "--rate", "2000", "--kernel", ka_sock)
    assert r.returncode == 0, r.stdout + r.stderr
    sent = json.loads(r.stdout.strip().splitlines()[-1])
    assert sent["sent"] == 200 and sent["errors"] == 0
    sink.p.wait(timeout=60)
    sink._t.join(timeout=5)
    while not sink.lines.empty():
        sink.seen.append(sink.lines.get())
    res = json.loads([ln for ln in sink.seen if ln.startswith("{")][-1])
    assert sink.p.returncode == 0, sink.seen
    assert res["received"] == 200, res
    stop_all(ka, kb)


# --- loss on the cable ---------------------------------------------------------------------

def test_loss_on_the_cable_ping_and_udp(klab):
    socks = klab.emulator_config(str(ROOT / "configs" / "kstack-lossy.yaml"), name="lossy")
    ka, kb, ka_sock, kb_sock = two_kernels(klab, "napi", "interrupt", sockets=(socks["nic0"], socks["nic1"]))

    def a_to_b() -> tuple[int, int, int]:
        """(frames a sent, frames b received, frames the cable dropped) so far"""
        sa, sb = ka.stats(), kb.stats()
        return (sa["devices"]["eth0"]["stats"]["tx_packets"], sb["devices"]["eth0"]["stats"]["rx_packets"],
                sum(find_key(emulator_stats(klab), "dropped")))

    # a's gratuitous ARP may have gone out before b's receiver was on: count from here
    base = a_to_b()
    code, out, res = ping(klab, ka_sock, "198.18.0.2", "-c", "30", "-i", "0.05", "-W", "3")
    s = ping_summary(out)
    assert s["transmitted"] == 30 and 0 < s["received"] < 30, out
    assert s["loss"] == pytest.approx(100.0 * (30 - s["received"]) / 30, abs=1e-9)
    assert res["received"] == s["received"] and res["transmitted"] == 30
    assert code == 0
    sa, sb = ka.stats(), kb.stats()
    # the requests that crossed were all answered, and every answer came back (b -> a is clean)
    assert sa["snmp"]["IcmpOutEchos"] == 30
    assert sb["snmp"]["IcmpInEchos"] == sb["snmp"]["IcmpOutEchoReps"] == s["received"]
    assert sa["snmp"]["IcmpInEchoReps"] == s["received"]
    # what a sent and b did not receive, the cable dropped
    a_tx, b_rx, dropped = (x - x0 for x, x0 in zip(a_to_b(), base))
    assert dropped == a_tx - b_rx >= 30 - s["received"]

    echo = udp_echo(klab, kb_sock)
    data = payloads([100] * 30, seed=2)
    got = klab.udp_client(ka_sock, "198.18.0.2", PORT, data, wait=1.0)
    assert got["sent"] == 30 and got["echoed"] + got["lost"] == 30
    assert got["lost"] > 0 and got["echoed"] > 0
    echoed = stop_app(echo)
    sb = kb.stats()
    # what the server echoed, it received; a received echo was one the server sent
    assert echoed["echoed"] == sb["snmp"]["UdpInDatagrams"] == got["echoed"] + got["wrong"]
    assert sb["skb"]["skb_live"] == 0
    stop_all(ka, kb)


# --- three hosts through a router ----------------------------------------------------------

def three_hosts(klab: KernelLab):
    socks = klab.emulator_config(str(ROOT / "configs" / "kstack-router.yaml"), name="router")
    d = klab.dir
    kr = klab.kernel("--device", f"{socks['r0']},name=eth0,mode=napi",
                     "--device", f"{socks['r1']},name=eth1,mode=interrupt", "--forward",
                     "--addr", "eth0=198.18.1.254/24", "--addr", "eth1=198.18.2.254/24", name="kernel-r")
    ka = klab.kernel("--device", f"{socks['a']},name=eth0,mode=interrupt", "--addr", "eth0=198.18.1.1/24",
                     "--route", "198.18.2.0/24,via=198.18.1.254", "--syscall-socket", str(d / "ka.sock"),
                     name="kernel-a")
    kb = klab.kernel("--device", f"{socks['b']},name=eth0,mode=napi", "--addr", "eth0=198.18.2.1/24",
                     "--route", "198.18.1.0/24,via=198.18.2.254", "--syscall-socket", str(d / "kb.sock"),
                     name="kernel-b")
    assert kr.up["forward"] is True
    return ka, kr, kb, str(d / "ka.sock"), str(d / "kb.sock")


def test_three_hosts_through_a_forwarding_kernel(klab):
    ka, kr, kb, ka_sock, kb_sock = three_hosts(klab)
    code, out, _ = ping(klab, ka_sock, "198.18.2.1", "-c", "3", "-i", "0.05", "-W", "5")
    assert code == 0 and "3 packets transmitted, 3 received, 0% packet loss" in out, out
    lines = [ln for ln in out.splitlines() if "bytes from 198.18.2.1" in ln]
    assert len(lines) == 3 and all("ttl=63" in ln for ln in lines), out  # one hop: 64 - 1

    echo = udp_echo(klab, kb_sock)
    data = payloads([32, 1472, 4000], seed=3)
    got = klab.udp_client(ka_sock, "198.18.2.1", PORT, data, wait=5.0)
    assert got == {"sent": 3, "echoed": 3, "lost": 0, "wrong": 0, "sizes": [32, 1472, 4000]}
    stop_app(echo)

    sr, sa, sb = kr.stats(), ka.stats(), kb.stats()
    # R forwards each fragment on its own: 3 echo requests + 3 replies, 3 datagrams of which
    # the 4000-byte one is 3 fragments, each way
    assert sr["snmp"]["IpForwDatagrams"] == 2 * (3 + 1 + 1 + frags(4000))
    assert sr["snmp"].get("IpReasmReqds", 0) == 0 and sr["snmp"].get("IcmpOutMsgs", 0) == 0
    assert sa["snmp"]["IpReasmOKs"] == 1 and sb["snmp"]["IpReasmOKs"] == 1
    for s in (sr, sa, sb):
        assert s["skb"]["skb_live"] == 0
    # each host knows the router's MAC, not the far host's
    assert {n["dst"] for n in sa["neighbours"]} == {"198.18.1.254"}
    assert {n["dst"] for n in sb["neighbours"]} == {"198.18.2.254"}
    stop_all(ka, kr, kb)


def test_ttl_runs_out_at_the_router(klab):
    ka, kr, kb, ka_sock, kb_sock = three_hosts(klab)
    code, out, res = ping(klab, ka_sock, "198.18.2.1", "-c", "2", "-i", "0.05", "-W", "2", "-t", "1")
    assert code == 1, out  # no reply
    assert out.count("From 198.18.1.254 icmp_seq=") == 2 and "Time to live exceeded" in out, out
    s = ping_summary(out)
    assert s == {"transmitted": 2, "received": 0, "errors": 2, "loss": 100.0}
    sr, sa, sb = kr.stats(), ka.stats(), kb.stats()
    assert sr["snmp"]["IcmpOutTimeExcds"] == 2 and sr["drops"].get("IP_TTL_EXCEEDED") == 2
    assert sr["snmp"].get("IpForwDatagrams", 0) == 0
    assert sa["snmp"]["IcmpInTimeExcds"] == 2
    assert sb["snmp"].get("IcmpInEchos", 0) == 0  # nothing reached b
    # with the default TTL the same ping gets through
    code, out, _ = ping(klab, ka_sock, "198.18.2.1", "-c", "1", "-W", "5", "-t", "2")
    assert code == 0 and "ttl=63" in out, out
    stop_all(ka, kr, kb)
