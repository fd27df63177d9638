"""The kernel process: `python -m kstack.kernel --device SOCKET ...` (or `python -m kstack`).

One modeled kernel: e1000 drivers on emulated devices (vfio-user sockets of `nicemu serve`),
the NetStack with IPv4 above them, and the syscall channel applications connect to. Like a
kernel it has one event loop for everything, and nothing in it blocks except that loop's wait:

    each device's interrupt eventfd  -> handle_irq() (top half), then run_softirq(budget)
                                        while softirq_pending(): the bottom half, or NAPI,
                                        which keeps polling with interrupts masked while its
                                        polls fill the budget (the loop then does not sleep)
    each device's bus socket         -> readable only when the emulator went away: error
    qdiscs with pending work         -> qdisc_run (a run that hit its quota goes again)
    the syscall server's fds         -> handle_ready(fd)
    timers                           -> stack.run_timers (ARP, reassembly, ...), the syscall
                                        server's, the drivers' watchdogs; the wait sleeps until
                                        the earliest of them

Options (repeatable where it makes sense):
  --device SOCKET[,name=eth0][,mode=napi|interrupt][,qdisc=pfifo_fast][,txqueuelen=1000]
           [,itr=0][,rx_ring=256][,tx_ring=256][,tx_csum=on|off][,rx_csum=on|off]
           [,gro=on|off][,gso=on|off]   (ethtool -K DEV gro/gso; the default: on unless
                                         NICEMU_GRO=0 / NICEMU_GSO=0 in the environment)
           [,doorbell_page=on|off]      (TDT/RDT in the doorbell page the emulator polls,
                                         if it offers one; default off: every tail write
                                         is a posted message, as an e1000's MMIO write)
  --addr eth0=198.18.0.1/24        --route 0.0.0.0/0,via=198.18.0.254[,dev=eth0]
  --forward (net.ipv4.ip_forward=1)     --syscall-socket PATH     --pcap eth0=FILE
  --stats-interval S

Output: JSON lines on stdout: {"event": "up", ...} once the devices are open and configured,
{"event": "carrier", "dev": ..., "up": ...}, {"event": "stats", ...} on SIGUSR1, every
--stats-interval seconds and at exit (the stack's counters, each device's `ethtool -S`, the
syscall channel's, and this process's CPU ns from /proc/self/schedstat and context switches),
{"event": "error", "message": ...} when an emulator goes away (exit 1) or an option is bad
(exit 2). SIGTERM / SIGINT: bring every interface down cleanly and exit 0.
"""
from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from driver.bus import BusError
from driver.e1000 import E1000, E1000Config
from kstack.netdevice import NetDevice
from kstack.pcap_tap import PcapTap
from kstack.qdisc import QDISCS
from kstack.stack import NetStack
from nicemu.control import process_costs

__all__ = ["main", "Kernel", "DeviceSpec", "parse_device", "process_costs", "build_parser"]

NAPI_WEIGHT = 64  # per device and poll (Linux's NAPI_POLL_WEIGHT)
LONGEST_SLEEP = 1.0  # seconds: the loop wakes at least this often
DEVICE_MEM = 4 << 20  # bytes of DMA memory per device (rings and buffers)


class OptionError(ValueError):
    """A bad command-line value: reported as an error event, exit 2."""


# --- options -----------------------------------------------------------------------------------

@dataclass
class DeviceSpec:
    socket: str
    name: str
    mode: str = "napi"
    qdisc: str = "pfifo_fast"
    txqueuelen: int = 1000
    config: dict[str, Any] = field(default_factory=dict)  # E1000Config fields
    doorbell_page: bool = False  # TDT/RDT through the negotiated doorbell page (docs/transport.md)


_ON_OFF = {"on": True, "off": False, "1": True, "0": False, "true": True, "false": False}


def _kv(parts: Sequence[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in parts:
        key, sep, value = p.partition("=")
        if not sep or not key or not value:
            raise OptionError(f"{what}: {p!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


def parse_device(text: str, index: int) -> DeviceSpec:
    """`SOCKET[,name=eth0][,mode=napi][,...]` -> DeviceSpec (the default name is eth<index>)."""
    sock, *rest = text.split(",")
    if not sock:
        raise OptionError(f"--device {text!r}: the socket path comes first")
    kv = _kv(rest, f"--device {text!r}")
    spec = DeviceSpec(sock, kv.pop("name", f"eth{index}"))
    spec.mode = kv.pop("mode", "napi")
    if spec.mode not in ("napi", "interrupt"):
        raise OptionError(f"--device {text!r}: mode is napi or interrupt")
    spec.qdisc = kv.pop("qdisc", "pfifo_fast")
    if spec.qdisc not in QDISCS:
        raise OptionError(f"--device {text!r}: qdisc is one of {', '.join(QDISCS)}")
    for key, conv, target in (("txqueuelen", int, None), ("rx_ring", int, "rx_ring_size"),
                              ("tx_ring", int, "tx_ring_size"), ("budget", int, "budget"),
                              ("itr", str, "itr"), ("tx_csum", "bool", "tx_csum"),
                              ("rx_csum", "bool", "rx_csum"), ("gro", "bool", "gro"),
                              ("gso", "bool", "gso")):
        if key not in kv:
            continue
        raw = kv.pop(key)
        try:
            value: Any = _ON_OFF[raw.lower()] if conv == "bool" else conv(raw)
        except (KeyError, ValueError):
            raise OptionError(f"--device {text!r}: bad {key} {raw!r}") from None
        if target is None:
            if value < 0:
                raise OptionError(f"--device {text!r}: {key} must not be negative")
            spec.txqueuelen = value
        else:
            spec.config[target] = value
    if "doorbell_page" in kv:
        raw = kv.pop("doorbell_page")
        if raw.lower() not in _ON_OFF:
            raise OptionError(f"--device {text!r}: bad doorbell_page {raw!r}")
        spec.doorbell_page = _ON_OFF[raw.lower()]
    if kv:
        raise OptionError(f"--device {text!r}: unknown key(s) {', '.join(sorted(kv))}")
    return spec


def _dev_value(text: str, what: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise OptionError(f"{what} {text!r}: DEV=VALUE")
    return name, value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m kstack.kernel", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", action="append", default=[], metavar="SOCKET[,key=value...]",
                    help="a device's vfio-user socket, with name=, mode=napi|interrupt, qdisc=, "
                         "txqueuelen=, itr=, rx_ring=, tx_ring=, tx_csum=, rx_csum=, gro=, gso=, "
                         "doorbell_page=")
    ap.add_argument("--addr", action="append", default=[], metavar="DEV=ADDR/LEN")
    ap.add_argument("--route", action="append", default=[], metavar="PREFIX[,via=GW][,dev=DEV]")
    ap.add_argument("--forward", action="store_true", help="forward IPv4 between devices")
    ap.add_argument("--syscall-socket", metavar="PATH", help="where applications connect")
    ap.add_argument("--pcap", action="append", default=[], metavar="DEV=FILE",
                    help="capture a device's frames in and out (tcpdump -i DEV -w FILE)")
    ap.add_argument("--stats-interval", type=float, default=0.0, metavar="S",
                    help="print stats every S seconds (0: only on SIGUSR1 and at exit)")
    return ap


# --- costs -------------------------------------------------------------------------------------

# process_costs (imported from nicemu.control): this process's CPU time in ns
# (/proc/self/schedstat), not getrusage's 10 ms ticks, and its context switches: the same the
# emulator's control socket answers with.


# --- the kernel --------------------------------------------------------------------------------

class Kernel:
    """One kernel: devices, stack, IP, syscall server, taps, and the event loop over them."""

    def __init__(self, emit: Callable[[dict], None]) -> None:
        self.emit = emit
        self.stack = NetStack()
        self.inet: Any = None
        self.server: Any = None
        self.devices: list[E1000] = []
        self.taps: list[PcapTap] = []
        self.sel = selectors.DefaultSelector()
        self._server_fds: set[int] = set()
        self._server_gen = -1
        self.loops = 0
        self.sleeps = 0
        self.stack.carrier_listeners.append(self._carrier)

    # --- bring-up ---------------------------------------------------------------------------

    def add_device(self, spec: DeviceSpec) -> E1000:
        from driver.vfio_user_client import VfioUserBus

        if spec.name in self.stack.devices:
            raise OptionError(f"two devices named {spec.name}")
        try:
            cfg = E1000Config(mode=spec.mode, **spec.config)
        except (TypeError, ValueError) as e:
            raise OptionError(f"--device {spec.socket}: {e}") from None
        bus = VfioUserBus(spec.socket, mem_size=DEVICE_MEM, doorbell_page=spec.doorbell_page)
        drv = E1000(bus, cfg, name=spec.name)
        drv.tx_queue_len = spec.txqueuelen
        self.stack.register_netdev(drv, qdisc=spec.qdisc)
        self.devices.append(drv)
        self.sel.register(drv.irq_fd(), selectors.EVENT_READ, ("irq", drv))
        self.sel.register(bus.sock.fileno(), selectors.EVENT_READ, ("bus", drv))
        return drv

    def device(self, name: str, what: str) -> NetDevice:
        dev = self.stack.devices.get(name)
        if dev is None:
            raise OptionError(f"{what}: no device named {name} (have {', '.join(self.stack.devices) or 'none'})")
        return dev

    def install_inet(self, forward: bool) -> None:
        from kstack.inet import install

        self.inet = install(self.stack)
        self.stack.sysctl.ip_forward = forward

    def start_server(self, path: str) -> None:
        from kstack.syscall.server import SyscallServer

        self.server = SyscallServer(self.stack, path)
        self.server.stats_provider = self.stats_query
        self._sync_server_fds()

    def open_devices(self) -> None:
        for drv in self.devices:
            self.stack.dev_open(drv)

    def _carrier(self, dev: NetDevice, up: bool) -> None:
        self.emit({"event": "carrier", "dev": dev.name, "up": up})

    def _sync_server_fds(self) -> None:
        """Register the syscall server's fds afresh when its set changed (apps come and go;
        a closed fd's number can come back at once as another's)."""
        if self.server is None or self.server.fds_generation == self._server_gen:
            return
        self._server_gen = self.server.fds_generation
        now = set(self.server.fds())
        for fd in self._server_fds - now:
            try:
                self.sel.unregister(fd)
            except (KeyError, ValueError):
                pass
        for fd in now:
            if fd in self._server_fds:
                try:
                    self.sel.modify(fd, selectors.EVENT_READ, ("sys", fd))  # maybe a new file
                except (KeyError, ValueError):
                    self.sel.register(fd, selectors.EVENT_READ, ("sys", fd))
            else:
                self.sel.register(fd, selectors.EVENT_READ, ("sys", fd))
        self._server_fds = now

    # --- the loop ---------------------------------------------------------------------------

    def turn(self, max_sleep: float) -> None:
        """One pass: softirqs, qdiscs, timers, then wait for fds no longer than the earliest
        deadline (not at all while NAPI or a qdisc has work)."""
        self.loops += 1
        busy = False
        for drv in self.devices:  # net_rx_action: each scheduled device gets one poll
            if drv.softirq_pending():
                drv.run_softirq(NAPI_WEIGHT)
                busy = busy or drv.softirq_pending()
        for drv in self.devices:  # net_tx_action
            q = drv.qdisc
            if q.pending():
                q.run()
                busy = busy or q.pending()
        now_ns = self.stack.clock()
        self.stack.run_timers(now_ns)
        mono = time.monotonic()
        for drv in self.devices:
            drv.run_timers(mono)
        if self.server is not None:
            self.server.run_timers(now_ns)
            self._sync_server_fds()
        timeout = 0.0 if busy else self._sleep_for(now_ns, mono, max_sleep)
        if timeout > 0:
            self.sleeps += 1
        for key, _ in self.sel.select(timeout):
            kind, obj = key.data
            if kind == "irq":
                obj.handle_irq()
            elif kind == "sys":
                if self.server is not None and obj in self._server_fds:
                    self.server.handle_ready(obj)
                    if self.server.fds_generation != self._server_gen:
                        self._sync_server_fds()
                        break  # the rest of the events may name fds that changed owner
            elif kind == "bus":
                obj.bus.check_present()  # readable only at EOF: raises BusError
            elif kind == "signal":
                _drain(obj)

    def _sleep_for(self, now_ns: int, mono: float, longest: float) -> float:
        deadlines = [d for d in (self.stack.next_deadline(),
                                 self.server.next_deadline() if self.server is not None else None)
                     if d is not None]
        wait = longest
        if deadlines:
            wait = min(wait, (min(deadlines) - now_ns) / 1e9)
        for drv in self.devices:
            t = drv.next_timer()
            if t is not None:
                wait = min(wait, t - mono)
        return max(0.0, wait)

    # --- reporting and shutdown -------------------------------------------------------------

    def report(self) -> dict:
        out: dict[str, Any] = {"event": "stats", "pid": os.getpid()}
        out.update(self.stack.counters())
        out["ethtool"] = {d.name: d.ethtool_stats() for d in self.devices if d.is_open}
        if self.inet is not None:
            out["inet"] = self.inet.counters()
            out["neighbours"] = self.inet.neighbours()
        if self.server is not None:
            out["syscall"] = self.server.stats()
        if self.taps:
            out["pcap"] = {t.dev.name: t.stats() for t in self.taps}
        out["loop"] = {"turns": self.loops, "sleeps": self.sleeps}
        out["process"] = process_costs()
        return out

    def stats_query(self) -> dict:
        """What a STATS call on the syscall channel answers (`nicemu stats`): report() and
        the TCP connections (`ss -tani`)."""
        from kstack.tcp_sock import ss

        out = self.report()
        out["tcp"] = ss(self.stack)
        tcp = self.stack.protocols.get("tcp")
        if tcp is not None:
            out["tcp_table"] = tcp.counters()
        return out

    def close(self, device_gone: bool = False) -> None:
        """Everything down, in the reverse order of bring-up; a vanished device is not
        touched (its bus only closed)."""
        if self.server is not None:
            self.server.close()
            self.server = None
        for t in self.taps:
            t.close()
        if self.inet is not None:
            self.inet.shutdown()
        for drv in self.devices:
            try:
                if not device_gone:
                    self.stack.dev_close(drv)
                else:
                    drv.qdisc.reset()
            except BusError:
                pass
            finally:
                if drv.is_open:  # a failed close still gives the memory back
                    drv.is_open = False
                    drv._free_resources()
                drv.bus.close()
        self.sel.close()


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(256):
            pass
    except (BlockingIOError, InterruptedError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """The kernel process. With KSTACK_PROFILE=PREFIX in the environment the whole run is
    profiled (cProfile, in CPU time) and the statistics written to PREFIX.PID at exit (benchmarks)."""
    prefix = os.environ.get("KSTACK_PROFILE")
    if not prefix:
        return _main(argv)
    import cProfile

    prof = cProfile.Profile(time.process_time_ns, 1e-9)  # CPU time: the machine may be shared
    try:
        return prof.runcall(_main, argv)
    finally:
        prof.dump_stats(f"{prefix}.{os.getpid()}")


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def emit(obj: dict) -> None:
        print(json.dumps(obj, default=str), flush=True)

    if not args.device:
        emit({"event": "error", "message": "at least one --device SOCKET is needed"})
        return 2
    if args.stats_interval < 0:
        emit({"event": "error", "message": "--stats-interval must not be negative"})
        return 2

    flags = {"stop": False, "dump": False}

    def on_stop(signum, frame) -> None:
        flags["stop"] = True

    def on_dump(signum, frame) -> None:
        flags["dump"] = True

    # a signal wakes the loop's wait at once: the handler only sets a flag, the wake-up fd
    # makes select() return
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    old_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGUSR1, on_dump)

    k = Kernel(emit)
    k.sel.register(wake_r.fileno(), selectors.EVENT_READ, ("signal", wake_r))
    rc = 0
    gone = False
    try:
        try:
            for i, text in enumerate(args.device):
                k.add_device(parse_device(text, i))
            if args.addr or args.route or args.forward or args.syscall_socket:
                k.install_inet(args.forward)
            for text in args.addr:
                name, cidr = _dev_value(text, "--addr")
                try:
                    k.inet.add_address(k.device(name, "--addr"), cidr)
                except (ValueError, OSError) as e:
                    raise OptionError(f"--addr {text}: {e}") from None
            for text in args.pcap:
                name, path = _dev_value(text, "--pcap")
                try:
                    k.taps.append(PcapTap(k.stack, k.device(name, "--pcap"), path))
                except OSError as e:
                    raise OptionError(f"--pcap {text}: {e}") from None
            k.open_devices()  # carrier up: gratuitous ARP for the addresses
            for text in args.route:
                prefix, *rest = text.split(",")
                kv = _kv(rest, f"--route {text!r}")
                dev = k.device(kv.pop("dev"), "--route") if "dev" in kv else None
                via = kv.pop("via", None)
                if kv:
                    raise OptionError(f"--route {text!r}: unknown key(s) {', '.join(sorted(kv))}")
                try:
                    k.inet.add_route(prefix, via=via, dev=dev)
                except (ValueError, OSError) as e:
                    raise OptionError(f"--route {text}: {e}") from None
            if args.syscall_socket:
                k.start_server(args.syscall_socket)
        except OptionError as e:
            emit({"event": "error", "message": str(e)})
            return 2
        emit({"event": "up", "pid": os.getpid(),
              "devices": [{"name": d.name, "mac": d.mac, "mode": d.config.mode.value,
                           "carrier": d.carrier, "qdisc": d.qdisc.kind} for d in k.devices],
              "addresses": k.inet.addresses() if k.inet is not None else [],
              "routes": k.inet.routes() if k.inet is not None else [],
              "forward": bool(args.forward), "syscall_socket": args.syscall_socket})
        next_stats = time.monotonic() + args.stats_interval if args.stats_interval else None
        while not flags["stop"]:
            longest = LONGEST_SLEEP
            if next_stats is not None:
                longest = max(0.0, min(longest, next_stats - time.monotonic()))
            k.turn(longest)
            if flags["dump"] or (next_stats is not None and time.monotonic() >= next_stats):
                flags["dump"] = False
                if next_stats is not None:
                    next_stats = time.monotonic() + args.stats_interval
                emit(k.report())
        emit(k.report())
    except BusError as e:
        emit({"event": "error", "message": f"device gone: {e}"})
        rc = 1
        gone = True
    finally:
        try:
            k.close(device_gone=gone)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            wake_r.close()
            wake_w.close()
    return rc


if __name__ == "__main__":
    sys.exit(main())
