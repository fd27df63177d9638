"""The retransmission timeout after RFC 6298.

    first measurement R:   SRTT <- R, RTTVAR <- R/2
    later measurements R': RTTVAR <- 3/4 RTTVAR + 1/4 |SRTT - R'|, SRTT <- 7/8 SRTT + 1/8 R'
    RTO <- SRTT + max(G, 4 RTTVAR), clamped to [rto_min, rto_max] (2.4: "rounded up to 1
    second" is Linux's TCP_RTO_MIN of 200 ms instead)
    5.5: on expiry "RTO <- RTO * 2 (back off the timer)", up to rto_max; 5.7: a new sample
    after backing off recomputes RTO (the backoff resets when new data is acknowledged).
"""
from __future__ import annotations

__all__ = ["RttEstimator"]

CLOCK_G = 1_000_000  # the clock granularity G: we take RTT samples in ns, G is 1 ms as Linux's jiffy-free tcp_mstamp


class RttEstimator:
    __slots__ = ("srtt", "rttvar", "base_rto", "rto_min", "rto_max", "backoff")

    def __init__(self, rto_initial: int, rto_min: int, rto_max: int) -> None:
        self.srtt = 0  # 0 = no sample yet
        self.rttvar = 0
        self.base_rto = rto_initial  # 2.1: "until a RTT measurement has been made ... RTO <- 1 second"
        self.rto_min = rto_min
        self.rto_max = rto_max
        self.backoff = 0

    def sample(self, r: int) -> None:
        """One RTT measurement R in ns (Karn's rule is the caller's: never from a segment
        that was retransmitted, unless timestamps tell which copy was acknowledged)."""
        if r < 0:
            return
        if self.srtt == 0:
            self.srtt = r or 1
            self.rttvar = r // 2
        else:
            self.rttvar = (3 * self.rttvar + abs(self.srtt - r)) // 4
            self.srtt = (7 * self.srtt + r) // 8 or 1
        rto = self.srtt + max(CLOCK_G, 4 * self.rttvar)
        self.base_rto = min(max(rto, self.rto_min), self.rto_max)

    @property
    def rto(self) -> int:
        """The current timeout, backed off."""
        return min(self.base_rto << self.backoff, self.rto_max) if self.backoff < 40 else self.rto_max

    def back_off(self) -> None:
        self.backoff += 1
