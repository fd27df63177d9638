"""Initial sequence numbers after RFC 6528.

    ISN = M + F(localip, localport, remoteip, remoteport, secretkey)

"where M is the 4 microsecond timer, and F() is a pseudorandom function (PRF) of the
connection-id ... the secret key ... SHOULD be randomly generated" (RFC 6528 3). Linux uses
SipHash keyed once per boot (secure_tcp_seq) plus a clock in 64 ns units; we use keyed
BLAKE2s, the key one per stack, and `now` from the caller (sans-IO).
"""
from __future__ import annotations

import hashlib
import os

__all__ = ["IsnGenerator"]


class IsnGenerator:
    """One per stack: isn(local, remote, now) for every connection the stack opens."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key is not None else os.urandom(16)

    def isn(self, local: tuple[str, int], remote: tuple[str, int], now: int) -> int:
        """F(4-tuple, key) + M, M counting 4 µs ticks of `now` (ns)."""
        msg = f"{local[0]}:{local[1]}>{remote[0]}:{remote[1]}".encode()
        f = int.from_bytes(hashlib.blake2s(msg, key=self._key, digest_size=4).digest(), "big")
        return (f + now // 4000) & 0xFFFFFFFF
