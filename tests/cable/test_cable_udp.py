"""The UDP cable (QEMU's socket,udp= netdev): addresses, frames both ways, only the peer is
heard, and two real processes with a device each. Loopback (127.0.0.1) only."""
from __future__ import annotations

import select
import socket

import pytest
from cable_child import echo_through_child
from conftest import MAC_BYTES, PEER_MAC, make_frame

from nicemu.cable import make_cable
from nicemu.cable.base import CableError
from nicemu.cable.udp import UdpCableEnd, parse_address

PEER_BYTES = bytes.fromhex(PEER_MAC.replace(":", ""))


def readable(end, timeout: float = 0) -> bool:
    return bool(select.select([end.fileno()], [], [], timeout)[0])


@pytest.fixture
def pair():
    a = UdpCableEnd(local="127.0.0.1:0")
    b = UdpCableEnd(local="127.0.0.1:0", remote=a.local_address)
    a.set_remote(b.local_address)
    yield a, b
    a.close()
    b.close()


@pytest.mark.parametrize(
    "text, match",
    [("127.0.0.1", "HOST:PORT"), ("127.0.0.1:x", "not a number"), ("127.0.0.1:70000", "out of range"),
     (5, "HOST:PORT"), (("127.0.0.1", "5"), "not a number")],
)
def test_bad_addresses(text, match) -> None:
    with pytest.raises(ValueError, match=match):
        parse_address(text)


def test_address_forms() -> None:
    assert parse_address("127.0.0.1:5555") == (socket.AF_INET, ("127.0.0.1", 5555))
    assert parse_address(("127.0.0.1", 5555)) == (socket.AF_INET, ("127.0.0.1", 5555))
    fam, addr = parse_address("[::1]:5555")
    assert fam == socket.AF_INET6 and addr[:2] == ("::1", 5555)


def test_bind_conflict_is_a_clear_error(pair) -> None:
    a, _ = pair
    with pytest.raises(CableError, match="cannot bind"):
        UdpCableEnd(local=a.local_address)


def test_frames_both_ways(pair) -> None:
    a, b = pair
    assert a.link_up and b.link_up
    fs = [make_frame(payload=bytes([i]) * 10, size=64 + i) for i in range(10)]
    for f in fs:
        assert a.send(f)
    assert readable(b, 5)
    got = []
    while len(got) < 10 and readable(b, 5):
        got += b.recv_frames()
    assert got == fs
    big = make_frame(size=9018)  # a jumbo frame still fits one datagram
    assert b.send(big)
    assert readable(a, 5) and a.recv_frames() == [big]


def test_no_remote_means_frames_are_dropped() -> None:
    a = make_cable("udp", local="127.0.0.1:0")
    assert a.send(make_frame()) and a.tx_dropped == 1
    a.close()


def test_only_the_peer_is_heard(pair) -> None:
    a, b = pair
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.bind(("127.0.0.1", 0))
    host, port = a.local_address.split(":")
    stranger.sendto(make_frame(payload=b"evil"), (host, int(port)))
    b.send(make_frame(payload=b"good"))
    got = []
    while len(got) < 1 and readable(a, 5):
        got += a.recv_frames()
    assert got == [make_frame(payload=b"good")]
    assert a.rx_foreign == 1
    stranger.close()


def test_two_processes_with_devices_exchange_frames() -> None:
    a = UdpCableEnd(local="127.0.0.1:0")
    # reserve the child's port: bind, read it, close, hand it over (loopback, no one else uses it)
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    child_addr = f"127.0.0.1:{probe.getsockname()[1]}"
    probe.close()
    a.set_remote(child_addr)
    frames = [make_frame(dst=PEER_BYTES, src=MAC_BYTES, payload=i.to_bytes(2, "big") * 30, fcs=False)[:200]
              for i in range(100)]
    child_got, echoes, ready = echo_through_child(
        a, "udp", {"local": child_addr, "remote": a.local_address}, frames
    )
    assert [g[:-4] for g in child_got] == frames
    assert [e[:-4] for e in echoes] == [f[6:12] + f[0:6] + f[12:] for f in frames]
    a.close()
