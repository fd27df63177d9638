"""A small HTTP/1.1 server over kstack.

    python -m kstack.apps.http_server [--bind IP] [--port 80] [--root DIR] [--max-conns N]
                                      [--duration S] [--kernel PATH]

GET (and HEAD) of a file under --root (no way out of it: ".." or a symlink leaving the root is
404), or GET /bytes/N: a generated body of N bytes (kstack.apps.http_common). Keep-alive as
HTTP/1.1 has it (Connection: close, or HTTP/1.0 without keep-alive, closes after the response),
Content-Length on every response, 400 for a malformed request, 405 for another method, 431 for
a head over 8 KiB (then the connection closes). Request bodies are not accepted (413).
One select() loop, non-blocking sockets, a bounded output per connection (bodies are produced
piece by piece as the connection takes them). Runs until SIGTERM/SIGINT or S seconds.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Iterator

from kstack import socket as ksocket
from kstack.apps.common import (Stop, add_kernel_arg, deadline, listen_tcp, open_kernel, report,
                                 select_and_accept, server_parser)
from kstack.apps.http_common import MAX_HEAD, REASONS, generated_body, parse_head

MAX_GENERATED = 1 << 34  # 16 GiB: /bytes/N above this is 404
PIECE = 65536


class _Conn:
    __slots__ = ("sock", "inbuf", "out", "body", "close_after", "eof")

    def __init__(self, sock: ksocket.socket) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.out = bytearray()
        self.body: Iterator[bytes] | None = None
        self.close_after = False
        self.eof = False


def _file_pieces(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while b := f.read(PIECE):
            yield b


def _gen_pieces(n: int) -> Iterator[bytes]:
    off = 0
    while off < n:
        k = min(PIECE, n - off)
        yield generated_body(off, k)
        off += k


class Server:
    def __init__(self, root: str | None) -> None:
        self.root = os.path.realpath(root) if root else None
        self.requests = 0
        self.status: dict[int, int] = {}
        self.body_bytes = 0

    def respond(self, c: _Conn, head: bytes) -> None:
        """Parse one request head and queue its response."""
        try:
            line, headers = parse_head(head)
            method, target, version = line.split(" ")
            if not version.startswith("HTTP/1.") or not target.startswith("/"):
                raise ValueError("request line")
        except ValueError:
            self._send(c, 400, b"bad request\n", close=True)
            return
        conn_hdr = headers.get("connection", "").lower()
        close = "close" in conn_hdr or (version == "HTTP/1.0" and "keep-alive" not in conn_hdr)
        if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
            self._send(c, 413, b"no request bodies\n", close=True)
            return
        if method not in ("GET", "HEAD"):
            self._send(c, 405, b"GET or HEAD\n", close=close, extra="Allow: GET, HEAD\r\n")
            return
        path = target.split("?", 1)[0]
        length, pieces = self._resource(path)
        if pieces is None:
            self._send(c, 404, b"not found\n", close=close, head_only=method == "HEAD")
            return
        self._send(c, 200, b"", close=close, length=length,
                   body=None if method == "HEAD" else pieces)

    def _resource(self, path: str) -> tuple[int, Iterator[bytes] | None]:
        if path.startswith("/bytes/"):
            try:
                n = int(path[7:])
            except ValueError:
                return 0, None
            if not 0 <= n <= MAX_GENERATED:
                return 0, None
            return n, _gen_pieces(n)
        if self.root is None:
            return 0, None
        rel = path.lstrip("/") or "index.html"
        full = os.path.realpath(os.path.join(self.root, rel))
        if os.path.commonpath([full, self.root]) != self.root or not os.path.isfile(full):
            return 0, None
        try:
            return os.path.getsize(full), _file_pieces(full)
        except OSError:
            return 0, None

    def _send(self, c: _Conn, code: int, text: bytes, close: bool, length: int | None = None,
              body: Iterator[bytes] | None = None, extra: str = "", head_only: bool = False) -> None:
        self.requests += 1
        self.status[code] = self.status.get(code, 0) + 1
        n = len(text) if length is None else length
        head = (f"HTTP/1.1 {code} {REASONS.get(code, 'Status')}\r\nServer: kstack\r\n"
                f"Content-Length: {n}\r\n{extra}"
                f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n").encode()
        c.out += head
        if text and not head_only:
            c.out += text
            self.body_bytes += len(text)
        c.body = body
        c.close_after = close


def main(argv: list[str] | None = None) -> int:
    p = server_parser("http_server", __doc__, 80)
    p.add_argument("--root", default=None, help="serve files from this directory")
    p.add_argument("--max-conns", type=int, default=128)
    p.add_argument("--duration", type=float, default=0.0)
    add_kernel_arg(p)
    args = p.parse_args(argv)
    open_kernel(args)
    stop = Stop()
    srv = Server(args.root)
    lsk = listen_tcp("http_server", args.bind, args.port, 128)
    if lsk is None:
        return 2
    lsk.setblocking(False)
    conns: dict[int, _Conn] = {}
    accepted = errors = 0
    start, end = deadline(args.duration)
    while not stop.set and time.monotonic() < end:
        rl = [c.sock for c in conns.values() if not c.eof and not c.out and c.body is None]
        wl = [c.sock for c in conns.values() if c.out or c.body is not None]
        got = select_and_accept(lsk, conns, rl, wl, len(conns) < args.max_conns, _Conn)
        if got is None:
            errors += 1
            break
        r, w, n = got
        accepted += n
        for s in r:
            c = conns.get(s.fileno())
            if c is None:
                continue
            try:
                data = s.recv(MAX_HEAD)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                c.eof = True
                continue
            c.inbuf += data
            i = c.inbuf.find(b"\r\n\r\n")
            if i >= 0:
                head = bytes(c.inbuf[:i])
                del c.inbuf[:i + 4]
                srv.respond(c, head)
            elif len(c.inbuf) > MAX_HEAD:
                c.inbuf.clear()
                srv._send(c, 431, b"request head too large\n", close=True)
        for s in w:
            c = conns.get(s.fileno())
            if c is None:
                continue
            if len(c.out) < PIECE and c.body is not None:
                piece = next(c.body, None)
                if piece is None:
                    c.body = None
                else:
                    c.out += piece
                    srv.body_bytes += len(piece)
            if not c.out:
                continue
            try:
                n = s.send(c.out)
                del c.out[:n]
            except BlockingIOError:
                pass
            except OSError:
                errors += 1
                c.eof, c.body = True, None
                c.out.clear()
        for fd, c in list(conns.items()):
            done = not c.out and c.body is None
            if done and c.inbuf.find(b"\r\n\r\n") >= 0 and not c.close_after:
                i = c.inbuf.find(b"\r\n\r\n")  # a pipelined request already here
                head = bytes(c.inbuf[:i])
                del c.inbuf[:i + 4]
                srv.respond(c, head)
                continue
            if (c.eof or c.close_after) and done:
                c.sock.close()
                del conns[fd]
    for c in conns.values():
        c.sock.close()
    lsk.close()
    elapsed = time.monotonic() - start
    print(f"http_server: {accepted} connections, {srv.requests} requests in {elapsed:.3f} s")
    report("http_server", {"connections": accepted, "requests": srv.requests,
                           "status": {str(k): v for k, v in sorted(srv.status.items())},
                           "body_bytes": srv.body_bytes, "errors": errors, "seconds": elapsed})
    return 0


if __name__ == "__main__":
    sys.exit(main())
