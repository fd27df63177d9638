"""The child processes of the driver-level demo (`nicemu drivers`): the driver under test
(`responder`, echoing every frame back) and the traffic generator (a PMD that sleeps when it
waits). Runnable by hand for experiments:

    python -m lab.l2echo responder --socket PATH --mode irq|napi|pmd
    python -m lab.l2echo generator --socket PATH --dst MAC [--size BYTES]
        stdin: a line "go FRAMES WINDOW" per exchange; EOF ends it
"""
from __future__ import annotations

import argparse
import json
import os
import select
import signal
import sys
import time
from array import array
from collections import deque
from typing import Any, Iterator, Sequence

from wire.ethernet import ETH_FCS_LEN, EtherType
from wire.mac import parse_mac

MODES = ("irq", "napi", "pmd")
MAC0 = "52:54:00:12:34:56"  # nic0: the generator's device
MAC1 = "52:54:00:12:34:57"  # nic1: the device of the driver under test
RING_SIZE = 1024  # descriptors per RX and TX ring, for every driver of the demo
DEFAULT_FRAMES = 100000
DEFAULT_PINGS = 2000
DEFAULT_SIZE = 64  # bytes on the wire, FCS included (the classic "64-byte frames")
DEFAULT_WINDOW = 512  # frames in flight in the stream
MAX_WINDOW = RING_SIZE - 32  # below the RX ring: a window that fits can never overrun it
ETHERTYPE = int(EtherType.LOCAL_EXP1).to_bytes(2, "big")  # IEEE 802 local experimental EtherType
FCS_LEN = ETH_FCS_LEN
BURST = 32  # frames per rx/tx burst in the generator and the PMD responder
IDLE_WAIT = 0.1  # s: longest sleep of a child's loop, so it sees signals and stdin promptly
STALL_SECONDS = 5.0  # the generator gives up when no frame came back for this long
MAX_SECONDS = 60.0  # and ends an exchange after this long whatever happens
UP_TIMEOUT = 30.0  # s for a child to connect and bring its device up (a loaded machine)
CHILD_STOP_TIMEOUT = 3.0  # s a child gets after SIGTERM before SIGKILL
# CPU time comes from /proc in clock ticks (10 ms at the usual 100 Hz), read at both ends of a
# phase: a share of the phase's wall time is good to +-10% only over 20 ticks or more. Shorter
# phases get no CPU figure and no conclusion drawn from one.
CPU_MIN_TICKS = 20


def _emit(obj: dict) -> None:
    """One report line for the controller."""
    print(json.dumps(obj), flush=True)


class _Signals:
    """SIGTERM/SIGINT ask the loop to stop; SIGUSR1 asks for a counters report. Handlers only
    set flags: the loops look at them at least every IDLE_WAIT seconds."""

    def __init__(self) -> None:
        self.stop = False
        self.report = False
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGUSR1, self._on_report)

    def _on_stop(self, _signum: int, _frame: Any) -> None:
        self.stop = True

    def _on_report(self, _signum: int, _frame: Any) -> None:
        self.report = True


def _run_child(args: argparse.Namespace) -> int:
    """One child of `nicemu drivers`: connect to its device, run its role there, and turn a
    device that cannot be reached or goes away into an "error" line and exit status 1.

    The responder (the driver under test: _respond_kernel or _respond_pmd) brings nic1 up in
    `args.mode` and echoes every frame back. It reports "up" after bring-up, "counters" on
    SIGUSR1 and once more at exit (SIGTERM/SIGINT); counter values are totals since bring-up,
    and the controller subtracts two snapshots. The generator: _generate."""
    from driver.bus import BusError
    from driver.vfio_user_client import VfioUserBus

    sig = _Signals()
    try:
        raw = VfioUserBus(args.socket, mem_size=8 << 20)
    except BusError as e:
        _emit({"event": "error", "message": str(e)})
        return 1
    try:
        if args.role == "generator":
            return _generate(raw, args, sig)
        if args.mode == "pmd":
            return _respond_pmd(raw, sig, getattr(args, "udp", None))
        return _respond_kernel(raw, args.mode, sig)
    except BusError as e:
        _emit({"event": "error", "message": f"device gone: {e}"})
        return 1
    finally:
        raw.close()


def _respond_kernel(raw: Any, mode: str, sig: _Signals) -> int:
    """driver.e1000 under driver.kernel's echo application, on a bus that counts register
    accesses (the driver itself counts interrupts and doorbells)."""
    from driver.e1000 import E1000, E1000Config
    from driver.kernel import DriverApp
    from driver.pmd import CountingBus

    bus = CountingBus(raw)
    drv = E1000(bus, E1000Config(mode="interrupt" if mode == "irq" else "napi",
                                 rx_ring_size=RING_SIZE, tx_ring_size=RING_SIZE))
    app = DriverApp(drv, "echo", txqueuelen=RING_SIZE)
    mac = drv.open()
    _emit({"event": "up", "pid": os.getpid(), "mac": mac, "mode": mode, "carrier": drv.carrier})

    def counters() -> dict:
        st = drv.stats
        return {
            "rx": st.rx_packets, "tx": st.tx_packets,
            "interrupts": st.interrupts + st.spurious_interrupts,
            "spurious_interrupts": st.spurious_interrupts,
            "rx_doorbells": st.rx_doorbells, "tx_doorbells": st.tx_doorbells,
            "mmio_reads": bus.reads, "mmio_writes": bus.writes,
            "polls": st.polls, "napi_completes": st.napi_completes, "bottom_halves": st.bottom_halves,
            "tx_queue_stops": st.tx_queue_stops, "dropped": app.qdisc_drops + st.tx_dropped,
        }

    try:
        while not sig.stop:
            app.after_turn()  # echo what the last turn received: one TDT write for all of it
            drv.process(0.0 if drv.napi_scheduled else IDLE_WAIT)
            if sig.report:
                sig.report = False
                _emit({"event": "counters", **counters()})
        final = counters()
        drv.update_stats()  # after the snapshot: these reads are bookkeeping, not traffic
        final["rx_missed"] = drv.hw_stats["MPC"]
        _emit({"event": "counters", "final": True, **final})
    finally:
        drv.close()
    return 0


def _respond_pmd(raw: Any, sig: _Signals, udp_ip: str | None = None) -> int:
    """driver.pmd busy-polling nic1: each burst turned around in place and sent back. With
    `udp_ip` it is a UDP echo server at that address (`nicemu demo`'s bypass path): addresses
    and ports swapped too (checksum-neutral: the same 16-bit words, summed in another order),
    and ARP requests for the address answered in place."""
    from driver.pmd import Pmd

    pmd = Pmd(raw, RING_SIZE, RING_SIZE, mode="poll", burst=BURST)
    _emit({"event": "up", "pid": os.getpid(), "mac": pmd.mac, "mode": "pmd", "engine": pmd.engine})
    core = pmd.core
    pool = pmd.pool
    view = pool.mem.view(pool.addr, pool.num_bufs * pool.buf_size)  # the whole pool, zero copy
    data_off = pool.data_off
    buf_size = pool.buf_size
    out = array("I", [0]) * BURST
    rx_burst = pmd.rx_burst_idx
    tx_burst = pmd.tx_burst_idx
    dropped = 0
    mac = parse_mac(pmd.mac)
    udp = bytes(int(x) for x in udp_ip.split(".")) if udp_ip else None

    def counters() -> dict:
        return {
            "rx": core.ipackets, "tx": core.opackets, "interrupts": pmd.interrupts,
            "rx_doorbells": core.rx_doorbells, "tx_doorbells": core.tx_doorbells,
            "mmio_reads": pmd.bus.reads, "mmio_writes": pmd.bus.writes,
            "empty_polls": pmd.empty_polls, "dropped": dropped,
        }

    try:
        while not sig.stop:
            n = rx_burst(out, BURST)
            if n:
                for k in range(n):  # swap destination and source MAC (the application's work)
                    i = out[k]
                    off = i * buf_size + data_off[i]
                    if udp is not None:
                        udp_turn(view, off, mac, udp)
                        continue
                    h = view[off : off + 12].tobytes()
                    view[off : off + 12] = h[6:] + h[:6]
                sent = tx_burst(out, n)
                if sent < n:  # the TX ring is full: drop the rest, as an L2 forwarder does
                    pmd.free_bulk(out, n - sent, sent)
                    dropped += n - sent
            if sig.report:
                sig.report = False
                _emit({"event": "counters", **counters()})
        final = counters()
        final["rx_missed"] = pmd.stats_update().get("MPC", 0)
        _emit({"event": "counters", "final": True, **final})
    finally:
        pmd.close()
    return 0


def udp_turn(view: Any, off: int, mac: bytes, ip: bytes) -> None:
    """Turn a frame around in place as a UDP echo server at `ip` answers it: Ethernet, IPv4
    (20-byte header) and UDP addresses swapped; an ARP request for `ip` becomes the reply."""
    h = view[off : off + 42].tobytes()
    if h[12:14] == b"\x08\x06" and h[20:22] == b"\x00\x01" and h[38:42] == ip:  # ARP request for us
        view[off : off + 12] = h[6:12] + mac
        view[off + 20 : off + 42] = b"\x00\x02" + mac + ip + h[22:28] + h[28:32]
        return
    view[off : off + 12] = h[6:12] + h[0:6]
    if h[12:14] == b"\x08\x00" and h[14] == 0x45:
        view[off + 26 : off + 38] = h[30:34] + h[26:30] + h[36:38] + h[34:36]


def _generate(raw: Any, args: argparse.Namespace, sig: _Signals) -> int:
    """Drive nic0 with the PMD; for each line "go FRAMES WINDOW" on stdin, exchange FRAMES
    frames with the echoing peer (at most WINDOW in flight) and report "done"."""
    from driver.pmd import Pmd

    pmd = Pmd(raw, RING_SIZE, RING_SIZE, mode="poll", burst=BURST)
    try:
        end = time.monotonic() + 10
        while not pmd.link_up():  # the cable's far end comes up with its emulator
            if time.monotonic() > end or sig.stop:
                _emit({"event": "error", "message": "nic0: no link after 10 s"})
                return 1
            time.sleep(0.05)
        _emit({"event": "up", "pid": os.getpid(), "mac": pmd.mac, "engine": pmd.engine})
        exchanges = _Exchanges(pmd, args, sig)
        for command in _commands(sig):
            words = command.split()
            if len(words) == 3 and words[0] == "go" and words[1].isdigit() and words[2].isdigit():
                _emit({"event": "done", **exchanges.run(int(words[1]), int(words[2]))})
            elif words:
                _emit({"event": "error", "message": f"unknown command {command!r}"})
    finally:
        pmd.close()
    return 0


def _commands(sig: _Signals) -> Iterator[str]:
    """Lines from stdin until EOF or a stop signal (never blocking longer than IDLE_WAIT)."""
    buf = b""
    fd = sys.stdin.fileno()
    while not sig.stop:
        ready, _, _ = select.select([fd], [], [], IDLE_WAIT)
        if not ready:
            continue
        data = os.read(fd, 4096)
        if not data:
            return
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line.decode(errors="replace").strip()


class _Exchanges:
    """nic0's side of the traffic: frames numbered in sequence (the numbers run on from one
    exchange to the next, so a late echo of an earlier one is recognized), echoes checked
    for order, round-trip times measured."""

    def __init__(self, pmd: Any, args: argparse.Namespace, sig: _Signals) -> None:
        self.pmd = pmd
        self.args = args
        self.sig = sig
        self.next_seq = 0

    def run(self, total: int, window: int) -> dict:
        """Send `total` frames to args.dst, never more than `window` unanswered, and take the
        echoes back. Waits by sleeping on RXT0 (Pmd.sleep), never by spinning.

        Round-trip times: echoes come back in order, so a FIFO of (send time, frames) per TX
        burst tells each received frame when it left; with window 1 that is a ping-pong."""
        pmd, args, sig = self.pmd, self.args, self.sig
        core = pmd.core
        pool = pmd.pool
        view = pool.mem.view(pool.addr, pool.num_bufs * pool.buf_size)
        data_off = pool.data_off
        buf_size = pool.buf_size
        header = parse_mac(args.dst) + parse_mac(pmd.mac) + ETHERTYPE
        length = args.size - FCS_LEN  # the device appends the FCS (IFCS)
        window = max(1, window)
        tx_idx = array("I", [0]) * BURST
        rx_idx = array("I", [0]) * BURST
        before = {"sleeps": pmd.sleeps, "interrupts": pmd.interrupts, "reads": pmd.bus.reads,
                  "writes": pmd.bus.writes, "ibytes": core.ibytes}
        seq0 = next_seq = self.next_seq
        expect = seq0  # the next sequence number due back
        out_of_order = stale = 0
        in_flight: deque[list[int]] = deque()  # [send time ns, frames of that burst not back yet]
        rtts: list[int] = []
        clock = time.monotonic_ns
        sent = received = 0
        first_tx = last_rx = 0
        stalled = False
        start = last_progress = clock()
        limit = int(args.max_seconds * 1e9)
        stall = int(args.stall_seconds * 1e9)
        while received < total and not sig.stop:
            room = min(window - (sent - received), total - sent, BURST)
            queued = 0
            if room > 0 and core.alloc_bulk(tx_idx, room, length):
                for k in range(room):  # header and sequence number (the buffer may hold an old echo)
                    i = tx_idx[k]
                    off = i * buf_size + data_off[i]
                    view[off : off + 22] = header + (next_seq + k).to_bytes(8, "big")
                t = clock()  # before the doorbell: if we are preempted after it, the echo may be back
                queued = core.tx_burst(tx_idx, room, 0)
                if queued < room:
                    core.free_bulk(tx_idx, room - queued, queued)
                next_seq += queued
                if queued:
                    in_flight.append([t, queued])
                    if not first_tx:
                        first_tx = t
                sent += queued
            got = core.rx_burst(rx_idx, BURST)
            if got:
                now = clock()
                fresh = got
                for k in range(got):  # each echo must be the next one due: none lost, none twice
                    i = rx_idx[k]
                    off = i * buf_size + data_off[i] + 14
                    seq = int.from_bytes(view[off : off + 8], "big")
                    if seq != expect:
                        if seq < seq0:  # an echo left over from an earlier exchange
                            stale += 1
                            fresh -= 1
                            continue
                        out_of_order += 1
                    expect = seq + 1
                core.free_bulk(rx_idx, got, 0)
                received += fresh
                last_rx = last_progress = now
                got = fresh
                while got and in_flight:
                    burst = in_flight[0]
                    n = min(got, burst[1])
                    rtts.extend([now - burst[0]] * n)
                    got -= n
                    burst[1] -= n
                    if not burst[1]:
                        in_flight.popleft()
                continue
            if clock() - start > limit:
                break
            if not queued:  # nothing came back and nothing more may go: sleep until a frame lands
                if not pmd.sleep(IDLE_WAIT) and clock() - last_progress > stall:
                    stalled = True
                    break
        core.tx_reclaim()
        self.next_seq = next_seq
        seconds = (last_rx - first_tx) / 1e9 if first_tx and last_rx else 0.0
        rtts.sort()
        return {
            "sent": sent, "received": received, "window": window, "seconds": round(seconds, 6),
            "rate": round(received / seconds, 1) if seconds > 0 else 0.0,
            "rtt_us": {q: round(rtts[min(len(rtts) - 1, int(len(rtts) * f))] / 1000, 1)
                       for q, f in (("min", 0.0), ("p50", 0.5), ("p99", 0.99), ("max", 1.0))} if rtts else {},
            "bytes_back": core.ibytes - before["ibytes"], "stalled": stalled,
            "out_of_order": out_of_order, "stale": stale,
            "sleeps": pmd.sleeps - before["sleeps"], "interrupts": pmd.interrupts - before["interrupts"],
            "mmio_reads": pmd.bus.reads - before["reads"], "mmio_writes": pmd.bus.writes - before["writes"],
        }


def _child_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m lab.l2echo",
                                 description="The child processes of `nicemu drivers`.")
    sub = ap.add_subparsers(dest="role", required=True)
    r = sub.add_parser("responder", help="the driver under test: echo every frame back")
    r.add_argument("--socket", required=True)
    r.add_argument("--mode", choices=MODES, required=True)
    r.add_argument("--udp", metavar="IP", help="pmd mode: be a UDP echo server at IP (answers ARP)")
    g = sub.add_parser("generator", help="the traffic generator (a PMD that sleeps when it waits)")
    g.add_argument("--socket", required=True)
    g.add_argument("--dst", required=True, help="the responder's MAC")
    g.add_argument("--size", type=int, default=DEFAULT_SIZE,
                   help="frame size on the wire including the 4-byte FCS")
    g.add_argument("--stall-seconds", type=float, default=STALL_SECONDS)
    g.add_argument("--max-seconds", type=float, default=MAX_SECONDS)
    return ap


def child_main(argv: Sequence[str] | None = None) -> int:
    return _run_child(_child_parser().parse_args(argv))



if __name__ == "__main__":
    sys.exit(child_main())
