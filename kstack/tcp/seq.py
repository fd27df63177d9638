"""Sequence number arithmetic modulo 2^32 (RFC 9293 3.4, RFC 1982).

"It is essential to remember that the actual sequence number space is finite, though very
large ... all arithmetic dealing with sequence numbers must be performed modulo 2**32."
a < b when the distance from a forward to b is less than 2^31, as Linux's before()/after().
"""
from __future__ import annotations

__all__ = ["SEQ_MASK", "SEQ_LT", "SEQ_LEQ", "SEQ_GT", "SEQ_GEQ", "seq_add", "seq_sub",
           "seq_max", "seq_min", "seq_in"]

SEQ_MASK = 0xFFFFFFFF


def SEQ_LT(a: int, b: int) -> bool:
    """a < b modulo 2^32."""
    return 0 < ((b - a) & SEQ_MASK) < 0x80000000


def SEQ_LEQ(a: int, b: int) -> bool:
    return ((b - a) & SEQ_MASK) < 0x80000000


def SEQ_GT(a: int, b: int) -> bool:
    return 0 < ((a - b) & SEQ_MASK) < 0x80000000


def SEQ_GEQ(a: int, b: int) -> bool:
    return ((a - b) & SEQ_MASK) < 0x80000000


def seq_add(a: int, n: int) -> int:
    return (a + n) & SEQ_MASK


def seq_sub(a: int, b: int) -> int:
    """The signed distance a - b (in -2^31 .. 2^31-1)."""
    d = (a - b) & SEQ_MASK
    return d - 0x100000000 if d & 0x80000000 else d


def seq_max(a: int, b: int) -> int:
    return a if SEQ_GEQ(a, b) else b


def seq_min(a: int, b: int) -> int:
    return a if SEQ_LEQ(a, b) else b


def seq_in(x: int, lo: int, hi: int) -> bool:
    """lo <= x < hi modulo 2^32 (an empty range when lo == hi)."""
    return ((x - lo) & SEQ_MASK) < ((hi - lo) & SEQ_MASK)
