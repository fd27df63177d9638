"""What the HTTP/1.1 server and client share: the generated body and header parsing.

A generated body (GET /bytes/N) is 16-byte records "%015d\\n" of their own offset, cut at N:
position-dependent (a misplaced or repeated segment shows), cheap to make in pieces, and
anyone can compute its SHA-256 (generated_body(0, N)).
"""
from __future__ import annotations

__all__ = ["generated_body", "parse_head", "MAX_HEAD", "REASONS"]

MAX_HEAD = 8192  # bytes of request or status line plus headers we accept
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           413: "Content Too Large", 431: "Request Header Fields Too Large"}


def generated_body(offset: int, n: int) -> bytes:
    """Bytes [offset, offset + n) of the generated body."""
    if n <= 0:
        return b""
    first = offset // 16
    last = (offset + n + 15) // 16
    text = "".join(f"{i * 16:015d}\n" for i in range(first, last)).encode()
    s = offset - first * 16
    return text[s:s + n]


def parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    """The first line and the headers (names lower-cased) of a head without its blank line.
    ValueError when it is not HTTP/1.x as RFC 9112 writes it."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("not ASCII") from None
    lines = text.split("\r\n")
    headers: dict[str, str] = {}
    for ln in lines[1:]:
        name, sep, value = ln.partition(":")
        if not sep or not name or name != name.strip() or " " in name:
            raise ValueError(f"bad header line {ln!r}")
        headers[name.lower()] = value.strip()
    return lines[0], headers
