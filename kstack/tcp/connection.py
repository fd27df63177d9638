"""TcpConnection: one TCP connection's state machine, sans-IO (RFC 9293 3.10).

Segments and `now` (ns) go in; segments to send, events and the next deadline come out. The
socket layer owns the 4-tuple lookup, the listener's SYN and accept queues, and the IP
output; this object owns everything RFC 9293 calls the TCB.

    conn = TcpConnection(local, remote, config, counters, iss)
    conn.open_active(now)                        # SYN-SENT; the SYN is in segments_to_send
    conn = TcpConnection.from_syn(cfg, seg, now, local, remote, counters, iss)  # SYN-RECEIVED
    conn.segment_arrives(seg, now)               # -> the drop reason, or None when taken
    conn.segments_to_send(now)                   # -> [TcpSegment], the IP layer adds its header
    conn.next_deadline() / conn.timer_expired(now)
    conn.send(data, now) -> taken ; conn.recv(n, peek=False) -> bytes
    conn.shutdown(how, now) ; conn.close(now) ; conn.abort(now)
    conn.take_events() -> TcpEvent ; conn.info() -> dict (ss -ti)

Input follows RFC 9293 3.10.7.4's order (sequence number, RST, SYN, ACK, URG, text, FIN)
with RFC 5961's checks and RFC 7323's PAWS in their places; output is Linux's
tcp_write_xmit in miniature: retransmissions the recovery state asks for (RFC 6675 NextSeg,
or the head for NewReno and after an RTO), then new data within min(cwnd - pipe, the peer's
window), with Nagle and sender SWS avoidance, then a FIN, probes and a pure ACK if one is
owed. Loss recovery keeps Linux's three states: OPEN, RECOVERY (fast recovery), LOSS (after
an RTO).
"""
from __future__ import annotations

import collections
import errno
import os

from wire.tcp import (TCP_DEFAULT_MSS, TH_ACK, TH_FIN, TH_PSH, TH_RST, TH_SYN, TcpSegment)
from kstack.dropreason import SkbDropReason
from kstack.tcp.buffers import OfoQueue
from kstack.tcp.config import TcpConfig
from kstack.tcp.options import TCPOLEN_TSTAMP_ALIGNED, negotiate, rcv_wscale_for
from kstack.tcp.rtt import RttEstimator
from kstack.tcp.sack import DUPTHRESH, Scoreboard
from kstack.tcp.seq import SEQ_GEQ, SEQ_GT, SEQ_LEQ, SEQ_LT, SEQ_MASK
from kstack.tcp.state import SYNCHRONIZED, TcpEvent, TcpState

__all__ = ["TcpConnection", "SHUT_RD", "SHUT_WR", "SHUT_RDWR", "reset_for",
           "CA_OPEN", "CA_RECOVERY", "CA_LOSS", "fast_path_kind"]

SHUT_RD, SHUT_WR, SHUT_RDWR = 0, 1, 2
CA_OPEN, CA_RECOVERY, CA_LOSS = "open", "recovery", "loss"  # Linux's TCP_CA_Open/Recovery/Loss

PAWS_24DAYS = 24 * 86400 * 1_000_000_000  # RFC 7323 5.5: TS.Recent is invalid after 24 days idle
MAX_CTL = 8  # ours: RSTs queued for output at once
MAX_CWND = 1 << 30

ST = TcpState
ESTABLISHED, SYN_SENT, SYN_RECEIVED = ST.ESTABLISHED, ST.SYN_SENT, ST.SYN_RECEIVED
FIN_WAIT_1, FIN_WAIT_2, TIME_WAIT, CLOSED = ST.FIN_WAIT_1, ST.FIN_WAIT_2, ST.TIME_WAIT, ST.CLOSED
CLOSE_WAIT, LAST_ACK, CLOSING = ST.CLOSE_WAIT, ST.LAST_ACK, ST.CLOSING
_SENDING = frozenset({ESTABLISHED, CLOSE_WAIT, FIN_WAIT_1, CLOSING, LAST_ACK})
_RECEIVING = frozenset({ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2})
DR = SkbDropReason
# TcpEvent by value: `_EVENTS[e._value_ | READABLE]` sets a bit without IntFlag's Python-level
# __or__ (about 1.5 µs a call on CPython 3.11), for the per-segment paths
_EVENTS = tuple(TcpEvent(v) for v in range(2 * max(TcpEvent)))
_READABLE = TcpEvent.READABLE._value_
_WRITABLE = TcpEvent.WRITABLE._value_


def reset_for(seg: TcpSegment) -> TcpSegment | None:
    """The RST that answers a segment no connection takes (RFC 9293 3.10.7.1, CLOSED state):
    never for a RST; <SEQ=SEG.ACK><CTL=RST> when it has ACK, else
    <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>. For the socket layer (no socket, or a listener
    that gets an ACK)."""
    if seg.flags & TH_RST:
        return None  # "An incoming segment containing a RST is discarded"
    if seg.flags & TH_ACK:
        return TcpSegment(seg.dport, seg.sport, seg.ack, 0, TH_RST, 0)
    return TcpSegment(seg.dport, seg.sport, 0, (seg.seq + seg.seg_len) & SEQ_MASK,
                      TH_RST | TH_ACK, 0)


class TcpConnection:
    """The TCB and its machine. Attributes the socket layer reads: state, error (errno or 0),
    events, local, remote, config, and the RFC's variables (snd_una, snd_nxt, rcv_nxt, ...).

    `fast_path` (True) enables header prediction on input and the full-segment loop on
    output; False sends every segment through the full path (the agreement tests compare
    the two)."""

    fast_path = True

    def __init__(self, local: tuple[str, int], remote: tuple[str, int], config: TcpConfig,
                 counters: collections.Counter, iss: int) -> None:
        self.local = local
        self.remote = remote
        self.lport = local[1]
        self.rport = remote[1]
        self.config = config
        self.counters = counters
        self.state = CLOSED
        self.error = 0
        self.events = TcpEvent.NONE
        self.passive = False
        self.orphan = False  # close() was called: nobody reads any more
        # send sequence space (RFC 9293 3.3.1)
        iss &= SEQ_MASK
        self.iss = iss
        self.snd_una = iss
        self.snd_nxt = iss  # the highest sequence sent + 1 (Linux's snd_nxt; retransmissions stay below)
        self.snd_wnd = 0
        self.snd_wl1 = 0
        self.snd_wl2 = 0
        self.max_snd_wnd = 0
        self.snd_sml = iss  # the end of the last small segment sent (Nagle, Minshall)
        self.sndq = bytearray()  # unacknowledged and unsent data, from sndq_seq
        self.sndq_seq = (iss + 1) & SEQ_MASK
        self.fin_seq: int | None = None  # the FIN's sequence number once the sending side closed
        self.wr_shut = False
        # receive sequence space
        self.irs = 0
        self.rcv_nxt = 0
        self.rcv_adv = 0  # the right edge of the window we advertised (never moves left)
        self.rcv_wup = 0  # RCV.NXT when we last sent a window (Linux's rcv_wup, RFC 7323's Last.ACK.sent)
        self.rcvq = bytearray()
        self.rd_shut = False
        self.fin_received = False
        self.ofo = OfoQueue(config.ofo_limit if config.ofo_limit is not None else config.rcvbuf)
        self.ofo_fin: int | None = None  # a FIN that arrived beyond a hole
        # options
        self.snd_mss = TCP_DEFAULT_MSS
        self.mss = TCP_DEFAULT_MSS  # payload per segment we send (the peer's MSS less our option bytes)
        self.rcv_mss = min(config.mss, TCP_DEFAULT_MSS)  # the peer's segment size as we see it
        self.snd_wscale = 0
        self.rcv_wscale = 0
        self.ws_ok = False
        self.ts_ok = False
        self.sack_ok = False
        self.ts_recent = 0
        self.ts_recent_stamp: int | None = None
        self.ts_offset = (iss * 2654435761) & SEQ_MASK  # Linux's per-connection tsoffset
        # congestion control (RFC 5681) and loss recovery (RFC 6675, RFC 6582)
        self.cwnd = config.init_cwnd * TCP_DEFAULT_MSS
        self.ssthresh = MAX_CWND
        self.ca_state = CA_OPEN
        self.recovery_point = iss
        self.lost_end = iss  # unSACKed data below this is lost
        self.high_rxt = iss  # RFC 6675 HighRxt: retransmitted up to here
        self.dupacks = 0
        self.reno_sacked = 0  # bytes the dup ACKs stand for without SACK (Linux's tcp_add_reno_sack)
        self.bytes_acked = 0  # congestion avoidance's byte counter (RFC 5681 3.1)
        self.sb = Scoreboard()
        self.rtt = RttEstimator(config.rto_initial, config.rto_min, config.rto_max)
        self.rtt_seq: int | None = None  # the segment being timed (Karn: never a retransmission)
        self.rtt_time = 0
        self.retransmits = 0  # consecutive RTOs
        self.total_retrans = 0
        self.lost_segs = 0
        self.last_send = 0
        self.last_recv = 0
        # ACK state
        self.ack_now = False
        self.delack_bytes = 0
        self.ctl: list[TcpSegment] = []
        self._send_syn = False
        self._send_probe = False
        self._force_send = False
        self.last_oow_ack = -(1 << 62)
        self.want_writable = False
        # timers (absolute ns, None = disarmed)
        self.t_rtx: int | None = None  # retransmission, SYN and SYN-ACK
        self.t_persist: int | None = None
        self.t_delack: int | None = None
        self.t_keepalive: int | None = None
        self.t_close: int | None = None  # TIME_WAIT, or an orphan's FIN-WAIT-2
        self.probes_out = 0
        self.ka_probes_out = 0

    # -- opens --------------------------------------------------------------------------------

    def open_active(self, now: int) -> None:
        """OPEN call, active (connect): CLOSED -> SYN-SENT, a SYN queued, the SYN timer armed.
        TcpActiveOpens."""
        if self.state != CLOSED:
            raise ValueError(f"open_active in {self.state.name}")
        self.counters["TcpActiveOpens"] += 1
        self.state = SYN_SENT
        self.snd_nxt = (self.iss + 1) & SEQ_MASK
        self._send_syn = True
        self.t_rtx = now + self.rtt.rto
        self.rtt_seq = self.snd_nxt
        self.rtt_time = now

    @classmethod
    def from_syn(cls, config: TcpConfig, seg: TcpSegment, now: int, local: tuple[str, int],
                 remote: tuple[str, int], counters: collections.Counter,
                 iss: int) -> "TcpConnection":
        """A listener got an acceptable SYN (RFC 9293 3.10.7.2, LISTEN, third check): the new
        connection in SYN-RECEIVED with its SYN-ACK queued and retransmitted on its timer
        (synack_retries, then CLOSED with TcpAttemptFails). TcpPassiveOpens when the
        handshake completes. The socket layer checks the SYN queue limit before calling and
        moves the connection to the accept queue on TcpEvent.ESTABLISHED."""
        cfg = config.copy()
        c = cls(local, remote, cfg, counters, iss)
        c.passive = True
        c.counters["TcpInSegs"] += 1
        c._take_syn(seg, now, cfg.window_scaling, cfg.timestamps, cfg.sack)
        c.state = SYN_RECEIVED
        c.snd_nxt = (c.iss + 1) & SEQ_MASK
        c._send_syn = True
        c.t_rtx = now + c.rtt.rto
        c.rtt_seq = c.snd_nxt
        c.rtt_time = now
        c.last_recv = now
        return c

    def _take_syn(self, seg: TcpSegment, now: int, ws: bool, ts: bool, sack: bool) -> None:
        """The peer's SYN: IRS, RCV.NXT, the options both sides agree on."""
        self.irs = seg.seq
        self.rcv_nxt = (seg.seq + 1) & SEQ_MASK
        self.rcv_wup = self.rcv_nxt
        n = negotiate(self.config, seg, ws, ts, sack)
        self.snd_mss = n.snd_mss
        self.snd_wscale, self.rcv_wscale = n.snd_wscale, n.rcv_wscale
        self.ws_ok = ws and seg.wscale is not None
        self.ts_ok, self.sack_ok = n.ts_ok, n.sack_ok
        self.mss = self.snd_mss - (TCPOLEN_TSTAMP_ALIGNED if self.ts_ok else 0)
        self.cwnd = self.config.init_cwnd * self.mss
        if self.ts_ok:
            self.ts_recent = seg.tsval
            self.ts_recent_stamp = now
        # RFC 7323 2.2: "The window field in a SYN (i.e., a <SYN> or <SYN,ACK>) segment itself
        # is never scaled."
        self.snd_wnd = seg.window
        self.max_snd_wnd = seg.window
        self.snd_wl1 = seg.seq
        self.snd_wl2 = seg.ack
        self.rcv_adv = (self.rcv_nxt + min(self._rcv_space(), 65535)) & SEQ_MASK

    # -- input ----------------------------------------------------------------------------------

    def segment_arrives(self, seg: TcpSegment, now: int) -> SkbDropReason | None:
        """SEGMENT ARRIVES (RFC 9293 3.10.7) for this connection. Returns None when the segment
        was taken (its data, or its control information), else why it was dropped; the
        counters are incremented here. `seg.payload` is copied if kept."""
        self.counters["TcpInSegs"] += 1
        state = self.state
        if state is ESTABLISHED and self.fast_path and _rcv_predicted(self, seg, now):
            return None
        if state == SYN_SENT:
            return self._syn_sent(seg, now)
        if state == CLOSED or state == ST.LISTEN:
            self._queue_ctl(reset_for(seg))
            return DR.TCP_CLOSE
        flags = seg.flags
        rst = flags & TH_RST
        seq = seg.seq
        c = self.counters
        # a retransmitted SYN of our handshake: answer with the SYN-ACK again (tcp_check_req)
        if state == SYN_RECEIVED and flags & (TH_SYN | TH_ACK | TH_RST) == TH_SYN and seq == self.irs:
            self._send_syn = True
            return None
        # RFC 7323 5.3 R1: "If there is a Timestamps option in the arriving segment ... and
        # SEG.TSval < TS.Recent ... then treat the arriving segment as not acceptable: Send an
        # acknowledgment in reply as specified in RFC 793 page 69 and drop the segment."
        if self.ts_ok and seg.tsval is not None and not rst and SEQ_LT(seg.tsval, self.ts_recent) \
                and not self._disordered_ack(seg):
            if now - self.ts_recent_stamp > PAWS_24DAYS:
                self.ts_recent = seg.tsval  # R1's 24-day rule: TS.Recent is too old to judge
            else:
                c["TcpExtPAWSEstab"] += 1
                self._oow_ack(seg, now)
                return DR.TCP_RFC7323_PAWS
        # first, check sequence number (RFC 9293 3.10.7.4), as Linux's tcp_sequence: the
        # segment must end at or after RCV.NXT and begin within the window
        plen = len(seg.payload)
        seg_end = (seq + plen + (1 if flags & TH_SYN else 0) + (flags & TH_FIN)) & SEQ_MASK
        wnd = (self.rcv_adv - self.rcv_nxt) & SEQ_MASK
        if wnd >= 0x80000000:
            wnd = 0
        if SEQ_LT(seg_end, self.rcv_nxt) or SEQ_GT(seq, (self.rcv_nxt + wnd) & SEQ_MASK):
            # "If an incoming segment is not acceptable, an acknowledgment should be sent in
            # reply (unless the RST bit is set, if so drop the segment and return)"
            if not rst:
                if flags & TH_SYN:
                    self._challenge_ack(now)  # RFC 5961 4.2, whatever the sequence number
                else:
                    self._oow_ack(seg, now)
            return DR.TCP_INVALID_SEQUENCE
        # second, check the RST bit (RFC 5961 3.2): "If the RST bit is set and the sequence
        # number exactly matches the next expected sequence number (RCV.NXT), then TCP MUST
        # reset the connection"; otherwise (in the window) "TCP MUST send an ACK (challenge
        # ACK)"
        if rst:
            if seq == self.rcv_nxt:
                self._rst_arrives()
                return DR.TCP_RESET
            self._challenge_ack(now)
            return DR.TCP_RFC5961_CHALLENGE
        # fourth, check the SYN bit (RFC 5961 4.2): any SYN in a synchronized state (and
        # SYN-RECEIVED) gets a challenge ACK, except the SYN-ACK of a simultaneous open
        data_seq = seq
        if flags & TH_SYN:
            if (state == SYN_RECEIVED and flags & TH_ACK and not plen
                    and (seq + 1) & SEQ_MASK == self.rcv_nxt and seg.ack == self.snd_nxt):
                data_seq = (seq + 1) & SEQ_MASK  # the SYN is the one we took already
            else:
                self._challenge_ack(now)
                return DR.TCP_RFC5961_CHALLENGE
        # fifth, check the ACK field: "if the ACK bit is off, drop the segment and return"
        if not flags & TH_ACK:
            return DR.TCP_FLAGS
        self.last_recv = now
        self.ka_probes_out = 0
        if state == SYN_RECEIVED:
            # "If SND.UNA < SEG.ACK =< SND.NXT, then enter ESTABLISHED state ... If the
            # segment acknowledgment is not acceptable, form a reset segment
            # <SEQ=SEG.ACK><CTL=RST> and send it."
            if not (SEQ_LT(self.snd_una, seg.ack) and SEQ_LEQ(seg.ack, self.snd_nxt)):
                self._queue_ctl(reset_for(seg))
                return DR.TCP_FLAGS
            self.snd_wnd = seg.window << self.snd_wscale
            self.max_snd_wnd = max(self.max_snd_wnd, self.snd_wnd)
            self.snd_wl1 = seq
            self.snd_wl2 = seg.ack
            self._established(now)
            state = self.state
        drop = self._ack(seg, now)
        if drop is not None:
            return drop
        state = self.state
        if state == CLOSED:
            return None
        # RFC 7323 4.3 (2): "If SEG.TSval >= TS.Recent and SEG.SEQ =< Last.ACK.sent then
        # SEG.TSval is copied to TS.Recent"
        if self.ts_ok and seg.tsval is not None and SEQ_LEQ(seq, self.rcv_wup) \
                and SEQ_GEQ(seg.tsval, self.ts_recent):
            self.ts_recent = seg.tsval
            self.ts_recent_stamp = now
        # sixth, the URG bit: ignored (RFC 6093: urgent data is for legacy applications)
        # seventh, process the segment text
        reason = None
        fin = flags & TH_FIN
        if plen:
            if state in _RECEIVING and not self.orphan:
                reason = self._data(seg.payload, data_seq, now)
                if reason is DR.TCP_OVERWINDOW:
                    fin = 0  # the FIN was past the window too
            elif self.orphan and state in _RECEIVING:
                # tcp_rcv_state_process: data for a closed socket resets (TcpExtTCPAbortOnData)
                c["TcpExtTCPAbortOnData"] += 1
                self._send_rst()
                self._to_closed()
                return DR.TCP_CLOSE
            else:
                # "This should not occur since a FIN has been received from the remote side.
                # Ignore the segment text."
                reason = DR.TCP_CLOSE
                self.ack_now = True
        # eighth, check the FIN bit
        if fin:
            fin_at = (data_seq + plen) & SEQ_MASK
            if fin_at == self.rcv_nxt and not self.fin_received:
                self._fin_arrives(now)
            elif SEQ_LT(fin_at, self.rcv_nxt):
                # a retransmitted FIN: acknowledge it; TIME-WAIT restarts its 2 MSL
                self.ack_now = True
                if self.state == TIME_WAIT:
                    self.t_close = now + self.config.time_wait
            elif state in _RECEIVING:
                self.ofo_fin = fin_at
        return reason

    def _rcv_predicted(self, seg: TcpSegment, now: int) -> bool:
        """Header prediction (Van Jacobson's, Linux's tcp_rcv_established fast path): in
        ESTABLISHED, with nothing unusual pending on our side (loss recovery, SACK
        scoreboard, out-of-order data, FIN, shutdown), a segment that carries only ACK (PSH
        allowed), no option but the timestamp, passes PAWS, starts at RCV.NXT and either
        brings in-window data or acknowledges new data. Such a segment would pass every check
        of the full path with nothing to say; this path makes the full path's state changes
        in its order (sequence checks pass by construction, the window update, _new_ack, the
        TS.Recent update, the receive queue and the delayed ACK) and returns True, counting
        TcpExtTCPHPHits (data) or TcpExtTCPHPAcks (pure ACK) as Linux does. Anything else
        returns False having changed nothing, and the full path runs."""
        flags = seg.flags
        seq = seg.seq
        if (flags & ~TH_PSH) != TH_ACK or seq != self.rcv_nxt or seg.sack \
                or seg.mss is not None or seg.wscale is not None or seg.sack_permitted:
            return False
        if self.ca_state is not CA_OPEN or self.sb.intervals or self.ofo.blocks \
                or self.ofo_fin is not None or self.fin_seq is not None:
            return False
        tsval = seg.tsval
        ts_ok = self.ts_ok
        if ts_ok:
            # PAWS (RFC 7323 5.3 R1) must pass: SEG.TSval >= TS.Recent
            if tsval is None or 0 < ((self.ts_recent - tsval) & SEQ_MASK) < 0x80000000:
                return False
        ack = seg.ack
        una = self.snd_una
        acked = (ack - una) & SEQ_MASK
        if acked > ((self.snd_nxt - una) & SEQ_MASK):
            return False  # not within SND.UNA..SND.NXT: the full path's ACK checks
        # RFC 5961 5.2's lower bound (SND.UNA - MAX.SND.WND) holds for any ACK at or above
        # SND.UNA while MAX.SND.WND plus the flight stays below 2^31; checked, not assumed
        if self.max_snd_wnd + acked >= 0x80000000:
            return False
        payload = seg.payload
        plen = len(payload)
        if plen:
            if self.orphan or self.rd_shut:
                return False
            rcv_nxt = seq
            wnd = (self.rcv_adv - rcv_nxt) & SEQ_MASK
            if wnd >= 0x80000000 or plen > wnd:
                return False  # zero window or past it: the full path trims and counts
        elif not acked:
            return False  # a duplicate ACK or a bare window update
        c = self.counters
        self.last_recv = now
        self.ka_probes_out = 0
        # the send window (RFC 9293 3.10.7.4 fifth, as _ack): SND.UNA =< SEG.ACK holds
        wl1 = self.snd_wl1
        d = (seq - wl1) & SEQ_MASK
        if (0 < d < 0x80000000) or (d == 0 and ((ack - self.snd_wl2) & SEQ_MASK) < 0x80000000):
            wnd = seg.window << self.snd_wscale
            self.snd_wnd = wnd
            self.snd_wl1 = seq
            self.snd_wl2 = ack
            if wnd > self.max_snd_wnd:
                self.max_snd_wnd = wnd
            if wnd:
                self.t_persist = None
                self.probes_out = 0
        if acked:
            self._new_ack(ack, now, seg)
        # RFC 7323 4.3 (2): TS.Recent (SEG.SEQ = RCV.NXT here)
        if ts_ok and ((self.rcv_wup - seq) & SEQ_MASK) < 0x80000000 \
                and ((tsval - self.ts_recent) & SEQ_MASK) < 0x80000000:
            self.ts_recent = tsval
            self.ts_recent_stamp = now
        if not plen:
            c["TcpExtTCPHPAcks"] += 1
            return True
        # in-order data into the receive queue (_data with rel == 0, no out-of-order queue)
        if plen > self.rcv_mss:
            self.rcv_mss = min(plen, self.config.mss)
        self.rcvq += payload
        self.rcv_nxt = (seq + plen) & SEQ_MASK
        self.events = _EVENTS[self.events._value_ | _READABLE]
        self.delack_bytes += plen
        if not self.ack_now:
            if self.delack_bytes >= 2 * self.rcv_mss:
                self.ack_now = True
            elif self.t_delack is None:
                self.t_delack = now + self.config.delack_min
        c["TcpExtTCPHPHits"] += 1
        return True

    def _disordered_ack(self, seg: TcpSegment) -> bool:
        """Linux's tcp_disordered_ack: a pure duplicate ACK at RCV.NXT that changes no window
        and is older than TS.Recent by less than an RTO was only reordered; PAWS lets it in."""
        return (seg.flags & (TH_ACK | TH_SYN | TH_FIN) == TH_ACK and not seg.payload
                and seg.seq == self.rcv_nxt and seg.ack == self.snd_una
                and (seg.window << self.snd_wscale) == self.snd_wnd
                and ((self.ts_recent - seg.tsval) & SEQ_MASK) <= self.rtt.rto // 1_000_000)

    def _syn_sent(self, seg: TcpSegment, now: int) -> SkbDropReason | None:
        """RFC 9293 3.10.7.3, SYN-SENT."""
        flags = seg.flags
        if flags & TH_ACK:
            # "If SEG.ACK =< ISS or SEG.ACK > SND.NXT, send a reset (unless the RST bit is
            # set, if so drop the segment and return)"
            if SEQ_LEQ(seg.ack, self.iss) or SEQ_GT(seg.ack, self.snd_nxt):
                if not flags & TH_RST:
                    self._queue_ctl(reset_for(seg))
                return DR.TCP_FLAGS
        if flags & TH_RST:
            # "If the ACK was acceptable, then signal to the user 'error: connection reset',
            # drop the segment, enter CLOSED state ... Otherwise (no ACK), drop the segment"
            if flags & TH_ACK:
                self._fail(errno.ECONNREFUSED)
            return DR.TCP_RESET
        if not flags & TH_SYN:
            return DR.TCP_FLAGS
        cfg = self.config
        self._take_syn(seg, now, cfg.window_scaling, cfg.timestamps, cfg.sack)
        self.last_recv = now
        if flags & TH_ACK:
            # "If SND.UNA > ISS (our SYN has been ACKed), change the connection state to
            # ESTABLISHED, form an ACK segment <SEQ=SND.NXT><ACK=RCV.NXT><CTL=ACK> and send it."
            self._new_ack(seg.ack, now, seg)
            self.ack_now = True
            self._established(now)
            if seg.payload and self.state in _RECEIVING:
                self._data(seg.payload, self.rcv_nxt, now)
            if flags & TH_FIN and self.state in _RECEIVING:
                self._fin_arrives(now)
            return None
        # "Otherwise, enter SYN-RECEIVED, form a SYN,ACK segment <SEQ=ISS><ACK=RCV.NXT>
        # <CTL=SYN,ACK> and send it." (simultaneous open)
        self.state = SYN_RECEIVED
        self._send_syn = True
        self.rtt_seq = None
        return None

    def _established(self, now: int) -> None:
        self.state = ESTABLISHED
        self.events |= TcpEvent.ESTABLISHED | TcpEvent.WRITABLE
        if self.passive:
            self.counters["TcpPassiveOpens"] += 1
        self.retransmits = 0
        self.rtt.backoff = 0
        if self.snd_una == self.snd_nxt:
            self.t_rtx = None
        self._arm_keepalive(now)
        if self.wr_shut:  # shutdown or close before the handshake completed
            self.state = FIN_WAIT_1

    def _ack(self, seg: TcpSegment, now: int) -> SkbDropReason | None:
        """The ACK field in a synchronized state: acceptability (RFC 5961 5.2), the send
        window, new data acknowledged, duplicate ACKs and SACK, then the closing states."""
        ack = seg.ack
        if SEQ_GT(ack, self.snd_nxt):
            # "If the ACK acks something not yet sent (SEG.ACK > SND.NXT), then send an ACK,
            # drop the segment, and return."
            self._oow_ack(seg, now)
            return DR.TCP_ACK_UNSENT_DATA
        if SEQ_LT(ack, (self.snd_una - self.max_snd_wnd) & SEQ_MASK):
            # RFC 5961 5.2: "(SND.UNA - MAX.SND.WND) =< SEG.ACK =< SND.NXT" else discard and ACK
            self._challenge_ack(now)
            return DR.TCP_TOO_OLD_ACK
        wnd = seg.window << self.snd_wscale
        old_wnd = self.snd_wnd
        # "If SND.UNA =< SEG.ACK =< SND.NXT, the send window should be updated. If (SND.WL1 <
        # SEG.SEQ or (SND.WL1 = SEG.SEQ and SND.WL2 =< SEG.ACK)), set SND.WND <- SEG.WND"
        if SEQ_LEQ(self.snd_una, ack) and (SEQ_LT(self.snd_wl1, seg.seq) or (
                self.snd_wl1 == seg.seq and SEQ_LEQ(self.snd_wl2, ack))):
            self.snd_wnd = wnd
            self.snd_wl1 = seg.seq
            self.snd_wl2 = ack
            if wnd > self.max_snd_wnd:
                self.max_snd_wnd = wnd
            if wnd:
                self.t_persist = None
                self.probes_out = 0
        newly_sacked = 0
        if self.sack_ok and seg.sack:
            newly_sacked = self.sb.update(seg.sack, self.snd_una, self.snd_nxt)
        if SEQ_GT(ack, self.snd_una):
            self._new_ack(ack, now, seg)
            if newly_sacked and self.ca_state == CA_OPEN:
                self._dupack(now)
        elif self.snd_una != self.snd_nxt and (newly_sacked or (
                ack == self.snd_una and not seg.payload and not seg.flags & (TH_SYN | TH_FIN)
                and wnd == old_wnd)):
            # RFC 5681 2 (DUPLICATE ACKNOWLEDGMENT), or RFC 6675's ACK with new SACK information
            self._dupack(now)
        if self.fin_seq is not None and SEQ_GT(self.snd_una, self.fin_seq):
            st = self.state
            if st == FIN_WAIT_1:
                self.state = FIN_WAIT_2
                if self.orphan:
                    self.t_close = now + self.config.fin_timeout
            elif st == CLOSING:
                self._enter_time_wait(now)
            elif st == LAST_ACK:
                self._to_closed()
        return None

    def _new_ack(self, ack: int, now: int, seg: TcpSegment) -> None:
        """SND.UNA advances to `ack`: free the send queue, sample the RTT, restart or stop the
        retransmission timer (RFC 6298 5.2, 5.3), grow cwnd or leave recovery."""
        old = self.snd_una
        acked = (ack - old) & SEQ_MASK
        q_acked = (ack - self.sndq_seq) & SEQ_MASK
        if q_acked < 0x80000000 and q_acked:
            n = min(q_acked, len(self.sndq))
            if n:
                del self.sndq[:n]
                self.sndq_seq = (self.sndq_seq + n) & SEQ_MASK
                if self.want_writable and self.config.sndbuf - len(self.sndq) >= self.config.sndbuf // 3:
                    self.want_writable = False
                    self.events |= TcpEvent.WRITABLE
        self.snd_una = ack
        if self.sb.intervals:
            self.sb.advance(ack, old)
        if SEQ_LT(self.high_rxt, ack):
            self.high_rxt = ack
        if SEQ_LT(self.lost_end, ack):
            self.lost_end = ack
        # RTT: the timed segment (Karn), or the echoed timestamp, which tells which copy of a
        # retransmitted segment is acknowledged (RFC 7323 4.1)
        rtt = self.rtt
        if self.rtt_seq is not None and SEQ_GEQ(ack, self.rtt_seq):
            rtt.sample(now - self.rtt_time)
            self.rtt_seq = None
        elif self.ts_ok and seg.tsval is not None and seg.tsecr and self.retransmits == 0:
            r = ((self._ts_now(now) - seg.tsecr) & SEQ_MASK)
            if r < 0x80000000 and self.ca_state != CA_OPEN:
                rtt.sample(r * 1_000_000)
        rtt.backoff = 0
        self.retransmits = 0
        self.probes_out = 0
        # RFC 6298 5.2: "When all outstanding data has been acknowledged, turn off the
        # retransmission timer." 5.3: "When an ACK is received that acknowledges new data,
        # restart the retransmission timer"
        self.t_rtx = None if ack == self.snd_nxt else now + rtt.rto
        mss = self.mss
        if self.ca_state == CA_RECOVERY:
            if SEQ_GEQ(ack, self.recovery_point):
                # RFC 6582 3.2 (3) full acknowledgment: "Set cwnd to either (1) min (ssthresh,
                # max(FlightSize, SMSS) + SMSS) or (2) ssthresh"
                flight = (self.snd_nxt - ack) & SEQ_MASK
                self.cwnd = min(self.ssthresh, max(flight, mss) + mss)
                self._recovery_done()
            elif not self.sack_ok:
                # RFC 6582 3.2 (4) partial acknowledgment: retransmit the first unacknowledged
                # segment; deflate the dup ACKs it covered
                self.reno_sacked = max(0, self.reno_sacked - max(0, acked - mss))
                self.lost_end = (ack + min(mss, (self.snd_nxt - ack) & SEQ_MASK)) & SEQ_MASK
                self.high_rxt = ack
            return
        if self.ca_state == CA_LOSS and SEQ_GEQ(ack, self.recovery_point):
            self._recovery_done()
        self.dupacks = 0
        self.reno_sacked = 0
        # RFC 5681 3.1: slow start "cwnd += min (N, SMSS)" (RFC 3465's L = 2 SMSS for delayed
        # ACKs); congestion avoidance one SMSS per cwnd of data acknowledged
        if self.cwnd < self.ssthresh:
            self.cwnd = min(self.cwnd + min(acked, 2 * mss), MAX_CWND)
        else:
            self.bytes_acked += acked
            if self.bytes_acked >= self.cwnd:
                self.bytes_acked -= self.cwnd
                self.cwnd = min(self.cwnd + mss, MAX_CWND)

    def _recovery_done(self) -> None:
        self.ca_state = CA_OPEN
        self.dupacks = 0
        self.reno_sacked = 0
        self.bytes_acked = 0
        self.lost_end = self.snd_una
        self.high_rxt = self.snd_una

    def _dupack(self, now: int) -> None:
        """One duplicate ACK: count it; enter fast recovery on the third (RFC 5681 3.2), or
        when the SACKs say the first segment is lost (RFC 6675 5 IsLost(HighACK + 1))."""
        self.dupacks += 1
        flight = (self.snd_nxt - self.snd_una) & SEQ_MASK
        if not self.sack_ok:
            self.reno_sacked = min(self.reno_sacked + self.mss, max(0, flight - self.mss))
        if self.ca_state != CA_OPEN:
            return
        enter = self.dupacks >= DUPTHRESH
        if not enter and self.sack_ok and self.sb.intervals:
            holes = self.sb.holes(self.snd_una, self.snd_nxt, self.mss, self.snd_una)
            enter = bool(holes) and holes[0][0] == 0 and holes[0][2]
        if not enter:
            return
        # RFC 5681 eq. (4): ssthresh = max (FlightSize / 2, 2*SMSS); RFC 6675 4: cwnd = ssthresh
        mss = self.mss
        self.ssthresh = max(flight // 2, 2 * mss)
        self.cwnd = self.ssthresh
        self.ca_state = CA_RECOVERY
        self.recovery_point = self.snd_nxt
        self.high_rxt = self.snd_una
        self.lost_end = (self.snd_una + min(mss, flight)) & SEQ_MASK
        self.rtt_seq = None
        self.counters["TcpExtTCPSackRecovery" if self.sack_ok else "TcpExtTCPRenoRecovery"] += 1

    def _data(self, payload, seq: int, now: int) -> SkbDropReason | None:
        """Segment text in ESTABLISHED, FIN-WAIT-1, FIN-WAIT-2: in order to the receive queue
        (and what the out-of-order queue now continues), beyond RCV.NXT to the out-of-order
        queue; trimmed to the window. Delayed ACK: every second full-sized segment, or the
        timer (RFC 1122 4.2.3.2); out-of-order data and hole filling are ACKed at once."""
        c = self.counters
        n = len(payload)
        off = (self.rcv_nxt - seq) & SEQ_MASK
        if off < 0x80000000 and off:  # begins before RCV.NXT
            if off >= n:
                self.ack_now = True  # a retransmission of what we have: ACK again
                return DR.TCP_OLD_DATA
            payload = payload[off:]
            seq = self.rcv_nxt
            n -= off
        if n > self.rcv_mss:
            self.rcv_mss = min(n, self.config.mss)
        rel = (seq - self.rcv_nxt) & SEQ_MASK
        wnd = (self.rcv_adv - self.rcv_nxt) & SEQ_MASK
        if wnd >= 0x80000000:
            wnd = 0
        if rel + n > wnd:
            if rel >= wnd:
                self.ack_now = True
                if wnd == 0:
                    c["TcpExtTCPZeroWindowDrop"] += 1
                    return DR.TCP_ZEROWINDOW
                return DR.TCP_OVERWINDOW
            payload = payload[:wnd - rel]
            n = wnd - rel
            trimmed = DR.TCP_OVERWINDOW
        else:
            trimmed = None
        if self.rd_shut:
            # shutdown(SHUT_RD): nobody will read; take it (the window stays open) and forget it
            self.rcv_nxt = (self.rcv_nxt + n) & SEQ_MASK if rel == 0 else self.rcv_nxt
            self.ack_now = True
            return trimmed
        if rel == 0:
            self.rcvq += payload
            self.rcv_nxt = (self.rcv_nxt + n) & SEQ_MASK
            if self.ofo.blocks:
                # filling a hole: take what now follows, ACK at once (RFC 5681 4.2: "an
                # immediate ACK ... when an incoming segment fills in all or part of a gap")
                while True:
                    more = self.ofo.pop_ready(self.rcv_nxt)
                    if more is None:
                        break
                    self.rcvq += more
                    self.rcv_nxt = (self.rcv_nxt + len(more)) & SEQ_MASK
                self.ack_now = True
            if self.ofo_fin is not None and self.ofo_fin == self.rcv_nxt:
                self.ofo_fin = None
                self._fin_arrives(now)
            self.events |= TcpEvent.READABLE
            self.delack_bytes += n
            if not self.ack_now:
                if self.delack_bytes >= 2 * self.rcv_mss:
                    self.ack_now = True
                elif self.t_delack is None:
                    self.t_delack = now + self.config.delack_min
            return trimmed
        # RFC 5681 4.2: "A TCP receiver SHOULD send an immediate duplicate ACK when an
        # out-of-order segment arrives."
        self.ack_now = True
        if not self.ofo.insert(seq, payload, self.rcv_nxt):
            c["TcpExtTCPOFODrop"] += 1
            return DR.TCP_OFO_DROP
        c["TcpExtTCPOFOQueue"] += 1
        return trimmed

    def _fin_arrives(self, now: int) -> None:
        """The FIN is next in sequence: EOF for the reader, and the state moves (RFC 9293
        3.10.7.4, eighth)."""
        self.rcv_nxt = (self.rcv_nxt + 1) & SEQ_MASK
        self.fin_received = True
        self.ack_now = True
        self.events |= TcpEvent.READABLE
        st = self.state
        if st in (ESTABLISHED, SYN_RECEIVED):
            self.state = CLOSE_WAIT
        elif st == FIN_WAIT_1:
            # "If our FIN has been ACKed ... enter TIME-WAIT ... otherwise, enter the CLOSING state"
            if self.fin_seq is not None and SEQ_GT(self.snd_una, self.fin_seq):
                self._enter_time_wait(now)
            else:
                self.state = CLOSING
        elif st == FIN_WAIT_2:
            self._enter_time_wait(now)

    def _rst_arrives(self) -> None:
        """An acceptable RST (RFC 9293 3.10.7.4, second): SYN-RECEIVED from a passive open goes
        back to LISTEN (here: CLOSED, the socket layer drops it from its SYN queue); from an
        active open it is "connection refused"; the synchronized states get "connection
        reset" except the closing ones, which just close."""
        st = self.state
        if st == SYN_RECEIVED:
            self._fail(0 if self.passive else errno.ECONNREFUSED)
        elif st in (ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2, CLOSE_WAIT):
            self._fail(errno.ECONNRESET)
        else:
            self._to_closed()

    # -- acknowledgments owed -----------------------------------------------------------------

    def _oow_ack(self, seg: TcpSegment, now: int) -> None:
        """A duplicate ACK for a segment we will not take; pure ACKs and SYNs only once per
        invalid_ratelimit (Linux's tcp_oow_rate_limited: "Data packets without SYNs are not
        likely part of an ACK loop")."""
        if seg.payload and not seg.flags & TH_SYN:
            self.ack_now = True
            return
        if now - self.last_oow_ack >= self.config.invalid_ratelimit:
            self.last_oow_ack = now
            self.ack_now = True
        else:
            self.counters["TcpExtTCPACKSkippedSeq"] += 1

    def _challenge_ack(self, now: int) -> None:
        """RFC 5961's challenge ACK <SEQ=SND.NXT><ACK=RCV.NXT><CTL=ACK>, limited per
        connection (invalid_ratelimit) and per stack (challenge_ack_limit per second)."""
        c = self.counters
        if now - self.last_oow_ack < self.config.invalid_ratelimit:
            c["TcpExtTCPACKSkippedChallenge"] += 1
            return
        if not self.config.challenge_limiter.allow(now):
            c["TcpExtTCPChallengeACKLimited"] += 1  # ours: Linux just stays silent
            return
        self.last_oow_ack = now
        c["TcpExtTCPChallengeACK"] += 1
        self.ack_now = True

    def _queue_ctl(self, seg: TcpSegment | None) -> None:
        if seg is None or len(self.ctl) >= MAX_CTL:
            return
        self.counters["TcpOutRsts"] += 1
        self.ctl.append(seg)

    def _send_rst(self) -> None:
        """tcp_send_active_reset: <SEQ=SND.NXT><ACK=RCV.NXT><CTL=RST,ACK>."""
        self._queue_ctl(TcpSegment(self.lport, self.rport, self.snd_nxt, self.rcv_nxt,
                                   TH_RST | TH_ACK, 0))

    # -- state changes ------------------------------------------------------------------------

    def _enter_time_wait(self, now: int) -> None:
        self.state = TIME_WAIT
        self.t_rtx = self.t_persist = self.t_keepalive = None
        self.t_close = now + self.config.time_wait
        self.sndq = bytearray()
        self.sb.clear()

    def _fail(self, err: int) -> None:
        self.error = err
        if err:
            self.events |= TcpEvent.RESET | TcpEvent.READABLE | TcpEvent.WRITABLE
        self._to_closed()

    def _to_closed(self) -> None:
        """CLOSED: Linux's tcp_set_state(TCP_CLOSE) counters, all timers off, queues freed
        (the receive queue stays for the reader)."""
        old = self.state
        if old == CLOSED:
            return
        c = self.counters
        if old in (ESTABLISHED, CLOSE_WAIT):
            c["TcpEstabResets"] += 1
        elif old in (SYN_SENT, SYN_RECEIVED):
            c["TcpAttemptFails"] += 1
        self.state = CLOSED
        self.t_rtx = self.t_persist = self.t_delack = self.t_keepalive = self.t_close = None
        self.sndq = bytearray()
        self.ofo.clear()
        self.sb.clear()
        self.ack_now = False
        self._send_syn = self._send_probe = self._force_send = False
        self.events |= TcpEvent.CLOSED

    # -- user calls -----------------------------------------------------------------------------

    def _raise_error(self) -> None:
        e, self.error = self.error, 0
        raise OSError(e, os.strerror(e))

    def send(self, data: bytes | bytearray | memoryview, now: int) -> int:
        """SEND: queue as much of `data` as the send buffer takes (0 when full). Raises the
        pending error, or BrokenPipeError after shutdown(SHUT_WR)/close or in a closing state."""
        if self.error:
            self._raise_error()
        st = self.state
        if self.wr_shut or st not in (ESTABLISHED, CLOSE_WAIT, SYN_SENT, SYN_RECEIVED):
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))
        room = self.config.sndbuf - len(self.sndq)
        n = min(room, len(data))
        if n < len(data):
            self.want_writable = True
        if n > 0:
            self.sndq += data[:n] if n < len(data) else data
        return max(n, 0)

    def recv(self, max: int, peek: bool = False) -> bytes:
        """RECEIVE: up to `max` bytes in order. b"" at EOF (FIN received, all read, or
        SHUT_RD); raises the pending error once the data before it is read; raises
        BlockingIOError when nothing is there yet."""
        q = self.rcvq
        if q and max > 0:
            if max >= len(q):
                out = bytes(q)
                if not peek:
                    self.rcvq = bytearray()
            else:
                out = bytes(q[:max])
                if not peek:
                    del q[:max]
            if not peek:
                self._window_update_check()
            return out
        if self.error:
            self._raise_error()
        if self.fin_received or self.rd_shut or self.state == CLOSED or max <= 0:
            return b""
        raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    def _window_update_check(self) -> None:
        """tcp_cleanup_rbuf: after a read, ACK at once if the window we could offer is at least
        twice the one the peer has, so a sender stopped by our window restarts."""
        if self.state not in _RECEIVING or self.fin_received:
            return
        cur = (self.rcv_adv - self.rcv_nxt) & SEQ_MASK
        if cur >= 0x80000000:
            cur = 0
        if 2 * cur <= self.config.rcvbuf:
            new = self._rcv_space()
            if new >= min(self.config.rcvbuf // 2, self.rcv_mss) and new >= 2 * cur:
                self.ack_now = True

    def shutdown(self, how: int, now: int) -> None:
        """shutdown(2): SHUT_WR queues a FIN after the data (RFC 9293 CLOSE for the sending
        side); SHUT_RD makes recv return EOF."""
        if how in (SHUT_RD, SHUT_RDWR):
            self.rd_shut = True
        if how in (SHUT_WR, SHUT_RDWR) and not self.wr_shut:
            st = self.state
            if st in (CLOSED, ST.LISTEN, TIME_WAIT, LAST_ACK, CLOSING, FIN_WAIT_1, FIN_WAIT_2):
                self.wr_shut = True
                return
            self.wr_shut = True
            self.fin_seq = (self.sndq_seq + len(self.sndq)) & SEQ_MASK
            if st == ESTABLISHED:
                self.state = FIN_WAIT_1
            elif st == CLOSE_WAIT:
                self.state = LAST_ACK
            # SYN-SENT, SYN-RECEIVED: "queue for processing after entering ESTABLISHED state"

    def close(self, now: int) -> None:
        """CLOSE: unread data -> RST and CLOSED (RFC 2525 2.17, Linux's TcpExtTCPAbortOnClose);
        otherwise a FIN after the data; the connection becomes an orphan that finishes alone
        (FIN-WAIT-2 bounded by fin_timeout, TIME_WAIT by time_wait)."""
        st = self.state
        if st == CLOSED:
            return
        self.orphan = True
        if st in (SYN_SENT, ST.LISTEN):
            self._to_closed()  # "delete the TCB"
            return
        if self.rcvq:
            self.counters["TcpExtTCPAbortOnClose"] += 1
            self.rcvq = bytearray()
            self.abort(now)
            return
        self.rd_shut = True
        self.shutdown(SHUT_WR, now)
        if self.state == FIN_WAIT_2:
            self.t_close = now + self.config.fin_timeout

    def abort(self, now: int) -> None:
        """ABORT: a RST in the synchronized states, then CLOSED."""
        if self.state in (SYN_RECEIVED, ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2, CLOSE_WAIT):
            self._send_rst()
        self._to_closed()

    # -- output ---------------------------------------------------------------------------------

    def _ts_now(self, now: int) -> int:
        """TSval: a millisecond clock, offset per connection (Linux's tcp_time_stamp_ts)."""
        return (now // 1_000_000 + self.ts_offset) & SEQ_MASK

    def _rcv_space(self) -> int:
        """What the receive buffer can still take."""
        return max(0, self.config.rcvbuf - len(self.rcvq) - self.ofo.bytes)

    def _select_window(self) -> int:
        """The window field (Linux's tcp_select_window): never shrink what was offered (RFC
        9293 3.8.6.2.2 MUST-35 "SHOULD NOT shrink"); receiver SWS avoidance (RFC 1122
        4.2.3.3): move the right edge only by min(rcvbuf / 2, MSS) or more."""
        ws = self.rcv_wscale
        cur = (self.rcv_adv - self.rcv_nxt) & SEQ_MASK
        if cur >= 0x80000000:
            cur = 0
        free = self._rcv_space()
        if free - cur >= min(self.config.rcvbuf // 2, self.rcv_mss):
            win = free
        else:
            win = cur
        field = (win + (1 << ws) - 1) >> ws
        if field > 65535:
            field = 65535
        self.rcv_adv = (self.rcv_nxt + (field << ws)) & SEQ_MASK
        self.rcv_wup = self.rcv_nxt
        return field

    def _segment(self, seq: int, flags: int, payload, now: int, sack: tuple) -> TcpSegment:
        """A segment of this connection carrying ACK, our window and options; whatever ACK was
        owed is paid by it."""
        seg = TcpSegment(self.lport, self.rport, seq, self.rcv_nxt, flags | TH_ACK,
                         self._select_window(), payload)
        if self.ts_ok:
            seg.tsval = self._ts_now(now)
            seg.tsecr = self.ts_recent
        if sack:
            seg.sack = sack
        self.ack_now = False
        self.delack_bytes = 0
        self.t_delack = None
        return seg

    def _syn_segment(self, now: int) -> TcpSegment:
        """Our SYN, or SYN-ACK in SYN-RECEIVED, with the options we offer (SYN) or agreed to
        (SYN-ACK: RFC 7323 and 2018 allow them only when the peer's SYN had them)."""
        cfg = self.config
        synack = self.state == SYN_RECEIVED
        win = min(self._rcv_space(), 65535)
        seg = TcpSegment(self.lport, self.rport, self.iss, self.rcv_nxt if synack else 0,
                         TH_SYN | (TH_ACK if synack else 0), win, mss=cfg.mss)
        if synack:
            self.rcv_adv = (self.rcv_nxt + win) & SEQ_MASK
            if self.ws_ok:
                seg.wscale = self.rcv_wscale
            if self.ts_ok:
                seg.tsval, seg.tsecr = self._ts_now(now), self.ts_recent
            seg.sack_permitted = self.sack_ok
        else:
            if cfg.window_scaling:
                seg.wscale = rcv_wscale_for(cfg.rcvbuf)
            if cfg.timestamps:
                seg.tsval, seg.tsecr = self._ts_now(now), 0
            seg.sack_permitted = cfg.sack
        return seg

    def segments_to_send(self, now: int) -> list[TcpSegment]:
        """What to put on the wire now: retransmissions, new data within the windows (Nagle,
        SWS avoidance), FIN, probes, ACKs, RSTs."""
        if self.state is ESTABLISHED and self.fast_path:
            out = _output_predicted(self, now)
            if out is not None:
                return out
        out = self.ctl
        if out:
            self.ctl = []
        else:
            out = []
        st = self.state
        if st == CLOSED:
            return out
        c = self.counters
        if self._send_syn:
            self._send_syn = False
            out.append(self._syn_segment(now))
            c["TcpOutSegs"] += 1
            if st == SYN_SENT:
                return out
            self.ack_now = False
        if st in (SYN_SENT, SYN_RECEIVED):
            return out
        sack = ()
        mss = self.mss
        if self.sack_ok and self.ofo.blocks:
            sack = self.ofo.sack_blocks(3 if self.ts_ok else 4)
            mss -= 4 + 8 * len(sack)
        if st in _SENDING:
            self._write_xmit(now, out, mss, sack)
        if self._send_probe:
            # a window probe or keepalive: an old sequence number makes the peer ACK
            # (Linux's tcp_xmit_probe_skb: "Use a previous sequence")
            self._send_probe = False
            out.append(self._segment((self.snd_una - 1) & SEQ_MASK, 0, b"", now, sack))
            c["TcpOutSegs"] += 1
        if self.ack_now:
            out.append(self._segment(self.snd_nxt, 0, b"", now, sack))
            c["TcpOutSegs"] += 1
        return out

    def _write_xmit(self, now: int, out: list, mss: int, sack: tuple) -> None:
        c = self.counters
        cfg = self.config
        # retransmissions (RFC 6675 NextSeg rule 1; the head for NewReno; go-back-N after RTO)
        if self.ca_state != CA_OPEN:
            while True:
                holes = self.sb.holes(self.snd_una, self.snd_nxt, self.mss, self.lost_end)
                hr = (self.high_rxt - self.snd_una) & SEQ_MASK
                if hr >= 0x80000000:
                    hr = 0
                pipe = self._pipe(holes, hr)
                if self.cwnd - pipe < mss and pipe > 0:
                    break
                start = end = -1
                for a, b, lost in holes:
                    if lost and b > hr:
                        start, end = max(a, hr), b
                        break
                if start < 0:
                    break
                seq = (self.snd_una + start) & SEQ_MASK
                used = self._emit_range(seq, min(mss, end - start), now, out, sack, True)
                if used <= 0:
                    break
                self.high_rxt = (seq + used) & SEQ_MASK
                c["TcpExtTCPFastRetrans" if self.ca_state == CA_RECOVERY else "TcpExtTCPSlowStartRetrans"] += 1
        # new data
        if self.snd_una == self.snd_nxt and cfg.slow_start_after_idle and self.last_send \
                and now - self.last_send > self.rtt.rto and self.state in _SENDING:
            # RFC 5681 4.1: "cwnd is reduced to the value of the restart window ... RW =
            # min(IW,cwnd)" after an idle period longer than the RTO
            self.cwnd = min(self.cwnd, cfg.init_cwnd * self.mss)
        force = self._force_send
        self._force_send = False
        if self.fast_path and not force and self.fin_seq is None and self.ca_state is CA_OPEN \
                and not self.sb.intervals and self.t_persist is None:
            if self.sndq_seq + len(self.sndq) & SEQ_MASK == self.snd_nxt:
                return  # nothing unsent: the loop below would stop at once and change nothing
            if not sack:
                _xmit_full_segments(self, now, out, mss)
        window_blocked = False
        while True:
            data_end = (self.sndq_seq + len(self.sndq)) & SEQ_MASK
            unsent = (data_end - self.snd_nxt) & SEQ_MASK
            if unsent >= 0x80000000:
                unsent = 0
            fin_due = self.fin_seq is not None and self.snd_nxt == self.fin_seq
            if not unsent and not fin_due:
                break
            length = min(unsent, mss)
            if length:
                wnd_left = (self.snd_una + self.snd_wnd - self.snd_nxt) & SEQ_MASK
                if wnd_left >= 0x80000000:
                    wnd_left = 0
                if self.ca_state == CA_OPEN and not self.sb.intervals:
                    pipe = (self.snd_nxt - self.snd_una) & SEQ_MASK
                else:
                    hr = (self.high_rxt - self.snd_una) & SEQ_MASK
                    pipe = self._pipe(self.sb.holes(self.snd_una, self.snd_nxt, self.mss,
                                                    self.lost_end), 0 if hr >= 0x80000000 else hr)
                if length > self.cwnd - pipe and pipe > 0:
                    break  # cwnd-limited: ACKs will clock more out
                if length > wnd_left:
                    window_blocked = True
                    # sender SWS avoidance (RFC 1122 4.2.3.4): a partial segment only if it
                    # is at least half the largest window the peer offered, or forced by the
                    # persist timer
                    if wnd_left <= 0 or not (force or wnd_left >= self.max_snd_wnd // 2):
                        break
                    length = wnd_left
                    force = False
                # Nagle (RFC 896, RFC 1122 4.2.3.4) with Minshall's refinement as Linux
                # (tcp_minshall_check): a small segment waits while an earlier small segment
                # is unacknowledged, unless TCP_NODELAY or it carries the FIN
                carries_fin = self.fin_seq is not None and (self.snd_nxt + length) & SEQ_MASK == self.fin_seq
                if length < mss and not cfg.nodelay and SEQ_GT(self.snd_sml, self.snd_una) \
                        and not carries_fin and length == unsent:
                    break
                if length < mss and length < unsent and not window_blocked:
                    length = min(unsent, mss)
            used = self._emit_range(self.snd_nxt, length, now, out, sack, False)
            if used <= 0:
                break
            self.snd_nxt = (self.snd_nxt + used) & SEQ_MASK
            if length < mss:
                self.snd_sml = self.snd_nxt
        # the persist timer (RFC 9293 3.8.6.1): data waits on a window that lets nothing out
        # and nothing is in flight to bring an ACK
        if window_blocked and self.snd_una == self.snd_nxt:
            if self.t_persist is None:
                self.t_persist = now + min(self.rtt.rto << self.probes_out, cfg.rto_max)
        elif self.t_persist is not None and not window_blocked:
            self.t_persist = None

    def _output_predicted(self, now: int) -> list | None:
        """segments_to_send's common case in ESTABLISHED, decided before anything changes:
        no RST, SYN or probe queued, OPEN with no SACK scoreboard or SACK blocks to carry, no
        FIN, no persist timer, and what the loop of _write_xmit would do after the
        full-sized segments is to stop without a change (nothing left, or cwnd-limited with
        data in flight). Then: the restart-after-idle cwnd, the full-sized segments
        (_xmit_full_segments), the ACK owed. Otherwise None with nothing changed, and the
        full path runs (partial segments, Nagle, SWS, a blocked window)."""
        if self.ctl or self._send_syn or self._send_probe or self._force_send \
                or self.ca_state is not CA_OPEN or self.sb.intervals or self.fin_seq is not None \
                or self.t_persist is not None or (self.sack_ok and self.ofo.blocks):
            return None
        mss = self.mss
        if mss <= 0:
            return None
        una, nxt = self.snd_una, self.snd_nxt
        cfg = self.config
        cwnd = self.cwnd
        # RFC 5681 4.1 as _write_xmit applies it, computed first: it bounds what follows
        restart = una == nxt and cfg.slow_start_after_idle and self.last_send \
            and now - self.last_send > self.rtt.rto
        if restart:
            cwnd = min(cwnd, cfg.init_cwnd * mss)
        unsent = (self.sndq_seq + len(self.sndq) - nxt) & SEQ_MASK
        if unsent >= 0x80000000:
            unsent = 0
        if unsent:
            flight = (nxt - una) & SEQ_MASK
            wnd_left = (una + self.snd_wnd - nxt) & SEQ_MASK
            if wnd_left >= 0x80000000:
                wnd_left = 0
            k = min(unsent // mss, wnd_left // mss)
            if flight:
                k = min(k, max(0, (cwnd - flight) // mss))
            elif k:
                k = min(k, 1 + max(0, (cwnd - mss) // mss))
            rest = unsent - k * mss
            if rest:
                pipe = flight + k * mss
                if not (min(rest, mss) > cwnd - pipe and pipe > 0):
                    return None  # the loop would go on: the full path decides
        if restart:
            self.cwnd = cwnd
        out: list = []
        if unsent:
            _xmit_full_segments(self, now, out, mss)
        if self.ack_now:
            out.append(self._segment(self.snd_nxt, 0, b"", now, ()))
            self.counters["TcpOutSegs"] += 1
        return out

    def _xmit_full_segments(self, now: int, out: list, mss: int) -> None:
        """The common case of the loop in _write_xmit, in OPEN with no SACK scoreboard, no FIN
        and no SACK blocks to carry: as many full-sized segments as the data, cwnd (with
        pipe = the flight) and the peer's window all allow, built without recomputing what
        does not change between them (the window field: _select_window gives the same field
        again until RCV.NXT or the queues move; the timestamp). The same segments, counters
        and timers as the loop; whatever remains (a partial segment, Nagle, SWS, a blocked
        window and the persist timer) is left to it."""
        sndq = self.sndq
        qlen = len(sndq)
        nxt = self.snd_nxt
        off = (nxt - self.sndq_seq) & SEQ_MASK
        if off >= 0x80000000 or qlen - off < mss or mss <= 0:
            return
        una = self.snd_una
        flight = (nxt - una) & SEQ_MASK
        wnd_left = (una + self.snd_wnd - nxt) & SEQ_MASK
        if wnd_left >= 0x80000000:
            wnd_left = 0
        k = min((qlen - off) // mss, wnd_left // mss)
        cwnd = self.cwnd
        if flight:
            k = min(k, max(0, (cwnd - flight) // mss))  # each needs flight + mss <= cwnd
        elif k:
            k = min(k, 1 + max(0, (cwnd - mss) // mss))  # the first goes with nothing in flight
        if k <= 0:
            return
        field = self._select_window()
        lport, rport, rcv_nxt = self.lport, self.rport, self.rcv_nxt
        ts = self.ts_ok
        if ts:
            tsval, tsecr = self._ts_now(now), self.ts_recent
        append = out.append
        for _ in range(k):
            end = off + mss
            seg = TcpSegment(lport, rport, nxt, rcv_nxt, TH_ACK | TH_PSH if end == qlen else TH_ACK,
                             field, sndq[off:end])
            if ts:
                seg.tsval = tsval
                seg.tsecr = tsecr
            append(seg)
            off = end
            nxt = (nxt + mss) & SEQ_MASK
        # _emit_range's and _segment's state changes, once for the k segments
        self.counters["TcpOutSegs"] += k
        if self.rtt_seq is None:
            self.rtt_seq = (self.snd_nxt + mss) & SEQ_MASK  # the first of them is timed
            self.rtt_time = now
        self.last_send = now
        if self.t_rtx is None:
            self.t_rtx = now + self.rtt.rto
        self.snd_nxt = nxt
        self.ack_now = False
        self.delack_bytes = 0
        self.t_delack = None

    def _pipe(self, holes: list, hr: int) -> int:
        """RFC 6675's pipe from the holes (offsets from SND.UNA) and HighRxt's offset."""
        p = 0
        for a, b, lost in holes:
            if not lost:
                p += b - a
            if hr > a:
                p += min(b, hr) - a
        p -= self.reno_sacked
        return p if p > 0 else 0

    def _emit_range(self, seq: int, length: int, now: int, out: list, sack: tuple,
                    rexmit: bool) -> int:
        """Append the segment that carries `length` data octets from `seq` (and the FIN if it
        follows them); returns the sequence space it used."""
        off = (seq - self.sndq_seq) & SEQ_MASK
        qlen = len(self.sndq)
        flags = 0
        if off < 0x80000000 and off < qlen:
            n = min(length, qlen - off)
            payload = self.sndq[off:off + n]
        else:
            n = 0
            payload = b""
        end = (seq + n) & SEQ_MASK
        if self.fin_seq is not None and end == self.fin_seq:
            flags |= TH_FIN
        if n and off + n == qlen:
            flags |= TH_PSH
        used = n + (flags & TH_FIN)
        if used == 0:
            return 0
        out.append(self._segment(seq, flags, payload, now, sack))
        c = self.counters
        if rexmit or SEQ_LT(seq, self.snd_nxt):
            c["TcpRetransSegs"] += 1
            self.total_retrans += 1
            if self.rtt_seq is not None and SEQ_LT(seq, self.rtt_seq):
                self.rtt_seq = None  # Karn: this sample could be of either copy
        else:
            c["TcpOutSegs"] += 1
            if self.rtt_seq is None and self.ca_state == CA_OPEN:
                self.rtt_seq = (seq + used) & SEQ_MASK
                self.rtt_time = now
        self.last_send = now
        if self.t_rtx is None:
            self.t_rtx = now + self.rtt.rto  # RFC 6298 5.1
        return used

    # -- timers ---------------------------------------------------------------------------------

    def next_deadline(self) -> int | None:
        """The earliest armed timer (retransmit/SYN, persist, delayed ACK, keepalive,
        TIME_WAIT, FIN-WAIT-2) in ns, or None."""
        d = self.t_rtx
        t = self.t_persist
        if t is not None and (d is None or t < d):
            d = t
        t = self.t_delack
        if t is not None and (d is None or t < d):
            d = t
        t = self.t_keepalive
        if t is not None and (d is None or t < d):
            d = t
        t = self.t_close
        if t is not None and (d is None or t < d):
            d = t
        return d

    def timer_expired(self, now: int) -> None:
        """Run every timer due at `now`; then call segments_to_send."""
        if self.t_close is not None and now >= self.t_close:
            self.t_close = None
            self._to_closed()  # TIME-WAIT's 2 MSL, or an orphan's FIN-WAIT-2 timeout
            return
        if self.t_rtx is not None and now >= self.t_rtx:
            self.t_rtx = None
            self._rto(now)
            if self.state == CLOSED:
                return
        if self.t_persist is not None and now >= self.t_persist:
            self.t_persist = None
            self._persist(now)
            if self.state == CLOSED:
                return
        if self.t_delack is not None and now >= self.t_delack:
            self.t_delack = None
            if self.delack_bytes or self.ack_now:
                self.counters["TcpExtDelayedACKs"] += 1
                self.ack_now = True
        if self.t_keepalive is not None and now >= self.t_keepalive:
            self.t_keepalive = None
            self._keepalive(now)

    def _rto(self, now: int) -> None:
        """The retransmission timer (RFC 6298 5.4-5.6, RFC 5681 3.1 eq. 4): back off; after the
        retry limit the connection fails with ETIMEDOUT."""
        cfg = self.config
        c = self.counters
        st = self.state
        if st in (SYN_SENT, SYN_RECEIVED):
            limit = cfg.syn_retries if st == SYN_SENT else cfg.synack_retries
            if self.retransmits >= limit:
                self._fail(errno.ETIMEDOUT)
                return
            self.retransmits += 1
            self.rtt.back_off()
            self.rtt_seq = None
            self._send_syn = True
            c["TcpRetransSegs"] += 1
            self.t_rtx = now + self.rtt.rto
            return
        if self.snd_una == self.snd_nxt:
            return
        if self.retransmits >= cfg.retries2:
            c["TcpExtTCPAbortOnTimeout"] += 1
            self._fail(errno.ETIMEDOUT)
            return
        c["TcpExtTCPTimeouts"] += 1
        mss = self.mss
        flight = (self.snd_nxt - self.snd_una) & SEQ_MASK
        if self.ca_state != CA_LOSS:
            # RFC 5681 eq. (4) on the first timeout; "ssthresh ... held constant" on repeats
            self.ssthresh = max(flight // 2, 2 * mss)
        self.lost_segs += 1
        self.cwnd = mss  # the loss window (RFC 5681 3.1: "LW ... is equal to 1 full-sized segment")
        self.ca_state = CA_LOSS
        self.recovery_point = self.snd_nxt
        self.lost_end = self.snd_nxt
        self.high_rxt = self.snd_una
        self.dupacks = 0
        self.reno_sacked = 0
        self.bytes_acked = 0
        self.rtt.back_off()
        self.retransmits += 1
        self.rtt_seq = None
        self.t_rtx = now + self.rtt.rto

    def _persist(self, now: int) -> None:
        """The persist timer: a zero-window probe, backed off as the RTO (Linux's
        tcp_probe_timer); the peer answering resets the count, silence for retries2 probes
        fails the connection."""
        if self.state not in _SENDING:
            return
        if self.snd_wnd == 0:
            self.probes_out += 1
            if self.probes_out > self.config.retries2:
                self._fail(errno.ETIMEDOUT)
                return
            self._send_probe = True
            self.counters["TcpExtTCPWinProbe"] += 1
        else:
            self._force_send = True  # RFC 1122 4.2.3.4's override timeout for SWS
        self.t_persist = now + min(self.rtt.rto << min(self.probes_out, 30), self.config.rto_max)

    def _arm_keepalive(self, now: int) -> None:
        if self.config.keepalive:
            self.t_keepalive = max(self.last_recv, now) + self.config.keepalive_time

    def set_keepalive(self, on: bool, now: int) -> None:
        """SO_KEEPALIVE on an open connection."""
        self.config.keepalive = on
        self.t_keepalive = None
        if on and self.state in SYNCHRONIZED and self.state != TIME_WAIT:
            self._arm_keepalive(now)

    def _keepalive(self, now: int) -> None:
        """SO_KEEPALIVE (RFC 1122 4.2.3.6, Linux's tcp_keepalive_timer): after keepalive_time
        idle, a probe every keepalive_intvl; keepalive_probes unanswered -> ETIMEDOUT."""
        cfg = self.config
        if not cfg.keepalive or self.state not in (ESTABLISHED, CLOSE_WAIT, FIN_WAIT_1, FIN_WAIT_2):
            return
        if self.snd_una != self.snd_nxt or self.sndq:
            self.t_keepalive = now + cfg.keepalive_time  # the retransmission timer watches
            return
        idle = now - self.last_recv
        if idle < cfg.keepalive_time:
            self.t_keepalive = self.last_recv + cfg.keepalive_time
            return
        if self.ka_probes_out >= cfg.keepalive_probes:
            self._fail(errno.ETIMEDOUT)
            return
        self.ka_probes_out += 1
        self._send_probe = True
        self.t_keepalive = now + cfg.keepalive_intvl

    # -- for the socket layer -------------------------------------------------------------------

    def readable(self) -> bool:
        """Data to read, EOF, or an error pending (poll's POLLIN)."""
        return bool(self.rcvq) or self.fin_received or self.rd_shut or bool(self.error) \
            or self.state == CLOSED

    def writable(self) -> bool:
        """send() would take bytes (poll's POLLOUT), or an error is pending."""
        if self.error:
            return True
        return self.state in (ESTABLISHED, CLOSE_WAIT) and not self.wr_shut \
            and len(self.sndq) < self.config.sndbuf

    def take_events(self) -> TcpEvent:
        """The edges since the last call (and clear them)."""
        e = self.events
        self.events = TcpEvent.NONE
        return e

    @property
    def bytes_in_flight(self) -> int:
        return (self.snd_nxt - self.snd_una) & SEQ_MASK

    def info(self) -> dict:
        """What `ss -ti` prints: state, cwnd, ssthresh, srtt_us, rttvar_us, rto_ms,
        bytes_in_flight, retrans, lost, sacked, rcv_wnd, snd_wnd, mss, wscale, ts, sack."""
        rcv_wnd = (self.rcv_adv - self.rcv_nxt) & SEQ_MASK
        return {
            "state": self.state.name,
            "ca_state": self.ca_state,
            "cwnd": self.cwnd // max(self.mss, 1),
            "cwnd_bytes": self.cwnd,
            "ssthresh": min(self.ssthresh, MAX_CWND) // max(self.mss, 1),
            "srtt_us": self.rtt.srtt // 1000,
            "rttvar_us": self.rtt.rttvar // 1000,
            "rto_ms": self.rtt.rto // 1_000_000,
            "backoff": self.rtt.backoff,
            "bytes_in_flight": self.bytes_in_flight,
            "unacked": self.bytes_in_flight,
            "retrans": self.total_retrans,
            "lost": self.lost_segs,
            "sacked": self.sb.sacked,
            "rcv_wnd": 0 if rcv_wnd >= 0x80000000 else rcv_wnd,
            "snd_wnd": self.snd_wnd,
            "mss": self.mss,
            "rcv_mss": self.rcv_mss,
            "wscale": (self.snd_wscale, self.rcv_wscale) if self.ws_ok else None,
            "ts": self.ts_ok,
            "sack": self.sack_ok,
            "send_q": len(self.sndq),
            "recv_q": len(self.rcvq),
            "ofo_bytes": self.ofo.bytes,
        }


# The common path's two steps: kstack/tcp/_fast.pyx (C) when it is built, else the Python
# methods above, its twin. NICEMU_PY_TCP=1 forces the Python twin (the tests run both).
_rcv_predicted = TcpConnection._rcv_predicted
_xmit_full_segments = TcpConnection._xmit_full_segments
_output_predicted = TcpConnection._output_predicted
_FAST_KIND = "python"
if os.environ.get("NICEMU_PY_TCP") != "1":
    try:
        from kstack.tcp import _fast
    except ImportError:
        pass
    else:
        _rcv_predicted = _fast.rcv_predicted
        _xmit_full_segments = _fast.xmit_full_segments
        _output_predicted = _fast.output_predicted
        _FAST_KIND = "cython"


def fast_path_kind() -> str:
    """Which common path runs: "cython" (kstack/tcp/_fast.pyx) or "python" (its twin)."""
    return _FAST_KIND if _rcv_predicted is not TcpConnection._rcv_predicted else "python"
