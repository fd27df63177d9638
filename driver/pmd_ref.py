"""The PMD's ring logic in plain Python: the readable reference of driver/_pmd.pyx.

Same class, same state, same results as the Cython `Core` (tests/driver/test_pmd_agree.py runs both
on random bursts and compares every byte). It is slow by design - a Python step per packet,
ixy.py's 0.16 Mpps - and exists so a reader can check the fast path against the SDM.

Descriptor traps, as they bite here:
- RX: the device writes length/errors first and the status byte (DD) last, so status is read
  first and nothing else is trusted before DD. (In C that is an acquire load; here every
  read is a separate interpreter step after the DD test, which cannot be hoisted above it.)
- RX: RDT == RDH means "no buffers" to the device, so the tail is written one behind the
  next descriptor to clean: one descriptor always stays out of the device's hands.
- RX: a refilled descriptor must have its status cleared, or last lap's DD reads as new.
- TX: RS only on the last descriptor of each batch; the device writes DD only there, and
  only whole queued batches are checked (a slot not yet reused still holds last lap's DD).

The device is not trusted (docs/security.md): whatever it writes into a descriptor, a burst
ends after at most one lap of the ring, and a length outside ETH_HLEN..the buffer's data room
is dropped as an error (`rx_bad_length`), never handed to the application as data_len.
"""
from __future__ import annotations

import struct
from array import array

from driver.mempool import Mempool
from nicemu import tracepoint
from nicemu.regs import (DESC_SIZE, RDT, RXD_ERRORS, RXD_LENGTH, RXD_STATUS, TDT, TXD_STA,
                         RxdErrors, RxdStatus, TxdCmd, TxdSta)

__all__ = ["RefCore", "burst_error", "check_geometry", "RX_MIN_LEN"]

_QQ = struct.Struct("<QQ")
_U16 = struct.Struct("<H")
# Errors that make the frame itself bad (the device stores such frames only with RCTL.SBP):
# drop them. IPE/TCPE are checksum-offload verdicts on a good frame: deliver, note in ol_flags.
RX_FRAME_ERRORS = int(RxdErrors.CE | RxdErrors.SE | RxdErrors.SEQ | RxdErrors.CXE | RxdErrors.RXE)
TX_CMD = int(TxdCmd.EOP | TxdCmd.IFCS)  # one-descriptor frames; the device appends the FCS
RX_MIN_LEN = 14  # an Ethernet header: anything shorter written back as a frame is a bad length


def check_geometry(pool: Mempool, rx_ring: int, rx_count: int, tx_ring: int, tx_count: int,
                   rx_free_thresh: int, tx_rs_thresh: int) -> None:
    """The constraints the ring logic relies on (same checks as the Cython core)."""
    for name, count in (("RX", rx_count), ("TX", tx_count)):
        if count < 8 or count % 8 or count > 65536:
            raise ValueError(f"{name} ring size must be a multiple of 8 in 8..65536, got {count}")
    if not 1 <= rx_free_thresh < rx_count:
        raise ValueError(f"rx_free_thresh must be in 1..{rx_count - 1}, got {rx_free_thresh}")
    if tx_rs_thresh < 1 or tx_count % tx_rs_thresh or tx_rs_thresh >= tx_count:
        raise ValueError(f"tx_rs_thresh must divide the TX ring size {tx_count} and be smaller, got {tx_rs_thresh}")
    for name, addr, count in (("RX", rx_ring, rx_count), ("TX", tx_ring, tx_count)):
        if addr % 16 or not pool.region.contains(addr, count * DESC_SIZE):
            raise ValueError(f"{name} ring {addr:#x} is unaligned or outside the pool's DMA region")


def burst_error(pool: Mempool, burst: list[int], for_tx: bool) -> None:
    """Raise the ValueError for the last entry of `burst`, the first one that is bad."""
    j = burst[-1]
    if j >= pool.num_bufs:
        raise ValueError(f"mbuf index {j} is not in the pool of {pool.num_bufs}")
    if pool.refcnt[j] == 0:
        raise ValueError(f"mbuf {j} is free")
    times = burst.count(j)
    if times > pool.refcnt[j]:
        raise ValueError(f"mbuf {j} appears {times} times in the burst but holds {pool.refcnt[j]} reference(s)")
    raise ValueError(f"mbuf {j} has no sendable data (off {pool.data_off[j]}, len {pool.data_len[j]})")


class RefCore:
    """One RX and one TX queue over one Mempool; see driver/_pmd.pyx `Core` for the contract."""

    def __init__(self, pool: Mempool, rx_ring: int, rx_count: int, tx_ring: int, tx_count: int,
                 write32, rx_free_thresh: int = 32, tx_rs_thresh: int = 32) -> None:
        check_geometry(pool, rx_ring, rx_count, tx_ring, tx_count, rx_free_thresh, tx_rs_thresh)
        self.mm = pool.region.mm
        self.rxd = rx_ring - pool.region.addr  # offsets into the region's mapping
        self.txd = tx_ring - pool.region.addr
        self.rx_count, self.tx_count = rx_count, tx_count
        self.rx_free_thresh, self.tx_rs_thresh = rx_free_thresh, tx_rs_thresh
        self.rx_next = self.rx_hold = self.rx_discard = 0  # next_to_clean, held for RDT
        self.tx_next = self.tx_clean = 0  # next_to_use, next_to_clean
        self.rx_slot = array("I", [0]) * rx_count
        self.tx_slot = array("I", [0]) * tx_count
        self.pool = pool
        self.write32 = write32
        self.ipackets = self.ibytes = self.opackets = self.obytes = 0
        self.ierrors = self.rx_nombuf = self.rx_doorbells = self.tx_doorbells = 0
        self.rx_bad_length = 0  # of ierrors: write-backs whose length no buffer can hold

    # --- pool helpers -----------------------------------------------------------------------
    def _get(self) -> int:
        return self.pool.alloc_index()  # caller checked the pool is not empty

    def _put(self, idx: int) -> None:
        self.pool.free_index(idx)

    def _rx_attach(self, slot: int, idx: int) -> None:
        p = self.pool
        _QQ.pack_into(self.mm, self.rxd + slot * DESC_SIZE, p.addr + idx * p.buf_size + p.headroom, 0)
        self.rx_slot[slot] = idx

    def _checked(self, idx: array, n: int, start: int, for_tx: bool) -> None:
        if n < 0 or start < 0 or start + n > len(idx) or idx.typecode != "I":
            raise ValueError(f"bad burst: {n} mbufs from {start} of an array('{idx.typecode}') of {len(idx)}")
        p, seen = self.pool, {}
        for k, j in enumerate(idx[start : start + n]):
            seen[j] = seen.get(j, 0) + 1
            if j >= p.num_bufs or seen[j] > p.refcnt[j] or (for_tx and (
                    p.data_len[j] == 0 or p.data_off[j] + p.data_len[j] > p.buf_size)):
                burst_error(p, list(idx[start : start + k + 1]), for_tx)

    def alloc_bulk(self, out: array, n: int, length: int = 0) -> int:
        if n < 0 or n > len(out):
            raise ValueError(f"cannot allocate {n} mbufs into an array of {len(out)}")
        p = self.pool
        if length < 0 or length > p.buf_size - p.headroom:
            raise ValueError(f"data length {length} does not fit a {p.buf_size - p.headroom}-byte data room")
        if p.available < n:
            return 0
        for k in range(n):
            idx = self._get()
            p.data_len[idx] = length
            out[k] = idx
        return n

    def free_bulk(self, idx: array, n: int, start: int = 0) -> None:
        self._checked(idx, n, start, False)
        for j in idx[start : start + n]:
            self._put(j)

    # --- RX ---------------------------------------------------------------------------------
    def rx_init(self) -> int:
        if self.pool.available < self.rx_count:
            raise ValueError(f"the pool has {self.pool.available} buffers, the RX ring needs {self.rx_count}")
        for i in range(self.rx_count):
            self._rx_attach(i, self._get())
        self.rx_next = self.rx_hold = self.rx_discard = 0
        return self.rx_count - 1

    def rx_burst(self, out: array, n: int) -> int:
        if n < 0 or n > len(out) or out.typecode != "I":
            raise ValueError(f"cannot take {n} mbufs into an array('{out.typecode}') of {len(out)}")
        mm, p = self.mm, self.pool
        room = p.buf_size - p.headroom
        i, got, taken = self.rx_next, 0, 0
        while got < n and taken < self.rx_count:  # one lap at most, whatever the device writes
            d = self.rxd + i * DESC_SIZE
            st = mm[d + RXD_STATUS]  # DD first
            if not st & RxdStatus.DD:
                break
            err = mm[d + RXD_ERRORS]
            (length,) = _U16.unpack_from(mm, d + RXD_LENGTH)
            bad_length = not RX_MIN_LEN <= length <= room
            if self.rx_discard or err & RX_FRAME_ERRORS or not st & RxdStatus.EOP or bad_length:
                mm[d + 8 : d + 16] = bytes(8)  # drop; the same buffer goes back
                if st & RxdStatus.EOP:
                    self.ierrors += 1
                    if bad_length and not self.rx_discard:  # a frame's last piece may be short
                        self.rx_bad_length += 1
                    self.rx_discard = 0
                else:
                    self.rx_discard = 1
            else:
                if p.available == 0:
                    self.rx_nombuf += 1  # leave the frame in the ring
                    break
                idx = self.rx_slot[i]
                p.data_len[idx] = length
                p.ol_flags[idx] = st | err << 8
                self.ibytes += length
                out[got] = idx
                got += 1
                if tracepoint.enabled:
                    tracepoint.emit("pmd.rx_burst.dd", idx=i, len=length, mbuf=idx, zero_copy=True)
                self._rx_attach(i, self._get())
            taken += 1
            i = (i + 1) % self.rx_count
        self.rx_next = i
        self.ipackets += got
        self.rx_hold += taken
        if self.rx_hold and self.rx_hold >= self.rx_free_thresh:
            self._rx_doorbell()
        return got

    def _rx_doorbell(self) -> None:
        if tracepoint.enabled:
            tracepoint.emit("pmd.rx.refill", RDT=(self.rx_next - 1) % self.rx_count, rx_doorbells=self.rx_doorbells + 1)
        self.write32(RDT, (self.rx_next - 1) % self.rx_count)  # one behind next_to_clean
        self.rx_doorbells += 1
        self.rx_hold = 0

    def rx_flush(self) -> bool:
        if self.rx_hold:
            self._rx_doorbell()
            return True
        return False

    def rx_ready(self) -> bool:
        return bool(self.mm[self.rxd + self.rx_next * DESC_SIZE + RXD_STATUS] & RxdStatus.DD)

    # --- TX ---------------------------------------------------------------------------------
    def _tx_free(self) -> int:
        return (self.tx_clean - self.tx_next - 1) % self.tx_count

    def tx_reclaim(self) -> int:
        cleaned, rs = 0, self.tx_rs_thresh
        while (self.tx_next - self.tx_clean) % self.tx_count >= rs:
            last = self.tx_clean + rs - 1
            if not self.mm[self.txd + last * DESC_SIZE + TXD_STA] & TxdSta.DD:
                break
            for k in range(self.tx_clean, self.tx_clean + rs):
                self._put(self.tx_slot[k])
            self.tx_clean = (self.tx_clean + rs) % self.tx_count
            cleaned += rs
        return cleaned

    def tx_room(self) -> int:
        self.tx_reclaim()
        return self._tx_free()

    def tx_burst(self, idx: array, n: int, start: int = 0) -> int:
        self._checked(idx, n, start, True)
        self.tx_reclaim()
        p, t = self.pool, self.tx_next
        sent = min(n, self._tx_free())
        for j in idx[start : start + sent]:
            cmd = TX_CMD | (TxdCmd.RS if t % self.tx_rs_thresh == self.tx_rs_thresh - 1 else 0)
            addr = p.addr + j * p.buf_size + p.data_off[j]
            _QQ.pack_into(self.mm, self.txd + t * DESC_SIZE, addr, p.data_len[j] | int(cmd) << 24)
            self.tx_slot[t] = j
            self.obytes += p.data_len[j]
            if tracepoint.enabled:
                tracepoint.emit("pmd.tx_burst", idx=t, mbuf=j, len=p.data_len[j], rs=bool(cmd & TxdCmd.RS))
            t = (t + 1) % self.tx_count
        if sent:
            self.tx_next = t
            self.opackets += sent
            if tracepoint.enabled:
                tracepoint.emit("pmd.tx.doorbell", TDT=t, tx_doorbells=self.tx_doorbells + 1)
            self.write32(TDT, t)
            self.tx_doorbells += 1
        return sent

    def tx_in_flight(self) -> int:
        return (self.tx_next - self.tx_clean) % self.tx_count

    def release_all(self) -> None:
        for i in range(self.rx_count):
            if self.pool.refcnt[self.rx_slot[i]]:
                self._put(self.rx_slot[i])
        while self.tx_clean != self.tx_next:
            self._put(self.tx_slot[self.tx_clean])
            self.tx_clean = (self.tx_clean + 1) % self.tx_count
        self.rx_hold = 0
