"""Shared fixtures and helpers for the device tests.

Fixtures:
- `clock`: a FakeClock (callable returning ns; `advance(ns)`, `advance_us(us)`), injected as
  the Nic's clock so timer tests are exact and never sleep.
- `mem`: DmaMemory(1 << 20) at bus address 0, closed after the test.
- `nic`: Nic(mem, mac=MAC, clock=clock) with the default engine and bus mastering enabled.
- `make_nic`: factory for more devices (pairs, other engines, other MACs) on their own memory.
- `stub_nic`: a Nic over StubEngine, which records the engine calls and returns programmed
  event words: for control-plane tests of the Nic <-> engine contract alone.

Helpers (import with `from conftest import ...`): with_fcs, make_frame, FakeClock, StubEngine,
RxRing / TxRing (program a ring in the device's memory the way a driver does, for tests that
push real frames through the engine).
"""
from __future__ import annotations

import os
import struct
import sys
import warnings
import zlib

import pytest

# The tests live in one directory per layer (README.md). The shared helpers (this file,
# kstack_fakes, kstack_procs, kstack_loopsock, cable_child) stay here at the top, and some test
# modules import from others in another group (test_wire_ipv4's naive_csum, test_tcp_link's
# established_pair, test_driver_process's Lab and Proc, ...): every group's directory and this
# one are put on sys.path so those imports work from any group, in any collection order.
_TESTS = os.path.dirname(os.path.abspath(__file__))
GROUPS = ("device", "transport", "cable", "driver", "stack", "apps", "e2e")
for _d in (_TESTS, *(os.path.join(_TESTS, g) for g in GROUPS)):
    if _d not in sys.path:
        sys.path.append(_d)

from nicemu import DmaMemory
from nicemu import regs as R
from nicemu.nic import Nic

MAC = "52:54:00:12:34:56"
MAC_BYTES = bytes.fromhex("525400123456")
PEER_MAC = "52:54:00:65:43:21"
BROADCAST = b"\xff" * 6


def with_fcs(frame: bytes) -> bytes:
    """The frame with its IEEE 802.3 FCS appended (CRC-32, least significant byte first)."""
    return frame + struct.pack("<I", zlib.crc32(frame))


def make_frame(
    dst: bytes = MAC_BYTES,
    src: bytes = bytes.fromhex("020000000001"),
    ethertype: int = 0x88B5,  # IEEE local experimental
    payload: bytes = b"",
    size: int = 64,
    fcs: bool = True,
) -> bytes:
    """An Ethernet frame of `size` bytes in all (FCS included when `fcs`), payload zero-padded."""
    body = dst + src + struct.pack("!H", ethertype) + payload
    want = size - (4 if fcs else 0)
    if len(body) < want:
        body += bytes(want - len(body))
    return with_fcs(body) if fcs else body


class FakeClock:
    """A clock for injection: returns `now` (ns), which only moves when a test moves it."""

    def __init__(self, start: int = 1_000_000_000) -> None:
        self.now = start

    def __call__(self) -> int:
        return self.now

    def advance(self, ns: int) -> int:
        self.now += ns
        return self.now

    def advance_us(self, us: float) -> int:
        return self.advance(round(us * 1000))


class StubEngine:
    """Stands in for the data path engine: records calls, returns programmed event words."""

    def __init__(self, regs, mem) -> None:
        self.regs = regs
        self.mem = mem
        self.bus_master = False
        self.sink = None
        self.peer = None
        self.dma_errors = 0
        self.calls: list[str] = []
        self.next_events: dict[str, int] = {}  # method name -> event word returned once
        self.pending_events = 0  # what take_events() hands over
        self.sent: list[bytes] = []

    def _ret(self, name: str) -> int:
        self.calls.append(name)
        return self.next_events.pop(name, 0)

    def transmit(self) -> int:
        return self._ret("transmit")

    def tx_resume(self) -> int:
        return self._ret("tx_resume")

    def receive(self, frame: bytes) -> int:
        return self._ret("receive")

    def drain_rx(self) -> int:
        return self._ret("drain_rx")

    def take_events(self) -> int:
        self.calls.append("take_events")
        ev, self.pending_events = self.pending_events, 0
        return ev

    def take_transmitted(self) -> list[bytes]:
        sent, self.sent = self.sent, []
        return sent

    def link(self, peer: "StubEngine") -> None:
        self.peer = peer

    def reset(self) -> None:
        self.calls.append("reset")


class RxRing:
    """An RX ring of `n` descriptors at `base`, each with a `bufsize` buffer from `buf_base`.

    setup() programs RDBAL/RDBAH/RDLEN/RDH/RDT and RCTL (EN | BAM | `rctl` extra bits) and gives
    the device `give` buffers (default n - 1, one slot kept unused as drivers do)."""

    def __init__(self, nic: Nic, n: int = 16, base: int = 0x1000, buf_base: int = 0x10000, bufsize: int = 2048) -> None:
        self.nic, self.n, self.base, self.buf_base, self.bufsize = nic, n, base, buf_base, bufsize
        self.tail = 0

    def setup(self, rctl: int = 0, give: int | None = None) -> "RxRing":
        nic, mem = self.nic, self.nic.mem
        for k in range(self.n):
            mem.write(self.base + 16 * k, R.RX_DESC.pack(self.buf_base + k * self.bufsize, 0, 0, 0, 0, 0))
        nic.write32(R.RDBAL, self.base)
        nic.write32(R.RDBAH, 0)
        nic.write32(R.RDLEN, self.n * 16)
        nic.write32(R.RDH, 0)
        nic.write32(R.RDT, 0)
        nic.write32(R.RCTL, int(R.Rctl.EN | R.Rctl.BAM) | rctl)
        self.give(self.n - 1 if give is None else give)
        return self

    def give(self, count: int) -> None:
        """Hand `count` more descriptors to the device (one RDT write)."""
        self.tail = (self.tail + count) % self.n
        self.nic.write32(R.RDT, self.tail)

    def desc(self, k: int) -> tuple:
        """(addr, length, csum, status, errors, special) of descriptor k."""
        return R.RX_DESC.unpack(self.nic.mem.read(self.base + 16 * k, 16))

    def data(self, k: int) -> bytes:
        _, length, *_ = self.desc(k)
        return self.nic.mem.read(self.buf_base + k * self.bufsize, length)


class TxRing:
    """A TX ring of `n` descriptors at `base`, packet data from `buf_base` (2 KiB slots).

    setup() programs TDBAL/TDBAH/TDLEN/TDH/TDT and TCTL.EN (| `tctl`). send() queues frames (FCS
    left to the device: IFCS) and rings the doorbell once."""

    def __init__(self, nic: Nic, n: int = 16, base: int = 0x800, buf_base: int = 0x80000) -> None:
        self.nic, self.n, self.base, self.buf_base = nic, n, base, buf_base
        self.tail = 0

    def setup(self, tctl: int = 0) -> "TxRing":
        nic = self.nic
        nic.write32(R.TDBAL, self.base)
        nic.write32(R.TDBAH, 0)
        nic.write32(R.TDLEN, self.n * 16)
        nic.write32(R.TDH, 0)
        nic.write32(R.TDT, 0)
        nic.write32(R.TCTL, int(R.Tctl.EN | R.Tctl.PSP) | tctl)
        return self

    def send(self, frames: list[bytes], cmd: int = int(R.TxdCmd.EOP | R.TxdCmd.IFCS | R.TxdCmd.RS)) -> None:
        mem = self.nic.mem
        for frame in frames:
            addr = self.buf_base + self.tail * 2048
            mem.write(addr, frame)
            mem.write(self.base + 16 * self.tail, R.TX_DESC.pack(addr, len(frame), 0, cmd, 0, 0, 0))
            self.tail = (self.tail + 1) % self.n
        self.nic.write32(R.TDT, self.tail)

    def sta(self, k: int) -> int:
        return self.nic.mem.read(self.base + 16 * k + 12, 1)[0]


def enable_bus_master(nic: Nic) -> None:
    nic.config_write(0x04, int(R.PciCommand.MEMORY | R.PciCommand.MASTER), size=2)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def mem():
    m = DmaMemory(1 << 20)
    yield m
    m.close()


@pytest.fixture
def make_nic(clock):
    """make_nic(mac=MAC, engine="auto", bus_master=True) -> Nic on its own 1 MiB memory."""
    mems: list[DmaMemory] = []

    def make(mac: str = MAC, engine="auto", bus_master: bool = True, mem: DmaMemory | None = None) -> Nic:
        if mem is None:
            mem = DmaMemory(1 << 20)
            mems.append(mem)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "auto" without the built extension
            nic = Nic(mem, mac=mac, clock=clock, engine=engine)
        if bus_master:
            enable_bus_master(nic)
        return nic

    yield make
    for m in mems:
        m.close()


@pytest.fixture
def nic(make_nic, mem) -> Nic:
    return make_nic(mem=mem)


@pytest.fixture
def stub_nic(make_nic, mem) -> Nic:
    """A Nic over StubEngine with bus mastering on; engine.calls starts empty."""
    nic = make_nic(mem=mem, engine=StubEngine)
    nic.engine.calls.clear()
    return nic


def sealed_memfd(size: int) -> int:
    """A memfd as a driver side hands it over in DMA_MAP: sealed against shrinking, which
    DmaMemory.map_fd requires."""
    import fcntl

    fd = os.memfd_create("test-dma", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


@pytest.fixture
def klab():
    """A kstack_procs.KernelLab: emulator, kernel and application processes in a private
    directory; every process reaped, the directory removed and nothing left in /dev/shm."""
    from kstack_procs import klab_session

    yield from klab_session()
