"""kstack.arp: RFC 826 reception (merge flag), replies only for our addresses, gratuitous ARP,
and hostile input dropped ARP_INVALID without an exception."""
import pytest

from kstack.neighbour import NUD_STALE
from kstack_fakes import net, pair  # noqa: F401 (fixtures)
from wire.arp import ARPOP_REPLY, ARPOP_REQUEST, ArpPacket
from wire.ipv4 import addr_to_int

A = addr_to_int("198.18.0.1")
PEER_MAC = b"\x52\x54\x00\xaa\xbb\xcc"
PEER = addr_to_int("198.18.0.50")


def frame(dst: bytes, pkt: bytes, src: bytes = PEER_MAC) -> bytes:
    return dst + src + b"\x08\x06" + pkt


def test_request_for_us_replies_and_creates_entry(net):
    a = net.host("a", "198.18.0.1/24")
    net.settle()
    a.dev.take()
    a.dev.receive(frame(b"\xff" * 6, ArpPacket(ARPOP_REQUEST, PEER_MAC, PEER, bytes(6), A).emit() + bytes(18)))
    net.settle()
    out = net.hub("lan").log[-1][1]
    assert out[:6] == PEER_MAC and out[12:14] == b"\x08\x06"
    rep = ArpPacket.parse(out[14:])
    assert rep.op == ARPOP_REPLY and rep.sha == a.dev.dev_addr and rep.spa == A
    assert rep.tha == PEER_MAC and rep.tpa == PEER
    n = a.inet.neigh.entries[(a.dev.ifindex, PEER)]
    assert n.nud_state == NUD_STALE and n.ha == PEER_MAC


def test_request_for_another_creates_nothing(net):
    a = net.host("a", "198.18.0.1/24")
    net.settle()
    n_before = len(net.hub("lan").log)
    a.dev.receive(frame(b"\xff" * 6, ArpPacket(ARPOP_REQUEST, PEER_MAC, PEER, bytes(6), A + 5).emit()))
    net.settle()
    assert len(net.hub("lan").log) == n_before  # no reply
    assert not a.inet.neigh.entries  # merge flag false and not for us: nothing learned
    # an unsolicited reply creates nothing either (arp_accept=0)
    a.dev.receive(frame(a.dev.dev_addr, ArpPacket(ARPOP_REPLY, PEER_MAC, PEER, a.dev.dev_addr, A).emit()))
    assert not a.inet.neigh.entries


def test_gratuitous_on_address_and_carrier(net):
    a = net.host("a", "198.18.0.1/24")
    net.settle()
    g = [ArpPacket.parse(f[14:]) for _, f in net.hub("lan").log if f[12:14] == b"\x08\x06"]
    assert any(p.op == ARPOP_REQUEST and p.spa == p.tpa == A for p in g)
    a.dev.netif_carrier_off()
    a.dev.netif_carrier_on()
    net.settle()
    g2 = [ArpPacket.parse(f[14:]) for _, f in net.hub("lan").log if f[12:14] == b"\x08\x06"]
    assert len(g2) == len(g) + 1 and a.inet.arp.stats["gratuitous_out"] == 2


def test_gratuitous_updates_existing_entry(net, pair):
    a, b = pair
    s = a.socket(2)
    s.sendmsg(b"x", ("198.18.0.2", 9))
    net.settle()
    n = a.inet.neigh.entries[(a.dev.ifindex, addr_to_int("198.18.0.2"))]
    new_mac = b"\x52\x54\x00\x99\x99\x99"
    garp = ArpPacket(ARPOP_REQUEST, new_mac, addr_to_int("198.18.0.2"), bytes(6), addr_to_int("198.18.0.2")).emit()
    a.dev.receive(frame(b"\xff" * 6, garp, new_mac))  # gratuitous: overrides within locktime
    assert n.ha == new_mac and n.nud_state == NUD_STALE
    s.close()


@pytest.mark.parametrize("pkt", [
    b"",
    b"\x00\x01\x08\x00\x06\x04\x00\x01",  # header only
    ArpPacket(ARPOP_REQUEST, PEER_MAC, PEER, bytes(6), A).emit()[:27],  # truncated
    ArpPacket(ARPOP_REQUEST, PEER_MAC, PEER, bytes(6), A, hrd=6).emit(),  # not Ethernet
    ArpPacket(ARPOP_REQUEST, PEER_MAC, PEER, bytes(6), A, pro=0x86DD).emit(),  # not IPv4
    ArpPacket(ARPOP_REQUEST, PEER_MAC, PEER, bytes(6), A, hln=8).emit(),  # lengths lie
    ArpPacket(9, PEER_MAC, PEER, bytes(6), A).emit(),  # unknown opcode
    ArpPacket(ARPOP_REQUEST, b"\x01\0\0\0\0\1", PEER, bytes(6), A).emit(),  # multicast sender
    ArpPacket(ARPOP_REQUEST, PEER_MAC, 0xE0000001, bytes(6), A).emit(),  # multicast sip
    ArpPacket(ARPOP_REQUEST, PEER_MAC, PEER, bytes(6), 0x7F000001).emit(),  # loopback target
])
def test_invalid_dropped_and_counted(net, pkt):
    a = net.host("a", "198.18.0.1/24")
    net.settle()
    n_log = len(net.hub("lan").log)
    a.dev.receive(frame(b"\xff" * 6, pkt))
    net.settle()
    assert len(net.hub("lan").log) == n_log
    assert not a.inet.neigh.entries
    dropped = a.stack.pool.drops
    assert dropped["ARP_INVALID"] + dropped["MAC_HDR"] == 1


def test_address_probe_answered_without_learning(net):
    a = net.host("a", "198.18.0.1/24")
    net.settle()
    probe = ArpPacket(ARPOP_REQUEST, PEER_MAC, 0, bytes(6), A).emit()  # RFC 5227 probe
    a.dev.receive(frame(b"\xff" * 6, probe))
    net.settle()
    rep = ArpPacket.parse(net.hub("lan").log[-1][1][14:])
    assert rep.op == ARPOP_REPLY and rep.spa == A
    assert not a.inet.neigh.entries
