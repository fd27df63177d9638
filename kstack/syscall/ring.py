"""A single-producer, single-consumer record ring in shared memory, both ends.

The channel's memfd holds one header page and two rings: the submission ring (SQ, the
application produces calls, the kernel consumes) and the completion ring (CQ, the kernel
produces results, the application consumes), as io_uring has them.

    page 0      the header: layout fields, then each ring's control words on their own
                cache lines (tail, head, need_wakeup, need_space)
    SQ data     sq_bytes (a power of two)
    CQ data     cq_bytes

Records are variable length: a 48-byte header (REC), the payload, zero padding to 8 bytes.
A record never wraps: when it does not fit before the end, the producer writes a WRAP
marker (length 0xFFFFFFFF) and continues at offset 0. head and tail are free-running byte
counters (u64); the producer owns tail, the consumer owns head.

Trust. Each end keeps its own index in private memory and never reads it back from the
mapping; the peer's index is read and checked (it may only move forward, by at most the ring
size, in steps of 8), and every record is checked against the published tail and the payload
limit before one byte of it is used. Each pop() either returns a record and moves head
forward, or raises RingCorrupt: a reader never loops on what a peer wrote.

Ordering. The producer writes payload, then the record header, then publishes tail; the
consumer reads tail, then the record. Each index access is one aligned 8-byte access through
a memoryview cast to "Q" (one mov on x86-64, where a plain store is a release and a plain load
an acquire). The wake-up protocol is Dekker's pattern ("set need_wakeup, then look at tail"
against "publish tail, then look at need_wakeup"), which needs a full fence between the store
and the load: `fence()` takes and releases a threading.Lock, whose uncontended path is a
locked compare-exchange in glibc (a full barrier on x86), without a system call.
"""
from __future__ import annotations

import os
import struct
import threading
from typing import Any, NamedTuple

__all__ = ["Ring", "PyRing", "Record", "RingCorrupt", "REC", "REC_BYTES", "WRAP", "HEADER_BYTES",
           "LAYOUT", "MAGIC", "VERSION", "fence", "record_bytes", "ip_to_int", "int_to_ip"]

MAGIC = 0x4C4C4143534B4E  # "NKSCALL" little-endian
VERSION = 1
HEADER_BYTES = 4096
WRAP = 0xFFFFFFFF

# length (payload bytes), op, flags, call id, fd, a0, a1, a2, ipv4 (host order), port, has_addr
REC = struct.Struct("<IHHIiqqqIHH")
REC_BYTES = REC.size  # 48
assert REC_BYTES % 8 == 0

# the header's first fields: magic, version, sq_bytes, cq_bytes, max_payload, max_inflight,
# max_fds. Only the application reads these; the kernel keeps its own copy.
LAYOUT = struct.Struct("<QIIIIII")

# control words (indexes into the header cast to "Q"): ring r's words start at 128 + 256 * r
_TAIL, _HEAD, _NEED_WAKEUP, _NEED_SPACE = 0, 8, 16, 24  # word offsets, 64 bytes apart

_fence_lock = threading.Lock()
_U32 = struct.Struct("<I")


def fence() -> None:
    """A full memory barrier (see the module docstring)."""
    _fence_lock.acquire()
    _fence_lock.release()


def record_bytes(payload_len: int) -> int:
    """Ring bytes one record with `payload_len` bytes of payload takes."""
    return REC_BYTES + ((payload_len + 7) & ~7)


_int_cache: dict[str, int] = {}


def ip_to_int(ip: str) -> int:
    v = _int_cache.get(ip)
    if v is None:
        a, b, c, d = (int(x) for x in ip.split("."))
        v = a << 24 | b << 16 | c << 8 | d
        if len(_int_cache) < 4096:
            _int_cache[ip] = v
    return v


_ip_cache: dict[int, str] = {}


def int_to_ip(v: int) -> str:
    s = _ip_cache.get(v)
    if s is None:
        s = f"{v >> 24 & 255}.{v >> 16 & 255}.{v >> 8 & 255}.{v & 255}"
        if len(_ip_cache) < 4096:  # a bounded cache: a datagram per call formats no string
            _ip_cache[v] = s
    return s


# Op.SENDTO, F_ASYNC (kstack.syscall.channel, which imports this module: checked there) and
# kstack.sock.MSG_DONTWAIT, for pop_sends
_SENDTO, F_ASYNC, MSG_DONTWAIT = 5, 0x1, 0x40


class RingCorrupt(Exception):
    """The peer wrote something no correct peer writes; the channel must be torn down."""


class Record(NamedTuple):
    op: int
    flags: int
    call_id: int
    fd: int
    a0: int
    a1: int
    a2: int
    addr: tuple[str, int] | None
    payload: bytes


class PyRing:
    """One end of ring `index` (0: SQ, 1: CQ) over the channel's mapping (the pure-Python
    reference; Ring is the C class of _ring.pyx when it is built, this one otherwise).

    A producer: push() records, then publish() once for the batch (it says whether to ring
    the consumer's eventfd). A consumer: pop() until None, then release() (it says whether the
    producer waits for space and must be rung), and arm() before sleeping.
    """

    def __init__(self, buf, index: int, size: int, offset: int, max_payload: int, producer: bool) -> None:
        if size & (size - 1) or size < 2 * record_bytes(max_payload):
            raise ValueError(f"ring of {size} bytes: a power of two holding two largest records")
        mv = memoryview(buf)
        if len(mv) < offset + size or offset < HEADER_BYTES:
            raise ValueError("ring outside its mapping")
        self._mv = mv
        self._q = mv[:HEADER_BYTES].cast("Q")
        self.data = mv[offset:offset + size]
        self.size = size
        self.mask = size - 1
        self.max_payload = max_payload
        self.producer = producer
        base = (128 + 256 * index) // 8
        self._w_tail = base + _TAIL
        self._w_head = base + _HEAD
        self._w_wake = base + _NEED_WAKEUP
        self._w_space = base + _NEED_SPACE
        self.tail = 0  # private: the producer's tail, or the consumer's last checked tail
        self.head = 0  # private: the consumer's head, or the producer's last checked head
        self.published = 0  # the tail last published (producer)
        self.released = 0  # the head last published (consumer)

    def close(self) -> None:
        for v in (self._q, self.data, self._mv):
            v.release()

    # --- producer -------------------------------------------------------------------------

    def _peer_head(self) -> int:
        """The consumer's head, checked: it moves forward only, never past what we wrote."""
        h = self._q[self._w_head]
        if h < self.head or h > self.published or h & 7:
            raise RingCorrupt(f"consumer head {h} outside [{self.head}, {self.published}]")
        self.head = h
        return h

    def room(self, payload_len: int) -> bool:
        """Whether a record of payload_len fits now (checks the consumer's head again)."""
        need = self._need(payload_len)
        if self.tail + need - self.head <= self.size:
            return True
        return self.tail + need - self._peer_head() <= self.size

    def _need(self, payload_len: int) -> int:
        need = record_bytes(payload_len)
        contig = self.size - (self.tail & self.mask)
        return need if contig >= need else contig + need

    def push(self, op: int, call_id: int, fd: int = -1, a0: int = 0, a1: int = 0, a2: int = 0,
             payload: bytes | memoryview = b"", addr: tuple[int, int] | None = None, flags: int = 0) -> bool:
        """Write one record (not yet visible: publish() makes it so). False when full."""
        n = len(payload)
        if n > self.max_payload:
            raise ValueError(f"payload of {n} bytes over the limit of {self.max_payload}")
        need = REC_BYTES + ((n + 7) & ~7)
        tail = self.tail
        size = self.size
        pos = tail & self.mask
        contig = size - pos
        end = tail + (need if contig >= need else contig + need)
        if end - self.head > size and end - self._peer_head() > size:
            return False
        data = self.data
        if contig < need:
            _U32.pack_into(data, pos, WRAP)
            tail += contig
            pos = 0
        if n:
            data[pos + REC_BYTES:pos + REC_BYTES + n] = payload  # payload, then header
        if addr is None:
            REC.pack_into(data, pos, n, op, flags, call_id, fd, a0, a1, a2, 0, 0, 0)
        else:
            REC.pack_into(data, pos, n, op, flags, call_id, fd, a0, a1, a2, addr[0], addr[1], 1)
        self.tail = tail + need
        return True

    def publish(self) -> bool:
        """Make the pushed records visible. True: the consumer sleeps, ring its eventfd (the
        request is taken, so the next publishes do not ring until it sleeps again)."""
        if self.tail == self.published:
            return False
        q = self._q
        q[self._w_tail] = self.tail  # release: the records are written before tail moves
        self.published = self.tail
        _fence_lock.acquire()  # fence(), inline: this runs once per call
        _fence_lock.release()
        if q[self._w_wake]:
            q[self._w_wake] = 0
            return True
        return False

    def want_space(self, payload_len: int) -> bool:
        """Full: ask the consumer to ring when it frees space. True if space came meanwhile."""
        self._q[self._w_space] = 1
        fence()
        return self.room(payload_len)

    def request_progress(self) -> None:
        """Ask the consumer to ring when it next releases (the producer waits for its head
        to pass a position, not for room): set need_space, fence. Look at the head after."""
        self._q[self._w_space] = 1
        fence()

    def consumed(self) -> int:
        """The consumer's head, checked (RingCorrupt when it lies)."""
        return self._peer_head()

    # --- consumer -------------------------------------------------------------------------

    def _peer_tail(self) -> int:
        t = self._q[self._w_tail]
        if t < self.tail or t - self.head > self.size or t & 7:
            raise RingCorrupt(f"producer tail {t} outside [{self.tail}, {self.head + self.size}]")
        self.tail = t
        return t

    def pending(self) -> bool:
        return self.head != self.tail or self._peer_tail() != self.head

    def pop(self) -> Record | None:
        """The next record, copied out of the ring, or None. RingCorrupt when it lies."""
        if self.head == self.tail and self._peer_tail() == self.head:
            return None
        data = self.data
        pos = self.head & self.mask
        avail = self.tail - self.head
        contig = self.size - pos
        if _U32.unpack_from(data, pos)[0] == WRAP:
            if contig > avail:
                raise RingCorrupt(f"wrap marker at {self.head} past the tail {self.tail}")
            self.head += contig  # at least 8: progress
            if self.head == self.tail:
                return None
            pos = 0
            avail = self.tail - self.head
            contig = self.size
        if avail < REC_BYTES:
            raise RingCorrupt(f"record header at {self.head} cut by the tail {self.tail}")
        n, op, flags, call_id, fd, a0, a1, a2, ip, port, has_addr = REC.unpack_from(data, pos)
        if n > self.max_payload:
            raise RingCorrupt(f"record length {n} over the limit {self.max_payload}")
        need = record_bytes(n)
        if need > avail or need > contig:
            raise RingCorrupt(f"record of {n} bytes at {self.head} runs past the tail or the end")
        payload = bytes(data[pos + REC_BYTES:pos + REC_BYTES + n]) if n else b""  # the copy
        self.head += need
        return Record(op, flags, call_id, fd, a0, a1, a2,
                      (int_to_ip(ip), port) if has_addr else None, payload)

    def pop_raw(self) -> tuple | None:
        """pop() for the hot paths: (op, flags, call_id, fd, a0, a1, a2, ip, port, has_addr,
        payload) with the address as integers and no Record built; the same checks."""
        head = self.head
        if head == self.tail and self._peer_tail() == head:
            return None
        data = self.data
        pos = head & self.mask
        tail = self.tail
        contig = self.size - pos
        if _U32.unpack_from(data, pos)[0] == WRAP:
            if contig > tail - head:
                raise RingCorrupt(f"wrap marker at {head} past the tail {tail}")
            head += contig  # at least 8: progress
            self.head = head
            if head == tail:
                return None
            pos = 0
            contig = self.size
        avail = tail - head
        if avail < REC_BYTES:
            raise RingCorrupt(f"record header at {head} cut by the tail {tail}")
        r = REC.unpack_from(data, pos)
        n = r[0]
        if n > self.max_payload:
            raise RingCorrupt(f"record length {n} over the limit {self.max_payload}")
        need = REC_BYTES + ((n + 7) & ~7)
        if need > avail or need > contig:
            raise RingCorrupt(f"record of {n} bytes at {head} runs past the tail or the end")
        self.head = head + need
        return r[1:] + (bytes(data[pos + REC_BYTES:pos + REC_BYTES + n]) if n else b"",)  # the copy

    def pop_sends(self, socks: dict, sendq: dict, parked: dict, send_c: Any,
                  budget: int) -> tuple[int, int, tuple | None]:
        """The syscall server's async sends in a row, without a Python frame per record (the
        C ring's loop; this is its reference): while the next record is an async SENDTO (no
        address, no flag but MSG_DONTWAIT) on a socket of `socks` whose `sendmsg_c` is
        `send_c`, with nothing of that fd queued (sendq) or parked, pop it and send its
        payload with send_c(sock, payload), at most `budget` records. Returns (records sent,
        their payload bytes, the record popped whose send_c answered -1, or None); a record
        that is not such a send stays in the ring for pop_raw."""
        sent = copied = 0
        last_fd, last_ok, sock = None, False, None
        while sent < budget:
            head = self.head
            r = self.pop_raw()
            if r is None:
                break
            fd = r[3]
            if r[0] != _SENDTO or r[1] != F_ASYNC or r[9] or r[4] & ~MSG_DONTWAIT:
                self.head = head  # not ours: the caller pops it again
                break
            if fd != last_fd:
                sock = socks.get(fd)
                last_ok = (sock is not None and fd not in sendq and fd not in parked
                           and getattr(sock, "sendmsg_c", None) is send_c)
                last_fd = fd
            if not last_ok:
                self.head = head
                break
            payload = r[10]
            if send_c(sock, payload) < 0:
                return sent, copied, r
            sent += 1
            copied += len(payload)
        return sent, copied, None

    def release(self) -> bool:
        """Publish head. True: the producer waits for space, ring it."""
        q = self._q
        if self.released == self.head:
            return False
        q[self._w_head] = self.released = self.head
        fence()
        if q[self._w_space]:
            q[self._w_space] = 0
            return True
        return False

    def arm(self) -> bool:
        """About to sleep: set need_wakeup, fence, look once more. True: records came, do
        not sleep (the flag may stay set; the producer clears it when it rings)."""
        self._q[self._w_wake] = 1
        fence()
        return self.pending()

    def disarm(self) -> None:
        self._q[self._w_wake] = 0


try:  # the C ring, when built (cythonize -i -3 kstack/syscall/_ring.pyx; pip install . does)
    if os.environ.get("NICEMU_PY_RING") == "1":  # force the reference (tests, comparisons)
        raise ImportError("NICEMU_PY_RING=1")
    from kstack.syscall import _ring as _c
except ImportError:  # the pure-Python reference serves
    _c = None

if _c is not None:
    _c.set_corrupt(RingCorrupt)

    class Ring(_c.CRing):  # type: ignore[no-redef]
        """The C ring with PyRing's pop() (a Record) on top of its pop_raw()."""

        def pop(self) -> Record | None:
            r = self.pop_raw()
            if r is None:
                return None
            return Record(r[0], r[1], r[2], r[3], r[4], r[5], r[6],
                          (int_to_ip(r[7]), r[8]) if r[9] else None, r[10])
else:
    Ring = PyRing  # type: ignore[misc]
