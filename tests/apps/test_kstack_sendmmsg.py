"""SENDMMSG (sendmmsg(2) across the syscall channel) and recvmmsg in kstack.socket: results,
counting (one syscall per batch, every byte copied), limits, and hostile records from an
application refused and counted while the kernel goes on."""
from __future__ import annotations

import errno
import os
import random
import time

import pytest

from kstack.syscall.channel import F_ASYNC, MAX_MMSG, Op, mmsg_entry, pack_mmsg, unpack_mmsg
from kstack.syscall.client import KernelChannel
from kstack_loopsock import ServerThread


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "kernel.sock")


@pytest.fixture
def kernel(path):
    st = ServerThread(path, max_apps=4, max_fds_per_app=8, max_inflight=8, ring_bytes=1 << 18)
    yield st
    st.close()


def _wait(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if cond():
                return True
        except RuntimeError:
            pass
        time.sleep(0.01)
    return False


def _udp(ch: KernelChannel, port: int | None = None) -> int:
    fd = ch.call(Op.SOCKET, -1, 2, 2, 17).result
    assert fd >= 3
    if port is not None:
        assert ch.call(Op.BIND, fd, addr=("198.18.0.1", port)).result == 0
    return fd


# --- the payload format and its compiled twin ---------------------------------------------------

def test_pack_and_unpack_round_trip():
    dgs = [b"", b"a", b"xy" * 300, bytes(range(256))]
    p = pack_mmsg(dgs)
    assert [bytes(v) for v in unpack_mmsg(p, len(dgs))] == dgs
    assert [bytes(mmsg_entry(p, len(dgs), k)) for k in range(len(dgs))] == dgs


def _outcome(fn, *a):
    try:
        r = fn(*a)
    except (ValueError, IndexError) as e:
        return type(e)
    return [bytes(v) for v in r] if isinstance(r, list) else bytes(r) if isinstance(r, memoryview) else r


def test_compiled_checks_agree_with_the_python_twin():
    c = pytest.importorskip("kstack._txfast")
    rng = random.Random(8)
    for _ in range(3000):
        n = rng.randint(0, 6)
        dgs = [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 9))) for _ in range(n)]
        p = bytearray(pack_mmsg(dgs))
        if p and rng.random() < 0.5:  # a lie: a length, a cut, or bytes after the last entry
            what = rng.randint(0, 2)
            if what == 0:
                p[rng.randrange(len(p))] = rng.getrandbits(8)
            elif what == 1:
                del p[rng.randrange(len(p)):]
            else:
                p += b"\x00" * rng.randint(1, 3)
        p = bytes(p)
        count = n if rng.random() < 0.8 else rng.randint(-1, MAX_MMSG + 1)
        py = _outcome(unpack_mmsg, p, count)
        assert (py is ValueError) == (_outcome(c.mmsg_check, p, count) is ValueError), (p, count)
        if py is not ValueError:
            for k in range(-1, count + 1):
                assert _outcome(c.mmsg_entry, p, count, k) == _outcome(mmsg_entry, p, count, k)


# --- through the server ----------------------------------------------------------------------------

def test_sendmmsg_sync_and_async_deliver_in_order_as_one_call_each(kernel, path):
    ch = KernelChannel(path)
    rx = _udp(ch, 4100)
    tx = _udp(ch, 4101)
    dgs = [i.to_bytes(2, "big") * 5 for i in range(40)]
    c = ch.call(Op.SENDMMSG, tx, 0, 40, -1, pack_mmsg(dgs), ("198.18.0.1", 4100))
    assert c.result == 40
    for k in range(0, 200, 50):  # async: no completion at all when every datagram went
        ch.submit_async(Op.SENDMMSG, tx, 0, 50, -1, pack_mmsg([b"%04d" % i for i in range(k, k + 50)]),
                        ("198.18.0.1", 4100))
    assert ch.call(Op.GETSOCKNAME, tx).result == 0  # after the batches, in order
    q = kernel.net.ports[4100].queue
    assert [d for d, _ in q] == dgs + [b"%04d" % i for i in range(200)]
    st = kernel.server.stats()
    assert st["syscalls"]["sendmmsg"] == 5  # a batch is one syscall, as sendmmsg counts
    assert st["bytes_copied_in"] >= sum(map(len, dgs)) + 200 * 4
    assert not ch.errors
    ch.close()


def test_sendmmsg_stops_at_the_first_error(kernel, path):
    ch = KernelChannel(path)
    _udp(ch, 4102)
    tx = _udp(ch, 4103)
    ok = ("198.18.0.1", 4102)
    # synchronous: the first fails -> that error; the record's address is every datagram's
    assert ch.call(Op.SENDMMSG, tx, 0, 3, -1, pack_mmsg([b"a"] * 3), ("198.19.255.1", 9)).result \
        == -errno.ENETUNREACH
    # a datagram too large for UDP in the middle: the ones before it went, the count says so
    big = pack_mmsg([b"1", b"2", b"x" * 65508, b"4"])
    assert ch.call(Op.SENDMMSG, tx, 0, 4, -1, big, ok).result == 2
    # async: the error is the socket's pending error, the rest of the batch is dropped, counted
    ch.submit_async(Op.SENDMMSG, tx, 0, 4, -1, big, ok)
    assert ch.call(Op.GETSOCKNAME, tx).result == 0
    assert ch.errors == {tx: errno.EMSGSIZE}
    st = kernel.server.stats()
    assert st["counters"]["mmsg_dropped"] == 1 and st["counters"]["async_errors"] == 1
    assert [d for d, _ in kernel.net.ports[4102].queue] == [b"1", b"2", b"1", b"2"]
    ch.close()


@pytest.mark.parametrize("count,payload", [
    (0, b""),  # no datagram
    (MAX_MMSG + 1, pack_mmsg([b""] * (MAX_MMSG + 1))),  # over the bound
    (3, pack_mmsg([b"a", b"b"])),  # fewer entries than it says
    (2, pack_mmsg([b"a", b"b"]) + b"\x00"),  # bytes after the last entry
    (1, b"\xff\xff" + b"a" * 10),  # a length that lies
    (1, b"\x05"),  # half a header
    (-1, pack_mmsg([b"a"])),  # a negative count
    (1 << 40, pack_mmsg([b"a"])),  # a huge one
])
def test_malformed_batches_are_refused_and_counted(kernel, path, count, payload):
    ch = KernelChannel(path)
    rx = _udp(ch, 4104)
    tx = _udp(ch, 4105)
    dst = ("198.18.0.1", 4104)
    assert ch.call(Op.SENDMMSG, tx, 0, count, -1, payload, dst).result == -errno.EINVAL
    ch.submit_async(Op.SENDMMSG, tx, 0, count, -1, payload, dst)
    assert ch.call(Op.GETSOCKNAME, tx).result == 0
    assert ch.errors == {tx: errno.EINVAL}
    assert not kernel.net.ports[4104].queue  # nothing of a malformed batch was sent
    assert kernel.server.stats()["counters"]["mmsg_malformed"] == 2
    ch.errors.clear()
    assert ch.call(Op.SENDMMSG, tx, 0, 1, -1, pack_mmsg([b"ok"]), dst).result == 1  # still served
    assert ch.call(Op.SENDMMSG, 77, 0, 1, -1, pack_mmsg([b"ok"]), dst).result == -errno.EBADF
    assert ch.call(Op.SENDMMSG, rx, 0x80, 1, -1, pack_mmsg([b"ok"]), dst).result == 1  # flags: sendmsg's
    ch.close()


def test_garbage_batches_never_crash_or_hang_the_kernel(kernel, path):
    rng = random.Random(5)
    ch = KernelChannel(path)
    _udp(ch, 4106)
    tx = _udp(ch, 4107)
    for _ in range(300):
        payload = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
        count = rng.choice([rng.randint(-3, 40), rng.getrandbits(31)])
        fd = rng.choice([tx, tx, 99])
        if rng.random() < 0.5:
            ch.submit_async(Op.SENDMMSG, fd, rng.getrandbits(8), count, -1, payload, ("198.18.0.1", 4106))
        else:
            ch.call(Op.SENDMMSG, fd, 0, count, 0, payload, ("198.18.0.1", 4106))
    assert ch.call(Op.GETSOCKNAME, tx).result == 0
    st = kernel.server.stats()
    assert st["apps"] == 1 and st["counters"].get("corrupt", 0) == 0
    assert st["syscalls"]["sendmmsg"] == 300
    ch.close()


def test_a_batch_takes_its_datagrams_from_the_servers_budget(path):
    st = ServerThread(path, max_inflight=8, budget=64)
    try:
        ch = KernelChannel(path)
        _udp(ch, 4108)
        tx = _udp(ch, 4109)
        from kstack.syscall.ring import ip_to_int
        for i in range(4):  # all four in the ring before the kernel looks: one wake-up
            assert ch.sq.push(Op.SENDMMSG, 900 + i, tx, 0, 60, -1, pack_mmsg([b"b"] * 60),
                              (ip_to_int("198.18.0.1"), 4108), F_ASYNC)
        ch.sq.publish()
        os.eventfd_write(ch.sq_efd, 1)
        assert ch.call(Op.GETSOCKNAME, tx).result == 0
        assert len(st.net.ports[4108].queue) == 240
        assert st.server.stats()["counters"]["budget_yields"] >= 2  # about one per batch
        ch.close()
    finally:
        st.close()


# --- kstack.socket ------------------------------------------------------------------------------

def test_socket_sendmmsg_and_recvmmsg(kernel, path):
    from kstack import socket as ks
    ch = KernelChannel(path)
    r = ks.socket(ks.AF_INET, ks.SOCK_DGRAM, channel=ch)
    r.bind(("198.18.0.1", 4110))
    s = ks.socket(ks.AF_INET, ks.SOCK_DGRAM, channel=ch)
    s.connect(("198.18.0.1", 4110))
    dgs = [b"%05d" % i for i in range(3000)]
    assert s.sendmmsg(dgs[:1]) == 1
    assert s.sendmmsg(dgs[1:]) == 2999  # split into calls of at most MAX_MMSG
    got = []
    r.settimeout(5)
    while len(got) < 3000:
        batch = r.recvmmsg(64, 3)
        assert 1 <= len(batch) <= 64
        got += [d for d, a in batch]
        assert all(a == ("198.18.0.1", s.getsockname()[1]) for _, a in batch)
    assert got == [d[:3] for d in dgs]  # in order, each truncated to bufsize as recv does
    k = kernel.server.stats()["syscalls"]
    assert 3 <= k["sendmmsg"] <= 5
    r.setblocking(False)
    with pytest.raises(BlockingIOError):
        r.recvmmsg(8)
    # a synchronous sendmmsg (sends with flags other than MSG_DONTWAIT are synchronous)
    s.async_send = False
    assert s.sendmmsg([b"a", b"b"], 0, ("198.18.0.1", 4110)) == 2
    r.setblocking(True)
    assert [d for d, _ in r.recvmmsg(8)] in ([b"a", b"b"], [b"a"])
    with pytest.raises(OSError) as e:
        s.sendmmsg([b"x" * 65508])
    assert e.value.errno == errno.EMSGSIZE
    assert s.sendmmsg([]) == 0
    for x in (r, s):
        x.close()
    ch.close()
