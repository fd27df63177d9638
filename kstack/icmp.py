"""ICMP (RFC 792, RFC 1122 3.2.2; Linux's net/ipv4/icmp.c): echo, and the errors the other
layers ask for, with Linux's rate limits.

What never gets an ICMP error (RFC 1122 3.2.2): an ICMP error message, a datagram sent to a
broadcast or multicast address, a fragment other than the first, a datagram whose source is
not a single host (0.0.0.0, broadcast, multicast, loopback).

Rate limits, as Linux: error types in icmp_ratemask (dest unreachable, source quench, time
exceeded, parameter problem; not fragmentation-needed, which PMTU discovery depends on) pass
a global token bucket (icmp_msgs_per_sec, burst icmp_msgs_burst) and a per-destination one
(inet_peer_xrlim_allow: a token per icmp_ratelimit ms, a burst of 6). Suppressed messages
count in IcmpOutRateLimitGlobal / IcmpOutRateLimitHost.

Received errors go to the protocol of the datagram they quote (its err_handler), so a
connected UDP socket learns ECONNREFUSED from a port unreachable.
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from kstack.dropreason import SkbDropReason
from kstack.skbuff import MAX_HEADER, SkBuff
from kstack.stack import PACKET_BROADCAST, PACKET_MULTICAST
from wire.checksum import internet_checksum
from wire.icmp import (ICMP_DEST_UNREACH, ICMP_ECHO, ICMP_ECHOREPLY, ICMP_FRAG_NEEDED,
                       ICMP_HDR_LEN, ICMP_PARAMETERPROB, ICMP_SOURCE_QUENCH, ICMP_TIME_EXCEEDED,
                       ICMP_TIMESTAMP, ICMP_TIMESTAMPREPLY, ICMP_REDIRECT, is_error_type)
from wire.ipv4 import (IP_OFFMASK, IPPROTO_ICMP, IPTOS_PREC_INTERNETCONTROL, IPV4_MIN_HLEN,
                       is_lbcast, is_loopback, is_multicast, is_zeronet)

if TYPE_CHECKING:
    from kstack.inet import Inet

__all__ = ["Icmp", "XRLIM_BURST_FACTOR", "ICMP_ERROR_MAX", "MAX_PEERS"]

XRLIM_BURST_FACTOR = 6  # inet_peer_xrlim_allow: a burst of 6 messages
ICMP_ERROR_MAX = 576  # RFC 1812 4.3.2.3: an error "SHOULD NOT exceed 576 bytes"
MAX_PEERS = 4096  # inet_peer entries kept for the per-destination limit
NS_PER_MS = 1_000_000
NS_PER_S = 1_000_000_000

_IN_NAMES = {ICMP_ECHOREPLY: "IcmpInEchoReps", ICMP_DEST_UNREACH: "IcmpInDestUnreachs",
             ICMP_SOURCE_QUENCH: "IcmpInSrcQuenchs", ICMP_REDIRECT: "IcmpInRedirects",
             ICMP_ECHO: "IcmpInEchos", ICMP_TIME_EXCEEDED: "IcmpInTimeExcds",
             ICMP_PARAMETERPROB: "IcmpInParmProbs", ICMP_TIMESTAMP: "IcmpInTimestamps",
             ICMP_TIMESTAMPREPLY: "IcmpInTimestampReps"}
_OUT_NAMES = {t: n.replace("IcmpIn", "IcmpOut") for t, n in _IN_NAMES.items()}
_HDR = struct.Struct("!BBHI")


class Icmp:
    def __init__(self, inet: "Inet") -> None:
        self.inet = inet
        self.stack = inet.stack
        self.snmp = inet.stack.snmp
        self.peers: dict[int, list[int]] = {}  # dst -> [tokens (ns), last (ns)]
        self.global_credit = self.stack.sysctl.icmp_msgs_burst
        self.global_stamp = 0

    # --- receive ------------------------------------------------------------------------------

    def rcv(self, skb: SkBuff) -> None:
        """icmp_rcv: `skb.data` at the ICMP header."""
        snmp = self.snmp
        snmp["IcmpInMsgs"] += 1
        n = skb.tail - skb.data
        if n < ICMP_HDR_LEN:
            snmp["IcmpInErrors"] += 1
            skb.drop(SkbDropReason.PKT_TOO_SMALL)
            return
        buf = skb.shinfo.buf
        if internet_checksum(memoryview(buf)[skb.data:skb.tail]):
            snmp["IcmpInCsumErrors"] += 1
            snmp["IcmpInErrors"] += 1
            skb.drop(SkbDropReason.ICMP_CSUM)
            return
        t = buf[skb.data]
        snmp[f"IcmpMsgInType{t}"] += 1
        name = _IN_NAMES.get(t)
        if name:
            snmp[name] += 1
        if t == ICMP_ECHO:
            self._echo(skb)
        elif t in (ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED, ICMP_PARAMETERPROB, ICMP_SOURCE_QUENCH):
            self._unreach(skb)
        else:
            skb.consume()  # echo replies reach raw sockets (ping) before this; others: nothing to do

    def _echo(self, skb: SkBuff) -> None:
        """icmp_echo: the same identifier, sequence and data back (RFC 792)."""
        buf = skb.shinfo.buf
        nh = skb.network_header
        src, dst = struct.unpack_from("!II", buf, nh + 12)
        if skb.pkt_type in (PACKET_BROADCAST, PACKET_MULTICAST) or dst not in self.inet.local_addrs:
            if self.stack.sysctl.icmp_echo_ignore_broadcasts:
                skb.consume()  # icmp_echo_ignore_broadcasts (Smurf amplification)
                return
        if dst not in self.inet.local_addrs:
            dst = self.inet.dev_primary_addr(skb.dev, src)
        res = self.inet.fib.lookup(src)
        if res is None:
            skb.consume()
            return
        data = memoryview(buf)[skb.data + 4:skb.tail]
        out = self.stack.pool.alloc(ICMP_HDR_LEN + len(data), MAX_HEADER)
        o = out.put(4 + len(data))
        ob = out.shinfo.buf
        ob[o] = ICMP_ECHOREPLY
        ob[o + 1] = 0
        ob[o + 2] = ob[o + 3] = 0
        ob[o + 4:o + 4 + len(data)] = data
        self.stack.pool.bytes_copied += len(data)
        c = internet_checksum(memoryview(ob)[o:out.tail])
        ob[o + 2] = c >> 8
        ob[o + 3] = c & 0xFF
        self._out_count(ICMP_ECHOREPLY)
        tos = buf[nh + 1]
        skb.consume()
        self.inet.ip.output(out, dst, src, IPPROTO_ICMP, res, tos=tos)

    def _unreach(self, skb: SkBuff) -> None:
        """icmp_unreach: tell the protocol of the quoted datagram (RFC 1122 3.2.2.1: "MUST
        be passed to the transport layer")."""
        buf = skb.shinfo.buf
        o = skb.data
        n = skb.tail - o
        if n < ICMP_HDR_LEN + IPV4_MIN_HLEN:
            self.snmp["IcmpInErrors"] += 1
            skb.drop(SkbDropReason.ICMP_ERROR)
            return
        t, code, _c, rest = _HDR.unpack_from(buf, o)
        inner = o + ICMP_HDR_LEN
        ihl = (buf[inner] & 15) << 2
        if buf[inner] >> 4 != 4 or ihl < IPV4_MIN_HLEN or n < ICMP_HDR_LEN + ihl + 8:
            # RFC 792: the quote holds the IP header and 64 bits of its data
            self.snmp["IcmpInErrors"] += 1
            skb.drop(SkbDropReason.ICMP_ERROR)
            return
        proto = buf[inner + 9]
        isrc, idst = struct.unpack_from("!II", buf, inner + 12)
        if t == ICMP_DEST_UNREACH and code == ICMP_FRAG_NEEDED and self.inet.is_local(isrc):
            # RFC 1191: the next-hop MTU in the low 16 bits of the second word
            self.inet.ip.update_pmtu(idst, rest & 0xFFFF, skb.tstamp or self.stack.clock())
        entry = self.inet.protocols.get(proto)
        if entry is not None and entry[1] is not None:
            info = rest & 0xFFFF if (t == ICMP_DEST_UNREACH and code == ICMP_FRAG_NEEDED) else 0
            entry[1](isrc, idst, bytes(buf[inner + ihl:inner + ihl + 8]), t, code, info)
        skb.consume()

    # --- send ---------------------------------------------------------------------------------

    def send(self, skb_in: SkBuff, type: int, code: int, info: int) -> bool:
        """icmp_send (__icmp_send): an error about `skb_in` (its network header is the
        offending datagram), when the rules and rate limits allow. `skb_in` stays the
        caller's. True when a message was sent."""
        nh = skb_in.network_header
        if nh < 0:
            return False
        buf = skb_in.shinfo.buf
        avail = skb_in.tail - nh
        if avail < IPV4_MIN_HLEN:
            return False
        ihl = (buf[nh] & 15) << 2
        if ihl < IPV4_MIN_HLEN or avail < ihl:
            return False
        tos, tot, _id, ff, _ttl, proto, _c, src, dst = struct.unpack_from("!xBHHHBBHII", buf, nh)
        if ff & IP_OFFMASK:
            return False  # "only reply to fragment 0"
        if skb_in.pkt_type in (PACKET_BROADCAST, PACKET_MULTICAST) or is_lbcast(dst) \
                or is_multicast(dst) or dst in self.inet.bcast_addrs:
            return False
        if is_zeronet(src) or is_lbcast(src) or is_multicast(src) or is_loopback(src) \
                or src in self.inet.bcast_addrs:
            return False
        if proto == IPPROTO_ICMP and is_error_type(type):
            # "If we send an ICMP error to an ICMP error a mess would result"
            if avail < ihl + 1 or is_error_type(buf[nh + ihl]):
                return False
        now = self.stack.clock()
        if not self._allow(type, code, src, now):
            return False
        res = self.inet.fib.lookup(src)
        if res is None:
            return False
        saddr = dst if dst in self.inet.local_addrs else res.src
        if not saddr:
            return False
        room = ICMP_ERROR_MAX - IPV4_MIN_HLEN - ICMP_HDR_LEN
        qlen = min(avail, tot if tot >= ihl else avail, room)
        rest = info & 0xFFFF if (type == ICMP_DEST_UNREACH and code == ICMP_FRAG_NEEDED) else \
            (info & 0xFF) << 24 if type == ICMP_PARAMETERPROB else 0
        out = self.stack.pool.alloc(ICMP_HDR_LEN + qlen, MAX_HEADER)
        o = out.put(ICMP_HDR_LEN + qlen)
        ob = out.shinfo.buf
        _HDR.pack_into(ob, o, type, code, 0, rest)
        ob[o + ICMP_HDR_LEN:o + ICMP_HDR_LEN + qlen] = buf[nh:nh + qlen]
        self.stack.pool.bytes_copied += qlen
        c = internet_checksum(memoryview(ob)[o:out.tail])
        ob[o + 2] = c >> 8
        ob[o + 3] = c & 0xFF
        self._out_count(type)
        self.inet.ip.output(out, saddr, src, IPPROTO_ICMP, res,
                            tos=(tos & 0x1E) | IPTOS_PREC_INTERNETCONTROL)
        return True

    def _out_count(self, type: int) -> None:
        """icmp_out_count."""
        snmp = self.snmp
        snmp["IcmpOutMsgs"] += 1
        snmp[f"IcmpMsgOutType{type}"] += 1
        name = _OUT_NAMES.get(type)
        if name:
            snmp[name] += 1

    def out_count(self, type: int) -> None:
        """For raw ICMP sockets: their messages count as ICMP output too, as in Linux."""
        self._out_count(type)

    # --- rate limits ----------------------------------------------------------------------------

    def _allow(self, type: int, code: int, dst: int, now: int) -> bool:
        """icmpv4_global_allow + icmpv4_xrlim_allow."""
        s = self.stack.sysctl
        if type > 31 or not (s.icmp_ratemask >> type) & 1:
            return True
        if type == ICMP_DEST_UNREACH and code == ICMP_FRAG_NEEDED:
            return True  # "Don't limit PMTU discovery"
        # global (icmp_global_allow): while credit remains, allow; once spent, refill with
        # icmp_msgs_per_sec per second elapsed (at most a second's worth, at most every
        # HZ/50), capped at icmp_msgs_burst
        credit = self.global_credit
        if credit <= 0:
            delta = min(now - self.global_stamp, NS_PER_S)
            incr = s.icmp_msgs_per_sec * delta // NS_PER_S if delta >= NS_PER_S // 50 else 0
            if incr <= 0:
                self.snmp["IcmpOutRateLimitGlobal"] += 1
                return False
            self.global_stamp = now
            credit = self.global_credit = min(credit + incr, s.icmp_msgs_burst)
        # per destination (inet_peer): a token per icmp_ratelimit, XRLIM_BURST_FACTOR deep
        timeout = s.icmp_ratelimit_ms * NS_PER_MS
        if timeout:
            peer = self.peers.get(dst)
            if peer is None:
                if len(self.peers) >= MAX_PEERS:
                    del self.peers[next(iter(self.peers))]
                peer = self.peers[dst] = [0, now - 60 * NS_PER_S]  # "rate_last = jiffies - 60*HZ"
            token = min(peer[0] + now - peer[1], XRLIM_BURST_FACTOR * timeout)
            peer[1] = now
            if token < timeout:
                peer[0] = token
                self.snmp["IcmpOutRateLimitHost"] += 1
                return False
            peer[0] = token - timeout
        self.global_credit = credit - 1  # icmp_global_consume (Linux takes 0-2 at random)
        return True
