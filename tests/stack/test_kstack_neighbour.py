"""kstack.neighbour + arp: NUD states and their timers, the resolution queue and table
limits, statistics; a fake clock drives every transition."""

from kstack.neighbour import (NUD_DELAY, NUD_FAILED, NUD_INCOMPLETE, NUD_PROBE, NUD_REACHABLE,
                              NUD_STALE)
from kstack.sock import SOCK_DGRAM
from kstack.stack import Sysctl
from kstack_fakes import MS, S
from kstack_fakes import net, pair  # noqa: F401 (fixtures)
from wire.arp import ARPOP_REPLY, ARPOP_REQUEST, ArpPacket
from wire.ipv4 import addr_to_int

B = addr_to_int("198.18.0.2")


def arps(hub, op=None):
    out = []
    for sender, f in hub.log:
        if f[12:14] == b"\x08\x06":
            p = ArpPacket.parse(f[14:])
            if op is None or p.op == op:
                out.append((sender, p, f[:6]))
    return out


def test_resolve_both_ways_then_age(net, pair):
    a, b = pair
    sb = b.socket(SOCK_DGRAM)
    sb.bind(("0.0.0.0", 9))  # so that b sends nothing back (no port unreachable)
    sa = a.socket(SOCK_DGRAM)
    sa.sendmsg(b"x", ("198.18.0.2", 9))
    n = a.inet.neigh.entries[(a.dev.ifindex, B)]
    assert n.nud_state == NUD_INCOMPLETE and len(n.arp_queue) == 1
    net.settle()
    assert n.nud_state == NUD_REACHABLE and n.ha == b.dev.dev_addr and not n.arp_queue
    # b learned a from the request to it: STALE (neigh_event_ns), not REACHABLE
    nb = b.inet.neigh.entries[(b.dev.ifindex, addr_to_int("198.18.0.1"))]
    assert nb.nud_state == NUD_STALE
    req = arps(net.hub("lan"), ARPOP_REQUEST)
    assert req[-1][2] == b"\xff" * 6  # the first solicitation is broadcast
    # REACHABLE -> STALE after reachable_time when unused
    net.advance(2 * a.stack.sysctl.neigh_base_reachable_ms * MS)
    assert n.nud_state == NUD_STALE
    # using a STALE entry sends at once and moves to DELAY, then PROBE (unicast), then REACHABLE
    sa.sendmsg(b"y", ("198.18.0.2", 9))
    assert n.nud_state == NUD_DELAY
    before = len(arps(net.hub("lan"), ARPOP_REQUEST))
    net.t[0] += a.stack.sysctl.neigh_delay_first_probe_ms * MS + 1
    a.stack.run_timers(net.t[0])
    assert n.nud_state == NUD_PROBE
    net.settle()
    reqs = arps(net.hub("lan"), ARPOP_REQUEST)
    assert len(reqs) == before + 1 and reqs[-1][2] == b.dev.dev_addr  # unicast probe
    assert n.nud_state == NUD_REACHABLE
    st = a.inet.neigh_stats()
    assert st["allocs"] == 1 and st["res_failed"] == 0 and st["lookups"] >= 1
    sa.close()
    sb.close()


def test_incomplete_fails_after_probes_and_drops_queue(net):
    a = net.host("a", "198.18.0.1/24")
    net.settle()
    s = a.socket(SOCK_DGRAM)
    for _ in range(3):
        s.sendmsg(b"x", ("198.18.0.9", 9))
    n = a.inet.neigh.entries[(a.dev.ifindex, addr_to_int("198.18.0.9"))]
    net.advance(10 * S)
    assert n.nud_state == NUD_FAILED
    reqs = [p for _, p, _ in arps(net.hub("lan"), ARPOP_REQUEST) if p.tpa == addr_to_int("198.18.0.9")]
    assert len(reqs) == a.stack.sysctl.neigh_mcast_solicit  # 3 broadcasts, then FAILED
    assert a.stack.pool.drops["NEIGH_FAILED"] == 3
    assert a.inet.neigh_stats()["res_failed"] == 1
    s.close()


def test_resolution_queue_is_bounded(net):
    sc = Sysctl(neigh_queue_len_bytes=3 * 800)  # three 1-byte datagrams (truesize 768 each)
    a = net.host("a", "198.18.0.1/24", sysctl=sc)
    net.settle()
    s = a.socket(SOCK_DGRAM)
    for i in range(10):
        s.sendmsg(bytes([i]), ("198.18.0.9", 9))
    n = a.inet.neigh.entries[(a.dev.ifindex, addr_to_int("198.18.0.9"))]
    assert len(n.arp_queue) <= 3
    assert a.stack.pool.drops["NEIGH_QUEUEFULL"] == 10 - len(n.arp_queue)
    assert a.inet.neigh_stats()["unresolved_discards"] == 10 - len(n.arp_queue)
    # the newest wait (the oldest were dropped)
    assert n.arp_queue[-1].buf[n.arp_queue[-1].data + 28] == 9
    s.close()


def test_table_limit_and_forced_gc(net):
    sc = Sysctl(neigh_gc_thresh3=8)
    a = net.host("a", "198.18.0.1/24", sysctl=sc)
    net.settle()
    s = a.socket(SOCK_DGRAM)
    for i in range(8):
        s.sendmsg(b"x", (f"198.18.0.{100 + i}", 9))
    net.advance(5 * S)  # all FAILED now: collectable
    assert all(n.nud_state == NUD_FAILED for n in a.inet.neigh.entries.values())
    s.sendmsg(b"x", ("198.18.0.200", 9))
    st = a.inet.neigh_stats()
    assert st["forced_gc_runs"] == 1 and len(a.inet.neigh.entries) <= 8
    # now fill with entries in timers (INCOMPLETE): not collectable -> table full
    for i in range(20):
        s.sendmsg(b"x", (f"198.18.0.{10 + i}", 9))
    assert len(a.inet.neigh.entries) <= 8
    assert a.inet.neigh_stats()["table_fulls"] > 0
    assert a.stack.pool.drops["NEIGH_CREATEFAIL"] > 0
    s.close()


def test_locktime_keeps_first_answer(net, pair):
    a, b = pair
    s = a.socket(SOCK_DGRAM)
    s.sendmsg(b"x", ("198.18.0.2", 9))
    net.settle()
    n = a.inet.neigh.entries[(a.dev.ifindex, B)]
    # a forged reply right after (inside locktime) with another MAC does not replace it
    forged = ArpPacket(ARPOP_REPLY, b"\x52\x54\x00\xee\xee\xee", B, a.dev.dev_addr, addr_to_int("198.18.0.1")).emit()
    a.dev.receive(a.dev.dev_addr + b"\x52\x54\x00\xee\xee\xee" + b"\x08\x06" + forged)
    assert n.ha == b.dev.dev_addr
    # after locktime it does (RFC 826 merge: the newest word wins)
    net.t[0] += 2 * S
    a.dev.receive(a.dev.dev_addr + b"\x52\x54\x00\xee\xee\xee" + b"\x08\x06" + forged)
    assert n.ha == b"\x52\x54\x00\xee\xee\xee"
    s.close()


def test_stats_and_show(net):
    a = net.host("a", "198.18.0.1/24")
    net.host("b", "198.18.0.2/24")
    net.settle()
    s = a.socket(SOCK_DGRAM)
    s.sendmsg(b"x", ("198.18.0.2", 9))
    net.settle()
    rows = a.inet.neighbours()
    assert rows == [{"dst": "198.18.0.2", "dev": "eth0", "lladdr": "52:54:00:00:00:02",
                     "state": "REACHABLE", "probes": rows[0]["probes"], "queued": 0}]
    s.close()


def test_probe_fails_when_peer_goes_away(net, pair):
    a, b = pair
    s = a.socket(SOCK_DGRAM)
    s.sendmsg(b"x", ("198.18.0.2", 9))
    net.settle()
    n = a.inet.neigh.entries[(a.dev.ifindex, B)]
    assert n.nud_state == NUD_REACHABLE
    net.hub("lan").devs.remove(b.dev)  # b is unplugged
    net.advance(2 * a.stack.sysctl.neigh_base_reachable_ms * MS)
    assert n.nud_state == NUD_STALE
    s.sendmsg(b"y", ("198.18.0.2", 9))  # DELAY, then PROBE: unicast probes to the old address
    before = len(arps(net.hub("lan"), ARPOP_REQUEST))
    net.advance(20 * S)
    probes = arps(net.hub("lan"), ARPOP_REQUEST)[before:]
    assert len(probes) == a.stack.sysctl.neigh_ucast_solicit
    assert all(dst == b.dev.dev_addr for _, _, dst in probes)
    assert n.nud_state == NUD_FAILED and a.inet.neigh_stats()["res_failed"] == 1
    # the next packet starts over: INCOMPLETE, broadcast
    s.sendmsg(b"z", ("198.18.0.2", 9))
    assert n.nud_state == NUD_INCOMPLETE
    net.settle()
    assert arps(net.hub("lan"))[-1][2] == b"\xff" * 6
    s.close()


def test_permanent_entry_needs_no_arp(net, pair):
    a, b = pair
    a.inet.add_neighbour(a.dev, "198.18.0.2", "52:54:00:00:00:02")
    s = b.socket(SOCK_DGRAM)
    s.bind(("0.0.0.0", 9))
    c = a.socket(SOCK_DGRAM)
    c.sendmsg(b"static", ("198.18.0.2", 9))
    net.settle()
    assert s.recvmsg(10)[0] == b"static"
    assert not [p for _, p, _ in arps(net.hub("lan"), ARPOP_REQUEST) if p.spa != p.tpa]
    net.advance(200 * S)
    a.inet.flush_neighbours()
    assert a.inet.neighbours()[0]["state"] == "PERMANENT"
    s.close()
    c.close()
