"""The TAP cable: the Linux kernel as the peer, inside a network namespace the test creates
and always removes. A frame a raw socket writes on the TAP comes out of the device's RX ring
(padded, FCS added); a frame the device transmits is read by a raw socket on the TAP (FCS
stripped). Addresses from 198.18.0.0/15 only; the host's interfaces are never touched."""
from __future__ import annotations

import select
import subprocess
import sys
import textwrap
import uuid

import pytest
from conftest import MAC_BYTES, RxRing, TxRing, make_frame

from nicemu import regs as R
from nicemu.cable import make_cable, plug, service
from nicemu.cable.tap import TapCableEnd, tap_available
from nicemu.fcs import check_fcs

REASON = tap_available()
pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(REASON is not None, reason=f"TAP tests need root and /dev/net/tun: {REASON}"),
]
ETHERTYPE = 0x88B5  # IEEE local experimental: nothing else in the namespace uses it


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


class Netns:
    def __init__(self) -> None:
        self.name = f"nicemu-test-{uuid.uuid4().hex[:8]}"
        ip("netns", "add", self.name)

    def run(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.name, *cmd], capture_output=True, text=True,
                              timeout=30, **kw)

    def popen(self, *cmd: str) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def delete(self) -> None:
        ip("netns", "del", self.name, check=False)


@pytest.fixture
def tap():
    """A TAP (opened here) created inside a fresh namespace, 198.18.0.1/24, up. Always removed."""
    ns = Netns()
    end = None
    try:
        end = TapCableEnd(name=f"nmt{uuid.uuid4().hex[:8]}", netns=ns.name)
        assert end.netns == ns.name
        for cmd in (["ip", "addr", "add", "198.18.0.1/24", "dev", end.ifname],
                    ["ip", "link", "set", "dev", end.ifname, "up"]):
            r = ns.run(*cmd)
            assert r.returncode == 0, r.stderr
        mac = ns.run("cat", f"/sys/class/net/{end.ifname}/address").stdout.strip()
        yield end, ns, bytes.fromhex(mac.replace(":", ""))
    finally:
        name = end.ifname if end is not None else None
        if end is not None:
            end.close()
        if name is not None:
            # closing the fd removed the (non-persistent) interface
            assert name not in ns.run("ip", "-br", "link").stdout
        ns.delete()
        assert ns.name not in ip("netns", "list").stdout
        if name is not None:
            assert name not in ip("-br", "link").stdout


SEND = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((sys.argv[1], 0))
    s.send(bytes.fromhex(sys.argv[2]))
    """
)

RECV = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(int(sys.argv[2])))
    s.bind((sys.argv[1], 0))
    s.settimeout(20)
    print("ready", flush=True)
    print(s.recv(65535).hex(), flush=True)
    """
)


def device(make_nic):
    nic = make_nic()
    rx = RxRing(nic).setup()
    tx = TxRing(nic).setup()
    return nic, rx, tx


def wait_rx(nic, end, rx: RxRing, payload: bytes) -> bytes:
    """Service the TAP until a frame carrying `payload` is in the RX ring."""
    state: dict = {}
    k = 0
    for _ in range(100):
        select.select([end.fileno()], [], [], 0.2)
        service(nic, end, state)
        while rx.desc(k)[3] & R.RxdStatus.DD:
            data = rx.data(k)
            k += 1
            if payload in data:
                return data
    raise AssertionError("the frame never reached the RX ring")


def test_frame_from_the_kernel_arrives_in_the_rx_ring(tap, make_nic) -> None:
    end, ns, tap_mac = tap
    nic, rx, tx = device(make_nic)
    plug(nic, end)
    assert nic.read32(R.STATUS) & R.Status.LU
    payload = b"from the linux side " + uuid.uuid4().bytes
    frame = MAC_BYTES + tap_mac + ETHERTYPE.to_bytes(2, "big") + payload + bytes(20)
    r = ns.run(sys.executable, "-c", SEND, end.ifname, frame.hex())
    assert r.returncode == 0, r.stderr
    got = wait_rx(nic, end, rx, payload)
    assert got == frame + got[-4:] and check_fcs(got)  # the cable added a good FCS
    assert nic.read32(R.CRCERRS) == 0


def test_short_kernel_frame_is_padded_like_a_real_mac(tap, make_nic) -> None:
    end, ns, tap_mac = tap
    nic, rx, tx = device(make_nic)
    plug(nic, end)
    payload = b"tiny" + uuid.uuid4().bytes[:8]
    frame = MAC_BYTES + tap_mac + ETHERTYPE.to_bytes(2, "big") + payload  # 26 bytes
    r = ns.run(sys.executable, "-c", SEND, end.ifname, frame.hex())
    assert r.returncode == 0, r.stderr
    got = wait_rx(nic, end, rx, payload)
    assert len(got) == 64 and got[:26] == frame and got[26:60] == bytes(34) and check_fcs(got)
    assert nic.read32(R.RUC) == 0


def test_frame_transmitted_by_the_device_is_read_on_the_tap(tap, make_nic) -> None:
    end, ns, tap_mac = tap
    nic, rx, tx = device(make_nic)
    plug(nic, end)
    reader = ns.popen(sys.executable, "-c", RECV, end.ifname, str(ETHERTYPE))
    try:
        assert reader.stdout.readline().strip() == "ready", reader.stderr.read()
        payload = b"from the emulated nic " + uuid.uuid4().bytes
        frame = tap_mac + MAC_BYTES + ETHERTYPE.to_bytes(2, "big") + payload + bytes(10)
        tx.send([frame])  # IFCS: the device appends the FCS, the cable strips it
        assert tx.sta(0) & 1  # DD: written back
        line = reader.stdout.readline().strip()
        assert line, reader.stderr.read()
        assert bytes.fromhex(line) == frame
        assert end.tx_frames == 1
    finally:
        if reader.poll() is None:
            reader.kill()
        reader.wait()
        reader.stdout.close()
        reader.stderr.close()


def test_bad_fcs_from_the_device_is_not_given_to_the_kernel(tap) -> None:
    end, ns, tap_mac = tap
    good = make_frame(dst=tap_mac)
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    assert end.send(bytes(bad)) and end.tx_bad_fcs == 1
    assert end.send(b"short") and end.tx_dropped == 1
    assert end.send(good) and end.tx_frames == 1


def test_make_cable_tap_and_bad_names() -> None:
    with pytest.raises(ValueError, match="1..15 characters"):
        make_cable("tap", name="x" * 16)
    with pytest.raises(ValueError, match="1..15 characters"):
        TapCableEnd(name="a/b")


def test_creating_in_a_missing_namespace_fails_cleanly() -> None:
    from nicemu.cable.base import CableError

    before = ip("-br", "link").stdout
    with pytest.raises(CableError, match="no such network namespace"):
        TapCableEnd(name=f"nmt{uuid.uuid4().hex[:8]}", netns=f"nicemu-test-missing-{uuid.uuid4().hex[:6]}")
    assert ip("-br", "link").stdout == before  # the TAP went away with its fd


def test_tap_in_a_namespace_never_appears_in_ours() -> None:
    """Created inside the namespace, not created here and moved: a netlink listener on our
    namespace's link group, bound before the TAP is made, hears nothing about it."""
    import socket

    ns = Netns()
    name = f"nmt{uuid.uuid4().hex[:8]}"
    mon = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    end = None
    try:
        mon.bind((0, 1))  # RTMGRP_LINK: every RTM_NEWLINK/DELLINK of this namespace from now on
        mon.setblocking(False)
        end = TapCableEnd(name=name, netns=ns.name)
        assert end.ifname == name and end.netns == ns.name
        assert name in ns.run("ip", "-br", "link").stdout
        assert name not in ip("-br", "link").stdout
        heard = b""
        while True:
            try:
                heard += mon.recv(65536)
            except BlockingIOError:
                break
        assert name.encode() not in heard
    finally:
        mon.close()
        if end is not None:
            end.close()
        ns.delete()
    assert ns.name not in ip("netns", "list").stdout


HOLDER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, sys.argv[3])
    from nicemu.cable.tap import TapCableEnd
    end = TapCableEnd(name=sys.argv[1], netns=sys.argv[2])
    print(end.ifname, flush=True)
    time.sleep(60)
    """
)


def test_kill_9_of_the_process_holding_the_tap_removes_it() -> None:
    import os
    import signal

    ns = Netns()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    name = f"nmt{uuid.uuid4().hex[:8]}"
    p = subprocess.Popen([sys.executable, "-c", HOLDER, name, ns.name, root], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == name
        assert name in ns.run("ip", "-br", "link").stdout
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        assert name not in ns.run("ip", "-br", "link").stdout
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
        ns.delete()
    assert ns.name not in ip("netns", "list").stdout
