"""The `nicemu` command.

One function builds each subcommand's parser (`_add_<name>`) and one runs it (`cmd_<name>`);
`SUBCOMMANDS` lists them in the order `--help` shows them, so adding a command is adding a pair
and a row. These are the device commands; the commands that run drivers and a stack over the devices
belong to the lab package (lab.cli builds the installed `nicemu` from both), since this
package imports neither driver/ nor kstack/. Exit status: 0 success, 1 runtime failure, 2 bad usage or bad input.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Callable, Sequence

from wire.mac import format_mac, nth_mac

__all__ = ["main", "build_parser", "SUBCOMMANDS"]

DEFAULT_MAC = "52:54:00:12:34:56"
ENGINES = ("auto", "cython", "python")  # Nic(engine=...)
LOG_LEVELS = ("debug", "info", "warning", "error")


class CliError(Exception):
    """A user-facing error: printed without a traceback."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _add_engine(ps: argparse.ArgumentParser) -> None:
    """The --engine option of the commands that build devices in this process."""
    ps.add_argument("--engine", default="auto", choices=ENGINES,
                    help="data-path engine (default: auto = Cython if built)")


def _add_log_level(ps: argparse.ArgumentParser, whose: str) -> None:
    """The --log-level option (main() configures logging from it)."""
    ps.add_argument("--log-level", default="warning", choices=LOG_LEVELS,
                    help=f"log level {whose} (default warning)")


# --- show ----------------------------------------------------------------------------------

def _add_show(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    ps = sub.add_parser(
        "show", help="build a device in this process and print its registers",
        description="Build one emulated 82540EM in this process (no socket, no driver) and print "
                    "its PCI identity, the MAC read through EERD, and its register file at "
                    "power-on, named as the SDM names them.")
    ps.add_argument("--mac", default=DEFAULT_MAC, help=f"EEPROM MAC address (default {DEFAULT_MAC})")
    _add_engine(ps)
    ps.add_argument("--all", action="store_true",
                    help="also print the MTA table, unused RAL/RAH entries and zero statistics")
    return ps


def cmd_show(args: argparse.Namespace) -> int:
    import warnings

    from nicemu import regs as R
    from nicemu.dma import DmaMemory

    mac = _port_mac(args.mac, "show: --mac")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "Cython not built" is shown below instead
        nic = _make_nic(DmaMemory(1 << 16), mac, args.engine)
    out = sys.stdout
    vendor = nic.config_read(0x00, 2)
    device = nic.config_read(0x02, 2)
    klass = nic.config_read(0x08, 4) >> 8
    nic.config_write(0x10, 0xFFFFFFFF)  # BAR0 sizing, as firmware does it
    bar_size = (~(nic.config_read(0x10) & 0xFFFFFFF0) & 0xFFFFFFFF) + 1
    nic.config_write(0x10, 0)
    words = []
    for addr in range(3):  # the MAC through EERD, as a driver reads it
        nic.write32(R.EERD, addr << 8 | int(R.Eerd.START))
        words.append(nic.read32(R.EERD) >> 16)
    eerd_mac = format_mac(b"".join(w.to_bytes(2, "little") for w in words))  # low byte first
    engine = _engine_name(nic.engine)
    print(f"82540EM  PCI {vendor:04x}:{device:04x}  class {klass:06x}  BAR0 {bar_size // 1024} KiB  "
          f"engine {engine}", file=out)
    print(f"MAC (EEPROM via EERD) {eerd_mac}", file=out)
    print(file=out)
    print(f"{'offset':>8}  {'register':<10}  {'value':>10}  bits", file=out)
    for off, reg in R.REGISTERS.items():
        value = nic.peek32(off)
        if not args.all and not value and (reg.name.startswith(("MTA", "RAL", "RAH")) or reg.read in
                                           (R.READ_CLEAR, R.READ_STAT_LOW, R.READ_STAT_HIGH)):
            continue
        print(f"  0x{off:05x}  {reg.name:<10}  0x{value:08x}  {_bits(off, value)}", file=out)
    if not args.all:
        print("\n(zero MTA, RAL/RAH and statistics registers hidden; --all shows them)", file=out)
    return 0


def _engine_name(engine: object) -> str:
    """The engine as --engine and a topology's `engine:` name it: cython or python."""
    from nicemu.datapath_ref import RefDatapath

    return "python" if isinstance(engine, RefDatapath) else "cython"


def _bits(off: int, value: int) -> str:
    """The set bits of a register with an IntFlag class, named as the SDM names them."""
    from nicemu import regs as R

    flags = {R.CTRL: R.Ctrl, R.STATUS: R.Status, R.RCTL: R.Rctl, R.TCTL: R.Tctl, R.ICR: R.Icr, R.IMS: R.Icr}
    cls = flags.get(off)
    if cls is None or not value:
        return ""
    names = [m.name for m in cls if m.value and m.value & (m.value - 1) == 0 and value & m.value]
    return "|".join(n for n in names if n)


# --- serve ---------------------------------------------------------------------------------

def _add_serve(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    ps = sub.add_parser(
        "serve", help="run an emulator process serving devices over vfio-user",
        description="Run one emulator process. Each device listens on an AF_UNIX socket "
                    "(socket 0600; a missing directory is created 0700 if its parent exists, and removed "
                    "at the end; an existing directory must be ours with no group/other access, so "
                    "/tmp itself is refused) and speaks vfio-user to one driver at "
                    "a time. Either give --socket/--mac (repeat both for several devices) or "
                    "--config FILE [--process NAME] for this process's share of a YAML topology. "
                    "Stops cleanly on SIGTERM or Ctrl-C (sockets are unlinked). SIGUSR1 prints a "
                    "'nicemu: stats {json}' line with each device's counters that have no register "
                    "(DMA errors, transport errors, cable and fault statistics); DMA errors are also "
                    "logged as warnings. See docs/transport.md.")
    ps.add_argument("--socket", action="append", default=[], metavar="PATH",
                    help="socket path of a device (repeat for several devices)")
    ps.add_argument("--mac", action="append", default=[], metavar="MAC",
                    help="MAC of the device with the same position (default 52:54:00:12:34:56, +1 per device)")
    ps.add_argument("--pair", action="store_true",
                    help="join the two devices given back to back (an in-process cable)")
    ps.add_argument("--pcap", metavar="FILE",
                    help="with --pair: capture the cable (both directions, FCS included) to FILE, classic "
                         "pcap, through a capture ring the engines fill on their fast path and the "
                         "loop drains (docs/cables.md); at the end a JSON line {\"event\": \"pcap\", ...} "
                         "says how many frames were written and not written")
    ps.add_argument("--snaplen", type=int, default=65535, metavar="N",
                    help="with --pcap: bytes kept of each frame (default 65535)")
    ps.add_argument("--pcap-frames", type=int, default=None, metavar="N",
                    help="with --pcap: frames written at most; later ones are counted (default: no limit)")
    ps.add_argument("--link", choices=("up", "down"), default="up",
                    help="without --pair: the link state of each device's port; its transmitted "
                         "frames leave the device and are dropped (default up)")
    _add_engine(ps)
    ps.add_argument("--no-doorbell-page", action="store_true",
                    help="do not offer the doorbell page to clients that ask (docs/transport.md)")
    ps.add_argument("--engine-threads", action="store_true",
                    help="poll each device's doorbell page in its own thread, waiting without the GIL "
                         "(off by default: on 2 CPUs it measured slower; docs/transport.md; also "
                         "NICEMU_ENGINE_THREADS=1)")
    ps.add_argument("--config", metavar="FILE", help="YAML topology (see docs/topology.md)")
    ps.add_argument("--process", metavar="NAME", help="with --config: which process of the topology to run")
    _add_log_level(ps, "on stderr")
    return ps


def cmd_serve(args: argparse.Namespace) -> int:
    from nicemu.emulator import Emulator

    ready_fd = _take_ready_fd()
    capture = None  # --pair --pcap: its closing report
    if args.engine_threads:  # read by Emulator(), for --config too
        os.environ["NICEMU_ENGINE_THREADS"] = "1"
    if args.config:
        if args.socket or args.mac or args.pair or args.pcap:
            raise CliError("serve: --config cannot be combined with --socket/--mac/--pair/--pcap", 2)
        emu = _emulator_from_config(args.config, args.process)
    else:
        if args.process:
            raise CliError("serve: --process needs --config", 2)
        if not args.socket:
            raise CliError("serve: give --socket PATH (and --mac MAC), or --config FILE", 2)
        if len(args.mac) > len(args.socket):
            raise CliError(f"serve: {len(args.mac)} --mac for {len(args.socket)} --socket", 2)
        if args.pair and len(args.socket) != 2:
            raise CliError("serve: --pair joins exactly two devices (give --socket twice)", 2)
        if args.pcap and not args.pair:
            raise CliError("serve: --pcap captures the --pair cable (other cables: a YAML topology's capture)", 2)
        if not 0 < args.snaplen <= 0x7FFFFFFF or (args.pcap_frames is not None and args.pcap_frames < 0):
            raise CliError("serve: --snaplen must be positive and --pcap-frames >= 0", 2)
        paths = _socket_paths(args.socket)
        macs = _device_macs(args.mac, len(paths))
        dirs = _socket_dirs(paths)
        try:
            emu = Emulator(doorbell_page=not args.no_doorbell_page)
        except BaseException:
            dirs.close()
            raise
        emu.add_closeable(dirs)  # first, so closed last: after the sockets are unlinked
        emu.catch_signals()  # before "ready": a SIGTERM or SIGUSR1 right after it must be handled
        try:
            from nicemu.cable.base import unplugged
            from nicemu.dma import DmaMemory

            nics = []
            for i, (path, mac) in enumerate(zip(paths, macs)):
                nic = _make_nic(DmaMemory(), mac, args.engine)
                emu.add_device(f"nic{i}", nic, path)
                nics.append(nic)
            if args.pair:
                capture = _add_pair(emu, nics, args)
            else:
                for nic in nics:
                    nic.attach(unplugged)  # no cable: frames leave the port and are gone
                    nic.set_link(args.link == "up")
        except BaseException:
            emu.close()
            raise
    for name, server in emu.servers.items():
        print(f"nicemu: {name} {server.nic.mac} on {server.socket_path}", flush=True)
    if ready_fd is None:  # by hand, not under `nicemu up` (which says what to do itself)
        _say_next_steps(emu)  # before "ready", the line scripts wait for, so it stays the last
    print("nicemu: ready", flush=True)
    _notify_ready(ready_fd)
    try:
        emu.run()
    finally:
        if capture is not None:  # closed with the emulator: its file is complete
            print(json.dumps(capture.report()), flush=True)
    return 0


def _add_pair(emu, nics: list, args: argparse.Namespace):
    """--pair: the two devices back to back; with --pcap the pair's capture ring (both engines
    fill it on their fast path, the loop drains it into the file). Returns the capture or None."""
    try:
        pair = emu.add_pair(nics[0], nics[1], capture_a=args.pcap, capture_snaplen=args.snaplen,
                            capture_max_frames=args.pcap_frames)
    except OSError as e:
        raise CliError(f"serve: --pcap {args.pcap}: {e.strerror or e}", 2) from None
    return pair.capture


def _say_next_steps(emu) -> None:
    """After "ready": the driver commands to attach, and the pid for SIGUSR1."""
    for name, server in emu.servers.items():
        path = server.socket_path
        print(f"nicemu: attach a driver to {name}: python -m driver.kernel --socket {path} "
              f"(or python -m driver.pmd --socket {path})", flush=True)
    print(f"nicemu: pid {os.getpid()}: kill -USR1 {os.getpid()} prints a stats line; Ctrl-C or "
          f"SIGTERM stops", flush=True)


def _take_ready_fd() -> int | None:
    """The readiness pipe `nicemu up` handed us (NICEMU_READY_FD), kept from our own children."""
    from nicemu.topology import ENV_READY_FD

    raw = os.environ.pop(ENV_READY_FD, None)
    if raw is None:
        return None
    try:
        fd = int(raw)
        os.set_inheritable(fd, False)
    except (ValueError, OSError):
        logging.getLogger("nicemu.cli").warning("ignoring %s=%r: not an open descriptor", ENV_READY_FD, raw)
        return None
    return fd


def _notify_ready(fd: int | None) -> None:
    """Tell `nicemu up` that every device listens and every cable is open (after the "ready"
    line, so its "is up" line comes after ours)."""
    if fd is None:
        return
    try:
        os.write(fd, b"ready\n")
    except OSError:
        pass  # the supervisor is gone; PR_SET_PDEATHSIG stops us
    finally:
        os.close(fd)


def _socket_paths(given: list[str]) -> list[str]:
    """--socket values as absolute paths, checked before anything is created: each given once
    and short enough for sun_path (the limits a topology's sockets are checked against)."""
    from nicemu.topology import socket_path_problem

    paths: list[str] = []
    for raw in given:
        path = os.path.abspath(raw)
        if path in paths:
            raise CliError(f"serve: --socket {raw} is given twice (each device needs its own socket)", 2)
        why = socket_path_problem(path)
        if why:
            raise CliError(f"serve: --socket {why}", 2)
        paths.append(path)
    return paths


def _device_macs(given: list[str], count: int) -> list[str]:
    """Each device's MAC: --mac in order, then the default counting up; checked as a topology
    checks `mac:` (nicemu.topology.parse_mac: unicast, not zero) and unique."""
    macs: list[str] = []
    for i in range(count):
        mac = _port_mac(given[i], "serve: --mac") if i < len(given) else _nth_mac(i)
        if mac in macs:
            other = macs.index(mac)
            raise CliError(f"serve: devices nic{other} and nic{i} would both have MAC {mac}; each port "
                           "needs its own (give a --mac per --socket)", 2)
        macs.append(mac)
    return macs


def _port_mac(value: str, what: str) -> str:
    from nicemu.topology import parse_mac

    mac, why = parse_mac(value)
    if why:
        raise CliError(f"{what}: {why}", 2)
    assert mac is not None
    return mac


def _socket_dirs(paths: list[str]):
    """Create the sockets' directories (0700) whose parent exists; a missing parent is an
    error naming it, with nothing created. An existing directory must be private (ours, no
    group/other access: nicemu.private_dir), as a topology's runtime directory must: in a
    directory others can write to, a squatter could rename our socket away and bind its own.
    The result removes what it made when closed."""
    from nicemu.private_dir import PrivateDirError
    from nicemu.topology import CreatedDirs, MissingParentError, os_error_text

    dirs = CreatedDirs()
    path = ""
    try:
        for path in paths:
            dirs.socket_dir(os.path.dirname(path))
    except MissingParentError as e:
        dirs.close()
        raise CliError(f"serve: --socket {path}: the directory {e.parent} does not exist; nicemu creates "
                       f"only the socket's own directory, {e.directory} (create {e.parent} first, or "
                       "choose another path)", 2) from None
    except PrivateDirError as e:
        dirs.close()
        raise CliError(f"serve: --socket {path}: {e}", 2) from None
    except OSError as e:
        dirs.close()
        raise CliError(f"serve: socket directory: {os_error_text(e)}", 1) from None
    return dirs


def _emulator_from_config(config: str, process: str | None):
    try:
        from nicemu.topology import build_emulator, os_error_text
    except ImportError as e:
        raise CliError(f"serve --config: topology support is not available ({e})") from None
    try:
        return build_emulator(config, process)
    except (OSError, ValueError) as e:  # TopologyError is a ValueError with every problem listed
        render = getattr(e, "render", None)
        why = os_error_text(e) if isinstance(e, OSError) else str(e)
        raise CliError(render() if callable(render) else f"serve --config {config}: {why}", 2) from None


def _nth_mac(i: int) -> str:
    return nth_mac(DEFAULT_MAC, i)


def _make_nic(mem, mac: str, engine: str):
    from nicemu.nic import Nic

    try:
        return Nic(mem, mac=mac, engine=engine)
    except ValueError as e:
        raise CliError(f"bad device settings (mac {mac!r}, engine {engine!r}): {e}", 2) from None


# --- up (nicemu.supervisor) -------------------------------------------------------------------

def _add_up(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    ps = sub.add_parser(
        "up", help="start every emulator process of a YAML topology and supervise them",
        description="Validate a YAML topology (docs/topology.md), start one emulator process per "
                    "process group (devices on a pair cable share one), create shared resources "
                    "such as shm cable memory and hand them over, and wait. Ctrl-C or SIGTERM stops "
                    "every process (SIGKILL after --stop-timeout) and removes the sockets; if one "
                    "process dies, all are stopped and the exit status is 1. A bad config is "
                    "reported with every problem and exit status 2. SIGUSR1 is passed on to every "
                    "emulator process (each prints its stats line).")
    ps.add_argument("config", metavar="CONFIG", help="the YAML topology file")
    ps.add_argument("--runtime-dir", metavar="DIR",
                    help="directory for the sockets (default: the config's runtime_dir, else "
                         "/tmp/nicemu-$UID/NAME)")
    ps.add_argument("--stop-timeout", type=float, default=5.0, metavar="SECONDS",
                    help="how long processes get to stop after SIGTERM before SIGKILL (default 5)")
    ps.add_argument("--ready-timeout", type=float, default=30.0, metavar="SECONDS",
                    help="how long to wait for every emulator process to be ready: its devices "
                         "listening, its cables open (default 30)")
    ps.add_argument("--check", action="store_true",
                    help="only validate the config and print the plan (processes, devices, cables)")
    _add_log_level(ps, "of the supervisor and the emulator processes")
    return ps


def cmd_up(args: argparse.Namespace) -> int:
    from nicemu.supervisor import run_up
    from nicemu.topology import TopologyError

    if not (args.stop_timeout >= 0 and args.ready_timeout > 0):
        raise CliError("up: --stop-timeout must be >= 0 and --ready-timeout > 0 seconds", 2)
    try:
        return run_up(args.config, runtime_dir=args.runtime_dir, stop_timeout=args.stop_timeout,
                      ready_timeout=args.ready_timeout, check=args.check, log_level=args.log_level)
    except TopologyError as e:
        raise CliError(e.render(), 2) from None


# --- the command ---------------------------------------------------------------------------

# (name, add parser, run): add a row to add a subcommand.
SUBCOMMANDS: list[tuple[str, Callable[[argparse._SubParsersAction], argparse.ArgumentParser],
                        Callable[[argparse.Namespace], int]]] = [
    ("show", _add_show, cmd_show),
    ("serve", _add_serve, cmd_serve),
    ("up", _add_up, cmd_up),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nicemu",
        description="An emulated Intel 82540EM (e1000) NIC: run devices, connect them, watch them.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for _name, add, run in SUBCOMMANDS:
        add(sub).set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Parse and run; `parser` is a larger parser built on build_parser() (lab.cli adds the
    lab's commands to it), run with the same error handling."""
    args = (parser or build_parser()).parse_args(argv)
    level = getattr(args, "log_level", "warning")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        stream=sys.stderr)
    try:
        return args.run(args)
    except CliError as e:
        print(f"nicemu: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `nicemu show | head`
        sys.stderr.close()
        return 0
    except OSError as e:  # e.g. the socket path is in use or not writable
        from nicemu.topology import os_error_text

        print(f"nicemu: {os_error_text(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
