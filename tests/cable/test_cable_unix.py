"""The AF_UNIX datagram cable: permissions, link state (hello/bye, a dead and a restarted
peer), backpressure, foreign senders, and two real processes with a device each."""
from __future__ import annotations

import os
import select
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time

import pytest
from cable_child import echo_through_child
from conftest import MAC_BYTES, PEER_MAC, make_frame

from nicemu.cable import make_cable
from nicemu.cable.base import CableError
from nicemu.cable.unix import UnixCableEnd

PEER_BYTES = bytes.fromhex(PEER_MAC.replace(":", ""))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def readable(end, timeout: float = 0) -> bool:
    return bool(select.select([end.fileno()], [], [], timeout)[0])


def reap(procs: list[subprocess.Popen]) -> None:
    """Kill the peer processes still running, wait for each and close its pipe."""
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
        p.stdout.close()


@pytest.fixture
def sockdir(tmp_path):
    d = tmp_path / "run"  # created by the cable, 0700
    return d


def test_directory_and_socket_permissions(sockdir) -> None:
    a = UnixCableEnd(sockdir / "a.sock", sockdir / "b.sock")
    assert stat.S_IMODE(sockdir.stat().st_mode) == 0o700
    assert stat.S_IMODE((sockdir / "a.sock").stat().st_mode) == 0o600
    a.close()
    assert not (sockdir / "a.sock").exists()
    assert not sockdir.exists()  # the cable made it, and removes it when it is empty


def test_only_the_sockets_own_directory_is_created(tmp_path) -> None:
    with pytest.raises(CableError, match="does not exist"):
        UnixCableEnd(tmp_path / "x" / "run" / "a.sock", tmp_path / "x" / "run" / "b.sock")
    assert not (tmp_path / "x").exists()


def test_an_open_directory_is_refused(tmp_path) -> None:
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o755)
    with pytest.raises(CableError, match="group/other"):
        UnixCableEnd(d / "a.sock", d / "b.sock")


def test_same_path_for_both_ends_is_refused(sockdir) -> None:
    with pytest.raises(CableError, match="the same"):
        UnixCableEnd(sockdir / "a.sock", sockdir / "a.sock")


def test_link_comes_up_when_the_peer_says_hello(sockdir) -> None:
    a = make_cable("unix", path=str(sockdir / "a.sock"), peer=str(sockdir / "b.sock"))
    assert not a.link_up  # nobody there yet
    assert a.send(make_frame()) and a.tx_dropped == 1  # unplugged: lost
    b = UnixCableEnd(sockdir / "b.sock", sockdir / "a.sock")
    assert b.link_up
    assert readable(a)
    assert a.recv_frames() == [] and a.link_up
    fs = [make_frame(payload=bytes([i])) for i in range(5)]
    for f in fs:
        assert b.send(f)
    assert readable(a)
    assert a.recv_frames() == fs
    assert a.send(fs[0]) and b.recv_frames() == [fs[0]]
    b.close()  # bye
    assert readable(a)
    assert a.recv_frames() == [] and not a.link_up
    a.close()


def test_stale_socket_is_replaced_and_live_one_refused(sockdir) -> None:
    sockdir.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(str(sockdir / "a.sock"))
    stale.close()  # the file stays behind, as after kill -9
    a = UnixCableEnd(sockdir / "a.sock", sockdir / "b.sock")
    with pytest.raises(CableError, match="in use"):
        UnixCableEnd(sockdir / "a.sock", sockdir / "c.sock")
    (sockdir / "x").write_text("not a socket")
    with pytest.raises(CableError, match="not a socket"):
        UnixCableEnd(sockdir / "x", sockdir / "b.sock")
    a.close()


def test_datagrams_from_strangers_are_ignored(sockdir) -> None:
    a = UnixCableEnd(sockdir / "a.sock", sockdir / "b.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(sockdir / "evil.sock"))
    # no peer yet (not connected): the end itself ignores other senders
    s.sendto(make_frame(payload=b"evil"), str(sockdir / "a.sock"))
    assert a.recv_frames() == [] and a.rx_foreign == 1
    b = UnixCableEnd(sockdir / "b.sock", sockdir / "a.sock")
    a.recv_frames()
    assert a.link_up
    # connected to its peer: the kernel refuses everyone else
    with pytest.raises(PermissionError):
        s.sendto(make_frame(payload=b"evil"), str(sockdir / "a.sock"))
    b.send(make_frame(payload=b"good"))
    assert a.recv_frames() == [make_frame(payload=b"good")]
    s.close()
    a.close()
    b.close()


def test_backpressure_and_wakeup(sockdir) -> None:
    """The connected pair queues up to the sender's socket buffer; a refused sender's
    descriptor becomes readable once the receiver has read (the socket polls writable)."""
    a = UnixCableEnd(sockdir / "a.sock", sockdir / "b.sock")
    b = UnixCableEnd(sockdir / "b.sock", sockdir / "a.sock")
    a.recv_frames()
    f = make_frame(size=1518)
    n = 0
    while b.send(f):
        n += 1
        assert n < 100000
    assert n > 10  # more than net.unix.max_dgram_qlen: the pair is connected both ways
    assert not b.writable() and b.tx_refused == 1
    assert not b.send(f) and b.tx_refused == 2
    got: list[bytes] = []
    while len(got) < n:
        batch = a.recv_frames()
        assert batch
        got += batch
    assert got == [f] * n
    assert readable(b, 5)
    assert b.recv_frames() == [] and b.writable()
    assert b.send(f)
    a.close()
    b.close()


PEER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, sys.argv[3])
    from nicemu.cable.unix import UnixCableEnd
    end = UnixCableEnd(sys.argv[1], sys.argv[2])
    print("up", end.link_up, flush=True)
    while True:
        time.sleep(1)
    """
)


def test_killed_peer_is_link_down_and_a_restarted_one_brings_it_back(sockdir) -> None:
    a = UnixCableEnd(sockdir / "a.sock", sockdir / "b.sock")
    procs = []
    try:
        for round_ in range(2):
            p = subprocess.Popen([sys.executable, "-c", PEER_SCRIPT, str(sockdir / "b.sock"),
                                  str(sockdir / "a.sock"), ROOT], stdout=subprocess.PIPE, text=True)
            procs.append(p)
            assert p.stdout.readline().strip() == "up True"
            assert readable(a, 10)
            a.recv_frames()
            assert a.link_up, f"round {round_}: no link after the peer's hello"
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)
            # the stale socket file remains; the next send finds nobody listening
            assert a.send(make_frame())
            assert not a.link_up
            assert readable(a)  # the link change wakes the loop
            a.recv_frames()
    finally:
        reap(procs)
        a.close()


def test_two_processes_with_devices_exchange_frames(sockdir) -> None:
    a = UnixCableEnd(sockdir / "a.sock", sockdir / "b.sock")
    frames = [make_frame(dst=PEER_BYTES, src=MAC_BYTES, payload=i.to_bytes(2, "big") * 30, fcs=False)[:100]
              for i in range(100)]
    opts = {"path": str(sockdir / "b.sock"), "peer": str(sockdir / "a.sock")}
    child_got, echoes, ready = echo_through_child(a, "unix", opts, frames)
    assert ready["link"] is True
    assert [g[:-4] for g in child_got] == frames
    assert [e[:-4] for e in echoes] == [f[6:12] + f[0:6] + f[12:] for f in frames]
    a.recv_frames()
    assert not a.link_up  # the child said bye
    a.close()
    assert not sockdir.exists()  # both sockets gone, and the directory the cable made


PULSING_PEER = textwrap.dedent(
    """
    import select, sys, time
    sys.path.insert(0, sys.argv[3])
    from nicemu.cable.unix import UnixCableEnd
    end = UnixCableEnd(sys.argv[1], sys.argv[2], pulse_ms=20)
    print("start", end.link_up, flush=True)
    up = end.link_up
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        select.select([end.fileno()], [], [], 1)
        for f in end.recv_frames():
            end.send(f[::-1])
        if end.link_up != up:
            up = end.link_up
            print("link", up, flush=True)
    """
)


def test_idle_end_notices_a_killed_peer_and_relinks_with_its_successor(sockdir) -> None:
    """Link pulses: with no traffic, a peer killed by kill -9 is noticed within a pulse; its
    restarted successor (refused by the kernel while we were still associated with the dead
    one) is reached on a later pulse, and frames flow again."""
    args = [sys.executable, "-c", PULSING_PEER, str(sockdir / "b.sock"), str(sockdir / "a.sock"), ROOT]
    a = UnixCableEnd(sockdir / "a.sock", sockdir / "b.sock", pulse_ms=20)
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, text=True)]
    try:
        assert procs[0].stdout.readline().split() == ["start", "True"]
        assert readable(a, 5)
        a.recv_frames()
        assert a.link_up
        os.kill(procs[0].pid, signal.SIGKILL)
        procs[0].wait(10)
        # a successor starts at once; we are still associated with the dead peer
        procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, text=True))
        first = procs[1].stdout.readline().split()
        assert first[0] == "start"
        deadline = time.monotonic() + 20
        saw_down = False
        while time.monotonic() < deadline:
            readable(a, 0.5)
            a.recv_frames()
            saw_down |= not a.link_up
            if saw_down and a.link_up:
                break
        assert saw_down and a.link_up, "the link did not go down and come back"
        if first[1] == "False":
            assert procs[1].stdout.readline().split() == ["link", "True"]
        f = make_frame(payload=b"again")
        assert a.send(f)
        got: list[bytes] = []
        while not got and time.monotonic() < deadline:
            readable(a, 0.5)
            got += a.recv_frames()
        assert got == [f[::-1]]
    finally:
        reap(procs)
        a.close()
