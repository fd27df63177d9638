"""A second emulator-like process for the cable tests: one Nic on one cable end.

    python3 tests/cable_child.py KIND OPTIONS_JSON COUNT

KIND is shm (OPTIONS_JSON: {"arg": ShmCableEnd.to_arg()} with the fds inherited), unix or udp
(OPTIONS_JSON: make_cable keyword arguments). The child programs an RX and a TX ring like a
driver, plugs the Nic into the end, prints {"ready": true, "link": ...}, services the end
until COUNT frames are in its RX ring, prints {"received": [hex, ...]}, then transmits each
received frame back with source and destination swapped ("echo") and keeps servicing the
cable until its stdin closes. Serves the tests only.
"""
from __future__ import annotations

import json
import os
import select
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conftest import PEER_MAC, RxRing, TxRing, enable_bus_master  # noqa: E402

from nicemu import DmaMemory  # noqa: E402
from nicemu import regs as R  # noqa: E402
from nicemu.cable import make_cable, plug, service  # noqa: E402
from nicemu.nic import Nic  # noqa: E402


def say(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def plugged_nic(mem: DmaMemory, mac: str, end) -> tuple[Nic, RxRing, TxRing]:
    """A Nic with an RX and a TX ring of 256 programmed like a driver, plugged into `end`."""
    nic = Nic(mem, mac=mac)
    enable_bus_master(nic)
    rx = RxRing(nic, n=256, bufsize=2048, buf_base=0x10000).setup()
    tx = TxRing(nic, n=256, base=0x2000, buf_base=0x100000).setup()
    plug(nic, end)
    return nic, rx, tx


def transmit(nic: Nic, tx: TxRing, end, state: dict, frames: list[bytes]) -> None:
    """Send frames (no FCS) in batches of 128: the TX ring has 256 slots, so the cable is
    serviced until the device took each batch."""
    for i in range(0, len(frames), 128):
        tx.send(frames[i : i + 128])
        while nic.read32(R.TDH) != tx.tail:
            select.select([end.fileno()], [], [], 1)
            service(nic, end, state)


def main() -> int:
    kind, options, count = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    if kind == "shm":
        from nicemu.cable.shm import ShmCableEnd

        end = ShmCableEnd.from_arg(options["arg"])
    else:
        end = make_cable(kind, **options)
    mem = DmaMemory(2 << 20)
    nic, rx, tx = plugged_nic(mem, PEER_MAC, end)
    state: dict = {}
    say({"ready": True, "link": bool(end.link_up)})
    got: list[bytes] = []
    k = 0
    while len(got) < count:
        r, _, _ = select.select([end.fileno()], [], [], 20)
        if not r:
            say({"error": f"timeout with {len(got)} of {count} frames"})
            return 1
        service(nic, end, state)
        while k < rx.n and rx.desc(k)[3] & R.RxdStatus.DD:
            got.append(rx.data(k))
            k += 1
    say({"received": [g.hex() for g in got]})
    # echo: swap the addresses, drop the FCS (the device appends a new one)
    transmit(nic, tx, end, state, [g[6:12] + g[0:6] + g[12:-4] for g in got])
    while True:
        r, _, _ = select.select([end.fileno(), sys.stdin], [], [], 20)
        if sys.stdin in r:
            if not os.read(sys.stdin.fileno(), 1):
                break
        if end.fileno() in r:
            service(nic, end, state)
    end.close()
    mem.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())


# --- the parent side (imported by the tests) --------------------------------------------------


def echo_through_child(end, kind: str, options: dict, frames: list[bytes], pass_fds=(), before_start=None):
    """Run the child on the other end of `end`, send `frames` (no FCS) from a Nic plugged into
    `end`, and collect what the child's RX ring got and the echoes back in ours.
    Returns (child_received, echoes_received, child_ready_message)."""
    import subprocess

    from conftest import MAC

    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), kind, json.dumps(options), str(len(frames))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, pass_fds=tuple(pass_fds),
    )
    mem = DmaMemory(2 << 20)
    try:
        if before_start is not None:
            before_start()
        ready = json.loads(proc.stdout.readline() or '{"error": "child died"}')
        assert ready.get("ready"), ready
        nic, rx, tx = plugged_nic(mem, MAC, end)
        state: dict = {}
        out = proc.stdout.fileno()
        child_got = None
        # the link may come up only when the child says hello (unix): service first
        for _ in range(50):
            if end.link_up:
                break
            select.select([end.fileno()], [], [], 0.1)
            service(nic, end, state)
        transmit(nic, tx, end, state, frames)
        echoes: list[bytes] = []
        k = 0
        while child_got is None or len(echoes) < len(frames):
            r, _, _ = select.select([end.fileno(), out], [], [], 30)
            assert r, f"timeout: child {'done' if child_got is not None else 'waiting'}, {len(echoes)} echoes"
            if out in r and child_got is None:
                msg = json.loads(proc.stdout.readline() or '{"error": "child died"}')
                assert "received" in msg, msg
                child_got = [bytes.fromhex(h) for h in msg["received"]]
            if end.fileno() in r:
                service(nic, end, state)
            while k < rx.n and rx.desc(k)[3] & R.RxdStatus.DD:
                echoes.append(rx.data(k))
                k += 1
        return child_got, echoes, ready
    finally:
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        mem.close()
