"""The kernel process (`python -m kstack.kernel`) against real emulator processes: bring-up,
two kernels back to back over a pair of devices (ARP, ping, fragments, a tap's capture),
frames from a driver process counted and dropped with a reason, SIGTERM, kill -9 of the
emulator, bad options, and nothing left behind.

The ping and the syscall channel parts need kstack.inet, kstack.syscall and kstack.apps
(written alongside this module); they are skipped when those are missing."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from kstack_procs import MAC0, two_kernels as _two_kernels

HAVE_INET = importlib.util.find_spec("kstack.inet") is not None
HAVE_APPS = (HAVE_INET and importlib.util.find_spec("kstack.syscall.server") is not None
             and importlib.util.find_spec("kstack.apps.ping") is not None)
needs_apps = pytest.mark.skipif(not HAVE_APPS, reason="kstack.inet / syscall / apps not present")

# the klab fixture (tests/conftest.py) and the helpers are in tests/kstack_procs.py


def test_kernel_brings_up_a_device_and_stops_cleanly(klab):
    a, b = klab.emulator_pair()
    k = klab.kernel("--device", f"{a},name=eth7,mode=interrupt,qdisc=pfifo,txqueuelen=50",
                    "--stats-interval", "0.2")
    dev = k.up["devices"][0]
    assert dev == {"name": "eth7", "mac": MAC0, "mode": "interrupt", "carrier": True, "qdisc": "pfifo"}
    st = k.event("stats")  # from --stats-interval
    assert st["devices"]["eth7"]["qdisc"]["limit"] == 50
    assert st["ethtool"]["eth7"]["interrupts"] >= 0 and st["process"]["cpu_ns"] > 0
    assert "ctx_switches" in st["process"]
    final = k.stop()
    assert k.p.returncode == 0 and final is not None
    assert any(json.loads(ln) == {"event": "carrier", "dev": "eth7", "up": False} for ln in k.seen
               if ln.startswith("{"))


def test_frames_from_a_driver_process_are_received_and_dropped_with_a_reason(klab):
    """A driver.kernel generator on the peer device sends 300 frames of an EtherType no
    protocol takes: the kernel receives every one (NAPI) and drops each as UNHANDLED_PROTO."""
    a, b = klab.emulator_pair()
    k = klab.kernel("--device", f"{a},mode=napi")
    gen = klab.driver(b, "--app", "gen", "--count", "300", "--dst", MAC0, name="gen")
    st = k.wait_stats(lambda s: s["devices"]["eth0"]["stats"]["rx_packets"] >= 300)
    assert st["devices"]["eth0"]["stats"]["rx_packets"] == 300
    assert st["drops"] == {"UNHANDLED_PROTO": 300}
    assert st["skb"]["skb_live"] == 0 and st["skb"]["skb_allocs"] == 300
    assert st["ethtool"]["eth0"]["rx_copied_bytes"] == 300 * 60
    assert gen.stop()["gen_sent"] == 300
    assert k.stop() is not None and k.p.returncode == 0


@pytest.mark.skipif(not HAVE_INET, reason="kstack.inet not present")
def test_two_kernels_resolve_each_other_with_arp(klab):
    a, b = klab.emulator_pair()
    ka = klab.kernel("--device", f"{a},mode=napi", "--addr", "eth0=198.18.0.1/24",
                     "--route", "198.19.0.0/16,via=198.18.0.2", name="kernel-a")
    kb = klab.kernel("--device", f"{b},mode=interrupt", "--addr", "eth0=198.18.0.2/24", name="kernel-b")
    assert ka.up["addresses"][0]["addr"] == "198.18.0.1/24"
    assert any(r.startswith("198.19.0.0/16 via 198.18.0.2") for r in ka.up["routes"])
    # each announces itself with a gratuitous ARP when its link comes up; a's receiver is on
    # by then, so it hears b's (and learns nothing from it: Linux's arp_accept=0)
    st = ka.wait_stats(lambda s: s["inet"]["arp"].get("requests_in", 0) >= 1)
    assert st["inet"]["arp"]["gratuitous_out"] == 1
    assert kb.stats()["inet"]["arp"]["gratuitous_out"] == 1
    assert st["drops"].get("DEV_READY", 0) == 0  # the announcement found the device up
    ka.stop()
    kb.stop()
    assert ka.p.returncode == 0 and kb.p.returncode == 0


@needs_apps
@pytest.mark.parametrize("modes", [("napi", "interrupt"), ("interrupt", "napi")])
def test_two_kernels_back_to_back_ping_with_fragments_and_a_capture(klab, modes):
    ka, kb, ka_sock, kb_sock = _two_kernels(klab, *modes, pcap=True)
    r = klab.app("kstack.apps.ping", "-c", "3", "-i", "0.1", "-W", "5", "--kernel", ka_sock, "198.18.0.2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 packets transmitted, 3 received, 0% packet loss" in r.stdout
    r = klab.app("kstack.apps.ping", "-c", "2", "-i", "0.1", "-s", "4000", "-W", "5", "--kernel", kb_sock,
                 "198.18.0.1")
    assert r.returncode == 0 and "2 received" in r.stdout, r.stdout + r.stderr
    sa, sb = ka.stats(), kb.stats()
    assert [n["state"] for n in sa["neighbours"] if n["dst"] == "198.18.0.2"] in (["REACHABLE"], ["STALE"],
                                                                                   ["DELAY"])
    assert sb["snmp"]["IcmpInEchos"] == 3 and sb["snmp"]["IcmpOutEchoReps"] == 3
    assert sb["snmp"]["IpFragCreates"] >= 6 and sa["snmp"]["IpReasmOKs"] == 2  # 4000 bytes: 3 each
    assert sa["skb"]["skb_live"] == 0 and sb["skb"]["skb_live"] == 0  # nothing held between pings
    assert sa["pcap"]["eth0"]["frames_in"] >= 3 + 6 and sa["pcap"]["eth0"]["frames_out"] >= 3 + 6
    ka.stop()
    kb.stop()
    assert ka.p.returncode == 0 and kb.p.returncode == 0
    assert not os.path.exists(ka_sock) and not os.path.exists(kb_sock)
    if shutil.which("tshark"):
        bad = subprocess.run(["tshark", "-n", "-r", str(klab.dir / "a.pcap"), "-Y",
                              "_ws.malformed || _ws.expert.severity >= error"],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 0 and bad.stdout == "", bad.stdout + bad.stderr
        n = subprocess.run(["tshark", "-n", "-r", str(klab.dir / "a.pcap"), "-Y", "icmp.type == 0"],
                           capture_output=True, text=True, timeout=60).stdout.splitlines()
        assert len(n) == 3 + 2  # three echo replies to a's pings, two it sent to b's


@pytest.mark.parametrize("traffic", [False, True])
def test_kill9_of_the_emulator_is_an_error_exit(klab, traffic):
    """kill -9 of the emulator: each kernel sees its bus socket close and exits 1 with an
    error event, idle or while a generator floods it (NAPI keeps polling)."""
    a, b = klab.emulator_pair()
    k = klab.kernel("--device", f"{a},mode=napi", "--stats-interval", "30",
                    *(["--syscall-socket", str(klab.dir / "k.sock")] if HAVE_APPS else []))
    if traffic:
        gen = klab.driver(b, "--app", "gen", "--dst", MAC0, name="gen")
        k.wait_stats(lambda s: s["devices"]["eth0"]["stats"]["rx_packets"] > 100)
    klab.emu.kill9()
    assert "gone" in k.event("error", timeout=10)["message"]
    assert k.p.wait(timeout=10) == 1
    assert not os.path.exists(klab.dir / "k.sock")
    if traffic:
        assert gen.p.wait(timeout=10) == 1


@pytest.mark.parametrize("args, message", [
    ([], "at least one --device"),
    (["--device", "{a},mode=turbo"], "mode is napi or interrupt"),
    (["--device", "{a},colour=red"], "unknown key"),
    (["--device", "{a},rx_ring=100"], "rx_ring_size"),
    (["--device", "{a}", "--pcap", "eth9=/tmp/x.pcap"], "no device named eth9"),
    (["--device", "{a}", "--addr", "eth0=198.18.0.1/40"], "--addr"),
    (["--device", "{a}", "--addr", "eth0=198.18.0.1/24", "--route", "0.0.0.0/0,via=198.19.9.9"], "--route"),
])
def test_bad_options_are_an_error_event_and_exit_2(klab, args, message):
    a, _ = klab.emulator_pair()
    if any("--addr" in x for x in args) and not HAVE_INET:
        pytest.skip("kstack.inet not present")
    p = klab.start([sys.executable, "-m", "kstack.kernel", *[x.format(a=a) for x in args]], "bad")
    assert message in p.event("error")["message"]
    assert p.p.wait(timeout=20) == 2


def test_python_m_kstack_is_the_kernel(klab):
    a, _ = klab.emulator_pair()
    p = klab.start([sys.executable, "-m", "kstack", "--device", a], "kstack")
    assert p.event("up")["devices"][0]["mac"] == MAC0
    p.stop()
    assert p.p.returncode == 0
