"""Hostile input into a whole stack: seeded mutations of valid ARP, IPv4, UDP, ICMP frames and
fragments. Nothing escapes as an exception, every skb is freed exactly once, every drop has a
reason, and memory stays bounded."""
import random
import struct

import pytest

from kstack.sock import IPPROTO_ICMP, SOCK_DGRAM, SOCK_RAW
from kstack.stack import Sysctl
from kstack_fakes import FakeNet, ip_frame, udp_payload
from wire.arp import ARPOP_REQUEST, ArpPacket
from wire.icmp import IcmpMessage
from wire.ipv4 import addr_to_int


def seeds(n):
    return [pytest.param(s, id=f"seed{s}") for s in range(n)]


@pytest.mark.parametrize("seed", seeds(4))
def test_mutated_frames(seed):
    rnd = random.Random(seed)
    net = FakeNet()
    a = net.host("a", "198.18.0.1/24")
    b = net.host("b", "198.18.0.2/24", sysctl=Sysctl(ip_forward=bool(seed & 1),
                                                     ipfrag_high_thresh=300_000,
                                                     ipfrag_low_thresh=200_000))
    net.settle()
    u = b.socket(SOCK_DGRAM)
    u.bind(("0.0.0.0", 7))
    r = b.socket(SOCK_RAW, IPPROTO_ICMP)
    mac = (b.dev.dev_addr, a.dev.dev_addr)
    A, B = "198.18.0.1", "198.18.0.2"
    valid = [
        ip_frame(*mac, A, B, 17, udp_payload(A, B, 5, 7, b"v" * 40)),
        ip_frame(*mac, A, B, 17, udp_payload(A, B, 5, 9, b"v" * 40)),
        ip_frame(*mac, A, B, 1, IcmpMessage.echo(1, 2, b"e" * 30).emit()),
        ip_frame(*mac, A, B, 17, b"f" * 600, ident=3, flags_frag=0x2000),
        ip_frame(*mac, A, B, 17, b"g" * 600, ident=3, flags_frag=75),
        ip_frame(*mac, A, "198.19.0.1", 17, b"x" * 30, ttl=1),
        b"\xff" * 6 + a.dev.dev_addr + b"\x08\x06" + ArpPacket(
            ARPOP_REQUEST, a.dev.dev_addr, addr_to_int(A), bytes(6), addr_to_int(B)).emit(),
    ]
    peak = 0
    for i in range(1500):
        f = bytearray(rnd.choice(valid))
        kind = rnd.randrange(5)
        if kind == 0:
            for _ in range(rnd.randint(1, 4)):
                f[rnd.randrange(14, len(f))] = rnd.randrange(256)
        elif kind == 1:
            f = f[:rnd.randrange(0, len(f))]
        elif kind == 2 and len(f) > 20:
            struct.pack_into("!H", f, 16, rnd.randrange(65536))  # total length lies
            # keep the header checksum right so the lie is what gets tested
            f[24:26] = b"\0\0"
            s = sum(struct.unpack("!10H", bytes(f[14:34])))
            while s >> 16:
                s = (s & 0xFFFF) + (s >> 16)
            f[24:26] = struct.pack("!H", ~s & 0xFFFF)
        elif kind == 3:
            f += bytes(rnd.randrange(64))
        b.dev.receive(bytes(f))
        if rnd.random() < 0.05:
            net.t[0] += rnd.randrange(10**9)
        net.settle()
        while u.poll() & 1:
            u.recvmsg(70000)
        while r.poll() & 1:
            r.recvmsg(70000)
        peak = max(peak, b.inet.frags.mem)
    assert peak <= 300_000
    pool = b.stack.pool
    assert None not in pool.drops
    u.close()
    r.close()
    net.advance(120 * 10**9)
    net.shutdown()
    assert net.live() == 0
    assert pool.allocs + pool.clones == pool.frees
