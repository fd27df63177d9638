# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""GSO in C: kstack.gso.skb_gso_segment_ref (tcp_gso_segment / skb_segment) step for step,
its docstring says what and why. Each segment's headers and payload are written with memcpy
and its IP and TCP fields and checksums on C integers; the sk_buffs still come from the
pool's alloc (so the pool counts them as before) and carry the same metadata.
tests/stack/test_kstack_gso.py runs its cases on both and holds them equal on random sizes.
"""
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy
from wire._csum cimport csum_sum16 as _sum16, csum_fold as _fold  # RFC 1071 sums: one home

from kstack.skbuff import CHECKSUM_PARTIAL, NET_SKB_PAD

DEF TH_FIN = 0x01
DEF TH_PSH = 0x08
DEF TH_CWR = 0x80
DEF IPPROTO_TCP = 6

cdef int _PARTIAL = CHECKSUM_PARTIAL
cdef Py_ssize_t _PAD = NET_SKB_PAD


def skb_gso_segment(skb, nh=None):
    """kstack.gso.skb_gso_segment_ref in C: the GSO sk_buff split into MSS-sized ones."""
    cdef bytearray buf = skb.shinfo.buf
    cdef Py_ssize_t d = skb.data
    cdef Py_ssize_t ip = skb.network_header if nh is None else nh
    cdef Py_ssize_t tail = skb.tail
    cdef Py_ssize_t blen = PyByteArray_GET_SIZE(buf)
    cdef const uint8_t *b = <const uint8_t *>PyByteArray_AS_STRING(buf)
    if d < 0 or ip < d or ip + 20 > tail or tail > blen:
        raise ValueError("skb_gso_segment: no IP header inside the packet")
    cdef Py_ssize_t mac_len = ip - d
    cdef Py_ssize_t ihl = (b[ip] & 0x0F) << 2
    cdef Py_ssize_t th = ip + ihl
    if th + 20 > tail:
        raise ValueError("skb_gso_segment: no TCP header inside the packet")
    cdef Py_ssize_t thlen = (b[th + 12] >> 4) << 2
    cdef Py_ssize_t hlen = th + thlen - d
    cdef Py_ssize_t mss = skb.cb["gso_size"]
    cdef Py_ssize_t start = d + hlen
    cdef Py_ssize_t total = tail - start
    if mss <= 0 or total < 0:
        raise ValueError("skb_gso_segment: bad gso_size or headers past the end")
    cdef uint32_t ipid0 = (b[ip + 4] << 8) | b[ip + 5]
    cdef uint32_t seq0 = ((<uint32_t>b[th + 4] << 24) | (<uint32_t>b[th + 5] << 16)
                          | (<uint32_t>b[th + 6] << 8) | b[th + 7])
    cdef int flags0 = b[th + 13]
    cdef uint64_t pseudo0 = _sum16(b + ip + 12, 8) + IPPROTO_TCP
    cdef bint partial = skb.ip_summed == _PARTIAL
    pool = skb.pool
    dev = skb.dev
    protocol = skb.protocol
    priority = skb.priority
    mark = skb.mark
    tstamp = skb.tstamp
    pkt_type = skb.pkt_type
    sk = skb.sk
    cdef list out = []
    cdef Py_ssize_t off = 0, i = 0, n, o, sip, st, tot, tcplen
    cdef bint last
    cdef bytearray sbuf
    cdef uint8_t *sb
    cdef uint32_t ipid, seq
    cdef uint64_t c
    cdef int fl
    while off < total:
        n = total - off if total - off < mss else mss
        last = off + n >= total
        s = pool.alloc(hlen + n, _PAD)
        o = s.put(hlen + n)
        sbuf = s.shinfo.buf
        if o < 0 or o + hlen + n > PyByteArray_GET_SIZE(sbuf):
            raise ValueError("skb_gso_segment: the segment's sk_buff does not hold it")
        sb = <uint8_t *>PyByteArray_AS_STRING(sbuf)
        b = <const uint8_t *>PyByteArray_AS_STRING(buf)  # the source stays where it was
        memcpy(sb + o, b + d, hlen)
        memcpy(sb + o + hlen, b + start + off, n)
        sip = o + mac_len
        tot = ihl + thlen + n
        sb[sip + 2] = tot >> 8
        sb[sip + 3] = tot & 0xFF
        ipid = (ipid0 + i) & 0xFFFF
        sb[sip + 4] = ipid >> 8
        sb[sip + 5] = ipid & 0xFF
        sb[sip + 10] = sb[sip + 11] = 0
        c = 0xFFFF - _sum16(sb + sip, ihl) % 0xFFFF
        sb[sip + 10] = c >> 8
        sb[sip + 11] = c & 0xFF
        st = sip + ihl
        seq = seq0 + <uint32_t>off
        sb[st + 4] = seq >> 24
        sb[st + 5] = (seq >> 16) & 0xFF
        sb[st + 6] = (seq >> 8) & 0xFF
        sb[st + 7] = seq & 0xFF
        fl = flags0
        if i:
            fl &= ~TH_CWR
        if not last:
            fl &= ~(TH_FIN | TH_PSH)
        sb[st + 13] = fl
        tcplen = thlen + n
        if partial:
            c = _fold(pseudo0 + <uint64_t>tcplen)
            s.ip_summed = _PARTIAL
            s.csum_start = st
            s.csum_offset = 16
        else:
            sb[st + 16] = sb[st + 17] = 0
            c = 0xFFFF - (_sum16(sb + st, tcplen) + pseudo0 + <uint64_t>tcplen) % 0xFFFF
        sb[st + 16] = c >> 8
        sb[st + 17] = c & 0xFF
        s.mac_header = o if mac_len else -1
        s.network_header = sip
        s.transport_header = st
        s.protocol = protocol
        s.dev = dev
        s.priority = priority
        s.mark = mark
        s.tstamp = tstamp
        s.pkt_type = pkt_type
        s.sk = sk
        out.append(s)
        off += n
        i += 1
    pool.bytes_copied += total
    if dev is not None:
        cnt = dev.counters
        cnt["gso_packets"] = cnt.get("gso_packets", 0) + 1
        cnt["gso_wire_packets"] = cnt.get("gso_wire_packets", 0) + len(out)
        cnt["gso_bytes"] = cnt.get("gso_bytes", 0) + total
    skb.consume()
    return out
