"""RefDatapath: the per-frame work of the 82540EM, in plain Python.

This is the readable reference of the data path: the TX descriptor walk, the TX packet buffer,
FCS generation and checking, receive filtering, the RX packet buffer, RX descriptor write-back
and the statistics. `nicemu._datapath.Datapath` does exactly the same in Cython, and
tests/device/test_datapath_agree.py holds the two to identical results (memory, registers, events,
frames). Read this file to learn what the device does; docs/datapath.md says where each rule
comes from in the SDM and which outcomes nicemu defines where the SDM is silent.

The engine sees the register file as `regs` (an array of 32-bit words indexed by offset >> 2,
owned by nicemu.nic.Nic) and host memory as a DmaMemory. It never touches memory outside a
mapped region: every descriptor and buffer access is checked first, a fault is counted in
`dma_errors` and has a defined outcome (see the methods).
"""
from __future__ import annotations

import zlib
from collections import deque
from typing import Callable

from nicemu import tracepoint
from nicemu.dma import DmaMemory
from nicemu.fcs import FCS_RESIDUE
from nicemu.regs import (
    BPRC, BPTC, CRCERRS, DESC_SIZE, EV_RX_DONE, EV_TX_IDE, EV_TX_MORE, GORCL, GOTCL, GPRC, GPTC, MPC, MPRC,
    MPTC, MTA, PBA, PRC64, PTC64, RA, RA_ENTRIES, RAH_AS, RCTL, RDBAH, RDBAL, RDH, RDLEN, RDT,
    RING_BASE_MASK, RING_INDEX_MASK, RING_LEN_MASK, RNBC, ROC, RUC, RXCSUM, TCTL, TDBAH, TDBAL,
    TDH, TDLEN, TDT, TORL, TOTL, TPR, TPT, Icr, Rah, Rctl, RxdErrors, RxdStatus, Rxcsum, Tctl,
    TxdCmd, TxdSta, rx_buffer_size,
)

__all__ = ["RefDatapath", "pb_record_size", "ones_sum", "rx_checksum_offload", "MAX_FRAME", "PB_MAX",
           "TX_BUDGET"]

MAX_FRAME = 16384  # the largest frame either direction handles (FCS included), SDM 3.3 / LPE
PB_MAX = 64 * 1024  # the 82540EM's packet buffer memory: neither PBA part can be larger
PB_LINE = 16  # the packet buffer is kept in 16-byte lines, plus one status line per frame
# TX descriptors one walk (a TDT write, tx_resume, or the Nic continuing a walk) may fetch: the
# work of one doorbell is bounded, so one device cannot keep its emulator process from serving
# the others. A full ring of Linux's largest size (4096) still goes in one walk.
TX_BUDGET = 4096

# How fetching one packet's descriptors ended (RefDatapath._fetch_chain)
_OPEN = 0  # TDT reached without EOP: the packet waits for more descriptors
_BUDGET = 1  # the walk's TX_BUDGET ran out first: the next walk goes on from there
_EOP = 2  # the chain is complete
_FAULT = 3  # a descriptor outside memory ends the chain (it is not in the chain)
_LONE_DEXT = 4  # a DEXT=1 descriptor at the start of a packet: consumed on its own
_OVERSIZE = 5  # the data so far can never be sent: the packet is dropped at once
U32 = 0xFFFFFFFF
U64 = (1 << 64) - 1

_BROADCAST = b"\xff" * 6
_SIZE_BUCKETS = (64, 127, 255, 511, 1023, 1522)  # PRC64.. / PTC64.. upper bounds
_MTA_SHIFT = (4, 3, 2, 0)  # RCTL.MO 0..3: the hash is (d4 | d5 << 8) >> shift, 12 bits


# The bits the per-frame work tests, as plain ints taken once from nicemu.regs (named there as
# the SDM names them: Rctl.BAM is RCTL_BAM here). An IntFlag operation such as `rctl & Rctl.BAM`
# builds a new enum object each time (about 1 us), which made this reference several times
# slower than straightforward Python; with ints the code reads the same and does only its work.
ICR_TXDW = int(Icr.TXDW)
ICR_TXQE = int(Icr.TXQE)
ICR_RXDMT0 = int(Icr.RXDMT0)
ICR_RXO = int(Icr.RXO)
RCTL_EN = int(Rctl.EN)
RCTL_SBP = int(Rctl.SBP)
RCTL_UPE = int(Rctl.UPE)
RCTL_MPE = int(Rctl.MPE)
RCTL_LPE = int(Rctl.LPE)
RCTL_BAM = int(Rctl.BAM)
RCTL_SECRC = int(Rctl.SECRC)
TCTL_EN = int(Tctl.EN)
TCTL_PSP = int(Tctl.PSP)
RAH_AV = int(Rah.AV)
RXCSUM_IPOFL = int(Rxcsum.IPOFL)
RXCSUM_TUOFL = int(Rxcsum.TUOFL)
TXD_CMD_EOP = int(TxdCmd.EOP)
TXD_CMD_IFCS = int(TxdCmd.IFCS)
TXD_CMD_IC = int(TxdCmd.IC)
TXD_CMD_RS = int(TxdCmd.RS)
TXD_CMD_DEXT = int(TxdCmd.DEXT)
TXD_CMD_IDE = int(TxdCmd.IDE)
TXD_STA_DD = int(TxdSta.DD)
RXD_STA_DD = int(RxdStatus.DD)
RXD_STA_EOP = int(RxdStatus.EOP)
RXD_STA_IXSM = int(RxdStatus.IXSM)
RXD_STA_TCPCS = int(RxdStatus.TCPCS)
RXD_STA_IPCS = int(RxdStatus.IPCS)
RXD_ERR_CE = int(RxdErrors.CE)
RXD_ERR_TCPE = int(RxdErrors.TCPE)
RXD_ERR_IPE = int(RxdErrors.IPE)


def pb_record_size(frame_len: int) -> int:
    """Packet buffer bytes a frame takes: its data in 16-byte lines plus one status line."""
    return ((frame_len + PB_LINE - 1) & ~(PB_LINE - 1)) + PB_LINE


def ones_sum(data: bytes | memoryview, start: int = 0) -> int:
    """The 16-bit ones'-complement sum (RFC 1071) of big-endian words, not complemented.

    An odd trailing byte is padded with a zero low byte. A correct Internet checksum over
    a header that includes its checksum field sums to 0xFFFF."""
    b = bytes(data)
    if len(b) & 1:
        b += b"\0"
    # 2**16 == 1 (mod 0xFFFF): the folded sum of the words is the whole number mod 0xFFFF,
    # where a non-zero multiple of 0xFFFF folds to 0xFFFF (ones' complement "negative zero").
    total = start + int.from_bytes(b, "big")
    if total == 0:
        return 0
    return total % 0xFFFF or 0xFFFF


def _size_bucket(n: int) -> int:
    """Index of the 64/127/255/511/1023/1522 statistics bucket, or -1 above 1522."""
    for i, top in enumerate(_SIZE_BUCKETS):
        if n <= top:
            return i
    return -1


def rx_checksum_offload(data: bytes | memoryview, rxcsum: int) -> tuple[int, int, int]:
    """RX checksum offload (SDM 3.2.9, RXCSUM 13.4.36) of a frame without its FCS.

    Returns (status bits, error bits, packet checksum). With IPOFL the IPv4 header checksum is
    checked (IPCS, IPE on a bad one); with TUOFL the TCP or UDP checksum of an unfragmented IPv4
    packet (TCPCS, TCPE on a bad one; a UDP checksum of 0 means "none" and is not checked).
    IXSM is set when no checksum was checked. The packet checksum field is the ones'-complement
    sum from RXCSUM.PCSS to the end of the data while any offload is on, else 0."""
    status = 0
    errors = 0
    csum = 0
    checked = False
    offload = rxcsum & (RXCSUM_IPOFL | RXCSUM_TUOFL)
    n = len(data)
    if offload:
        pcss = rxcsum & 0xFF
        if pcss < n:
            csum = ones_sum(data[pcss:])
        if n >= 34 and data[12] == 0x08 and data[13] == 0x00 and data[14] >> 4 == 4:
            ihl = (data[14] & 0x0F) * 4
            if ihl >= 20 and 14 + ihl <= n:
                if rxcsum & RXCSUM_IPOFL:
                    checked = True
                    status |= RXD_STA_IPCS
                    if ones_sum(data[14 : 14 + ihl]) != 0xFFFF:
                        errors |= RXD_ERR_IPE
                if rxcsum & RXCSUM_TUOFL:
                    proto = data[23]
                    total = (data[16] << 8) | data[17]
                    frag = ((data[20] << 8) | data[21]) & 0x3FFF  # MF flag and fragment offset
                    seg_len = total - ihl
                    min_len = 20 if proto == 6 else 8
                    if (proto == 6 or proto == 17) and frag == 0 and seg_len >= min_len and 14 + total <= n:
                        seg = data[14 + ihl : 14 + total]
                        if not (proto == 17 and seg[6] == 0 and seg[7] == 0):
                            checked = True
                            status |= RXD_STA_TCPCS
                            pseudo = ones_sum(data[26:34], proto + seg_len)
                            if ones_sum(seg, pseudo) != 0xFFFF:
                                errors |= RXD_ERR_TCPE
    if not checked:
        status |= RXD_STA_IXSM
    return status, errors, csum


def _trace_dev(regs) -> str:
    """The device's MAC (RAL0/RAH0) for a trace event: which device of an emulator it was."""
    return (regs[RA >> 2] | (regs[(RA >> 2) + 1] & 0xFFFF) << 32).to_bytes(6, "little").hex(":")


def _ends_packet(d: bytes) -> bool:
    """A legacy descriptor with CMD.EOP (a DEXT=1 descriptor's EOP is ignored)."""
    return d[11] & (TXD_CMD_EOP | TXD_CMD_DEXT) == TXD_CMD_EOP


class _RxEntry:
    """A frame waiting in the RX packet buffer, with what the receive checks found."""

    __slots__ = ("frame", "status", "errors", "csum")

    def __init__(self, frame: bytes, status: int, errors: int, csum: int) -> None:
        self.frame = frame
        self.status = status
        self.errors = errors
        self.csum = csum


class RefDatapath:
    """The data path engine in pure Python (see the module docstring and docs/architecture.md)."""

    def __init__(self, regs, mem: DmaMemory) -> None:
        self.regs = regs
        self.mem = mem
        self.bus_master = False
        self.sink: Callable[[bytes], bool] | None = None
        self.peer = None
        self.capture = None  # a capture ring: every frame put on the wire is recorded
        self.dma_errors = 0  # descriptor or buffer accesses outside mapped (writable) memory
        self.tx_dropped = 0  # TX packets not sent: too long, no EOP in a full ring, DMA fault, empty
        self.tx_dext_skipped = 0  # extended (DEXT=1) TX descriptors: not modeled, skipped
        self.tx_descs_fetched = 0  # TX descriptors read from the ring (each once, see _walk_tx)
        self.rx_dropped = 0  # frames dropped with no SDM statistic: RCTL.EN clear, DMA fault, too many buffers
        self.rx_written = 0  # frames written to the RX ring (with rx_dropped, MPC and rx_queued:
        #                      where every frame that entered the RX packet buffer went)
        self._txq: deque[bytes] = deque()  # the TX packet buffer
        self._tx_used = 0
        # The packet being fetched: copies of its descriptors from TDH on, kept from one walk
        # to the next (a chain waiting for its EOP is read once, however many doorbells it
        # takes), with the ring and TDH they were fetched for.
        self._chain: list[bytes] = []
        self._chain_len = 0  # its data bytes so far (before its EOP)
        self._chain_ring = (0, 0, 0)  # (ring base, descriptors, TDH) at the end of the last walk
        self._discard = False  # dropping the rest of an oversize packet, up to its EOP
        self._rxq: deque[_RxEntry] = deque()  # the RX packet buffer
        self._rx_used = 0
        self._events = 0  # raised by frames a linked peer delivered to us
        self._sent: list[bytes] = []
        self._in_transmit = False  # a sink that calls back into transmit() gets a no-op

    # --- the engine interface ----------------------------------------------------------

    def link(self, peer) -> None:
        """Deliver transmitted frames straight to `peer.deliver` (None: back to the sink)."""
        self.peer = peer

    def deliver(self, frame: bytes) -> None:
        """A frame from a linked peer: received now, its events kept for take_events()."""
        self._events |= self.receive(frame)

    def take_events(self) -> int:
        ev, self._events = self._events, 0
        return ev

    def take_transmitted(self) -> list[bytes]:
        sent, self._sent = self._sent, []
        return sent

    @property
    def rx_queued(self) -> int:
        """Frames waiting in the RX packet buffer (for descriptors, RCTL.EN or bus mastering)."""
        return len(self._rxq)

    @property
    def tx_queued(self) -> int:
        """Frames waiting in the TX packet buffer (for the cable)."""
        return len(self._txq)

    def reset(self) -> None:
        """Power-on reset: both packet buffers and the packet being fetched are emptied (the
        diagnostics counters stay)."""
        self._txq.clear()
        self._tx_used = 0
        self._forget_chain()
        self._rxq.clear()
        self._rx_used = 0
        self._events = 0
        self._sent = []

    # --- register helpers --------------------------------------------------------------

    def _count(self, off: int, n: int = 1) -> None:
        """Add to a 32-bit statistic, saturating at 0xFFFFFFFF."""
        i = off >> 2
        v = self.regs[i] + n
        self.regs[i] = v if v < U32 else U32

    def _count64(self, low: int, n: int) -> None:
        """Add to a 64-bit statistic pair (low dword, high dword at low + 4), saturating."""
        i = low >> 2
        v = self.regs[i] + (self.regs[i + 1] << 32) + n
        if v > U64:
            v = U64
        self.regs[i] = v & U32
        self.regs[i + 1] = v >> 32

    def _ring(self, bal: int, bah: int, dlen: int, dh: int, dt: int) -> tuple[int, int, int, int]:
        """(base, descriptors, head, tail); descriptors == 0 when there is no usable ring:
        a zero length, or head/tail beyond it (misprogramming: treated as no work)."""
        n = (self.regs[dlen >> 2] & RING_LEN_MASK) // DESC_SIZE
        head = self.regs[dh >> 2] & RING_INDEX_MASK
        tail = self.regs[dt >> 2] & RING_INDEX_MASK
        if head >= n or tail >= n:
            n = 0
        base = (self.regs[bah >> 2] << 32) | (self.regs[bal >> 2] & RING_BASE_MASK)
        return base, n, head, tail

    def _pb_capacity(self, shift: int) -> int:
        return min((self.regs[PBA >> 2] >> shift) & 0xFFFF, PB_MAX // 1024) * 1024

    # --- DMA ----------------------------------------------------------------------------

    def _view(self, addr: int, n: int, write: bool) -> memoryview | None:
        """Host memory [addr, addr + n) as a view, if it lies inside one mapped region (a
        writable one when `write`); else None. Every device access to memory goes through here."""
        for r in self.mem.regions:
            if r.addr <= addr and addr + n <= r.addr + r.size:
                if write and r.view.readonly:
                    return None
                off = addr - r.addr
                return r.view[off : off + n]
        return None

    def _dma_read(self, addr: int, n: int) -> bytes | None:
        """A copy of [addr, addr + n) (the device reads a descriptor or buffer once), or None
        with the fault counted in dma_errors."""
        v = self._view(addr, n, False)
        if v is None:
            self.dma_errors += 1
            return None
        return bytes(v)

    # --- transmit -----------------------------------------------------------------------

    def transmit(self) -> int:
        """TDT write: send what waits in the TX packet buffer, then walk the TX ring."""
        if self._in_transmit:
            return 0
        self._in_transmit = True
        try:
            self._flush_tx()
            return self._walk_tx()
        finally:
            self._in_transmit = False

    def tx_resume(self) -> int:
        """The cable can take frames again: send waiting frames, then fetch more descriptors."""
        return self.transmit()

    def _walk_tx(self) -> int:
        """Walk the legacy TX descriptors from TDH to TDT (SDM 3.3), fetching at most TX_BUDGET.

        Packet by packet: fetch its descriptors up to the one with EOP (_fetch_chain), send it,
        write back the descriptors (STA.DD where RS) and move TDH past them. A packet whose EOP
        is not queued yet stays fetched (TDH at its start) and the next walk goes on after the
        descriptors already fetched. When the budget runs out with descriptors left, the
        events say EV_TX_MORE: the Nic walks again later, after its other work."""
        if not (self.regs[TCTL >> 2] & TCTL_EN) or not self.bus_master:
            return 0
        base, n, head, tail = self._ring(TDBAL, TDBAH, TDLEN, TDH, TDT)
        if n == 0:
            return 0
        if self._chain_ring != (base, n, head) or len(self._chain) > (tail - head) % n:
            # Software moved TDH, reprogrammed the ring, or moved TDT back over fetched
            # descriptors (they are no longer the device's): what was fetched is stale.
            self._forget_chain()
        budget = TX_BUDGET
        events = 0
        consumed = 0
        while head != tail:
            if self._discard:
                if budget == 0:
                    events |= EV_TX_MORE
                    break
                budget -= 1
                events |= self._discard_one(base, head)
                used = 1
            else:
                state, budget = self._fetch_chain(base, n, head, tail, budget)
                chain = self._chain
                if state == _BUDGET:
                    events |= EV_TX_MORE
                    break
                if state == _OPEN:
                    if len(chain) < n - 1:
                        break  # the rest of the packet is not queued yet: wait for TDT to move
                    self.tx_dropped += 1  # n - 1 descriptors without EOP can never complete
                elif state == _EOP:
                    if self._tx_packet(chain):
                        break  # the TX packet buffer is full: send it after tx_resume()
                elif state == _OVERSIZE:
                    self.tx_dropped += 1
                    self._discard = True  # its remaining descriptors are consumed unread
                elif state == _FAULT and chain:
                    self.tx_dropped += 1  # the packet the fault interrupts
                for k, d in enumerate(chain):
                    if d[11] & (TXD_CMD_RS | TXD_CMD_DEXT):  # else there is nothing to write or count
                        events |= self._write_back(base, (head + k) % n, d)
                used = len(chain) + (state == _FAULT)
                chain.clear()
                self._chain_len = 0
            consumed += used
            head = (head + used) % n
            self.regs[TDH >> 2] = head
        self._chain_ring = (base, n, head)
        if consumed and head == tail:
            events |= ICR_TXQE
        return events

    def _forget_chain(self) -> None:
        self._chain.clear()
        self._chain_len = 0
        self._discard = False

    def _fetch_chain(self, base: int, n: int, head: int, tail: int, budget: int) -> tuple[int, int]:
        """Fetch the descriptors of the packet at TDH, after those already fetched, until its
        EOP, TDT, or the end of the budget; returns (how it ended, budget left).

        Each descriptor is read once into the engine: a driver changing it afterwards cannot
        change what was checked. DEXT=1 descriptors are not modeled: one at the start of a
        packet is consumed on its own, one inside a chain adds no data (its EOP is ignored).
        A packet is dropped as soon as its data can never be sent (_tx_too_long), as the
        hardware can hold no more of it than its TX packet buffer."""
        chain = self._chain
        if chain and _ends_packet(chain[-1]):
            return _EOP, budget  # fetched by an earlier walk, which found no room for it
        avail = (tail - head) % n
        while len(chain) < avail:
            if budget == 0:
                return _BUDGET, budget
            budget -= 1
            self.tx_descs_fetched += 1
            d = self._dma_read(base + (head + len(chain)) % n * DESC_SIZE, DESC_SIZE)
            if d is None:
                return _FAULT, budget
            chain.append(d)
            cmd = d[11]
            if cmd & TXD_CMD_DEXT:
                if len(chain) == 1:
                    return _LONE_DEXT, budget
                continue
            if cmd & TXD_CMD_EOP:
                return _EOP, budget
            self._chain_len += d[8] | d[9] << 8  # the data so far of a packet still open
            if self._tx_too_long(self._chain_len):
                return _OVERSIZE, budget
        return _OPEN, budget

    def _discard_one(self, base: int, idx: int) -> int:
        """Consume descriptor `idx` of a packet dropped for its size; its EOP, or a descriptor
        outside memory (which ends a chain), ends the drop. Returns the write-back's event."""
        self.tx_descs_fetched += 1
        d = self._dma_read(base + idx * DESC_SIZE, DESC_SIZE)
        if d is None:
            self._discard = False
            return 0
        if _ends_packet(d):
            self._discard = False
        return self._write_back(base, idx, d)

    def _write_back(self, base: int, idx: int, d: bytes) -> int:
        """The device is done with descriptor `idx` (fetched as `d`): STA.DD if CMD.RS (the
        status nibble rewritten, the byte's upper nibble kept). Returns the event it raises."""
        cmd = d[11]
        if cmd & TXD_CMD_DEXT:
            self.tx_dext_skipped += 1
        if not cmd & TXD_CMD_RS:
            return 0
        w = self._view(base + idx * DESC_SIZE, DESC_SIZE, True)
        if w is None:
            self.dma_errors += 1
            return 0
        w[12] = (d[12] & 0xF0) | TXD_STA_DD
        if tracepoint.enabled:
            tracepoint.emit("dev.tx.writeback", idx=idx, status="DD", TDH=self.regs[TDH >> 2])
        return EV_TX_IDE if cmd & TXD_CMD_IDE else ICR_TXDW

    def _tx_too_long(self, frame_len: int) -> bool:
        """A packet of this many bytes can never be sent: over MAX_FRAME, or larger than the
        whole TX packet buffer (PBA bits 31:16)."""
        return frame_len > MAX_FRAME or pb_record_size(frame_len) > self._pb_capacity(16)

    def _tx_packet(self, chain: list[bytes]) -> bool:
        """Build one packet from its descriptors and queue it; True = no room: stop the walk."""
        parts = []
        total = 0
        for d in chain:
            if not d[11] & TXD_CMD_DEXT:
                length = d[8] | (d[9] << 8)
                parts.append((int.from_bytes(d[0:8], "little"), length))
                total += length
        last = chain[-1]  # the EOP descriptor: its CMD, CSO and CSS apply to the packet
        cmd, cso, css = last[11], last[10], last[13]
        frame_len = total
        if self.regs[TCTL >> 2] & TCTL_PSP and frame_len < 60:
            frame_len = 60
        if cmd & TXD_CMD_IFCS:
            frame_len += 4
        rec = pb_record_size(frame_len)
        cap = self._pb_capacity(16)
        if total == 0 or frame_len > MAX_FRAME or rec > cap:  # _tx_too_long, PBA read once
            self.tx_dropped += 1
            return False
        if rec > cap - self._tx_used:
            return True
        data = bytearray()
        for addr, length in parts:
            if length:
                chunk = self._dma_read(addr, length)
                if chunk is None:
                    self.tx_dropped += 1
                    return False
                data += chunk
        if tracepoint.enabled:
            tracepoint.emit("dev.tx.dma", dev=_trace_dev(self.regs), TDH=self.regs[TDH >> 2], descs=len(chain), len=total)
        if cmd & TXD_CMD_IC and css < total and cso + 2 <= total:
            s = ones_sum(data[css:]) ^ 0xFFFF
            data[cso] = s >> 8
            data[cso + 1] = s & 0xFF
        if len(data) < frame_len - (4 if cmd & TXD_CMD_IFCS else 0):
            data += bytes(frame_len - (4 if cmd & TXD_CMD_IFCS else 0) - len(data))
        if cmd & TXD_CMD_IFCS:
            data += (zlib.crc32(data) & U32).to_bytes(4, "little")
        if tracepoint.enabled:
            tracepoint.emit("dev.tx.fcs", len=len(data), fcs=data[-4:].hex() if cmd & TXD_CMD_IFCS else "none (no IFCS)")
        self._txq.append(bytes(data))
        self._tx_used += rec
        self._flush_tx()
        return False

    def _flush_tx(self) -> None:
        """Put frames from the TX packet buffer on the wire while the cable takes them.

        The sender raises no event here: a linked peer keeps its receive events itself."""
        while self._txq:
            frame = self._txq[0]
            if tracepoint.enabled:
                tracepoint.emit("dev.tx.wire", len=len(frame), GPTC=self.regs[GPTC >> 2] + 1)
            if self.peer is not None:
                self.peer.deliver(frame)
            elif self.sink is not None:
                if not self.sink(frame):
                    break
            else:
                self._sent.append(frame)
            if self.capture is not None:  # a capture ring (nicemu.cable.capring)
                self.capture.push(frame)
            self._txq.popleft()
            self._tx_used -= pb_record_size(len(frame))
            self._count_tx(frame)

    def _count_tx(self, frame: bytes) -> None:
        n = len(frame)
        self._count(GPTC)
        self._count(TPT)
        self._count64(GOTCL, n)
        self._count64(TOTL, n)
        b = _size_bucket(n)
        if b >= 0:
            self._count(PTC64 + 4 * b)
        if n >= 6 and frame[0] & 1:
            self._count(BPTC if frame[:6] == _BROADCAST else MPTC)

    # --- receive ------------------------------------------------------------------------

    def receive(self, frame: bytes | bytearray | memoryview) -> int:
        """A frame from the cable, FCS included: checks, filter, RX packet buffer, DMA."""
        rctl = self.regs[RCTL >> 2]
        if not rctl & RCTL_EN:
            self.rx_dropped += 1  # the receiver is off: the MAC does not see the frame
            return 0
        frame = bytes(frame)
        n = len(frame)
        self._count(TPR)
        if tracepoint.enabled:
            tracepoint.emit("dev.rx.wire", dev=_trace_dev(self.regs), len=n, TPR=self.regs[TPR >> 2])
        self._count64(TORL, n)
        if n < 64:
            self._count(RUC)
            return 0
        if n > (MAX_FRAME if rctl & RCTL_LPE else 1522):
            self._count(ROC)
            return 0
        errors = 0
        if zlib.crc32(frame) != FCS_RESIDUE:
            self._count(CRCERRS)
            if not rctl & RCTL_SBP:
                return 0
            errors = RXD_ERR_CE
        if tracepoint.enabled:
            tracepoint.emit("dev.rx.fcs", ok=not errors, CRCERRS=self.regs[CRCERRS >> 2])
        if not self._accept(frame, rctl):
            return 0
        if tracepoint.enabled:
            tracepoint.emit("dev.rx.filter", verdict="accept", dst=frame[:6].hex(":"), RCTL=hex(rctl))
        rec = pb_record_size(n)
        if rec > self._pb_capacity(0) - self._rx_used:
            self._count(MPC)
            return ICR_RXO
        if not errors:
            self._count(GPRC)
            self._count64(GORCL, n)
            b = _size_bucket(n)
            if b >= 0:
                self._count(PRC64 + 4 * b)
            if frame[0] & 1:
                self._count(BPRC if frame[:6] == _BROADCAST else MPRC)
        status, err2, csum = rx_checksum_offload(memoryview(frame)[: n - 4], self.regs[RXCSUM >> 2])
        entry = _RxEntry(frame, status, errors | err2, csum)
        self._rxq.append(entry)
        self._rx_used += rec
        if tracepoint.enabled:
            tracepoint.emit("dev.rx.pktbuf", bytes_used=self._rx_used, GPRC=self.regs[GPRC >> 2])
        events, no_desc = self._drain()
        if no_desc and self._rxq and self._rxq[-1] is entry:
            self._count(RNBC)
        return events

    def _accept(self, frame: bytes, rctl: int) -> bool:
        """Receive address filtering (SDM 3.2.1; RCTL, RAL/RAH, MTA), in the reference's order.

        1. Broadcast (ff:ff:ff:ff:ff:ff) is accepted only if RCTL.BAM: with BAM clear no other
           filter passes it (not MPE, not its MTA bit, not an exact entry).
        2. Another group address: RCTL.MPE, an exact RAL/RAH entry, or its MTA hash bit.
        3. An individual address: RCTL.UPE, or an exact RAL/RAH entry (AV set, AS = 00)."""
        dst = frame[:6]
        if dst == _BROADCAST:
            return bool(rctl & RCTL_BAM)
        multicast = dst[0] & 1
        if multicast and rctl & RCTL_MPE:
            return True
        if not multicast and rctl & RCTL_UPE:
            return True
        regs = self.regs
        lo = dst[0] | dst[1] << 8 | dst[2] << 16 | dst[3] << 24
        hi = dst[4] | dst[5] << 8
        for i in range(RA >> 2, (RA >> 2) + 2 * RA_ENTRIES, 2):  # RAL[k] at i, RAH[k] at i + 1
            rah = regs[i + 1]
            if rah & RAH_AV and not rah & RAH_AS and regs[i] == lo and rah & 0xFFFF == hi:
                return True
        if multicast:
            h = (hi >> _MTA_SHIFT[(rctl >> 12) & 3]) & 0xFFF
            if regs[(MTA >> 2) + (h >> 5)] >> (h & 31) & 1:
                return True
        return False

    def drain_rx(self) -> int:
        """RDT write (or RCTL.EN / bus master turned on): DMA frames waiting in the RX buffer."""
        return self._drain()[0]

    def _drain(self) -> tuple[int, bool]:
        """DMA waiting frames into free RX descriptors (SDM 3.2.3-3.2.6).

        Returns (events, stopped for lack of descriptors). A frame is written whole or not at
        all: it waits until enough descriptors are free for all its buffers."""
        rctl = self.regs[RCTL >> 2]
        if not self.bus_master or not rctl & RCTL_EN or not self._rxq:
            return 0, False
        base, n, head, tail = self._ring(RDBAL, RDBAH, RDLEN, RDH, RDT)
        if n == 0:
            return 0, True
        bufsize = rx_buffer_size(rctl)
        secrc = rctl & RCTL_SECRC
        events = 0
        no_desc = False
        while self._rxq:
            e = self._rxq[0]
            data = e.frame[:-4] if secrc else e.frame
            need = (len(data) + bufsize - 1) // bufsize
            if need > n - 1:
                self.rx_dropped += 1  # more buffers than the ring can ever offer
            else:
                if (tail - head) % n < need:
                    no_desc = True
                    break
                # Fetch and check every descriptor and buffer before writing anything.
                descs = []
                for k in range(need):
                    desc = self._view(base + ((head + k) % n) * DESC_SIZE, DESC_SIZE, True)
                    if desc is None:
                        break
                    chunk = min(bufsize, len(data) - k * bufsize)
                    buf = self._view(int.from_bytes(desc[0:8], "little"), chunk, True)
                    if buf is None:
                        break
                    descs.append((desc, buf))
                if len(descs) < need:
                    self.dma_errors += 1
                    self.rx_dropped += 1
                else:
                    if tracepoint.enabled:
                        tracepoint.emit("dev.rx.dma", idx=head, len=len(data), buffers=need)
                    for k, (desc, buf) in enumerate(descs):
                        buf[:] = data[k * bufsize : k * bufsize + len(buf)]
                        if k < need - 1:
                            status, errors, csum = RXD_STA_DD, 0, 0
                        else:
                            status, errors, csum = RXD_STA_DD | RXD_STA_EOP | e.status, e.errors, e.csum
                        # length, checksum, errors and special first; the status byte last
                        desc[8:12] = (len(buf) | csum << 16).to_bytes(4, "little")
                        desc[13:16] = bytes((errors, 0, 0))
                        desc[12] = status
                    if tracepoint.enabled:
                        tracepoint.emit("dev.rx.writeback", idx=(head + need - 1) % n, status="DD|EOP", RDH=(head + need) % n, RDT=tail)
                    head = (head + need) % n
                    self.regs[RDH >> 2] = head
                    self.rx_written += 1
                    events |= EV_RX_DONE
                    free = (tail - head) % n
                    rdmts = (rctl >> 8) & 3
                    if free * DESC_SIZE <= (n * DESC_SIZE) >> (rdmts + 1):
                        events |= ICR_RXDMT0
            self._rxq.popleft()
            self._rx_used -= pb_record_size(len(e.frame))
        return events, no_desc
