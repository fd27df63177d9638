"""vfio-user transport figures: posted MMIO writes per second, MMIO read round-trip latency.

Starts `python -m nicemu serve` as a separate process (as a real deployment runs it), connects
a VfioUserBus from this process and prints:
- posted writes/s: N REGION_WRITEs with No_reply to a plain register (TIPG), timed until a
  final read returns, so every write has been applied by the device, not just sent;
- read round trip: REGION_READ of STATUS, one at a time, p50/p99/mean in microseconds;
- 64-byte frames/s between two devices of one emulator process (`serve --pair`), a driver
  on each side in this process doing batched descriptor work (one TDT/RDT doorbell per batch).
Usage: python benchmarks/bench_transport.py [--writes N] [--reads N] [--frames N]
"""
from __future__ import annotations

import argparse
import os
import select
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from driver.bus import BusError  # noqa: E402
from driver.vfio_user_client import VfioUserBus  # noqa: E402
from nicemu import regs as R  # noqa: E402
from _common import pdeathsig_preexec, run_main  # noqa: E402  (benchmarks/ is the script's directory)


def _nicemu(*args: str, stdout: int) -> subprocess.Popen:
    """`python -m nicemu ARGS` from this checkout, as its own process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore::RuntimeWarning"}
    return subprocess.Popen([sys.executable, "-m", "nicemu", *args], cwd=ROOT, env=env,
                            stdout=stdout, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            preexec_fn=pdeathsig_preexec())  # dies with us


def _stop(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, SIGKILL if it is still there after `timeout` seconds, and reap it."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def emulator(*args: str):
    """A `nicemu serve` child process, killed and reaped at the end."""
    proc = _nicemu("serve", *args, stdout=subprocess.PIPE)
    try:
        fd = proc.stdout.fileno()
        out = b""
        deadline = time.monotonic() + 30
        while b"nicemu: ready\n" not in out:
            if time.monotonic() > deadline or not select.select([fd], [], [], 1)[0] and proc.poll() is not None:
                raise RuntimeError(f"emulator did not start: {out!r}")
            chunk = os.read(fd, 4096) if select.select([fd], [], [], 0)[0] else b""
            if chunk == b"" and proc.poll() is not None:
                raise RuntimeError(f"emulator exited: {out!r}")
            out += chunk
        yield proc
    finally:
        _stop(proc, 10)
        proc.stdout.close()


def bench_posted_writes(bus: VfioUserBus, n: int) -> float:
    bus.read32(R.STATUS)
    t0 = time.perf_counter()
    for i in range(n):
        bus.write32(R.TIPG, i)
    last = bus.read32(R.TIPG)  # ordered after every write: they are all applied
    dt = time.perf_counter() - t0
    assert last == (n - 1) & 0xFFFFFFFF, last
    return n / dt


def bench_posted_burst(bus: VfioUserBus, n: int) -> float:
    """The emulator's side alone: n posted writes pre-encoded and sent with one sendall, so
    the client costs nothing per write; what is timed is the server's batch decode + apply."""
    from nicemu.vfio_user import protocol as p

    one = struct.Struct("=HHIIIQIII")
    burst = b"".join(one.pack(i & 0xFFFF, p.Command.REGION_WRITE, one.size, p.Flags.NO_REPLY, 0, R.TIPG, 0, 4, i)
                     for i in range(n))
    bus.read32(R.STATUS)
    t0 = time.perf_counter()
    bus.sock.sendall(burst)
    last = bus.read32(R.TIPG)
    dt = time.perf_counter() - t0
    assert last == n - 1, last
    return n / dt


def bench_reads(bus: VfioUserBus, n: int) -> list[int]:
    lat = []
    clock = time.perf_counter_ns
    for _ in range(200):  # warm up
        bus.read32(R.STATUS)
    for _ in range(n):
        t = clock()
        bus.read32(R.STATUS)
        lat.append(clock() - t)
    return lat


def bench_frames(sock_a: str, sock_b: str, n_frames: int, ring: int = 1024, batch: int = 128,
                 window: int = 768) -> tuple[float, int]:
    """64-byte frames from device a's TX ring to device b's RX ring, drivers in this process.

    Both drivers work as a poll-mode driver does: descriptors are written in shared memory,
    one doorbell (TDT / RDT) per batch, RX completion seen by polling DD in memory, no
    interrupts. At most `window` frames are in flight, so neither ring can overrun.
    Returns (frames per second, frames lost)."""
    mem = 1 << 22
    with VfioUserBus(sock_a, mem) as a, VfioUserBus(sock_b, mem) as b:
        for bus in (a, b):
            bus.config_write(0x04, int(R.PciCommand.MEMORY | R.PciCommand.MASTER), 2)
        desc_base, buf_base = 0x0, 0x10000
        frame = bytes.fromhex("525400aa0002525400aa000188b5") + bytes(46)  # 60 bytes; the device adds FCS
        cmd = int(R.TxdCmd.EOP | R.TxdCmd.IFCS)
        tx_desc = [R.TX_DESC.pack(buf_base + 2048 * k, len(frame), 0, cmd, 0, 0, 0) for k in range(ring)]
        rx_desc = [R.RX_DESC.pack(buf_base + 2048 * k, 0, 0, 0, 0, 0) for k in range(ring)]
        for k in range(ring):
            a.mem.write(buf_base + 2048 * k, frame)
            b.mem.write(desc_base + 16 * k, rx_desc[k])
        b.write32(R.RDBAL, desc_base)
        b.write32(R.RDLEN, ring * 16)
        b.write32(R.RDH, 0)
        b.write32(R.RDT, ring - 1)
        b.write32(R.RCTL, int(R.Rctl.EN | R.Rctl.BAM))
        a.write32(R.TDBAL, desc_base)
        a.write32(R.TDLEN, ring * 16)
        a.write32(R.TDH, 0)
        a.write32(R.TDT, 0)
        a.write32(R.TCTL, int(R.Tctl.EN | R.Tctl.PSP))
        b.read32(R.STATUS)
        a_view = a.mem.view(desc_base, ring * 16)
        b_view = b.mem.view(desc_base, ring * 16)
        tdt = rx_next = 0
        rdt = ring - 1
        sent = received = 0
        t0 = time.perf_counter()
        last_progress = t0
        while received < n_frames:
            k = min(batch, n_frames - sent, window - (sent - received))
            if k > 0:
                for _ in range(k):
                    a_view[16 * tdt : 16 * tdt + 16] = tx_desc[tdt]
                    tdt = (tdt + 1) % ring
                sent += k
                a.write32(R.TDT, tdt)
            got = 0
            while b_view[16 * rx_next + 12] & 1:  # DD first, then the rest of the descriptor
                b_view[16 * rx_next : 16 * rx_next + 16] = rx_desc[rx_next]
                rx_next = (rx_next + 1) % ring
                got += 1
            now = time.perf_counter()
            if got:
                received += got
                rdt = (rdt + got) % ring
                b.write32(R.RDT, rdt)
                last_progress = now
            elif now - last_progress > 2.0:
                break  # frames were lost: report it rather than wait forever
        dt = time.perf_counter() - t0
        lost = n_frames - received
        a_view.release()
        b_view.release()
        return received / dt, lost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--writes", type=int, default=200_000)
    ap.add_argument("--reads", type=int, default=20_000)
    ap.add_argument("--frames", type=int, default=200_000)
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {_load()} at the start (the figures depend on it)")
    with tempfile.TemporaryDirectory(prefix="nicemu-bench-") as d:
        sock = os.path.join(d, "nic0.sock")
        with emulator("--socket", sock):
            with VfioUserBus(sock, 1 << 20) as bus:
                rate = bench_posted_writes(bus, args.writes)
                print(f"posted MMIO writes: {rate:,.0f} per second ({1e9 / rate:,.0f} ns each, "
                      f"{args.writes} writes, applied by the device)")
                rate = bench_posted_burst(bus, args.writes)
                print(f"posted MMIO writes, one pre-encoded burst (the emulator's capacity): {rate:,.0f} "
                      f"per second ({1e9 / rate:,.0f} ns each)")
                lat = sorted(bench_reads(bus, args.reads))
                p50 = lat[len(lat) // 2] / 1000
                p99 = lat[int(len(lat) * 0.99)] / 1000
                mean = statistics.fmean(lat) / 1000
                print(f"MMIO read round trip: p50 {p50:.1f} us, p99 {p99:.1f} us, mean {mean:.1f} us "
                      f"({args.reads} reads)")
        sa, sb = os.path.join(d, "a.sock"), os.path.join(d, "b.sock")
        with emulator("--socket", sa, "--mac", "52:54:00:aa:00:01", "--socket", sb, "--mac",
                      "52:54:00:aa:00:02", "--pair"):
            rate, lost = bench_frames(sa, sb, args.frames)
            print(f"64-byte frames, two devices back to back in one emulator process (serve --pair): "
                  f"{rate:,.0f} per second{_lost(lost)}")
        for kind in ("shm", "unix"):
            with topology_up(d, kind) as (sa, sb):
                rate, lost = bench_frames(sa, sb, args.frames)
                print(f"64-byte frames across the {kind} cable between two emulator processes "
                      f"(nicemu up): {rate:,.0f} per second{_lost(lost)}")
    print("(frames: rings of 1024, batches of 128, at most 768 in flight; both drivers run in this "
          "benchmark's process and poll like a PMD, so every figure includes their Python descriptor work)")
    print(f"load average {_load()} at the end")


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _lost(n: int) -> str:
    return f" ({n} frames lost)" if n else ""


@contextmanager
def topology_up(d: str, kind: str):
    """`nicemu up` on a two-process topology joined by a `kind` cable; yields the two sockets."""
    cfg = os.path.join(d, f"{kind}.yaml")
    with open(cfg, "w") as f:
        f.write("devices:\n  nic0: {mac: '52:54:00:aa:00:01'}\n  nic1: {mac: '52:54:00:aa:00:02'}\n"
                f"cables:\n  - kind: {kind}\n    ends: [nic0, nic1]\n")
    run = os.path.join(d, f"run-{kind}")
    proc = _nicemu("up", cfg, "--runtime-dir", run, stdout=subprocess.DEVNULL)
    try:
        socks = (os.path.join(run, "nic0.sock"), os.path.join(run, "nic1.sock"))
        deadline = time.monotonic() + 30
        while True:  # up once both devices accept a driver
            try:
                for s in socks:
                    VfioUserBus(s, 4096).close()
                break
            except BusError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nicemu up {kind} did not come up")
                time.sleep(0.05)
        time.sleep(0.1)  # let the emulators see those probe clients go
        yield socks
    finally:
        _stop(proc, 20)


def _main() -> int:
    try:
        main()
    except BusError as e:
        sys.exit(f"bench_transport: {e}")
    return 0


if __name__ == "__main__":
    run_main(_main)
