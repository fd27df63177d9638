"""The FIB (Linux's net/ipv4/fib_*.c): where a datagram to an address goes.

Two tables, consulted in Linux's rule order: `local` (our own addresses and the broadcast
addresses of our subnets, /32 entries made by adding an address) and `main` (connected
routes made by adding an address, plus gateways and the default route). The answer is the
longest matching prefix (RFC 1812 5.2.4.3); among routes of the same prefix the lowest metric
wins, then the first added. A result says how to deliver: LOCAL (to us), BROADCAST, or
UNICAST through a device to a next hop (the gateway, or the destination itself when on-link).
Lookups are cached per destination address until the tables change.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kstack.dstgen import dst_genid_bump
from wire.ipv4 import format_prefix, ntoa, prefix_mask

if TYPE_CHECKING:
    from kstack.netdevice import NetDevice

__all__ = ["Route", "FibResult", "Fib", "RTN_UNICAST", "RTN_LOCAL", "RTN_BROADCAST",
           "RT_SCOPE_UNIVERSE", "RT_SCOPE_LINK", "RT_SCOPE_HOST", "MAX_ROUTES"]

# include/uapi/linux/rtnetlink.h
RTN_UNICAST = 1
RTN_LOCAL = 2
RTN_BROADCAST = 3
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_SCOPE_HOST = 254

MAX_ROUTES = 4096  # per table
CACHE_MAX = 4096
_TYPE_NAMES = {RTN_UNICAST: "unicast", RTN_LOCAL: "local", RTN_BROADCAST: "broadcast"}


@dataclass(slots=True)
class Route:
    dst: int  # the network, masked
    plen: int
    dev: "NetDevice"
    gateway: int = 0  # 0: on-link
    metric: int = 0
    type: int = RTN_UNICAST
    scope: int = RT_SCOPE_UNIVERSE
    prefsrc: int = 0  # the source address to use (the device's address for connected routes)
    proto: str = "static"  # "kernel" for routes made by adding an address

    def describe(self) -> str:
        """One line as `ip route` prints it."""
        dst = "default" if self.plen == 0 else (ntoa(self.dst) if self.plen == 32 else format_prefix(self.dst, self.plen))
        parts = [dst if self.type == RTN_UNICAST else f"{_TYPE_NAMES[self.type]} {dst}"]
        if self.gateway:
            parts.append(f"via {ntoa(self.gateway)}")
        parts.append(f"dev {self.dev.name}")
        if self.proto == "kernel":
            parts.append("proto kernel")
        if self.scope == RT_SCOPE_LINK:
            parts.append("scope link")
        elif self.scope == RT_SCOPE_HOST:
            parts.append("scope host")
        if self.prefsrc:
            parts.append(f"src {ntoa(self.prefsrc)}")
        if self.metric:
            parts.append(f"metric {self.metric}")
        return " ".join(parts)


class FibResult:
    """fib_result + the flow's answers: type, device, next hop, source."""

    __slots__ = ("type", "dev", "nexthop", "src", "route")

    def __init__(self, type: int, dev: "NetDevice", nexthop: int, src: int, route: Route) -> None:
        self.type = type
        self.dev = dev
        self.nexthop = nexthop  # whom to ARP for
        self.src = src  # preferred source address (0: none known)
        self.route = route

    def __repr__(self) -> str:
        return (f"<FibResult {_TYPE_NAMES.get(self.type)} dev {self.dev.name} "
                f"via {ntoa(self.nexthop)} src {ntoa(self.src)}>")


class _Table:
    """Routes by prefix length, then by masked destination."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.by_len: dict[int, dict[int, list[Route]]] = {}
        self.lens: list[int] = []  # prefix lengths present, longest first
        self.count = 0

    def add(self, r: Route) -> None:
        if self.count >= MAX_ROUTES:
            raise OSError(105, f"the {self.name} table is full ({MAX_ROUTES} routes)")  # ENOBUFS
        bucket = self.by_len.setdefault(r.plen, {}).setdefault(r.dst, [])
        for o in bucket:
            if o.metric == r.metric and o.dev is r.dev and o.gateway == r.gateway and o.type == r.type:
                raise FileExistsError(17, "RTNETLINK answers: File exists")
        bucket.append(r)
        bucket.sort(key=lambda x: x.metric)  # stable: first added wins a tie
        self.count += 1
        self.lens = sorted(self.by_len, reverse=True)

    def remove(self, pred) -> int:
        n = 0
        for plen in list(self.by_len):
            d = self.by_len[plen]
            for dst in list(d):
                keep = [r for r in d[dst] if not pred(r)]
                n += len(d[dst]) - len(keep)
                if keep:
                    d[dst] = keep
                else:
                    del d[dst]
            if not d:
                del self.by_len[plen]
        self.count -= n
        self.lens = sorted(self.by_len, reverse=True)
        return n

    def lookup(self, addr: int) -> Route | None:
        for plen in self.lens:
            rs = self.by_len[plen].get(addr & prefix_mask(plen) if plen else 0)
            if rs:
                return rs[0]
        return None

    def all(self) -> list[Route]:
        return [r for plen in self.lens for rs in self.by_len[plen].values() for r in rs]


class Fib:
    def __init__(self) -> None:
        self.local = _Table("local")
        self.main = _Table("main")
        self._cache: dict[int, FibResult | None] = {}
        self.stats = {"lookups": 0, "cache_hits": 0}
        self.genid = 0  # rt_genid: bumped on every change, so cached dsts (sockets') expire

    def add(self, r: Route) -> None:
        if not 0 <= r.plen <= 32:
            raise ValueError(f"prefix length {r.plen}")
        r.dst &= prefix_mask(r.plen)
        (self.local if r.type in (RTN_LOCAL, RTN_BROADCAST) else self.main).add(r)
        self._bump()

    def remove(self, pred) -> int:
        n = self.local.remove(pred) + self.main.remove(pred)
        self._bump()
        return n

    def _bump(self) -> None:
        """rt_cache_flush: the lookup cache goes, cached dsts (sockets') expire."""
        self._cache.clear()
        self.genid += 1
        dst_genid_bump()

    def routes(self, table: str = "main") -> list[Route]:
        return (self.local if table == "local" else self.main).all()

    def lookup(self, dst: int) -> FibResult | None:
        """fib_lookup for an output or a forward: None means no route (ENETUNREACH)."""
        self.stats["lookups"] += 1
        res = self._cache.get(dst, False)
        if res is not False:
            self.stats["cache_hits"] += 1
            return res  # type: ignore[return-value]
        r = self.local.lookup(dst) or self.main.lookup(dst)
        if r is None:
            res = None
        elif r.type != RTN_UNICAST:
            res = FibResult(r.type, r.dev, dst, r.prefsrc, r)
        else:
            res = FibResult(RTN_UNICAST, r.dev, r.gateway or dst, r.prefsrc or self._src_for(r), r)
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[dst] = res
        return res

    def _src_for(self, r: Route) -> int:
        """inet_select_addr: a source for a route without prefsrc: the address of a connected
        route on the same device that covers the gateway, or any address on the device."""
        fallback = 0
        for c in self.main.all():
            if c.dev is r.dev and c.proto == "kernel" and c.prefsrc:
                if r.gateway and (r.gateway & prefix_mask(c.plen)) == c.dst:
                    return c.prefsrc
                fallback = fallback or c.prefsrc
        return fallback
