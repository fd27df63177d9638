"""Fuzz target "shm": the shm cable's rings read what a hostile producer wrote.

Each iteration is one case drawn from its own seed (taken from ``random.Random(seed)``). A
hostile producer writes into ring 0 of a mapping (random bytes, random indexes, chained wrap
markers, lengths that lie, valid records mixed in, counters about to wrap at 2**64), in one to
three rounds; after each round the consumer pulls until it has nothing more. The consumer is
both twins, the pure-Python `RingsRef` and the C `_shmring.Rings` (when built), each over its
own copy of the mapping, and the checks are:

- the twins agree: frames, doorbell, error, head, tail, steps, and every byte of the mapping;
- both agree with a restatement of the ring rules here (`expected`), so a bug the twins share
  is caught too, and a valid case delivers exactly the frames that were written;
- a pull is bounded: at most one step per 8 published bytes and at most `batch` frames, and the
  pure-Python twin runs under a watchdog (a pull that never returns is a FuzzFailure);
- a frame is never made of bytes outside the ring, and the reader writes nothing outside its
  own header words;
- a corrupt ring stays dead: pull finds nothing, arm asks for nothing, push refuses (-2).

Two more kinds: "producer" (the consumer's head is the hostile part; the twins push into ring
1, writing only inside it, and declare the ring corrupt when that head cannot be), and "cable"
(a real ShmCableEnd on a sealed memfd: recv_frames returns with bounded work, a corrupt ring
is counted once in rx_errors and the link goes down; descriptors do not leak).

    python -m nicemu.fuzz --target shm --seed 7 --iterations 100000
"""
from __future__ import annotations

import contextlib
import mmap
import os
import random
import signal
import struct
import threading
from typing import Callable, Iterator

from nicemu.cable import shm
from nicemu.cable.shm import HEADER_BYTES, M64, REC_HDR, WRAP, RingsRef, ShmCable, ShmCableEnd
from nicemu.fuzz import FuzzFailure, FuzzReport

RING = 4096  # bytes per ring in the in-memory cases: small, so wraps and full rings are common
MAX_FRAME = 1500  # fits half of RING, as the cable requires
WATCHDOG_S = 10.0  # a case that takes longer than this has hung
CABLE_EVERY = 25  # one case in this many runs through a real ShmCableEnd

_Q = struct.Struct("<Q")
_REC = struct.Struct("<II")
_T0, _H0, _S0, _W0 = shm._ring_words(0)  # ring 0: written by the hostile producer, read by the twins
_T1, _H1, _S1, _W1 = shm._ring_words(1)  # ring 1: the twins produce into it
PUSHED = {1: "pushed, doorbell", 0: "pushed", -1: "ring full", -2: "corrupt: peer head"}  # push() -> outcome
_READER_WORDS = {_H0, _S0, _W0, _T1, _S1, _W1}  # header words a consumer/producer end may write


# --- what the ring rules say, restated -----------------------------------------------------------


def expected(ring: bytes, head: int, tail: int, max_frame: int, limit: int) -> tuple[list[bytes], int, bool]:
    """What a correct reader returns for `ring` (its bytes), our `head` and the published `tail`:
    (frames, new head, corrupt). The rules of docs/cables.md and nicemu/cable/shm.py, written
    here a second time, independently of both twins."""
    size = len(ring)
    left = (tail - head) % (1 << 64)
    if left > size or left % 8:
        return [], head, True
    frames: list[bytes] = []
    while left and len(frames) < limit:
        pos = head % size
        length, reserved = _REC.unpack(ring[pos : pos + REC_HDR])
        if length == WRAP:
            skip = size - pos
            if pos == 0 or reserved != 0 or skip >= left:
                return frames, head, True
            head, left = (head + skip) % (1 << 64), left - skip
            continue
        record = REC_HDR + -(-length // 8) * 8
        if not 1 <= length <= max_frame or reserved != 0 or pos + record > size or record > left:
            return frames, head, True
        start, end = pos + REC_HDR, pos + REC_HDR + length
        assert 0 <= start <= end <= size
        frames.append(ring[start:end])
        head, left = (head + record) % (1 << 64), left - record
    return frames, head, False


# --- the mapping every twin reads its own copy of --------------------------------------------


class Mappings:
    """One bytearray per twin; the hostile producer's writes go to all of them alike."""

    def __init__(self, copies: int) -> None:
        self.bufs = [bytearray(HEADER_BYTES + 2 * RING) for _ in range(copies)]

    def write(self, off: int, data: bytes) -> None:
        """Bytes into ring 0 at `off` (the producer never writes outside its ring)."""
        assert 0 <= off and off + len(data) <= RING
        for b in self.bufs:
            b[HEADER_BYTES + off : HEADER_BYTES + off + len(data)] = data

    def set_word(self, i: int, v: int) -> None:
        for b in self.bufs:
            _Q.pack_into(b, 8 * i, v & M64)

    def word(self, i: int) -> int:
        return _Q.unpack_from(self.bufs[0], 8 * i)[0]

    def ring0(self) -> bytes:
        return bytes(self.bufs[0][HEADER_BYTES : HEADER_BYTES + RING])


def honest_records(rng: random.Random, m: Mappings, head: int, tail: int, count: int) -> tuple[list[bytes], int]:
    """Write up to `count` valid records from counter `tail` (Python ints: may pass 2**64),
    never more than a ring ahead of `head`: (frames written, new tail)."""
    frames: list[bytes] = []
    for _ in range(count):
        n = rng.choice((1, 7, 8, 9, 60, 64, 333, 1024, MAX_FRAME, rng.randint(1, MAX_FRAME)))
        need = REC_HDR + ((n + 7) & ~7)
        pos = tail % RING
        skip = RING - pos if RING - pos < need else 0
        if tail + skip + need - head > RING:
            break
        if skip:
            m.write(pos, _REC.pack(WRAP, 0))
            tail += skip
            pos = 0
        frame = rng.randbytes(n)
        m.write(pos, _REC.pack(n, 0) + frame + bytes(need - REC_HDR - n))
        frames.append(frame)
        tail += need
    return frames, tail


# --- the hostile producer: one function per kind of case ---------------------------------
# Each writes into ring 0 from the consumer's `head` and publishes a tail; it returns the
# frames a correct reader must deliver, or None when the contents are not (all) valid.

Producer = Callable[[random.Random, Mappings, int], "list[bytes] | None"]


def valid(rng: random.Random, m: Mappings, head: int) -> list[bytes] | None:
    frames, tail = honest_records(rng, m, head, head, rng.randint(1, 12))
    m.set_word(_T0, tail)
    return frames


def lying_length(rng: random.Random, m: Mappings, head: int) -> list[bytes] | None:
    """Valid records, then one header that lies: a length of 0, too long, past the tail or the
    end of the ring, a wrap marker's value but one, or a reserved word that is not 0."""
    frames, tail = honest_records(rng, m, head, head, rng.randint(0, 6))
    pos = tail % RING
    left = RING - (tail - head)
    if left < 16:
        m.set_word(_T0, tail)
        return frames
    lie = rng.choice((0, MAX_FRAME + 1, WRAP - 1, rng.getrandbits(32), RING - pos, left, left - 7, 9))
    reserved = 0 if rng.random() < 0.7 else rng.getrandbits(32) or 1
    m.write(pos, _REC.pack(lie, reserved))
    tail += rng.choice((8, 16, min(left, REC_HDR + ((min(lie, RING) + 7) & ~7)), left))
    m.set_word(_T0, tail)
    return None


def wrap_chain(rng: random.Random, m: Mappings, head: int) -> list[bytes] | None:
    """Wrap markers chained: at head, at 0, at random places, some with records between; the
    8-byte attack (a marker at 0, 8 bytes published) is one of them."""
    if rng.random() < 0.2:
        m.write(head % RING, _REC.pack(WRAP, 0))
        m.set_word(_T0, head + 8)
        return None
    _, tail = honest_records(rng, m, head, head, rng.randint(0, 3))
    for off in {tail % RING, 0, *(rng.randrange(0, RING, 8) for _ in range(rng.randint(0, 4)))}:
        m.write(off, _REC.pack(WRAP, 0 if rng.random() < 0.9 else 1))
    m.set_word(_T0, head + rng.randrange(8, RING + 1, 8))
    return None


def random_bytes(rng: random.Random, m: Mappings, head: int) -> list[bytes] | None:
    """Random bytes, some of them record headers that look plausible (small lengths, wrap
    markers, reserved words of 0), and a tail."""
    data = bytearray(rng.randbytes(RING))
    for _ in range(rng.choice((0, 8, 64, 256))):
        n = rng.choice((WRAP, 0, rng.randint(1, 64), rng.randint(1, MAX_FRAME)))
        _REC.pack_into(data, rng.randrange(0, RING, 8), n, 0)
    m.write(0, bytes(data))
    m.set_word(_T0, head + rng.randrange(0, RING + 1, 8))
    return None


def random_indexes(rng: random.Random, m: Mappings, head: int) -> list[bytes] | None:
    """Valid records, and a tail that is no distance from head: not a multiple of 8, behind
    head, beyond a ring, anywhere in 2**64."""
    _, tail = honest_records(rng, m, head, head, rng.randint(0, 6))
    bad = rng.choice((tail + rng.randint(1, 7), head - 8, head + RING + 8, head + (1 << 63),
                      rng.getrandbits(64), head - RING))
    m.set_word(_T0, bad)
    return None


def mixed(rng: random.Random, m: Mappings, head: int) -> list[bytes] | None:
    """Valid records with a patch of garbage somewhere among them."""
    _, tail = honest_records(rng, m, head, head, rng.randint(1, 10))
    off = rng.randrange(0, RING, 4)
    m.write(off, rng.randbytes(min(RING - off, rng.randint(1, 64))))
    m.set_word(_T0, tail)
    return None


INDEXED: dict[str, Producer] = {
    "valid": valid, "lying_length": lying_length, "wrap_chain": wrap_chain,
    "random_bytes": random_bytes, "random_indexes": random_indexes, "mixed": mixed,
}


# --- running the twins -----------------------------------------------------------------------


@contextlib.contextmanager
def watchdog(seconds: float, what: Callable[[], str]) -> Iterator[None]:
    """A FuzzFailure if the block runs longer than `seconds` (the pure-Python twin's loop is
    interruptible; a C loop that never returned could not be, so it runs after the Python one)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(signum, frame):  # noqa: ARG001 - signal handler signature
        raise FuzzFailure(f"{what()}: no answer in {seconds} s (an endless loop?)")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def twins(m: Mappings, fence_fd: int, batch: int) -> list:
    out = [RingsRef(m.bufs[0], RING, 1, 0, fence_fd, MAX_FRAME, batch)]
    if shm._CRings is not None:
        out.append(shm._CRings(m.bufs[1], RING, 1, 0, -1, MAX_FRAME, batch))
    return out


def state(r) -> tuple:
    return r.corrupt, r.head, r.tail, r.head_cache, r.steps


def corrupt_kind(reason: str) -> str:
    """An outcome name for a corruption reason (the part before any number)."""
    for key in ("bad wrap marker", "bad record", "is not a valid distance from head",
                "not a valid distance behind", "is not a multiple of 8"):
        if key in reason:
            return "corrupt: " + key.replace("is not a valid distance from head", "tail").replace(
                "not a valid distance behind", "peer head").replace("is not a multiple of 8", "index unaligned")
    return "corrupt: other"


class Case:
    """One case: its seed, kind and the checks, failing with a message that replays it."""

    def __init__(self, seed: int, iteration: int, kind: str, report: FuzzReport, log) -> None:
        self.seed, self.iteration, self.kind, self.report, self.log = seed, iteration, kind, report, log

    def fail(self, what: str) -> FuzzFailure:
        return FuzzFailure(f"shm seed {self.seed}, iteration {self.iteration} ({self.kind}): {what} "
                           f"(replay: python -m nicemu.fuzz --target shm --seed {self.seed} "
                           f"--iterations {self.iteration + 1})")

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            raise self.fail(what)

    # -- ring 0: the twins consume what the hostile producer wrote --------------------------

    def consume(self, rng: random.Random, fence_fd: int) -> None:
        m = Mappings(2 if shm._CRings is not None else 1)
        start = rng.choice((0, rng.randrange(0, 1 << 40, 8), M64 + 1 - rng.randrange(8, 4 * RING, 8)))
        m.set_word(_H0, start)
        m.set_word(_T0, start)
        m.set_word(_T1, start)
        m.set_word(_H1, start)
        if rng.random() < 0.05:  # the previous owner (or the peer) left an index unaligned
            m.set_word(rng.choice((_H0, _T1)), start + rng.randint(1, 7))
        m.set_word(_W0, rng.getrandbits(1))
        batch = rng.choice((1, 3, 64, 1024))
        rings = twins(m, fence_fd, batch)
        producer = INDEXED[self.kind]
        try:
            with watchdog(WATCHDOG_S, lambda: str(self.fail("a pull")).rstrip()):
                for _ in range(rng.randint(1, 3)):
                    if rings[0].corrupt is not None:
                        break
                    want = producer(rng, m, rings[0].head)
                    got = self.pull_all(m, rings, batch)
                    if want is not None:
                        self.check(got == want and rings[0].corrupt is None,
                                   f"valid records: delivered {len(got)} frames of {len(want)}, "
                                   f"corrupt={rings[0].corrupt!r}")
                    m.set_word(_W0, rng.getrandbits(1))
                if rings[0].corrupt is not None:
                    self.report.saw(corrupt_kind(rings[0].corrupt))
                    for r in rings:  # dead for good
                        self.check(r.pull() == ([], False, None) and not r.arm() and r.push(b"x") == -2
                                   and r.free() == 0, "a corrupt ring came back to life")
        finally:
            for r in rings:
                r.close()

    def pull_all(self, m: Mappings, rings: list, batch: int) -> list[bytes]:
        """Pull until nothing more comes, checking every pull against the other twin and the
        restated rules. Returns the frames delivered."""
        delivered: list[bytes] = []
        for _ in range(RING // 16 // batch + 2):  # enough pulls for a full ring of the smallest records
            before = [bytes(b) for b in m.bufs]
            ring0 = m.ring0()
            head, tail = rings[0].head, m.word(_T0)
            want, want_head, want_corrupt = expected(ring0, head, tail, MAX_FRAME, batch)
            results = []
            for r in rings:
                res = r.pull()
                results.append((res, state(r)))
            (frames, _rang, err), st = results[0]
            self.check(all(x == results[0] for x in results), f"the twins disagree: {results!r}"[:2000])
            self.check(frames == want and rings[0].head == want_head and (err is not None) == want_corrupt,
                       f"the rules say {len(want)} frames, head {want_head}, corrupt={want_corrupt}; "
                       f"the twins {len(frames)}, head {rings[0].head}, {err!r}")
            left = (tail - head) % (1 << 64)
            self.check(rings[0].steps <= (left // 8 if left <= RING else 0) and len(frames) <= batch,
                       f"{rings[0].steps} steps for {left} bytes published ({len(frames)} frames, batch {batch})")
            self.check(all(f in ring0 for f in frames), "a frame made of bytes outside the ring")
            for b, old in zip(m.bufs, before):
                self.changed_only_header_words(old, b)
            delivered += frames
            self.report.saw("frames", len(frames))
            if err is not None or not frames:
                break
        if not delivered and rings[0].corrupt is None:
            self.report.saw("nothing published")
        return delivered

    def changed_only_header_words(self, old: bytes, new: bytearray) -> None:
        """Between `old` and `new` only the header words an end writes may differ (and for a
        mapping, the rings not at all)."""
        if old == new:
            return
        self.check(old[HEADER_BYTES:] == new[HEADER_BYTES:], "a ring's bytes changed under a pull")
        a, b = bytearray(old[:HEADER_BYTES]), bytearray(new[:HEADER_BYTES])
        for i in _READER_WORDS:
            a[8 * i : 8 * i + 8] = b[8 * i : 8 * i + 8] = bytes(8)
        self.check(a == b, "the reader wrote a header word that is not its own")

    # -- ring 1: the twins produce; the consumer's head is the hostile part -----------------

    def produce(self, rng: random.Random, fence_fd: int) -> None:
        m = Mappings(2 if shm._CRings is not None else 1)
        start = rng.choice((0, rng.randrange(0, 1 << 40, 8), M64 + 1 - rng.randrange(8, 4 * RING, 8)))
        for w in (_T1, _H1):
            m.set_word(w, start)
        rings = twins(m, fence_fd, 64)
        try:
            with watchdog(WATCHDOG_S, lambda: str(self.fail("a push")).rstrip()):
                for _ in range(rng.randint(1, 40)):
                    r0 = rings[0]
                    roll = rng.random()
                    if roll < 0.15:  # a hostile head: anywhere, unaligned, ahead of our tail
                        m.set_word(_H1, rng.choice((rng.getrandbits(64), r0.tail + 8, r0.tail - RING - 8,
                                                    r0.tail - rng.randint(1, 7), r0.tail + (1 << 63))))
                    elif roll < 0.5:  # an honest consumer frees part of what was written
                        used = (r0.tail - m.word(_H1)) % (1 << 64)
                        if used <= RING and used % 8 == 0:
                            m.set_word(_H1, m.word(_H1) + rng.randrange(0, used + 1, 8))
                    m.set_word(_S1, rng.getrandbits(1))
                    frame = rng.randbytes(rng.choice((1, 60, 333, MAX_FRAME)))
                    before = [bytes(b) for b in m.bufs]
                    need = rng.choice((16, 1024, RING))
                    got = [(r.push(frame), r.free(), r.writable(need), state(r)) for r in rings]
                    self.check(all(x == got[0] for x in got), f"the twins disagree: {got!r}"[:2000])
                    for b, old in zip(m.bufs, before):  # only ring 1 and our own words change
                        self.check(old[HEADER_BYTES : HEADER_BYTES + RING] == b[HEADER_BYTES : HEADER_BYTES + RING],
                                   "a push wrote outside its ring")
                        self.changed_only_header_words(old[:HEADER_BYTES], b[:HEADER_BYTES])
                    self.check(all(m.bufs[0] == b for b in m.bufs), "the twins wrote different bytes")
                    code = got[0][0]
                    self.report.saw(PUSHED[code])
                    if code == -2:
                        self.check(r0.corrupt is not None and "behind tail" in r0.corrupt, f"-2 with {r0.corrupt!r}")
                        break
        finally:
            for r in rings:
                r.close()

    # -- a real cable end on a sealed memfd -------------------------------------------------

    def cable(self, rng: random.Random) -> None:
        engine = "cython" if shm._CRings is not None and rng.random() < 0.5 else "python"
        a0, b0 = ShmCable.create(1 << 16)
        b = ShmCableEnd.from_fds("b", *[os.dup(fd) for fd in b0.fds()], engine=engine)
        b0.release()
        ring = b.ring_bytes
        mm = mmap.mmap(a0.fds().memfd, HEADER_BYTES + 2 * ring)
        try:
            q = memoryview(mm)[:HEADER_BYTES].cast("Q")
            data = memoryview(mm)[HEADER_BYTES : HEADER_BYTES + ring]
            try:
                honest = [rng.randbytes(rng.randint(1, 1518)) for _ in range(rng.randint(0, 20))]
                for f in honest:  # some honest traffic first
                    a0.send(f)
                sent = a0.tx_frames
                head = q[_T0]
                hostile = rng.choice(("none", "8-byte wrap", "chained wraps", "random bytes", "tail", "lie"))
                pos = head % ring
                if hostile == "8-byte wrap":
                    data[pos : pos + 8] = _REC.pack(WRAP, 0)
                    q[_T0] = (head + 8) & M64
                elif hostile == "chained wraps":
                    for off in (pos, 0):
                        data[off : off + 8] = _REC.pack(WRAP, 0)
                    q[_T0] = (head + rng.randrange(8, ring + 1, 8)) & M64
                elif hostile == "random bytes":
                    data[:] = rng.randbytes(ring)
                    q[_T0] = (head + rng.randrange(8, ring + 1, 8)) & M64
                elif hostile == "tail":
                    q[_T0] = rng.getrandbits(64)
                elif hostile == "lie":
                    data[pos : pos + 8] = _REC.pack(rng.getrandbits(32), 0)
                    q[_T0] = (head + rng.randrange(16, ring + 1, 8)) & M64
                os.eventfd_write(a0.fds().doorbell_out, 1)
                with watchdog(WATCHDOG_S, lambda: str(self.fail("recv_frames")).rstrip()):
                    got = b.recv_frames()
                    calls = 1
                    while b.link_up and calls < 50 and b._rings.arm():
                        got += b.recv_frames()
                        calls += 1
                self.check(len(got) <= sent + calls * shm.RECV_PULLS * shm.RX_BATCH, "more frames than possible")
                if b.corrupt is not None:
                    self.check(b.rx_errors == 1 and not b.link_up and b.last_error and b.recv_frames() == [],
                               f"corrupt but rx_errors={b.rx_errors} link_up={b.link_up}")
                    self.check(q[shm._W_PRESENT + 1] == 0, "a corrupt end still says it is present")
                    self.report.saw("cable: " + corrupt_kind(b.corrupt))
                else:
                    self.check(b.rx_errors == 0 and b.link_up, "an error counted without a corrupt ring")
                    self.report.saw("cable: still up")
                if hostile == "none":
                    self.check(got == honest and b.corrupt is None, f"honest traffic: {len(got)} of {len(honest)}")
            finally:
                q.release()
                data.release()
        finally:
            mm.close()
            a0.close()
            b.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def run(seed: int, iterations: int, log: Callable[[str], None] | None = None) -> FuzzReport:
    """`iterations` cases drawn from `seed` (see the module docstring)."""
    rng = random.Random(seed)
    report = FuzzReport("shm", seed, iterations)
    fence_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    fds_before = _open_fds()
    kinds = list(INDEXED) + ["producer"]
    cable_log = shm.log.disabled
    shm.log.disabled = True  # hundreds of "ring corrupt" warnings are what we ask for here
    try:
        for i in range(iterations):
            case_rng = random.Random(rng.getrandbits(64))
            kind = "cable" if i % CABLE_EVERY == CABLE_EVERY - 1 else case_rng.choice(kinds)
            report.tried(kind)
            if log is not None:
                log(f"shm {i}: {kind}")
            case = Case(seed, i, kind, report, log)
            if kind == "cable":
                case.cable(case_rng)
            elif kind == "producer":
                case.produce(case_rng, fence_fd)
            else:
                case.consume(case_rng, fence_fd)
        if _open_fds() != fds_before:
            raise FuzzFailure(f"shm seed {seed}: {_open_fds() - fds_before} descriptors leaked")
    finally:
        shm.log.disabled = cable_log
        os.close(fence_fd)
    return report
