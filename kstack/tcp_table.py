"""The TCP socket table (Linux's tcp_hashinfo with tcp_ipv4.c's handlers): the bind table and
ephemeral ports (inet_csk_get_port), the established hash and the listeners (demux, tcp_v4_rcv),
the SYN and accept queues of a listener (tcp_v4_conn_request, without syncookies), TIME_WAIT
and orphan accounting, segment output through IP with the checksum or its offload, RSTs for
segments no socket takes, ICMP errors (tcp_v4_err); `ss()` lists it as `ss -tani` does.
TcpSysctl has this layer's net.ipv4.tcp_* bounds. The sockets themselves are kstack.tcp_sock's.
"""
from __future__ import annotations

import errno
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kstack.dropreason import SkbDropReason
from kstack.gso import TCP_GSO_MAX_PAYLOAD
from kstack.netdevice import NetdevFeatures
from kstack.route import RTN_LOCAL
from kstack.skbuff import CHECKSUM_PARTIAL, CHECKSUM_UNNECESSARY, MAX_HEADER
from kstack.sock import IPPROTO_TCP, SOCK_STREAM, pick_ephemeral
from kstack.tcp import IsnGenerator, TcpConnection, TcpState, reset_for
from kstack.tcp.ratelimit import ChallengeAckLimiter
from wire import MalformedPacket
from wire.checksum import fold
from wire.ipv4 import IPV4_MIN_HLEN, ntoa
from wire.tcp import TH_ACK, TH_FIN, TH_RST, TH_SYN, TcpSegment

if TYPE_CHECKING:
    from kstack.inet import Inet
    from kstack.tcp_sock import TcpSock

_ADDRS = struct.Struct("!II")
_PORTS = struct.Struct("!HH")
_CONNECTING = (TcpState.SYN_SENT, TcpState.SYN_RECEIVED)


@dataclass
class TcpSysctl:
    """net.ipv4.tcp_* this layer has (the engine's are TcpConfig's). Linux sizes the first
    two by memory; ours are fixed bounds."""

    tcp_max_tw_buckets: int = 4096  # TIME_WAIT entries kept; more: TcpExtTCPTimeWaitOverflow
    tcp_max_orphans: int = 4096  # closed-by-the-application connections still finishing
    tcp_max_syn_backlog: int = 1024  # bounds every SYN queue, whatever the backlog
    default_rcvbuf: int = 131072  # tcp_rmem[1]
    default_sndbuf: int = 262144  # ours: tcp_wmem[1] is 16384 and grows by autotuning, which
    #                               we do not model; a bulk flow needs this much from the start
    max_connections: int = 65536  # ours: sockets of every kind in the table


class TcpTable:
    """tcp_hashinfo and the protocol handlers: the bind table, the established hash, the
    listeners, TIME_WAIT accounting, segment input and output."""

    def __init__(self, inet: "Inet", sysctl: TcpSysctl | None = None) -> None:
        self.inet = inet
        self.stack = inet.stack
        self.snmp = inet.stack.snmp
        self.sysctl = sysctl or TcpSysctl()
        self.rng = inet.rng
        self.isn = IsnGenerator()
        self.limiter = ChallengeAckLimiter()
        self.bhash: dict[int, list[TcpSock]] = {}  # port -> sockets bound to it
        self.ehash: dict[tuple[int, int, int, int], TcpSock] = {}  # (laddr, lport, raddr, rport)
        self.lhash: dict[int, list[TcpSock]] = {}  # port -> listeners
        self.tw: OrderedDict[int, TcpSock] = OrderedDict()  # orphans in TIME_WAIT, oldest first
        self.orphans = 0
        self.count = 0  # sockets bound

    # --- ports ------------------------------------------------------------------------------

    def get_port(self, sk: TcpSock, ip: int, port: int) -> None:
        """inet_csk_get_port: bind `sk` to (ip, port), port 0 an ephemeral one."""
        if self.count >= self.sysctl.max_connections:
            raise OSError(errno.ENOBUFS, "too many TCP sockets")
        if port == 0:
            port = self._ephemeral(lambda p: not self._bind_conflict(sk, ip, p))
        elif self._bind_conflict(sk, ip, port):
            raise OSError(errno.EADDRINUSE, "address already in use")
        self._bind(sk, ip, port)

    def _bind(self, sk: TcpSock, ip: int, port: int) -> None:
        sk.saddr, sk.sport, sk.bound = ip, port, True
        self.bhash.setdefault(port, []).append(sk)
        self.count += 1

    def _ephemeral(self, ok: Any) -> int:
        # EADDRNOTAVAIL: Linux's answer to connect
        return pick_ephemeral(self.rng, self.stack.sysctl.ip_local_port_range, ok, errno.EADDRNOTAVAIL)

    def _bind_conflict(self, sk: TcpSock, ip: int, port: int) -> bool:
        """inet_csk_bind_conflict: another socket on the port whose address overlaps, unless
        both set SO_REUSEADDR and it is not listening."""
        for o in self.bhash.get(port, ()):
            if o is sk:
                continue
            if o.saddr and ip and o.saddr != ip:
                continue
            if sk.reuseaddr and o.reuseaddr and not o.listening:
                continue
            return True
        return False

    def listen_conflict(self, sk: TcpSock) -> bool:
        return any(o is not sk and o.listening and (not o.saddr or not sk.saddr or o.saddr == sk.saddr)
                   for o in self.bhash.get(sk.sport, ()))

    def unbind(self, sk: TcpSock) -> None:
        if not sk.bound:
            return
        sk.bound = False
        lst = self.bhash.get(sk.sport)
        if lst and sk in lst:
            lst.remove(sk)
            self.count -= 1
            if not lst:
                del self.bhash[sk.sport]

    # --- hashes -----------------------------------------------------------------------------

    def listen_hash(self, sk: TcpSock) -> None:
        self.lhash.setdefault(sk.sport, []).append(sk)

    def listen_unhash(self, sk: TcpSock) -> None:
        lst = self.lhash.get(sk.sport)
        if lst and sk in lst:
            lst.remove(sk)
            if not lst:
                del self.lhash[sk.sport]

    def listen_stop(self, sk: TcpSock) -> None:
        """inet_csk_listen_stop: every child not accepted is reset and freed."""
        children = sk.synq + sk.acceptq
        sk.synq, sk.acceptq = [], []
        for child in children:
            child.parent = None
            child.closed = True
            child.orphan = True
            self.orphans += 1
            child._abort()
            if child.conn is None or child.conn.state == TcpState.CLOSED or not child.hashed:
                child._destroy()

    def hash(self, sk: TcpSock) -> None:
        self.ehash[(sk.saddr, sk.sport, sk.daddr, sk.dport)] = sk
        sk.hashed = True

    def unhash(self, sk: TcpSock) -> None:
        key = (sk.saddr, sk.sport, sk.daddr, sk.dport)
        if self.ehash.get(key) is sk:
            del self.ehash[key]
        sk.hashed = False

    def time_wait_enter(self, sk: TcpSock) -> None:
        """An orphan entered TIME_WAIT: kept, unless tcp_max_tw_buckets are (then it goes,
        TcpExtTCPTimeWaitOverflow, as Linux's inet_twsk_alloc failing)."""
        if len(self.tw) >= self.sysctl.tcp_max_tw_buckets:
            self.snmp["TcpExtTCPTimeWaitOverflow"] += 1
            sk._destroy()
            return
        self.tw[id(sk)] = sk
        self.snmp["TcpExtTW"] += 1

    def time_wait_leave(self, sk: TcpSock) -> None:
        self.tw.pop(id(sk), None)

    # --- connect ----------------------------------------------------------------------------

    def connect(self, sk: TcpSock, ip: int, port: int, res: Any) -> None:
        """tcp_v4_connect: source from the route (or the bind), an ephemeral port unique for
        the 4-tuple, the MSS from the path MTU, the ISN, SYN-SENT."""
        src = sk.saddr or res.src
        if not src:
            raise OSError(errno.EADDRNOTAVAIL, "no source address")
        if sk.bound:
            if (src, sk.sport, ip, port) in self.ehash:
                raise OSError(errno.EADDRNOTAVAIL, "4-tuple in use")
            sk.saddr = src
        else:
            p = self._ephemeral(lambda p: not self.bhash.get(p) and not self.lhash.get(p)
                                and (src, p, ip, port) not in self.ehash)
            self._bind(sk, src, p)
        sk.daddr, sk.dport = ip, port
        self._set_mss(sk, res, ip)
        now = self.stack.clock()
        iss = self.isn.isn(sk._local(), sk._remote(), now)
        sk.conn = TcpConnection(sk._local(), sk._remote(), sk.config, self.snmp, iss)
        self.hash(sk)
        sk.conn.open_active(now)
        sk._push(now)

    def _set_mss(self, sk: TcpSock, res: Any, dst: int) -> None:
        mtu = self.inet.ip.path_mtu(res, dst) if res is not None else 1500
        sk.config.mss = max(88, min(sk.config.mss, mtu - IPV4_MIN_HLEN - 20))
        # sk_setup_caps: GSO when the device has NETIF_F_GSO (never for a local route)
        gso = (res is not None and res.type != RTN_LOCAL and res.dev.features & NetdevFeatures.GSO)
        sk.config.gso_max_size = TCP_GSO_MAX_PAYLOAD if gso else 0

    # --- output -----------------------------------------------------------------------------

    def xmit(self, seg: TcpSegment, src: int, dst: int, tos: int = 0, ttl: int = 0,
             count: bool = False, gso_size: int = 0) -> None:
        """tcp_transmit_skb -> ip_queue_xmit: the segment with its checksum (or the device's
        CHECKSUM_PARTIAL) to IP. The engine counts its own segments; `count` counts
        TcpOutSegs and TcpOutRsts for this layer's RSTs. A payload larger than `gso_size`
        (the connection's MSS) makes a GSO sk_buff: CHECKSUM_PARTIAL, cb gso_size and
        gso_segs, split into MSS-sized frames at dev_queue_xmit (kstack.gso)."""
        inet = self.inet
        res = inet.ip.route_output(dst)
        snmp = self.snmp
        if res is None:
            return  # IpOutNoRoutes counted; the retransmission timer tries again
        plen = len(seg.payload)
        gso = 0 < gso_size < plen
        offload = gso or (res.type != RTN_LOCAL and res.dev.features & NetdevFeatures.IP_CSUM)
        raw = seg.emit() if offload else seg.emit(src, dst)
        n = len(raw)
        skb = self.stack.pool.alloc(n, MAX_HEADER)
        o = skb.put(n)
        buf = skb.shinfo.buf
        buf[o:o + n] = raw
        self.stack.pool.bytes_copied += plen
        if gso:
            skb.cb["gso_size"] = gso_size
            skb.cb["gso_segs"] = -(-plen // gso_size)
        if gso or offload and n + IPV4_MIN_HLEN <= inet.ip.path_mtu(res, dst):
            psum = (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF) + IPPROTO_TCP + n
            c = fold(psum)
            buf[o + 16] = c >> 8
            buf[o + 17] = c & 0xFF
            skb.ip_summed = CHECKSUM_PARTIAL
            skb.csum_start = o
            skb.csum_offset = 16
        elif offload:  # too big for the device to sum in one frame: software
            from wire.tcp import tcp_checksum
            c = tcp_checksum(memoryview(buf)[o:o + n], src, dst)
            buf[o + 16] = c >> 8
            buf[o + 17] = c & 0xFF
        if count:
            snmp["TcpOutSegs"] += 1
            if seg.flags & TH_RST:
                snmp["TcpOutRsts"] += 1
        inet.ip.output(skb, src, dst, IPPROTO_TCP, res, tos=tos, ttl=ttl)

    def send_reset(self, seg: TcpSegment, src: int, dst: int) -> None:
        """tcp_v4_send_reset: answer a segment no socket takes (never a RST)."""
        if seg.flags & TH_RST:
            return
        rst = reset_for(seg)
        if rst is None:
            return
        self.xmit(rst, src, dst, count=True)

    # --- input ------------------------------------------------------------------------------

    def rcv(self, skb: Any) -> None:
        """tcp_v4_rcv: `skb.data` at the TCP header."""
        snmp = self.snmp
        off = skb.data
        n = skb.tail - off
        buf = skb.shinfo.buf
        if skb.cb and skb.cb.get("rt_broadcast"):
            skb.drop(SkbDropReason.IP_INVALID_DEST)  # TCP is unicast only (pkt_type != HOST)
            return
        if n < 20:
            snmp["TcpInSegs"] += 1
            snmp["TcpInErrs"] += 1
            skb.drop(SkbDropReason.PKT_TOO_SMALL)
            return
        saddr, daddr = _ADDRS.unpack_from(buf, skb.network_header + 12)
        if skb.ip_summed != CHECKSUM_UNNECESSARY:
            v = int.from_bytes(memoryview(buf)[off:off + n], "big")
            if n & 1:
                v <<= 8
            if (v + (saddr >> 16) + (saddr & 0xFFFF) + (daddr >> 16) + (daddr & 0xFFFF)
                    + IPPROTO_TCP + n) % 0xFFFF:
                snmp["TcpInSegs"] += 1
                snmp["TcpInCsumErrors"] += 1
                snmp["TcpInErrs"] += 1
                skb.drop(SkbDropReason.TCP_CSUM)
                return
        try:
            seg = TcpSegment.parse(memoryview(buf)[off:off + n])
        except MalformedPacket:
            snmp["TcpInSegs"] += 1
            snmp["TcpInErrs"] += 1
            skb.drop(SkbDropReason.PKT_TOO_SMALL)  # a data offset or an option that lies
            return
        sport, dport = seg.sport, seg.dport
        now = self.stack.clock()
        sk = self.ehash.get((daddr, dport, saddr, sport))
        if sk is not None and sk.conn is not None:
            parent = sk.parent
            if (parent is not None and sk.conn.state == TcpState.SYN_RECEIVED
                    and seg.flags & TH_ACK and not seg.flags & (TH_RST | TH_SYN)
                    and len(parent.acceptq) > parent.backlog):
                # tcp_check_req -> syn_recv_sock fails: the accept queue is full; the ACK is
                # dropped and the SYN-ACK retransmitted (tcp_abort_on_overflow = 0)
                snmp["TcpInSegs"] += 1
                snmp["TcpExtListenOverflows"] += 1
                snmp["TcpExtListenDrops"] += 1
                skb.drop(SkbDropReason.SOCKET_RCVBUFF)
                return
            try:
                reason = sk.conn.segment_arrives(seg, now)
            finally:
                sk._push(now)
            if reason is None:
                skb.consume()
            else:
                skb.drop(reason)
            return
        lsk = self._listener(daddr, dport)
        if lsk is not None:
            self._listen_rcv(lsk, skb, seg, saddr, daddr, now)
            return
        snmp["TcpInSegs"] += 1  # the engine counts what reaches a connection
        self.send_reset(seg, daddr, saddr)
        skb.drop(SkbDropReason.NO_SOCKET)

    def _listener(self, daddr: int, dport: int) -> TcpSock | None:
        """__inet_lookup_listener: bound to the address beats a wildcard."""
        lst = self.lhash.get(dport)
        if not lst:
            return None
        best = None
        for sk in lst:
            if sk.listen_shut:
                continue
            if sk.saddr == daddr:
                return sk
            if not sk.saddr and best is None:
                best = sk
        return best

    def _listen_rcv(self, lsk: TcpSock, skb: Any, seg: TcpSegment, saddr: int, daddr: int,
                    now: int) -> None:
        """tcp_rcv_state_process in LISTEN (RFC 9293 3.10.7.2) and tcp_conn_request."""
        snmp = self.snmp
        flags = seg.flags
        if not flags & TH_SYN or flags & (TH_RST | TH_ACK | TH_FIN):
            snmp["TcpInSegs"] += 1  # from_syn counts the SYNs it takes
        if flags & TH_RST:
            skb.drop(SkbDropReason.TCP_RESET)
            return
        if flags & TH_ACK:
            self.send_reset(seg, daddr, saddr)
            skb.drop(SkbDropReason.TCP_FLAGS)
            return
        if not flags & TH_SYN or flags & TH_FIN:
            skb.drop(SkbDropReason.TCP_FLAGS)
            return
        limit = min(max(lsk.backlog, 1), self.sysctl.tcp_max_syn_backlog)
        if len(lsk.acceptq) > lsk.backlog:
            snmp["TcpInSegs"] += 1
            snmp["TcpExtListenOverflows"] += 1
            snmp["TcpExtListenDrops"] += 1
            skb.drop(SkbDropReason.SOCKET_RCVBUFF)
            return
        if len(lsk.synq) >= limit or self.count >= self.sysctl.max_connections:
            snmp["TcpInSegs"] += 1
            snmp["TcpExtListenDrops"] += 1  # the request queue is full (no syncookies)
            skb.drop(SkbDropReason.SOCKET_RCVBUFF)
            return
        from kstack.tcp_sock import TcpSock  # tcp_sock imports this module
        child = TcpSock(self.stack, lsk.family, SOCK_STREAM, IPPROTO_TCP)
        child.rcvbuf, child.sndbuf = lsk.rcvbuf, lsk.sndbuf
        child.reuseaddr, child.tos, child.ttl, child.linger = lsk.reuseaddr, lsk.tos, lsk.ttl, lsk.linger
        child.config = lsk.config.copy()
        child.daddr, child.dport = saddr, seg.sport
        self._bind(child, daddr, lsk.sport)
        self._set_mss(child, self.inet.ip.route_output(saddr), saddr)
        iss = self.isn.isn(child._local(), child._remote(), now)
        try:
            child.conn = TcpConnection.from_syn(child.config, seg, now, child._local(),
                                                child._remote(), self.snmp, iss)
        except Exception:
            self.unbind(child)
            raise
        child.parent = lsk
        lsk.synq.append(child)
        self.hash(child)
        child._push(now)
        skb.consume()

    def child_established(self, child: TcpSock) -> None:
        """The handshake's last ACK: the child moves from the SYN queue to the accept queue."""
        parent = child.parent
        if parent is None:
            return
        if child in parent.synq:
            parent.synq.remove(child)
        if child not in parent.acceptq:
            parent.acceptq.append(child)
        parent.wake()

    def err(self, isrc: int, idst: int, quote: bytes, type: int, code: int, info: int) -> None:
        """tcp_v4_err: an ICMP error about a segment we sent. A hard error during the
        handshake fails the connect (ECONNREFUSED for port unreachable, ...); later ones are
        soft (Linux keeps them for the retransmission timer's report; we drop them)."""
        from kstack.udp import ICMP_ERR_CONVERT
        from wire.icmp import ICMP_DEST_UNREACH, NR_ICMP_UNREACH
        sport, dport = _PORTS.unpack_from(quote, 0)
        sk = self.ehash.get((isrc, sport, idst, dport))
        if sk is None or sk.conn is None:
            return
        if type != ICMP_DEST_UNREACH or code > NR_ICMP_UNREACH or code == 4:
            return  # fragmentation needed: the path MTU cache has it for the next segments
        err, fatal = ICMP_ERR_CONVERT[code]
        if fatal and sk.conn.state in _CONNECTING:
            sk.err = err
            sk._abort()
            sk.wake()

    # --- listing ----------------------------------------------------------------------------

    def flush(self) -> None:
        """Free every socket and connection (the kernel is going down)."""
        for lst in list(self.lhash.values()):
            for sk in list(lst):
                sk.close()
        for sk in list(self.ehash.values()):
            sk.closed = True
            if sk.conn is not None and sk.conn.state != TcpState.CLOSED:
                sk._abort()
            sk.parent = None
            sk._destroy()
        for lst in list(self.bhash.values()):
            for sk in list(lst):
                sk._destroy()

    def counters(self) -> dict[str, int]:
        return {"established_hash": len(self.ehash), "listeners": sum(map(len, self.lhash.values())),
                "bound": self.count, "orphans": self.orphans, "time_wait": len(self.tw)}


def ss(stack: Any) -> list[dict[str, Any]]:
    """`ss -tani`: one dict per listener and per connection (the engine's conn.info())."""
    table: TcpTable | None = stack.protocols.get("tcp")
    if table is None:
        return []
    out: list[dict[str, Any]] = []
    for lst in table.lhash.values():
        for sk in lst:
            out.append({"state": "LISTEN", "local": f"{ntoa(sk.saddr)}:{sk.sport}",
                        "remote": "0.0.0.0:*", "recv_q": len(sk.acceptq), "send_q": sk.backlog,
                        "syn_q": len(sk.synq)})
    for sk in list(table.ehash.values()):
        conn = sk.conn
        if conn is None:
            continue
        row: dict[str, Any] = {"state": conn.state.name, "local": f"{ntoa(sk.saddr)}:{sk.sport}",
                               "remote": f"{ntoa(sk.daddr)}:{sk.dport}", "orphan": sk.orphan}
        try:
            info = conn.info()
        except Exception:  # the listing must not fail on one connection
            info = {}
        row.update(info)
        row["state"] = conn.state.name
        out.append(row)
    return out

