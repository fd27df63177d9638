"""The sender's SACK scoreboard and RFC 6675's loss recovery arithmetic.

The scoreboard holds what the peer SACKed above SND.UNA as disjoint sorted intervals
(absolute sequence numbers, compared as offsets from SND.UNA). From it and two marks of the
connection, `lost_end` (everything unSACKed below it is lost: after an RTO, or the head
segment in NewReno recovery) and HighRxt, RFC 6675 defines:

  IsLost(SeqNum): "DupThresh discontiguous SACKed sequences" above it, or "more than
    (DupThresh - 1) * SMSS bytes with sequence numbers greater than SeqNum have been SACKed"
  pipe: for each octet between SND.UNA and HighData not SACKed: +1 if not IsLost, +1 more if
    it was retransmitted (at or below HighRxt)
  NextSeg: (1) the first lost, unSACKed octet above HighRxt; (2) new data; (3) an unSACKed,
    not lost octet above HighRxt when SACKed data lies above it.
"""
from __future__ import annotations

from kstack.tcp.seq import SEQ_MASK

__all__ = ["Scoreboard", "DUPTHRESH", "MAX_SACKED_INTERVALS"]

DUPTHRESH = 3  # RFC 6675 2: DupThresh
MAX_SACKED_INTERVALS = 64  # ours: a peer cannot grow the scoreboard without bound


class Scoreboard:
    __slots__ = ("intervals", "sacked")

    def __init__(self) -> None:
        self.intervals: list[list[int]] = []  # [left, right) absolute, ascending
        self.sacked = 0  # bytes SACKed above SND.UNA

    def clear(self) -> None:
        self.intervals.clear()
        self.sacked = 0

    def update(self, blocks, snd_una: int, snd_nxt: int) -> int:
        """Merge the SACK blocks of one ACK; invalid ones (RFC 2018 and 5.1 of RFC 6675: not
        within SND.UNA..SND.NXT, empty, D-SACKs below SND.UNA) are ignored. Returns the bytes
        newly SACKed."""
        before = self.sacked
        span = (snd_nxt - snd_una) & SEQ_MASK
        for left, right in blocks:
            l = (left - snd_una) & SEQ_MASK
            r = (right - snd_una) & SEQ_MASK
            if not 0 < l < r <= span:
                continue
            self._add(l, r, snd_una)
        return self.sacked - before

    def _add(self, l: int, r: int, snd_una: int) -> None:
        ivs = self.intervals
        out = []
        placed = False
        for iv in ivs:
            a = (iv[0] - snd_una) & SEQ_MASK
            b = a + ((iv[1] - iv[0]) & SEQ_MASK)
            if b < l:
                out.append((a, b))
            elif a > r:
                if not placed:
                    out.append((l, r))
                    placed = True
                out.append((a, b))
            else:
                l, r = min(l, a), max(r, b)
        if not placed:
            out.append((l, r))
        if len(out) > MAX_SACKED_INTERVALS:
            return
        self.intervals = [[(snd_una + a) & SEQ_MASK, (snd_una + b) & SEQ_MASK] for a, b in out]
        self.sacked = sum(b - a for a, b in out)

    def advance(self, snd_una: int, old_una: int) -> None:
        """SND.UNA moved from old_una: drop what it covers."""
        ivs = self.intervals
        moved = (snd_una - old_una) & SEQ_MASK
        while ivs:
            a = (ivs[0][0] - old_una) & SEQ_MASK
            b = a + ((ivs[0][1] - ivs[0][0]) & SEQ_MASK)
            if b <= moved:
                self.sacked -= b - a
                del ivs[0]
            elif a < moved:
                self.sacked -= moved - a
                ivs[0][0] = snd_una
                break
            else:
                break

    def holes(self, snd_una: int, snd_nxt: int, mss: int, lost_end: int) -> list[tuple[int, int, bool]]:
        """The unSACKed ranges as (start offset, end offset, lost) from SND.UNA, up to
        SND.NXT, split at lost_end."""
        span = (snd_nxt - snd_una) & SEQ_MASK
        lost_off = (lost_end - snd_una) & SEQ_MASK
        if lost_off > span:
            lost_off = 0
        ivs = [((iv[0] - snd_una) & SEQ_MASK, (iv[1] - snd_una) & SEQ_MASK) for iv in self.intervals]
        out: list[tuple[int, int, bool]] = []
        pos = 0
        above = self.sacked
        nblocks = len(ivs)
        for i, (a, b) in enumerate(ivs):
            if a > pos:
                # IsLost for this whole hole: SACKed bytes and blocks above it
                lost = nblocks - i >= DUPTHRESH or above > (DUPTHRESH - 1) * mss
                _split(out, pos, a, lost, lost_off)
            above -= b - a
            pos = max(pos, b)
        if pos < span:
            _split(out, pos, span, False, lost_off)
        return out


def _split(out: list, a: int, b: int, lost: bool, lost_off: int) -> None:
    if lost or lost_off <= a:
        out.append((a, b, lost))
    elif lost_off >= b:
        out.append((a, b, True))
    else:
        out.append((a, lost_off, True))
        out.append((lost_off, b, False))
