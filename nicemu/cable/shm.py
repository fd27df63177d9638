"""Two emulator processes back to back over shared memory: the fast cable between processes.

One memfd holds a header and two single-producer/single-consumer frame rings, one per
direction. A memfd is never a file in /dev/shm: the kernel frees it when the last process
holding its fd or mapping exits, so nothing leaks even on kill -9 of both sides.

    ShmCable.create(ring_bytes=1 << 20) -> (end_a, end_b)

Each end can move to another process: pass `end.fds()` in subprocess's pass_fds and
rebuild it there with `ShmCableEnd.from_fds(side, *fds)` (or `end.to_arg()` /
`ShmCableEnd.from_arg(text)` for a command line), then `end.release()` in the parent so the
parent holds no copy. Options (YAML keys of a `shm` cable): `ring_bytes` (bytes per
direction, a power of two from 64 KiB to 1 GiB, default 1 MiB).

Descriptors per end: the memfd; `doorbell_in`, an eventfd the peer writes when it publishes
frames while this end sleeps or when it frees ring space this end waits for; `doorbell_out`,
the peer's; `hangup`, one end of a socketpair whose peer end lives only in the peer process,
so its EOF tells us the peer died (link down) even after kill -9. fileno() is an epoll fd
over doorbell_in and hangup.

Ring layout (`ring_bytes` data bytes; `head`/`tail` are free-running byte counters):

    record = u32 length, u32 0, frame bytes, zero padding to a multiple of 8
    length 0xFFFFFFFF = wrap marker: the rest of the ring is unused, continue at offset 0

Doorbells. A consumer about to sleep arms (`sleeping` = 1, fence, look at `tail` once more);
a producer, after publishing `tail` and a fence, takes an armed request (clears it) and rings
the eventfd once, so a burst rings once per consumer wake-up, not once per frame. A producer
that finds the ring full sets `waiting` (fence, look at `head` once more); the consumer clears
it and rings back after freeing space.

Memory ordering. The producer writes the record and then publishes `tail`; the consumer
reads `tail` and then the record, and publishes `head` when it has copied the records out.
That is a release store and an acquire load. In the pure-Python rings each head/tail access is
one aligned 8-byte access through a memoryview cast to "Q" (a single mov on x86-64), and on x86's TSO model a
plain store has release and a plain load acquire semantics in hardware; the CPython
interpreter does not reorder memory accesses across bytecodes. So the data path needs no
explicit barrier. The doorbell protocol does: "consumer sets `sleeping`, then checks `tail`"
against "producer publishes `tail`, then checks `sleeping`" (and the same for `waiting` /
`head` in the other direction) is Dekker's pattern, which TSO's store buffer breaks unless a
full fence sits between the store and the load.

Hostile peer. Everything in the mapping is written by another process and is read as
untrusted input, once per field (a record header is one 8-byte read into a local). The reader
(`drain_ref`, and the same loop in C) checks, before it uses them: the published distance
`tail - head` (mod 2**64) is a multiple of 8 and at most the ring; each step either consumes at
least 8 bytes of that distance or stops, so a pull ends within (tail - head) / 8 steps; a wrap
marker is never at offset 0 (a producer only wraps when the record does not fit before the end),
has a zero second word and jumps to less than what was published; a record has 0 < length <=
max_frame, a zero second word, and lies inside the ring and inside what was published. At
attach, our own tail and the heads are checked too (multiples of 8; the consumer's head at most
one ring behind our tail), and the producer checks the consumer's head each time it reads it.
Anything else declares the ring corrupt: the end counts it (`rx_errors`), logs the reason
(`last_error`, `corrupt`), clears its "present" word and goes link down for good, as an
unplugged cable; the frames before the bad record are delivered. One pull copies out at most
`batch` frames and one recv_frames() at most RECV_PULLS pulls (then the end rings its own
doorbell to come back), so a producer that never stops publishing cannot keep the emulator
loop (and its SIGTERM handling) away. The memfd is sealed (F_SEAL_SHRINK | F_SEAL_GROW |
F_SEAL_SEAL) when created and an end refuses one without those seals, so no peer can shrink it
under the mapping (a SIGBUS on the next access).

The rings are implemented twice with the same methods: `_shmring.Rings` in Cython (pointers into
the mapping, `__atomic_load_n(ACQUIRE)` / `__atomic_store_n(RELEASE)` for the indices,
`__atomic_thread_fence(SEQ_CST)` for the fence; the default when built) and `RingsRef` in
pure Python (struct on a memoryview; its fence is an eventfd write to a private eventfd: the
kernel's locked instruction is a full barrier on x86). Tests run both against each other.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import select
import socket
import struct
from typing import NamedTuple

from nicemu.cable.base import MAX_FRAME, CableError, Poller, eventfd_clear

__all__ = ["ShmCable", "ShmCableEnd", "ShmFds"]

MAGIC = 0x4853554D4543494E  # "NICEMUSH" little-endian
VERSION = 1
HEADER_BYTES = 4096
MIN_RING = 1 << 16
MAX_RING = 1 << 30
WRAP = 0xFFFFFFFF
REC_HDR = 8
_REC = struct.Struct("<II")
M64 = (1 << 64) - 1  # head and tail are free-running u64 counters: arithmetic is mod 2**64
RX_BATCH = 1024  # frames one pull copies out at most
RECV_PULLS = 4  # pulls one recv_frames() makes at most; more pending: the end rings itself
# A memfd that can shrink under a mapping faults (SIGBUS) on the next access: sealed at
# creation, and an end refuses a memfd without these seals.
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL

log = logging.getLogger("nicemu.cable.shm")

# Header words, as indices into the memoryview cast to "Q" (8-byte words).
_W_MAGIC = 0
_W_VERSION_SIZE = 1  # version in the low 32 bits, ring_bytes in the high 32 bits
_W_PRESENT = 2  # one per side: 2 = a, 3 = b (1 while that end is plugged in)


def _ring_words(r: int) -> tuple[int, int, int, int]:
    """(tail, head, sleeping, waiting) word indices of ring r; each on its own cache line."""
    base = (128 + r * 512) // 8
    return base, base + 8, base + 16, base + 24


def _check_geometry(ring_bytes: int, tx: int, rx: int, max_frame: int, batch: int) -> None:
    """The arguments both ring classes refuse (the C one would otherwise address memory
    outside the mapping): rings 0 and 1, a power-of-two ring, a frame that fits half of it."""
    if ring_bytes < 32 or ring_bytes & (ring_bytes - 1):
        raise ValueError(f"shm rings: ring_bytes must be a power of two of at least 32, got {ring_bytes}")
    if {tx, rx} != {0, 1}:
        raise ValueError(f"shm rings: tx and rx must be rings 0 and 1, got {tx} and {rx}")
    if not 0 < max_frame or REC_HDR + ((max_frame + 7) & ~7) > ring_bytes // 2:
        raise ValueError(f"shm rings: max_frame {max_frame} does not fit half a ring of {ring_bytes}")
    if batch < 1:
        raise ValueError(f"shm rings: batch must be at least 1, got {batch}")


def _bad_head(tail: int, head: int, ring: int) -> str | None:
    """Why the consumer's `head` cannot be behind our `tail` (None: it can)."""
    used = (tail - head) & M64
    if used > ring or used & 7:
        return f"head {head} of the peer is not a valid distance behind tail {tail}"
    return None


class RingsRef:
    """One end's view of the two rings, in pure Python: it produces into ring `tx` and consumes
    ring `rx`. The reference of _shmring.Rings (same methods, same results; tests run both).

    Index words are read and written through a memoryview cast to "Q": one aligned 8-byte
    mov each, which on x86-64 is a release store / acquire load in hardware. `_fence` (a full
    barrier between a flag store and an index load) is an eventfd write here: the kernel's
    locked instruction is a full barrier on x86.

    `corrupt` is None, or why the peer's side of the mapping is not a ring (then push returns
    -2, pull and arm find nothing, writable is False, for good); `steps` is how many records
    and wrap markers the last pull examined.
    """

    def __init__(self, buf, ring_bytes: int, tx: int, rx: int, fence_fd: int = -1, max_frame: int = MAX_FRAME,
                 batch: int = RX_BATCH) -> None:
        _check_geometry(ring_bytes, tx, rx, max_frame, batch)
        mv = memoryview(buf)
        if len(mv) < HEADER_BYTES + 2 * ring_bytes:
            raise ValueError("shm rings: mapping too small")
        self._q = mv[:HEADER_BYTES].cast("Q")
        self._txd = mv[HEADER_BYTES + tx * ring_bytes : HEADER_BYTES + (tx + 1) * ring_bytes]
        self._rxd = mv[HEADER_BYTES + rx * ring_bytes : HEADER_BYTES + (rx + 1) * ring_bytes]
        self._mv = mv
        self.ring = ring_bytes
        self.mask = ring_bytes - 1
        self.max_frame = max_frame
        self.batch = batch
        self.steps = 0
        self._fence_fd = fence_fd
        self._t = _ring_words(tx)  # tail, head, sleeping, waiting
        self._r = _ring_words(rx)
        # where the previous owner of this end left off: untrusted like the rest of the mapping
        self.tail = self._q[self._t[0]]
        self.head_cache = self._q[self._t[1]]
        self.head = self._q[self._r[1]]
        self.corrupt: str | None = None
        if self.tail & 7:
            self.corrupt = f"tail {self.tail} of ring {tx} is not a multiple of 8"
        elif self.head & 7:
            self.corrupt = f"head {self.head} of ring {rx} is not a multiple of 8"
        else:
            self.corrupt = _bad_head(self.tail, self.head_cache, ring_bytes)

    def close(self) -> None:
        for v in (self._q, self._txd, self._rxd, self._mv):
            v.release()

    def _fence(self) -> None:
        os.eventfd_write(self._fence_fd, 1)

    def _load_head(self) -> bool:
        """Read the consumer's head; False (and the ring corrupt) if it is not behind our tail."""
        h = self._q[self._t[1]]
        err = _bad_head(self.tail, h, self.ring)
        if err is not None:
            self.corrupt = err
            return False
        self.head_cache = h
        return True

    def _room(self, total: int) -> bool:
        if ((self.tail - self.head_cache) & M64) + total <= self.ring:
            return True
        return self._load_head() and ((self.tail - self.head_cache) & M64) + total <= self.ring

    def _wait_space(self, total: int) -> bool:
        self._q[self._t[3]] = 1
        self._fence()
        return self._load_head() and ((self.tail - self.head_cache) & M64) + total <= self.ring

    def push(self, frame: bytes) -> int:
        """1: taken, ring the consumer's doorbell; 0: taken; -1: full (waiting flag set);
        -2: the ring is corrupt (the frame is not taken, nothing ever will be)."""
        if self.corrupt is not None:
            return -2
        n = len(frame)
        if not 0 < n <= self.max_frame:
            raise ValueError(f"shm rings: a frame of {n} bytes (1 to {self.max_frame})")
        need = REC_HDR + ((n + 7) & ~7)
        pos = self.tail & self.mask
        contig = self.ring - pos
        total = need if contig >= need else contig + need
        if not self._room(total) and not self._wait_space(total):
            return -1 if self.corrupt is None else -2
        data = self._txd
        if contig < need:
            _REC.pack_into(data, pos, WRAP, 0)
            pos = 0
        _REC.pack_into(data, pos, n, 0)
        data[pos + REC_HDR : pos + REC_HDR + n] = frame
        self.tail = (self.tail + total) & M64
        q = self._q
        q[self._t[0]] = self.tail  # release: the record is written before tail moves
        self._fence()
        if q[self._t[2]]:
            # the consumer armed its doorbell: take the request, so the frames that follow do
            # not ring again until it re-arms. Every clear is followed by a ring, so an arm
            # this store overwrites is still answered.
            q[self._t[2]] = 0
            return 1
        return 0

    def free(self) -> int:
        """Bytes free in the tx ring now (0 when corrupt)."""
        if self.corrupt is not None or not self._load_head():
            return 0
        return self.ring - ((self.tail - self.head_cache) & M64)

    def writable(self, need: int) -> bool:
        if self.corrupt is not None:
            return False
        return self._room(need) or self._wait_space(need)

    def pull(self) -> tuple[list[bytes], bool, str | None]:
        """Up to `batch` complete records: (frames, ring_the_producer, error or None). An error
        is returned once, by the pull that found the ring corrupt (also in `corrupt`)."""
        self.steps = 0
        if self.corrupt is not None:
            return [], False, None
        q = self._q
        tail = q[self._r[0]]  # acquire: the records up to tail are complete
        if tail == self.head:
            return [], False, None
        out, head, self.steps, err = drain_ref(self._rxd, self.head, tail, self.max_frame, self.batch)
        if err is not None:
            self.corrupt = err
        self.head = head
        q[self._r[1]] = head  # release: the records are copied out
        self._fence()
        if q[self._r[3]]:
            q[self._r[3]] = 0
            return out, True, err
        return out, False, err

    def awake(self) -> None:
        self._q[self._r[2]] = 0

    def arm(self) -> bool:
        """About to sleep: ask for a doorbell, then look once more. True: data pending."""
        if self.corrupt is not None:
            return False
        self._q[self._r[2]] = 1
        self._fence()
        return self._q[self._r[0]] != self.head

    def word(self, i: int) -> int:
        return self._q[i]

    def set_word(self, i: int, v: int) -> None:
        self._q[i] = v
        self._fence()


try:  # the C rings, when built (cythonize -i -3 nicemu/cable/_shmring.pyx; pip install . does)
    from nicemu.cable._shmring import Rings as _CRings  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the build
    _CRings = None


class ShmFds(NamedTuple):
    """The descriptors that make up one end (pass them all to the other process)."""

    memfd: int
    doorbell_in: int
    doorbell_out: int
    hangup: int


def _check_ring_bytes(ring_bytes: int) -> int:
    if (
        isinstance(ring_bytes, bool)
        or not isinstance(ring_bytes, int)
        or not MIN_RING <= ring_bytes <= MAX_RING
        or ring_bytes & (ring_bytes - 1)
    ):
        raise ValueError(
            f"shm ring_bytes must be a power of two from {MIN_RING} to {MAX_RING}, got {ring_bytes!r}"
        )
    return ring_bytes


class ShmCable:
    """Factory for a shared-memory cable (the two ends are what gets used)."""

    @staticmethod
    def create(ring_bytes: int = 1 << 20) -> tuple["ShmCableEnd", "ShmCableEnd"]:
        _check_ring_bytes(ring_bytes)
        fds: list[int] = []
        try:
            memfd = os.memfd_create("nicemu-shm-cable", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            fds.append(memfd)
            os.ftruncate(memfd, HEADER_BYTES + 2 * ring_bytes)
            fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, SEALS)  # its size is final: no SIGBUS for anyone
            with mmap.mmap(memfd, HEADER_BYTES) as mm:
                q = memoryview(mm).cast("Q")
                q[_W_VERSION_SIZE] = VERSION | (ring_bytes << 32)
                q[_W_PRESENT] = 1
                q[_W_PRESENT + 1] = 1
                for r in (0, 1):
                    q[_ring_words(r)[2]] = 1  # both consumers start asleep: ring the first frame
                q[_W_MAGIC] = MAGIC
                q.release()
            efd_a = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            fds.append(efd_a)
            efd_b = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            fds.append(efd_b)
            sa, sb = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            hang_a, hang_b = sa.detach(), sb.detach()
            fds += [hang_a, hang_b]
            memfd_b = os.dup(memfd)
            fds.append(memfd_b)
            efd_a2, efd_b2 = os.dup(efd_a), os.dup(efd_b)
            fds += [efd_a2, efd_b2]
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        for fd in (memfd_b, efd_a2, efd_b2):
            os.set_inheritable(fd, False)
        try:
            a = ShmCableEnd("a", memfd, efd_a, efd_b, hang_a)
        except BaseException:
            for fd in (memfd_b, efd_a2, efd_b2, hang_b):
                os.close(fd)
            raise
        try:
            b = ShmCableEnd("b", memfd_b, efd_b2, efd_a2, hang_b)
        except BaseException:
            a.close()
            raise
        return a, b


def drain_ref(data: memoryview, head: int, tail: int, max_frame: int,
              limit: int = RX_BATCH) -> tuple[list[bytes], int, int, str | None]:
    """Copy out up to `limit` records in [head, tail) of a ring another process wrote:
    (frames, new head, steps, error or None). `head` is ours (a multiple of 8); `tail` and
    every byte of `data` are the peer's and are checked before use (module docstring, "Hostile
    peer"). Each step consumes at least 8 of the published bytes or stops with an error, so
    `steps` <= (tail - head) / 8. The consumer's copy loop of RingsRef.pull (the C version is
    inside _shmring.Rings.pull)."""
    out: list[bytes] = []
    ring = len(data)
    mask = ring - 1
    left = (tail - head) & M64
    if left > ring or left & 7:
        return out, head, 0, f"tail {tail} is not a valid distance from head {head}"
    steps = 0
    while left and len(out) < limit:
        steps += 1
        pos = head & mask
        n, reserved = _REC.unpack_from(data, pos)  # read once: the peer may change it meanwhile
        if n == WRAP:
            jump = ring - pos  # a wrap at 0 would jump a whole ring; one must leave a record
            if pos == 0 or reserved or jump >= left:
                return out, head, steps, f"bad wrap marker at ring offset {pos}"
            head = (head + jump) & M64
            left -= jump
            continue
        rec = REC_HDR + ((n + 7) & ~7)
        if n == 0 or n > max_frame or reserved or pos + rec > ring or rec > left:
            return out, head, steps, f"bad record at ring offset {pos}: length {n}, reserved word {reserved}"
        out.append(bytes(data[pos + REC_HDR : pos + REC_HDR + n]))
        head = (head + rec) & M64
        left -= rec
    return out, head, steps, None


def _check_sealed(memfd: int) -> None:
    """Refuse a memfd that the peer could still shrink (or grow, or re-seal): a mapping of a
    file that shrinks faults with SIGBUS on the next access."""
    try:
        seals = fcntl.fcntl(memfd, fcntl.F_GET_SEALS)
    except OSError as e:
        raise CableError(errno.EINVAL, f"shm cable: fd {memfd} is not a sealable memfd ({e.strerror})") from None
    if seals & SEALS != SEALS:
        raise CableError(errno.EPERM, f"shm cable: the memfd is not sealed (seals {seals:#x}, need F_SEAL_SHRINK"
                                      " | F_SEAL_GROW | F_SEAL_SEAL): the peer could shrink it under the mapping")


class ShmCableEnd:
    """One end of a shared-memory cable (a CableEnd). Owns its four descriptors.

    engine: "auto" (the C rings when built, else the Python reference), "cython" or "python".
    """

    kind = "shm"  # the YAML cable kind (stats, logs)

    def __init__(
        self, side: str, memfd: int, doorbell_in: int, doorbell_out: int, hangup: int, *, engine: str = "auto"
    ) -> None:
        fds = ShmFds(memfd, doorbell_in, doorbell_out, hangup)
        if side not in ("a", "b") or engine not in ("auto", "cython", "python"):
            for fd in fds:
                os.close(fd)
            if side not in ("a", "b"):
                raise ValueError(f"shm cable side must be 'a' or 'b', got {side!r}")
            raise ValueError(f"shm cable engine must be 'auto', 'cython' or 'python', got {engine!r}")
        if engine == "cython" and _CRings is None:
            for fd in fds:
                os.close(fd)
            raise ImportError("nicemu/cable/_shmring is not built (cythonize -i -3 nicemu/cable/_shmring.pyx)")
        self.side = side
        self._fds = fds
        self._mm: mmap.mmap | None = None
        self._rings = None
        self._fence_fd = -1
        try:
            _check_sealed(memfd)  # first: once sealed, the size fstat reports cannot change
            size = os.fstat(memfd).st_size
            if size < HEADER_BYTES + 2 * MIN_RING:
                raise CableError(errno.EINVAL, f"shm cable: memfd of {size} bytes is too small")
            self._mm = mmap.mmap(memfd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            with memoryview(self._mm)[:HEADER_BYTES].cast("Q") as q:
                magic, vs = q[_W_MAGIC], q[_W_VERSION_SIZE]
            if magic != MAGIC or vs & 0xFFFFFFFF != VERSION:
                raise CableError(errno.EINVAL, "shm cable: not a nicemu shm cable (bad magic or version)")
            ring = vs >> 32
            _check_ring_bytes(ring)
            if size != HEADER_BYTES + 2 * ring:
                raise CableError(errno.EINVAL, f"shm cable: memfd size {size} does not match ring size {ring}")
            mine, theirs = (0, 1) if side == "a" else (1, 0)
            if engine == "python" or _CRings is None:
                self._fence_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self._rings = RingsRef(self._mm, ring, mine, theirs, self._fence_fd, MAX_FRAME, RX_BATCH)
            else:
                self._rings = _CRings(self._mm, ring, mine, theirs, -1, MAX_FRAME, RX_BATCH)
            self._hangup = socket.socket(fileno=hangup)
        except BaseException:
            self._unmap()
            for fd in fds:
                os.close(fd)
            raise
        self._hangup.setblocking(False)
        self.engine = "python" if isinstance(self._rings, RingsRef) else "cython"
        self.ring_bytes = ring
        self._present_me = _W_PRESENT + mine
        self._present_peer = _W_PRESENT + theirs
        self._want = REC_HDR + MAX_FRAME  # space a refused send needs (worst case by default)
        self._max_frame = min(MAX_FRAME, ring // 2 - REC_HDR)
        self._peer_gone = False
        self._closed = False
        self._corrupt: str | None = None
        self._rings.set_word(self._present_me, 1)
        self._push = self._rings.push
        self._doorbell_out = doorbell_out
        self._up = self.link_up
        self._poller = Poller()
        self._poller.watch(doorbell_in)
        self._poller.watch(hangup, select.EPOLLIN | select.EPOLLRDHUP)
        # statistics
        self.tx_frames = 0
        self.rx_frames = 0
        self.tx_refused = 0
        self.tx_dropped = 0  # frames that can never fit, or sent with the link down
        self.rx_errors = 0  # times the peer's side of the memory was found corrupt (link down)
        self.last_error: str | None = None
        if self._rings.corrupt is not None:  # left corrupt by the previous owner, or the peer
            self._ring_corrupt(self._rings.corrupt)

    # --- moving an end to another process -------------------------------------------------

    def fds(self) -> ShmFds:
        """The descriptors to pass (pass_fds) to the process that will own this end."""
        return self._fds

    def to_arg(self) -> str:
        """'a:MEMFD,IN,OUT,HANGUP' for a child's command line (with pass_fds=end.fds())."""
        return f"{self.side}:" + ",".join(str(fd) for fd in self._fds)

    @classmethod
    def from_fds(
        cls, side: str, memfd: int, doorbell_in: int, doorbell_out: int, hangup: int, *, engine: str = "auto"
    ) -> "ShmCableEnd":
        """Rebuild an end from inherited descriptors (takes ownership of them)."""
        for fd in (memfd, doorbell_in, doorbell_out, hangup):
            os.set_inheritable(fd, False)
        os.set_blocking(doorbell_in, False)
        os.set_blocking(doorbell_out, False)
        return cls(side, memfd, doorbell_in, doorbell_out, hangup, engine=engine)

    @classmethod
    def from_arg(cls, text: str, *, engine: str = "auto") -> "ShmCableEnd":
        """Inverse of to_arg; ValueError naming the problem on a malformed argument."""
        try:
            side, rest = text.split(":", 1)
            nums = [int(x) for x in rest.split(",")]
        except ValueError:
            raise ValueError(f"shm cable end must look like 'a:MEMFD,IN,OUT,HANGUP', got {text!r}") from None
        if len(nums) != 4:
            raise ValueError(f"shm cable end needs 4 descriptors, got {len(nums)} in {text!r}")
        return cls.from_fds(side, *nums, engine=engine)

    def release(self) -> None:
        """Close this process's copies without unplugging (the end lives on in a child)."""
        if self._closed:
            return
        self._closed = True
        self._up = False
        self._teardown()

    # --- CableEnd --------------------------------------------------------------------------

    @property
    def link_up(self) -> bool:
        return (not self._closed and not self._peer_gone and self._corrupt is None
                and bool(self._rings.word(self._present_peer)))

    @property
    def corrupt(self) -> str | None:
        """Why the ring was declared corrupt (the link is down for good), or None."""
        return self._corrupt

    def fileno(self) -> int | None:
        return None if self._closed else self._poller.fileno()

    def send(self, frame: bytes) -> bool:
        n = len(frame)
        # _up is link_up as last seen by recv_frames (a peer's close or death rings our
        # doorbell, so it is refreshed before long): no header read per frame
        if not self._up or not 0 < n <= self._max_frame:
            self.tx_dropped += 1  # never fits / nobody there: lost, as on a real wire
            return True
        r = self._push(frame)
        if r == -2:  # the peer's head is not a head: the cable is dead, the frame lost
            self._ring_corrupt(self._rings.corrupt or "ring corrupt")
            self.tx_dropped += 1
            return True
        if r < 0:
            self._want = 2 * (REC_HDR + n + 7)  # worst case with a wrap
            self.tx_refused += 1
            return False
        if r:
            os.eventfd_write(self._doorbell_out, 1)
        self.tx_frames += 1
        return True

    def writable(self) -> bool:
        if self._closed or not self.link_up:
            return True  # sends are dropped, never refused
        return self._rings.writable(self._want)

    def recv_frames(self) -> list[bytes]:
        if self._closed:
            return []
        if self._corrupt is not None:  # link down for good: stop listening to the peer
            eventfd_clear(self._fds.doorbell_in)
            self._poller.unwatch(self._fds.doorbell_in)
            return []
        rings = self._rings
        rings.awake()  # the producer need not ring while we drain
        eventfd_clear(self._fds.doorbell_in)
        frames: list[bytes] = []
        self._pull(frames)
        pulls = 1
        while rings.arm():  # arrived between the drain and the arming, or more than a batch
            if pulls == RECV_PULLS:
                # bounded work per call: ring ourselves, so the loop comes back after serving
                # the rest (a producer that never stops cannot keep us here)
                os.eventfd_write(self._fds.doorbell_in, 1)
                break
            self._pull(frames)
            pulls += 1
        self.rx_frames += len(frames)
        if not frames:  # woken for something else: maybe the peer is gone
            self._check_hangup()
        self._up = self.link_up
        return frames

    def _pull(self, out: list[bytes]) -> None:
        frames, ring_producer, err = self._rings.pull()
        out += frames
        if err is not None:  # the frames before the bad record are delivered; then link down
            self._ring_corrupt(err)
        if ring_producer:  # it waits for space: wake it
            os.eventfd_write(self._fds.doorbell_out, 1)

    def _ring_corrupt(self, reason: str) -> None:
        """The peer's side of the memory is not a ring: count it, say why, and go link down for
        good, as an unplugged cable (our "present" word cleared, the peer rung so it sees it;
        our own doorbell rung so the event loop comes back and reads link_up)."""
        if self._corrupt is not None:
            return
        self._corrupt = reason
        self._up = False
        self.rx_errors += 1
        self.last_error = f"shm cable {self.side}: ring corrupt: {reason}"
        log.warning("%s; link down", self.last_error)
        try:
            self._rings.set_word(self._present_me, 0)
            os.eventfd_write(self._fds.doorbell_out, 1)
            os.eventfd_write(self._fds.doorbell_in, 1)
        except OSError:  # a descriptor the peer closed: nothing more to tell it
            pass

    def _check_hangup(self) -> None:
        """EOF on the hang-up socket: every copy of the peer's end is closed (it exited or was
        killed), so the link is down even though it could not say so in the header."""
        if self._peer_gone:
            return
        try:
            if self._hangup.recv(1, socket.MSG_PEEK) == b"":
                self._peer_gone = True
        except BlockingIOError:
            pass
        except OSError:
            self._peer_gone = True
        if self._peer_gone:
            self._poller.unwatch(self._fds.hangup)  # EOF stays readable: stop watching it

    def close(self) -> None:
        """Unplug: the peer sees link down."""
        if self._closed:
            return
        self._closed = True
        self._up = False
        try:
            self._rings.set_word(self._present_me, 0)
            os.eventfd_write(self._fds.doorbell_out, 1)
        except OSError:
            pass
        self._teardown()

    def _teardown(self) -> None:
        self._push = None
        self._poller.close()
        self._hangup.close()
        self._unmap()
        for fd in self._fds[:3]:
            try:
                os.close(fd)
            except OSError:
                pass

    def _unmap(self) -> None:
        if self._rings is not None:
            self._rings.close()
            self._rings = None
        if self._fence_fd >= 0:
            os.close(self._fence_fd)
            self._fence_fd = -1
        if self._mm is not None:
            self._mm.close()
            self._mm = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        if not getattr(self, "_closed", True):
            try:
                self.release()
            except Exception:
                pass


# --- the `shm` kind of a topology (registered in nicemu.cable.KINDS) ---------------------

DEFAULT_RING = 1 << 20
ENDS = (2, 2)
KEYS = ("ring_bytes",)
SAME_PROCESS = False


def check(cc) -> dict:
    """`ring_bytes`: a size ("256KiB"), a power of two from MIN_RING to MAX_RING."""
    from nicemu.topology.schema import _describe, parse_size

    rb = parse_size(cc.cab.get("ring_bytes", DEFAULT_RING))
    if rb is None:
        cc.err("ring_bytes", f"must be a size in bytes (e.g. 1048576 or \"1M\"), got "
                             f"{_describe(cc.cab.get('ring_bytes'))}")
    elif not MIN_RING <= rb <= MAX_RING or rb & (rb - 1):
        cc.err("ring_bytes", f"must be a power of two between {MIN_RING} and {MAX_RING}, got {_describe(rb)}")
    else:
        return {"ring_bytes": rb}
    return {}


def build(cable, local: list[str], ctx) -> list:
    """Both ends here: make the memory; one end: the end `nicemu up` created and passed down."""
    if len(local) == 2:
        a, b = ShmCable.create(cable.ring_bytes or DEFAULT_RING)
        return [(cable.ends[0], a), (cable.ends[1], b)]
    dev = local[0]
    arg = ctx.ends_given.get(ctx.end_key(cable, dev))
    if arg is None:
        procs = ctx.topo.cable_processes(cable)
        raise ctx.problem(f"this shm cable joins processes {procs[0]!r} and {procs[1]!r}; its shared "
                          "memory is created by `nicemu up`, which starts both (run the topology with "
                          "`nicemu up`, or without --process to run it all in one process)",
                          f"cables[{cable.index}]")
    return [(dev, ShmCableEnd.from_arg(arg))]


def make(ring_bytes: int = DEFAULT_RING) -> tuple["ShmCableEnd", "ShmCableEnd"]:
    return ShmCable.create(ring_bytes)
