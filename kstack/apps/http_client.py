"""A small HTTP/1.1 client over kstack: GET a URL, print the status and the body (or its
SHA-256).

    python -m kstack.apps.http_client [--sha256] [-n N] [--timeout S] [--kernel PATH] URL

-n N repeats the GET N times on one keep-alive connection (a new one if the server closes).
Responses need Content-Length, or end at the connection's close. The status line goes to
stderr, the body to stdout (unless --sha256), then one JSON line: status, bytes (of the last
body), sha256, requests, connections, seconds. Exit 0 when a response came, 1 otherwise.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from urllib.parse import urlsplit

from kstack import socket as ksocket
from kstack.apps.common import add_kernel_arg, open_kernel, report
from kstack.apps.http_common import MAX_HEAD, parse_head

MAX_BODY_PRINT = 1 << 24  # bytes of body kept to print; above it only hashed


class _Reader:
    """Buffered reads from a stream socket."""

    def __init__(self, sock: ksocket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def head(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n\r\n")
            if i >= 0:
                h = bytes(self.buf[:i])
                del self.buf[:i + 4]
                return h
            if len(self.buf) > MAX_HEAD:
                raise ValueError("response head too large")
            b = self.sock.recv(65536)
            if not b:
                raise ConnectionError("closed before a response")
            self.buf += b

    def body(self, length: int | None, sink) -> int:
        got = 0
        if self.buf:
            take = self.buf if length is None else self.buf[:length]
            sink(bytes(take))
            got = len(take)
            del self.buf[:got]
        while length is None or got < length:
            b = self.sock.recv(65536 if length is None else min(65536, length - got))
            if not b:
                if length is None:
                    return got
                raise ConnectionError(f"closed after {got} of {length} body bytes")
            sink(b)
            got += len(b)
        return got


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="http_client", description=__doc__.split("\n\n")[0])
    p.add_argument("url")
    p.add_argument("--sha256", action="store_true", help="print the body's SHA-256, not the body")
    p.add_argument("-n", type=int, default=1, help="GETs on one keep-alive connection")
    p.add_argument("--timeout", type=float, default=20.0)
    add_kernel_arg(p)
    args = p.parse_args(argv)
    u = urlsplit(args.url)
    if u.scheme != "http" or not u.hostname:
        p.error("the URL must be http://HOST[:PORT]/PATH")
    host, port = u.hostname, u.port or 80
    target = (u.path or "/") + (f"?{u.query}" if u.query else "")
    open_kernel(args)
    t0 = time.monotonic()
    status, nbytes, digest, requests, conns = 0, 0, "", 0, 0
    sock: ksocket.socket | None = None
    rd: _Reader | None = None
    try:
        for i in range(max(1, args.n)):
            if sock is None:
                sock = ksocket.socket(ksocket.AF_INET, ksocket.SOCK_STREAM)
                sock.settimeout(args.timeout)
                sock.connect((host, port))
                rd = _Reader(sock)
                conns += 1
            last = i == max(1, args.n) - 1
            req = (f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kstack-http_client\r\n"
                   f"Connection: {'close' if last else 'keep-alive'}\r\n\r\n").encode()
            sock.sendall(req)
            line, headers = parse_head(rd.head())
            parts = line.split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
                raise ValueError(f"bad status line {line!r}")
            status = int(parts[1])
            print(line, file=sys.stderr)
            cl = headers.get("content-length")
            h = hashlib.sha256()
            kept = bytearray()

            def sink(b: bytes) -> None:
                h.update(b)
                if not args.sha256 and len(kept) < MAX_BODY_PRINT:
                    kept.extend(b)

            nbytes = rd.body(int(cl) if cl is not None else None, sink)
            digest = h.hexdigest()
            requests += 1
            if args.sha256:
                print(f"{digest}  {args.url}")
            else:
                sys.stdout.write(kept.decode("utf-8", "replace"))
                if kept and not kept.endswith(b"\n"):
                    sys.stdout.write("\n")
            if cl is None or headers.get("connection", "").lower() == "close":
                sock.close()
                sock = None
    except (OSError, ValueError) as e:
        print(f"http_client: {e}", file=sys.stderr)
        report("http_client", {"status": status, "bytes": nbytes, "sha256": digest,
                               "requests": requests, "connections": conns, "error": str(e),
                               "seconds": time.monotonic() - t0})
        return 1
    finally:
        if sock is not None:
            sock.close()
    report("http_client", {"status": status, "bytes": nbytes, "sha256": digest, "requests": requests,
                           "connections": conns, "seconds": time.monotonic() - t0})
    return 0


if __name__ == "__main__":
    sys.exit(main())
