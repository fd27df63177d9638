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

The machine is split by concern into mixins TcpConnection inherits: input.py (segment
arrival), congestion.py (the ACK, congestion control, loss recovery), output.py
(segmentation and transmission), timers.py; constants.py has the shared names and
fastpath.py the choice between the C common path and its Python twin.
"""
from __future__ import annotations

import collections
import errno
import os

from wire.tcp import TCP_DEFAULT_MSS, TcpSegment
from kstack.tcp import fastpath as _fp
from kstack.tcp.buffers import OfoQueue
from kstack.tcp.config import TcpConfig
from kstack.tcp.congestion import TcpCongestion
from kstack.tcp.constants import (CA_LOSS, CA_OPEN, CA_RECOVERY, CLOSE_WAIT, CLOSED, CLOSING,
                                  ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2, LAST_ACK, MAX_CWND, SHUT_RD,
                                  SHUT_RDWR, SHUT_WR, ST, SYN_RECEIVED, SYN_SENT, TIME_WAIT,
                                  _RECEIVING)
from kstack.tcp.options import TCPOLEN_TSTAMP_ALIGNED, negotiate
from kstack.tcp.rtt import RttEstimator
from kstack.tcp.sack import Scoreboard
from kstack.tcp.seq import SEQ_MASK
from kstack.tcp.state import TcpEvent
from kstack.tcp.input import TcpInput, reset_for
from kstack.tcp.output import TcpOutput
from kstack.tcp.timers import TcpTimers

__all__ = ["TcpConnection", "SHUT_RD", "SHUT_WR", "SHUT_RDWR", "reset_for",
           "CA_OPEN", "CA_RECOVERY", "CA_LOSS", "fast_path_kind"]


class TcpConnection(TcpInput, TcpCongestion, TcpOutput, TcpTimers):
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
# methods above, its twin (kstack.tcp.fastpath holds the choice).
_fp.select(TcpConnection)


def fast_path_kind() -> str:
    """Which common path runs: "cython" (kstack/tcp/_fast.pyx) or "python" (its twin)."""
    return _fp.kind(TcpConnection)
