"""Emulator instructions per forwarded frame, under callgrind: a figure the machine's load does
not move (the wall-clock rates of bench_pmd.py move by 2-5x on a shared 2-core machine).

    python benchmarks/cg_emulator.py [FRAMES]     (default 100000; needs valgrind)

Starts `nicemu serve --pair` under `valgrind --tool=callgrind`, brings up a PMD generator on
nic0 and a PMD receiver on nic1 (64-byte frames, whole bursts of 256, 1024-descriptor rings, a
credit window as bench_pmd.py), warms up, zeroes the counters (`callgrind_control -z`), moves
FRAMES frames, dumps, and prints instructions per frame. Under callgrind the emulator is ~50x
slower, so more doorbells pile up per read than in a live run: the per-doorbell Python share
is smaller here than live; the data path's share is what this measures best.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import machine_line, run_main  # noqa: E402
from bench_pmd import MAC0, MAC1, mac_bytes  # noqa: E402
from driver.pmd import Pmd  # noqa: E402
from driver.vfio_user_client import VfioUserBus  # noqa: E402


def main() -> int:
    frames = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    out, run = tempfile.mkdtemp(prefix="cg-"), tempfile.mkdtemp(prefix="nicemu-cg-")
    socks = [os.path.join(run, "s", f"nic{i}.sock") for i in (0, 1)]
    emu = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/cg.%p",
                            sys.executable, "-m", "nicemu", "serve", "--socket", socks[0], "--mac", MAC0,
                            "--socket", socks[1], "--mac", MAC1, "--pair"],
                           cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    buses: list[VfioUserBus] = []
    try:
        end = time.monotonic() + 120
        while not os.path.exists(socks[1]):
            if time.monotonic() > end or emu.poll() is not None:
                raise RuntimeError("the emulator did not start under valgrind")
            time.sleep(0.2)
        buses = [VfioUserBus(s, 16 << 20, timeout=60) for s in socks]
        gen = Pmd(buses[0], rx_count=64, tx_count=1024, pool_size=1792)
        pmd = Pmd(buses[1], rx_count=1024, tx_count=64, pool_size=1792, rx_free_thresh=64)
        frame = mac_bytes(MAC1) + mac_bytes(MAC0) + b"\x88\xb5"
        frame += bytes(60 - len(frame))
        for i in range(gen.pool.num_bufs):
            gen.pool.mem.write(gen.pool.buf_addr(i) + gen.pool.headroom, frame)
        idx, got_idx = array("I", [0]) * 256, array("I", [0]) * 256
        window = 1024 - 1 - 64 - 256

        def move(total: int) -> int:
            sent = got = 0
            while got < total:
                if sent < total and sent - got + 256 <= window and gen.tx_room() >= 256:
                    k = gen.alloc_bulk(idx, 256, 60)
                    s = gen.tx_burst_idx(idx, k)
                    if s < k:
                        gen.free_bulk(idx, k - s, s)
                    sent += s
                n = pmd.rx_burst_idx(got_idx, 256)
                pmd.free_bulk(got_idx, n)
                got += n
            return got

        move(20_000)
        buses[0].read32(8)
        subprocess.run(["callgrind_control", "-z", str(emu.pid)], capture_output=True, check=False)
        got = move(frames)
        buses[1].read32(8)  # a read flushes: every doorbell of the run is handled
        subprocess.run(["callgrind_control", "-d", str(emu.pid)], capture_output=True, check=False)
        time.sleep(1)
        total = None
        for f in sorted(glob.glob(out + "/cg.*"), key=os.path.getmtime):
            m = re.search(r"^(?:summary|totals):\s*(\d+)", Path(f).read_text(), re.M)
            if m:
                total = int(m.group(1))
        if total is None:
            raise RuntimeError("no callgrind dump")
        print(f"cg_emulator: {got} 64-byte frames through nicemu serve --pair; emulator "
              f"{total} instructions = {total / got:.0f} per frame; {machine_line()}")
        return 0
    finally:
        for b in buses:
            b.close()
        emu.terminate()
        emu.wait(60)
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    run_main(main)
