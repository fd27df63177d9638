"""IPv4 (RFC 791, RFC 1122 3.2.1, RFC 1812 for forwarding; Linux's ip_input.c, ip_output.c,
ip_forward.c): receive, local delivery, forwarding, output and fragmentation.

ip_rcv checks a header in Linux's order, each failure counted: shorter than 20 bytes, version
not 4 or IHL below 5 (IpInHdrErrors, IP_INHDR); the header checksum (IpInCsumErrors and
IpInHdrErrors, IP_CSUM); a total length longer than the frame (IpInTruncatedPkts,
PKT_TOO_SMALL) or shorter than the header (IP_INHDR). Link padding after the total length is
trimmed. Then the route decides: one of our addresses or a broadcast -> local delivery
(reassembly first for fragments, then the protocol registered for the protocol number, raw
sockets getting clones); anything else is forwarded when net.ipv4.ip_forward is set, and
otherwise dropped as IpInAddrErrors. Martian sources (multicast, broadcast, 0/8, 127/8, our
own addresses) are dropped IP_INVALID_SOURCE.

Output pushes the 20-byte header in front of the transport header (an id per destination,
DF when the datagram fits the MTU, as Linux's IP_PMTUDISC_WANT), then goes to the neighbour
layer, fragmenting by the device MTU first (IpFragOKs, IpFragCreates; DF set -> IpFragFails
and ICMP fragmentation needed). Forwarding decrements the TTL with an incremental checksum
update (RFC 1624); TTL 1 gives ICMP time exceeded.
"""
from __future__ import annotations

import struct
from collections import deque
from typing import TYPE_CHECKING, Callable

from nicemu import tracepoint
from kstack.dropreason import SkbDropReason
from kstack.route import RTN_BROADCAST, RTN_LOCAL, RTN_UNICAST, FibResult
from kstack.skbuff import (CHECKSUM_COMPLETE, CHECKSUM_NONE, CHECKSUM_PARTIAL,
                           CHECKSUM_UNNECESSARY, MAX_HEADER, SkBuff)
from kstack.neighbour import NUD_CONNECTED
from kstack.stack import PACKET_HOST, PACKET_OTHERHOST
from wire.checksum import fold, ones_sum, internet_checksum
from wire.ethernet import ETH_HLEN, EtherType
from wire.icmp import (ICMP_DEST_UNREACH, ICMP_EXC_TTL, ICMP_FRAG_NEEDED, ICMP_HOST_UNREACH,
                       ICMP_NET_UNREACH, ICMP_PARAMETERPROB, ICMP_PROT_UNREACH,
                       ICMP_TIME_EXCEEDED)
from wire.ipv4 import (HDR, IP_DF, IP_MF, IP_OFFMASK, IPV4_MIN_HLEN, IPVERSION,
                       IP_MAXPACKET, decrease_ttl, is_lbcast, is_loopback, is_multicast,
                       is_zeronet)
from wire.mac import BROADCAST

if TYPE_CHECKING:
    from kstack.inet import Inet

__all__ = ["Ipv4", "IP_IDENTS_SZ", "LOOPBACK_QLEN"]

_ETH = struct.Struct("!6s6sH")
_ADDRS = struct.Struct("!II")
_SRR = -2  # _options_check: a source route
_U32 = struct.Struct("!I")
IP_RT_MIN_PMTU = 552  # net.ipv4.route.min_pmtu: 512 + 20 + 20
IP_RT_MTU_EXPIRES = 600 * 1_000_000_000  # net.ipv4.route.mtu_expires: 10 minutes
PMTU_MAX = 4096  # destinations with a learned path MTU
IP_IDENTS_SZ = 2048  # Linux's ip_idents: id counters hashed by destination
LOOPBACK_QLEN = 1000  # datagrams to our own addresses waiting for the loopback "device"
_ETH_IP = EtherType.IPV4


def _tos2prio() -> Callable[[int], int]:
    from kstack.qdisc import rt_tos2priority
    return rt_tos2priority


class Ipv4:
    def __init__(self, inet: "Inet") -> None:
        self.inet = inet
        self.stack = inet.stack
        self.snmp = inet.stack.snmp
        self.idents = [0] * IP_IDENTS_SZ
        self.rt_tos2priority = _tos2prio()
        self.pmtu: dict[int, tuple[int, int]] = {}  # dst -> (mtu, expires ns)
        self._lo_queue: deque[SkBuff] = deque()
        self._lo_timer = self.stack.timers.timer(self._loopback_run, "loopback")

    # --- receive ------------------------------------------------------------------------------

    def rcv(self, skb: SkBuff) -> None:
        """ip_rcv + ip_rcv_core: validate the header, trim padding, route."""
        if skb.pkt_type == PACKET_OTHERHOST:
            skb.drop(SkbDropReason.OTHERHOST)
            return
        snmp = self.snmp
        snmp["IpInReceives"] += 1
        off = skb.data
        n = skb.tail - off
        buf = skb.shinfo.buf
        if n < IPV4_MIN_HLEN:
            return self._hdr_error(skb)
        vihl = buf[off]
        ihl = (vihl & 15) << 2
        if vihl >> 4 != IPVERSION or ihl < IPV4_MIN_HLEN or n < ihl:
            return self._hdr_error(skb)
        # the header checksum is always checked in software, as Linux's ip_fast_csum. A
        # 16-bit one's complement sum is the value mod 0xFFFF (2^16 = 1 mod 0xFFFF), so a
        # correct header (which sums to 0xFFFF, and is not all zeros) is 0 mod 0xFFFF
        if int.from_bytes(memoryview(buf)[off:off + ihl], "big") % 0xFFFF:
            snmp["IpInCsumErrors"] += 1
            snmp["IpInHdrErrors"] += 1
            skb.drop(SkbDropReason.IP_CSUM)
            return
        tot = buf[off + 2] << 8 | buf[off + 3]
        if tot > n:
            snmp["IpInTruncatedPkts"] += 1
            skb.drop(SkbDropReason.PKT_TOO_SMALL)
            return
        if tot < ihl:
            return self._hdr_error(skb)
        if tot < n:
            skb.trim(tot)  # Ethernet padding (pskb_trim_rcsum)
            if skb.ip_summed == CHECKSUM_COMPLETE:
                skb.ip_summed = CHECKSUM_NONE
        skb.network_header = off
        skb.transport_header = off + ihl
        if ihl > IPV4_MIN_HLEN:
            bad = self._options_check(buf, off, ihl)
            if bad == _SRR:
                skb.drop(SkbDropReason.IP_SOURCE_ROUTE)  # accept_source_route=0: not counted
                return
            if bad >= 0:
                # ip_options_compile: parameter problem pointing at the bad octet (RFC 1122
                # 3.2.2.5), and IpInHdrErrors
                self.inet.icmp.send(skb, ICMP_PARAMETERPROB, 0, bad)
                return self._hdr_error(skb)
        if tracepoint.enabled:
            tracepoint.emit("l3.ip_rcv", tot_len=tot, proto=buf[off + 9], csum="ok", IpInReceives=snmp["IpInReceives"])
        self._rcv_finish(skb, False)

    def _hdr_error(self, skb: SkBuff) -> None:
        self.snmp["IpInHdrErrors"] += 1
        skb.drop(SkbDropReason.IP_INHDR)

    @staticmethod
    def _options_check(buf: bytearray, off: int, ihl: int) -> int:
        """ip_options_compile, reduced: every option's length stays inside the header.
        Returns -1 when the options are fine, _SRR for a source route (Linux's
        accept_source_route=0 drops it), else the offset of the bad octet in the header.
        Options are carried, not acted on."""
        i, end = off + IPV4_MIN_HLEN, off + ihl
        while i < end:
            t = buf[i]
            if t == 0:  # IPOPT_END
                return -1
            if t == 1:  # IPOPT_NOOP
                i += 1
                continue
            if i + 1 >= end:
                return i - off
            ln = buf[i + 1]
            if ln < 2 or i + ln > end:
                return i + 1 - off
            if t in (131, 137):  # IPOPT_LSRR, IPOPT_SSRR
                return _SRR
            i += ln
        return -1

    def _rcv_finish(self, skb: SkBuff, from_lo: bool) -> None:
        """ip_rcv_finish + ip_route_input: to us, a broadcast, or on to forwarding."""
        inet = self.inet
        src, dst = _ADDRS.unpack_from(skb.shinfo.buf, skb.network_header + 12)
        hi = src >> 24
        # martian sources: 0/8 (except to the limited broadcast), 127/8, 224/4, the limited
        # broadcast, a broadcast or an address of ours
        if not from_lo and (hi == 127 or 224 <= hi < 240 or src == 0xFFFFFFFF
                            or src in inet.local_addrs or src in inet.bcast_addrs
                            or (hi == 0 and dst != 0xFFFFFFFF)):
            skb.drop(SkbDropReason.IP_INVALID_SOURCE)
            return
        if dst in inet.local_addrs:
            self.local_deliver(skb)
        elif dst == 0xFFFFFFFF or dst in inet.bcast_addrs:
            skb.cb["rt_broadcast"] = True  # RTCF_BROADCAST: UDP delivers to every socket
            self.local_deliver(skb)
        elif is_multicast(dst) or is_zeronet(dst) or is_loopback(dst):
            skb.drop(SkbDropReason.IP_INVALID_DEST)
        elif not self.stack.sysctl.ip_forward:
            self.snmp["IpInAddrErrors"] += 1
            skb.drop(SkbDropReason.IP_INADDRERRORS)
        else:
            self.forward(skb, dst)

    # --- local delivery -------------------------------------------------------------------------

    def local_deliver(self, skb: SkBuff) -> None:
        """ip_local_deliver: reassemble, then hand to raw sockets and the protocol."""
        buf = skb.shinfo.buf
        nh = skb.network_header
        if (buf[nh + 6] << 8 | buf[nh + 7]) & (IP_MF | IP_OFFMASK):
            skb = self.inet.frags.defrag(skb, skb.tstamp or self.stack.clock())
            if skb is None:
                return
            buf = skb.shinfo.buf
            nh = skb.network_header
        skb.data = skb.transport_header
        proto = buf[nh + 9]
        inet = self.inet
        raw = inet.raw.deliver(skb, proto) if inet.raw.socks else False
        entry = inet.protocols.get(proto)
        if entry is not None:
            self.snmp["IpInDelivers"] += 1
            entry[0](skb)
        elif raw:
            self.snmp["IpInDelivers"] += 1
            skb.consume()
        else:
            self.snmp["IpInUnknownProtos"] += 1
            inet.icmp.send(skb, ICMP_DEST_UNREACH, ICMP_PROT_UNREACH, 0)
            skb.drop(SkbDropReason.IP_NOPROTO)

    # --- forwarding -------------------------------------------------------------------------------

    def forward(self, skb: SkBuff, dst: int) -> None:
        """ip_forward (RFC 1812 5.3): not to us; route it on with TTL - 1."""
        snmp = self.snmp
        if skb.pkt_type != PACKET_HOST:
            skb.drop(SkbDropReason.OTHERHOST)  # a link broadcast is not forwarded
            return
        icmp = self.inet.icmp
        res = self.inet.fib.lookup(dst)
        if res is None or res.type != RTN_UNICAST:
            snmp["IpInNoRoutes"] += 1
            icmp.send(skb, ICMP_DEST_UNREACH, ICMP_NET_UNREACH if res is None else ICMP_HOST_UNREACH, 0)
            skb.drop(SkbDropReason.IP_INNOROUTES)
            return
        nh = skb.network_header
        buf = skb.shinfo.buf
        if buf[nh + 8] <= 1:
            # RFC 1812 5.3.1: a router must not forward a datagram whose TTL it decrements to 0
            snmp["IpInHdrErrors"] += 1
            icmp.send(skb, ICMP_TIME_EXCEEDED, ICMP_EXC_TTL, 0)
            skb.drop(SkbDropReason.IP_TTL_EXCEEDED)
            return
        mtu = self.path_mtu(res, dst)
        if skb.len > mtu and buf[nh + 6] & (IP_DF >> 8):
            snmp["IpFragFails"] += 1
            icmp.send(skb, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, mtu)
            skb.drop(SkbDropReason.PKT_TOO_BIG)
            return
        skb.cow(ETH_HLEN)  # we write the TTL and a new link header: the bytes must be ours
        buf = skb.shinfo.buf
        nh = skb.network_header
        decrease_ttl(buf, nh)
        skb.ip_summed = CHECKSUM_NONE
        skb.priority = self.rt_tos2priority(buf[nh + 1])
        snmp["IpForwDatagrams"] += 1
        self.finish_output(skb, res, skb.tstamp or self.stack.clock())

    # --- output ------------------------------------------------------------------------------------

    def route_output(self, dst: int) -> FibResult | None:
        """ip_route_output: None (and IpOutNoRoutes) when nothing covers dst."""
        res = self.inet.fib.lookup(dst)
        if res is None and dst == 0xFFFFFFFF:
            res = self.inet.limited_broadcast_route()
        if res is None:
            self.snmp["IpOutNoRoutes"] += 1
        return res

    # --- path MTU (RFC 1191) -------------------------------------------------------------------

    def path_mtu(self, res: FibResult, dst: int) -> int:
        """The route's MTU, lowered by what a fragmentation-needed taught us (Linux keeps it
        as a route exception for ip_rt_mtu_expires)."""
        mtu = res.dev.mtu
        if self.pmtu:
            e = self.pmtu.get(dst)
            if e is not None:
                if e[1] > self.stack.clock():
                    return min(mtu, e[0])
                del self.pmtu[dst]
        return mtu

    def update_pmtu(self, dst: int, mtu: int, now: int) -> None:
        """__ip_rt_update_pmtu: remember a smaller MTU towards dst; below ip_rt_min_pmtu the
        minimum is used (a forged tiny MTU cannot make us send 68-byte fragments)."""
        mtu = max(mtu, IP_RT_MIN_PMTU)
        if len(self.pmtu) >= PMTU_MAX and dst not in self.pmtu:
            del self.pmtu[next(iter(self.pmtu))]
        old = self.pmtu.get(dst)
        if old is None or mtu < old[0] or old[1] <= now:
            self.pmtu[dst] = (mtu, now + IP_RT_MTU_EXPIRES)

    @staticmethod
    def _dst_of(skb: SkBuff) -> int:
        return _U32.unpack_from(skb.shinfo.buf, skb.network_header + 16)[0]

    def select_ident(self, dst: int, proto: int, segs: int = 1) -> int:
        """ip_select_ident(_segs): ids from a counter per destination hash, so that a peer sees
        increasing ids without one global counter leaking traffic rates; a GSO packet
        reserves one per segment (the split numbers them from the first)."""
        i = (dst * 2654435761 ^ proto) % IP_IDENTS_SZ
        v = (self.idents[i] + 1) & 0xFFFF
        self.idents[i] = (v + segs - 1) & 0xFFFF
        return v

    def output(self, skb: SkBuff, src: int, dst: int, proto: int, res: FibResult,
               tos: int = 0, ttl: int = 0, df: bool | None = None) -> None:
        """ip_build_and_send_pkt / ip_send_skb: `skb.data` is at the transport header; push
        the IP header and send. df None: set DF when the datagram fits the route's MTU."""
        tot = skb.len + IPV4_MIN_HLEN
        if tot > IP_MAXPACKET:
            self.snmp["IpOutDiscards"] += 1
            skb.drop(SkbDropReason.PKT_TOO_BIG)
            return
        skb.reset_transport_header()
        off = skb.push(IPV4_MIN_HLEN)
        segs = skb.cb.get("gso_segs", 1) if skb.cb else 1  # a GSO packet (kstack.gso)
        if df is None:
            df = segs > 1 or tot <= self.path_mtu(res, dst)
        buf = skb.shinfo.buf
        HDR.pack_into(buf, off, 0x45, tos, tot, self.select_ident(dst, proto, segs), IP_DF if df else 0,
                      ttl or self.stack.sysctl.ip_default_ttl, proto, 0, src, dst)
        c = internet_checksum(memoryview(buf)[off:off + IPV4_MIN_HLEN])
        buf[off + 10] = c >> 8
        buf[off + 11] = c & 0xFF
        skb.network_header = off
        skb.protocol = _ETH_IP
        skb.priority = self.rt_tos2priority(tos)
        if tracepoint.enabled:
            tracepoint.emit("l3.ip_output", tot_len=tot, dev=res.dev.name, IpOutRequests=self.snmp["IpOutRequests"])
        self.snmp["IpOutRequests"] += 1
        now = self.stack.clock()
        if res.type == RTN_LOCAL:
            self._loopback_xmit(skb, res, now)
            return
        if res.type == RTN_BROADCAST:
            # ip_mc_output: a broadcast we send is also received here (dev_loopback_xmit)
            self._loopback_xmit(skb.copy(), res, now)
        self.finish_output(skb, res, now)

    def finish_output(self, skb: SkBuff, res: FibResult, now: int) -> None:
        """ip_finish_output: fragment when larger than the MTU, then the neighbour. A GSO
        packet is split at dev_queue_xmit, unless a segment would not fit the path MTU: then
        here, each segment then fragmented as needed (ip_finish_output_gso)."""
        if skb.cb and "gso_size" in skb.cb:
            mtu = self.path_mtu(res, self._dst_of(skb)) if self.pmtu else res.dev.mtu
            th = skb.transport_header
            seg_len = th - skb.network_header + ((skb.shinfo.buf[th + 12] >> 4) << 2) + skb.cb["gso_size"]
            if seg_len > mtu:
                from kstack.gso import skb_gso_segment
                for seg in skb_gso_segment(skb, skb.data):
                    self.finish_output(seg, res, now)
                return
            self.neigh_output(skb, res, now)
            return
        if skb.len > res.dev.mtu or (self.pmtu and skb.len > self.path_mtu(res, self._dst_of(skb))):
            self.fragment(skb, res, now)
        else:
            self.neigh_output(skb, res, now)

    def neigh_output(self, skb: SkBuff, res: FibResult, now: int) -> None:
        """ip_finish_output2 + neigh_output: the link header from the neighbour entry, or
        wait for its resolution."""
        dev = res.dev
        if res.type == RTN_BROADCAST or is_lbcast(res.nexthop) or res.nexthop in self.inet.bcast_addrs:
            self._eth_xmit(skb, dev, BROADCAST)
            return
        table = self.inet.neigh
        n = table.entries.get((dev.ifindex, res.nexthop))
        if n is None:
            n = table.create(dev, res.nexthop, now)
            if n is None:
                skb.drop(SkbDropReason.NEIGH_CREATEFAIL)
                return
        else:
            table.stats["lookups"] += 1
            table.stats["hits"] += 1
        if n.nud_state & NUD_CONNECTED:
            n.used = now
            self._eth_xmit(skb, dev, n.ha)  # type: ignore[arg-type]
        elif n.event_send(skb, now):
            self._eth_xmit(skb, dev, n.ha)  # type: ignore[arg-type]

    def neigh_xmit(self, n, skb: SkBuff, now: int) -> None:
        """A packet that waited for resolution, now resolved."""
        self._eth_xmit(skb, n.dev, n.ha)

    def _eth_xmit(self, skb: SkBuff, dev, ha: bytes) -> None:
        off = skb.push(ETH_HLEN)
        _ETH.pack_into(skb.shinfo.buf, off, ha, dev.dev_addr, _ETH_IP)
        if tracepoint.enabled:
            tracepoint.emit("l2.neigh_output", dst=ha.hex(":"), dev=dev.name)
        skb.mac_header = off
        skb.dev = dev
        self.stack.dev_queue_xmit(skb)

    # --- fragmentation ---------------------------------------------------------------------------

    def fragment(self, skb: SkBuff, res: FibResult, now: int) -> None:
        """ip_do_fragment (slow path): cut the payload into pieces of (MTU - header) rounded
        down to 8 bytes, each with a copy of the header (RFC 791 "copied" options only after
        the first), MF on all but the last, offsets in 8-byte units."""
        snmp = self.snmp
        buf = skb.shinfo.buf
        nh = skb.network_header
        ihl = (buf[nh] & 15) << 2
        ff = buf[nh + 6] << 8 | buf[nh + 7]
        mtu = self.path_mtu(res, self._dst_of(skb))
        room = (mtu - ihl) & ~7
        if ff & IP_DF or room < 8:
            snmp["IpFragFails"] += 1
            self.inet.icmp.send(skb, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, mtu)
            skb.drop(SkbDropReason.PKT_TOO_BIG)
            return
        if skb.ip_summed == CHECKSUM_PARTIAL:
            self._checksum_help(skb)  # the device cannot sum a datagram cut in pieces
        hdr = bytes(buf[nh:nh + ihl])
        later_hdr = hdr if ihl == IPV4_MIN_HLEN else self._options_fragment(hdr)
        payload = skb.len - ihl
        base = (ff & IP_OFFMASK) << 3
        more = ff & IP_MF
        pos = 0
        pool = self.stack.pool
        view = memoryview(buf)
        start = nh + ihl
        while pos < payload:
            ln = min(room, payload - pos)
            h = hdr if pos == 0 else later_hdr
            hl = len(h)
            f = pool.alloc(hl + ln, MAX_HEADER)
            o = f.put(hl + ln)
            fb = f.shinfo.buf
            fb[o:o + hl] = h
            fb[o + hl:o + hl + ln] = view[start + pos:start + pos + ln]
            pool.bytes_copied += ln
            fo = ((base + pos) >> 3) | (IP_MF if pos + ln < payload or more else 0)
            struct.pack_into("!HHH", fb, o + 2, hl + ln, fb[o + 4] << 8 | fb[o + 5], fo)
            fb[o + 10] = fb[o + 11] = 0
            c = internet_checksum(memoryview(fb)[o:o + hl])
            fb[o + 10] = c >> 8
            fb[o + 11] = c & 0xFF
            f.network_header = o
            f.transport_header = o + hl
            f.protocol = _ETH_IP
            f.priority = skb.priority
            f.mark = skb.mark
            if skb.destructor is not None:  # skb_set_owner_w: each fragment is charged
                sk = f.sk = skb.sk
                f.destructor = skb.destructor
                sk.wmem += f.truesize
            snmp["IpFragCreates"] += 1
            self.neigh_output(f, res, now)
            pos += ln
        view.release()
        snmp["IpFragOKs"] += 1
        skb.consume()

    @staticmethod
    def _options_fragment(hdr: bytes) -> bytes:
        """ip_options_fragment: options without the "copied" flag become NOOPs after the
        first fragment (RFC 791: "copied flag ... 1 = copied into all fragments")."""
        h = bytearray(hdr)
        i = IPV4_MIN_HLEN
        while i < len(h):
            t = h[i]
            if t == 0:
                break
            if t == 1:
                i += 1
                continue
            ln = h[i + 1] if i + 1 < len(h) else 0
            if ln < 2:
                break
            if not t & 0x80:
                h[i:i + ln] = b"\x01" * ln
            i += ln
        return bytes(h)

    @staticmethod
    def _checksum_help(skb: SkBuff) -> None:
        """skb_checksum_help: finish a CHECKSUM_PARTIAL checksum in software (the field holds
        the pseudo-header sum already)."""
        buf = skb.shinfo.buf
        start = skb.csum_start
        c = ~fold(ones_sum(memoryview(buf)[start:skb.tail])) & 0xFFFF
        at = start + skb.csum_offset
        c = c or 0xFFFF
        buf[at] = c >> 8
        buf[at + 1] = c & 0xFF
        skb.ip_summed = CHECKSUM_NONE

    # --- loopback ------------------------------------------------------------------------------------

    def _loopback_xmit(self, skb: SkBuff, res: FibResult, now: int) -> None:
        """A datagram to one of our own addresses goes round through a loopback queue (lo's
        backlog), delivered on the next timer run: never re-entering the sender."""
        if len(self._lo_queue) >= LOOPBACK_QLEN:
            self.snmp["IpOutDiscards"] += 1
            skb.drop(SkbDropReason.QDISC_DROP)
            return
        skb.dev = res.dev
        skb.pkt_type = PACKET_HOST
        d = skb.destructor
        if d is not None:  # skb_orphan (loopback_xmit): the sender's memory is given back
            skb.destructor = None
            d(skb)
            skb.sk = None
        if skb.ip_summed == CHECKSUM_PARTIAL:
            skb.ip_summed = CHECKSUM_UNNECESSARY  # lo: the data never left memory
        self._lo_queue.append(skb)
        if not self._lo_timer.pending:
            self._lo_timer.mod(now)

    def _loopback_run(self, now: int) -> None:
        q = self._lo_queue
        for _ in range(len(q)):
            skb = q.popleft()
            self.snmp["IpInReceives"] += 1
            skb.data = skb.network_header
            self._rcv_finish(skb, True)

    def flush(self) -> None:
        """Free what waits on the loopback queue (the stack is going away)."""
        while self._lo_queue:
            self._lo_queue.popleft().drop(SkbDropReason.DEV_READY)
