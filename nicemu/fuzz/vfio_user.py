"""Fuzz target "vfio_user": mutated messages to the vfio-user server of a real emulator process.

One `nicemu serve` process with two devices is started per run. Device nic0 takes the cases;
a client on nic1 stays connected all along and must keep answering (one device's client must
never disturb another). Each iteration is one case drawn from ``random.Random(seed)``:

- valid messages of every command, and the same with bits flipped, cut short, or with a size
  field that lies (smaller, larger, below 16, above the limit);
- every command number with random payloads and flags; region accesses at the edges (offsets
  such as 0x1FFFD and 2**64 - 4, counts that straddle the end, size-0 regions);
- fds attached at random (sealed and unsealed memfds, memfds sealed against writing, pipes,
  eventfds, /dev/null), also more than max_msg_fds, also trickled over the pieces of one
  message; DMA_MAP/UNMAP with fds of every kind and random addresses, sizes and offsets;
- several messages split into random pieces; VERSION with capabilities nested deep, too long,
  not UTF-8, not an object; commands before VERSION; a second client; oversized messages.

Every message that arrives in sync is checked against a restatement here of what the server
must answer (`Oracle`: docs/transport.md's rules): which errnos may come back (or success,
with the reply's exact size), and whether the connection must be dropped (a size below 16,
more than max_msg_fds for one message). When a case leaves the stream out of step on purpose
(a cut or a lying size), the client hangs up and the server must clean up.

After every case the emulator's fd count must stay under a bound; every CHECK_EVERY cases, on
a fresh connection: VERSION and a REGION_READ are answered, the fds are exactly the baseline
(nothing the previous clients sent is left open), no driver memory is still mapped, RSS has not
grown past a bound, and nic1 answers. At the end SIGTERM must stop the emulator (exit 0) with
no traceback and a bounded log.

    python -m nicemu.fuzz --target vfio_user --seed 7 --iterations 5000
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from nicemu.fuzz import FuzzFailure, FuzzReport
from nicemu.vfio_user import protocol as p
from nicemu.vfio_user.protocol import Command

CHECK_EVERY = 10  # cases between two checks on a fresh connection
REPLY_TIMEOUT = 10.0  # s: a reply that takes longer means the server stopped answering
START_TIMEOUT = 60.0  # s for the emulator to say "nicemu: ready"
MAX_RSS_GROWTH = 96 << 20  # bytes of RSS the emulator may gain over the run (checked between clients)
MAX_LOG = 2 << 20  # bytes of stderr for a whole run: warnings a client causes are rate-limited
PAGE = os.sysconf("SC_PAGE_SIZE")
BAR0_SIZE = 0x20000
CONFIG_SIZE = 256
REGION_SIZES = {p.BAR0_REGION: BAR0_SIZE, p.CONFIG_REGION: CONFIG_SIZE}
FD_COMMANDS = {Command.DMA_MAP, Command.DEVICE_SET_IRQS}
PROBE_ID = 0xFFFF  # the sync probe's message id (cases use 1..0xFFFE)
MACS = ("52:54:00:f0:00:01", "52:54:00:f0:00:02")
STATUS = 0x0008
TIPG = 0x0410

# kind of case -> weight
KINDS = {
    "valid": 14, "bitflip": 14, "truncate": 5, "length_lie": 8, "command": 10, "region": 15,
    "fds": 12, "split": 10, "version": 5, "dma": 8, "trickle": 2, "oversized": 2,
    "before_version": 3, "second_client": 2,
}


class _Eof(Exception):
    """The server closed the connection."""


# --- fds a hostile client can send ---------------------------------------------------------------

@dataclass
class FdInfo:
    """What the server can tell about an fd it receives."""

    kind: str
    size: int = 0  # a memfd's length
    shrink_sealed: bool = False  # F_SEAL_SHRINK: DmaMemory.map_fd requires it
    write_sealed: bool = False  # F_SEAL_WRITE: a writable shared mapping of it fails


FD_KINDS = ("memfd_sealed", "memfd_sealed", "memfd_sealed", "memfd_write_sealed", "memfd_unsealed",
            "pipe", "eventfd", "devnull")
MEMFD_SIZES = (PAGE, 2 * PAGE, 16 * PAGE, 1 << 20, 3000, 4 << 20)


def make_fd(rng: random.Random, kind: str | None = None) -> tuple[int, FdInfo]:
    """A new fd of a random (or the given) kind; the caller closes it after sending."""
    kind = kind or rng.choice(FD_KINDS)
    if kind.startswith("memfd"):
        size = rng.choice(MEMFD_SIZES)
        fd = os.memfd_create("nicemu-fuzz", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        info = FdInfo(kind, size)
        if kind == "memfd_sealed":
            seals = fcntl.F_SEAL_SHRINK | rng.choice((0, fcntl.F_SEAL_GROW, fcntl.F_SEAL_SEAL))
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            info.shrink_sealed = True
        elif kind == "memfd_write_sealed":
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_WRITE)
            info.shrink_sealed = info.write_sealed = True
        return fd, info
    if kind == "pipe":
        r, w = os.pipe2(os.O_CLOEXEC)
        os.close(w)
        return r, FdInfo(kind)
    if kind == "eventfd":
        return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK), FdInfo(kind)
    return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), FdInfo("devnull")


# --- the client side -----------------------------------------------------------------------------

class Client:
    """One connection: sends block (SO_SNDTIMEO bounds them), a thread collects whatever the
    server sends, so a server that writes while we write can never deadlock the two."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(REPLY_TIMEOUT), 0))
        self.sock.connect(path)
        self._buf = bytearray()
        self._eof = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._reader, name="fuzz-reader", daemon=True)
        self._thread.start()
        self.next_id = 1
        self.negotiated = False
        self.regions: list[tuple[int, int]] = []  # (bus address, size) the server has mapped for us

    def _reader(self) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                data = b""
            with self._cv:
                if not data:
                    self._eof = True
                    self._cv.notify_all()
                    return
                self._buf += data
                self._cv.notify_all()

    def new_id(self) -> int:
        msg_id = self.next_id
        self.next_id = msg_id % 0xFFFE + 1
        return msg_id

    def send(self, data: bytes, fds: list[int] = ()) -> None:
        """All of `data`; `fds` ride on its first byte's sendmsg (keep such pieces small, so
        the kernel sends them as one buffer and the fds stay with the piece's last byte)."""
        view = memoryview(data)
        if fds:
            for _ in range(5000):
                try:
                    n = socket.send_fds(self.sock, [view], list(fds))
                    break
                except OSError as e:  # our fds in flight exceed RLIMIT_NOFILE: let it catch up
                    if e.errno != errno.ETOOMANYREFS:
                        raise
                    time.sleep(0.001)
            else:
                raise TimeoutError("the server does not take the fds in flight")
            view = view[n:]
        if len(view):
            self.sock.sendall(view)

    def reply(self, timeout: float = REPLY_TIMEOUT) -> tuple[tuple, bytes]:
        """The next whole message from the server: (header fields, payload)."""
        end = time.monotonic() + timeout
        with self._cv:
            while True:
                if len(self._buf) >= p.HEADER_SIZE:
                    hdr = p.HEADER.unpack_from(self._buf)
                    if hdr[2] < p.HEADER_SIZE:
                        raise AssertionError(f"the server sent a header of size {hdr[2]}")
                    if len(self._buf) >= hdr[2]:
                        body = bytes(self._buf[p.HEADER_SIZE : hdr[2]])
                        del self._buf[: hdr[2]]
                        return hdr, body
                if self._eof:
                    raise _Eof(f"{len(self._buf)} bytes of a partial reply" if self._buf else "EOF")
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no reply in {timeout} s")
                self._cv.wait(left)

    def until_eof(self, timeout: float = REPLY_TIMEOUT) -> list[tuple[tuple, bytes]]:
        """Every reply the server sends before it closes the connection (it must close it)."""
        out = []
        while True:
            try:
                out.append(self.reply(timeout))
            except _Eof:
                return out

    def request(self, data: bytes) -> tuple[tuple, bytes]:
        self.send(data)
        return self.reply()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(REPLY_TIMEOUT)


# --- what the server must answer ----------------------------------------------------------------

def access_ok(region: int, offset: int, count: int) -> bool:
    """docs/transport.md, "Region accesses"."""
    size = REGION_SIZES.get(region, 0)
    if size == 0 or count == 0 or offset >= size or count > size - offset:
        return False
    if region == p.BAR0_REGION:
        return count % 4 == 0
    return count in (1, 2, 4) or (offset % 4 == 0 and count % 4 == 0)


@dataclass
class Expect:
    """What one message sent in sync must get: `errnos` (0 = success) when a reply is due."""

    msg_id: int
    command: int
    errnos: frozenset[int]
    reply: bool
    reply_size: int | None = None  # payload bytes of a successful reply, when fixed
    on_success: Callable[[], None] | None = None  # the model's update (a mapping added or gone)


def _one(err: int) -> frozenset[int]:
    return frozenset((err,))


class Oracle:
    """The server's rules, restated from docs/transport.md, over the client's model (negotiated
    or not, the DMA mappings). `expect()` gives the answers that a message may get."""

    def __init__(self, client: Client) -> None:
        self.c = client

    def expect(self, msg: bytes, fds: list[FdInfo]) -> Expect:
        msg_id, cmd, size, flags, _ = p.HEADER.unpack_from(msg)
        payload = msg[p.HEADER_SIZE :]
        reply = not flags & p.FLAG_NO_REPLY
        if size > p.MAX_MSG_SIZE:
            return Expect(msg_id, cmd, _one(errno.E2BIG), reply)
        if flags & p.TYPE_MASK:
            return Expect(msg_id, cmd, _one(errno.EINVAL), reply)
        if cmd not in p.COMMANDS:
            return Expect(msg_id, cmd, _one(errno.ENOSYS), reply)
        if not self.c.negotiated and cmd != Command.VERSION:
            return Expect(msg_id, cmd, _one(errno.EINVAL), reply)
        if fds and cmd not in FD_COMMANDS:
            return Expect(msg_id, cmd, _one(errno.EINVAL), reply)
        errs, size_ok, update = getattr(self, f"_{Command(cmd).name.lower()}")(payload, fds)
        return Expect(msg_id, cmd, frozenset(errs) if errs else _one(0), reply, size_ok, update)

    # each: (errnos any of which may come back, or none: success; reply payload size; update)

    def _version(self, payload: bytes, fds: list[FdInfo]) -> tuple:
        try:
            major, _minor, _caps = p.parse_version(payload)
        except p.ProtocolError as e:
            return {e.errno}, None, None
        if major != p.VERSION_MAJOR:
            return {errno.ENOTSUP}, None, None
        return set(), None, self._negotiate

    def _negotiate(self) -> None:
        self.c.negotiated = True

    def _dma_map(self, payload: bytes, fds: list[FdInfo]) -> tuple:
        if len(payload) != p.DMA_MAP.size:
            return {errno.EINVAL}, None, None
        argsz, flags, offset, addr, size = p.DMA_MAP.unpack(payload)
        errs = set()
        if argsz < p.DMA_MAP.size or len(fds) != 1:
            errs.add(errno.EINVAL)
        if flags & 3 != 3:
            errs.add(errno.ENOTSUP)
        if len(self.c.regions) >= 64:
            errs.add(errno.ENOSPC)
        if errs:
            return errs, None, None
        info = fds[0]
        overlap = any(addr < a + n and a < addr + size for a, n in self.c.regions)
        if (size == 0 or addr + size > 1 << 64 or overlap or not info.shrink_sealed or info.write_sealed
                or offset % PAGE or offset + size > info.size):
            return {errno.EINVAL}, None, None
        return set(), 0, lambda: self.c.regions.append((addr, size))

    def _dma_unmap(self, payload: bytes, fds: list[FdInfo]) -> tuple:
        if len(payload) != p.DMA_UNMAP.size:
            return {errno.EINVAL}, None, None
        argsz, flags, addr, size = p.DMA_UNMAP.unpack(payload)
        if argsz < p.DMA_UNMAP.size or flags or (addr, size) not in self.c.regions:
            return {errno.EINVAL}, None, None
        return set(), p.DMA_UNMAP.size, lambda: self.c.regions.remove((addr, size))

    def _device_get_info(self, payload: bytes, fds: list[FdInfo]) -> tuple:
        ok = len(payload) == p.DEVICE_INFO.size and p.DEVICE_INFO.unpack(payload)[0] >= p.DEVICE_INFO.size
        return (set() if ok else {errno.EINVAL}), p.DEVICE_INFO.size, None

    def _device_get_region_info(self, payload: bytes, fds: list[FdInfo]) -> tuple:
        ok = len(payload) == p.REGION_INFO.size
        if ok:
            argsz, _, index, *_ = p.REGION_INFO.unpack(payload)
            ok = argsz >= p.REGION_INFO.size and index < p.NUM_REGIONS
        return (set() if ok else {errno.EINVAL}), p.REGION_INFO.size, None

    def _device_get_irq_info(self, payload: bytes, fds: list[FdInfo]) -> tuple:
        ok = len(payload) == p.IRQ_INFO.size
        if ok:
            argsz, _, index, _ = p.IRQ_INFO.unpack(payload)
            ok = argsz >= p.IRQ_INFO.size and index < p.NUM_IRQS
        return (set() if ok else {errno.EINVAL}), p.IRQ_INFO.size, None

    def _device_set_irqs(self, payload: bytes, fds: list[FdInfo]) -> tuple:
        if len(payload) != p.IRQ_SET.size:
            return {errno.EINVAL}, None, None
        argsz, flags, index, start, count = p.IRQ_SET.unpack(payload)
        action, data = flags & 0x38, flags & 0x7
        ok = argsz >= p.IRQ_SET.size and index == p.INTX_IRQ and start + count <= 1
        ok = ok and action == p.IRQ_SET_ACTION_TRIGGER
        if data == p.IRQ_SET_DATA_EVENTFD:
            ok = ok and len(fds) == count and (count == 0 or fds[0].kind == "eventfd")
        elif data == p.IRQ_SET_DATA_NONE:
            ok = ok and not fds
        else:
            ok = False
        return (set() if ok else {errno.EINVAL}), 0, None

    def _region_read(self, payload: bytes, fds: list[FdInfo]) -> tuple:
        if len(payload) != p.REGION_ACCESS.size:
            return {errno.EINVAL}, None, None
        offset, region, count = p.REGION_ACCESS.unpack(payload)
        ok = access_ok(region, offset, count)
        return (set() if ok else {errno.EINVAL}), p.REGION_ACCESS.size + count, None

    def _region_write(self, payload: bytes, fds: list[FdInfo]) -> tuple:
        if len(payload) < p.REGION_ACCESS.size:
            return {errno.EINVAL}, None, None
        offset, region, count = p.REGION_ACCESS.unpack_from(payload)
        ok = len(payload) == p.REGION_ACCESS.size + count and access_ok(region, offset, count)
        return (set() if ok else {errno.EINVAL}), p.REGION_ACCESS.size, None

    def _device_reset(self, payload: bytes, fds: list[FdInfo]) -> tuple:
        return (set() if not payload else {errno.EINVAL}), 0, None


def framing(msg: bytes) -> str:
    """How the server's decoder takes `msg` sent alone: "sync" (consumed exactly: handled, or
    refused unread as oversized), "drop" (a size below 16: the stream is lost), or "desync"
    (it waits for more, or takes part of what follows as this message)."""
    if len(msg) < p.HEADER_SIZE:
        return "desync"
    size = p.HEADER.unpack_from(msg)[2]
    if size < p.HEADER_SIZE:
        return "drop"
    return "sync" if size == len(msg) else "desync"


# --- valid messages ------------------------------------------------------------------------------

def hdr(msg_id: int, cmd: int, payload: bytes, flags: int = 0) -> bytes:
    return p.HEADER.pack(msg_id, cmd, p.HEADER_SIZE + len(payload), flags, 0) + payload


EDGE_OFFSETS = (0, 4, 8, 0x3C, 0x410, 0x2818, 0x3818, BAR0_SIZE - 8, BAR0_SIZE - 4, BAR0_SIZE - 3, BAR0_SIZE - 2,
                BAR0_SIZE - 1, BAR0_SIZE, BAR0_SIZE + 4, 252, 253, 254, 255, 256, 2**32 - 4, 2**63, 2**64 - 4,
                2**64 - 1)
EDGE_COUNTS = (0, 1, 2, 3, 4, 5, 8, 12, 16, 64, 256, 4096, BAR0_SIZE - 4, BAR0_SIZE, BAR0_SIZE + 4, 2**32 - 4,
               2**32 - 1)
# registers a random write leaves alone: CTRL (its RST and link bits would only reset what the
# next case redoes), and nothing else needs protecting: the device is built for this
SAFE_BAR0 = (0x0410, 0x0400, 0x0100, 0x00D0, 0x00D8, 0x3800, 0x3808, 0x3810, 0x3818, 0x2800, 0x2808, 0x2810,
             0x2818, 0x5400, 0x5404, 0x0008, 0x00C0, 0x4000, 0x4074)


class Cases:
    """Builds the messages of each kind of case."""

    def __init__(self, rng: random.Random, client: Client) -> None:
        self.rng = rng
        self.c = client

    def access(self, cmd: int) -> bytes:
        """A REGION_READ/WRITE payload, valid or at an edge."""
        rng = self.rng
        if rng.random() < 0.5:
            region = rng.choice((p.BAR0_REGION, p.CONFIG_REGION))
            if region == p.BAR0_REGION:
                offset, count = rng.choice(SAFE_BAR0), rng.choice((4, 4, 4, 8, 16))
            else:
                offset = rng.randrange(0, CONFIG_SIZE)
                count = rng.choice((1, 2, 4))
        else:
            region = rng.choice((0, 0, 7, 7, 1, 5, 6, 8, 9, 10, rng.randrange(2**32)))
            offset = rng.choice(EDGE_OFFSETS) if rng.random() < 0.7 else rng.randrange(2**64)
            count = rng.choice(EDGE_COUNTS) if rng.random() < 0.8 else rng.randrange(2**32)
        if count > BAR0_SIZE + 4:  # a payload that large is not sent; the claim is what counts
            data = bytes(rng.randrange(0, 64)) if cmd == Command.REGION_WRITE else b""
        else:
            data = rng.randbytes(count) if cmd == Command.REGION_WRITE else b""
        return p.REGION_ACCESS.pack(offset, region, count) + data

    def valid(self) -> tuple[bytes, list[tuple[int, FdInfo]]]:
        """A well-formed message of a random command (and the fds it carries)."""
        rng, c = self.rng, self.c
        cmd = rng.choice([int(x) for x in Command] + [Command.REGION_READ, Command.REGION_WRITE] * 3)
        fds: list[tuple[int, FdInfo]] = []
        flags = 0
        if cmd == Command.VERSION:
            payload = p.pack_version(0, rng.randrange(3), {"capabilities": {"max_msg_fds": rng.randrange(16)}})
        elif cmd == Command.DMA_MAP:
            fd, info = make_fd(rng, "memfd_sealed")
            fds.append((fd, info))
            size = rng.choice((PAGE, info.size, 2 * PAGE))
            payload = p.DMA_MAP.pack(32, 3, 0, rng.randrange(0, 256) * (1 << 20), size)
        elif cmd == Command.DMA_UNMAP:
            addr, size = rng.choice(c.regions) if c.regions and rng.random() < 0.8 else (0, PAGE)
            payload = p.DMA_UNMAP.pack(24, 0, addr, size)
        elif cmd == Command.DEVICE_GET_INFO:
            payload = p.DEVICE_INFO.pack(16, 0, 0, 0)
        elif cmd == Command.DEVICE_GET_REGION_INFO:
            payload = p.REGION_INFO.pack(32, 0, rng.randrange(p.NUM_REGIONS), 0, 0, 0)
        elif cmd == Command.DEVICE_GET_IRQ_INFO:
            payload = p.IRQ_INFO.pack(16, 0, rng.randrange(p.NUM_IRQS), 0)
        elif cmd == Command.DEVICE_SET_IRQS:
            if rng.random() < 0.5:
                fd, info = make_fd(rng, "eventfd")
                fds.append((fd, info))
                payload = p.IRQ_SET.pack(20, 0x24, 0, 0, 1)
            else:
                payload = p.IRQ_SET.pack(20, 0x21, 0, 0, rng.randrange(2))
        elif cmd in (Command.REGION_READ, Command.REGION_WRITE):
            payload = self.access(cmd)
            if cmd == Command.REGION_WRITE and rng.random() < 0.5:
                flags = p.FLAG_NO_REPLY
        else:
            payload = b""
        return hdr(c.new_id(), cmd, payload, flags), fds

    def random_command(self) -> bytes:
        rng = self.rng
        cmd = rng.choice((rng.randrange(0, 20), rng.randrange(0, 20), rng.randrange(2**16)))
        flags = rng.choice((0, 0, 0, p.FLAG_NO_REPLY, 1, 0x21, rng.randrange(2**32)))
        payload = rng.randbytes(rng.choice((0, 4, 8, 16, 20, 24, 32, rng.randrange(0, 200))))
        return hdr(self.c.new_id(), cmd, payload, flags)

    def version(self) -> bytes:
        rng = self.rng
        depth = rng.choice((1, 2, 3, p.MAX_JSON_DEPTH, p.MAX_JSON_DEPTH + 1, 50, 1000, 2000, 100_000))
        shape = rng.choice(("array", "object", "huge", "not_utf8", "not_object", "garbage", "nul_inside"))
        if shape == "array":
            text = b"[" * depth + b"]" * depth
            text = b'{"a": ' + text + b"}" if rng.random() < 0.5 else text
        elif shape == "object":
            text = b'{"a":' * depth + b"1" + b"}" * depth
        elif shape == "huge":
            text = json.dumps({"capabilities": {"x": "y" * rng.choice((100, 4000, 5000, 70_000))}}).encode()
        elif shape == "not_utf8":
            text = b'{"\xff\xfe": 1}'
        elif shape == "not_object":
            text = rng.choice((b"[1]", b"1", b'"x"', b"null"))
        elif shape == "nul_inside":
            text = b'{"a": 1}\0{"b": 2}'
        else:
            text = rng.randbytes(rng.randrange(1, 300))
        if rng.random() < 0.5:
            text += b"\0"
        return hdr(self.c.new_id(), Command.VERSION, struct.pack("=HH", rng.choice((0, 0, 0, 1, 0xFFFF)),
                                                                    rng.randrange(2**16)) + text)

    def dma(self) -> tuple[bytes, list[tuple[int, FdInfo]]]:
        rng, c = self.rng, self.c
        if c.regions and rng.random() < 0.3:
            addr, size = rng.choice(c.regions)
            addr = (addr + rng.choice((0, 0, PAGE))) % 2**64
            return hdr(c.new_id(), Command.DMA_UNMAP, p.DMA_UNMAP.pack(24, rng.choice((0, 0, 0, 1, 2)), addr, size)), []
        fds = [make_fd(rng) for _ in range(rng.choice((1, 1, 1, 0, 2)))]
        info_size = fds[0][1].size if fds else PAGE
        size = rng.choice((PAGE, info_size, info_size + PAGE, 0, 3000, 2**64 - PAGE))
        offset = rng.choice((0, 0, 0, PAGE, 100, info_size, 2**63))
        addr = rng.choice((0, rng.randrange(0, 64) * (1 << 20), 2**64 - PAGE, 2**64 - 2 * PAGE, rng.randrange(2**64)))
        flags = rng.choice((3, 3, 3, 1, 2, 0, 7))
        argsz = rng.choice((32, 32, 32, 0, 40))
        return hdr(c.new_id(), Command.DMA_MAP, p.DMA_MAP.pack(argsz, flags, offset, addr, size)), fds


# --- the emulator process ------------------------------------------------------------------------

class EmulatorProcess:
    """`nicemu serve` with two devices in a private temporary directory; always cleaned up."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="nicemu-fuzz-")  # 0700
        self.paths = [os.path.join(self.dir, f"nic{i}.sock") for i in range(2)]
        self.errfile = tempfile.TemporaryFile(mode="w+b")
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "PYTHONWARNINGS": "ignore::RuntimeWarning"}
        args = [sys.executable, "-m", "nicemu", "serve"]
        for path, mac in zip(self.paths, MACS):
            args += ["--socket", path, "--mac", mac]
        try:
            self.proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=self.errfile)
        except BaseException:
            self.errfile.close()
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self.pid = self.proc.pid

    def wait_ready(self) -> None:
        fd = self.proc.stdout.fileno()
        end = time.monotonic() + START_TIMEOUT
        line = b""
        while time.monotonic() < end:
            r, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
            if not r:
                continue
            ch = os.read(fd, 1)
            if not ch:
                break
            line = b"" if ch == b"\n" else line + ch
            if line == b"nicemu: ready":
                return
        raise FuzzFailure(f"vfio_user: the emulator did not start: {self.log()[-2000:]}")

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def memfd_mappings(self) -> list[str]:
        with open(f"/proc/{self.pid}/maps") as f:
            return [line.strip() for line in f if "/memfd:" in line]

    def log(self) -> str:
        self.errfile.seek(0)
        return self.errfile.read().decode(errors="replace")

    def terminate(self) -> int | None:
        """SIGTERM; the exit status, or None if it did not exit within 10 s."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            return None

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close()
        self.errfile.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- the run -------------------------------------------------------------------------------------

@dataclass
class Plan:
    """A case: messages (as sent, in order), split into pieces with fds attached to some."""

    msgs: list[bytes]
    pieces: list[tuple[int, int, list[tuple[int, FdInfo]]]] = field(default_factory=list)  # (start, end, fds)
    note: str = ""


class Fuzzer:
    def __init__(self, seed: int, iterations: int, report: FuzzReport, emu: EmulatorProcess,
                 log: Callable[[str], None] | None) -> None:
        self.seed, self.iterations, self.report, self.emu, self.log = seed, iterations, report, emu, log
        self.rng = random.Random(seed)
        self.case_no = 0
        self.case_text = "start"
        self.client: Client | None = None
        self.neighbour = Client(emu.paths[1])
        self._negotiate(self.neighbour)
        self.base_fds = emu.fd_count() - 1  # without the neighbour's connection
        self.base_rss = emu.rss()

    def fail(self, what: str) -> FuzzFailure:
        return FuzzFailure(f"vfio_user seed {self.seed} case {self.case_no} ({self.case_text}): {what} "
                           f"(replay: python -m nicemu.fuzz --target vfio_user --seed {self.seed} "
                           f"--iterations {self.iterations})")

    # --- connections ---------------------------------------------------------------------------

    def _negotiate(self, c: Client) -> None:
        h, body = c.request(hdr(c.new_id(), Command.VERSION, p.pack_version(0, 1, {})))
        if h[3] != p.MsgType.REPLY:
            raise self.fail(f"VERSION on a fresh connection refused: {h}")
        caps = p.parse_version(body)[2]
        if caps.get("capabilities", {}).get("max_msg_fds") != p.MAX_MSG_FDS:
            raise self.fail(f"VERSION reply does not announce max_msg_fds {p.MAX_MSG_FDS}: {caps}")
        c.negotiated = True

    def connect(self, negotiate: bool = True) -> Client:
        self.hang_up()
        self.client = Client(self.emu.paths[0])
        if negotiate:
            self._negotiate(self.client)
        return self.client

    def hang_up(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    # --- one case ------------------------------------------------------------------------------

    def case(self, kind: str) -> None:
        self.report.tried(kind)
        c = self.client if self.client is not None else self.connect()
        cases = Cases(self.rng, c)
        owned: list[int] = []  # our copies of fds we send: closed after the case
        try:
            plan = self.plan(kind, cases, c, owned)
            if plan is None:
                return
            self.case_text = f"{kind}: {plan.note}" if plan.note else kind
            if self.log:
                self.log(f"case {self.case_no}: {self.case_text}: " + " ".join(m[:40].hex() for m in plan.msgs))
            assert self.client is not None  # plan() may have started a new connection
            self.execute(self.client, plan)
        finally:
            for fd in owned:
                os.close(fd)
        bound = self.base_fds + 2 + 64 + 1 + 2 * p.MAX_MSG_FDS  # conns, mappings, eventfd, held fds
        if self.emu.fd_count() > bound:
            raise self.fail(f"the emulator holds {self.emu.fd_count()} fds (bound {bound})")

    def plan(self, kind: str, cases: Cases, c: Client, owned: list[int]) -> Plan | None:
        rng = self.rng

        def fds_of(pairs: list[tuple[int, FdInfo]]) -> list[tuple[int, FdInfo]]:
            owned.extend(fd for fd, _ in pairs)
            return pairs

        if kind == "valid":
            msg, fds = cases.valid()
            return self.whole([msg], fds_of(fds))
        if kind == "bitflip":
            msg, fds = cases.valid()
            data = bytearray(msg)
            for _ in range(rng.choice((1, 1, 2, 3, 8))):
                bit = rng.randrange(len(data) * 8) if rng.random() < 0.5 else rng.randrange(min(len(data), 32) * 8)
                data[bit // 8] ^= 1 << bit % 8
            return self.whole([bytes(data)], fds_of(fds), "bits flipped")
        if kind == "truncate":
            msg, fds = cases.valid()
            return self.whole([msg[: rng.randrange(1, len(msg))]], fds_of(fds), "cut short")
        if kind == "length_lie":
            msg, fds = cases.valid()
            size = rng.choice((0, 1, 15, 16, len(msg) - 1, len(msg) + 1, len(msg) + 4096, p.MAX_MSG_SIZE,
                               p.MAX_MSG_SIZE + 1, 2**32 - 1, rng.randrange(2**32)))
            data = msg[:4] + struct.pack("=I", size) + msg[8:]
            return self.whole([data], fds_of(fds), f"size field {size}")
        if kind == "command":
            return self.whole([cases.random_command()], [])
        if kind == "region":
            cmd = rng.choice((Command.REGION_READ, Command.REGION_WRITE))
            flags = p.FLAG_NO_REPLY if cmd == Command.REGION_WRITE and rng.random() < 0.3 else 0
            return self.whole([hdr(c.new_id(), cmd, cases.access(cmd), flags)], [])
        if kind == "fds":
            msg, fds = cases.valid() if rng.random() < 0.7 else (cases.random_command(), [])
            fds = fds + [make_fd(rng) for _ in range(rng.choice((1, 1, 2, 3, 8, 9, 12)))]
            fds_of(fds)
            if rng.random() < 0.5:
                return self.whole([msg], fds, f"{len(fds)} fds")
            return self.split([msg], fds, f"{len(fds)} fds over pieces")
        if kind == "split":
            msgs, fds = [], []
            for _ in range(rng.randrange(1, 5)):
                m, f = cases.valid()
                msgs.append(m)
                fds += f
            return self.split(msgs, fds_of(fds), f"{len(msgs)} messages in pieces")
        if kind == "version":
            return self.whole([cases.version()], [])
        if kind == "dma":
            msg, fds = cases.dma()
            return self.whole([msg], fds_of(fds))
        if kind == "oversized":
            size = p.MAX_MSG_SIZE + rng.choice((1, 4096, 65536))
            msg = p.HEADER.pack(c.new_id(), rng.choice((Command.REGION_WRITE, Command.DMA_MAP, 77)), size,
                                rng.choice((0, p.FLAG_NO_REPLY)), 0) + bytes(size - p.HEADER_SIZE)
            return self.whole([msg], [])
        if kind == "trickle":
            self.trickle(self.connect(), owned)  # a fresh client: no mappings, so the bound is exact
            return None
        if kind == "before_version":
            c = self.connect(negotiate=False)
            cases = Cases(rng, c)
            msg, fds = cases.valid()
            return self.whole([msg], fds_of(fds), "before VERSION")
        if kind == "second_client":
            self.second_client()
            return None
        raise ValueError(kind)

    def whole(self, msgs: list[bytes], fds: list[tuple[int, FdInfo]], note: str = "") -> Plan:
        """Each message in one piece; the fds with the last one."""
        plan, start = Plan(msgs, note=note), 0
        for i, m in enumerate(msgs):
            plan.pieces.append((start, start + len(m), fds if i == len(msgs) - 1 else []))
            start += len(m)
        return plan

    def split(self, msgs: list[bytes], fds: list[tuple[int, FdInfo]], note: str) -> Plan:
        """The messages' bytes cut at random places; fds spread over pieces of at most 4 KiB
        (each such piece is one buffer in the kernel, so its fds stay with its last byte)."""
        total = sum(len(m) for m in msgs)
        cuts = sorted({0, total, *(self.rng.randrange(1, total) for _ in range(self.rng.randrange(0, 8)))})
        pieces = [[a, b, []] for a, b in zip(cuts, cuts[1:])]
        small = [pc for pc in pieces if pc[1] - pc[0] <= 4096] or [pieces[-1]]
        if small == [pieces[-1]] and pieces[-1][1] - pieces[-1][0] > 4096:  # make one
            a, b = pieces[-1][0], pieces[-1][1]
            pieces[-1:] = [[a, b - 1, []], [b - 1, b, []]]
            small = [pieces[-1]]
        for fd in fds:
            self.rng.choice(small)[2].append(fd)
        return Plan(msgs, [(a, b, f) for a, b, f in pieces], note)

    # --- sending and checking ------------------------------------------------------------------

    def execute(self, c: Client, plan: Plan) -> None:
        """Send the plan and check what comes back against the oracle."""
        oracle = Oracle(c)
        bounds, start = [], 0
        for m in plan.msgs:
            bounds.append((start, start + len(m)))
            start += len(m)
        # the fds of a piece belong to the message holding the piece's last byte
        msg_fds: list[list[FdInfo]] = [[] for _ in plan.msgs]
        for a, b, fds in plan.pieces:
            if fds:
                k = next(i for i, (s, e) in enumerate(bounds) if s <= b - 1 < e)
                msg_fds[k] += [info for _, info in fds]
        expects: list[Expect] = []
        end = "sync"
        for m, fds in zip(plan.msgs, msg_fds):
            end = framing(m)
            if end != "sync":
                break
            if len(fds) > p.MAX_MSG_FDS:
                end = "drop"
                break
            e = oracle.expect(m, fds)
            expects.append(e)
            if e.errnos == {0} and e.on_success:  # the model follows what the server must do
                e.on_success()
        data = b"".join(plan.msgs)
        try:
            for a, b, fds in plan.pieces:
                c.send(data[a:b], [fd for fd, _ in fds])
        except (BrokenPipeError, ConnectionResetError) as e:
            if end != "drop":
                raise self.fail(f"the server closed the connection: {e}") from None
        except TimeoutError:
            raise self.fail("the server stopped reading") from None
        if end == "sync":
            self.check_replies(c, expects)
        elif end == "drop":
            self.report.saw("dropped")
            self.expect_dropped(c)
        else:
            self.report.saw("desync: hung up")
            self.hang_up()

    def check_replies(self, c: Client, expects: list[Expect]) -> None:
        """Every message that wants a reply gets exactly one, in order, then the probe's."""
        c.send(hdr(PROBE_ID, Command.REGION_READ, p.REGION_ACCESS.pack(STATUS, 0, 4)))
        try:
            for e in expects:
                if not e.reply:
                    self.report.saw("posted")
                    continue
                (msg_id, cmd, size, flags, err), body = c.reply()
                if (msg_id, cmd) != (e.msg_id, e.command):
                    raise self.fail(f"reply to {msg_id}/{cmd}, expected {e.msg_id}/{e.command}")
                got = err if flags == p.REPLY_ERROR else 0 if flags == p.TYPE_REPLY else None
                if got is None or got not in e.errnos or (got and body):
                    raise self.fail(f"reply flags {flags:#x} errno {err} ({errno.errorcode.get(err)}) "
                                    f"with {len(body)} bytes; expected one of "
                                    f"{sorted(errno.errorcode.get(x, 'ok') if x else 'ok' for x in e.errnos)}")
                if not got and e.reply_size is not None and len(body) != e.reply_size:
                    raise self.fail(f"a {len(body)}-byte reply to {Command(cmd).name}, expected {e.reply_size}")
                self.report.saw(errno.errorcode.get(got, "ok") if got else "ok")
            (msg_id, cmd, size, flags, err), body = c.reply()
        except _Eof as e:
            raise self.fail(f"the server closed a connection that was in sync ({e})") from None
        except TimeoutError as e:
            raise self.fail(f"the server stopped answering ({e})") from None
        want = (p.TYPE_REPLY, 0, 20) if c.negotiated else (p.REPLY_ERROR, errno.EINVAL, 0)  # before VERSION
        if (msg_id, cmd) != (PROBE_ID, Command.REGION_READ) or (flags, err, len(body)) != want:
            raise self.fail(f"the probe got {msg_id}/{cmd} flags {flags:#x} errno {err} {len(body)} bytes: "
                            f"out of step")

    def expect_dropped(self, c: Client) -> None:
        """The connection must end (after the replies due before the bad message, and an
        Error reply with id 0 and command 0 if it got out)."""
        try:
            replies = c.until_eof()
        except TimeoutError:
            raise self.fail("the server kept a connection that broke the rules") from None
        for (msg_id, cmd, size, flags, err), body in replies:
            if flags not in (p.TYPE_REPLY, p.REPLY_ERROR):
                raise self.fail(f"a reply with flags {flags:#x}")
        self.hang_up()

    def trickle(self, c: Client, owned: list[int]) -> None:
        """The attack of issue 7: a large header, then 1-byte pieces with 8 fds each."""
        cmd = self.rng.choice((Command.REGION_WRITE, Command.DMA_MAP, Command.DEVICE_SET_IRQS, 99))
        self.case_text = f"trickle: fds over the pieces of one {p.command_name(cmd)} message"
        fds = [make_fd(self.rng, "pipe")[0] for _ in range(p.MAX_MSG_FDS)]
        owned.extend(fds)
        peak = 0
        try:
            c.send(p.HEADER.pack(c.new_id(), cmd, 1 << 20, 0, 0))
            for _ in range(200):
                c.send(b"\0", fds)
                peak = max(peak, self.emu.fd_count())
        except (BrokenPipeError, ConnectionResetError):
            pass
        except TimeoutError:
            raise self.fail("the server stopped reading") from None
        bound = self.base_fds + 2 + 2 * p.MAX_MSG_FDS
        if peak > bound:
            raise self.fail(f"the emulator held {peak} fds during the trickle (bound {bound})")
        self.report.saw("dropped")
        self.expect_dropped(c)

    def second_client(self) -> None:
        c = self.client if self.client is not None else self.connect()
        self.case_text = "second client"
        other = Client(self.emu.paths[0])
        try:
            replies = other.until_eof()
        except TimeoutError:
            raise self.fail("a second client was neither refused nor closed") from None
        finally:
            other.close()
        if [(h, b) for h, b in replies] != [((0, 0, 16, p.REPLY_ERROR, errno.EBUSY), b"")]:
            raise self.fail(f"a second client got {replies}, expected one EBUSY")
        self.report.saw("EBUSY")
        self.check_replies(c, [])  # the first is undisturbed

    # --- invariants between cases --------------------------------------------------------------

    def check(self) -> None:
        """On a fresh connection: answered; nothing of the earlier clients left in the process."""
        self.case_text = "check on a fresh connection"
        try:
            c = self.connect()
            h, body = c.request(hdr(c.new_id(), Command.REGION_READ, p.REGION_ACCESS.pack(STATUS, 0, 4)))
        except (_Eof, TimeoutError, OSError) as e:
            raise self.fail(f"a fresh client is not served: {e}") from None
        if h[3] != p.TYPE_REPLY or len(body) != 20:
            raise self.fail(f"REGION_READ on a fresh connection: {h}")
        fds = self.emu.fd_count()
        if fds != self.base_fds + 2:  # the neighbour's connection and ours
            raise self.fail(f"the emulator holds {fds} fds between clients, expected {self.base_fds + 2}: "
                            f"{sorted(os.readlink(f'/proc/{self.emu.pid}/fd/{x}') for x in os.listdir(f'/proc/{self.emu.pid}/fd'))}")
        maps = self.emu.memfd_mappings()
        if maps:
            raise self.fail(f"a gone client's memory is still mapped: {maps}")
        rss = self.emu.rss()
        if rss > self.base_rss + MAX_RSS_GROWTH:
            raise self.fail(f"the emulator's RSS grew from {self.base_rss >> 20} MiB to {rss >> 20} MiB")
        try:
            h, body = self.neighbour.request(hdr(self.neighbour.new_id(), Command.REGION_READ,
                                                 p.REGION_ACCESS.pack(TIPG, 0, 4)))
        except (_Eof, TimeoutError, OSError) as e:
            raise self.fail(f"the other device stopped answering: {e}") from None
        if h[3] != p.TYPE_REPLY or body[16:] != struct.pack("<I", 0x77):
            raise self.fail(f"the other device answered {h} {body.hex()}")
        self.report.saw("checks passed")

    def finish(self) -> None:
        self.case_text = "SIGTERM at the end"
        self.hang_up()
        self.neighbour.close()
        status = self.emu.terminate()
        if status != 0:
            raise self.fail(f"the emulator did not exit 0 on SIGTERM (status {status})")
        text = self.emu.log()
        if "Traceback" in text:
            raise self.fail(f"a traceback in the emulator's log: {text[text.index('Traceback'):][:3000]}")
        if len(text) > MAX_LOG:
            raise self.fail(f"the emulator wrote {len(text)} bytes of log")
        if any(os.path.exists(path) for path in self.emu.paths):
            raise self.fail("a socket was left behind")


def run(seed: int, iterations: int, log: Callable[[str], None] | None = None) -> FuzzReport:
    """`iterations` cases against one emulator process (see the module docstring)."""
    report = FuzzReport("vfio_user", seed)
    emu = EmulatorProcess()
    fuzzer: Fuzzer | None = None
    try:
        emu.wait_ready()
        fuzzer = Fuzzer(seed, iterations, report, emu, log)
        nb = fuzzer.neighbour
        nb.send(hdr(nb.new_id(), Command.REGION_WRITE, p.REGION_ACCESS.pack(TIPG, 0, 4) + struct.pack("<I", 0x77),
                    p.FLAG_NO_REPLY))
        kinds, weights = list(KINDS), list(KINDS.values())
        for n in range(iterations):
            fuzzer.case_no = n
            kind = fuzzer.rng.choices(kinds, weights)[0]
            try:
                fuzzer.case(kind)
            except (_Eof, TimeoutError, ConnectionError) as e:
                raise fuzzer.fail(f"{type(e).__name__}: {e}") from None
            report.iterations += 1
            if n % CHECK_EVERY == CHECK_EVERY - 1:
                fuzzer.check()
        fuzzer.case_no = iterations
        fuzzer.check()
        fuzzer.finish()
    finally:
        if fuzzer is not None:
            fuzzer.hang_up()
            fuzzer.neighbour.close()
        emu.cleanup()
    return report
