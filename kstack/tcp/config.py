"""TcpConfig: a connection's tunables, with Linux's defaults and where they come from.

Times are ns. The socket layer makes one per socket (setsockopt changes it before connect or
listen); a listener's config is copied into the connections it accepts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from kstack.tcp.ratelimit import ChallengeAckLimiter

__all__ = ["TcpConfig", "MS", "S"]

MS = 1_000_000
S = 1_000_000_000


@dataclass(slots=True)
class TcpConfig:
    mss: int = 1460  # what we advertise: the route's MTU - 40 (tcp_mss_clamp is the socket's)
    rcvbuf: int = 131072  # SO_RCVBUF: net.ipv4.tcp_rmem[1]; the receive window comes from it
    sndbuf: int = 16384  # SO_SNDBUF: net.ipv4.tcp_wmem[1]; bounds the bytes send() takes
    ofo_limit: int | None = None  # out-of-order bytes held; None = rcvbuf (Linux: sk_rcvbuf)
    nodelay: bool = False  # TCP_NODELAY: Nagle off
    window_scaling: bool = True  # net.ipv4.tcp_window_scaling
    timestamps: bool = True  # net.ipv4.tcp_timestamps
    sack: bool = True  # net.ipv4.tcp_sack
    init_cwnd: int = 10  # TCP_INIT_CWND (RFC 6928), in segments
    rto_initial: int = 1 * S  # TCP_TIMEOUT_INIT (RFC 6298 2.1: "RTO <- 1 second")
    rto_min: int = 200 * MS  # TCP_RTO_MIN
    rto_max: int = 120 * S  # TCP_RTO_MAX
    retries2: int = 15  # net.ipv4.tcp_retries2: RTOs before ETIMEDOUT (Linux bounds by time)
    syn_retries: int = 6  # net.ipv4.tcp_syn_retries
    synack_retries: int = 5  # net.ipv4.tcp_synack_retries
    delack_min: int = 40 * MS  # TCP_DELACK_MIN: the delayed-ACK timer
    delack_max: int = 200 * MS  # TCP_DELACK_MAX: "an ACK SHOULD be generated ... within 500 ms" (RFC 1122 4.2.3.2)
    time_wait: int = 60 * S  # TCP_TIMEWAIT_LEN: 2 MSL as Linux counts it
    fin_timeout: int = 60 * S  # net.ipv4.tcp_fin_timeout: an orphan's FIN-WAIT-2
    keepalive: bool = False  # SO_KEEPALIVE
    keepalive_time: int = 7200 * S  # net.ipv4.tcp_keepalive_time
    keepalive_intvl: int = 75 * S  # net.ipv4.tcp_keepalive_intvl
    keepalive_probes: int = 9  # net.ipv4.tcp_keepalive_probes
    slow_start_after_idle: bool = True  # net.ipv4.tcp_slow_start_after_idle (RFC 5681 4.1)
    # GSO (tcp_tso_autosize without pacing): new data goes out in segments of up to this many
    # payload bytes (whole MSS multiples), split at dev_queue_xmit (kstack.gso); 0 = off. The
    # socket layer sets it from the route's device (NETIF_F_GSO): GSO_MAX_SIZE - 1 - MAX_TCP_HEADER
    gso_max_size: int = 0
    invalid_ratelimit: int = 500 * MS  # net.ipv4.tcp_invalid_ratelimit: dup ACKs to out-of-window segments
    # net.ipv4.tcp_challenge_ack_limit, shared by every connection of a stack (Linux's is per
    # netns): pass the same limiter in every config of one stack.
    challenge_limiter: ChallengeAckLimiter = field(default_factory=ChallengeAckLimiter)

    def copy(self) -> "TcpConfig":
        """A copy for an accepted connection (the limiter stays shared)."""
        c = TcpConfig.__new__(TcpConfig)
        for name in TcpConfig.__slots__:
            setattr(c, name, getattr(self, name))
        return c
