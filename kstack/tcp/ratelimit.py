"""The challenge-ACK rate limit (RFC 5961 7, Linux's tcp_challenge_ack_limit).

RFC 5961 7: "An implementation SHOULD include an ACK throttling mechanism". Linux allows
net.ipv4.tcp_challenge_ack_limit challenge ACKs per second per network namespace (1000 from
4.7; since 6.0 the default is INT_MAX, relying on the per-socket out-of-window limit). We keep
a bound: 1000 per second, one limiter shared by a stack's connections.
"""
from __future__ import annotations

__all__ = ["ChallengeAckLimiter"]


class ChallengeAckLimiter:
    __slots__ = ("limit", "_second", "_count")

    def __init__(self, limit: int = 1000) -> None:
        self.limit = limit
        self._second = -1
        self._count = 0

    def allow(self, now: int) -> bool:
        """True when one more challenge ACK may go out in the second `now` (ns) falls in."""
        sec = now // 1_000_000_000
        if sec != self._second:
            self._second = sec
            self._count = 0
        if self._count >= self.limit:
            return False
        self._count += 1
        return True
