"""Option negotiation on the SYNs (RFC 9293 3.7.1, RFC 7323, RFC 2018).

Window scaling and timestamps are used only when both SYNs carry them (RFC 7323 2.2: "if a
Window Scale option is received with a SYN ... but the TCP did not send one, it MUST NOT
... ", 3.2: timestamps "MUST NOT be sent" unless the SYN carried TSopt); SACK only when both
sent SACK-permitted (RFC 2018 2). The MSS option is sent on every SYN and honoured; without
one the peer's MSS is 536 (RFC 9293 3.7.1, MUST-15).
"""
from __future__ import annotations

from wire.tcp import TCP_DEFAULT_MSS, TCP_MAX_WSCALE, TcpSegment
from kstack.tcp.config import TcpConfig

__all__ = ["rcv_wscale_for", "Negotiated", "negotiate", "TCPOLEN_TSTAMP_ALIGNED"]

TCPOLEN_TSTAMP_ALIGNED = 12  # NOP NOP TS: what every data segment pays with timestamps


def rcv_wscale_for(rcvbuf: int) -> int:
    """The smallest shift that lets the window cover rcvbuf (Linux's tcp_select_initial_window
    goes for the largest buffer the socket may grow to; ours is fixed)."""
    ws = 0
    while (65535 << ws) < rcvbuf and ws < TCP_MAX_WSCALE:
        ws += 1
    return ws


class Negotiated:
    """What both SYNs agreed on."""

    __slots__ = ("snd_mss", "snd_wscale", "rcv_wscale", "ts_ok", "sack_ok")

    def __init__(self) -> None:
        self.snd_mss = TCP_DEFAULT_MSS
        self.snd_wscale = 0
        self.rcv_wscale = 0
        self.ts_ok = False
        self.sack_ok = False


def negotiate(config: TcpConfig, peer_syn: TcpSegment, we_sent_ws: bool, we_sent_ts: bool,
              we_sent_sack: bool) -> Negotiated:
    """The result of our SYN's options (what we_sent_*) against the peer's SYN."""
    n = Negotiated()
    peer_mss = peer_syn.mss if peer_syn.mss is not None else TCP_DEFAULT_MSS
    # an MSS below 88 would make no progress with 40 bytes of options (Linux's TCP_MIN_SND_MSS 48)
    n.snd_mss = max(min(peer_mss, config.mss), 48)
    if we_sent_ws and peer_syn.wscale is not None:
        # RFC 7323 2.3: a shift above 14 is used as 14 (and logged)
        n.snd_wscale = min(peer_syn.wscale, TCP_MAX_WSCALE)
        n.rcv_wscale = rcv_wscale_for(config.rcvbuf)
    n.ts_ok = we_sent_ts and peer_syn.tsval is not None
    n.sack_ok = we_sent_sack and peer_syn.sack_permitted
    return n
