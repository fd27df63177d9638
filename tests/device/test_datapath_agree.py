"""The Cython engine (Datapath) and the pure-Python reference (RefDatapath) must agree exactly.

Both engines run the same random scenario, each on its own register file and DMA memory:
random frames (sizes around every limit, unicast/multicast/broadcast, bad FCS, IPv4 TCP/UDP
with good and bad checksums), random ring states (BSIZE/BSEX, SECRC, RDMTS, PBA, small rings,
wraparound, heads and tails anywhere) and random TX chains (several descriptors, DEXT, IC, PSP,
no EOP, bad addresses), a cable that sometimes refuses frames. After every step the returned
events must match; at the end the memory, every register word (statistics), the transmitted
frames and the diagnostics counters must match. Fixed seeds: a failure reproduces.

A second scenario drives TX chains across doorbells (docs/datapath.md "Transmit"): chains
whose EOP comes with a later doorbell, EOP-less runs up to the n - 1 drop, chains over the
frame or TX packet buffer limit, resets, TDH rewrites and TDT moved back in the middle of a
chain, and walks longer than TX_BUDGET (EV_TX_MORE); here the descriptors each engine fetched
must match too.
"""
from __future__ import annotations

import random
import struct
import zlib
from array import array

import pytest

from nicemu import DmaMemory
from nicemu import regs as R
from nicemu.datapath_ref import TX_BUDGET, RefDatapath

_datapath = pytest.importorskip("nicemu._datapath")
Datapath = _datapath.Datapath

MEM_SIZE = 1 << 19
RX_BASE = 0x1000  # RX ring (up to 64 descriptors)
TX_BASE = 0x2000  # TX ring
RX_BUFS = 0x4000  # RX buffers: 64 slots of up to 2 KiB ... may overlap each other (allowed)
TX_BUFS = 0x24000
MACS = [bytes.fromhex(m) for m in ("525400123456", "525400abcdef", "020000000001")]


def ones_sum(b: bytes) -> int:
    if len(b) & 1:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def ip_packet(rng: random.Random, proto: int, size: int) -> bytes:
    """An IPv4 packet (header + TCP/UDP/other) with correct checksums, then maybe broken."""
    payload = rng.randbytes(max(0, size))
    hdr_len = 20
    if proto == 6:
        l4 = bytearray(struct.pack("!HHIIBBHHH", 1234, 80, 1, 2, 5 << 4, 0x18, 1000, 0, 0)) + payload
        csum_off = 16
    elif proto == 17:
        l4 = bytearray(struct.pack("!HHHH", 53, 5353, 8 + len(payload), 0)) + payload
        csum_off = 6
    else:
        l4 = bytearray(payload)
        csum_off = None
    total = hdr_len + len(l4)
    src, dst = bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2])
    frag = rng.choice([0, 0, 0, 0x2000, 0x4000])
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 7, frag, 64, proto, 0, src, dst))
    ip[10:12] = struct.pack("!H", ones_sum(bytes(ip)) ^ 0xFFFF)
    if csum_off is not None and not (proto == 17 and rng.random() < 0.2):
        pseudo = src + dst + struct.pack("!BBH", 0, proto, len(l4))
        c = ones_sum(pseudo + bytes(l4)) ^ 0xFFFF
        if proto == 17 and c == 0:
            c = 0xFFFF
        l4[csum_off : csum_off + 2] = struct.pack("!H", c)
    if rng.random() < 0.2:
        ip[rng.randrange(20)] ^= 0x40
    if rng.random() < 0.2 and len(l4):
        l4[rng.randrange(len(l4))] ^= 0x01
    return bytes(ip + l4)


def random_frame(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.45:
        dst = rng.choice(MACS)
    elif kind < 0.6:
        dst = b"\xff" * 6
    elif kind < 0.8:
        dst = bytes([0x01, 0x00, 0x5E, 0, rng.randrange(256), rng.randrange(256)])
    else:
        dst = bytes([rng.randrange(256) & 0xFE]) + rng.randbytes(5)
    src = bytes.fromhex("020000000099")
    size = rng.choice([rng.randrange(0, 70), rng.randrange(60, 200), rng.randrange(1500, 1530),
                       rng.randrange(200, 4000), rng.randrange(16370, 16400), 64, 1518])
    if rng.random() < 0.4:
        body = dst + src + b"\x08\x00" + ip_packet(rng, rng.choice([6, 17, 1]), max(0, size - 58))
    else:
        body = dst + src + struct.pack("!H", rng.choice([0x88B5, 0x0800, 0x86DD])) + rng.randbytes(max(0, size - 18))
    body = body[: max(0, size - 4)] if size >= 4 else body[:size]
    frame = body + struct.pack("<I", zlib.crc32(body))
    if rng.random() < 0.1 and frame:
        i = rng.randrange(len(frame))
        frame = frame[:i] + bytes([frame[i] ^ 0x10]) + frame[i + 1 :]
    return frame


class Side:
    """One engine with its own registers and memory, and a cable whose answers are scripted."""

    def __init__(self, cls, seed_mem: bytes, answers: list[bool]) -> None:
        self.mem = DmaMemory(MEM_SIZE)
        self.mem.write(0, seed_mem)
        self.regs = array("I", bytes(R.BAR0_SIZE))
        self.engine = cls(self.regs, self.mem)
        self.engine.bus_master = True
        self.answers = list(answers)
        self.wire: list[bytes] = []
        self.log: list = []

    def sink(self, frame: bytes) -> bool:
        ok = self.answers.pop() if self.answers else True
        self.log.append(("sink", frame, ok))
        if ok:
            self.wire.append(frame)
        return ok

    def w(self, off: int, value: int) -> None:
        self.regs[off >> 2] = value & 0xFFFFFFFF

    def close(self) -> None:
        self.mem.close()


def program(rng: random.Random, sides: list[Side]) -> dict:
    """Random device state, written identically to every side; returns the ring geometry."""
    rctl = int(R.Rctl.EN) if rng.random() < 0.95 else 0
    for bit in (R.Rctl.SBP, R.Rctl.UPE, R.Rctl.MPE, R.Rctl.LPE, R.Rctl.BAM, R.Rctl.SECRC):
        if rng.random() < 0.4:
            rctl |= int(bit)
    rctl |= rng.randrange(4) << R.RCTL_MO_SHIFT
    rctl |= rng.randrange(4) << R.RCTL_RDMTS_SHIFT
    rctl |= rng.randrange(4) << R.RCTL_BSIZE_SHIFT
    if rng.random() < 0.3:
        rctl |= int(R.Rctl.BSEX)
    rx_n = rng.choice([8, 16, 32, 64])
    tx_n = rng.choice([8, 16, 32])
    pba = (rng.choice([0, 1, 2, 4, 16, 64, 100]) << 16) | rng.choice([0, 1, 2, 8, 48, 64, 200])
    setup = {
        R.RCTL: rctl,
        R.TCTL: int(R.Tctl.EN) | (int(R.Tctl.PSP) if rng.random() < 0.5 else 0),
        R.RXCSUM: rng.choice([0, 0x100, 0x200, 0x300, 0x30E, 0x0301]),
        R.PBA: pba if rng.random() < 0.7 else R.PBA_DEFAULT,
        R.RDBAL: RX_BASE if rng.random() < 0.95 else MEM_SIZE + 0x100,
        R.RDBAH: 0,  # (or, below, the top of the 64-bit space: the ring must not wrap to 0)
        R.RDLEN: rx_n * 16 + (rng.choice([0, 0, 0, 5, 100]) if rng.random() < 0.2 else 0),
        R.RDH: rng.randrange(rx_n),
        R.TDBAL: TX_BASE if rng.random() < 0.95 else MEM_SIZE - 0x40,
        R.TDBAH: 0,
        R.TDLEN: tx_n * 16,
        R.TDH: rng.randrange(tx_n),
    }
    if rng.random() < 0.04:
        setup[R.RDBAH], setup[R.RDBAL] = 0xFFFFFFFF, 0x100000000 - 16 * rng.randrange(1, rx_n)
    if rng.random() < 0.04:
        setup[R.TDBAH], setup[R.TDBAL] = 0xFFFFFFFF, 0x100000000 - 16 * rng.randrange(1, tx_n)
    setup[R.RDT] = setup[R.RDH]
    setup[R.TDT] = setup[R.TDH]
    for k, mac in enumerate(MACS[:2]):
        setup[R.RAL(k)] = int.from_bytes(mac[:4], "little")
        setup[R.RAH(k)] = int.from_bytes(mac[4:], "little") | (0x80000000 if rng.random() < 0.8 else 0)
    for i in range(R.MTA_WORDS):
        setup[R.MTA + 4 * i] = rng.getrandbits(32) if rng.random() < 0.3 else 0
    for s in sides:
        for off, v in setup.items():
            s.w(off, v)
    return {"rx_n": rx_n, "tx_n": tx_n}


def write_rx_descs(rng: random.Random, sides: list[Side], geo: dict) -> None:
    for k in range(geo["rx_n"]):
        addr = RX_BUFS + k * 0x800 if rng.random() < 0.97 else rng.choice([MEM_SIZE - 8, 1 << 40, (1 << 64) - 8])
        d = R.RX_DESC.pack(addr, 0, 0, 0, 0, 0)
        for s in sides:
            s.mem.write(RX_BASE + 16 * k, d)


def queue_tx(rng: random.Random, sides: list[Side], geo: dict, tail: int) -> int:
    """Write one random packet's descriptors at `tail`; returns the new tail."""
    n = geo["tx_n"]
    ndesc = rng.choice([1, 1, 1, 2, 3, 5])
    size = rng.choice([rng.randrange(0, 80), rng.randrange(60, 1600), rng.randrange(16000, 16500)])
    body = random_frame(rng)[:-4] if rng.random() < 0.7 else rng.randbytes(size)
    pieces = []
    cuts = sorted(rng.randrange(len(body) + 1) for _ in range(ndesc - 1))
    prev = 0
    for c in cuts + [len(body)]:
        pieces.append(body[prev:c])
        prev = c
    for i, piece in enumerate(pieces):
        slot = TX_BUFS + tail * 0x1000  # 4 KiB per slot: small pieces never overlap
        addr = slot if rng.random() < 0.97 else rng.choice([MEM_SIZE - 2, 1 << 33, (1 << 64) - 2])
        piece = piece[:0x1000]
        last = i == len(pieces) - 1
        cmd = int(R.TxdCmd.RS) if rng.random() < 0.7 else 0
        if last and rng.random() < 0.95:
            cmd |= int(R.TxdCmd.EOP)
        if rng.random() < 0.8:
            cmd |= int(R.TxdCmd.IFCS)
        if rng.random() < 0.3:
            cmd |= int(R.TxdCmd.IC)
        if rng.random() < 0.3:
            cmd |= int(R.TxdCmd.IDE)
        if rng.random() < 0.04:
            cmd |= int(R.TxdCmd.DEXT)
        cso, css = rng.randrange(80), rng.randrange(60)
        d = R.TX_DESC.pack(addr, len(piece), cso, cmd, rng.randrange(16) << 4, css, 0)
        for s in sides:
            if addr == slot:
                s.mem.write(slot, piece)
            s.mem.write(TX_BASE + 16 * tail, d)
        tail = (tail + 1) % n
    return tail


def compare(a: Side, b: Side, where: str) -> None:
    assert a.regs.tobytes() == b.regs.tobytes(), f"registers differ {where}: " + ", ".join(
        f"{R.REGISTER_NAMES.get(4 * i, hex(4 * i))}: {x} != {y}"
        for i, (x, y) in enumerate(zip(a.regs, b.regs)) if x != y
    )
    ma, mb = a.mem.read(0, MEM_SIZE), b.mem.read(0, MEM_SIZE)
    if ma != mb:
        first = next(i for i in range(MEM_SIZE) if ma[i] != mb[i])
        pytest.fail(f"memory differs {where} first at {first:#x}")
    for attr in ("dma_errors", "tx_dropped", "tx_dext_skipped", "rx_dropped", "rx_written",
                 "tx_descs_fetched", "rx_queued", "tx_queued"):
        assert getattr(a.engine, attr) == getattr(b.engine, attr), f"{attr} differs {where}"
    assert a.log == b.log, f"cable traffic differs {where}"


def run_scenario(seed: int, steps: int = 60) -> None:
    rng = random.Random(seed)
    seed_mem = random.Random(seed + 1).randbytes(MEM_SIZE)
    answers = [random.Random(seed + 2).random() < 0.75 for _ in range(400)]
    sides = [Side(RefDatapath, seed_mem, answers), Side(Datapath, seed_mem, answers)]
    try:
        geo = program(rng, sides)
        write_rx_descs(rng, sides, geo)
        use_sink = rng.random() < 0.6
        for s in sides:
            if use_sink:
                s.engine.sink = s.sink
        tx_tail = sides[0].regs[R.TDT >> 2]
        for step in range(steps):
            op = rng.random()
            results = []
            if op < 0.45:
                frame = random_frame(rng)
                results = [s.engine.receive(frame) for s in sides]
            elif op < 0.6:
                rx_n = geo["rx_n"]
                new = (sides[0].regs[R.RDT >> 2] + rng.randrange(1, rx_n)) % rx_n
                if rng.random() < 0.3:
                    write_rx_descs(rng, sides, geo)
                for s in sides:
                    s.w(R.RDT, new)
                results = [s.engine.drain_rx() for s in sides]
            elif op < 0.85:
                for _ in range(rng.randrange(1, 4)):
                    tx_tail = queue_tx(rng, sides, geo, tx_tail)
                for s in sides:
                    s.w(R.TDT, tx_tail)
                results = [s.engine.transmit() for s in sides]
            elif op < 0.92:
                results = [s.engine.tx_resume() for s in sides]
            elif op < 0.95:
                flip = rng.random() < 0.5
                for s in sides:
                    s.engine.bus_master = flip
                results = [s.engine.drain_rx() for s in sides]
            elif op < 0.97:
                rctl = sides[0].regs[R.RCTL >> 2] ^ int(R.Rctl.SECRC | R.Rctl.LPE)
                pba = rng.choice([R.PBA_DEFAULT, 0x00010001, 0x00020002])
                for s in sides:
                    s.w(R.RCTL, rctl)
                    s.w(R.PBA, pba)
                results = [0, 0]
            else:
                for s in sides:
                    s.engine.reset()
                results = [0, 0]
            assert results[0] == results[1], f"seed {seed} step {step}: events {results[0]:#x} != {results[1]:#x}"
            compare(sides[0], sides[1], f"(seed {seed} step {step})")
            if step % 10 == 9:
                sent_ref, sent_cy = (s.engine.take_transmitted() for s in sides)
                assert sent_ref == sent_cy, f"seed {seed} step {step}: transmitted frames differ"
        sent_ref, sent_cy = (s.engine.take_transmitted() for s in sides)
        assert sent_ref == sent_cy
    finally:
        for s in sides:
            s.close()


@pytest.mark.parametrize("seed", range(40))
def test_engines_agree_on_random_scenarios(seed: int) -> None:
    run_scenario(seed)


def test_engines_agree_long_run() -> None:
    run_scenario(1000, steps=600)


def _pair(cls, seed_mem: bytes):
    a, b = Side(cls, seed_mem, []), Side(cls, seed_mem, [])
    a.engine.link(b.engine)
    b.engine.link(a.engine)
    return a, b


@pytest.mark.parametrize("seed", range(8))
def test_linked_pairs_agree(seed: int) -> None:
    """Frames sent engine to engine (the in-C path) land exactly as in the reference pair."""
    rng = random.Random(seed)
    seed_mem = random.Random(seed + 1).randbytes(MEM_SIZE)
    ref_pair, cy_pair = _pair(RefDatapath, seed_mem), _pair(Datapath, seed_mem)
    sides = [*ref_pair, *cy_pair]
    try:
        # identical programming for both pairs: tx side (a) and rx side (b)
        geo = program(rng, sides)
        write_rx_descs(rng, sides, geo)
        tails = [sides[0].regs[R.TDT >> 2], sides[1].regs[R.TDT >> 2]]
        for step in range(40):
            which = rng.randrange(2)
            if rng.random() < 0.7:
                tails[which] = queue_tx(rng, [ref_pair[which], cy_pair[which]], geo, tails[which])
                for s in (ref_pair[which], cy_pair[which]):
                    s.w(R.TDT, tails[which])
                ev = [s.engine.transmit() for s in (ref_pair[which], cy_pair[which])]
            else:
                rx_n = geo["rx_n"]
                new = (ref_pair[which].regs[R.RDT >> 2] + rng.randrange(1, rx_n)) % rx_n
                for s in (ref_pair[which], cy_pair[which]):
                    s.w(R.RDT, new)
                ev = [s.engine.drain_rx() for s in (ref_pair[which], cy_pair[which])]
            assert ev[0] == ev[1]
            peer = 1 - which
            assert ref_pair[peer].engine.take_events() == cy_pair[peer].engine.take_events()
            for k in range(2):
                compare(ref_pair[k], cy_pair[k], f"(seed {seed} step {step} side {k})")
    finally:
        for s in sides:
            s.close()


@pytest.mark.parametrize("seed", range(10))
def test_linked_pairs_agree_on_the_owed_fcs(seed: int) -> None:
    """A Cython engine sends an IFCS frame to its linked Cython peer without writing the FCS
    (docs/datapath.md, "Deferred FCS"); the peer writes it when the bytes can be seen. Frames
    DMA'd with and without SECRC, frames that wait in the RX packet buffer (ring full, bus
    mastering off) and are stored after SECRC changed: memory, registers, events and counters
    as the reference pair's, which computes and checks every FCS."""
    rng = random.Random(seed)
    seed_mem = random.Random(seed + 7).randbytes(MEM_SIZE)
    ref_pair, cy_pair = _pair(RefDatapath, seed_mem), _pair(Datapath, seed_mem)
    sides = [*ref_pair, *cy_pair]
    try:
        geo = program(rng, sides)
        rctl = int(R.Rctl.EN | R.Rctl.UPE | R.Rctl.MPE | R.Rctl.BAM)
        rctl |= int(R.Rctl.SECRC) if rng.random() < 0.5 else 0
        for s in sides:
            s.w(R.RCTL, rctl)
            s.w(R.PBA, R.PBA_DEFAULT)
            s.w(R.RDBAL, RX_BASE)
            s.w(R.RDBAH, 0)
            s.w(R.TDBAL, TX_BASE)
            s.w(R.TDBAH, 0)
        write_rx_descs(random.Random(seed), sides, geo)
        rx_n = geo["rx_n"]
        tail = ref_pair[0].regs[R.TDT >> 2]
        for step in range(60):
            roll = rng.random()
            rx_sides = (ref_pair[1], cy_pair[1])
            if roll < 0.15:  # SECRC flips while frames may wait in the packet buffer
                for s in rx_sides:
                    s.w(R.RCTL, s.regs[R.RCTL >> 2] ^ int(R.Rctl.SECRC))
            elif roll < 0.25:
                bm = rng.random() < 0.6
                for s in rx_sides:
                    s.engine.bus_master = bm
            elif roll < 0.45:
                new = (ref_pair[1].regs[R.RDH >> 2] + rng.randrange(rx_n)) % rx_n
                for s in rx_sides:
                    s.w(R.RDT, new)
                assert ref_pair[1].engine.drain_rx() == cy_pair[1].engine.drain_rx()
            else:
                tail = queue_tx(rng, [ref_pair[0], cy_pair[0]], geo, tail)
                for s in (ref_pair[0], cy_pair[0]):
                    s.w(R.TDT, tail)
                assert ref_pair[0].engine.transmit() == cy_pair[0].engine.transmit()
            assert ref_pair[1].engine.take_events() == cy_pair[1].engine.take_events()
            for k in range(2):
                compare(ref_pair[k], cy_pair[k], f"(seed {seed} step {step} side {k})")
        assert ref_pair[1].regs[R.GPRC >> 2] > 0
    finally:
        for s in sides:
            s.close()


@pytest.mark.parametrize("kinds", [(RefDatapath, Datapath), (Datapath, RefDatapath)])
def test_mixed_engines_linked(kinds) -> None:
    """A Cython engine linked to a Python one hands frames over through peer.deliver()."""
    seed_mem = random.Random(5).randbytes(MEM_SIZE)
    ref_pair = _pair(RefDatapath, seed_mem)
    a, b = Side(kinds[0], seed_mem, []), Side(kinds[1], seed_mem, [])
    a.engine.link(b.engine)
    b.engine.link(a.engine)
    try:
        rng = random.Random(9)
        sides = [*ref_pair, a, b]
        geo = program(rng, sides)
        for s in sides:  # make sure frames get through: receiver on, promiscuous, big buffers
            s.w(R.RCTL, int(R.Rctl.EN | R.Rctl.UPE | R.Rctl.MPE | R.Rctl.BAM))
            s.w(R.PBA, R.PBA_DEFAULT)
            s.w(R.RDBAL, RX_BASE)
            s.w(R.TDBAL, TX_BASE)
        write_rx_descs(random.Random(1), sides, geo)
        rx_n = geo["rx_n"]
        tail = ref_pair[0].regs[R.TDT >> 2]
        for step in range(30):
            new_rdt = (ref_pair[1].regs[R.RDH >> 2] - 1) % rx_n
            for s in (ref_pair[1], b):
                s.w(R.RDT, new_rdt)
            assert ref_pair[1].engine.drain_rx() == b.engine.drain_rx()
            tail = queue_tx(rng, [ref_pair[0], a], geo, tail)
            for s in (ref_pair[0], a):
                s.w(R.TDT, tail)
            assert ref_pair[0].engine.transmit() == a.engine.transmit()
            assert ref_pair[1].engine.take_events() == b.engine.take_events()
            compare(ref_pair[0], a, f"(step {step}, sender)")
            compare(ref_pair[1], b, f"(step {step}, receiver)")
        assert b.regs[R.GPRC >> 2] > 10
    finally:
        for s in (*ref_pair, a, b):
            s.close()


# --- TX chains across doorbells -------------------------------------------------------------------

CH_RING = 0x44000  # the chain scenario's TX ring: up to 4200 descriptors (0x10680 bytes)
CH_BUFS = 0x58000  # 8 buffers of 4 KiB (their contents: the seeded random memory)
EOP, IFCS, RS, IDE, DEXT = (int(R.TxdCmd.EOP), int(R.TxdCmd.IFCS), int(R.TxdCmd.RS),
                            int(R.TxdCmd.IDE), int(R.TxdCmd.DEXT))


def test_both_engines_have_the_same_tx_budget() -> None:
    assert _datapath.TX_BUDGET == TX_BUDGET


def _chain_piece(rng: random.Random, n: int) -> list[bytes]:
    """Descriptors of one kind of TX chain piece (a packet, or part of one)."""
    kind = rng.choice(["packet", "packet", "no_eop", "no_eop", "eop", "oversize", "zero", "dext", "fault"])
    count = {"packet": rng.randint(1, 4), "no_eop": rng.randint(1, 6), "eop": 1,
             "oversize": rng.randint(3, 7), "zero": rng.randint(1, min(40, n)), "dext": 1, "fault": 1}[kind]
    out = []
    for k in range(count):
        addr = CH_BUFS + rng.randrange(8) * 0x1000
        length = rng.choice([0, rng.randrange(1, 64), rng.randrange(60, 1600), rng.randrange(1600, 4097)])
        cmd = (RS if rng.random() < 0.7 else 0) | (IFCS if rng.random() < 0.8 else 0)
        cmd |= IDE if rng.random() < 0.2 else 0
        if kind == "packet" and k == count - 1 or kind == "eop":
            cmd |= EOP
        elif kind == "oversize":
            length = rng.randrange(3000, 4097)
        elif kind == "zero":
            length = 0
        elif kind == "dext":
            cmd |= DEXT | (EOP if rng.random() < 0.5 else 0)
        elif kind == "fault":
            addr = rng.choice([MEM_SIZE - 2, 1 << 40])
            cmd |= EOP if rng.random() < 0.5 else 0
        out.append(R.TX_DESC.pack(addr, length, rng.randrange(80), cmd, rng.randrange(16) << 4,
                                  rng.randrange(60), 0))
    return out


def run_tx_chains(seed: int, steps: int = 80) -> None:
    rng = random.Random(seed)
    seed_mem = random.Random(seed + 1).randbytes(MEM_SIZE)
    answers = [random.Random(seed + 2).random() < 0.8 for _ in range(400)]
    sides = [Side(RefDatapath, seed_mem, answers), Side(Datapath, seed_mem, answers)]
    n = rng.choice([8, 16, 64, 256, 4200])
    state = {"written": 0}

    def setreg(off: int, value: int) -> None:
        for s in sides:
            s.w(off, value)

    def run(method: str, where: str) -> None:
        ev = [getattr(s.engine, method)() for s in sides]
        assert ev[0] == ev[1], f"{where}: events {ev[0]:#x} != {ev[1]:#x}"
        compare(sides[0], sides[1], where)

    def reprogram(at: int) -> None:
        setreg(R.TDBAL, CH_RING)
        setreg(R.TDBAH, 0)
        setreg(R.TDLEN, n * 16)
        setreg(R.TDH, at)
        setreg(R.TDT, at)
        state["written"] = at

    try:
        setreg(R.TCTL, int(R.Tctl.EN) | (int(R.Tctl.PSP) if rng.random() < 0.5 else 0))
        setreg(R.PBA, rng.choice([R.PBA_DEFAULT, 0x00300010, 0x00020002]))
        reprogram(rng.randrange(n))
        if rng.random() < 0.5:
            for s in sides:
                s.engine.sink = s.sink
        for step in range(steps):
            where = f"(seed {seed} step {step}, ring {n})"
            head, tdt = sides[0].regs[R.TDH >> 2], sides[0].regs[R.TDT >> 2]
            room = (head - 1 - state["written"]) % n  # slots the driver may still fill
            op = rng.random()
            if op < 0.35 and room:
                for d in _chain_piece(rng, n)[:room]:
                    for s in sides:
                        s.mem.write(CH_RING + 16 * state["written"], d)
                    state["written"] = (state["written"] + 1) % n
                continue
            if op < 0.65:  # a doorbell somewhere between TDT and what is written: maybe mid-chain
                ahead = (state["written"] - tdt) % n
                setreg(R.TDT, (tdt + rng.randint(0, ahead)) % n)
                run("transmit", where)
            elif op < 0.72:
                run("transmit", where)  # as the Nic does after EV_TX_MORE
            elif op < 0.77:
                run("tx_resume", where)
            elif op < 0.81:  # reset in the middle of whatever is fetched; software starts over
                for s in sides:
                    s.engine.reset()
                reprogram(rng.randrange(n))
                compare(sides[0], sides[1], where)
            elif op < 0.85:  # misprogramming: TDH rewritten under a fetched chain
                setreg(R.TDH, rng.randrange(n))
                run("transmit", where)
            elif op < 0.89:  # misprogramming: TDT moved back (over fetched descriptors, maybe)
                back = (tdt - head) % n
                setreg(R.TDT, (head + rng.randint(0, back)) % n)
                run("transmit", where)
            elif op < 0.92:
                setreg(R.PBA, rng.choice([R.PBA_DEFAULT, 0x00010001, 0x00020002, 0x00400010, 0]))
            elif op < 0.94:  # misprogramming: for one doorbell the ring runs past the end of memory
                setreg(R.TDBAL, MEM_SIZE - 16 * rng.randrange(1, 8))
                run("transmit", where)
                setreg(R.TDBAL, CH_RING)
            elif room > 8:  # a long run without EOP (the attack), then doorbells through it
                k = room - rng.randrange(0, 3)
                d = R.TX_DESC.pack(CH_BUFS, rng.choice([0, 0, 1]), 0, RS | IFCS, 0, 0, 0)
                for j in range(k):
                    for s in sides:
                        s.mem.write(CH_RING + 16 * ((state["written"] + j) % n), d)
                state["written"] = (state["written"] + k) % n
                for _ in range(rng.randint(1, 4)):
                    tdt = sides[0].regs[R.TDT >> 2]
                    ahead = (state["written"] - tdt) % n
                    setreg(R.TDT, (tdt + rng.randint(ahead // 2, ahead)) % n)
                    run("transmit", where)
            sent = [s.engine.take_transmitted() for s in sides]
            assert sent[0] == sent[1], f"{where}: transmitted frames differ"
    finally:
        for s in sides:
            s.close()


@pytest.mark.parametrize("seed", range(24))
def test_engines_agree_on_tx_chains_across_doorbells(seed: int) -> None:
    run_tx_chains(seed)


def test_engines_agree_on_walks_longer_than_the_budget() -> None:
    """An EOP-less run and a run of frames, each longer than TX_BUDGET, on a 4200 ring."""
    seed_mem = random.Random(7).randbytes(MEM_SIZE)
    sides = [Side(RefDatapath, seed_mem, []), Side(Datapath, seed_mem, [])]
    n = 4200
    try:
        for s in sides:
            for off, v in ((R.TCTL, int(R.Tctl.EN)), (R.PBA, R.PBA_DEFAULT), (R.TDBAL, CH_RING),
                           (R.TDLEN, n * 16), (R.TDH, 0), (R.TDT, 0)):
                s.w(off, v)
        for cmd, length in ((RS | IFCS, 0), (EOP | IFCS | RS, 60)):  # EOP-less, then frames
            head = sides[0].regs[R.TDH >> 2]
            for s in sides:
                for k in range(n - 1):
                    s.mem.write(CH_RING + 16 * ((head + k) % n), R.TX_DESC.pack(CH_BUFS, length, 0, cmd, 0, 0, 0))
                s.w(R.TDT, (head + n - 1) % n)
            walks = 0
            while True:
                ev = [s.engine.transmit() for s in sides]
                assert ev[0] == ev[1]
                compare(sides[0], sides[1], f"walk {walks}")
                walks += 1
                if not ev[0] & R.EV_TX_MORE:
                    break
            assert walks == 2 and sides[0].regs[R.TDH >> 2] == (head + n - 1) % n
            assert sides[0].engine.tx_descs_fetched == (n - 1) * (1 if length == 0 else 2)
        assert sides[0].engine.tx_dropped == 1  # the n - 1 EOP-less descriptors
        sent = [s.engine.take_transmitted() for s in sides]
        assert sent[0] == sent[1] and len(sent[0]) == n - 1
    finally:
        for s in sides:
            s.close()


# --- the receive filter: both engines against the reference's rules, exhaustively ----------------

def _filter_oracle(dst: bytes, rctl: int, exact: set[bytes], mta: set[int]) -> bool:
    """docs/reference/e1000-subset.md "Receive filtering", written out independently."""
    if dst == b"\xff" * 6:
        return bool(rctl & R.Rctl.BAM)  # accepted only if BAM
    if dst[0] & 1:
        h = ((dst[4] | dst[5] << 8) >> (4, 3, 2, 0)[(rctl >> 12) & 3]) & 0xFFF
        return bool(rctl & R.Rctl.MPE) or dst in exact or h in mta
    return bool(rctl & R.Rctl.UPE) or dst in exact


def test_engines_follow_the_reference_filter_rules() -> None:
    exact = {bytes.fromhex("525400123456"), bytes.fromhex("01aa00123456"), b"\xff" * 6}
    mta = {0x563, 0xFFF, 0x123}  # 01:AA:00:12:34:56 under MO 0; ff:ff's hash under MO 0
    dsts = [b"\xff" * 6, bytes.fromhex("01aa00123456"), bytes.fromhex("01aa00123457"),
            bytes.fromhex("333300000001"), bytes.fromhex("525400123456"),
            bytes.fromhex("020000000002"), bytes.fromhex("ffffffffffFE"), bytes.fromhex("01005e7fffff")]
    sides = [Side(RefDatapath, b"", []), Side(Datapath, b"", [])]
    try:
        for s in sides:
            for k, mac in enumerate(sorted(exact)):
                s.w(R.RAL(k), int.from_bytes(mac[:4], "little"))
                s.w(R.RAH(k), int.from_bytes(mac[4:], "little") | int(R.Rah.AV))
            for h in mta:
                s.regs[(R.MTA >> 2) + (h >> 5)] |= 1 << (h & 31)
            s.w(R.PBA, R.PBA_DEFAULT)
        checked = 0
        for bits in range(16):
            for mo in range(4):
                rctl = int(R.Rctl.EN) | (mo << 12)
                rctl |= (int(R.Rctl.BAM) if bits & 1 else 0) | (int(R.Rctl.MPE) if bits & 2 else 0)
                rctl |= (int(R.Rctl.UPE) if bits & 4 else 0) | (int(R.Rctl.SBP) if bits & 8 else 0)
                for dst in dsts:
                    frame = dst + bytes(54)
                    frame += struct.pack("<I", zlib.crc32(frame))
                    got = []
                    for s in sides:
                        s.w(R.RCTL, rctl)
                        gprc = s.regs[R.GPRC >> 2]
                        s.engine.receive(frame)  # no ring: an accepted frame waits in the buffer
                        got.append(s.regs[R.GPRC >> 2] != gprc)
                        s.engine.reset()
                    want = _filter_oracle(dst, rctl, exact, mta)
                    assert got == [want, want], (dst.hex(), hex(rctl))
                    checked += 1
        assert checked == 16 * 4 * len(dsts)
    finally:
        for s in sides:
            s.close()


# --- memory ordering in the Cython engine ----------------------------------------------------

def test_cython_engine_writes_the_status_byte_last_with_a_release_store() -> None:
    """The ordering cannot be observed from one thread, so this holds the source to the rule
    (docs/datapath.md "Memory ordering"): every status byte the engine writes (RX write-back,
    TX DD write-back) goes through nicemu_store_release_u8, after the descriptor's other
    fields and the buffer, and the helper is a real __ATOMIC_RELEASE store."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "nicemu"
    pyx = (root / "_datapath.pyx").read_text()
    header = (root / "include" / "nicemu_atomic.h").read_text()
    assert "__atomic_store_n(p, v, __ATOMIC_RELEASE)" in header
    rx = pyx[pyx.index("cdef int _dma_frame(") :]
    rx = rx[: rx.index("head += need")]
    release = rx.index("nicemu_store_release_u8(d + 12,")
    for field in ("memcpy(bp[k]", "d[8] =", "d[9] =", "d[10] =", "d[11] =", "d[13] =", "d[14] =", "d[15] ="):
        assert rx.index(field) < release, field
    tx = pyx[pyx.index("cdef uint64_t _walk_tx(") :]
    tx = tx[: tx.index("cdef inline void _prefetch_tx(")]
    assert "nicemu_store_release_u8(w + 12," in tx
    import re

    assert not re.search(r"\b[dw]\[12\]\s*=(?!=)", pyx)  # no plain store to a status byte anywhere


# --- the capture ring on the linked send path (nicemu.cable.capring) ----------------------------


@pytest.mark.parametrize("seed", range(10))
def test_linked_pairs_capture_the_same_records(seed: int) -> None:
    """Both engines of a linked pair record what they send into one capture ring: the Cython
    pair (CapRing, frames handed over with their FCS owed) and the reference pair (CapRingRef)
    drain the same pcap records (timestamps from a step clock), with snap-length cuts and a ring
    that fills up, and the engines still agree on everything else."""
    from nicemu.cable._capring import CapRing
    from nicemu.cable.capring import CapRingRef

    rng = random.Random(seed)
    seed_mem = random.Random(seed + 11).randbytes(MEM_SIZE)
    ref_pair, cy_pair = _pair(RefDatapath, seed_mem), _pair(Datapath, seed_mem)
    sides = [*ref_pair, *cy_pair]
    capacity = rng.choice([200, 3000, 1 << 20])
    snaplen = rng.choice([60, 64, 100, 1518, 65535])
    rings = CapRingRef(capacity, snaplen, 1000), CapRing(capacity, snaplen, 1000)
    for s in ref_pair:
        s.engine.capture = rings[0]
    for s in cy_pair:
        s.engine.capture = rings[1]
    try:
        geo = program(rng, sides)
        rctl = int(R.Rctl.EN | R.Rctl.UPE | R.Rctl.MPE | R.Rctl.BAM)
        rctl |= int(R.Rctl.SECRC) if rng.random() < 0.5 else 0
        for s in sides:
            s.w(R.RCTL, rctl)
            s.w(R.PBA, R.PBA_DEFAULT)
            s.w(R.RDBAL, RX_BASE)
            s.w(R.RDBAH, 0)
            s.w(R.TDBAL, TX_BASE)
            s.w(R.TDBAH, 0)
        write_rx_descs(random.Random(seed), sides, geo)
        rx_n = geo["rx_n"]
        tails = [ref_pair[0].regs[R.TDT >> 2], ref_pair[1].regs[R.TDT >> 2]]
        drained = 0
        for step in range(60):
            which = rng.randrange(2)
            pair = (ref_pair[which], cy_pair[which])
            roll = rng.random()
            if roll < 0.15:
                for s in pair:
                    s.w(R.RCTL, s.regs[R.RCTL >> 2] ^ int(R.Rctl.SECRC))
            elif roll < 0.35:
                new = (ref_pair[which].regs[R.RDH >> 2] + rng.randrange(rx_n)) % rx_n
                for s in pair:
                    s.w(R.RDT, new)
                assert pair[0].engine.drain_rx() == pair[1].engine.drain_rx()
            elif roll < 0.45:
                limit = rng.choice([-1, 1, 4])
                got = rings[0].drain(limit), rings[1].drain(limit)
                assert got[0] == got[1], f"(seed {seed} step {step})"
                drained += got[0][1]
            else:
                tails[which] = queue_tx(rng, list(pair), geo, tails[which])
                for s in pair:
                    s.w(R.TDT, tails[which])
                assert pair[0].engine.transmit() == pair[1].engine.transmit()
            for k in range(2):
                assert ref_pair[k].engine.take_events() == cy_pair[k].engine.take_events()
                compare(ref_pair[k], cy_pair[k], f"(seed {seed} step {step} side {k})")
            assert (rings[0].captured, rings[0].not_captured) == (rings[1].captured, rings[1].not_captured)
        assert rings[0].drain() == rings[1].drain()
        assert rings[0].captured > 0
    finally:
        for s in sides:
            s.close()


def test_capture_ring_records_a_sinks_frames_too() -> None:
    """Unlinked, an engine records the frames its cable (the sink) took, not the refused ones
    until they go."""
    from nicemu.cable._capring import CapRing
    from nicemu.cable.capring import CapRingRef

    seed_mem = random.Random(3).randbytes(MEM_SIZE)
    rng = random.Random(4)
    answers = [rng.random() < 0.7 for _ in range(200)]
    ref, cy = Side(RefDatapath, seed_mem, answers), Side(Datapath, seed_mem, answers)
    rings = CapRingRef(1 << 20, 128, 10), CapRing(1 << 20, 128, 10)
    try:
        geo = program(rng, [ref, cy])
        tail = ref.regs[R.TDT >> 2]
        for s, ring in zip((ref, cy), rings):
            s.engine.sink = s.sink
            s.engine.capture = ring
        for _ in range(40):
            tail = queue_tx(rng, [ref, cy], geo, tail)
            for s in (ref, cy):
                s.w(R.TDT, tail)
            assert ref.engine.transmit() == cy.engine.transmit()
            compare(ref, cy, "(sink)")
        assert rings[0].drain() == rings[1].drain()
        assert rings[0].captured == len(ref.wire) > 0
    finally:
        ref.close()
        cy.close()
