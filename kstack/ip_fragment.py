"""IPv4 reassembly (RFC 791 3.2, RFC 815; Linux's net/ipv4/ip_fragment.c).

Fragments are kept per queue keyed by (src, dst, protocol, id) (RFC 791: "the identification
field ... together with source, destination and protocol"). Instead of RFC 815's hole
descriptor list the queue keeps what RFC 815 keeps the complement of: the sorted, merged
intervals of bytes received. The datagram is complete when the first (offset 0) and last (MF
clear) fragments are in and the bytes received ("meat") equal its length.

Overlaps, as Linux today (inet_frag_queue_insert, after RFC 5722 and its erratum 3089):
a fragment that lies wholly inside bytes already received is a duplicate, dropped alone
(DUP_FRAG); any other overlap discards the whole datagram (IpReasmOverlaps, IpReasmFails,
IP_FRAG_OVERLAP) since two senders of different bytes cannot be told apart. A last fragment
that disagrees with the known length, or bytes beyond a known end, discard it too.

Bounds: a queue lives ipfrag_time seconds, then it is dropped (IpReasmTimeout, IpReasmFails)
and, when its first fragment had arrived, ICMP time exceeded code 1 goes to the sender (RFC
792 / RFC 1122 3.3.2). The bytes held by all queues (their skbs' truesize) stay below
ipfrag_high_thresh: above it the oldest queues are evicted down to ipfrag_low_thresh, as
Linux's evictor did before 4.17; at most ipfrag_max_queues queues exist at once.
"""
from __future__ import annotations

import bisect
import struct
from typing import TYPE_CHECKING

from kstack.dropreason import SkbDropReason
from kstack.neighbour import skb_truesize
from kstack.skbuff import CHECKSUM_NONE, MAX_HEADER, SkBuff
from wire.checksum import internet_checksum
from wire.icmp import ICMP_EXC_FRAGTIME, ICMP_TIME_EXCEEDED
from wire.ipv4 import IP_MAXPACKET, IP_MF, IP_OFFMASK

if TYPE_CHECKING:
    from kstack.inet import Inet

__all__ = ["IpFragments", "FragQueue"]

_KEY = struct.Struct("!HHHBBHII")  # tot, id, frag_off, ttl, proto, csum, src, dst (from byte 2)
NS_PER_S = 1_000_000_000


class FragQueue:
    """One datagram being reassembled (struct ipq)."""

    __slots__ = ("key", "frags", "starts", "ends", "meat", "length", "first_in", "last_in",
                 "mem", "timer", "dead")

    def __init__(self, key: tuple[int, int, int, int]) -> None:
        self.key = key
        self.frags: list[tuple[int, SkBuff]] = []  # (offset, skb whose data is the payload)
        self.starts: list[int] = []  # merged intervals of bytes received
        self.ends: list[int] = []
        self.meat = 0  # bytes received
        self.length = 0  # the datagram's payload length as known so far
        self.first_in = False
        self.last_in = False
        self.mem = 0
        self.timer = None
        self.dead = False

    def covers(self, offset: int, end: int) -> int:
        """0: new bytes only; 1: wholly inside bytes held (duplicate); 2: a partial overlap."""
        i = bisect.bisect_right(self.starts, offset) - 1
        if i >= 0 and self.ends[i] > offset:
            return 1 if end <= self.ends[i] else 2
        if i + 1 < len(self.starts) and self.starts[i + 1] < end:
            return 2
        return 0

    def add_interval(self, offset: int, end: int) -> None:
        i = bisect.bisect_right(self.starts, offset)
        s, e = self.starts, self.ends
        if i > 0 and e[i - 1] == offset:
            i -= 1
            e[i] = end
        else:
            s.insert(i, offset)
            e.insert(i, end)
        if i + 1 < len(s) and s[i + 1] == e[i]:
            e[i] = e[i + 1]
            del s[i + 1], e[i + 1]


class IpFragments:
    def __init__(self, inet: "Inet") -> None:
        self.inet = inet
        self.stack = inet.stack
        self.snmp = inet.stack.snmp
        self.queues: dict[tuple[int, int, int, int], FragQueue] = {}  # oldest first
        self.mem = 0  # bytes of truesize held (frag_mem_limit)

    def defrag(self, skb: SkBuff, now: int) -> SkBuff | None:
        """ip_defrag: queue a fragment; the whole datagram when this one completed it, else
        None (the fragment is held or was dropped, counted either way)."""
        snmp = self.snmp
        snmp["IpReasmReqds"] += 1
        buf = skb.shinfo.buf
        nh = skb.network_header
        ihl = (buf[nh] & 15) << 2
        _tot, ident, ff, _ttl, proto, _c, src, dst = _KEY.unpack_from(buf, nh + 2)
        key = (src, dst, proto, ident)
        q = self.queues.get(key)
        if q is None:
            q = self._create(key, now)
            if q is None:
                snmp["IpReasmFails"] += 1
                skb.drop(SkbDropReason.IP_FRAG_MEM)
                return None
        offset = (ff & IP_OFFMASK) << 3
        payload_start = nh + ihl
        end = offset + (skb.tail - payload_start)
        if ihl + end > IP_MAXPACKET:
            return self._discard(q, skb, SkbDropReason.IP_FRAG_TOO_FAR)
        if not ff & IP_MF:
            # "If we already have some bits beyond end or have different end, the segment
            # is corrupted"
            if end < q.length or (q.last_in and end != q.length):
                return self._discard(q, skb, SkbDropReason.IP_FRAG_OVERLAP)
            q.last_in = True
            q.length = end
        else:
            end &= ~7  # RFC 791: all fragments but the last carry a multiple of 8 bytes
            if end > q.length:
                if q.last_in:
                    return self._discard(q, skb, SkbDropReason.IP_FRAG_OVERLAP)
                q.length = end
        if end == offset:
            return self._discard(q, skb, SkbDropReason.PKT_TOO_SMALL)
        skb.data = payload_start
        skb.tail = payload_start + (end - offset)
        c = q.covers(offset, end)
        if c == 1:
            skb.drop(SkbDropReason.DUP_FRAG)
            return None
        if c == 2:
            snmp["IpReasmOverlaps"] += 1
            return self._discard(q, skb, SkbDropReason.IP_FRAG_OVERLAP)
        size = skb_truesize(skb)
        if self.mem + size > self.stack.sysctl.ipfrag_high_thresh:
            self._evict(q)
            if self.mem + size > self.stack.sysctl.ipfrag_high_thresh:
                return self._discard(q, skb, SkbDropReason.IP_FRAG_MEM)
        q.frags.append((offset, skb))
        q.add_interval(offset, end)
        q.meat += end - offset
        q.mem += size
        self.mem += size
        if offset == 0:
            q.first_in = True
        if q.first_in and q.last_in and q.meat == q.length:
            return self._reasm(q)
        return None

    # --- queues ------------------------------------------------------------------------------

    def _create(self, key: tuple[int, int, int, int], now: int) -> FragQueue | None:
        s = self.stack.sysctl
        if self.mem > s.ipfrag_high_thresh:
            self._evict(None)
            if self.mem > s.ipfrag_high_thresh:
                return None
        while len(self.queues) >= s.ipfrag_max_queues:
            old = next(iter(self.queues.values()))
            self.snmp["IpReasmFails"] += 1
            self._kill(old, SkbDropReason.IP_FRAG_QUEUES)
        q = FragQueue(key)
        q.timer = self.stack.timers.timer(lambda t, q=q: self._expire(q, t), "ipfrag")
        q.timer.mod(now + s.ipfrag_time_s * NS_PER_S)
        self.queues[key] = q
        return q

    def _kill(self, q: FragQueue, reason: SkbDropReason) -> None:
        """inet_frag_kill + free: the queue goes, its fragments are dropped."""
        if q.dead:
            return
        q.dead = True
        if q.timer is not None:
            q.timer.delete()
        self.queues.pop(q.key, None)
        for _, f in q.frags:
            f.drop(reason)
        q.frags.clear()
        self.mem -= q.mem
        q.mem = 0

    def _discard(self, q: FragQueue, skb: SkBuff, reason: SkbDropReason) -> None:
        """discard_qp: this fragment makes the datagram impossible; drop it all."""
        self.snmp["IpReasmFails"] += 1
        self._kill(q, reason)
        skb.drop(reason)
        return None

    def _evict(self, keep: FragQueue | None) -> None:
        """inet_frag_evictor: oldest queues first, down to ipfrag_low_thresh."""
        low = self.stack.sysctl.ipfrag_low_thresh
        for q in list(self.queues.values()):
            if self.mem <= low:
                break
            if q is keep:
                continue
            self.snmp["IpReasmFails"] += 1
            self._kill(q, SkbDropReason.FRAG_INCOMPLETE)

    def _expire(self, q: FragQueue, now: int) -> None:
        """ip_expire: the reassembly timer ran out (RFC 1122 3.3.2: 60 s to 120 s suggested;
        Linux's ipfrag_time is 30 s)."""
        if q.dead:
            return
        self.snmp["IpReasmFails"] += 1
        self.snmp["IpReasmTimeout"] += 1
        if q.first_in:
            head = next(f for off, f in q.frags if off == 0)
            # RFC 792: "if fragment zero is not available then no time exceeded need be sent"
            self.inet.icmp.send(head, ICMP_TIME_EXCEEDED, ICMP_EXC_FRAGTIME, 0)
        self._kill(q, SkbDropReason.IP_FRAG_REASM_TIMEOUT)

    def _reasm(self, q: FragQueue) -> SkBuff:
        """ip_frag_reasm: one skb with the first fragment's header and every payload in
        order (a copy per fragment, counted in the pool's bytes_copied)."""
        q.frags.sort(key=lambda x: x[0])
        head = q.frags[0][1]
        hb = head.shinfo.buf
        nh = head.network_header
        ihl = (hb[nh] & 15) << 2
        pool = self.stack.pool
        skb = pool.alloc(ihl + q.length, MAX_HEADER)
        o = skb.put(ihl + q.length)
        b = skb.shinfo.buf
        b[o:o + ihl] = hb[nh:nh + ihl]
        for off, f in q.frags:
            n = f.tail - f.data
            b[o + ihl + off:o + ihl + off + n] = f.shinfo.buf[f.data:f.tail]
            pool.bytes_copied += n
        tot = ihl + q.length
        b[o + 2] = tot >> 8
        b[o + 3] = tot & 0xFF
        b[o + 6] = b[o + 7] = 0  # no longer a fragment (and not DF: it was fragmented)
        b[o + 10] = b[o + 11] = 0
        c = internet_checksum(memoryview(b)[o:o + ihl])
        b[o + 10] = c >> 8
        b[o + 11] = c & 0xFF
        skb.network_header = o
        skb.transport_header = o + ihl
        skb.dev = head.dev
        skb.pkt_type = head.pkt_type
        skb.protocol = head.protocol
        skb.tstamp = head.tstamp
        skb.ip_summed = CHECKSUM_NONE
        skb.cb = dict(head.cb)
        q.dead = True
        q.timer.delete()
        self.queues.pop(q.key, None)
        for _, f in q.frags:
            f.consume()
        q.frags.clear()
        self.mem -= q.mem
        q.mem = 0
        self.snmp["IpReasmOKs"] += 1
        return skb

    def flush(self) -> None:
        for q in list(self.queues.values()):
            self._kill(q, SkbDropReason.FRAG_INCOMPLETE)

    def stats(self) -> dict[str, int]:
        return {"queues": len(self.queues), "mem": self.mem}
