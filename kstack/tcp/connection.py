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
"""
from __future__ import annotations

import collections
import errno
import os

from wire.tcp import TcpSegment
from kstack.dropreason import SkbDropReason
from kstack.tcp.config import TcpConfig
from kstack.tcp.state import SYNCHRONIZED, TcpEvent, TcpState

__all__ = ["TcpConnection", "SHUT_RD", "SHUT_WR", "SHUT_RDWR", "reset_for"]

SHUT_RD, SHUT_WR, SHUT_RDWR = 0, 1, 2


def reset_for(seg: TcpSegment) -> TcpSegment | None:
    """The RST that answers a segment no connection takes (RFC 9293 3.10.7.1, CLOSED state):
    never for a RST; <SEQ=SEG.ACK><CTL=RST> when it has ACK, else
    <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>. For the socket layer (no socket, or a listener
    that gets an ACK)."""
    raise NotImplementedError


class TcpConnection:
    """The TCB and its machine. Attributes the socket layer reads: state, error (errno or 0),
    events, local, remote, config, and the RFC's variables (snd_una, snd_nxt, rcv_nxt, ...)."""

    def __init__(self, local: tuple[str, int], remote: tuple[str, int], config: TcpConfig,
                 counters: collections.Counter, iss: int) -> None:
        raise NotImplementedError

    # -- opens --------------------------------------------------------------------------------

    def open_active(self, now: int) -> None:
        """OPEN call, active (connect): CLOSED -> SYN-SENT, a SYN queued, the SYN timer armed.
        TcpActiveOpens."""
        raise NotImplementedError

    @classmethod
    def from_syn(cls, config: TcpConfig, seg: TcpSegment, now: int, local: tuple[str, int],
                 remote: tuple[str, int], counters: collections.Counter,
                 iss: int) -> "TcpConnection":
        """A listener got an acceptable SYN (RFC 9293 3.10.7.2, LISTEN, third check): the new
        connection in SYN-RECEIVED with its SYN-ACK queued and retransmitted on its timer
        (synack_retries, then CLOSED with TcpAttemptFails). TcpPassiveOpens. The socket layer
        checks the SYN queue limit before calling and moves the connection to the accept
        queue on TcpEvent.ESTABLISHED."""
        raise NotImplementedError

    # -- input ----------------------------------------------------------------------------------

    def segment_arrives(self, seg: TcpSegment, now: int) -> SkbDropReason | None:
        """SEGMENT ARRIVES (RFC 9293 3.10.7) for this connection. Returns None when the segment
        was taken (its data, or its control information), else why it was dropped; the
        counters are incremented here. `seg.payload` is copied if kept."""
        raise NotImplementedError

    # -- user calls -----------------------------------------------------------------------------

    def send(self, data: bytes | bytearray | memoryview, now: int) -> int:
        """SEND: queue as much of `data` as the send buffer takes (0 when full). Raises the
        pending error, or BrokenPipeError after shutdown(SHUT_WR)/close or in a closing state."""
        raise NotImplementedError

    def recv(self, max: int, peek: bool = False) -> bytes:
        """RECEIVE: up to `max` bytes in order. b"" at EOF (FIN received, all read, or
        SHUT_RD); raises the pending error once the data before it is read; raises
        BlockingIOError when nothing is there yet."""
        raise NotImplementedError

    def shutdown(self, how: int, now: int) -> None:
        """shutdown(2): SHUT_WR queues a FIN after the data (RFC 9293 CLOSE for the sending
        side); SHUT_RD makes recv return EOF."""
        raise NotImplementedError

    def close(self, now: int) -> None:
        """CLOSE: unread data -> RST and CLOSED (RFC 2525 2.17, Linux's TcpExtTCPAbortOnClose);
        otherwise a FIN after the data; the connection becomes an orphan that finishes alone
        (FIN-WAIT-2 bounded by fin_timeout, TIME_WAIT by time_wait)."""
        raise NotImplementedError

    def abort(self, now: int) -> None:
        """ABORT: a RST in the synchronized states, then CLOSED."""
        raise NotImplementedError

    # -- output and timers ----------------------------------------------------------------------

    def segments_to_send(self, now: int) -> list[TcpSegment]:
        """What to put on the wire now: retransmissions, new data within the windows (Nagle,
        SWS avoidance), FIN, probes, ACKs, RSTs."""
        raise NotImplementedError

    def next_deadline(self) -> int | None:
        """The earliest armed timer (retransmit/SYN, persist, delayed ACK, keepalive,
        TIME_WAIT, FIN-WAIT-2) in ns, or None."""
        raise NotImplementedError

    def timer_expired(self, now: int) -> None:
        """Run every timer due at `now`; then call segments_to_send."""
        raise NotImplementedError

    # -- for the socket layer -------------------------------------------------------------------

    def readable(self) -> bool:
        """Data to read, EOF, or an error pending (poll's POLLIN)."""
        raise NotImplementedError

    def writable(self) -> bool:
        """send() would take bytes (poll's POLLOUT), or an error is pending."""
        raise NotImplementedError

    def take_events(self) -> TcpEvent:
        """The edges since the last call (and clear them)."""
        raise NotImplementedError

    def info(self) -> dict:
        """What `ss -ti` prints: state, cwnd, ssthresh, srtt_us, rttvar_us, rto_ms,
        bytes_in_flight, retrans, lost, sacked, rcv_wnd, snd_wnd, mss, wscale, ts, sack."""
        raise NotImplementedError
