"""The kernel-style driver as a process: `python -m driver.kernel --socket PATH [options]`.

It connects to one device of an emulator process over vfio-user, brings it up with
driver.e1000.E1000 and runs the event loop a kernel would: wait on the interrupt eventfd,
run the top half, then the bottom half (--mode interrupt) or the NAPI poll (--mode napi),
which keeps polling without interrupts while traffic fills its budget.

Above the driver sits a small application in place of the network stack (`python -m
kstack.kernel` runs the modeled stack over the same driver instead):
  --app count   count received frames (default; `sink` is another name for it)
  --app echo    send every frame back to its sender (source and destination MAC swapped)
  --app gen     transmit --count frames (0: without end) of --size bytes to --dst as fast
                as the TX queue takes them (stop/wake flow control) or at --rate frames/s,
                then keep counting what arrives
--size is the Ethernet convention, as in `nicemu demo` and `python -m driver.pmd`: bytes on
the wire including the 4-byte FCS the device appends (64 = 60 bytes of header and payload).
Frames for a stopped queue wait in a kstack qdisc (--qdisc pfifo_fast or pfifo, up to
--txqueuelen frames each band, then dropped and counted), which the driver's queue wake runs
again, as Linux's qdisc does. The generator hands frames to the driver directly while its
queue runs (as an AF_PACKET socket with PACKET_QDISC_BYPASS does); one the driver refuses
goes into the qdisc.

Output: one JSON object per line on stdout:
  {"event": "up", "mac": ..., "pid": ..., "mode": ...}     after bring-up
  {"event": "carrier", "up": true|false}                   link changes
  {"event": "stats", ...}                                  on SIGUSR1, every --stats-interval
                                                           seconds, and once at exit
--app, --seconds and --stats-interval are named as in `python -m driver.pmd`; the older
spellings --role, --duration and --interval are accepted too.
  {"event": "error", "message": ...}                       the device went away (exit 1)
SIGTERM / SIGINT: bring the interface down cleanly and exit 0.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import struct
import sys
import time
from typing import Callable, Sequence

from driver.bus import BusError
from driver.e1000 import E1000, E1000Config, poll_bucket_labels
from kstack.netdevice import NETDEV_TX_BUSY
from kstack.qdisc import QDISCS, make_qdisc
from kstack.skbuff import SkBuff, default_pool
from nicemu.regs import IMS
from wire.ethernet import ETH_FCS_LEN, EtherType
from wire.mac import BROADCAST, parse_mac

__all__ = ["main", "DriverApp", "context_switches"]

GEN_ETHERTYPE = int(EtherType.LOCAL_EXP1)  # IEEE 802 local experimental EtherType


def context_switches() -> dict[str, int]:
    """This process's voluntary and involuntary context switches and CPU time so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "nvcsw": ru.ru_nvcsw, "nivcsw": ru.ru_nivcsw, "ctx_switches": ru.ru_nvcsw + ru.ru_nivcsw,
        "cpu_user_s": round(ru.ru_utime, 3), "cpu_sys_s": round(ru.ru_stime, 3),
    }


def _mac_bytes(mac: str) -> bytes:
    try:
        return parse_mac(mac)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class DriverApp:
    """The consumer above the driver: counts, echoes or generates frames. Frames the driver's
    stopped TX queue cannot take wait in a kstack qdisc, which the queue's wake runs again."""

    def __init__(self, drv: E1000, app: str, *, txqueuelen: int = 1000, rx_delay: float = 0.0,
                 dst: bytes = BROADCAST, size: int = 64, count: int = 0, rate: float = 0.0,
                 qdisc: str = "pfifo_fast", on_carrier: Callable[[bool], None] | None = None) -> None:
        self.drv = drv
        self.app = app
        self.rx_delay = rx_delay
        self.rx_frames = 0
        self.rx_bytes = 0
        drv.tx_queue_len = txqueuelen
        self.qdisc = make_qdisc(qdisc, drv)
        self.pool = default_pool()
        self.gen_left = count
        self.gen_sent = 0
        self.dst = dst
        self.size = size
        self.rate = rate  # frames/s for the generator, 0 = as fast as the queue takes them
        self._next_due: float | None = None  # paced generator: when the next frame is due
        self.first_rx: float | None = None
        self.last_rx: float | None = None
        drv.set_callbacks(receive=self.receive, on_carrier=on_carrier, on_tx_wake=self.drain_backlog)

    @property
    def qdisc_drops(self) -> int:
        return self.qdisc.drops

    def receive(self, skb: SkBuff) -> None:
        now = time.monotonic()
        if self.first_rx is None:
            self.first_rx = now
        self.last_rx = now
        self.rx_frames += 1
        self.rx_bytes += skb.len
        if self.app == "echo":
            # the same sk_buff goes back out, addresses swapped in place
            v = skb.view(0, 12)
            dst = bytes(v[0:6])
            v[0:6] = v[6:12]
            v[6:12] = dst
            self.enqueue(skb)
        else:
            skb.consume()
        if self.rx_delay:
            time.sleep(self.rx_delay)  # a slow consumer: the ring and then the FIFO fill up

    def enqueue(self, skb: SkBuff) -> None:
        """dev_queue_xmit without a stack: into the qdisc (which may drop). The loop's next
        after_turn runs it, so a poll's worth of echoes costs one doorbell per qdisc run."""
        self.qdisc.enqueue(skb)

    def drain_backlog(self) -> None:
        """qdisc_run until the queue is empty or the driver's queue stops (each run is at most
        DEV_TX_WEIGHT frames and one doorbell); also the netif_wake_queue callback."""
        q = self.qdisc
        while q.pending() and q.run():
            pass

    def generate(self) -> None:
        """Queue generator frames while the TX queue takes them (one doorbell per batch)."""
        drv = self.drv
        if not self.gen_left or drv.queue_stopped or not drv.carrier:
            return
        header = self.dst + drv.dev_addr + struct.pack("!H", GEN_ETHERTYPE)
        pad = bytes(max(0, self.size - ETH_FCS_LEN - len(header) - 8))  # size counts the FCS
        limit = self.gen_left
        if self.rate:
            # paced: one frame per slot and per loop turn; a late process catches up one
            # frame per turn (never in a burst), forgetting slots more than 10 behind
            now = time.monotonic()
            gap = 1.0 / self.rate
            if self._next_due is None or self._next_due < now - 10 * gap:
                self._next_due = now
            if now < self._next_due:
                return
            self._next_due += gap
            limit = 1
        pool = self.pool
        while limit > 0 and not drv.queue_stopped:
            limit -= 1
            skb = pool.from_bytes(header + struct.pack("!Q", self.gen_sent) + pad)
            skb.protocol = GEN_ETHERTYPE
            self.gen_sent += 1
            self.gen_left -= 1
            if drv.ndo_start_xmit(skb, xmit_more=True) == NETDEV_TX_BUSY:
                self.qdisc.enqueue(skb)  # the driver refused it: it waits for the wake
                break

    def after_turn(self) -> None:
        self.drain_backlog()
        if self.app == "gen":
            self.generate()
        self.drv.flush_tx()

    def idle_timeout(self, longest: float) -> float:
        """How long the loop may wait for an interrupt: 0 while the generator has frames and
        queue room (sooner if its rate makes the next frame due earlier)."""
        drv = self.drv
        if self.qdisc.pending():
            return 0.0
        if self.app != "gen" or not self.gen_left or drv.queue_stopped or not drv.carrier:
            return longest
        if not self.rate or self._next_due is None:
            return 0.0
        return min(longest, max(0.0, self._next_due - time.monotonic()))

    def report(self) -> dict:
        drv = self.drv
        st = drv.ethtool_stats()
        out = {
            "event": "stats", "mac": drv.mac, "mode": drv.config.mode.value, "app": self.app,
            "rx_frames": self.rx_frames, "rx_app_bytes": self.rx_bytes, "gen_sent": self.gen_sent,
            "backlog": self.qdisc.qlen, "qdisc_drops": self.qdisc_drops, "carrier": drv.carrier,
            "qdisc": self.qdisc.stats(), "skb": self.pool.stats(),
            "queue_stopped": drv.queue_stopped, "napi_scheduled": drv.napi_scheduled,
            "ims": drv.bus.read32(IMS) if drv.is_open else 0,
            "rx_seconds": (self.last_rx - self.first_rx) if self.first_rx is not None else 0.0,
            "poll_buckets": poll_bucket_labels(drv.config.budget),
        }
        out.update(st)
        out.update(context_switches())
        return out


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option with its default; the description as written."""


APPS = ("count", "sink", "echo", "gen")  # "sink" is python -m driver.pmd's name for "count"


def build_parser() -> argparse.ArgumentParser:
    """The options; the same names as `python -m driver.pmd` for the same ideas (--app,
    --seconds, --stats-interval), the older spellings (--role, --duration, --interval) kept."""
    ap = argparse.ArgumentParser(prog="python -m driver.kernel", description=__doc__,
                                 formatter_class=_HelpFormatter)
    ap.add_argument("--socket", required=True, default=argparse.SUPPRESS, metavar="PATH",
                    help="the device's vfio-user socket")
    ap.add_argument("--mode", choices=("interrupt", "napi"), default="napi",
                    help="interrupt: top half + bottom half per interrupt; napi: poll with "
                         "interrupts masked while polls fill --budget")
    ap.add_argument("--app", "--role", dest="app", choices=APPS, default="count",
                    help="what sits above the driver: count (or sink) counts and drops, echo "
                         "sends every frame back, gen transmits frames")
    ap.add_argument("--dst", type=_mac_bytes, default="ff:ff:ff:ff:ff:ff", metavar="MAC",
                    help="gen: destination MAC")
    ap.add_argument("--size", type=int, default=64, metavar="BYTES",
                    help="gen: frame size on the wire including the 4-byte FCS, 64..1518 "
                         "(64: 60 bytes of header and payload + FCS)")
    ap.add_argument("--count", type=int, default=0, metavar="N",
                    help="gen: frames to send, then keep counting what arrives (0: without end)")
    ap.add_argument("--rate", type=float, default=0.0, metavar="FPS",
                    help="gen: frames per second (0: as fast as the TX queue takes them)")
    ap.add_argument("--seconds", "--duration", dest="duration", type=float, default=0.0, metavar="S",
                    help="exit after this many seconds (0: run until SIGTERM/SIGINT)")
    ap.add_argument("--rx-ring", type=int, default=256, metavar="N", help="RX descriptors (RDLEN / 16)")
    ap.add_argument("--tx-ring", type=int, default=256, metavar="N", help="TX descriptors (TDLEN / 16)")
    ap.add_argument("--budget", type=int, default=64, metavar="N",
                    help="napi: frames one poll may take before it yields (NAPI weight)")
    ap.add_argument("--itr", default="0",
                    help="interrupts/s cap (ITR), 0 = off, or 'dynamic' / 'conservative' (Linux's adaptive ITR)")
    ap.add_argument("--rdtr", type=int, default=0, metavar="US",
                    help="RX interrupt delay timer (RDTR), in 1.024 us units (0: off)")
    ap.add_argument("--radv", type=int, default=8, metavar="US",
                    help="RX absolute interrupt delay (RADV), in 1.024 us units")
    ap.add_argument("--tidv", type=int, default=8, metavar="US",
                    help="TX interrupt delay (TIDV), in 1.024 us units")
    ap.add_argument("--tadv", type=int, default=32, metavar="US",
                    help="TX absolute interrupt delay (TADV), in 1.024 us units")
    ap.add_argument("--rx-delay", type=float, default=0.0, metavar="S",
                    help="seconds the consumer spends per frame (a slow application)")
    ap.add_argument("--txqueuelen", type=int, default=1000, metavar="N",
                    help="frames the qdisc holds for a stopped TX queue (per band)")
    ap.add_argument("--qdisc", choices=sorted(QDISCS), default="pfifo_fast",
                    help="the queueing discipline in front of the TX ring")
    ap.add_argument("--stats-interval", "--interval", dest="stats_interval", type=float, default=0.0,
                    metavar="S", help="print a stats line every S seconds (0: only on SIGUSR1 and at exit)")
    ap.add_argument("--mem", type=int, default=4 << 20, metavar="BYTES", help="bytes of DMA memory")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.app == "sink":
        args.app = "count"
    if not 64 <= args.size <= 1518:
        print(json.dumps({"event": "error", "message": f"--size {args.size} outside 64..1518 "
                                                       f"(bytes on the wire, FCS included)"}), flush=True)
        return 2
    if args.count < 0:
        print(json.dumps({"event": "error", "message": f"--count {args.count} is negative"}), flush=True)
        return 2
    count = args.count or (1 << 62 if args.app == "gen" else 0)  # 0: without end
    from driver.vfio_user_client import VfioUserBus

    stop = False
    dump = False

    def on_stop(signum, frame) -> None:
        nonlocal stop
        stop = True

    def on_dump(signum, frame) -> None:
        nonlocal dump
        dump = True

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGUSR1, on_dump)

    def emit(obj: dict) -> None:
        print(json.dumps(obj), flush=True)

    try:
        cfg = E1000Config(
            mode=args.mode, rx_ring_size=args.rx_ring, tx_ring_size=args.tx_ring, budget=args.budget,
            itr=args.itr, rdtr=args.rdtr, radv=args.radv, tidv=args.tidv, tadv=args.tadv,
        )
    except ValueError as e:
        emit({"event": "error", "message": str(e)})
        return 2
    try:
        bus = VfioUserBus(args.socket, mem_size=args.mem)
    except BusError as e:
        emit({"event": "error", "message": str(e)})
        return 1
    drv = E1000(bus, cfg)
    app = DriverApp(drv, args.app, txqueuelen=args.txqueuelen, rx_delay=args.rx_delay,
                    dst=args.dst, size=args.size, count=count, rate=args.rate, qdisc=args.qdisc,
                    on_carrier=lambda up: emit({"event": "carrier", "up": up}))
    rc = 0
    try:
        mac = drv.open()
        emit({"event": "up", "mac": mac, "pid": os.getpid(), "mode": cfg.mode.value, "app": args.app})
        start = time.monotonic()
        next_stats = start + args.stats_interval if args.stats_interval else None
        while not stop:
            now = time.monotonic()
            if args.duration and now - start >= args.duration:
                break
            app.after_turn()
            # a paced generator's sub-millisecond gap is waited precisely: VfioUserBus.wait_irq
            # uses select() for finite timeouts, not poll()'s whole milliseconds
            drv.process(0.0 if drv.napi_scheduled else app.idle_timeout(0.2))
            if dump or (next_stats is not None and now >= next_stats):
                dump = False
                if next_stats is not None:
                    next_stats = now + args.stats_interval
                emit(app.report())
        emit(app.report())
        drv.close()
    except BusError as e:
        emit({"event": "error", "message": f"device gone: {e}"})
        rc = 1
    finally:
        bus.close()
    return rc


if __name__ == "__main__":
    sys.exit(main())
