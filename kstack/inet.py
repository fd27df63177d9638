"""IPv4 for one NetStack: addresses, routes, and the protocols wired together (Linux's
af_inet.c inet_init + devinet.c + fib_frontend.c).

    inet = install(stack)
    inet.add_address(dev, "198.18.0.1/24")     # + local, broadcast and connected routes,
                                               #   and a gratuitous ARP when the link is up
    inet.add_route("0.0.0.0/0", via="198.18.0.254")
    inet.route_get("198.19.0.9")               # `ip route get`
    inet.routes(), inet.addresses(), inet.neighbours()

install registers ARP and IPv4 with dev_add_pack, ICMP and UDP as IP protocols
(inet_add_protocol; TCP adds itself the same way through kstack.tcp_sock.install), and the
UDP, raw ICMP and TCP socket factories.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from kstack.arp import Arp
from kstack.dropreason import SkbDropReason
from kstack.icmp import Icmp
from kstack.ip_fragment import IpFragments
from kstack.ipv4 import Ipv4
from kstack.neighbour import NeighTable
from kstack.raw import RawTable, raw_socket
from kstack.route import (RT_SCOPE_HOST, RT_SCOPE_LINK, RTN_BROADCAST, RTN_LOCAL, Fib, FibResult,
                          Route)
from kstack.sock import IPPROTO_ICMP, IPPROTO_UDP, SOCK_DGRAM, SOCK_RAW
from kstack.udp import UdpTable, udp_socket
from wire.ethernet import EtherType
from wire.ipv4 import format_prefix, ntoa, parse_prefix, prefix_mask

if TYPE_CHECKING:
    from kstack.netdevice import NetDevice
    from kstack.stack import NetStack

__all__ = ["Inet", "IfAddr", "install", "MAX_ADDRESSES"]

MAX_ADDRESSES = 256  # per device

ProtoHandler = Callable[[Any], None]
ErrHandler = Callable[[int, int, bytes, int, int, int], None]


@dataclass(slots=True)
class IfAddr:
    """struct in_ifaddr."""

    addr: int
    plen: int
    dev: "NetDevice"

    @property
    def broadcast(self) -> int:
        return self.addr | (~prefix_mask(self.plen) & 0xFFFFFFFF)

    @property
    def network(self) -> int:
        return self.addr & prefix_mask(self.plen)

    def __str__(self) -> str:
        return format_prefix(self.addr, self.plen)


class Inet:
    def __init__(self, stack: "NetStack", seed: int = 0) -> None:
        self.stack = stack
        self.rng = random.Random(seed)
        self.ifaddrs: dict[int, list[IfAddr]] = {}  # ifindex -> addresses, primary first
        self.local_addrs: dict[int, "NetDevice"] = {}  # our addresses
        self.bcast_addrs: set[int] = set()  # subnet broadcasts of our addresses (/31, /32: none)
        self.protocols: dict[int, tuple[ProtoHandler, ErrHandler | None]] = {}
        self.fib = Fib()
        self.arp = Arp(self)
        self.ip = Ipv4(self)
        self.neigh = NeighTable(stack, self.arp.solicit, self.ip.neigh_xmit, seed)
        self.frags = IpFragments(self)
        self.icmp = Icmp(self)
        self.udp = UdpTable(self)
        self.raw = RawTable(self)
        self.tcp: Any = None  # kstack.tcp_sock.TcpTable, set by install

    # --- protocols --------------------------------------------------------------------------

    def add_protocol(self, proto: int, handler: ProtoHandler, err_handler: ErrHandler | None = None) -> None:
        """inet_add_protocol: `handler(skb)` gets datagrams for `proto` with skb.data at the
        transport header and must free them; `err_handler(src, dst, quote8, type, code, info)`
        gets the ICMP errors about datagrams it sent (src is ours, quote8 the first 8 bytes
        of its transport header)."""
        if proto in self.protocols:
            raise ValueError(f"IP protocol {proto} has a handler")
        self.protocols[proto] = (handler, err_handler)

    # --- addresses ----------------------------------------------------------------------------

    def is_local(self, addr: int) -> bool:
        return addr in self.local_addrs

    def dev_primary_addr(self, dev: "NetDevice", dst: int = 0) -> int:
        """inet_select_addr: the device's address on dst's subnet, else its first, else any."""
        lst = self.ifaddrs.get(dev.ifindex, ())
        for a in lst:
            if dst and (dst & prefix_mask(a.plen)) == a.network:
                return a.addr
        if lst:
            return lst[0].addr
        return next(iter(self.local_addrs), 0)

    def add_address(self, dev: "NetDevice", cidr: str) -> IfAddr:
        """`ip addr add CIDR dev DEV`: the address, its local and broadcast routes, the
        connected route, and a gratuitous ARP if the link is up."""
        addr, plen = parse_prefix(cidr)
        if dev.stack is not self.stack:
            raise ValueError(f"{dev.name} is not registered with this stack")
        lst = self.ifaddrs.setdefault(dev.ifindex, [])
        if any(a.addr == addr for a in lst):
            raise FileExistsError(17, f"{ntoa(addr)} exists on {dev.name}")
        if addr in self.local_addrs:
            raise FileExistsError(17, f"{ntoa(addr)} exists on {self.local_addrs[addr].name}")
        if len(lst) >= MAX_ADDRESSES:
            raise OSError(105, "too many addresses")
        ifa = IfAddr(addr, plen, dev)
        lst.append(ifa)
        self.local_addrs[addr] = dev
        self._ensure_routes(ifa)
        if dev.carrier:
            self.arp.gratuitous(dev, addr)
        return ifa

    def _ensure_routes(self, ifa: IfAddr) -> None:
        """The kernel routes of an address: local /32, subnet broadcast, connected prefix
        (one of each per subnet: a second address on a subnet shares them)."""
        dev, addr, plen = ifa.dev, ifa.addr, ifa.plen
        want = [Route(addr, 32, dev, type=RTN_LOCAL, scope=RT_SCOPE_HOST, prefsrc=addr, proto="kernel")]
        if plen < 31:
            self.bcast_addrs.add(ifa.broadcast)
            want.append(Route(ifa.broadcast, 32, dev, type=RTN_BROADCAST, scope=RT_SCOPE_LINK,
                              prefsrc=addr, proto="kernel"))
        if plen < 32:
            want.append(Route(ifa.network, plen, dev, scope=RT_SCOPE_LINK, prefsrc=addr, proto="kernel"))
        for r in want:
            table = self.fib.local if r.type != 1 else self.fib.main
            if not any(o.dev is dev and o.type == r.type and o.plen == r.plen and o.dst == r.dst
                       and o.proto == "kernel" for o in table.all()):
                self.fib.add(r)

    def del_address(self, dev: "NetDevice", cidr: str) -> None:
        addr, plen = parse_prefix(cidr)
        lst = self.ifaddrs.get(dev.ifindex, [])
        ifa = next((a for a in lst if a.addr == addr), None)
        if ifa is None:
            raise OSError(99, f"{ntoa(addr)} is not on {dev.name}")  # EADDRNOTAVAIL
        lst.remove(ifa)
        del self.local_addrs[addr]
        self.bcast_addrs.discard(ifa.broadcast)
        self.fib.remove(lambda r: r.dev is dev and r.prefsrc == addr and r.proto == "kernel")
        for other in self.ifaddrs.values():  # what another address on the subnet still needs
            for a in other:
                self._ensure_routes(a)

    def addresses(self) -> list[dict[str, Any]]:
        """`ip -4 addr`."""
        return [{"dev": a.dev.name, "addr": str(a), "broadcast": ntoa(a.broadcast) if a.plen < 31 else None}
                for lst in self.ifaddrs.values() for a in lst]

    # --- output for protocols ------------------------------------------------------------

    def output(self, skb: Any, dst: int, proto: int, src: int = 0, tos: int = 0,
               ttl: int = 0) -> bool:
        """Send a transport segment (`skb.data` at its header) to `dst`: route, IP header,
        fragmentation, neighbour. False when there is no route (the skb is dropped,
        IpOutNoRoutes); `src` 0 takes the route's preferred source."""
        res = self.ip.route_output(dst)
        if res is None:
            skb.drop(SkbDropReason.IP_OUTNOROUTES)
            return False
        self.ip.output(skb, src or res.src, dst, proto, res, tos=tos, ttl=ttl)
        return True

    # --- routes -------------------------------------------------------------------------------

    def add_route(self, prefix: str, via: str | None = None, dev: "NetDevice | None" = None,
                  metric: int = 0, src: str | None = None) -> Route:
        """`ip route add PREFIX [via GW] [dev DEV] [metric N] [src ADDR]`. A gateway must be
        on-link (covered by a connected route), as Linux checks."""
        if prefix == "default":
            prefix = "0.0.0.0/0"
        net, plen = parse_prefix(prefix)
        gw = parse_prefix(via)[0] if via else 0
        if gw:
            res = self.fib.lookup(gw)
            if res is None or res.route.gateway or res.type == RTN_LOCAL:
                raise OSError(101, f"gateway {via} is not on a connected network")  # ENETUNREACH
            if dev is not None and res.dev is not dev:
                raise OSError(101, f"gateway {via} is not reachable through {dev.name}")
            dev = res.dev
        if dev is None:
            raise ValueError("a route needs a gateway or a device")
        pref = parse_prefix(src)[0] if src else 0
        r = Route(net & prefix_mask(plen), plen, dev, gateway=gw, metric=metric,
                  scope=RT_SCOPE_LINK if not gw else 0, prefsrc=pref)
        self.fib.add(r)
        return r

    def del_route(self, prefix: str, via: str | None = None) -> int:
        net, plen = parse_prefix("0.0.0.0/0" if prefix == "default" else prefix)
        gw = parse_prefix(via)[0] if via else None
        return self.fib.remove(lambda r: r.dst == net & prefix_mask(plen) and r.plen == plen
                               and r.proto != "kernel" and (gw is None or r.gateway == gw))

    def routes(self, table: str = "main") -> list[str]:
        """`ip route` (or `ip route show table local`): one line per route."""
        return [r.describe() for r in self.fib.routes(table)]

    def limited_broadcast_route(self) -> FibResult | None:
        """Where 255.255.255.255 goes without a route for it: out of the first device with
        an address, from that address (Linux picks the device the same way when no output
        interface is given and the main table has nothing better)."""
        for lst in self.ifaddrs.values():
            if lst:
                a = lst[0]
                r = Route(0xFFFFFFFF, 32, a.dev, type=RTN_BROADCAST, scope=RT_SCOPE_LINK,
                          prefsrc=a.addr, proto="kernel")
                return FibResult(RTN_BROADCAST, a.dev, 0xFFFFFFFF, a.addr, r)
        return None

    def route_get(self, dst: str) -> FibResult | None:
        """`ip route get DST`."""
        return self.fib.lookup(parse_prefix(dst)[0])

    # --- neighbours ---------------------------------------------------------------------------

    def neighbours(self, stats: bool = False) -> list[dict[str, Any]]:
        """`ip neigh` (`ip -s neigh` with stats: the used/confirmed/updated ages)."""
        return self.neigh.show(self.stack.clock() if stats else None)

    def add_neighbour(self, dev: "NetDevice", addr: str, lladdr: str) -> None:
        """`ip neigh replace ADDR lladdr MAC dev DEV nud permanent`: a static entry (never
        probed, never collected)."""
        from wire.mac import parse_mac
        n = self.neigh.add_permanent(dev, parse_prefix(addr)[0], parse_mac(lladdr), self.stack.clock())
        if n is None:
            raise OSError(105, "the neighbour table is full")  # ENOBUFS

    def flush_neighbours(self, dev: "NetDevice | None" = None) -> None:
        """`ip neigh flush`: forget learned entries (permanent ones stay)."""
        for d in ([dev] if dev is not None else list(self.stack.devices.values())):
            self.neigh.flush_dev(d)

    def neigh_stats(self) -> dict[str, int]:
        """`ip -s ntable` / /proc/net/stat/arp_cache."""
        return dict(self.neigh.stats)

    # --- events -------------------------------------------------------------------------------

    def _carrier_changed(self, dev: "NetDevice", up: bool) -> None:
        """Link up: announce our addresses (gratuitous ARP). Link down: forget neighbours
        learned through it (neigh_carrier_down)."""
        if up:
            for a in self.ifaddrs.get(dev.ifindex, ()):
                self.arp.gratuitous(dev, a.addr)
        else:
            self.neigh.flush_dev(dev)

    def shutdown(self) -> None:
        """Free everything held: sockets' queues, fragments, neighbour queues, loopback."""
        self.udp.flush()
        self.raw.flush()
        if self.tcp is not None:
            self.tcp.flush()
        self.frags.flush()
        for n in list(self.neigh.entries.values()):
            self.neigh.delete(n)
        self.ip.flush()

    def counters(self) -> dict[str, Any]:
        return {"neigh": self.neigh_stats(), "frag": self.frags.stats(), "arp": dict(self.arp.stats),
                "fib": dict(self.fib.stats)}


def install(stack: "NetStack", seed: int = 0) -> Inet:
    """inet_init: IPv4, ARP, ICMP, UDP and raw sockets on `stack`."""
    if "inet" in stack.protocols:
        return stack.protocols["inet"]
    inet = Inet(stack, seed)
    stack.protocols["inet"] = inet
    stack.protocols["arp"] = inet.arp
    stack.protocols["ipv4"] = inet.ip
    stack.protocols["icmp"] = inet.icmp
    stack.protocols["udp"] = inet.udp
    stack.dev_add_pack(EtherType.ARP, inet.arp.rcv)
    stack.dev_add_pack(EtherType.IPV4, inet.ip.rcv)
    inet.add_protocol(IPPROTO_ICMP, inet.icmp.rcv, None)
    inet.add_protocol(IPPROTO_UDP, inet.udp.rcv, inet.udp.err)
    stack.register_socket(SOCK_DGRAM, IPPROTO_UDP, udp_socket)
    stack.register_socket(SOCK_RAW, IPPROTO_ICMP, raw_socket)
    from kstack import tcp_sock  # TCP registers itself as UDP does (protocol 6, SOCK_STREAM)
    tcp_sock.install(inet)
    stack.carrier_listeners.append(inet._carrier_changed)
    return inet
