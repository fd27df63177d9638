"""The shared-memory cable: ring protocol (order, wrap, full/space doorbells), a hostile peer
(malformed records and indexes, chained wrap markers, a memfd it tries to shrink: the ring is
declared corrupt, counted, the link goes down, nothing hangs), the C and Python rings agreeing
on valid and hostile contents, link state (close, kill -9 of the peer), and real processes: two
with a device each exchanging frames, an emulator attacked through its cable."""
from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from cable_child import echo_through_child
from conftest import MAC_BYTES, PEER_MAC, make_frame

from nicemu.cable import make_cable
from nicemu.cable import shm as shm_mod
from nicemu.cable.base import CableError
from nicemu.cable.shm import HEADER_BYTES, SEALS, WRAP, RingsRef, ShmCable, ShmCableEnd

PEER_BYTES = bytes.fromhex(PEER_MAC.replace(":", ""))


def readable(end) -> bool:
    return bool(select.select([end.fileno()], [], [], 0)[0])


ENGINES = ["python"] + (["cython"] if shm_mod._CRings is not None else [])


@pytest.fixture(params=ENGINES)
def cable(request):
    """Both ends of a 64 KiB cable, on the C rings and on the pure-Python reference."""
    a0, b0 = ShmCable.create(1 << 16)
    a = ShmCableEnd.from_fds("a", *[os.dup(fd) for fd in a0.fds()], engine=request.param)
    b = ShmCableEnd.from_fds("b", *[os.dup(fd) for fd in b0.fds()], engine=request.param)
    a0.release()
    b0.release()
    assert a.engine == b.engine == request.param
    yield a, b
    a.close()
    b.close()


def test_the_c_rings_are_built() -> None:
    assert shm_mod._CRings is not None, "build it: cythonize -i -3 nicemu/cable/_shmring.pyx"


def test_frames_arrive_in_order_and_ring_the_doorbell(cable) -> None:
    a, b = cable
    assert a.link_up and b.link_up
    assert not readable(b)
    fs = [make_frame(payload=bytes([i]) * 3, size=60 + i) for i in range(20)]
    for f in fs:
        assert a.send(f)
    assert readable(b)
    assert b.recv_frames() == fs
    assert not readable(b)
    # and the other direction
    assert b.send(fs[0]) and a.recv_frames() == [fs[0]]


def test_wraparound_with_random_sizes(cable) -> None:
    a, b = cable
    rng = random.Random(5)
    sent: list[bytes] = []
    got: list[bytes] = []
    for _ in range(3000):
        f = rng.randbytes(rng.choice([1, 7, 60, 64, 333, 1518, 9000]))
        while not a.send(f):
            got += b.recv_frames()
        sent.append(f)
        if rng.random() < 0.3:
            got += b.recv_frames()
    got += b.recv_frames()
    assert got == sent
    assert a.tx_frames == b.rx_frames == 3000 and b.rx_errors == 0


def test_full_ring_refuses_then_the_consumer_wakes_the_producer(cable) -> None:
    a, b = cable
    f = make_frame(size=1518)
    n = 0
    while a.send(f):
        n += 1
    assert 30 < n < 64  # 64 KiB of 1528-byte records
    assert not a.writable() and a.tx_refused == 1
    assert not readable(a)
    assert len(b.recv_frames()) == n
    assert readable(a)  # space: the consumer rang our doorbell
    assert a.recv_frames() == [] and a.writable()
    assert a.send(f)


def test_oversize_and_empty_frames_are_dropped_not_refused(cable) -> None:
    a, b = cable
    assert a.send(b"x" * (1 << 15))  # more than half the ring: can never fit
    assert a.send(b"")
    assert a.tx_dropped == 2 and b.recv_frames() == []


def test_close_is_link_down_for_the_peer(cable) -> None:
    a, b = cable
    a.close()
    assert readable(b)
    assert b.recv_frames() == []
    assert not b.link_up
    assert b.send(make_frame())  # lost, never refused
    assert b.writable()


@pytest.mark.parametrize("size", [1000, 1 << 16 | 1, 3 << 16, 1 << 31, "1M", True])
def test_bad_ring_size(size) -> None:
    with pytest.raises(ValueError, match="ring_bytes"):
        ShmCable.create(size)


def test_make_cable_shm_and_from_arg_errors() -> None:
    a, b = make_cable("shm", ring_bytes=1 << 16)
    assert a.to_arg().startswith("a:") and b.side == "b"
    a.close()
    b.close()
    with pytest.raises(ValueError, match="must look like"):
        ShmCableEnd.from_arg("a:x,y")
    with pytest.raises(ValueError, match="needs 4 descriptors"):
        ShmCableEnd.from_arg("a:1,2,3")


def test_a_memfd_that_is_not_a_cable_is_refused() -> None:
    fds = [os.memfd_create("x", os.MFD_ALLOW_SEALING), os.eventfd(0), os.eventfd(0)]
    os.ftruncate(fds[0], HEADER_BYTES + 2 * (1 << 16))
    fcntl.fcntl(fds[0], fcntl.F_ADD_SEALS, SEALS)
    s1, s2 = socket.socketpair()
    with pytest.raises(CableError, match="not a nicemu shm cable"):
        ShmCableEnd.from_fds("a", fds[0], fds[1], fds[2], s1.detach())
    s2.close()
    # all four descriptors were taken and closed
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def peer_view(end: ShmCableEnd):
    """What a hostile peer holds: the header words and the two rings of `end`'s memfd."""
    ring = end.ring_bytes
    mm = mmap.mmap(end.fds().memfd, HEADER_BYTES + 2 * ring)
    mv = memoryview(mm)
    rings = [mv[HEADER_BYTES + r * ring : HEADER_BYTES + (r + 1) * ring] for r in (0, 1)]
    return mm, mv[:HEADER_BYTES].cast("Q"), rings


def close_view(mm, q, rings) -> None:
    for v in (q, *rings):
        v.release()
    mm.close()


def test_a_malformed_record_is_corrupt_counted_and_the_link_goes_down(cable) -> None:
    a, b = cable
    mm, q, rings = peer_view(a)
    a.send(make_frame(payload=b"ok1"))
    # the peer scribbles a length that lies over the next record it publishes
    a.send(make_frame(payload=b"bad"))
    struct.pack_into("<I", rings[0], 8 + 64, 0x7FFFFFF0)
    assert b.recv_frames() == [make_frame(payload=b"ok1")]  # what came before is delivered
    assert b.rx_errors == 1 and "bad record at ring offset 72: length 2147483632" in b.last_error
    assert b.corrupt is not None and not b.link_up
    # as an unplugged cable: b's "present" word is cleared and a is told
    assert readable(a)
    a.recv_frames()
    assert not a.link_up
    # for good: nothing more is read, sends are dropped (never refused), once counted
    assert b.send(make_frame()) and b.tx_dropped == 1 and b.writable()
    assert b.recv_frames() == [] and not readable(b)  # b stopped listening to the doorbell
    q[shm_mod._ring_words(0)[0]] += 8
    os.eventfd_write(b.fds().doorbell_in, 1)
    assert b.recv_frames() == [] and b.rx_errors == 1
    close_view(mm, q, rings)


@pytest.mark.parametrize("how", ["tail +3", "tail beyond the ring", "tail behind head"])
def test_a_tail_that_is_no_distance_from_head_is_corrupt(cable, how: str) -> None:
    a, b = cable
    mm, q, rings = peer_view(a)
    a.send(make_frame())
    assert len(b.recv_frames()) == 1
    tail_word = shm_mod._ring_words(0)[0]
    q[tail_word] = {"tail +3": q[tail_word] + 3, "tail beyond the ring": q[tail_word] + (1 << 16) + 8,
                    "tail behind head": q[tail_word] - 8}[how]
    os.eventfd_write(a.fds().doorbell_out, 1)
    assert readable(b) and b.recv_frames() == []
    assert b.rx_errors == 1 and "not a valid distance" in b.last_error and not b.link_up
    close_view(mm, q, rings)


def test_the_8_byte_chained_wrap_marker_is_corrupt_not_an_endless_loop(cable) -> None:
    """The attack: 8 bytes, a wrap marker at offset 0 (it jumps a whole ring, onto itself),
    published and rung. The reader spun forever; now one step, corrupt, counted, link down."""
    a, b = cable
    mm, q, rings = peer_view(a)
    struct.pack_into("<II", rings[0], 0, WRAP, 0)
    q[shm_mod._ring_words(0)[0]] = 8
    os.eventfd_write(a.fds().doorbell_out, 1)
    assert readable(b)
    assert b.recv_frames() == []
    assert b.rx_errors == 1 and "bad wrap marker at ring offset 0" in b.last_error
    assert not b.link_up and b.corrupt
    assert b._rings.steps == 1
    close_view(mm, q, rings)


def test_a_wrap_marker_landing_on_a_wrap_marker_is_corrupt(cable) -> None:
    """The longer form: real traffic brings head near the end of the ring, then a wrap marker
    there jumps to offset 0, where another wrap marker waits."""
    a, b = cable
    mm, q, rings = peer_view(a)
    ring = a.ring_bytes
    f = make_frame(size=ring // 4 - 8 - 8)  # 4 records fill the ring but for 8 bytes... almost
    for _ in range(3):
        assert a.send(f)
    assert len(b.recv_frames()) == 3
    tail_word = shm_mod._ring_words(0)[0]
    head = q[tail_word]
    pos = head % ring
    struct.pack_into("<II", rings[0], pos, WRAP, 0)
    struct.pack_into("<II", rings[0], 0, WRAP, 0)
    q[tail_word] = head + (ring - pos) + 16
    os.eventfd_write(a.fds().doorbell_out, 1)
    assert b.recv_frames() == []
    assert b.rx_errors == 1 and "bad wrap marker at ring offset 0" in b.last_error and not b.link_up
    assert b._rings.steps == 2
    close_view(mm, q, rings)


def test_the_peer_s_head_ahead_of_our_tail_is_corrupt_for_the_producer(cable) -> None:
    a, b = cable
    mm, q, rings = peer_view(a)
    before = bytes(rings[0])
    q[shm_mod._ring_words(0)[1]] = 1 << 40  # a's tx ring: the consumer "consumed" 1 TiB
    f = make_frame(size=1000)
    sent = 0
    while sent < 200 and a.link_up:  # the cached head holds for a while; a reload finds it
        assert a.send(f)
        sent += 1
    assert a.corrupt and "of the peer is not a valid distance behind tail" in a.corrupt
    assert a.rx_errors == 1 and a.tx_dropped == 1 and not a.link_up
    # found while sending (not in recv_frames): a rang itself, so its event loop comes back,
    # reads link_up and stops listening
    assert readable(a) and a.recv_frames() == [] and not readable(a)
    # a filled the ring once (65 records of 1008 bytes) and never wrapped over unread frames:
    # the reload that would have let it wrap found the head corrupt; that frame was dropped
    assert sent == (1 << 16) // 1008 + 1 and a.tx_frames == sent - 1
    assert bytes(rings[1]) == b"\0" * (1 << 16) and before != bytes(rings[0])
    close_view(mm, q, rings)


def test_recv_frames_is_bounded_work_and_comes_back_for_the_rest(cable, monkeypatch) -> None:
    """One call copies out at most RECV_PULLS x RX_BATCH frames; it then rings its own doorbell,
    so a producer that never stops publishing cannot keep the event loop (and SIGTERM) away."""
    a0, b0 = cable
    monkeypatch.setattr(shm_mod, "RX_BATCH", 10)
    a = ShmCableEnd.from_fds("a", *[os.dup(fd) for fd in a0.fds()], engine=a0.engine)
    b = ShmCableEnd.from_fds("b", *[os.dup(fd) for fd in b0.fds()], engine=b0.engine)
    try:
        fs = [make_frame(payload=i.to_bytes(2, "big")) for i in range(100)]
        for f in fs:
            assert a.send(f)
        got = b.recv_frames()
        assert len(got) == shm_mod.RECV_PULLS * 10
        while readable(b):
            more = b.recv_frames()
            assert len(more) <= shm_mod.RECV_PULLS * 10
            got += more
        assert got == fs and b.rx_errors == 0
    finally:
        a.release()
        b.release()


@pytest.mark.parametrize("engine", ENGINES)
def test_an_end_attached_to_corrupt_indexes_is_link_down_from_the_start(engine: str) -> None:
    """The indexes an end starts from (where the previous owner left off) are the peer's too."""
    a, b0 = ShmCable.create(1 << 16)
    mm, q, rings = peer_view(a)
    q[shm_mod._ring_words(1)[0]] = 12  # b's own tail, as found in the mapping
    b = ShmCableEnd.from_fds("b", *[os.dup(fd) for fd in b0.fds()], engine=engine)
    b0.release()
    assert b.corrupt == "tail 12 of ring 1 is not a multiple of 8" and b.rx_errors == 1 and not b.link_up
    assert b.send(make_frame()) and b.tx_dropped == 1 and b.recv_frames() == []
    assert q[shm_mod._W_PRESENT + 1] == 0
    close_view(mm, q, rings)
    a.close()
    b.close()


# --- the memfd: sealed, and an unsealed one refused --------------------------------------------


def test_the_memfd_is_sealed_so_the_peer_cannot_shrink_it(cable) -> None:
    """The attack: ftruncate the shared memfd to 0 (the other side then died of SIGBUS on its
    next access). Sealed, the kernel refuses: EPERM, and both ends keep working."""
    a, b = cable
    for end in (a, b):
        fd = end.fds().memfd
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS == SEALS
        for size in (0, HEADER_BYTES, os.fstat(fd).st_size + 4096):
            with pytest.raises(OSError) as e:
                os.ftruncate(fd, size)
            assert e.value.errno == errno.EPERM
        with pytest.raises(OSError) as e:  # and no seal can be added (F_SEAL_SEAL)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
        assert e.value.errno == errno.EPERM
    assert a.send(make_frame()) and b.recv_frames() == [make_frame()]


def cable_memfd_copy(sealed: int | None, size: int | None = None) -> int:
    """A memfd holding a real cable's header, with the given seals (None: no MFD_ALLOW_SEALING)."""
    a, b = ShmCable.create(1 << 16)
    with mmap.mmap(a.fds().memfd, HEADER_BYTES) as mm:
        header = bytes(mm)
    full = os.fstat(a.fds().memfd).st_size
    a.close()
    b.close()
    fd = os.memfd_create("copy", 0 if sealed is None else os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, full if size is None else size)
    os.pwrite(fd, header[: size or full], 0)
    if sealed:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, sealed)
    return fd


def attach(memfd: int):
    fds = [memfd, os.eventfd(0), os.eventfd(0)]
    s1, s2 = socket.socketpair()
    try:
        return ShmCableEnd.from_fds("b", *fds, s1.detach()), fds
    finally:
        s2.close()


@pytest.mark.parametrize("seals", [None, 0, fcntl.F_SEAL_SHRINK, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW],
                         ids=["not sealable", "no seals", "shrink only", "no F_SEAL_SEAL"])
def test_an_unsealed_memfd_is_refused_at_attach(seals) -> None:
    with pytest.raises(CableError, match="the memfd is not sealed") as e:
        attach(cable_memfd_copy(seals))
    assert e.value.errno == errno.EPERM


def test_a_sealed_memfd_that_is_too_small_or_no_memfd_is_refused() -> None:
    with pytest.raises(CableError, match="too small"):
        attach(cable_memfd_copy(SEALS, size=HEADER_BYTES + 4096))
    with pytest.raises(CableError, match="does not match ring size"):
        attach(cable_memfd_copy(SEALS, size=HEADER_BYTES + 4 * (1 << 16)))
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(CableError, match="is not a sealable memfd") as e:
        attach(r)
    # every descriptor handed over was closed
    with pytest.raises(OSError):
        os.fstat(r)


def random_ring(rng: random.Random, ring: int):
    """A mapping with ring 0 filled with records from a random head, maybe damaged as a hostile
    peer would: lengths that lie, chained wrap markers, random bytes, indexes anywhere."""
    data = bytearray(HEADER_BYTES + 2 * ring)
    mv = memoryview(data)
    rd = mv[HEADER_BYTES : HEADER_BYTES + ring]
    head = rng.randrange(0, 1 << 40) & ~7
    pos = head
    frames = []
    for _ in range(rng.randrange(0, 30)):
        n = rng.choice([1, 60, 1518, 2000])
        need = 8 + ((n + 7) & ~7)
        p = pos & (ring - 1)
        extra = ring - p if ring - p < need else 0
        if pos + extra + need - head > ring:
            break
        if extra:
            struct.pack_into("<II", rd, p, 0xFFFFFFFF, 0)
            pos += extra
            p = 0
        f = rng.randbytes(n)
        struct.pack_into("<II", rd, p, n, 0)
        rd[p + 8 : p + 8 + n] = f
        frames.append(f)
        pos += need
    tail = pos
    damaged = rng.random() < 0.4 and tail != head
    mask = ring - 1
    if damaged:
        kind = rng.randrange(6)
        if kind == 0:  # a length that lies
            struct.pack_into("<I", rd, head & mask, rng.choice([0, 70000, 0xFFFFFFF0, WRAP - 1]))
        elif kind == 1:  # an index that is no distance from head
            tail += rng.choice([3, ring + 8, -8, -(1 << 63), 1 << 64])
        elif kind == 2:  # wrap markers chained from head (the 8-byte attack and longer)
            for p in {head & mask, 0, rng.randrange(0, ring, 8)}:
                struct.pack_into("<II", rd, p, WRAP, 0)
        elif kind == 3:  # random bytes over part of what was published
            p = rng.randrange(0, ring, 8)
            n = rng.randrange(8, 512)
            rd[p : min(ring, p + n)] = rng.randbytes(min(ring, p + n) - p)
        elif kind == 4:  # a reserved word that is not 0
            struct.pack_into("<I", rd, (head & mask) + 4, rng.randrange(1, 1 << 32))
        else:  # a tail anywhere at all
            tail = rng.randrange(0, 1 << 64)
        tail &= (1 << 64) - 1
    q = mv[:HEADER_BYTES].cast("Q")
    t, h, _, _ = shm_mod._ring_words(0)
    q[t], q[h] = tail, head
    q.release()
    rd.release()
    mv.release()
    return data, frames, tail, damaged


def rings_state(r) -> tuple:
    return r.corrupt, r.head, r.tail, r.head_cache, r.steps


def test_c_and_python_rings_agree() -> None:
    """Random and damaged rings: both consumers return the same frames, head, error and steps
    (at most one per 8 published bytes); both producers write byte-identical rings."""
    if shm_mod._CRings is None:
        pytest.skip("nicemu/cable/_shmring is not built (cythonize -i -3 nicemu/cable/_shmring.pyx)")
    rng = random.Random(11)
    ring = 1 << 16
    fence_fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        for trial in range(300):
            data, frames, tail, damaged = random_ring(rng, ring)
            d1, d2 = bytearray(data), bytearray(data)
            ref = RingsRef(d1, ring, 1, 0, fence_fd)
            fast = shm_mod._CRings(d2, ring, 1, 0)
            left = (tail - ref.head) % (1 << 64)
            r1, r2 = ref.pull(), fast.pull()
            assert r1 == r2 and rings_state(ref) == rings_state(fast)
            assert ref.steps <= max(1, left // 8)
            if not damaged:
                assert r1 == (frames, False, None)
            else:
                # no more than was written, and only bytes of the ring (random bytes may have
                # overwritten a payload: that frame is still a frame)
                ring0 = bytes(data[HEADER_BYTES : HEADER_BYTES + ring])
                assert len(r1[0]) <= len(frames) and all(f in ring0 for f in r1[0])
            assert ref.pull() == fast.pull() and ref.arm() == fast.arm()
            # now produce into ring 1 from both and compare the bytes
            for f in frames[:10] + [rng.randbytes(rng.randrange(1, 3000)) for _ in range(5)]:
                assert ref.push(f) == fast.push(f)
            assert ref.free() == fast.free() and rings_state(ref) == rings_state(fast)
            ref.close()
            fast.close()
            assert d1 == d2
    finally:
        os.close(fence_fd)


RING = 4096  # small rings for hand-made contents (max_frame 1500 fits half of it)
M64 = (1 << 64) - 1


def hostile_mapping(*, rx_head=0, rx_tail=0, tx_tail=0, tx_head=None, records=()) -> bytearray:
    """A mapping whose ring 0 (what the end under test consumes) holds `records`, each
    (offset, u32 length, u32 reserved, payload), with the given header indexes."""
    data = bytearray(HEADER_BYTES + 2 * RING)
    for off, n, reserved, payload in records:
        struct.pack_into("<II", data, HEADER_BYTES + off, n, reserved)
        data[HEADER_BYTES + off + 8 : HEADER_BYTES + off + 8 + len(payload)] = payload
    q = memoryview(data).cast("Q")
    q[shm_mod._ring_words(0)[0]], q[shm_mod._ring_words(0)[1]] = rx_tail & M64, rx_head & M64
    q[shm_mod._ring_words(1)[0]] = tx_tail & M64
    q[shm_mod._ring_words(1)[1]] = (tx_tail if tx_head is None else tx_head) & M64
    q.release()
    return data


def both_rings(data: bytearray, fence_fd: int, batch: int = 1024) -> list:
    """The Python and (when built) the C rings over copies of `data`, as end "b" (tx 1, rx 0)."""
    rings = [RingsRef(bytearray(data), RING, 1, 0, fence_fd, 1500, batch)]
    if shm_mod._CRings is not None:
        rings.append(shm_mod._CRings(bytearray(data), RING, 1, 0, -1, 1500, batch))
    return rings


@pytest.fixture
def fence_fd():
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    yield fd
    os.close(fd)


W = (WRAP, 0, b"")
HOSTILE = {
    # name: (mapping, expected error, expected steps)
    "8-byte wrap at 0": (dict(rx_tail=8, records=[(0, *W)]), "bad wrap marker at ring offset 0", 1),
    "wrap onto a wrap": (dict(rx_head=RING - 8, rx_tail=RING + 16, records=[(RING - 8, *W), (0, *W)]),
                         "bad wrap marker at ring offset 0", 2),
    "wrap with nothing after": (dict(rx_head=RING - 8, rx_tail=RING, records=[(RING - 8, *W)]),
                                f"bad wrap marker at ring offset {RING - 8}", 1),
    "wrap, reserved word": (dict(rx_head=RING - 8, rx_tail=RING + 16,
                                 records=[(RING - 8, WRAP, 1, b""), (0, 1, 0, b"x")]),
                            f"bad wrap marker at ring offset {RING - 8}", 1),
    "length 0": (dict(rx_tail=16, records=[(0, 0, 0, b"")]), "length 0, reserved word 0", 1),
    "length > max_frame": (dict(rx_tail=2048, records=[(0, 1501, 0, b"")]), "length 1501", 1),
    "length past tail": (dict(rx_tail=16, records=[(0, 9, 0, b"")]), "length 9", 1),
    "record across the end": (dict(rx_head=RING - 16, rx_tail=RING + 1000, records=[(RING - 16, 100, 0, b"")]),
                              f"bad record at ring offset {RING - 16}: length 100", 1),
    "reserved word": (dict(rx_tail=16, records=[(0, 1, 7, b"x")]), "reserved word 7", 1),
    "valid, then a lie": (dict(rx_tail=32, records=[(0, 3, 0, b"abc"), (16, 4000, 0, b"")]),
                          "bad record at ring offset 16", 2),
    "tail behind head": (dict(rx_head=64, rx_tail=56), "tail 56 is not a valid distance from head 64", 0),
    "tail not a multiple of 8": (dict(rx_tail=12, records=[(0, 1, 0, b"x")]), "not a valid distance", 0),
    "tail beyond a ring": (dict(rx_tail=RING + 8), "not a valid distance", 0),
    "tail 2**64 - 8 from 0": (dict(rx_tail=-8), "not a valid distance", 0),
    "our tail not a multiple of 8": (dict(tx_tail=3), "tail 3 of ring 1 is not a multiple of 8", 0),
    "our rx head not a multiple of 8": (dict(rx_head=5, rx_tail=5), "head 5 of ring 0 is not a multiple of 8", 0),
    "peer's head ahead of our tail": (dict(tx_tail=64, tx_head=128),
                                      "head 128 of the peer is not a valid distance behind tail 64", 0),
    "peer's head a ring and more behind": (dict(tx_tail=RING + 64, tx_head=56), "not a valid distance behind", 0),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_ring_contents_are_corrupt_in_both_twins(name: str, fence_fd: int) -> None:
    spec, error, steps = HOSTILE[name]
    results = []
    for r in both_rings(hostile_mapping(**spec), fence_fd):
        got = r.pull()
        assert (r.corrupt is not None) and error in r.corrupt, (type(r).__name__, r.corrupt)
        assert r.steps == steps
        # dead for good: nothing more is read, nothing is written, nobody is woken
        assert r.pull() == ([], False, None) and not r.arm()
        assert r.push(b"x" * 60) == -2 and r.free() == 0 and not r.writable(100)
        results.append((got, rings_state(r)))
    assert all(x == results[0] for x in results)
    got = results[0][0]
    assert got[0] == ([b"abc"] if name == "valid, then a lie" else [])
    assert got[2] in (None, error) or error in got[2]


@pytest.mark.parametrize("head", [M64 + 1 - 16, M64 + 1 - 8])
def test_counters_that_wrap_at_2_64_are_valid_in_both_twins(head: int, fence_fd: int) -> None:
    """head/tail are u64 counters: a ring used long enough wraps them, and that is no error."""
    pos = head % RING
    if pos == RING - 8:  # no room for a record before the end: a wrap marker, then offset 0
        records = [(pos, *W), (0, 5, 0, b"hello")]
        tail = head + 8 + 16
    else:
        records = [(pos, 5, 0, b"hello")]
        tail = head + 16
    outs = []
    for r in both_rings(hostile_mapping(rx_head=head, rx_tail=tail, tx_tail=head, records=records), fence_fd):
        assert r.corrupt is None
        assert r.pull() == ([b"hello"], False, None) and r.head == tail & M64 and r.corrupt is None
        # our own tail wraps too: a wrap marker at the end, the record at 0 (112 bytes)
        assert r.push(b"y" * 100) == 0 and r.tail == (head + (RING - pos) + 112) & M64
        outs.append((rings_state(r), r.free()))
    assert all(o == outs[0] for o in outs)


def test_a_pull_copies_out_at_most_a_batch(fence_fd: int) -> None:
    records = [(16 * i, 1, 0, bytes([i])) for i in range(100)]
    for r in both_rings(hostile_mapping(rx_tail=1600, records=records), fence_fd, batch=30):
        got = []
        for n in (30, 30, 30, 10, 0):
            frames, _, err = r.pull()
            assert len(frames) == n and err is None and r.steps == n
            got += frames
        assert got == [bytes([i]) for i in range(100)]


def test_bad_geometry_is_refused_by_both_twins(fence_fd: int) -> None:
    data = bytearray(HEADER_BYTES + 2 * RING)
    classes = [RingsRef] + ([shm_mod._CRings] if shm_mod._CRings is not None else [])
    for cls in classes:
        for args in [(RING + 8, 1, 0, -1, 1500), (RING, 1, 1, -1, 1500), (RING, 2, 0, -1, 1500),
                     (RING, 1, 0, -1, RING // 2), (RING * 2, 1, 0, -1, 1500)]:
            with pytest.raises(ValueError, match="shm rings"):
                cls(data, *args)
        r = cls(data, RING, 1, 0, fence_fd, 1500)
        for bad in (b"", b"x" * 1501):
            with pytest.raises(ValueError, match="a frame of"):
                r.push(bad)
        r.close()


# --- two processes ----------------------------------------------------------------------------


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def test_two_processes_with_devices_exchange_frames() -> None:
    """Device A (here) transmits over the cable; device B in a child process finds the frames
    in its RX ring and transmits them back; they arrive in A's RX ring."""
    before = shm_entries()
    a, b = ShmCable.create(1 << 16)
    fds = b.fds()
    frames = [make_frame(dst=PEER_BYTES, src=MAC_BYTES, payload=i.to_bytes(2, "big") * 20, size=60 + i,
                         fcs=False) for i in range(200)]
    child_got, echoes, ready = echo_through_child(
        a, "shm", {"arg": b.to_arg()}, frames, pass_fds=fds, before_start=b.release
    )
    assert ready["link"] is True
    assert [g[:-4] for g in child_got] == frames  # FCS appended by A's device, checked by B's
    assert [e[:-4] for e in echoes] == [f[6:12] + f[0:6] + f[12:] for f in frames]
    # the child exited: its copies are gone, so the hang-up socket says link down
    for _ in range(20):
        if select.select([a.fileno()], [], [], 1)[0]:
            a.recv_frames()
        if not a.link_up:
            break
    assert not a.link_up
    a.close()
    assert shm_entries() == before


CHILD_SPIN = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from nicemu.cable.shm import ShmCableEnd
    end = ShmCableEnd.from_arg(sys.argv[1])
    print("up", end.link_up, flush=True)
    while True:
        time.sleep(1)
    """
)


def test_kill_9_of_the_peer_process_is_link_down_and_leaks_nothing() -> None:
    before = shm_entries()
    a, b = ShmCable.create(1 << 16)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-c", CHILD_SPIN, b.to_arg(), root],
                            stdout=subprocess.PIPE, text=True, pass_fds=b.fds())
    try:
        b.release()
        assert proc.stdout.readline().strip() == "up True"
        assert a.link_up
        assert a.send(make_frame())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert select.select([a.fileno()], [], [], 10)[0], "no wakeup after the peer died"
        assert a.recv_frames() == []
        assert not a.link_up
        assert a.send(make_frame())  # dropped: nobody there
        assert a.tx_dropped == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        a.close()
    assert shm_entries() == before


def test_a_burst_rings_the_doorbell_once(cable) -> None:
    a, b = cable
    b.recv_frames()  # armed: b sleeps
    for i in range(10):
        a.send(make_frame(payload=bytes([i])))
    assert os.eventfd_read(b.fds().doorbell_in) == 1
    assert len(b.recv_frames()) == 10


CHILD_ECHO = textwrap.dedent(
    """
    import select, sys
    sys.path.insert(0, sys.argv[3])
    from nicemu.cable.shm import ShmCableEnd
    end = ShmCableEnd.from_arg(sys.argv[1], engine=sys.argv[2])
    pending = []
    while end.link_up:
        if not select.select([end.fileno()], [], [], 20)[0]:
            sys.exit("child: timeout, a wakeup was lost")
        pending += end.recv_frames()
        while pending and end.send(pending[0][::-1]):
            pending.pop(0)
    """
)


@pytest.mark.parametrize("engine", ENGINES)
def test_two_processes_stress_full_rings_and_wakeups(engine) -> None:
    """20000 frames each way through 64 KiB rings between two processes: the rings fill and
    drain thousands of times; a lost doorbell would stall (and time out)."""
    a0, b = ShmCable.create(1 << 16)
    a = ShmCableEnd.from_fds("a", *[os.dup(fd) for fd in a0.fds()], engine=engine)
    a0.release()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-c", CHILD_ECHO, b.to_arg(), engine, root], pass_fds=b.fds())
    b.release()
    rng = random.Random(3)
    frames = [rng.randbytes(rng.choice([60, 200, 1500])) for _ in range(20000)]
    back: list[bytes] = []
    i = 0
    try:
        while len(back) < len(frames):
            while i < len(frames) and a.send(frames[i]):
                i += 1
            assert select.select([a.fileno()], [], [], 20)[0], f"parent: stalled at {i} sent, {len(back)} back"
            back += a.recv_frames()
        assert back == [f[::-1] for f in frames]
    finally:
        a.close()  # link down: the child leaves its loop
        try:
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# --- the attack against a real emulator process -------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def _line(proc: subprocess.Popen, deadline: float) -> str:
    """One line of the child's stdout (unbuffered reads, so select stays truthful)."""
    fd = proc.stdout.fileno()
    line = b""
    while time.monotonic() < deadline:
        if select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            ch = os.read(fd, 1)
            if not ch:
                break
            if ch == b"\n":
                return line.decode()
            line += ch
    raise AssertionError(f"no line from the emulator (exit {proc.poll()}): {line!r}")


def test_an_emulator_attacked_through_its_shm_cable_stays_responsive(tmp_path: Path) -> None:
    """`nicemu serve --process nic1` with its end of a shm cable, as `nicemu up` starts it; this
    test is the hostile peer holding the other end. It publishes the 8-byte chained wrap marker
    and rings: the emulator spun forever and ignored SIGTERM. Now it declares the ring corrupt,
    takes the link down (we see its "present" word cleared), counts it in its SIGUSR1 stats,
    and exits on SIGTERM."""
    before = shm_entries()
    config = tmp_path / "topo.yaml"
    config.write_text(textwrap.dedent(f"""\
        runtime_dir: {tmp_path / 'rt'}
        devices:
          nic0: {{}}
          nic1: {{}}
        cables:
          - {{kind: shm, ends: [nic0, nic1], ring_bytes: 64KiB}}
        """))
    a, b = ShmCable.create(1 << 16)
    errfile = tempfile.TemporaryFile()  # not a pipe: nobody reads it while the emulator runs
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "NICEMU_CABLE_ENDS": json.dumps({"cable0.nic1": b.to_arg()})}
    proc = subprocess.Popen([sys.executable, "-m", "nicemu", "serve", "--config", str(config), "--process", "nic1"],
                            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=errfile, pass_fds=b.fds())
    b.release()
    mm, q, rings = peer_view(a)
    try:
        deadline = time.monotonic() + 30
        while _line(proc, deadline).strip() != "nicemu: ready":
            pass
        assert a.link_up
        # the attack: 8 bytes at offset 0 of the ring a -> b, published and rung
        struct.pack_into("<II", rings[0], 0, WRAP, 0)
        q[shm_mod._ring_words(0)[0]] = 8
        os.eventfd_write(a.fds().doorbell_out, 1)
        # the emulator clears its "present" word and rings us: link down on our side
        while a.link_up and time.monotonic() < deadline:
            select.select([a.fileno()], [], [], 0.5)
            a.recv_frames()
        assert not a.link_up, "the emulator did not declare the ring corrupt"
        proc.send_signal(signal.SIGUSR1)
        line = _line(proc, deadline)
        while not line.startswith("nicemu: stats "):
            line = _line(proc, deadline)
        nic1 = json.loads(line[len("nicemu: stats "):])["devices"]["nic1"]
        assert nic1["link"] is False and nic1["cable"]["kind"] == "shm" and nic1["cable"]["rx_errors"] == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        errfile.seek(0)
        err = errfile.read().decode()
        assert "ring corrupt: bad wrap marker at ring offset 0" in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        errfile.close()
        close_view(mm, q, rings)
        a.close()
    assert shm_entries() == before
