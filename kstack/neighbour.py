"""The neighbour table (Linux's net/core/neighbour.c): which link-layer address an on-link
IPv4 address has, and whether that is known to be current.

An entry moves through the NUD ("neighbour unreachability detection") states:

    NONE --output--> INCOMPLETE --reply--> REACHABLE --reachable_time--> STALE
    INCOMPLETE --max probes--> FAILED (queued packets dropped NEIGH_FAILED)
    STALE --output--> DELAY --delay_first_probe, no confirmation--> PROBE --reply--> REACHABLE
    PROBE --max probes--> FAILED

Packets sent while an entry is INCOMPLETE wait on its queue (bounded in bytes of truesize,
unres_qlen_bytes; the oldest is dropped NEIGH_QUEUEFULL) and go out when the address is
learned. The table holds at most gc_thresh3 entries; a full table is first garbage-collected
(unused entries in FAILED, STALE or NONE), then refuses (NEIGH_CREATEFAIL, table_fulls).

Sans-IO: every transition takes `now`; the protocol (ARP) is told what to send through the
`solicit` and `xmit` callables; timers live in stack.timers.
"""
from __future__ import annotations

import random
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

from kstack.dropreason import SkbDropReason
from kstack.dstgen import dst_genid_bump
from kstack.skbuff import SkBuff

if TYPE_CHECKING:
    from kstack.netdevice import NetDevice
    from kstack.stack import NetStack

__all__ = ["Neighbour", "NeighTable", "NUD_INCOMPLETE", "NUD_REACHABLE", "NUD_STALE",
           "NUD_DELAY", "NUD_PROBE", "NUD_FAILED", "NUD_NOARP", "NUD_PERMANENT", "NUD_NONE",
           "NUD_VALID", "NUD_CONNECTED", "NUD_IN_TIMER", "nud_name", "skb_truesize",
           "SKB_TRUESIZE_OVERHEAD",
           "NEIGH_UPDATE_F_OVERRIDE", "NEIGH_UPDATE_F_ADMIN"]

# include/uapi/linux/neighbour.h
NUD_INCOMPLETE = 0x01
NUD_REACHABLE = 0x02
NUD_STALE = 0x04
NUD_DELAY = 0x08
NUD_PROBE = 0x10
NUD_FAILED = 0x20
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NUD_NONE = 0x00
# include/net/neighbour.h
NUD_IN_TIMER = NUD_INCOMPLETE | NUD_REACHABLE | NUD_DELAY | NUD_PROBE
NUD_VALID = NUD_PERMANENT | NUD_NOARP | NUD_REACHABLE | NUD_PROBE | NUD_STALE | NUD_DELAY
NUD_CONNECTED = NUD_PERMANENT | NUD_NOARP | NUD_REACHABLE

NEIGH_UPDATE_F_OVERRIDE = 0x1  # a new address may replace the one held
NEIGH_UPDATE_F_ADMIN = 0x80000000  # `ip neigh replace`: may change PERMANENT entries

_NAMES = {NUD_INCOMPLETE: "INCOMPLETE", NUD_REACHABLE: "REACHABLE", NUD_STALE: "STALE",
          NUD_DELAY: "DELAY", NUD_PROBE: "PROBE", NUD_FAILED: "FAILED", NUD_NOARP: "NOARP",
          NUD_PERMANENT: "PERMANENT", NUD_NONE: "NONE"}

NS = 1_000_000  # ns per ms
SKB_TRUESIZE_OVERHEAD = 256  # sizeof(struct sk_buff) + skb_shared_info, roughly


def nud_name(state: int) -> str:
    return _NAMES.get(state, hex(state))


def skb_truesize(skb: SkBuff) -> int:
    """skb->truesize: what an skb costs in memory (set where its head was allocated, see
    kstack.skbuff.skb_truesize_for), the unit socket and queue limits count in."""
    return skb.truesize


class Neighbour:
    """One entry: an IPv4 address on one device."""

    __slots__ = ("table", "dev", "key", "ha", "nud_state", "updated", "confirmed", "used",
                 "probes", "arp_queue", "arp_queue_len_bytes", "timer", "dead")

    def __init__(self, table: "NeighTable", dev: "NetDevice", key: int, now: int) -> None:
        self.table = table
        self.dev = dev
        self.key = key  # the IPv4 address, as an int
        self.ha: bytes | None = None  # the link-layer address once known
        self.nud_state = NUD_NONE
        self.updated = now
        self.confirmed = now - table.base_reachable_ns() * 2  # "long ago"
        self.used = now
        self.probes = 0
        self.arp_queue: deque[SkBuff] = deque()
        self.arp_queue_len_bytes = 0
        self.timer = table.stack.timers.timer(self._timer_handler, "neigh")
        self.dead = False

    def __repr__(self) -> str:
        from wire.ipv4 import ntoa
        from wire.mac import format_mac
        ha = format_mac(self.ha) if self.ha else "-"
        return f"<Neighbour {ntoa(self.key)} dev {self.dev.name} lladdr {ha} {nud_name(self.nud_state)}>"

    # --- output -------------------------------------------------------------------------------

    def event_send(self, skb: SkBuff | None, now: int) -> bool:
        """__neigh_event_send: the entry is being used to send `skb`. True: send it now to
        self.ha (CONNECTED, DELAY, PROBE, or STALE which turns DELAY). False: the skb was
        queued for resolution or dropped (the entry is INCOMPLETE or just FAILED)."""
        self.used = now
        st = self.nud_state
        if st & (NUD_CONNECTED | NUD_DELAY | NUD_PROBE):
            return True
        t = self.table
        if not st & (NUD_STALE | NUD_INCOMPLETE):
            # NONE or FAILED: start resolving, one probe right now
            self.probes = t.sysctl.neigh_ucast_solicit
            self._set_state(NUD_INCOMPLETE, now)
            self.updated = now
            self.timer.mod(now + max(t.sysctl.neigh_retrans_ms * NS, 10 * NS))
            self._enqueue(skb)
            self._probe(now)
            return False
        if st & NUD_STALE:
            self._set_state(NUD_DELAY, now)
            self.updated = now
            self.timer.mod(now + t.sysctl.neigh_delay_first_probe_ms * NS)
            return True
        self._enqueue(skb)  # INCOMPLETE
        return False

    def _enqueue(self, skb: SkBuff | None) -> None:
        if skb is None:
            return
        t = self.table
        size = skb_truesize(skb)
        limit = t.sysctl.neigh_queue_len_bytes
        while self.arp_queue and self.arp_queue_len_bytes + size > limit:
            old = self.arp_queue.popleft()
            self.arp_queue_len_bytes -= skb_truesize(old)
            old.drop(SkbDropReason.NEIGH_QUEUEFULL)
            t.stats["unresolved_discards"] += 1
        if size > limit:
            skb.drop(SkbDropReason.NEIGH_QUEUEFULL)
            t.stats["unresolved_discards"] += 1
            return
        self.arp_queue.append(skb)
        self.arp_queue_len_bytes += size

    def _probe(self, now: int) -> None:
        """neigh_probe: one solicitation (ARP request), with the newest queued packet as the
        hint for the source address."""
        skb = self.arp_queue[-1] if self.arp_queue else None
        self.probes += 1
        self.table.solicit(self, skb, now)

    def _max_probes(self) -> int:
        s = self.table.sysctl
        # neigh_max_probes: unicast + (multicast when resolving; mcast_reprobes=0 in PROBE)
        return s.neigh_ucast_solicit + (s.neigh_mcast_solicit if self.nud_state & NUD_INCOMPLETE else 0)

    # --- timers -------------------------------------------------------------------------------

    def _timer_handler(self, now: int) -> None:
        """neigh_timer_handler: the state's timer ran out."""
        if self.dead:
            return
        t = self.table
        s = t.sysctl
        st = self.nud_state
        if not st & NUD_IN_TIMER:
            return
        nxt = now + s.neigh_retrans_ms * NS
        if st & NUD_REACHABLE:
            if now <= self.confirmed + t.reachable_time:
                nxt = self.confirmed + t.reachable_time
            elif now <= self.used + s.neigh_delay_first_probe_ms * NS:
                self._set_state(NUD_DELAY, now)
                self.updated = now
                nxt = now + s.neigh_delay_first_probe_ms * NS
            else:
                self._set_state(NUD_STALE, now)
                self.updated = now
                return
        elif st & NUD_DELAY:
            if now <= self.confirmed + s.neigh_delay_first_probe_ms * NS:
                self._set_state(NUD_REACHABLE, now)
                self.updated = now
                nxt = self.confirmed + t.reachable_time
            else:
                self._set_state(NUD_PROBE, now)
                self.updated = now
                self.probes = 0
        if self.nud_state & (NUD_INCOMPLETE | NUD_PROBE) and self.probes >= self._max_probes():
            self._set_state(NUD_FAILED, now)
            self.updated = now
            self._invalidate()
            return
        self.timer.mod(max(nxt, now + 10 * NS))  # at least HZ/100 ahead, as Linux
        if self.nud_state & (NUD_INCOMPLETE | NUD_PROBE):
            self._probe(now)

    def _invalidate(self) -> None:
        """neigh_invalidate: resolution failed; what waited is dropped."""
        self.table.stats["res_failed"] += 1
        self._purge(SkbDropReason.NEIGH_FAILED)

    def _purge(self, reason: SkbDropReason) -> None:
        while self.arp_queue:
            self.arp_queue.popleft().drop(reason)
        self.arp_queue_len_bytes = 0

    def _set_state(self, state: int, now: int) -> None:
        self.nud_state = state
        dst_genid_bump()  # the sockets' cached hh (hh_cache) holds only while the state does

    # --- input --------------------------------------------------------------------------------

    def update(self, lladdr: bytes | None, new: int, flags: int, now: int) -> None:
        """neigh_update: what ARP learned (or an administrator set). `new` is the state the
        evidence supports: REACHABLE for a reply to us, STALE for anything else heard."""
        if self.dead:
            return
        old = self.nud_state
        t = self.table
        if old & (NUD_NOARP | NUD_PERMANENT) and not flags & NEIGH_UPDATE_F_ADMIN:
            return
        if not new & NUD_VALID:
            self.timer.delete()
            self._set_state(new, now)
            if old & (NUD_INCOMPLETE | NUD_PROBE) and new & NUD_FAILED:
                self._invalidate()
            return
        if lladdr is None:
            if not old & NUD_VALID or self.ha is None:
                return  # no address given and none known: nothing to update
            lladdr = self.ha
        lladdr = bytes(lladdr)
        if new & NUD_CONNECTED:
            self.confirmed = now
        if old & NUD_VALID:
            if lladdr != self.ha and not flags & NEIGH_UPDATE_F_OVERRIDE:
                # a different address inside locktime: keep the one held (Linux trusts the
                # first answer for locktime, against racing ARP replies)
                return
            if lladdr == self.ha and new == NUD_STALE and not flags & NEIGH_UPDATE_F_ADMIN:
                new = old  # hearing the same address again changes nothing
        if new != old or lladdr != self.ha:
            self.updated = now
        if new != old:
            self.timer.delete()
            if new & NUD_PROBE:
                self.probes = 0
            if new & NUD_IN_TIMER:
                self.timer.mod(now + (t.reachable_time if new & NUD_REACHABLE else 0))
            self._set_state(new, now)
        if lladdr != self.ha and not new & NUD_CONNECTED:
            self.confirmed = now - t.base_reachable_ns() * 2
        if lladdr != self.ha:
            self.ha = lladdr
            dst_genid_bump()  # neigh_update_hhs: the cached Ethernet headers are rewritten
        if not old & NUD_VALID and self.arp_queue:
            # resolved: send what waited, in order
            q, self.arp_queue = self.arp_queue, deque()
            self.arp_queue_len_bytes = 0
            for skb in q:
                t.xmit(self, skb, now)

    def confirm(self, now: int) -> None:
        """neigh_confirm: an upper layer saw forward progress (TCP ACKs, MSG_CONFIRM)."""
        self.confirmed = now


class NeighTable:
    """arp_tbl: entries keyed by (ifindex, IPv4 int), with Linux's statistics."""

    def __init__(self, stack: "NetStack", solicit: Callable[[Neighbour, SkBuff | None, int], None],
                 xmit: Callable[[Neighbour, SkBuff, int], None], seed: int = 0) -> None:
        self.stack = stack
        self.sysctl = stack.sysctl
        self.solicit = solicit  # send a probe (arp_solicit)
        self.xmit = xmit  # send a packet to a resolved neighbour
        self.entries: dict[tuple[int, int], Neighbour] = {}
        self.rng = random.Random(seed)
        self.reachable_time = self._random_reachable()
        self._gc_timer = stack.timers.timer(self._periodic_gc, "neigh_gc")
        # /proc/net/stat/arp_cache and `ip -s ntable`
        self.stats: dict[str, int] = {k: 0 for k in (
            "entries", "allocs", "destroys", "lookups", "hits", "res_failed", "rcv_probes_mcast",
            "rcv_probes_ucast", "periodic_gc_runs", "forced_gc_runs", "unresolved_discards",
            "table_fulls")}

    def base_reachable_ns(self) -> int:
        return self.sysctl.neigh_base_reachable_ms * NS

    def _random_reachable(self) -> int:
        """neigh_rand_reach_time: uniformly in [base/2, 3*base/2) (RFC 4861 6.3.2's rule)."""
        base = self.base_reachable_ns()
        return base // 2 + int(self.rng.random() * base)

    # --- lookup -------------------------------------------------------------------------------

    def lookup(self, dev: "NetDevice", key: int) -> Neighbour | None:
        """neigh_lookup: counted in lookups and hits."""
        self.stats["lookups"] += 1
        n = self.entries.get((dev.ifindex, key))
        if n is not None:
            self.stats["hits"] += 1
        return n

    def lookup_or_create(self, dev: "NetDevice", key: int, now: int) -> Neighbour | None:
        """__neigh_lookup(creat=1): None when the table is full even after a forced gc."""
        n = self.lookup(dev, key)
        if n is not None:
            return n
        return self.create(dev, key, now)

    def create(self, dev: "NetDevice", key: int, now: int) -> Neighbour | None:
        if len(self.entries) >= self.sysctl.neigh_gc_thresh3:
            self._forced_gc(now)
            if len(self.entries) >= self.sysctl.neigh_gc_thresh3:
                self.stats["table_fulls"] += 1
                return None
        n = Neighbour(self, dev, key, now)
        self.entries[(dev.ifindex, key)] = n
        self.stats["allocs"] += 1
        self.stats["entries"] = len(self.entries)
        if not self._gc_timer.pending:
            self._gc_timer.mod(now + self.sysctl.neigh_gc_interval_ms * NS)
        return n

    def delete(self, n: Neighbour) -> None:
        """neigh_destroy: remove an entry; what waited on it is dropped NEIGH_DEAD."""
        if self.entries.get((n.dev.ifindex, n.key)) is n:
            del self.entries[(n.dev.ifindex, n.key)]
        n.dead = True
        dst_genid_bump()  # the dsts holding it drop it at their next send
        n.timer.delete()
        n._purge(SkbDropReason.NEIGH_DEAD)
        self.stats["destroys"] += 1
        self.stats["entries"] = len(self.entries)

    def flush_dev(self, dev: "NetDevice") -> None:
        """neigh_ifdown: the device went down."""
        for n in [n for n in self.entries.values() if n.dev is dev]:
            if not n.nud_state & NUD_PERMANENT:
                self.delete(n)

    def add_permanent(self, dev: "NetDevice", key: int, lladdr: bytes, now: int) -> Neighbour | None:
        """`ip neigh replace ADDR lladdr MAC nud permanent`."""
        n = self.lookup_or_create(dev, key, now)
        if n is not None:
            n.update(lladdr, NUD_PERMANENT, NEIGH_UPDATE_F_OVERRIDE | NEIGH_UPDATE_F_ADMIN, now)
        return n

    # --- garbage collection -------------------------------------------------------------------

    def _collectable(self, n: Neighbour) -> bool:
        return not n.nud_state & (NUD_PERMANENT | NUD_NOARP | NUD_IN_TIMER) and not n.arp_queue

    def _forced_gc(self, now: int) -> None:
        """neigh_forced_gc: drop entries nobody waits on (FAILED, STALE, NONE), oldest first,
        down to gc_thresh2 (here: 7/8 of gc_thresh3)."""
        self.stats["forced_gc_runs"] += 1
        target = self.sysctl.neigh_gc_thresh3 * 7 // 8
        victims = sorted((n for n in self.entries.values() if self._collectable(n)),
                         key=lambda n: n.updated)
        for n in victims:
            if len(self.entries) <= target:
                break
            self.delete(n)

    def _periodic_gc(self, now: int) -> None:
        """neigh_periodic_work: entries FAILED or unused for gc_stale_time go; a new random
        reachable_time is drawn."""
        self.stats["periodic_gc_runs"] += 1
        self.reachable_time = self._random_reachable()
        if len(self.entries) > self.sysctl.neigh_gc_thresh1:
            stale = self.sysctl.neigh_gc_stale_ms * NS
            for n in list(self.entries.values()):
                if self._collectable(n) and (n.nud_state & NUD_FAILED or now - n.used > stale):
                    self.delete(n)
        if self.entries:
            self._gc_timer.mod(now + self.sysctl.neigh_gc_interval_ms * NS)

    # --- reporting ----------------------------------------------------------------------------

    def show(self, now: int | None = None) -> list[dict[str, Any]]:
        """`ip -s neigh`: one dict per entry; with `now`, also the seconds since the entry
        was used, confirmed and updated ("used 12/12/5")."""
        from wire.ipv4 import ntoa
        from wire.mac import format_mac
        rows = []
        for n in self.entries.values():
            row: dict[str, Any] = {"dst": ntoa(n.key), "dev": n.dev.name,
                                   "lladdr": format_mac(n.ha) if n.ha else None,
                                   "state": nud_name(n.nud_state), "probes": n.probes,
                                   "queued": len(n.arp_queue)}
            if now is not None:
                row["used"] = f"{max(0, now - n.used) // NS // 1000}/" \
                              f"{max(0, now - n.confirmed) // NS // 1000}/{max(0, now - n.updated) // NS // 1000}"
            rows.append(row)
        return rows
