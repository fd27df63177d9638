"""Generic segmentation offload for TCP over IPv4 (Linux's skb_gso_segment -> inet_gso_segment
-> tcp_gso_segment / skb_segment), in software below the stack: the 82540EM does no TSO, so
a large TCP segment (built by the engine when the route's device has NETIF_F_GSO, marked
`skb.cb["gso_size"]`, the payload per wire segment, and `cb["gso_segs"]`) is split at
dev_queue_xmit (kstack.stack) before the taps and the qdisc, and the driver only ever sees
frames that fit the MTU. IP (kstack.ipv4) skips fragmenting it (skb_is_gso), reserves
gso_segs IP IDs (ip_select_ident_segs) and, if the path MTU shrank below a segment, splits it
there first (ip_finish_output_gso).

Each segment: the headers of the large one (Ethernet, IP with its options, TCP with its
options), `gso_size` bytes of payload (the last gets the rest), the IP total length and the
IP ID (the large one's + i) with its header checksum, SEQ advanced by i * gso_size, CWR only
on the first, FIN and PSH only on the last; the TCP checksum left to the device
(CHECKSUM_PARTIAL, the field seeded with the segment's pseudo-header sum, as the large one
was) or, for an sk_buff that was not CHECKSUM_PARTIAL, computed here. The payload is copied
into each segment (counted in the pool's bytes_copied): Linux's skb_segment shares page
fragments instead; our sk_buffs are linear. `skb_gso_segment` is the compiled
kstack._gso.skb_gso_segment when it is built, else skb_gso_segment_ref (this file's twin,
which NICEMU_PY_GSO=1 forces); tests hold the two equal. Counters in dev.counters: gso_packets (large
segments split), gso_wire_packets (the segments made), gso_bytes (their payload).
"""
from __future__ import annotations

import os
from typing import Any

from kstack.skbuff import CHECKSUM_PARTIAL, NET_SKB_PAD
from wire.checksum import fold

__all__ = ["skb_gso_segment", "skb_gso_segment_ref", "KIND", "skb_is_gso", "GSO_MAX_SIZE", "MAX_TCP_HEADER", "TCP_GSO_MAX_PAYLOAD"]

GSO_MAX_SIZE = 65536  # GSO_LEGACY_MAX_SIZE: a GSO packet's IP length is below this
MAX_TCP_HEADER = 320  # L1_CACHE_ALIGN(128 + MAX_HEADER) on x86-64
TCP_GSO_MAX_PAYLOAD = GSO_MAX_SIZE - 1 - MAX_TCP_HEADER  # tcp_tso_autosize's bound (no pacing)
TH_FIN, TH_PSH, TH_CWR = 0x01, 0x08, 0x80
IPPROTO_TCP = 6


def skb_is_gso(skb: Any) -> bool:
    cb = skb.cb
    return bool(cb) and cb.get("gso_size", 0) > 0


def skb_gso_segment_ref(skb: Any, nh: int | None = None) -> list[Any]:
    """The readable twin of kstack/_gso.pyx's skb_gso_segment. Split a GSO sk_buff (skb.data at the link header, or at the IP header when `nh` is
    skb.data) into MSS-sized ones; the original is consumed. `nh`: the IP header's offset in
    the buffer (default: skb.network_header)."""
    buf = skb.shinfo.buf
    d = skb.data
    ip = skb.network_header if nh is None else nh
    mac_len = ip - d
    ihl = (buf[ip] & 0x0F) << 2
    th = ip + ihl
    thlen = (buf[th + 12] >> 4) << 2
    hlen = th + thlen - d  # link + IP + TCP headers
    mss = skb.cb["gso_size"]
    start = d + hlen
    total = skb.tail - start
    if mss <= 0 or total < 0:
        raise ValueError("skb_gso_segment: bad gso_size or headers past the end")
    ipid0 = buf[ip + 4] << 8 | buf[ip + 5]
    seq0 = int.from_bytes(buf[th + 4:th + 8], "big")
    flags0 = buf[th + 13]
    saddr = int.from_bytes(buf[ip + 12:ip + 16], "big")
    daddr = int.from_bytes(buf[ip + 16:ip + 20], "big")
    pseudo0 = (saddr >> 16) + (saddr & 0xFFFF) + (daddr >> 16) + (daddr & 0xFFFF) + IPPROTO_TCP
    partial = skb.ip_summed == CHECKSUM_PARTIAL
    pool = skb.pool
    dev = skb.dev
    hdr = bytes(buf[d:start])
    src = memoryview(buf)
    out = []
    off = 0
    i = 0
    while off < total:
        n = total - off if total - off < mss else mss
        last = off + n >= total
        s = pool.alloc(hlen + n, NET_SKB_PAD)
        o = s.put(hlen + n)
        b = s.shinfo.buf
        b[o:o + hlen] = hdr
        b[o + hlen:o + hlen + n] = src[start + off:start + off + n]
        sip = o + mac_len
        tot = ihl + thlen + n
        b[sip + 2] = tot >> 8
        b[sip + 3] = tot & 0xFF
        ipid = (ipid0 + i) & 0xFFFF
        b[sip + 4] = ipid >> 8
        b[sip + 5] = ipid & 0xFF
        b[sip + 10] = b[sip + 11] = 0
        c = 0xFFFF - int.from_bytes(b[sip:sip + ihl], "big") % 0xFFFF
        b[sip + 10] = c >> 8
        b[sip + 11] = c & 0xFF
        st = sip + ihl
        seq = (seq0 + off) & 0xFFFFFFFF
        b[st + 4:st + 8] = seq.to_bytes(4, "big")
        fl = flags0
        if i:
            fl &= ~TH_CWR
        if not last:
            fl &= ~(TH_FIN | TH_PSH)
        b[st + 13] = fl
        tcplen = thlen + n
        if partial:
            c = fold(pseudo0 + tcplen)
            s.ip_summed = CHECKSUM_PARTIAL
            s.csum_start = st
            s.csum_offset = 16
        else:
            b[st + 16] = b[st + 17] = 0
            v = int.from_bytes(b[st:st + tcplen], "big")
            if tcplen & 1:
                v <<= 8
            c = 0xFFFF - (v + pseudo0 + tcplen) % 0xFFFF
        b[st + 16] = c >> 8
        b[st + 17] = c & 0xFF
        s.mac_header = o if mac_len else -1
        s.network_header = sip
        s.transport_header = st
        s.protocol = skb.protocol
        s.dev = dev
        s.priority = skb.priority
        s.mark = skb.mark
        s.tstamp = skb.tstamp
        s.pkt_type = skb.pkt_type
        s.sk = skb.sk
        out.append(s)
        off += n
        i += 1
    pool.bytes_copied += total
    if dev is not None:
        c = dev.counters
        c["gso_packets"] = c.get("gso_packets", 0) + 1
        c["gso_wire_packets"] = c.get("gso_wire_packets", 0) + len(out)
        c["gso_bytes"] = c.get("gso_bytes", 0) + total
    skb.consume()
    return out


def _select() -> tuple[Any, str]:
    if os.environ.get("NICEMU_PY_GSO") != "1":
        try:
            from kstack._gso import skb_gso_segment as _compiled
        except ImportError:
            pass
        else:
            return _compiled, "cython"
    return skb_gso_segment_ref, "python"


skb_gso_segment, KIND = _select()
