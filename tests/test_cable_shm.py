"""The shared-memory cable: ring protocol (order, wrap, full/space doorbells, malformed input),
the C and Python copy loops agreeing, link state (close, kill -9 of the peer), and two real
processes with a device each exchanging frames."""
from __future__ import annotations

import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import textwrap

import pytest
from cable_child import echo_through_child
from conftest import MAC_BYTES, PEER_MAC, make_frame

from nicemu.cable import make_cable
from nicemu.cable import shm as shm_mod
from nicemu.cable.base import CableError
from nicemu.cable.shm import HEADER_BYTES, ShmCable, ShmCableEnd

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
    fds = [os.memfd_create("x"), os.eventfd(0), os.eventfd(0)]
    os.ftruncate(fds[0], HEADER_BYTES + 2 * (1 << 16))
    s1, s2 = socket.socketpair()
    with pytest.raises(CableError, match="not a nicemu shm cable"):
        ShmCableEnd.from_fds("a", fds[0], fds[1], fds[2], s1.detach())
    s2.close()
    # all four descriptors were taken and closed
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_malformed_records_from_the_peer_are_counted_and_skipped(cable) -> None:
    a, b = cable
    import mmap

    mm = mmap.mmap(a.fds().memfd, HEADER_BYTES + 2 * (1 << 16))
    ring_a = memoryview(mm)[HEADER_BYTES : HEADER_BYTES + (1 << 16)]  # a -> b
    a.send(make_frame(payload=b"ok1"))
    # the peer scribbles a bad length over the next record it publishes
    a.send(make_frame(payload=b"bad"))
    struct.pack_into("<I", ring_a, 8 + 64, 0x7FFFFFF0)
    got = b.recv_frames()
    assert got == [make_frame(payload=b"ok1")]
    assert b.rx_errors == 1 and "bad record length" in b.last_error
    a.send(make_frame(payload=b"ok2"))
    assert b.recv_frames() == [make_frame(payload=b"ok2")]
    # a tail that is not a valid distance from head
    tail_word = shm_mod._ring_words(0)[0]
    q = memoryview(mm)[:HEADER_BYTES].cast("Q")
    q[tail_word] += 3
    assert b.recv_frames() == [] and b.rx_errors == 2 and "not a valid distance" in b.last_error
    q.release()
    ring_a.release()
    mm.close()


def random_ring(rng: random.Random, ring: int):
    """A mapping with ring 0 filled with records from a random head, maybe damaged."""
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
    damaged = rng.random() < 0.25 and tail != head
    if damaged:
        if rng.random() < 0.5:
            struct.pack_into("<I", rd, head & (ring - 1), rng.choice([0, 70000, 0xFFFFFFF0]))
        else:
            tail += rng.choice([3, ring + 8])
    q = mv[:HEADER_BYTES].cast("Q")
    t, h, _, _ = shm_mod._ring_words(0)
    q[t], q[h] = tail, head
    q.release()
    rd.release()
    mv.release()
    return data, frames, tail, damaged


def test_c_and_python_rings_agree() -> None:
    """Random and damaged rings: both consumers return the same frames, head and error; both
    producers write byte-identical rings."""
    if shm_mod._CRings is None:
        pytest.skip("nicemu/cable/_shmring is not built (cythonize -i -3 nicemu/cable/_shmring.pyx)")
    from nicemu.cable.shm import RingsRef

    rng = random.Random(11)
    ring = 1 << 16
    fence_fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        for trial in range(300):
            data, frames, tail, damaged = random_ring(rng, ring)
            d1, d2 = bytearray(data), bytearray(data)
            ref = RingsRef(d1, ring, 1, 0, fence_fd)
            fast = shm_mod._CRings(d2, ring, 1, 0)
            r1, r2 = ref.pull(), fast.pull()
            assert r1 == r2
            if not damaged:
                assert r1 == (frames, False, None)
            # now produce into ring 1 from both and compare the bytes
            for f in frames[:10] + [rng.randbytes(rng.randrange(1, 3000)) for _ in range(5)]:
                assert ref.push(f) == fast.push(f)
            assert ref.free() == fast.free()
            ref.close()
            fast.close()
            assert d1 == d2
    finally:
        os.close(fence_fd)


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
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
