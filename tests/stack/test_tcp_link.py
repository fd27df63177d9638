"""A fake link between two TcpConnections and a fake clock: the harness of the TCP tests.

Every segment goes through wire.tcp's emit() and parse() with the checksum, so the engine
is driven by bytes as it will be in the stack. The link can drop, duplicate, delay and
reorder; `taps` see every segment.
"""
from __future__ import annotations

import collections
import heapq
import random

from kstack.tcp import TcpConfig, TcpConnection, TcpState
from wire.ipv4 import addr_to_int
from wire.tcp import TcpSegment

A_ADDR, B_ADDR = "198.18.0.1", "198.18.0.2"
A_INT, B_INT = addr_to_int(A_ADDR), addr_to_int(B_ADDR)
MS = 1_000_000


def through_wire(seg: TcpSegment, src: int, dst: int) -> TcpSegment:
    """emit with the checksum, parse back (checks the checksum), payload copied."""
    b = seg.emit(src, dst)
    p = TcpSegment.parse(b, src, dst)
    p.payload = bytes(p.payload)
    return p


class Link:
    """Two connections, a one-way delay, and fault hooks. `drop(seg, frm)` -> bool decides
    per segment; `extra_delay(seg, frm)` -> ns adds delay (reordering); `dup(seg, frm)`."""

    def __init__(self, a: TcpConnection, b: TcpConnection, delay: int = 1 * MS) -> None:
        self.a, self.b = a, b
        self.now = 0
        self.delay = delay
        self.q: list = []
        self.n = 0
        self.drop = lambda seg, frm: False
        self.extra_delay = lambda seg, frm: 0
        self.dup = lambda seg, frm: False
        self.log: list[tuple[str, TcpSegment]] = []
        self.dropped = 0
        self.reasons = collections.Counter()

    def peer(self, c):
        return self.b if c is self.a else self.a

    def name(self, c) -> str:
        return "a" if c is self.a else "b"

    def flush(self) -> int:
        sent = 0
        for c in (self.a, self.b):
            for seg in c.segments_to_send(self.now):
                sent += 1
                frm = self.name(c)
                src, dst = (A_INT, B_INT) if c is self.a else (B_INT, A_INT)
                w = through_wire(seg, src, dst)
                self.log.append((frm, w))
                if self.drop(w, frm):
                    self.dropped += 1
                    continue
                copies = 2 if self.dup(w, frm) else 1
                for _ in range(copies):
                    t = self.now + self.delay + self.extra_delay(w, frm)
                    self.n += 1
                    heapq.heappush(self.q, (t, self.n, self.peer(c), w))
        return sent

    def deliver(self, conn, seg) -> None:
        r = conn.segment_arrives(seg, self.now)
        if r is not None:
            self.reasons[r.name] += 1

    def step(self, horizon: int | None = None) -> bool:
        """One event: flush, then the earliest delivery or timer. False when nothing is left
        (or the next event is past `horizon`)."""
        self.flush()
        deadlines = [d for d in (self.a.next_deadline(), self.b.next_deadline()) if d is not None]
        t_timer = min(deadlines) if deadlines else None
        t_pkt = self.q[0][0] if self.q else None
        if t_pkt is None and t_timer is None:
            return False
        if t_pkt is not None and (t_timer is None or t_pkt <= t_timer):
            if horizon is not None and t_pkt > horizon:
                return False
            t, _, conn, seg = heapq.heappop(self.q)
            self.now = max(self.now, t)
            self.deliver(conn, seg)
        else:
            if horizon is not None and t_timer > horizon:
                return False
            self.now = max(self.now, t_timer)
            for c in (self.a, self.b):
                d = c.next_deadline()
                if d is not None and d <= self.now:
                    c.timer_expired(self.now)
        self.flush()
        return True

    def run(self, until=None, horizon: int | None = None, max_steps: int = 1_000_000) -> None:
        """Step until `until()` is true, nothing is left, or `horizon` (ns) is reached."""
        for _ in range(max_steps):
            if until is not None and until():
                return
            if not self.step(horizon):
                if horizon is not None:
                    self.now = max(self.now, horizon)
                return
        raise AssertionError("the link did not settle")


def pair(iss_a: int = 1000, iss_b: int = 5000, cfg_a: TcpConfig | None = None,
         cfg_b: TcpConfig | None = None, delay: int = 1 * MS):
    """An active opener `a` and the passive side `b` (made by from_syn when the SYN arrives,
    as a listener would) joined by a Link; returns (link, counters)."""
    counters = collections.Counter()
    cfg_a = cfg_a or TcpConfig()
    cfg_b = cfg_b or TcpConfig()
    a = TcpConnection((A_ADDR, 40000), (B_ADDR, 80), cfg_a, counters, iss_a)
    link = Link(a, None, delay)
    a.open_active(0)

    class Listener:
        """Stands in for the socket layer's listener until the SYN arrives."""
        def segment_arrives(self, seg, now):
            b = TcpConnection.from_syn(cfg_b, seg, now, (B_ADDR, 80), (A_ADDR, 40000), counters, iss_b)
            link.b = b
            return None

        def segments_to_send(self, now):
            return []

        def next_deadline(self):
            return None

    link.b = Listener()
    return link, counters


def established_pair(**kw):
    link, counters = pair(**kw)
    link.run(until=lambda: link.a.state == TcpState.ESTABLISHED and isinstance(link.b, TcpConnection)
             and link.b.state == TcpState.ESTABLISHED)
    link.run(horizon=link.now + 500 * MS)
    return link, counters


def transfer(link: Link, frm, data: bytes, horizon_s: int = 600) -> bytes:
    """Send `data` from `frm` to its peer through the link; return what the peer read."""
    to = link.peer(frm)
    got = bytearray()
    sent = 0
    limit = link.now + horizon_s * 1_000_000_000
    while len(got) < len(data):
        if sent < len(data):
            sent += frm.send(memoryview(data)[sent:sent + 65536], link.now)
        try:
            while True:
                chunk = to.recv(1 << 20)
                if not chunk:
                    break
                got += chunk
        except BlockingIOError:
            pass
        if len(got) >= len(data):
            break
        if not link.step() or link.now > limit:
            break
    return bytes(got)


def test_harness_handshake_and_bytes():
    link, counters = established_pair()
    assert link.a.state == link.b.state == TcpState.ESTABLISHED
    assert transfer(link, link.a, b"hello") == b"hello"
    assert transfer(link, link.b, b"world") == b"world"
