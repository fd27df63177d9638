"""Timers: the next deadline, the retransmission timeout (RFC 6298 backoff, LOSS state,
ETIMEDOUT), the persist timer's zero-window probes, keepalive, TIME_WAIT/FIN-WAIT-2.
"""
from __future__ import annotations

import errno

from kstack.tcp.constants import (CA_LOSS, CLOSE_WAIT, CLOSED, ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2,
                                  SYN_RECEIVED, SYN_SENT, TIME_WAIT, _SENDING)
from kstack.tcp.seq import SEQ_MASK
from kstack.tcp.state import SYNCHRONIZED


class TcpTimers:
    """TcpConnection's timers (a mixin)."""

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

