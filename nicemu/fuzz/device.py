"""Fuzzing the device in-process: the Python and the Cython engine side by side.

Each case builds two Nics, `Nic(mem, engine="python")` and `engine="cython"`, over DMA memory
with the same contents (a writable region at bus address 0, a read-only one above it, gaps
around both), then applies the same random operations to both:

- frames from the cable: every length from 0 to beyond the largest (16,384), good and bad FCS,
  random bytes, frames for the device's MAC, broadcast, multicast (exact, hashed, other) and
  other unicast, some IPv4/UDP for checksum offload;
- register writes in random order: random offsets in BAR0 (unaligned ones too) with random
  values, the ring and control registers with values near and far from sane, CTRL.RST;
  reads with their side effects; offsets outside BAR0;
- descriptor rings with random contents: addresses inside, across and outside the regions,
  random lengths and command bits; TDT and RDT doorbells (also as write_tail runs);
- sane ring setups now and then, so that frames really flow; bus mastering, link, cable
  back-pressure and timers.

Checked after every operation: nothing raised but the documented ValueError for an offset
outside BAR0; no hang (a TX walk that ran out of budget finishes within ring / TX_BUDGET more
walks); both engines left identical registers, memory, transmitted frames, line state, timers
and diagnostics counters; the read-only region is untouched; every frame that went in is
accounted for: the receiver was off (rx_dropped), or a statistic counts it (RUC, ROC,
CRCERRS, MPC), or the filter refused it (by an independent oracle of docs/reference's rules),
or it entered the RX packet buffer and is then written to the ring (rx_written), dropped with
a count (rx_dropped), still waiting (rx_queued) or lost to a reset; frames sent match GPTC.
"""
from __future__ import annotations

import fcntl
import operator
import os
import random
import signal
import struct
import threading
import zlib
from typing import Any, Callable

from nicemu import regs as R
from nicemu.datapath_ref import TX_BUDGET
from nicemu.dma import DmaMemory
from nicemu.fcs import FCS_RESIDUE
from nicemu.fuzz import FuzzFailure, FuzzReport
from nicemu.nic import Nic

__all__ = ["run", "run_case"]

MAC = bytes.fromhex("525400123456")
WR_SIZE = 0x30000  # writable region at bus address 0: rings, buffers
RO_ADDR, RO_SIZE = 0x40000, 0x4000  # read-only region: the device may read it, never write it
RX_RING, TX_RING = 0x0000, 0x0400  # where the sane setups put the rings (64 descriptors each)
RX_BUFS, TX_BUFS = 0x8000, 0x28000  # and their buffers (64 and 16 of 2 KiB)
OPS_PER_CASE = (8, 32)
MAX_WALKS = (R.RING_LEN_MASK // R.DESC_SIZE) // TX_BUDGET + 2  # walks one doorbell can need
CASE_SECONDS = 20  # the watchdog: a case that takes longer is a hang
ENGINES = ("python", "cython")
ENGINE_COUNTERS = ("dma_errors", "tx_dropped", "tx_dext_skipped", "tx_descs_fetched", "rx_dropped",
                   "rx_written", "rx_queued", "tx_queued")
_engine_counters = operator.attrgetter(*ENGINE_COUNTERS)
RX_STATS = {"TPR": R.TPR, "RUC": R.RUC, "ROC": R.ROC, "CRCERRS": R.CRCERRS, "MPC": R.MPC, "GPRC": R.GPRC}
# registers worth hitting more often than a random offset would
HOT_REGS = (R.CTRL, R.ICR, R.ICS, R.IMS, R.IMC, R.ITR, R.RCTL, R.TCTL, R.PBA, R.RDBAL, R.RDBAH,
            R.RDLEN, R.RDH, R.RDT, R.RDTR, R.RADV, R.TDBAL, R.TDBAH, R.TDLEN, R.TDH, R.TDT, R.TIDV,
            R.TADV, R.RXCSUM, R.RAL(0), R.RAH(0), R.RAL(1), R.RAH(1), R.MTA, R.MTA + 4 * 0x56,
            R.EERD, R.MDIC, R.GPTC, R.GPRC, R.TPR, R.STATUS)


class _Clock:
    """The clock both Nics read (ns), moved only by the fuzzer."""

    def __init__(self) -> None:
        self.now = 1_000_000_000

    def __call__(self) -> int:
        return self.now


def _sealed_memfd(data: bytes) -> int:
    fd = os.memfd_create("nicemu-fuzz", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, len(data))
        os.pwrite(fd, data, 0)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Device:
    """One Nic of the pair, its memory, its cable and what the fuzzer counted for it."""

    def __init__(self, engine: str, clock: _Clock, wr: bytes, ro: bytes, answers: list[bool]) -> None:
        self.mem = DmaMemory()
        self.mem.map_fd(_sealed_memfd(wr), 0, WR_SIZE)
        self.mem.map_fd(_sealed_memfd(ro), RO_ADDR, RO_SIZE, writable=False)
        self.nic = Nic(self.mem, mac=MAC, clock=clock, engine=engine)
        self.answers = list(answers)
        self.wire: list[bytes] = []  # frames the cable took
        self.entered = 0  # frames that entered the RX packet buffer
        self.off = 0  # frames the receiver did not see (RCTL.EN clear): in rx_dropped
        self.lost_at_reset = 0  # frames a reset emptied out of the RX packet buffer
        self.timer_runs = 0  # run_timers() calls an event loop would have made (TX continuations too)
        self.wire_seen = 0  # len(wire) at the last check
        self.sent = 0  # frames that left the device (to the cable or transmitted())

    def sink(self, frame: bytes) -> bool:
        ok = self.answers.pop() if self.answers else True
        if ok:
            self.wire.append(frame)
        return ok

    def counters(self) -> dict[str, int]:
        return dict(zip(ENGINE_COUNTERS, _engine_counters(self.nic.engine)))

    def stats(self) -> dict[str, int]:
        regs = self.nic.regs
        return {k: regs[off >> 2] for k, off in RX_STATS.items()}

    def close(self) -> None:
        self.mem.close()


# --- the receive oracle: docs/reference/e1000-subset.md, written out independently ---------------

def _accepted(regs: Any, dst: bytes) -> bool:
    """Receive filtering (reference "Receive filtering"; broadcast only with BAM)."""
    rctl = regs[R.RCTL >> 2]
    if dst == b"\xff" * 6:
        return bool(rctl & R.Rctl.BAM)
    group = dst[0] & 1
    if group and rctl & R.Rctl.MPE or not group and rctl & R.Rctl.UPE:
        return True
    for k in range(R.RA_ENTRIES):
        ral, rah = regs[(R.RAL(k) >> 2)], regs[(R.RAH(k) >> 2)]
        if rah & R.Rah.AV and not rah & 0x30000 and dst == ral.to_bytes(4, "little") + (rah & 0xFFFF).to_bytes(2, "little"):
            return True
    if group:
        h = ((dst[4] | dst[5] << 8) >> (4, 3, 2, 0)[(rctl >> 12) & 3]) & 0xFFF
        return bool(regs[(R.MTA >> 2) + (h >> 5)] >> (h & 31) & 1)
    return False


def _expected_rx(regs: Any, frame: bytes) -> tuple[str, bool]:
    """What the device must do with `frame` (off, runt, oversize, crc, filtered or accepted),
    and whether its FCS is bad (with RCTL.SBP a bad frame goes on: counted, then filtered)."""
    rctl = regs[R.RCTL >> 2]
    if not rctl & R.Rctl.EN:
        return "off", False
    n = len(frame)
    if n < R.ETH_ZLEN_FCS:
        return "runt", False
    if n > (R.ETH_MAX_LPE if rctl & R.Rctl.LPE else R.ETH_MAX_FCS):
        return "oversize", False
    bad = zlib.crc32(frame) != FCS_RESIDUE
    if bad and not rctl & R.Rctl.SBP:
        return "crc", True
    return ("accepted" if _accepted(regs, frame[:6]) else "filtered"), bad


# --- one case -----------------------------------------------------------------------------------

class _Case:
    def __init__(self, case_seed: int, report: FuzzReport, where: str, log: Callable[[str], None] | None) -> None:
        self.rng = random.Random(case_seed)
        self.report = report
        self.where = where
        self.log = log
        self.clock = _Clock()
        rng = self.rng
        self.ro = rng.randbytes(RO_SIZE)
        wr = rng.randbytes(WR_SIZE) if rng.random() < 0.5 else bytes(WR_SIZE)
        answers = [rng.random() < 0.75 for _ in range(64)]  # the cable's: False = busy
        self.devs = [_Device(e, self.clock, wr, self.ro, answers) for e in ENGINES]
        self.did_reset = False  # set by an operation that reset the devices
        self.read_clear = False  # set by an operation that read registers (clear-on-read)
        if rng.random() < 0.5:
            for d in self.devs:
                d.nic.attach(d.sink)

    def fail(self, step: str, what: str) -> None:
        raise FuzzFailure(f"device fuzz {self.where}, {step}: {what}")

    # --- running -------------------------------------------------------------------------------

    def run(self) -> None:
        ops = [(self.op_frame, 30), (self.op_setup, 6), (self.op_tx_packets, 8), (self.op_long_chain, 0.6),
               (self.op_reg_write, 12), (self.op_hot_write, 12), (self.op_reg_read, 6),
               (self.op_outside_bar0, 2), (self.op_tx_descs, 8), (self.op_rx_descs, 5), (self.op_tdt, 10),
               (self.op_rdt, 6), (self.op_write_tail, 3), (self.op_reset, 2), (self.op_bus_master, 2),
               (self.op_link, 1), (self.op_timers, 4), (self.op_tx_ready, 3)]
        funcs, weights = zip(*ops)
        try:
            self.enable()
            for k in range(self.rng.randint(*OPS_PER_CASE)):
                op = self.rng.choices(funcs, weights)[0]
                step = f"op {k} {op.__name__[3:]}"
                before = [(d.nic.engine.rx_queued, d.nic.regs[R.GPTC >> 2]) for d in self.devs]
                self.did_reset = self.read_clear = False
                detail = op(step)
                if self.log is not None:
                    self.log(f"{self.where} {step} {detail}")
                self.settle(step)
                self.check(step, before)
            self.summarize()
        finally:
            for d in self.devs:
                d.close()

    def each(self, step: str, fn: Callable[[_Device], Any]) -> list[Any]:
        """fn(device) on both devices, which must answer alike; any exception is a failure (the
        one documented ValueError, an offset outside BAR0, is expected by op_outside_bar0)."""
        out = []
        for d in self.devs:
            try:
                out.append(fn(d))
            except FuzzFailure:
                raise
            except Exception as e:  # noqa: BLE001 - whatever it is, it is the finding
                self.fail(step, f"{d.nic.engine.__class__.__name__}: {type(e).__name__}: {e}")
        if out[0] != out[1]:
            self.fail(step, f"the engines answered differently: {out[0]!r} != {out[1]!r}")
        return out

    def settle(self, step: str) -> None:
        """What an event loop does next: the timers that are due, and TX walks that ran out of
        budget, until nothing is due; bounded, or the device hangs."""
        for d in self.devs:
            for _ in range(MAX_WALKS + 1):
                due = d.nic.next_deadline()
                if due is None or due > self.clock.now:
                    break
                d.nic.run_timers()
                d.timer_runs += 1
            else:
                self.fail(step, f"still due after {MAX_WALKS} runs of the timers: a TX walk without end")

    def check(self, step: str, before: list[tuple[int, int]]) -> None:
        a, b = self.devs
        if a.nic.regs != b.nic.regs:
            diff = [f"{R.REGISTER_NAMES.get(4 * i, hex(4 * i))}: {x:#x} != {y:#x}"
                    for i, (x, y) in enumerate(zip(a.nic.regs, b.nic.regs)) if x != y]
            self.fail(step, "registers differ: " + ", ".join(diff[:8]))
        counters = [d.counters() for d in self.devs]
        for what, x, y in (("line", a.nic.irq, b.nic.irq), ("counters", *counters),
                           ("next deadline", a.nic.next_deadline(), b.nic.next_deadline()),
                           ("cable", a.wire, b.wire)):
            if x != y:
                self.fail(step, f"{what} differ: {x} != {y}")
        sent = [d.nic.transmitted() for d in self.devs]
        if sent[0] != sent[1]:
            self.fail(step, "transmitted frames differ")
        if a.mem.read(0, WR_SIZE) != b.mem.read(0, WR_SIZE):
            self.fail(step, "memory differs")
        if a.mem.read(RO_ADDR, RO_SIZE) != self.ro or b.mem.read(RO_ADDR, RO_SIZE) != self.ro:
            self.fail(step, "the read-only region was written")
        for d, (queued, gptc), out, c in zip(self.devs, before, sent, counters):
            if self.did_reset:  # a reset empties the RX packet buffer: those frames are gone
                d.lost_at_reset += queued
            if d.entered != c["rx_written"] + (c["rx_dropped"] - d.off) + c["rx_queued"] + d.lost_at_reset:
                self.fail(step, f"frames unaccounted for: {d.entered} entered the RX packet buffer, "
                                f"{c['rx_written']} written, {c['rx_dropped'] - d.off} dropped, "
                                f"{c['rx_queued']} waiting, {d.lost_at_reset} lost to resets")
            gone = len(out) + len(d.wire) - d.wire_seen
            d.wire_seen = len(d.wire)
            d.sent += gone
            if not (self.did_reset or self.read_clear):  # a statistics read or a reset clears GPTC
                moved = (d.nic.regs[R.GPTC >> 2] - gptc) & 0xFFFFFFFF
                if moved != gone:
                    self.fail(step, f"GPTC moved by {moved}, {gone} frames left the device")

    def summarize(self) -> None:
        d = self.devs[0]
        c = d.counters()
        for key in ("dma_errors", "tx_dropped", "rx_dropped", "rx_written", "tx_dext_skipped"):
            if c[key]:
                self.report.saw(key, c[key])
        if d.timer_runs:
            self.report.saw("timer_runs", d.timer_runs)
        if d.lost_at_reset:
            self.report.saw("rx_lost_at_reset", d.lost_at_reset)
        if d.sent:
            self.report.saw("tx_frames_sent", d.sent)

    # --- device state a case starts from, and sane setups -------------------------------------

    def enable(self) -> None:
        """Bus mastering on, and most of the time sane rings: a case should see frames flow."""
        self.each("enable", lambda d: d.nic.config_write(0x04, int(R.PciCommand.MEMORY | R.PciCommand.MASTER), 2))
        if self.rng.random() < 0.6:
            self.op_setup("setup")

    def op_setup(self, step: str) -> str:
        """Sane RX and TX rings (random size, buffer size, filters), as a driver's bring-up."""
        rng = self.rng
        rx_n, tx_n = rng.choice([8, 16, 32, 64]), rng.choice([8, 16, 64])
        rctl = int(R.Rctl.EN)
        for bit, p in ((R.Rctl.BAM, 0.7), (R.Rctl.SBP, 0.25), (R.Rctl.UPE, 0.2), (R.Rctl.MPE, 0.2),
                       (R.Rctl.LPE, 0.4), (R.Rctl.SECRC, 0.25)):
            if rng.random() < p:
                rctl |= int(bit)
        rctl |= rng.randrange(4) << R.RCTL_MO_SHIFT | rng.randrange(4) << R.RCTL_RDMTS_SHIFT
        if rng.random() < 0.3:
            rctl |= int(R.Rctl.BSEX) | rng.randrange(1, 4) << R.RCTL_BSIZE_SHIFT
        descs = b"".join(R.RX_DESC.pack(RX_BUFS + k * 2048, 0, 0, 0, 0, 0) for k in range(rx_n))
        writes = [(R.RDBAL, RX_RING), (R.RDBAH, 0), (R.RDLEN, rx_n * 16), (R.RDH, 0), (R.RDT, rx_n - 1),
                  (R.TDBAL, TX_RING), (R.TDBAH, 0), (R.TDLEN, tx_n * 16), (R.TDH, 0), (R.TDT, 0),
                  (R.RXCSUM, rng.choice([0, 0x100, 0x200, 0x300])), (R.MTA + 4 * 0x56, 1 << 3),
                  (R.RAL(1), 0x0000AA01), (R.RAH(1), 0x5634 | int(R.Rah.AV)),
                  (R.TCTL, int(R.Tctl.EN) | (int(R.Tctl.PSP) if rng.random() < 0.7 else 0)), (R.RCTL, rctl),
                  (R.IMS, rng.getrandbits(17))]

        def setup(d: _Device) -> None:
            d.mem.write(RX_RING, descs)
            for off, value in writes:
                d.nic.write32(off, value)

        self.each(step, setup)
        self.report.tried("setup")
        return f"rx {rx_n} tx {tx_n} rctl {rctl:#x}"

    # --- frames -------------------------------------------------------------------------------

    def draw_frame(self) -> tuple[str, bytes]:
        rng = self.rng
        kind = rng.choice(["mine", "mine", "broadcast", "mcast_exact", "mcast_hash", "mcast_other",
                           "unicast_other", "random_bytes", "udp"])
        pick = rng.random()
        if pick < 0.35:
            size = rng.randrange(0, R.ETH_MAX_LPE + 64)  # any length, beyond the largest too
        elif pick < 0.65:
            size = rng.choice([rng.randrange(0, 70), rng.randrange(1514, 1530),
                               rng.randrange(R.ETH_MAX_LPE - 8, R.ETH_MAX_LPE + 8)])
        else:
            size = rng.randrange(60, 1519)
        if kind == "random_bytes":
            return kind, rng.randbytes(size)
        dst = {"mine": MAC, "broadcast": b"\xff" * 6, "mcast_exact": bytes.fromhex("01aa00123456"),
               "mcast_hash": bytes([1, 0, 0x5E, 0, 0x60, 0x05]), "mcast_other": bytes([1]) + rng.randbytes(5),
               "unicast_other": bytes([rng.randrange(256) & 0xFE]) + rng.randbytes(5), "udp": MAC}[kind]
        body = dst + bytes.fromhex("020000000099")
        if kind == "udp":
            payload = rng.randbytes(max(0, size - 46))
            udp = struct.pack("!HHHH", 53, 5353, 8 + len(payload), 0) + payload
            ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                                       bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2])))
            if rng.random() < 0.7:  # a good header checksum (RFC 1071), else 0: a bad one
                words = sum(struct.unpack("!10H", ip))
                words = (words & 0xFFFF) + (words >> 16)
                ip[10:12] = struct.pack("!H", ~((words & 0xFFFF) + (words >> 16)) & 0xFFFF)
            body += b"\x08\x00" + bytes(ip) + udp
        else:
            body += b"\x88\xb5" + rng.randbytes(max(0, size - 18))
        body = body[: max(0, size - 4)]
        frame = body + struct.pack("<I", zlib.crc32(body))
        frame = frame[:size]
        if frame and rng.random() < 0.12:  # bad FCS: one bit flipped anywhere
            i = rng.randrange(len(frame))
            frame = frame[:i] + bytes([frame[i] ^ 1 << rng.randrange(8)]) + frame[i + 1:]
        return kind, frame

    def op_frame(self, step: str) -> str:
        kind, frame = self.draw_frame()
        expected = _expected_rx(self.devs[0].nic.regs, frame)
        self.report.tried("frame_" + kind)

        def receive(d: _Device) -> str:
            stats, counters = d.stats(), d.counters()
            d.nic.receive(frame)
            return self.account(step, d, expected, stats, counters)

        outcome = self.each(step, receive)[0]
        self.report.saw("rx_" + outcome)
        return f"{kind} {len(frame)} bytes: {outcome}"

    def account(self, step: str, d: _Device, expected: tuple[str, bool], s0: dict, c0: dict) -> str:
        """Check where one received frame went (see the module docstring); returns its fate."""
        expected, bad = expected
        s1, c1 = d.stats(), d.counters()
        ds = {k: (s1[k] - s0[k]) & 0xFFFFFFFF for k in s1}
        dropped = c1["rx_dropped"] - c0["rx_dropped"]
        if expected == "off":
            if ds["TPR"] or dropped != 1:
                self.fail(step, f"receiver off: TPR +{ds['TPR']}, rx_dropped +{dropped}")
            d.off += 1
            return "off"
        if ds["TPR"] != 1:
            self.fail(step, f"a {expected} frame: TPR +{ds['TPR']}")
        want = {"runt": "RUC", "oversize": "ROC", "crc": "CRCERRS"}.get(expected)
        if want is not None:
            others = {k: v for k, v in ds.items() if k not in ("TPR", want) and v}
            if ds[want] != 1 or others:
                self.fail(step, f"a {expected} frame: {want} +{ds[want]}, also {others}")
            return expected
        if ds["RUC"] or ds["ROC"] or ds["CRCERRS"] != int(bad):
            self.fail(step, f"a {expected} frame: {ds}")
        if expected == "filtered":
            if ds["MPC"] or ds["GPRC"]:
                self.fail(step, f"a frame the filter refuses was counted: {ds}")
            return "filtered"
        if ds["MPC"] == 1 and not ds["GPRC"]:
            return "mpc"
        if ds["MPC"] or ds["GPRC"] != int(not bad):
            self.fail(step, f"a {expected} frame: {ds}")
        d.entered += 1
        return "stored_bad_fcs" if bad else "stored"

    # --- registers ------------------------------------------------------------------------------

    def write(self, step: str, off: int, value: int) -> str:
        self.each(step, lambda d: d.nic.write32(off, value))
        self.did_reset = off == R.CTRL and bool(value & R.Ctrl.RST)
        return f"{R.REGISTER_NAMES.get(off, hex(off))} <- {value:#x}"

    def op_reg_write(self, step: str) -> str:
        rng = self.rng
        off = rng.randrange(R.BAR0_SIZE) if rng.random() < 0.2 else rng.randrange(R.BAR0_SIZE // 4) * 4
        self.report.tried("reg_write_random")
        return self.write(step, off, rng.getrandbits(32))

    def op_hot_write(self, step: str) -> str:
        """A register that matters, with a value near sane or anything."""
        rng = self.rng
        off = rng.choice(HOT_REGS)
        value = rng.getrandbits(32) if rng.random() < 0.4 else {
            R.CTRL: rng.choice([int(R.Ctrl.RST), R.CTRL_RESET, 0]),
            R.PBA: rng.choice([R.PBA_DEFAULT, 0, 0x00010001, 0x00020030, 0x00400040, 0xFFFFFFFF]),
            R.RDBAL: rng.choice([RX_RING, WR_SIZE - 64, RO_ADDR, 0xFFFFFFF0]),
            R.TDBAL: rng.choice([TX_RING, WR_SIZE - 64, RO_ADDR, 0xFFFFFFF0]),
            R.RDBAH: rng.choice([0, 0, 0xFFFFFFFF]), R.TDBAH: rng.choice([0, 0, 0xFFFFFFFF]),
            R.RDLEN: rng.choice([0, 128, 1024, R.RING_LEN_MASK]) if rng.random() < 0.95 else rng.getrandbits(20),
            R.TDLEN: rng.choice([0, 128, 1024, 4096]) if rng.random() < 0.97 else R.RING_LEN_MASK,
            R.RCTL: int(R.Rctl.EN) | rng.getrandbits(32) & rng.choice([0x8000, 0x0403803C, 0xFFFFFFFF]),
            R.TCTL: int(R.Tctl.EN) | rng.getrandbits(32) & rng.choice([0, 0x8, 0xFFFFFFFF]),
        }.get(off, rng.choice([0, 1, rng.getrandbits(8), rng.getrandbits(16)]))
        self.report.tried("reg_write_hot")
        return self.write(step, off, value)

    def op_reg_read(self, step: str) -> str:
        rng = self.rng
        off = rng.choice(HOT_REGS) if rng.random() < 0.5 else rng.randrange(R.BAR0_SIZE)
        self.each(step, lambda d: d.nic.read32(off))
        self.read_clear = True
        self.report.tried("reg_read")
        return hex(off)

    def op_outside_bar0(self, step: str) -> str:
        rng = self.rng
        off = rng.choice([-4, -1, R.BAR0_SIZE, R.BAR0_SIZE + 4, 1 << 40, -(1 << 33)])
        how = rng.choice(["read32", "write32", "peek32", "write_tail"])

        def access(d: _Device) -> str:
            regs = d.nic.regs.tobytes()
            try:
                if how == "read32":
                    d.nic.read32(off)
                elif how == "write32":
                    d.nic.write32(off, 0xFFFFFFFF)
                elif how == "peek32":
                    d.nic.peek32(off)
                else:
                    d.nic.write_tail(off, [1, 2])
            except ValueError:
                if d.nic.regs.tobytes() != regs:
                    self.fail(step, f"{how}({off:#x}) raised ValueError but changed registers")
                return "ValueError"
            self.fail(step, f"{how}({off:#x}) outside BAR0 did not raise ValueError")
            return ""

        self.each(step, access)
        self.report.tried("bar0_outside")
        self.report.saw("value_error_outside_bar0")
        return f"{how} {off:#x}"

    def op_reset(self, step: str) -> str:
        if self.rng.random() < 0.5:
            self.each(step, lambda d: d.nic.reset())
        else:
            self.each(step, lambda d: d.nic.write32(R.CTRL, int(R.Ctrl.RST)))
        self.did_reset = True
        self.report.tried("reset")
        return "reset"

    # --- descriptor rings and doorbells ------------------------------------------------------

    def draw_addr(self) -> int:
        rng = self.rng
        return rng.choice([
            TX_BUFS + rng.randrange(16) * 2048, RX_BUFS + rng.randrange(64) * 2048, rng.randrange(WR_SIZE),
            WR_SIZE - rng.randrange(1, 64), RO_ADDR + rng.randrange(RO_SIZE), WR_SIZE + rng.randrange(0x1000),
            1 << 40, (1 << 64) - rng.randrange(1, 64)])

    def ring_slots(self, base_reg: int, len_reg: int, count: int) -> list[int]:
        """Addresses of `count` descriptors from the head of the ring the registers describe."""
        regs = self.devs[0].nic.regs
        base = regs[base_reg >> 2] | regs[(base_reg + 4) >> 2] << 32
        n = max(1, (regs[len_reg >> 2] & R.RING_LEN_MASK) // 16)
        head = regs[(base_reg + 0x10) >> 2] % n
        return [base + 16 * ((head + k) % n) for k in range(count)]

    def write_descs(self, step: str, descs: list[tuple[int, bytes]]) -> None:
        def put(d: _Device) -> int:
            done = 0
            for addr, desc in descs:  # as a driver would: into writable memory only
                if d.mem.contains(addr, 16) and not d.mem.region_for(addr, 16).view.readonly:
                    d.mem.write(addr, desc)
                    done += 1
            return done

        self.each(step, put)

    def op_tx_descs(self, step: str) -> str:
        rng = self.rng
        count = rng.choice([1, 2, 3, 5, 8, rng.randrange(1, 64)])
        descs = []
        for addr in self.ring_slots(R.TDBAL, R.TDLEN, count):
            cmd = rng.getrandbits(8) if rng.random() < 0.2 else (
                (int(R.TxdCmd.EOP) if rng.random() < 0.6 else 0) | (int(R.TxdCmd.RS) if rng.random() < 0.5 else 0)
                | (int(R.TxdCmd.IFCS) if rng.random() < 0.7 else 0) | (int(R.TxdCmd.IC) if rng.random() < 0.2 else 0)
                | (int(R.TxdCmd.IDE) if rng.random() < 0.2 else 0) | (int(R.TxdCmd.DEXT) if rng.random() < 0.05 else 0))
            length = rng.choice([0, rng.randrange(1, 64), rng.randrange(60, 1519), rng.randrange(1519, 16385),
                                 rng.getrandbits(16)])
            descs.append((addr, R.TX_DESC.pack(self.draw_addr(), length, rng.getrandbits(8), cmd,
                                               rng.getrandbits(8), rng.getrandbits(8), rng.getrandbits(16))))
        self.write_descs(step, descs)
        self.report.tried("tx_descriptors")
        return f"{count} descriptors"

    def op_tx_packets(self, step: str) -> str:
        """What a driver queues: packets of 1-3 descriptors with good buffers at TDT, then TDT."""
        rng = self.rng
        regs = self.devs[0].nic.regs
        n = (regs[R.TDLEN >> 2] & R.RING_LEN_MASK) // 16
        base = regs[R.TDBAL >> 2] | regs[R.TDBAH >> 2] << 32
        tail = regs[R.TDT >> 2]
        if not n or tail >= n:
            return "no ring"
        descs, frames = [], 0
        for _ in range(rng.randint(1, 4)):
            pieces = rng.randint(1, 3)
            for k in range(pieces):
                cmd = int(R.TxdCmd.RS) if rng.random() < 0.6 else 0
                if k == pieces - 1:
                    cmd |= int(R.TxdCmd.EOP) | (int(R.TxdCmd.IFCS) if rng.random() < 0.9 else 0)
                    cmd |= int(R.TxdCmd.IC) if rng.random() < 0.2 else 0
                length = rng.choice([14, rng.randrange(1, 2049), rng.randrange(40, 600)])
                descs.append((base + 16 * tail, R.TX_DESC.pack(TX_BUFS + rng.randrange(16) * 2048, length,
                                                               rng.randrange(64), cmd, 0, rng.randrange(40), 0)))
                tail = (tail + 1) % n
            frames += 1
        self.write_descs(step, descs)
        self.report.tried("tx_packets")
        return self.write(step, R.TDT, tail) + f" ({frames} packets)"

    def op_long_chain(self, step: str) -> str:
        """The attack of issue 7: a chain without EOP longer than one walk's budget, rung in a
        few doorbells (and sometimes ended by an EOP): each descriptor is fetched once, and
        the walk is continued by the timers, within MAX_WALKS."""
        rng = self.rng
        n = WR_SIZE // 16  # a ring over the whole writable region
        head = rng.randrange(n)
        k = rng.randrange(TX_BUDGET + 4, 2 * TX_BUDGET)
        desc = R.TX_DESC.pack(TX_BUFS, rng.choice([0, 1]), 0, int(R.TxdCmd.RS | R.TxdCmd.IFCS), 0, 0, 0)
        last = R.TX_DESC.pack(TX_BUFS, 60, 0, int(R.TxdCmd.RS | R.TxdCmd.IFCS | R.TxdCmd.EOP), 0, 0, 0)
        ring = bytearray(self.devs[0].mem.read(0, WR_SIZE))
        for j in range(k):
            at = 16 * ((head + j) % n)
            ring[at:at + 16] = last if j == k - 1 and rng.random() < 0.5 else desc
        for d in self.devs:
            d.mem.write(0, bytes(ring))
        for off, value in ((R.TDBAL, 0), (R.TDBAH, 0), (R.TDLEN, WR_SIZE), (R.TDH, head)):
            self.write(step, off, value)
        rings = rng.choice([1, 3])  # one doorbell: more than a walk's budget at once
        for j in range(1, rings + 1):
            self.write(step, R.TDT, (head + k * j // rings) % n)
        self.report.tried("tx_long_chain")
        return f"{k} descriptors from {head}"

    def op_rx_descs(self, step: str) -> str:
        rng = self.rng
        count = rng.choice([1, 4, 16, rng.randrange(1, 64)])
        descs = [(addr, R.RX_DESC.pack(self.draw_addr(), rng.getrandbits(16), 0, rng.getrandbits(8), 0, 0))
                 for addr in self.ring_slots(R.RDBAL, R.RDLEN, count)]
        self.write_descs(step, descs)
        self.report.tried("rx_descriptors")
        return f"{count} descriptors"

    def tail_value(self, head_reg: int, len_reg: int) -> int:
        rng = self.rng
        regs = self.devs[0].nic.regs
        n = max(1, (regs[len_reg >> 2] & R.RING_LEN_MASK) // 16)
        if rng.random() < 0.85:
            return (regs[head_reg >> 2] + rng.randrange(0, min(n, 80))) % n
        return rng.getrandbits(16) if rng.random() < 0.7 else rng.getrandbits(32)

    def op_tdt(self, step: str) -> str:
        value = self.tail_value(R.TDH, R.TDLEN)
        self.report.tried("doorbell_tdt")
        return self.write(step, R.TDT, value)

    def op_rdt(self, step: str) -> str:
        value = self.tail_value(R.RDH, R.RDLEN)
        self.report.tried("doorbell_rdt")
        return self.write(step, R.RDT, value)

    def op_write_tail(self, step: str) -> str:
        rng = self.rng
        off = rng.choice([R.TDT, R.RDT, R.TDT, R.RDT, rng.randrange(R.BAR0_SIZE // 4) * 4])
        head, length = (R.TDH, R.TDLEN) if off == R.TDT else (R.RDH, R.RDLEN)
        values = [self.tail_value(head, length) for _ in range(rng.randint(1, 6))]
        self.each(step, lambda d: d.nic.write_tail(off, values))
        self.did_reset = off == R.CTRL and any(v & R.Ctrl.RST for v in values)
        self.report.tried("doorbell_run")
        return f"{R.REGISTER_NAMES.get(off, hex(off))} <- {values}"

    # --- the rest of the device's world ------------------------------------------------------

    def op_bus_master(self, step: str) -> str:
        on = self.rng.random() < 0.7
        cmd = int(R.PciCommand.MEMORY | (R.PciCommand.MASTER if on else 0))
        self.each(step, lambda d: d.nic.config_write(0x04, cmd, 2))
        self.report.tried("bus_master")
        return "on" if on else "off"

    def op_link(self, step: str) -> str:
        up = self.rng.random() < 0.6
        self.each(step, lambda d: d.nic.set_link(up))
        self.report.tried("link")
        return "up" if up else "down"

    def op_timers(self, step: str) -> str:
        self.clock.now += self.rng.choice([1000, 100_000, 10_000_000, 100_000_000])
        self.each(step, lambda d: d.nic.run_timers())
        self.report.tried("timers")
        return f"clock {self.clock.now}"

    def op_tx_ready(self, step: str) -> str:
        self.each(step, lambda d: d.nic.tx_ready())
        self.report.tried("cable_ready")
        return ""


# --- the target ---------------------------------------------------------------------------------

def run_case(seed: int, index: int, case_seed: int, report: FuzzReport,
             log: Callable[[str], None] | None = None) -> None:
    """One case: two devices, a random sequence of operations, every check after each."""
    _Case(case_seed, report, f"seed {seed} case {index} (case seed {case_seed})", log).run()


def run(seed: int, iterations: int, log: Callable[[str], None] | None = None) -> FuzzReport:
    """`iterations` cases, drawn from `seed` (see the module docstring)."""
    report = FuzzReport("device", seed)
    rng = random.Random(seed)
    with _Watchdog(CASE_SECONDS) as watchdog:
        for i in range(iterations):
            watchdog.arm(f"seed {seed} case {i}")
            run_case(seed, i, rng.getrandbits(64), report, log)
            report.iterations += 1
    return report


class _Watchdog:
    """A case that runs for more than `seconds` fails as a hang (SIGALRM, main thread only: a
    device stuck in a loop that never returns to Python is not caught, but the walk bounds are
    checked on every doorbell)."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds
        self.where = ""
        self.active = threading.current_thread() is threading.main_thread()
        self.saved: Any = None

    def __enter__(self) -> "_Watchdog":
        if self.active:
            self.saved = signal.signal(signal.SIGALRM, self._fire)
        return self

    def arm(self, where: str) -> None:
        self.where = where
        if self.active:
            signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def _fire(self, _signum: int, _frame: Any) -> None:
        raise FuzzFailure(f"device fuzz {self.where}: no progress in {self.seconds} s (a hang)")

    def __exit__(self, *exc: object) -> None:
        if self.active:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.saved)
