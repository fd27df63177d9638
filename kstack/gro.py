"""Generic receive offload for TCP over IPv4 (Linux's net/core/gro.c dev_gro_receive,
net/ipv4/af_inet.c inet_gro_receive, net/ipv4/tcp_offload.c tcp_gro_receive and
tcp_gro_complete), in software below the stack: the driver hands each received frame to
`NetDevice.napi_gro_receive` instead of `netif_receive_skb`, and consecutive in-order segments
of one flow are merged into one sk_buff before IP and TCP see them. The poll ends with
`napi_gro_flush`, which delivers what is held. `ethtool -K eth0 gro off` is
`dev.features &= ~NetdevFeatures.GRO` (the e1000's `E1000Config.gro`, NICEMU_GRO=0).

A frame is held or merged only when Linux would merge it:
- Ethernet type IPv4, version 4 with a 20-byte header (no IP options), a valid header
  checksum, not a fragment (MF and offset zero), protocol TCP, the frame exactly the IP total
  length (no padding, nothing missing);
- a TCP header whose data offset fits, and a checksum that is good (the device said
  CHECKSUM_UNNECESSARY, or it is verified here; a bad one is delivered alone and TCP counts
  it);
- the same flow as a held packet: the same Ethernet header, addresses and ports;
- and, to be appended to it: SEQ = the held packet's end, the same ACK number, the same flags
  except FIN and PSH (CWR never merges), every option byte the same (timestamps included: as
  tcp_gro_receive, TSval and TSecr must be equal, which they are within a burst at 1 ms
  clock), the same TOS and TTL and DF, an IP ID one more than the last (or the same fixed ID
  with DF), a payload no larger than the first segment's (the gso_size) and not empty, and
  the IP total length staying within 65535.
A segment that cannot be appended flushes the held packet of its flow first (so the flow's
order is kept), then starts a new one or, if it carries no payload or URG, PSH, RST, SYN or
FIN, is delivered alone. A merged segment with PSH or FIN, or shorter than gso_size, ends the
packet: it is delivered at once. Frames of other protocols and flows are delivered at once
and do not flush anything. At most MAX_GRO_SKBS flows are held; one more flushes the oldest.

The merged sk_buff: the first segment's headers, the payloads in order (copied into one
buffer, counted in the pool's bytes_copied), the IP total length and header checksum
rewritten, FIN/PSH of the last segment in the flags, and a TCP checksum that is valid for
the merged segment (computed from the segments' own checksums, RFC 1624 style, without
reading the payload again), ip_summed CHECKSUM_UNNECESSARY, `cb["gso_segs"]` and
`cb["gso_size"]` (skb_shinfo's gso_segs and gso_size). Taps see it as tcpdump sees GRO
packets on Linux.

Counters (dev.counters, as dev_gro_receive's results and netdev's qstats name them):
gro_held, gro_merged, gro_normal (delivered without merging), gro_flush (napi_gro_flush
calls that delivered something), gro_packets (merged sk_buffs delivered), gro_wire_packets
(the segments inside them), gro_bytes (their payload), gro_csum_bad (segments whose checksum
GRO found bad).

`Gro` is the compiled kstack._gro.Gro when it is built, else GroRef (this file's twin, which
NICEMU_PY_GRO=1 forces); tests hold the two equal.
"""
from __future__ import annotations

import os
import struct
from typing import Any

from kstack.skbuff import CHECKSUM_UNNECESSARY, NET_IP_ALIGN, NET_SKB_PAD

__all__ = ["Gro", "GroRef", "MAX_GRO_SKBS", "GRO_COUNTERS", "KIND"]

MAX_GRO_SKBS = 8  # Linux's per-bucket limit of held packets
GRO_MAX_IP_LEN = 65535
ETH_HLEN = 14
ETH_P_IP = 0x0800
IPPROTO_TCP = 6
TH_FIN, TH_SYN, TH_RST, TH_PSH, TH_ACK, TH_URG, TH_ECE, TH_CWR = 1, 2, 4, 8, 16, 32, 64, 128
_NO_HOLD = TH_URG | TH_PSH | TH_RST | TH_SYN | TH_FIN  # tcp_gro_receive's out_check_final flags
_FLAGS_SAME = 0xFF & ~(TH_CWR | TH_FIN | TH_PSH)
IP_DF = 0x4000
_RX_HEADROOM = NET_SKB_PAD + NET_IP_ALIGN
GRO_COUNTERS = ("gro_held", "gro_merged", "gro_normal", "gro_flush", "gro_packets",
                "gro_wire_packets", "gro_bytes", "gro_csum_bad")

# version/IHL, TOS, total length, ID, frag, TTL, protocol, checksum, saddr, daddr
_IPH = struct.Struct("!BBHHHBBHII")
# sport, dport, seq, ack, data offset, flags, window, checksum, urgent
_TCPH = struct.Struct("!HHIIBBHHH")


class _Held:
    """One flow's held packet: the segments to merge and what the next one must match."""

    __slots__ = ("skbs", "hlen", "thlen", "flags", "ack", "opts", "next_seq", "mss", "iplen",
                 "id0", "last_id", "tos", "ttl", "df", "psum", "poff")

    def __init__(self) -> None:
        self.skbs: list[Any] = []


class GroRef:
    """One NAPI context's GRO state (napi_struct's gro_hash): the held packets by flow.
    The readable twin of kstack/_gro.pyx's Gro (the one used when it is built)."""

    def __init__(self, dev: Any) -> None:
        self.dev = dev
        self.held: dict[bytes, _Held] = {}
        c = dev.counters
        for name in GRO_COUNTERS:
            c.setdefault(name, 0)

    # --- dev_gro_receive ---------------------------------------------------------------------

    def receive(self, skb: Any) -> None:
        """napi_gro_receive: hold, merge, or deliver `skb` (Ethernet header at skb.data)."""
        buf = skb.shinfo.buf
        d = skb.data
        n = skb.tail - d
        c = self.dev.counters
        if n < ETH_HLEN + 40 or buf[d + 12] != 0x08 or buf[d + 13] != 0x00:
            c["gro_normal"] += 1
            self.dev.netif_receive_skb(skb)
            return
        ip = d + ETH_HLEN
        vihl, tos, tot, ipid, frag, ttl, proto, _ipsum, saddr, daddr = _IPH.unpack_from(buf, ip)
        if (vihl != 0x45 or proto != IPPROTO_TCP or tot + ETH_HLEN != n or frag & 0x3FFF
                or int.from_bytes(buf[ip:ip + 20], "big") % 0xFFFF):
            c["gro_normal"] += 1  # options, not TCP, padded or short, a fragment, bad header
            self.dev.netif_receive_skb(skb)
            return
        tcp = ip + 20
        _sp, _dp, seq, ack, doff, flags, _win, _check, _urg = _TCPH.unpack_from(buf, tcp)
        thlen = (doff >> 4) << 2
        tcplen = tot - 20
        if thlen < 20 or thlen > tcplen:
            c["gro_normal"] += 1
            self.dev.netif_receive_skb(skb)
            return
        key = bytes(buf[d:d + 12]) + bytes(buf[ip + 12:ip + 24])
        held = self.held
        p = held.get(key)
        pseudo = (saddr >> 16) + (saddr & 0xFFFF) + (daddr >> 16) + (daddr & 0xFFFF) + IPPROTO_TCP
        hsum = int.from_bytes(buf[tcp:tcp + thlen], "big")
        if skb.ip_summed != CHECKSUM_UNNECESSARY:
            # skb_gro_checksum_validate: a bad one goes up alone (TCP counts and drops it)
            v = int.from_bytes(buf[tcp:tcp + tcplen], "big")
            if tcplen & 1:
                v <<= 8
            if (v + pseudo + tcplen) % 0xFFFF:
                c["gro_csum_bad"] += 1
                if p is not None:
                    self._flush_one(key, p)
                c["gro_normal"] += 1
                self.dev.netif_receive_skb(skb)
                return
            skb.ip_summed = CHECKSUM_UNNECESSARY
        plen = tcplen - thlen
        if p is not None:
            hlen = ETH_HLEN + 20 + thlen
            if (hlen == p.hlen and ack == p.ack and seq == p.next_seq and 0 < plen <= p.mss
                    and not flags & TH_CWR and not (flags ^ p.flags) & _FLAGS_SAME
                    and tos == p.tos and ttl == p.ttl and (frag & IP_DF) == p.df
                    and p.iplen + plen <= GRO_MAX_IP_LEN
                    and (ipid == (p.last_id + 1) & 0xFFFF or (p.df and ipid == p.last_id == p.id0))
                    and (thlen == 20 or buf[tcp + 20:tcp + thlen] == p.opts)):
                # skb_gro_receive: appended; its payload's sum joins the held one's
                p.skbs.append(skb)
                psum = -(pseudo + tcplen + hsum) % 0xFFFF  # the payload's sum (mod 0xFFFF)
                if p.poff & 1:
                    psum = psum * 256 % 0xFFFF  # at an odd offset its bytes swap places
                p.psum += psum
                p.poff += plen
                p.next_seq = (seq + plen) & 0xFFFFFFFF
                p.iplen += plen
                p.last_id = ipid
                p.flags |= flags & (TH_FIN | TH_PSH)
                c["gro_merged"] += 1
                if plen < p.mss or flags & _NO_HOLD:
                    self._flush_one(key, p)
                return
            self._flush_one(key, p)  # the flow's held packet goes first
        if plen == 0 or flags & (_NO_HOLD | TH_CWR):
            c["gro_normal"] += 1
            self.dev.netif_receive_skb(skb)
            return
        if len(held) >= MAX_GRO_SKBS:
            old = next(iter(held))
            self._flush_one(old, held[old])
        p = _Held()
        p.skbs.append(skb)
        p.hlen = ETH_HLEN + 20 + thlen
        p.thlen = thlen
        p.flags = flags
        p.ack = ack
        p.opts = bytes(buf[tcp + 20:tcp + thlen])
        p.next_seq = (seq + plen) & 0xFFFFFFFF
        p.mss = plen
        p.iplen = tot
        p.id0 = p.last_id = ipid
        p.tos = tos
        p.ttl = ttl
        p.df = frag & IP_DF
        p.psum = -(pseudo + tcplen + hsum) % 0xFFFF
        p.poff = plen
        held[key] = p
        c["gro_held"] += 1

    # --- napi_gro_flush ----------------------------------------------------------------------

    def flush(self) -> None:
        """napi_gro_flush: deliver every held packet, oldest first."""
        held = self.held
        if not held:
            return
        self.dev.counters["gro_flush"] += 1
        for key, p in list(held.items()):
            self._flush_one(key, p)

    def _flush_one(self, key: bytes, p: _Held) -> None:
        """napi_gro_complete: one held packet up the stack (merged if it has several)."""
        del self.held[key]
        skbs = p.skbs
        if len(skbs) == 1:
            self.dev.netif_receive_skb(skbs[0])
            return
        first = skbs[0]
        hlen = p.hlen
        total = p.iplen + ETH_HLEN
        dev = self.dev
        pool = first.pool
        m = pool.alloc(total, _RX_HEADROOM)
        o = m.put(total)
        mb = m.shinfo.buf
        fb = first.shinfo.buf
        mb[o:o + hlen] = fb[first.data:first.data + hlen]
        pos = o + hlen
        for s in skbs:
            a = s.data + hlen
            k = s.tail - a
            mb[pos:pos + k] = memoryview(s.shinfo.buf)[a:s.tail]
            pos += k
        payload = pos - o - hlen
        pool.bytes_copied += payload
        for s in skbs:
            s.consume()
        ip = o + ETH_HLEN
        tot = p.iplen
        mb[ip + 2] = tot >> 8
        mb[ip + 3] = tot & 0xFF
        mb[ip + 10] = mb[ip + 11] = 0
        ipsum = 0xFFFF - int.from_bytes(mb[ip:ip + 20], "big") % 0xFFFF
        mb[ip + 10] = ipsum >> 8
        mb[ip + 11] = ipsum & 0xFF
        tcp = ip + 20
        mb[tcp + 13] |= p.flags & (TH_FIN | TH_PSH)
        mb[tcp + 16] = mb[tcp + 17] = 0
        saddr = int.from_bytes(mb[ip + 12:ip + 16], "big")
        daddr = int.from_bytes(mb[ip + 16:ip + 20], "big")
        tcplen = tot - 20
        pseudo = (saddr >> 16) + (saddr & 0xFFFF) + (daddr >> 16) + (daddr & 0xFFFF) + IPPROTO_TCP
        check = 0xFFFF - (pseudo + tcplen + int.from_bytes(mb[tcp:tcp + p.thlen], "big")
                          + p.psum) % 0xFFFF
        mb[tcp + 16] = check >> 8
        mb[tcp + 17] = check & 0xFF
        m.protocol = ETH_P_IP
        m.ip_summed = CHECKSUM_UNNECESSARY
        m.tstamp = first.tstamp
        m.cb["gso_segs"] = len(skbs)
        m.cb["gso_size"] = p.mss
        c = dev.counters
        c["gro_packets"] += 1
        c["gro_wire_packets"] += len(skbs)
        c["gro_bytes"] += payload
        dev.netif_receive_skb(m)


def _select() -> tuple[type, str]:
    if os.environ.get("NICEMU_PY_GRO") != "1":
        try:
            from kstack._gro import Gro as _Compiled
        except ImportError:
            pass
        else:
            return _Compiled, "cython"
    return GroRef, "python"


Gro, KIND = _select()
