"""The ACK field once acceptable (RFC 5961 5.2): the window update, SND.UNA advancing,
RTT samples (RFC 6298, Karn), congestion control (RFC 5681: slow start, congestion
avoidance) and loss recovery in Linux's OPEN/RECOVERY states (RFC 6675 with SACK,
NewReno after RFC 6582 without; duplicate ACKs, partial ACKs, the recovery point).
"""
from __future__ import annotations


from wire.tcp import TH_FIN, TH_SYN, TcpSegment
from kstack.dropreason import SkbDropReason
from kstack.tcp.constants import (CA_LOSS, CA_OPEN, CA_RECOVERY, CLOSING, DR, FIN_WAIT_1,
                                  FIN_WAIT_2, LAST_ACK, MAX_CWND)
from kstack.tcp.sack import DUPTHRESH
from kstack.tcp.seq import SEQ_GEQ, SEQ_GT, SEQ_LEQ, SEQ_LT, SEQ_MASK
from kstack.tcp.state import TcpEvent


class TcpCongestion:
    """TcpConnection's ACK processing and congestion control (a mixin)."""


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

