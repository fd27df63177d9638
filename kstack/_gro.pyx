# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""GRO in C: kstack.gro.GroRef (dev_gro_receive / tcp_gro_receive / napi_gro_complete) step
for step, its docstring says what and why. The headers are read through a pointer into the
sk_buff's buffer instead of struct and int.from_bytes, the held packet's state is C integers,
and the merge copies with memcpy; the sk_buffs, the pool, the flow dict and the counters stay
the Python objects the rest of the stack sees, so every counter is the twin's.
tests/stack/test_kstack_gro.py runs its cases on both and holds them equal on random bursts.
"""
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy, memcmp
from wire._csum cimport csum_sum16 as _sum16  # RFC 1071 sums: one home

from kstack.skbuff import CHECKSUM_UNNECESSARY, NET_IP_ALIGN, NET_SKB_PAD

DEF MAX_GRO_SKBS = 8
DEF GRO_MAX_IP_LEN = 65535
DEF ETH_HLEN = 14
DEF IPPROTO_TCP = 6
DEF TH_FIN = 0x01
DEF TH_SYN = 0x02
DEF TH_RST = 0x04
DEF TH_PSH = 0x08
DEF TH_URG = 0x20
DEF TH_CWR = 0x80
DEF NO_HOLD = TH_URG | TH_PSH | TH_RST | TH_SYN | TH_FIN
DEF FLAGS_SAME = 0xFF & ~(TH_CWR | TH_FIN | TH_PSH)
DEF IP_DF = 0x4000
DEF KEY_LEN = 24

cdef int _UNNECESSARY = CHECKSUM_UNNECESSARY
cdef Py_ssize_t _RX_HEADROOM = NET_SKB_PAD + NET_IP_ALIGN
cdef int _ETH_P_IP = 0x0800


cdef inline uint32_t _be32(const uint8_t *p) noexcept:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef class _Held:
    """One flow's held packet: the segments to merge and what the next one must match."""
    cdef public list skbs
    cdef public bytes opts
    cdef Py_ssize_t hlen, thlen, mss, iplen, poff
    cdef int flags, tos, ttl, df
    cdef uint32_t ack, next_seq, id0, last_id
    cdef uint64_t psum

    def __cinit__(self):
        self.skbs = []


cdef class Gro:
    """One NAPI context's GRO state (napi_struct's gro_hash): the held packets by flow."""
    cdef public object dev
    cdef public dict held

    def __init__(self, dev):
        self.dev = dev
        self.held = {}
        c = dev.counters
        for name in ("gro_held", "gro_merged", "gro_normal", "gro_flush", "gro_packets",
                     "gro_wire_packets", "gro_bytes", "gro_csum_bad"):
            c.setdefault(name, 0)

    cdef inline void _normal(self, dict c, object skb) except *:
        c["gro_normal"] += 1
        self.dev.netif_receive_skb(skb)

    def receive(self, skb):
        """napi_gro_receive: hold, merge, or deliver `skb` (Ethernet header at skb.data)."""
        cdef bytearray buf = skb.shinfo.buf
        cdef Py_ssize_t d = skb.data
        cdef Py_ssize_t n = skb.tail - d
        cdef dict c = self.dev.counters
        cdef const uint8_t *b = <const uint8_t *>PyByteArray_AS_STRING(buf)
        cdef Py_ssize_t blen = PyByteArray_GET_SIZE(buf)
        if d < 0 or n < ETH_HLEN + 40 or d + n > blen or b[d + 12] != 0x08 or b[d + 13] != 0x00:
            self._normal(c, skb)
            return
        cdef const uint8_t *ip = b + d + ETH_HLEN
        cdef Py_ssize_t tot = (ip[2] << 8) | ip[3]
        cdef uint32_t ipid = (ip[4] << 8) | ip[5]
        cdef int frag = (ip[6] << 8) | ip[7]
        if (ip[0] != 0x45 or ip[9] != IPPROTO_TCP or tot + ETH_HLEN != n or frag & 0x3FFF
                or _sum16(ip, 20) % 0xFFFF):
            self._normal(c, skb)  # options, not TCP, padded or short, a fragment, bad header
            return
        cdef const uint8_t *th = ip + 20
        cdef Py_ssize_t thlen = (th[12] >> 4) << 2
        cdef Py_ssize_t tcplen = tot - 20
        if thlen < 20 or thlen > tcplen:
            self._normal(c, skb)
            return
        cdef int flags = th[13]
        cdef uint32_t seq = _be32(th + 4)
        cdef uint32_t ack = _be32(th + 8)
        cdef char key[KEY_LEN]
        memcpy(key, b + d, 12)
        memcpy(key + 12, ip + 12, 12)
        kb = PyBytes_FromStringAndSize(key, KEY_LEN)
        cdef dict held = self.held
        cdef _Held p = held.get(kb)
        cdef uint64_t pseudo = (<uint64_t>_sum16(ip + 12, 8)) + IPPROTO_TCP
        cdef uint64_t hsum = _sum16(th, thlen)
        if skb.ip_summed != _UNNECESSARY:
            # skb_gro_checksum_validate: a bad one goes up alone (TCP counts and drops it)
            if (_sum16(th, tcplen) + pseudo + <uint64_t>tcplen) % 0xFFFF:
                c["gro_csum_bad"] += 1
                if p is not None:
                    self._flush_one(kb, p)
                self._normal(c, skb)
                return
            skb.ip_summed = _UNNECESSARY
        cdef Py_ssize_t plen = tcplen - thlen
        cdef Py_ssize_t hlen = ETH_HLEN + 20 + thlen
        cdef uint64_t psum
        cdef int tos = ip[1], ttl = ip[8], df = frag & IP_DF
        cdef const uint8_t *ob
        if p is not None:
            ob = <const uint8_t *>(<char *>p.opts)
            if (hlen == p.hlen and ack == p.ack and seq == p.next_seq and 0 < plen <= p.mss
                    and not flags & TH_CWR and not (flags ^ p.flags) & FLAGS_SAME
                    and tos == p.tos and ttl == p.ttl and df == p.df
                    and p.iplen + plen <= GRO_MAX_IP_LEN
                    and (ipid == ((p.last_id + 1) & 0xFFFF)
                         or (p.df and ipid == p.last_id and p.last_id == p.id0))
                    and (thlen == 20 or memcmp(th + 20, ob, thlen - 20) == 0)):
                # skb_gro_receive: appended; its payload's sum joins the held one's
                p.skbs.append(skb)
                psum = (0xFFFF - (pseudo + tcplen + hsum) % 0xFFFF) % 0xFFFF
                if p.poff & 1:
                    psum = psum * 256 % 0xFFFF  # at an odd offset its bytes swap places
                p.psum += psum
                p.poff += plen
                p.next_seq = seq + <uint32_t>plen
                p.iplen += plen
                p.last_id = ipid
                p.flags |= flags & (TH_FIN | TH_PSH)
                c["gro_merged"] += 1
                if plen < p.mss or flags & NO_HOLD:
                    self._flush_one(kb, p)
                return
            self._flush_one(kb, p)  # the flow's held packet goes first
        if plen == 0 or flags & (NO_HOLD | TH_CWR):
            self._normal(c, skb)
            return
        if len(held) >= MAX_GRO_SKBS:
            old = next(iter(held))
            self._flush_one(old, held[old])
        p = _Held()
        p.skbs.append(skb)
        p.hlen = hlen
        p.thlen = thlen
        p.flags = flags
        p.ack = ack
        p.opts = PyBytes_FromStringAndSize(<const char *>(th + 20), thlen - 20)
        p.next_seq = seq + <uint32_t>plen
        p.mss = plen
        p.iplen = tot
        p.id0 = p.last_id = ipid
        p.tos = tos
        p.ttl = ttl
        p.df = df
        p.psum = (0xFFFF - (pseudo + tcplen + hsum) % 0xFFFF) % 0xFFFF
        p.poff = plen
        held[kb] = p
        c["gro_held"] += 1

    def flush(self):
        """napi_gro_flush: deliver every held packet, oldest first."""
        cdef dict held = self.held
        if not held:
            return
        self.dev.counters["gro_flush"] += 1
        for key, p in list(held.items()):
            self._flush_one(key, p)

    def _flush_one(self, key, _Held p):
        """napi_gro_complete: one held packet up the stack (merged if it has several)."""
        del self.held[key]
        cdef list skbs = p.skbs
        cdef Py_ssize_t nsegs = len(skbs)
        dev = self.dev
        if nsegs == 1:
            dev.netif_receive_skb(skbs[0])
            return
        first = skbs[0]
        cdef Py_ssize_t hlen = p.hlen
        cdef Py_ssize_t tot = p.iplen
        cdef Py_ssize_t total = tot + ETH_HLEN
        pool = first.pool
        m = pool.alloc(total, _RX_HEADROOM)
        cdef Py_ssize_t o = m.put(total)
        cdef bytearray mbuf = m.shinfo.buf
        if o < 0 or o + total > PyByteArray_GET_SIZE(mbuf):
            raise ValueError("GRO: the merged sk_buff does not hold the packet")
        cdef uint8_t *mb = <uint8_t *>PyByteArray_AS_STRING(mbuf)
        cdef bytearray sbuf
        cdef Py_ssize_t a, k, fd = first.data
        sbuf = first.shinfo.buf
        memcpy(mb + o, PyByteArray_AS_STRING(sbuf) + fd, hlen)
        cdef Py_ssize_t pos = o + hlen
        for s in skbs:
            sbuf = s.shinfo.buf
            a = s.data + hlen
            k = s.tail - a
            if k < 0 or pos + k > o + total or a + k > PyByteArray_GET_SIZE(sbuf):
                raise ValueError("GRO: a held segment changed under it")
            memcpy(mb + pos, PyByteArray_AS_STRING(sbuf) + a, k)
            pos += k
        cdef Py_ssize_t payload = pos - o - hlen
        pool.bytes_copied += payload
        for s in skbs:
            s.consume()
        cdef uint8_t *ip = mb + o + ETH_HLEN
        ip[2] = tot >> 8
        ip[3] = tot & 0xFF
        ip[10] = ip[11] = 0
        cdef uint64_t ipsum = 0xFFFF - _sum16(ip, 20) % 0xFFFF
        ip[10] = ipsum >> 8
        ip[11] = ipsum & 0xFF
        cdef uint8_t *th = ip + 20
        th[13] |= p.flags & (TH_FIN | TH_PSH)
        th[16] = th[17] = 0
        cdef Py_ssize_t tcplen = tot - 20
        cdef uint64_t pseudo = _sum16(ip + 12, 8) + IPPROTO_TCP
        cdef uint64_t check = 0xFFFF - (pseudo + tcplen + _sum16(th, p.thlen) + p.psum) % 0xFFFF
        th[16] = check >> 8
        th[17] = check & 0xFF
        m.protocol = _ETH_P_IP
        m.ip_summed = _UNNECESSARY
        m.tstamp = first.tstamp
        cb = m.cb
        cb["gso_segs"] = nsegs
        cb["gso_size"] = p.mss
        cdef dict c = dev.counters
        c["gro_packets"] += 1
        c["gro_wire_packets"] += nsegs
        c["gro_bytes"] += payload
        dev.netif_receive_skb(m)
