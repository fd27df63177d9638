"""Output (Linux's tcp_write_xmit in miniature): the window we advertise, segment
building, the SYN, retransmissions the recovery state asks for (RFC 6675 NextSeg and
pipe), new data within cwnd and the peer's window with Nagle and sender SWS, FIN,
probes, the ACK owed; the common path's prediction and full-segment loop (twins of
kstack/tcp/_fast.pyx).
"""
from __future__ import annotations


from wire.tcp import TH_ACK, TH_FIN, TH_PSH, TH_SYN, TcpSegment
from kstack.tcp import fastpath as _fp
from kstack.tcp.constants import (CA_OPEN, CA_RECOVERY, CLOSED, ESTABLISHED, SYN_RECEIVED,
                                  SYN_SENT, _SENDING)
from kstack.tcp.options import rcv_wscale_for
from kstack.tcp.seq import SEQ_GT, SEQ_LT, SEQ_MASK


class TcpOutput:
    """TcpConnection's output half (a mixin)."""

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
            out = _fp.output_predicted(self, now)
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
        # the full-segment loop: the common path's, and GSO's (only it builds GSO segments;
        # the per-segment loop below sends partial ones, and retransmissions are MSS-sized)
        if (self.fast_path or cfg.gso_max_size) and not force and self.fin_seq is None \
                and self.ca_state is CA_OPEN and not self.sb.intervals and self.t_persist is None:
            if self.sndq_seq + len(self.sndq) & SEQ_MASK == self.snd_nxt:
                return  # nothing unsent: the loop below would stop at once and change nothing
            if not sack:
                _fp.xmit_full_segments(self, now, out, mss)
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
            _fp.xmit_full_segments(self, now, out, mss)
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
        window and the persist timer) is left to it. With GSO (config.gso_max_size) the k
        segments go as few large ones of whole MSS multiples; TcpOutSegs counts the k
        (tcp_skb_pcount)."""
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
        # GSO: up to `per` full-sized segments in one (the device's split gives the same wire)
        gso = self.config.gso_max_size
        per = gso // mss if gso > mss else 1
        left = k
        while left:
            n = per if per < left else left
            left -= n
            end = off + n * mss
            seg = TcpSegment(lport, rport, nxt, rcv_nxt, TH_ACK | TH_PSH if end == qlen else TH_ACK,
                             field, sndq[off:end])
            if ts:
                seg.tsval = tsval
                seg.tsecr = tsecr
            append(seg)
            off = end
            nxt = (nxt + n * mss) & SEQ_MASK
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

