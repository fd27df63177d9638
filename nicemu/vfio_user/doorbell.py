"""The doorbell page: nicemu's negotiated vfio-user extension for TDT/RDT (docs/transport.md,
"The doorbell page").

A page of memory both processes map (a sealed memfd the client sends with the
NICEMU_DOORBELL_PAGE command). The client writes the newest TDT and RDT there instead of
sending a REGION_WRITE per doorbell; the emulator polls the page while it has work and, when
idle, sets NEED_WAKE and sleeps; a client that finds NEED_WAKE set after writing a tail sends
a plain REGION_WRITE of that tail register, which wakes the emulator.

Layout (4096 bytes, host byte order; each field an aligned 64-bit word, read and written whole):

    0x00  TDT slot   written by the client
    0x08  RDT slot   written by the client
    0x40  NEED_WAKE  written by the emulator: 1 = asleep, ring the doorbell; 0 = polling
    (everything else: reserved, never read)

A slot word: bits 0-15 the tail value, bits 16-31 a sequence number (+1 per write: the
emulator applies a slot when its word changes), bits 32-63 `after`: how many messages the
client had sent on the connection when it wrote the slot. The emulator applies a slot only
once it has taken that many messages from the stream (and before it takes the next one), so a
tail written to the page lands between the same two messages it was written between.

Ordering: the client stores the slot, then a full fence, then loads NEED_WAKE; the emulator
stores NEED_WAKE = 1, then a full fence, then loads the slots (Dekker's pattern: at least one
side sees the other's store, so a tail never waits for a sleeping emulator).

This module is the readable reference of those memory operations (`DoorbellPageRef`: a
memoryview of 64-bit words, and a locked instruction as the fence); nicemu/vfio_user/
_doorbell.pyx does the same with C atomics (`DoorbellPage`), and
tests/transport/test_doorbell_page.py holds the two equal.
"""
from __future__ import annotations

import threading

__all__ = ["PAGE_SIZE", "SLOT_TDT", "SLOT_RDT", "WORD_NEED_WAKE", "CAPABILITY", "COMMAND",
           "PAGE_REQUEST", "FLAG_ENABLE", "pack_slot", "unpack_slot", "DoorbellPageRef", "make_page",
           "scan_tail_run", "scan_tail_run_ref"]

import struct

PAGE_SIZE = 4096
SLOT_TDT = 0  # word index (byte offset 0x00)
SLOT_RDT = 1  # word index (byte offset 0x08)
WORD_NEED_WAKE = 8  # word index (byte offset 0x40): a cache line of its own
CAPABILITY = "nicemu_doorbell_page"  # the VERSION capability both sides name
COMMAND = 0x4E01  # NICEMU_DOORBELL_PAGE: outside the vfio-user spec's command numbers
PAGE_REQUEST = struct.Struct("=IIQQ")  # argsz, flags, offset (in the fd), size
FLAG_ENABLE = 1 << 0


def pack_slot(value: int, seq: int, after: int) -> int:
    """A slot word: tail value (16 bits), sequence number (16 bits), messages sent before (32)."""
    return (value & 0xFFFF) | (seq & 0xFFFF) << 16 | (after & 0xFFFFFFFF) << 32


def unpack_slot(word: int) -> tuple[int, int, int]:
    """(value, seq, after) of a slot word."""
    return word & 0xFFFF, (word >> 16) & 0xFFFF, word >> 32


_fence_lock = threading.Lock()


def _full_fence() -> None:
    # A lock's acquire is a locked read-modify-write: a full barrier on x86 (and a seq_cst
    # operation elsewhere), which is what the store-then-load on each side needs.
    _fence_lock.acquire()
    _fence_lock.release()


class DoorbellPageRef:
    """The page's memory operations on `buf` (a writable buffer of at least PAGE_SIZE bytes)."""

    def __init__(self, buf) -> None:
        mv = memoryview(buf)
        if mv.readonly or mv.nbytes < PAGE_SIZE:
            mv.release()
            raise ValueError(f"a doorbell page needs {PAGE_SIZE} writable bytes")
        self._raw = mv
        self._w = mv[:PAGE_SIZE].cast("B").cast("Q")

    # the client's side
    def client_write(self, slot: int, word: int) -> int:
        """Store the slot word, fence, return NEED_WAKE (non-zero: send the doorbell)."""
        self._w[slot] = word & 0xFFFFFFFFFFFFFFFF
        _full_fence()
        return self._w[WORD_NEED_WAKE]

    # the emulator's side
    def load(self, slot: int) -> int:
        return self._w[slot]

    def arm(self) -> None:
        """NEED_WAKE = 1, then a full fence: the loads that follow see any tail stored before
        the client could have read the flag as 0."""
        self._w[WORD_NEED_WAKE] = 1
        _full_fence()

    def disarm(self) -> None:
        self._w[WORD_NEED_WAKE] = 0

    def need_wake(self) -> int:
        return self._w[WORD_NEED_WAKE]

    def release(self) -> None:
        """Let go of the buffer (the mmap behind it can then be closed)."""
        self._w.release()
        self._raw.release()


def make_page(buf, engine: str = "cython"):
    """The compiled DoorbellPage if it is built (and asked for), else the reference."""
    if engine == "cython":
        try:
            from nicemu.vfio_user._doorbell import DoorbellPage
        except ImportError:
            return DoorbellPageRef(buf)
        return DoorbellPage(buf)
    return DoorbellPageRef(buf)


# --- runs of posted tail writes (the plain protocol's doorbells) ----------------------------------

_POSTED32_KEY = struct.Struct("=2x30sI")  # a posted 32-bit REGION_WRITE: (all but msg id and data, data)
POSTED32_SIZE = 36


def scan_tail_run_ref(buf, start: int, end: int) -> tuple[int, list[int]]:
    """The posted 32-bit write at `start` and every one right after it that is the same message
    but for its id and data (same command, flags, region, offset, count), up to `end`: (where
    the run ends, the data dwords in order). The server hands them to Nic.write_tail together.
    Reference of nicemu/vfio_user/_doorbell.pyx's scan_tail_run; the caller checked that a whole
    message lies at `start`."""
    unpack = _POSTED32_KEY.unpack_from
    key, value = unpack(buf, start)
    values = [value]
    nxt = start + POSTED32_SIZE
    while end - nxt >= POSTED32_SIZE:
        k, v = unpack(buf, nxt)
        if k != key:
            break
        values.append(v)
        nxt += POSTED32_SIZE
    return nxt, values


try:
    from nicemu.vfio_user._doorbell import scan_tail_run
except ImportError:  # not built: the reference
    scan_tail_run = scan_tail_run_ref
