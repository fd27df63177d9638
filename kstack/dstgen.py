"""The dst cache generation: what a connected socket's cached transmit state (the route, the
neighbour's hardware header, the device's MTU, offloads and qdisc, the socket's TOS/TTL) is
valid under.

Why: Linux does not redo per-send lookups for a connected UDP socket: sk->sk_dst_cache holds
the route (checked by dst_check against rt_genid / dst->obsolete) and the neighbour keeps the
Ethernet header ready (neigh->hh, hh_cache). Here one counter stands for all of those checks:
each cause bumps it in one place (FIB.add/remove, Neighbour._set_state and the lladdr change in
Neighbour.update, NeighTable.delete, NetDevice's mtu/flags/features/qdisc setters and carrier
changes, Sock.setsockopt), and a cache filled under another value is refilled before use.
The counter is one object with one slot so the compiled send reads it without a name lookup;
a bump stores a new int, so `cached is DST_GENID.value` is the whole check."""
from __future__ import annotations

__all__ = ["DstGenid", "DST_GENID", "dst_genid_bump"]


class DstGenid:
    """rt_genid for every cached transmit state of the process (one counter: a bump for one
    cause refills every socket's cache at its next send, which is rare and cheap)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


DST_GENID = DstGenid()


def dst_genid_bump() -> None:
    """Expire every cached transmit state (sk_dst_cache + hh_cache): something it holds changed."""
    DST_GENID.value += 1
