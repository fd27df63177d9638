"""The doorbell page (docs/transport.md, "The doorbell page"): negotiation both ways, frames
and counters with the page on, a hostile page, message ordering, kill -9 of either side, an
idle emulator that sleeps, and the compiled page operations against the Python reference."""
from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from driver.bus import BusError
from driver.pmd import Pmd
from driver.vfio_user_client import VfioUserBus
from nicemu import DmaMemory
from nicemu import regs as R
from nicemu.cable.pair import pipe
from nicemu.emulator import Emulator
from nicemu.nic import Nic
from nicemu.vfio_user import doorbell as db
from nicemu.vfio_user import protocol as p
from nicemu.vfio_user.protocol import Command

from test_vfio_user_server import Raw, wait_for

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
MAC = "52:54:00:12:34:56"
MAC0, MAC1 = "52:54:00:00:03:00", "52:54:00:00:03:01"
M0, M1 = bytes.fromhex(MAC0.replace(":", "")), bytes.fromhex(MAC1.replace(":", ""))
MEM = 1 << 20
_doorbell = pytest.importorskip("nicemu.vfio_user._doorbell", reason="build with: python setup.py build_ext --inplace")


# --- the page's memory operations: compiled == reference ------------------------------------------

def test_slot_words_pack_and_unpack() -> None:
    w = db.pack_slot(0x1_2345, 0x1_0007, 0x1_0000_0009)  # every field masked to its width
    assert db.unpack_slot(w) == (0x2345, 7, 9)
    assert w < 1 << 64


def test_compiled_page_agrees_with_the_reference() -> None:
    rng = random.Random(11)
    bufs = [mmap.mmap(-1, db.PAGE_SIZE), mmap.mmap(-1, db.PAGE_SIZE)]
    pages = [_doorbell.DoorbellPage(bufs[0]), db.DoorbellPageRef(bufs[1])]
    try:
        for _ in range(2000):
            op = rng.randrange(5)
            if op == 0:
                slot, word = rng.randrange(2), rng.getrandbits(64)
                results = [pg.client_write(slot, word) for pg in pages]
            elif op == 1:
                results = [pg.arm() for pg in pages]
            elif op == 2:
                results = [pg.disarm() for pg in pages]
            elif op == 3:
                slot = rng.choice((0, 1, db.WORD_NEED_WAKE, 511))
                results = [pg.load(slot) for pg in pages]
            else:
                results = [pg.need_wake() for pg in pages]
            assert results[0] == results[1]
            assert bufs[0][:] == bufs[1][:]
        for pg in pages:
            with pytest.raises(IndexError):
                pg.load(512)
    finally:
        for pg in pages:
            pg.release()
        for b in bufs:
            b.close()  # released: no export keeps the mapping


def test_a_released_page_refuses_use_and_a_short_buffer_is_refused() -> None:
    for cls in (_doorbell.DoorbellPage, db.DoorbellPageRef):
        with pytest.raises(ValueError):
            cls(bytearray(100))
        with pytest.raises(ValueError):
            cls(bytes(db.PAGE_SIZE))  # read-only
        buf = mmap.mmap(-1, db.PAGE_SIZE)
        pg = cls(buf)
        pg.release()
        with pytest.raises(ValueError):
            pg.load(0)
        buf.close()


# --- one device served in this process (the loop on a thread) -------------------------------------

def _serve(tmp_path, *, offer: bool = True, page_engine: str = "cython"):
    nic = Nic(DmaMemory(), mac=MAC, engine="python")
    emu = Emulator(doorbell_page=offer)
    path = str(tmp_path / "run" / "nic0.sock")
    server = emu.add_device("nic0", nic, path)
    server.page_engine = page_engine
    cable, far = pipe()
    emu.add_port(nic, cable)
    thread = threading.Thread(target=emu.run, name="emulator", daemon=True)
    thread.start()
    return SimpleNamespace(nic=nic, emu=emu, server=server, path=path, far=far, thread=thread)


def _stop(s) -> None:
    s.emu.stop()
    s.thread.join(5)
    assert not s.thread.is_alive()
    s.far.close()
    assert not os.path.exists(s.path)


@pytest.fixture(params=["cython", "python"])
def served(request, tmp_path):
    s = _serve(tmp_path, page_engine=request.param)
    yield s
    _stop(s)


@pytest.fixture
def unoffered(tmp_path):
    s = _serve(tmp_path, offer=False)
    yield s
    _stop(s)


def _version(raw: Raw, caps: dict) -> dict:
    hdr, body = raw.request(Command.VERSION, p.pack_version(0, 1, {"capabilities": caps}))
    assert hdr[3] == p.MsgType.REPLY
    return p.parse_version(body)[2]["capabilities"]


def _memfd_page(seals: int = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW, size: int = db.PAGE_SIZE):
    fd = os.memfd_create("test-doorbell", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd, mmap.mmap(fd, db.PAGE_SIZE)


def _enable(raw: Raw, fd: int, *, flags: int = db.FLAG_ENABLE, size: int = db.PAGE_SIZE, offset: int = 0):
    return raw.request(db.COMMAND, db.PAGE_REQUEST.pack(db.PAGE_REQUEST.size, flags, offset, size), fds=[fd])


def test_a_client_that_asks_gets_the_page(served) -> None:
    with VfioUserBus(served.path, MEM, doorbell_page=True) as bus:
        assert bus.doorbell_page
        assert bus.server_caps[db.CAPABILITY] == {"version": 1, "command": db.COMMAND, "size": db.PAGE_SIZE}
        wait_for(lambda: served.server._page is not None)
        bus.write32(R.TDT, 0)  # no ring yet: value 0 on a length-0 ring is not counted bad
        bus.write32(R.RDLEN, 8 * 16)
        bus.write32(R.RDT, 5)
        assert bus.read32(R.RDT) == 5  # a read flushes the page's tails too
        assert served.server.page_doorbells == 2 and served.server.page_bad == 0
        assert bus.page_doorbells + bus.page_wakeups == 2


def test_a_client_that_does_not_ask_sees_the_old_protocol(served) -> None:
    raw = Raw(served.path, negotiate=False)
    try:
        caps = _version(raw, {"max_msg_fds": 1})
        assert caps == p.server_capabilities()["capabilities"]  # exactly the old reply
        fd, mm = _memfd_page()
        raw.expect_error(errno.ENOSYS, db.COMMAND, db.PAGE_REQUEST.pack(24, 1, 0, db.PAGE_SIZE), fds=[fd])
        os.close(fd)
        mm.close()
        assert served.server._page is None
    finally:
        raw.close()
    with VfioUserBus(served.path, MEM) as bus:  # the default client does not ask
        assert not bus.doorbell_page and db.CAPABILITY not in bus.server_caps
        msgs = served.server.messages
        bus.write32(R.TDT, 0)
        bus.read32(R.STATUS)
        assert served.server.messages == msgs + 2  # the doorbell was a message
        assert served.server.page_doorbells == 0


def test_an_emulator_that_does_not_offer_keeps_the_old_protocol(unoffered) -> None:
    with VfioUserBus(unoffered.path, MEM, doorbell_page=True) as bus:
        assert not bus.doorbell_page and db.CAPABILITY not in bus.server_caps
        bus.write32(R.RDLEN, 8 * 16)
        bus.write32(R.RDT, 3)
        assert bus.read32(R.RDT) == 3
        assert unoffered.server.page_doorbells == 0
    raw = Raw(unoffered.path, negotiate=False)
    try:
        assert db.CAPABILITY not in _version(raw, {db.CAPABILITY: {"version": 1}})
        raw.expect_error(errno.ENOSYS, db.COMMAND, db.PAGE_REQUEST.pack(24, 0, 0, 0))
    finally:
        raw.close()


@pytest.mark.parametrize("case", ["unsealed", "no-fd", "two-fds", "size", "offset", "flags", "short", "argsz",
                                  "past-end"])
def test_bad_page_requests_are_refused(served, case) -> None:
    raw = Raw(served.path, negotiate=False)
    fds = []
    try:
        _version(raw, {db.CAPABILITY: {"version": 1}})
        fd, mm = _memfd_page(seals=0 if case == "unsealed" else fcntl.F_SEAL_SHRINK,
                             size=db.PAGE_SIZE if case != "past-end" else db.PAGE_SIZE)
        mm.close()
        fds = [fd]
        req = dict(argsz=db.PAGE_REQUEST.size, flags=db.FLAG_ENABLE, offset=0, size=db.PAGE_SIZE)
        send_fds = [fd]
        if case == "no-fd":
            send_fds = []
        elif case == "two-fds":
            send_fds = [fd, fd]
        elif case == "size":
            req["size"] = 8192
        elif case == "offset":
            req["offset"] = 8
        elif case == "flags":
            req["flags"] = 3
        elif case == "argsz":
            req["argsz"] = 8
        elif case == "past-end":
            req["offset"] = db.PAGE_SIZE
        payload = db.PAGE_REQUEST.pack(req["argsz"], req["flags"], req["offset"], req["size"])
        if case == "short":
            payload = payload[:20]
        raw.expect_error(errno.EINVAL, db.COMMAND, payload, fds=send_fds)
        assert served.server._page is None
        assert raw.read32(R.STATUS)  # still served
    finally:
        for fd in fds:
            os.close(fd)
        raw.close()


# --- a hostile page ---------------------------------------------------------------------------------

def _page_client(path: str):
    raw = Raw(path, negotiate=False)
    _version(raw, {db.CAPABILITY: {"version": 1}})
    fd, mm = _memfd_page()
    hdr, _ = _enable(raw, fd)
    os.close(fd)
    assert hdr[3] == p.MsgType.REPLY
    return raw, mm, db.DoorbellPageRef(mm)


def _ring(raw: Raw, page, slot: int, word: int) -> None:
    """A tail to the page, and the wake-up doorbell if the emulator sleeps (the client's rule)."""
    if page.client_write(slot, word):
        reg = R.TDT if slot == db.SLOT_TDT else R.RDT
        raw.send(Command.REGION_WRITE, p.REGION_ACCESS.pack(reg, 0, 4) + (word & 0xFFFF).to_bytes(4, "little"),
                 flags=p.Flags.NO_REPLY)


def test_garbage_tails_are_applied_as_register_writes_and_counted(served) -> None:
    raw, mm, page = _page_client(served.path)
    try:
        nic, server = served.nic, served.server
        raw.send(Command.REGION_WRITE, p.REGION_ACCESS.pack(R.TDLEN, 0, 4) + (8 * 16).to_bytes(4, "little"),
                 flags=p.Flags.NO_REPLY)
        raw.read32(R.STATUS)  # 3 messages so far (VERSION, page, TDLEN) + this read = 4 handled
        _ring(raw, page, db.SLOT_TDT, db.pack_slot(0xFFFF, 1, 0))  # far beyond the 8-descriptor ring
        wait_for(lambda: server.page_doorbells == 1)
        assert nic.regs[R.TDT >> 2] == 0xFFFF  # as a REGION_WRITE of 0xFFFF leaves it
        assert server.page_bad == 1 and nic.regs[R.TDH >> 2] == 0  # no work for the device
        _ring(raw, page, db.SLOT_TDT, db.pack_slot(3, 2, 0))
        wait_for(lambda: server.page_doorbells == 2)
        assert server.page_bad == 1 and nic.regs[R.TDT >> 2] == 3
        # the same word again is not a doorbell: nothing changed
        page.client_write(db.SLOT_TDT, db.pack_slot(3, 2, 0))
        assert raw.read32(R.TDT) == 3 and server.page_doorbells == 2
    finally:
        raw.close()
        page.release()
        mm.close()


def test_a_page_flipped_at_random_never_hangs_the_emulator(served) -> None:
    raw, mm, page = _page_client(served.path)
    stop = threading.Event()
    words = mm  # the raw bytes: torn, unaligned, anything

    def flip() -> None:
        rng = random.Random(3)
        while not stop.is_set():
            off = rng.randrange(0, 128)
            words[off : off + 8] = rng.getrandbits(64).to_bytes(8, "little")
            if rng.random() < 0.01:
                time.sleep(0)

    t = threading.Thread(target=flip, daemon=True)
    try:
        raw.send(Command.REGION_WRITE, p.REGION_ACCESS.pack(R.RDLEN, 0, 4) + (8 * 16).to_bytes(4, "little"),
                 flags=p.Flags.NO_REPLY)
        t.start()
        end = time.monotonic() + 1.0
        reads = 0
        while time.monotonic() < end:
            raw.read32(R.STATUS)  # answered in order, every time: the loop never hangs
            reads += 1
        assert reads > 10
        stop.set()
        t.join(5)
        server = served.server
        assert server.page_doorbells > 0 and server.page_bad > 0
        assert served.thread.is_alive()
        # seq games: the same word twice is one doorbell; a word whose `after` lies in the far
        # future waits for messages that never come, and costs nothing
        page.client_write(db.SLOT_RDT, db.pack_slot(2, 9, 0x7FFF0000))
        page.client_write(db.SLOT_TDT, db.pack_slot(1, 9, 0x7FFF0000))
        before = server.page_doorbells
        for _ in range(5):
            raw.read32(R.STATUS)
        assert server.page_doorbells == before
    finally:
        stop.set()
        raw.close()
        page.release()
        mm.close()


def test_a_tail_region_write_with_the_page_on_is_only_a_wake_up(served) -> None:
    """A late wake-up never moves a tail back: the page's newest value is what counts."""
    raw, mm, page = _page_client(served.path)
    try:
        raw.send(Command.REGION_WRITE, p.REGION_ACCESS.pack(R.RDLEN, 0, 4) + (64 * 16).to_bytes(4, "little"),
                 flags=p.Flags.NO_REPLY)
        page.client_write(db.SLOT_RDT, db.pack_slot(40, 1, 3))  # after VERSION, page, RDLEN
        raw.send(Command.REGION_WRITE, p.REGION_ACCESS.pack(R.RDT, 0, 4) + (10).to_bytes(4, "little"),
                 flags=p.Flags.NO_REPLY)  # an older value, arriving late
        assert raw.read32(R.RDT) == 40
        assert served.server.page_wakeups == 1
    finally:
        raw.close()
        page.release()
        mm.close()


def test_a_tail_lands_between_the_messages_it_was_written_between(served) -> None:
    raw, mm, page = _page_client(served.path)
    try:
        nic, server = served.nic, served.server
        raw.send(Command.REGION_WRITE, p.REGION_ACCESS.pack(R.RDLEN, 0, 4) + (64 * 16).to_bytes(4, "little"),
                 flags=p.Flags.NO_REPLY)
        raw.read32(R.STATUS)  # 4 messages handled
        # written "after 5 messages": the fifth has not been sent, so the value waits for it
        page.client_write(db.SLOT_RDT, db.pack_slot(7, 1, 5))
        time.sleep(0.05)
        assert nic.regs[R.RDT >> 2] == 0 and server.page_doorbells == 0
        raw.send(Command.REGION_WRITE, p.REGION_ACCESS.pack(R.RDH, 0, 4) + (0).to_bytes(4, "little"),
                 flags=p.Flags.NO_REPLY)  # message 5
        wait_for(lambda: server.page_doorbells == 1)
        assert nic.regs[R.RDT >> 2] == 7
        # written after the 5 messages sent so far: applied before the 6th, a read, sees it
        page.client_write(db.SLOT_RDT, db.pack_slot(9, 2, 5))
        assert raw.read32(R.RDT) == 9
    finally:
        raw.close()
        page.release()
        mm.close()


def test_the_emulator_sleeps_and_a_tail_write_wakes_it(served) -> None:
    with VfioUserBus(served.path, MEM, doorbell_page=True) as bus:
        bus.write32(R.RDLEN, 64 * 16)
        bus.read32(R.STATUS)
        server = served.server
        wait_for(lambda: server._page_sleeping)  # idle: NEED_WAKE set, no more polling
        assert bus.page.need_wake() == 1
        assert server.next_deadline() is None
        wakes = bus.page_wakeups
        bus.write32(R.RDT, 12)  # finds NEED_WAKE: sent as a REGION_WRITE too
        assert bus.page_wakeups == wakes + 1
        wait_for(lambda: served.nic.regs[R.RDT >> 2] == 12)
        assert server.page_sleeps >= 1


def test_disconnect_unmaps_the_page(served) -> None:
    bus = VfioUserBus(served.path, MEM, doorbell_page=True)
    wait_for(lambda: served.server._page is not None)
    bus.close()
    wait_for(lambda: not served.server.connected)
    assert served.server._page is None and served.server._page_mm is None


# --- across processes: frames, counters, kill -9, idle ------------------------------------------------

def _cpu_ns(pid: int) -> int:
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total


class PairProc:
    """`nicemu serve --pair` in its own process."""

    def __init__(self, *extra: str, env: dict | None = None) -> None:
        self.dir = tempfile.mkdtemp(prefix="nicemu-db-")
        self.socks = [os.path.join(self.dir, "s", f"nic{i}.sock") for i in (0, 1)]
        self.p = subprocess.Popen([sys.executable, "-m", "nicemu", "serve", "--socket", self.socks[0], "--mac", MAC0,
                                   "--socket", self.socks[1], "--mac", MAC1, "--pair", *extra],
                                  env={**ENV, **(env or {})}, cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        wait_for(lambda: os.path.exists(self.socks[1]) or self.p.poll() is not None, 20)
        assert self.p.poll() is None, self.p.stderr.read()

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.p.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def pair():
    shm = set(os.listdir("/dev/shm"))
    e = PairProc()
    yield e
    e.close()
    assert set(os.listdir("/dev/shm")) - shm == set()


def _frame(i: int, size: int) -> bytes:
    body = M1 + M0 + b"\x88\xb5" + i.to_bytes(4, "big")
    return body + bytes((i * 7 + k) & 0xFF for k in range(size - len(body)))


@pytest.mark.parametrize("page, engine", [(True, "cython"), (False, "cython"), (True, "python")],
                         ids=["page", "plain", "page-python-pmd"])
def test_frames_are_byte_exact_and_counters_exact_with_the_page(pair, page, engine) -> None:
    b0 = VfioUserBus(pair.socks[0], 8 << 20, doorbell_page=page)
    b1 = VfioUserBus(pair.socks[1], 8 << 20, doorbell_page=page)
    try:
        assert b0.doorbell_page is page and b1.doorbell_page is page
        gen = Pmd(b0, rx_count=256, tx_count=256, engine=engine)
        pmd = Pmd(b1, rx_count=256, tx_count=256, engine=engine)
        rng = random.Random(7)
        sent = [_frame(i, rng.randrange(60, 1515)) for i in range(3000)]
        got: list[bytes] = []
        end = time.monotonic() + 30
        k = 0
        while len(got) < len(sent) and time.monotonic() < end:
            n = min(64, len(sent) - k)
            if n and k + n - len(got) <= 128:  # frames in flight: well within what the receiving ring holds
                mbufs = [gen.alloc().set_data(f) for f in sent[k : k + n]]
                s = gen.tx_burst(mbufs)
                for m in mbufs[s:]:
                    m.free()
                k += s
            for m in pmd.rx_burst(64):
                got.append(bytes(m))
                m.free()
        assert got == sent
        pmd.stats_update()
        gen.stats_update()
        st, gs = pmd.stats(), gen.stats()
        assert (st.ipackets, st.ibytes, st.imissed, st.ierrors) == (3000, sum(map(len, sent)), 0, 0)
        assert gs.opackets == 3000
        x, gx = pmd.xstats(), gen.xstats()
        assert (x["hw_gprc"], x["hw_mpc"], gx["hw_gptc"]) == (3000, 0, 3000)  # the device's own counters
        if page:  # every tail write went to the page (and some also as wake-ups)
            assert x["page_doorbells"] + x["page_wakeups"] > x["rx_doorbells"]
            assert gx["page_doorbells"] + gx["page_wakeups"] > gx["tx_doorbells"]
        gen.close()
        pmd.close()
    finally:
        b0.close()
        b1.close()


def test_the_emulator_idles_at_no_cost_with_and_without_the_page(pair) -> None:
    b0 = VfioUserBus(pair.socks[0], 4 << 20, doorbell_page=True)
    b1 = VfioUserBus(pair.socks[1], 4 << 20)
    try:
        gen, pmd = Pmd(b0, rx_count=128, tx_count=128), Pmd(b1, rx_count=128, tx_count=128)
        for i in range(50):
            assert gen.send(_frame(i, 60))
        wait_for(lambda: len(pmd.rx_burst(64)) > 0)
        time.sleep(0.2)  # past the polling window
        c0 = _cpu_ns(pair.p.pid)
        time.sleep(1.0)
        used = _cpu_ns(pair.p.pid) - c0
        assert used < 50_000_000, f"the idle emulator used {used / 1e6:.1f} ms of CPU in a second"
        assert b0.page.need_wake() == 1  # asleep, waiting for a doorbell message
        assert gen.send(_frame(99, 60))  # the doorbell wakes it
        wait_for(lambda: len(pmd.rx_burst(64)) > 0)
        gen.close()
        pmd.close()
    finally:
        b0.close()
        b1.close()


def _pmd_proc(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "driver.pmd", *args], env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _wait_line(proc: subprocess.Popen, word: str, timeout: float = 20) -> str:
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            if sel.select(0.2):
                line = proc.stdout.readline()
                if not line:
                    break
                if f'"{word}"' in line:
                    return line
    finally:
        sel.close()
    raise AssertionError(f"no {word!r} line")


def _reap(*procs: subprocess.Popen) -> None:
    for pr in procs:
        if pr.poll() is None:
            pr.kill()
        pr.wait()
        if pr.stdout:
            pr.stdout.close()


@pytest.mark.parametrize("threads", [False, True], ids=["loop", "engine-threads"])
@pytest.mark.parametrize("victim", ["driver", "emulator"])
def test_kill9_mid_stream_with_the_page_leaves_nothing(victim, threads) -> None:
    """A generator streams through the page (two busy processes: it and the emulator; nic1 has
    no driver, so its frames are dropped), then one side is killed with SIGKILL; with the
    emulator's loop polling the page, and with an engine thread per device (`--engine-threads`)."""
    shm = set(os.listdir("/dev/shm"))
    e = PairProc(*(["--engine-threads"] if threads else []))
    gen = None
    try:
        gen = _pmd_proc("--socket", e.socks[0], "--app", "gen", "--dst", MAC1, "--count", "0",
                        "--mode", "poll", "--stats-interval", "0.2")
        _wait_line(gen, "up")
        if threads:
            assert len(os.listdir(f"/proc/{e.p.pid}/task")) >= 3  # the loop and one engine thread per device
        wait_for(lambda: (lambda d: d["opackets"] > 1000 and d["page_doorbells"] > 0)(
            json.loads(_wait_line(gen, "stats"))), 20)
        if victim == "driver":
            gen.send_signal(signal.SIGKILL)
            gen.wait(10)
            # the emulator reset the device and takes a new client at once
            with VfioUserBus(e.socks[0], 1 << 20, doorbell_page=True) as bus:
                assert bus.doorbell_page and bus.read32(R.TDT) == 0
            assert e.p.poll() is None
        else:
            e.p.send_signal(signal.SIGKILL)
            e.p.wait(10)
            assert gen.wait(10) == 1  # the generator notices and exits with an error
    finally:
        if gen is not None:
            _reap(gen)
        e.close()
    assert set(os.listdir("/dev/shm")) - shm == set()
    assert e.p.poll() is not None and (gen is None or gen.poll() is not None)


# --- the plain protocol's doorbell runs: the compiled scan against the reference ---------------------

def test_compiled_tail_run_scan_agrees_with_the_reference() -> None:
    rng = random.Random(5)
    for _ in range(300):
        msgs = []
        for i in range(rng.randrange(1, 40)):
            offset = rng.choice((R.TDT, R.TDT, R.TDT, R.RDT, R.TCTL))
            flags = p.Flags.NO_REPLY if rng.random() < 0.95 else 0
            count = 4 if rng.random() < 0.97 else 8
            msgs.append(struct.pack("=HHIIIQIII", rng.getrandbits(16), Command.REGION_WRITE, 36, flags, 0,
                                    offset, 0, count, rng.getrandbits(32)))
        buf = bytearray(b"".join(msgs) + bytes(rng.randrange(0, 40)))
        for _ in range(5):
            start = 36 * rng.randrange(len(msgs))
            end = rng.randrange(start + 36, len(buf) + 1)
            assert _doorbell.scan_tail_run(buf, start, end) == db.scan_tail_run_ref(buf, start, end)
    with pytest.raises(ValueError):
        _doorbell.scan_tail_run(bytearray(40), 8, 40)  # no whole message at start


def test_the_server_takes_tail_runs_through_the_compiled_scan() -> None:
    import nicemu.vfio_user.server as server_module

    assert server_module._scan_tail_run is _doorbell.scan_tail_run
