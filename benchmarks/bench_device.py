"""Device data-path benchmark: two in-process 82540EMs joined by a cable.

Path measured, per frame: TX descriptor fetch -> packet data DMA -> PSP padding -> FCS (IFCS) ->
the cable (nic_a.connect(nic_b): engine to engine, no Python object per frame) -> size and FCS
check -> address filter -> RX packet buffer -> RX descriptor and buffer DMA -> write-back and
statistics on both sides.

The driver side's descriptor work is batched as a real driver's is: the TX ring is filled once
with frames (EOP | IFCS, no RS, so the descriptors can be reused without cleaning), and each
batch costs one RDT write (all consumed RX buffers handed back) and one TDT write (a batch of
frames queued). Frames are counted on the receiving device's GPRC, so a frame only counts if it
reached the RX ring.

Run: python benchmarks/bench_device.py [--seconds S] [--sizes 64,1518] [--ring N] [--batch B]
"""
from __future__ import annotations

import argparse
import struct
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nicemu import DmaMemory  # noqa: E402
from nicemu import regs as R  # noqa: E402
from nicemu.nic import Nic  # noqa: E402

MAC_A = "52:54:00:00:00:0a"
MAC_B = "52:54:00:00:00:0b"
RING_BASE = 0x1000
BUF_BASE = 0x100000
BUF_SIZE = 2048


def make_device(mac: str, engine: str, ring: int) -> Nic:
    mem = DmaMemory(BUF_BASE + ring * BUF_SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        nic = Nic(mem, mac=mac, clock=time.monotonic_ns, engine=engine)
    nic.config_write(0x04, int(R.PciCommand.MEMORY | R.PciCommand.MASTER), size=2)
    return nic


def setup_pair(engine: str, size: int, ring: int) -> tuple[Nic, Nic]:
    a, b = make_device(MAC_A, engine, ring), make_device(MAC_B, engine, ring)
    a.connect(b)
    dst = bytes.fromhex(MAC_B.replace(":", ""))
    frame = dst + bytes.fromhex(MAC_A.replace(":", "")) + struct.pack("!H", 0x88B5)
    frame += bytes(range(256)) * 8
    frame = frame[: size - 4]  # the device appends the FCS (IFCS)
    cmd = int(R.TxdCmd.EOP | R.TxdCmd.IFCS)
    for k in range(ring):  # TX ring of device A: every descriptor holds a frame, no RS
        addr = BUF_BASE + k * BUF_SIZE
        a.mem.write(addr, frame)
        a.mem.write(RING_BASE + 16 * k, R.TX_DESC.pack(addr, len(frame), 0, cmd, 0, 0, 0))
    a.write32(R.TDBAL, RING_BASE)
    a.write32(R.TDLEN, ring * 16)
    a.write32(R.TCTL, int(R.Tctl.EN | R.Tctl.PSP))
    for k in range(ring):  # RX ring of device B
        b.mem.write(RING_BASE + 16 * k, R.RX_DESC.pack(BUF_BASE + k * BUF_SIZE, 0, 0, 0, 0, 0))
    b.write32(R.RDBAL, RING_BASE)
    b.write32(R.RDLEN, ring * 16)
    b.write32(R.RCTL, int(R.Rctl.EN | R.Rctl.BAM))  # BSIZE 00: 2048-byte buffers
    b.write32(R.RDT, ring - 1)
    return a, b


def run(engine: str, size: int, ring: int, batch: int, seconds: float) -> tuple[int, float]:
    """Frames delivered to B's RX ring and the seconds it took."""
    a, b = setup_pair(engine, size, ring)
    tdt = 0
    delivered = 0
    a_write32, b_write32 = a.write32, b.write32
    gprc = R.GPRC >> 2

    def one_batch() -> None:
        nonlocal tdt
        rdh = b.regs[R.RDH >> 2]
        b_write32(R.RDT, (rdh - 1) % ring)  # hand every used RX buffer back: one doorbell
        tdt = (tdt + batch) % ring
        a_write32(R.TDT, tdt)  # queue a batch of frames: one doorbell

    for _ in range(3):  # warm up (page faults on the rings and buffers)
        one_batch()
    b.regs[gprc] = 0
    start = time.perf_counter()
    deadline = start + seconds
    batches = 0
    while True:
        one_batch()
        batches += 1
        if batches % 8 == 0 and time.perf_counter() >= deadline:
            break
    elapsed = time.perf_counter() - start
    delivered = b.regs[gprc]
    expected = batches * batch
    if delivered != expected:
        raise SystemExit(f"{engine}: {delivered} frames reached the RX ring, expected {expected}")
    for nic in (a, b):
        nic.mem.close()
    return delivered, elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="time per Cython measurement")
    ap.add_argument("--ref-seconds", type=float, default=1.0, help="time per reference measurement")
    ap.add_argument("--sizes", default="64,1518", help="frame sizes on the wire including the FCS (default 64,1518)")
    ap.add_argument("--ring", type=int, default=4096, help="descriptors per ring")
    ap.add_argument("--batch", type=int, default=2048, help="frames per TDT doorbell")
    args = ap.parse_args()
    if not 8 <= args.ring <= 65528 or args.ring % 8 or not 0 < args.batch < args.ring:
        raise SystemExit("--ring must be a multiple of 8 in [8, 65528] and 0 < --batch < --ring")
    print(f"nicemu device data path: 2 devices, cable in-process, ring {args.ring}, batch {args.batch}")
    print("size: bytes on the wire with the FCS; frame Gbit/s counts those bytes; line Gbit/s adds")
    print("the 20 bytes each frame also takes on the wire (preamble + SFD 8, inter-frame gap 12)")
    print(f"{'size':>6} {'engine':>8} {'frames/s':>14} {'ns/frame':>10} {'frame Gbit/s':>13} {'line Gbit/s':>12}")
    for size in (int(s) for s in args.sizes.split(",")):
        rates = {}
        for engine, secs in (("cython", args.seconds), ("python", args.ref_seconds)):
            frames, elapsed = run(engine, size, args.ring, args.batch, secs)
            rate = frames / elapsed
            rates[engine] = rate
            frame_gbit = rate * size * 8 / 1e9
            line_gbit = rate * (size + 20) * 8 / 1e9  # + preamble, SFD and inter-frame gap
            print(f"{size:>6} {engine:>8} {rate:>14,.0f} {1e9 / rate:>10.1f} {frame_gbit:>13.2f} "
                  f"{line_gbit:>12.2f}")
        print(f"{size:>6} {'ratio':>8} {rates['cython'] / rates['python']:>13.1f}x")


if __name__ == "__main__":
    main()
