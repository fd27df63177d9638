"""Segment arrival (RFC 9293 3.10.7): the checks in the RFC's order, header prediction
(Linux's tcp_rcv_established), SYN-SENT, segment text into the receive and out-of-order
queues, FIN and RST, the ACKs owed for out-of-window segments and challenges (RFC 5961),
and the state changes they cause (TIME_WAIT, failure, CLOSED).
"""
from __future__ import annotations

import errno

from wire.tcp import TH_ACK, TH_FIN, TH_PSH, TH_RST, TH_SYN, TcpSegment
from kstack.dropreason import SkbDropReason
from kstack.tcp import fastpath as _fp
from kstack.tcp.constants import (CA_OPEN, CLOSE_WAIT, CLOSED, CLOSING, DR, ESTABLISHED,
                                  FIN_WAIT_1, FIN_WAIT_2, MAX_CTL, PAWS_24DAYS, ST, SYN_RECEIVED,
                                  SYN_SENT, TIME_WAIT, _EVENTS, _READABLE, _RECEIVING)
from kstack.tcp.seq import SEQ_GEQ, SEQ_GT, SEQ_LEQ, SEQ_LT, SEQ_MASK
from kstack.tcp.state import TcpEvent


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


class TcpInput:
    """TcpConnection's input half (a mixin; the TCB is TcpConnection's)."""

    # -- input ----------------------------------------------------------------------------------

    def segment_arrives(self, seg: TcpSegment, now: int) -> SkbDropReason | None:
        """SEGMENT ARRIVES (RFC 9293 3.10.7) for this connection. Returns None when the segment
        was taken (its data, or its control information), else why it was dropped; the
        counters are incremented here. `seg.payload` is copied if kept."""
        self.counters["TcpInSegs"] += 1
        state = self.state
        if state is ESTABLISHED and self.fast_path and _fp.rcv_predicted(self, seg, now):
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

