"""The connected UDP socket's cached send state (sk_dst_cache + hh_cache, kstack/dstgen.py):
each cause of change (a route, the neighbour's state or address, its deletion, the device's
MTU, offloads, flags and qdisc, a socket option) bumps the generation, and the send after it
never uses the stale cache: the compiled send, its twin and the layered path ("off", which
caches nothing) put the same frames on the wire with the same counters and sk_buff
accounting, and raise the same errors, when the cause is changed between two fast sends."""
from __future__ import annotations

import errno

import pytest

from kstack import txfast
from kstack.dstgen import DST_GENID
from kstack.neighbour import (NEIGH_UPDATE_F_ADMIN, NEIGH_UPDATE_F_OVERRIDE, NUD_DELAY, NUD_FAILED,
                              NUD_REACHABLE, NUD_STALE)
from kstack.netdevice import NetdevFeatures
from kstack.qdisc import make_qdisc
from kstack.sock import IP_TOS, IP_TTL, IPPROTO_IP, SO_SNDBUF, SOCK_DGRAM, SOL_SOCKET
from tests.kstack_fakes import FakeNet

MODES = ["c", "py", "off"]
NEW_MAC = b"\x52\x54\x00\x99\x99\x99"


def _route_change(net, a, s):
    a.inet.fib.remove(lambda r: r.plen == 24 and r.proto == "kernel")


def _neigh_stale(net, a, s):
    net.advance(120 * 10**9)  # past reachable_time: the timer turns REACHABLE into STALE


def _neigh_set_stale(net, a, s):
    n = s._dst.neigh
    n._set_state(NUD_STALE, net.clock())


def _neigh_failed(net, a, s):
    n = s._dst.neigh
    n.update(None, NUD_FAILED, NEIGH_UPDATE_F_ADMIN, net.clock())


def _neigh_deleted(net, a, s):
    a.inet.neigh.delete(s._dst.neigh)


def _neigh_lladdr(net, a, s):
    n = s._dst.neigh
    n.update(NEW_MAC, NUD_REACHABLE, NEIGH_UPDATE_F_OVERRIDE | NEIGH_UPDATE_F_ADMIN, net.clock())


def _dev_mtu(net, a, s):
    a.dev.mtu = 576


def _dev_csum(net, a, s):
    a.dev.features ^= NetdevFeatures.IP_CSUM


def _dev_down(net, a, s):
    a.stack.dev_close(a.dev)


def _dev_qdisc(net, a, s):
    a.dev.qdisc = make_qdisc("pfifo", a.dev)  # not pfifo_fast: the layered path's qdisc


def _sock_tos_ttl(net, a, s):
    s.setsockopt(IPPROTO_IP, IP_TOS, 0xB8)
    s.setsockopt(IPPROTO_IP, IP_TTL, 3)


def _sock_sndbuf(net, a, s):
    s.setsockopt(SOL_SOCKET, SO_SNDBUF, 1)  # the minimum: a few skbs in flight
    a.dev.busy = True  # the driver keeps them: the sends find SO_SNDBUF full
    for _ in range(s.sndbuf // 512):
        _send(s, b"fill")


CAUSES = {"route": _route_change, "neigh_timer_stale": _neigh_stale, "neigh_stale": _neigh_set_stale,
          "neigh_failed": _neigh_failed, "neigh_deleted": _neigh_deleted, "neigh_lladdr": _neigh_lladdr,
          "dev_mtu": _dev_mtu, "dev_csum": _dev_csum, "dev_down": _dev_down, "dev_qdisc": _dev_qdisc,
          "sock_tos_ttl": _sock_tos_ttl, "sock_sndbuf": _sock_sndbuf}


def _send(s, data):
    try:
        return s.sendmsg(data, None)
    except OSError as e:
        return ("error", e.errno)


def _run(mode: str, cause) -> dict:
    """Fast sends, the cause, then more sends: what a's device sent, the send results, a's
    counters and the state the neighbour ended in."""
    net = FakeNet()
    a = net.host("a", "198.18.0.1/24", tx_csum=True)
    b = net.host("b", "198.18.0.2/24")
    rx = b.socket(SOCK_DGRAM)
    rx.bind(("0.0.0.0", 9000))
    s = a.socket(SOCK_DGRAM)
    s.bind(("0.0.0.0", 5555))
    s.connect(("198.18.0.2", 9000))
    s._tx_fast = txfast.select(mode)
    s.sendmsg(b"resolve", None)  # ARP: the neighbour becomes REACHABLE
    net.settle()
    results = [_send(s, b"before-%d" % k) for k in range(3)]  # fast: the cache is filled
    if mode != "off":
        assert s._dst.tx_gen is DST_GENID.value, "the fast sends filled the cache"
    gen = DST_GENID.value
    cause(net, a, s)
    assert DST_GENID.value != gen, "the cause bumped the generation"
    results += [_send(s, b"after") for _ in range(2)]
    results.append(_send(s, b"y" * 1000))
    n = s._dst.neigh if s._dst is not None else None
    state = (n.nud_state, n.ha) if n is not None else None
    frames = list(a.dev.sent)  # what a sent since the network last carried (the hub takes them)
    a.dev.busy = False
    a.dev.netif_wake_queue()
    net.settle()
    st = a.stack
    q = a.dev.qdisc.stats()
    counters = {"snmp": dict(st.snmp), "skb": st.pool.stats(), "drops": dict(st.pool.drops),
                "neigh": dict(a.inet.neigh.stats), "qdisc": q, "dev": a.dev.ndo_get_stats64(),
                "partial": a.dev.partial_sent, "wmem": s.wmem}
    return {"frames": frames, "results": results, "counters": counters, "state": state,
            "all_frames": list(a.dev.sent)}


@pytest.mark.parametrize("cause", sorted(CAUSES))
def test_a_change_between_sends_never_uses_the_stale_cache(cause):
    runs = {m: _run(m, CAUSES[cause]) for m in MODES}
    ref = runs["off"]
    for m in ("c", "py"):
        for k in ref:
            assert runs[m][k] == ref[k], f"{cause}: {m} differs from the layered path in {k}"


def test_the_causes_change_what_is_sent():
    """The comparisons above are not vacuous: each cause changes the frames or the results."""
    r = _run("c", _neigh_lladdr)
    assert r["frames"][-1][:6] == NEW_MAC and r["frames"][2][:6] != NEW_MAC  # [0:3] before
    r = _run("c", _sock_tos_ttl)
    assert r["frames"][-1][15] == 0xB8 and r["frames"][-1][22] == 3
    r = _run("c", _dev_mtu)
    assert len(r["frames"]) > 6 and max(len(f) for f in r["frames"][3:]) <= 14 + 576  # fragmented
    r = _run("c", _neigh_stale)
    assert r["state"][0] == NUD_DELAY  # __neigh_event_send ran on the slow path
    r = _run("c", _route_change)
    assert r["results"][3:] == [("error", errno.ENETUNREACH)] * 3
    r = _run("c", _sock_sndbuf)
    assert ("error", errno.EAGAIN) in r["results"][3:]


def test_steady_sends_do_not_bump_the_generation():
    """A run of sends (and the driver freeing their skbs) leaves the cache valid: the fill
    runs once, not per datagram."""
    net = FakeNet()
    a = net.host("a", "198.18.0.1/24")
    b = net.host("b", "198.18.0.2/24")
    rx = b.socket(SOCK_DGRAM)
    rx.bind(("0.0.0.0", 9000))
    s = a.socket(SOCK_DGRAM)
    s.connect(("198.18.0.2", 9000))
    s._tx_fast = txfast.select("c")
    s.sendmsg(b"resolve", None)
    net.settle()
    s.sendmsg(b"fill", None)
    gen = DST_GENID.value
    for k in range(50):
        s.sendmsg(b"%d" % k, None)
    net.settle()
    assert DST_GENID.value == gen and s._dst.tx_gen is gen
    got = 0
    while rx.poll() & 1:
        rx.recvmsg(100)
        got += 1
    assert got == 52
