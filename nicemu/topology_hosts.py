"""The `hosts:` and `applications:` sections of a topology: kstack kernels and their programs.

Why a section of its own: a host is a kstack kernel process (`python -m kstack.kernel`) bound
to devices of the topology, and an application is one of the programs kstack ships
(`python -m kstack.apps.X`) talking to that kernel. `nicemu up` starts them after the
emulators, so everything they need is checked here with the rest of the file, before anything
starts, with the same one-line problems naming the key (nicemu.topology.Problem).

nicemu does not import kstack: the kernel and the applications are started as commands
(`kernel_command`, `app_command`), and `APPS` is the registry of what may be run, so a topology
file never names a free command. Addresses must be IPv4 inside 198.18.0.0/15 (the benchmarking
range the project keeps all emulated traffic in). The schema is in docs/topology.md.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from wire.ipv4 import ntoa, parse_prefix, prefix_mask

if TYPE_CHECKING:
    from nicemu.topology import Topology, _Checker

__all__ = ["APPS", "AppKind", "AppSpec", "HostSpec", "InterfaceSpec", "RouteSpec", "check_sections",
           "kernel_command", "app_command", "host_problems", "MODES", "SAFE_NETWORK", "ENV_KERNEL"]

# Limits (docs/topology.md, "Limits"): each host and each application is a Python process.
MAX_HOSTS = 16
MAX_INTERFACES = 8  # per host
MAX_ADDRESSES = 8  # per interface
MAX_ROUTES = 64  # per host
MAX_APPLICATIONS = 32
MAX_ARGS = 64  # per application
MAX_ARG_CHARS = 256
MAX_APP_TIMEOUT = 86_400.0  # seconds a `wait: true` application may run
DEFAULT_APP_TIMEOUT = 300.0

MODES = ("napi", "interrupt")
HOST_KEYS = ("interfaces", "routes", "forward", "capture")
INTERFACE_KEYS = ("device", "mode", "addresses", "gro", "gso", "doorbell_page")
OFFLOAD_KEYS = ("gro", "gso")  # software offloads of the host's stack (kernel --device gro=, gso=)
# true/false switches of an interface, passed to the kernel's --device as KEY=on|off when given
SWITCH_KEYS = OFFLOAD_KEYS + ("doorbell_page",)  # the driver's tails through the doorbell page
ROUTE_KEYS = ("to", "via", "dev")
APP_KEYS = ("name", "host", "run", "args", "wait", "timeout")

ENV_KERNEL = "NICEMU_KERNEL"  # kstack.socket.ENV: where an application finds its kernel
SAFE_NETWORK = (0xC6120000, 15)  # 198.18.0.0/15 (RFC 2544): the only addresses hosts may use
# (used with fullmatch, ASCII digits only: "$" would let a trailing newline through, "\d" any
# script's digits, which int() reads but the kernel's command line would carry as they are)
_CIDR_RE = re.compile(r"\d{1,3}(\.\d{1,3}){3}/\d{1,2}", re.ASCII)
_ADDR_RE = re.compile(r"\d{1,3}(\.\d{1,3}){3}", re.ASCII)


@dataclass(frozen=True)
class AppKind:
    """A program `applications[i].run` may name: its module and, for a server, the start of
    the line it prints once it listens (`nicemu up` waits for it before the next application)."""

    module: str
    ready: str | None = None


APPS: Mapping[str, AppKind] = {
    "ping": AppKind("kstack.apps.ping"),
    "udp_echo": AppKind("kstack.apps.udp_echo", ready="udp_echo: listening"),
    "udp_send": AppKind("kstack.apps.udp_send"),
    "udp_sink": AppKind("kstack.apps.udp_sink", ready="udp_sink: listening"),
}


@dataclass(frozen=True)
class InterfaceSpec:
    """One interface of a host: the device it drives, the driver mode, its addresses."""

    name: str
    device: str
    mode: str = "napi"
    addresses: tuple[str, ...] = ()  # "198.18.0.1/24"
    # ethtool -K gro/gso: None leaves the kernel's default (on unless NICEMU_GRO=0/NICEMU_GSO=0)
    gro: bool | None = None
    gso: bool | None = None
    doorbell_page: bool | None = None  # None: the kernel's default (off; docs/kstack.md)


@dataclass(frozen=True)
class RouteSpec:
    """`ip route add TO [via VIA] [dev DEV]`."""

    to: str
    via: str | None = None
    dev: str | None = None


@dataclass(frozen=True)
class HostSpec:
    """A kstack kernel process: interfaces, routes, forwarding, captures, its syscall socket."""

    name: str
    interfaces: Mapping[str, InterfaceSpec]
    syscall_socket: Path
    routes: tuple[RouteSpec, ...] = ()
    forward: bool = False
    capture: Mapping[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class AppSpec:
    """An application started on a host, in file order; `wait` ones run to completion."""

    index: int
    name: str
    host: str
    run: str
    args: tuple[str, ...] = ()
    wait: bool = False
    timeout: float = DEFAULT_APP_TIMEOUT


# --- validation ---------------------------------------------------------------------------


def _t() -> Any:
    from nicemu import topology as T  # (a cycle at import time: topology imports us lazily)

    return T


def _in_safe(net: int, plen: int) -> bool:
    base, blen = SAFE_NETWORK
    return plen >= blen and (net & prefix_mask(blen)) == base


def parse_cidr(v: Any) -> tuple[tuple[int, int] | None, str | None]:
    """((address, length), None) for a host address in 198.18.0.0/15, or (None, why not)."""
    T = _t()
    if not isinstance(v, str) or not _CIDR_RE.fullmatch(v):
        return None, f"must be an IPv4 address with its prefix length, e.g. \"198.18.0.1/24\", got {T._describe(v)}"
    try:
        addr, plen = parse_prefix(v)
    except ValueError as e:
        return None, f"{T._describe(v)} is not an IPv4 prefix: {e}"
    if plen == 0 or not _in_safe(addr & prefix_mask(plen), plen):
        return None, (f"{v} is outside 198.18.0.0/15 (a /15 or longer prefix inside it is needed): "
                      "emulated hosts use only the benchmarking range")
    if plen <= 30 and (addr & ~prefix_mask(plen) & 0xFFFFFFFF) in (0, ~prefix_mask(plen) & 0xFFFFFFFF):
        return None, f"{v} is the network or broadcast address of its prefix, not a host's"
    return (addr, plen), None


def _parse_route_to(v: Any) -> tuple[tuple[int, int] | None, str | None]:
    T = _t()
    if isinstance(v, str) and v == "default":
        return (0, 0), None
    if not isinstance(v, str) or not _CIDR_RE.fullmatch(v):
        return None, f"must be a prefix such as \"198.18.2.0/24\" or \"0.0.0.0/0\" (or default), got {T._describe(v)}"
    try:
        net, plen = parse_prefix(v)
    except ValueError as e:
        return None, f"{T._describe(v)} is not an IPv4 prefix: {e}"
    if net & ~prefix_mask(plen) & 0xFFFFFFFF:
        return None, f"{v} has host bits set (the prefix is {ntoa(net & prefix_mask(plen))}/{plen})"
    return (net, plen), None


def check_sections(c: "_Checker", data: dict, devices: Mapping[str, Mapping[str, Any]], rdir: Path,
                   cwd: Path, claimed: dict[Path, str]) -> tuple[dict[str, HostSpec], tuple[AppSpec, ...]]:
    """Validate `hosts:` and `applications:` (problems go to `c`). `devices` are the checked
    devices (name -> fields, with their `socket`), `claimed` every file path already used
    (path -> key), to which hosts add their syscall sockets and captures."""
    hosts = _check_hosts(c, data, devices, rdir, cwd, claimed)
    apps = _check_apps(c, data, hosts)
    return hosts, apps


def _check_hosts(c: "_Checker", data: dict, devices: Mapping[str, Mapping[str, Any]], rdir: Path,
                 cwd: Path, claimed: dict[Path, str]) -> dict[str, HostSpec]:
    T = _t()
    out: dict[str, HostSpec] = {}
    if data.get("hosts") is None:
        return out
    hosts = c.mapping(data["hosts"], "hosts", data, "hosts")
    if hosts is None:
        return out
    if len(hosts) > MAX_HOSTS:
        c.err("hosts", f"{len(hosts)} hosts; a topology may have at most {MAX_HOSTS} (each is a kernel "
                       "process)", data, "hosts")
        return out
    used: dict[str, str] = {}  # device -> the host interface that drives it
    addrs: dict[int, str] = {}  # address -> key path of its first use
    for name, h in hosts.items():
        path = f"hosts.{T._key_text(name)}"
        if not isinstance(name, str) or not T._NAME_RE.fullmatch(name):
            c.err(path, "a host name is letters, digits, '_', '.', '-' (at most 32, not starting with "
                        "a punctuation mark)", hosts, name)
            continue
        h = c.mapping(h, path, hosts, name)
        if h is None:
            continue
        c.keys(h, path, HOST_KEYS, "a host")
        ifaces = _check_interfaces(c, h, path, devices, used, addrs)
        routes = _check_routes(c, h, path, ifaces)
        forward = h.get("forward", False)
        if not isinstance(forward, bool):
            c.err(f"{path}.forward", f"must be true or false, got {T._describe(forward)}", h, "forward")
            forward = False
        capture: dict[str, Path] = {}
        if "capture" in h:
            cap = c.mapping(h["capture"], f"{path}.capture", h, "capture")
            for ifn in cap or {}:
                cp = f"{path}.capture.{T._key_text(ifn)}"
                if ifn not in ifaces:
                    c.err(cp, f"a capture is named by an interface of this host, one of "
                              f"{T._names(ifaces)}{T._suggest(ifn, ifaces)}", cap, ifn)
                    continue
                pcap = c.path(cap, ifn, f"{path}.capture", cwd, "a pcap file path")
                if pcap is not None:
                    _claim(c, claimed, pcap, cp)
                    capture[ifn] = pcap
        sock = rdir / f"kernel-{name}.sock"
        _claim(c, claimed, sock, f"{path} (its syscall socket)")
        why = T.socket_path_problem(sock)
        if why:
            c.err(path, f"its syscall socket {why}; use a shorter runtime_dir or host name", hosts, name)
        out[name] = HostSpec(name, ifaces, sock, routes, forward, capture)
    return out


def _claim(c: "_Checker", claimed: dict[Path, str], p: Path, who: str) -> None:
    if p in claimed:
        c.err(who, f"{_t()._path_text(p)} is also used by {claimed[p]}")
    else:
        claimed[p] = who


def _check_interfaces(c: "_Checker", h: dict, path: str, devices: Mapping[str, Mapping[str, Any]],
                      used: dict[str, str], addrs: dict[int, str]) -> dict[str, InterfaceSpec]:
    T = _t()
    out: dict[str, InterfaceSpec] = {}
    if "interfaces" not in h:
        c.err(f"{path}.interfaces", "missing: a host needs at least one interface "
                                    "(eth0: {device: nic0})", h)
        return out
    ifs = c.mapping(h["interfaces"], f"{path}.interfaces", h, "interfaces")
    if ifs is None:
        return out
    if not ifs:
        c.err(f"{path}.interfaces", "a host needs at least one interface", h, "interfaces")
    if len(ifs) > MAX_INTERFACES:
        c.err(f"{path}.interfaces", f"{len(ifs)} interfaces; a host may have at most {MAX_INTERFACES}",
              h, "interfaces")
        return out
    for ifn, spec in ifs.items():
        p = f"{path}.interfaces.{T._key_text(ifn)}"
        if (not isinstance(ifn, str) or not T._IFNAME_RE.fullmatch(ifn) or ifn in (".", "..")
                or len(ifn) > T.IFNAMSIZ_MAX):
            c.err(p, f"an interface name is letters, digits, '_', '.', '-' (at most {T.IFNAMSIZ_MAX})",
                  ifs, ifn)
            continue
        spec = c.mapping(spec, p, ifs, ifn)
        if spec is None:
            continue
        c.keys(spec, p, INTERFACE_KEYS, "an interface")
        dev = spec.get("device")
        ok = True
        if "device" not in spec:
            c.err(f"{p}.device", "missing: the device this interface drives", spec)
            ok = False
        elif not isinstance(dev, str) or dev not in devices:
            c.err(f"{p}.device", f"unknown device {T._describe(dev)}{T._suggest(dev, devices)} "
                                 f"(devices: {T._names(devices)})", spec, "device")
            ok = False
        elif dev in used:
            c.err(f"{p}.device", f"device {dev!r} is already driven by {used[dev]}; a device has one "
                                 "driver", spec, "device")
            ok = False
        elif "," in str(devices[dev]["socket"]):
            c.err(f"{p}.device", f"the socket path of device {dev!r} contains ',', which "
                                 "kstack.kernel --device cannot take", spec, "device")
            ok = False
        else:
            used[dev] = p
        mode = spec.get("mode", "napi")
        if not isinstance(mode, str) or mode not in MODES:
            c.err(f"{p}.mode", f"must be one of {', '.join(MODES)}, got {T._describe(mode)}"
                               f"{T._suggest(mode, MODES)}", spec, "mode")
            ok = False
        offload: dict[str, bool | None] = {}
        for key in SWITCH_KEYS:
            v = spec.get(key)
            if key in spec and not isinstance(v, bool):
                c.err(f"{p}.{key}", f"must be true or false, got {T._describe(v)}", spec, key)
                ok = False
                v = None
            offload[key] = v
        got: list[str] = []
        if "addresses" in spec:
            av = spec["addresses"]
            if isinstance(av, str):
                av = [av]
            if not isinstance(av, list):
                c.err(f"{p}.addresses", f"must be a list of addresses such as [198.18.0.1/24], got "
                                        f"{T._describe(av)}", spec, "addresses")
                av = []
            elif len(av) > MAX_ADDRESSES:
                c.err(f"{p}.addresses", f"{len(av)} addresses; an interface may have at most "
                                        f"{MAX_ADDRESSES}", spec, "addresses")
                av = []
            for j, a in enumerate(av):
                parsed, why = parse_cidr(a)
                if why:
                    c.err(f"{p}.addresses[{j}]", why, spec, "addresses")
                    continue
                if parsed[0] in addrs:
                    c.err(f"{p}.addresses[{j}]", f"{ntoa(parsed[0])} is also {addrs[parsed[0]]}; each "
                                                 "address belongs to one interface", spec, "addresses")
                    continue
                addrs[parsed[0]] = f"{p}.addresses[{j}]"
                got.append(a)
        if ok:
            out[ifn] = InterfaceSpec(ifn, dev, mode, tuple(got), **offload)
    return out


def _check_routes(c: "_Checker", h: dict, path: str, ifaces: Mapping[str, InterfaceSpec]) -> tuple[RouteSpec, ...]:
    T = _t()
    if h.get("routes") is None:
        return ()
    rv = h["routes"]
    if not isinstance(rv, list):
        c.err(f"{path}.routes", f"must be a list of routes (- {{to: 0.0.0.0/0, via: 198.18.0.254}}), got "
                                f"{T._describe(rv)}", h, "routes")
        return ()
    if len(rv) > MAX_ROUTES:
        c.err(f"{path}.routes", f"{len(rv)} routes; a host may have at most {MAX_ROUTES}", h, "routes")
        return ()
    # connected prefixes: (network, length, interface, own address)
    connected = [(a & prefix_mask(n), n, i.name, a) for i in ifaces.values()
                 for a, n in (parse_prefix(x) for x in i.addresses)]
    out: list[RouteSpec] = []
    seen: dict[tuple[int, int], int] = {}
    for j, r in enumerate(rv):
        p = f"{path}.routes[{j}]"
        r = c.mapping(r, p)
        if r is None:
            continue
        c.keys(r, p, ROUTE_KEYS, "a route")
        if "to" not in r:
            c.err(f"{p}.to", "missing: the destination prefix (0.0.0.0/0 for the default route)", r)
            continue
        to, why = _parse_route_to(r["to"])
        if why:
            c.err(f"{p}.to", why, r, "to")
            continue
        if to in seen:
            c.err(f"{p}.to", f"{ntoa(to[0])}/{to[1]} is also the destination of routes[{seen[to]}]", r, "to")
            continue
        seen[to] = j
        dev = r.get("dev")
        if dev is not None and (not isinstance(dev, str) or dev not in ifaces):
            c.err(f"{p}.dev", f"unknown interface {T._describe(dev)} of this host{T._suggest(dev, ifaces)} "
                              f"(interfaces: {T._names(ifaces)})", r, "dev")
            continue
        via = r.get("via")
        if via is None:
            if dev is None:
                c.err(p, "a route needs `via` (a gateway) or `dev` (an interface)", r)
                continue
        else:
            if not isinstance(via, str) or not _ADDR_RE.fullmatch(via):
                c.err(f"{p}.via", f"must be the gateway's IPv4 address, got {T._describe(via)}", r, "via")
                continue
            try:
                gw = parse_prefix(via)[0]
            except ValueError as e:
                c.err(f"{p}.via", f"{T._describe(via)} is not an IPv4 address: {e}", r, "via")
                continue
            if not _in_safe(gw, 32):
                c.err(f"{p}.via", f"{via} is outside 198.18.0.0/15: emulated hosts use only the "
                                  "benchmarking range", r, "via")
                continue
            if any(gw == own for *_x, own in connected):
                c.err(f"{p}.via", f"{via} is an address of this host, not a gateway", r, "via")
                continue
            on = [ifn for net, n, ifn, _a in connected if gw & prefix_mask(n) == net
                  and (dev is None or ifn == dev)]
            if not on:
                nets = ", ".join(sorted({f"{ntoa(net)}/{n} ({ifn})" for net, n, ifn, _a in connected})) or "none"
                where = f" through {dev}" if dev is not None else ""
                c.err(f"{p}.via", f"gateway {via} is not on a connected network of this host{where} "
                                  f"(connected: {nets})", r, "via")
                continue
        out.append(RouteSpec(f"{ntoa(to[0])}/{to[1]}", via, dev))
    return tuple(out)


def _check_apps(c: "_Checker", data: dict, hosts: Mapping[str, HostSpec]) -> tuple[AppSpec, ...]:
    T = _t()
    if data.get("applications") is None:
        return ()
    av = data["applications"]
    if not isinstance(av, list):
        c.err("applications", f"must be a list of applications (- {{name: ping, host: a, run: ping}}), "
                              f"got {T._describe(av)}", data, "applications")
        return ()
    if len(av) > MAX_APPLICATIONS:
        c.err("applications", f"{len(av)} applications; a topology may have at most {MAX_APPLICATIONS}",
              data, "applications")
        return ()
    raw_hosts = data.get("hosts")
    # the names offered in messages; `hosts:` itself may be anything (its own problem is reported)
    host_names = [h for h in raw_hosts if isinstance(h, str)] if isinstance(raw_hosts, dict) else []
    out: list[AppSpec] = []
    names: dict[str, int] = {}
    for i, a in enumerate(av):
        p = f"applications[{i}]"
        a = c.mapping(a, p)
        if a is None:
            continue
        c.keys(a, p, APP_KEYS, "an application")
        ok = True
        run = a.get("run")
        if "run" not in a:
            c.err(f"{p}.run", f"missing: one of {', '.join(APPS)}", a)
            ok = False
        elif not isinstance(run, str) or run not in APPS:
            c.err(f"{p}.run", f"unknown application {T._describe(run)}{T._suggest(run, APPS)} "
                              f"(shipped: {', '.join(APPS)})", a, "run")
            ok = False
        name = a.get("name", run if ok else f"app{i}")
        if not isinstance(name, str) or not T._NAME_RE.fullmatch(name):
            c.err(f"{p}.name", "must be a name of letters, digits, '_', '.', '-' (at most 32), got "
                               f"{T._describe(name)}", a, "name")
            ok = False
        elif name in names:
            c.err(f"{p}.name", f"{name!r} is also the name of applications[{names[name]}]; give each "
                               "application its own `name`", a, "name" if "name" in a else None)
            ok = False
        else:
            names[name] = i
        host = a.get("host")
        if "host" not in a:
            c.err(f"{p}.host", f"missing: the host it runs on (hosts: {T._names(host_names)})", a)
            ok = False
        elif not isinstance(host, str) or host not in hosts:
            if not (isinstance(host, str) and host in host_names):  # (a broken host is reported there)
                c.err(f"{p}.host", f"unknown host {T._describe(host)}{T._suggest(host, host_names)} "
                                   f"(hosts: {T._names(host_names)})", a, "host")
            ok = False
        args = _check_args(c, a, p)
        ok = ok and args is not None
        wait = a.get("wait", False)
        if not isinstance(wait, bool):
            c.err(f"{p}.wait", f"must be true or false, got {T._describe(wait)}", a, "wait")
            ok = False
        timeout = c.number(a, "timeout", p, lo=0.1, hi=MAX_APP_TIMEOUT, default=DEFAULT_APP_TIMEOUT)
        if "timeout" in a and not wait:
            c.err(f"{p}.timeout", "only an application with `wait: true` has a timeout", a, "timeout")
            ok = False
        if ok:
            out.append(AppSpec(i, name, host, run, tuple(args or ()), wait, float(timeout)))
    return tuple(out)


def _check_args(c: "_Checker", a: dict, p: str) -> list[str] | None:
    """The argument list: texts (numbers are written as texts), bounded, no --kernel (the
    supervisor points each application at its host's kernel)."""
    T = _t()
    if a.get("args") is None:
        return []
    av = a["args"]
    if not isinstance(av, list):
        c.err(f"{p}.args", f"must be a list of arguments such as [\"-c\", \"3\", \"198.18.0.2\"], got "
                           f"{T._describe(av)}", a, "args")
        return None
    if len(av) > MAX_ARGS:
        c.err(f"{p}.args", f"{len(av)} arguments; an application may have at most {MAX_ARGS}", a, "args")
        return None
    out: list[str] = []
    for j, v in enumerate(av):
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            c.err(f"{p}.args[{j}]", f"must be a text or a number, got {T._describe(v)}", a, "args")
            return None
        s = str(v)
        if len(s) > MAX_ARG_CHARS or not s.isprintable():
            c.err(f"{p}.args[{j}]", f"must be printable text of at most {MAX_ARG_CHARS} characters, "
                                    f"got {T._describe(v)}", a, "args")
            return None
        if s == "--kernel" or s.startswith("--kernel="):
            c.err(f"{p}.args[{j}]", "--kernel is set by nicemu up (the application's host's syscall "
                                    "socket)", a, "args")
            return None
        out.append(s)
    return out


# --- on this host ---------------------------------------------------------------------------


def host_problems(topo: "Topology") -> list[Any]:
    """What would stop the hosts and applications from starting, checked without creating
    anything: a syscall socket path taken by something that is not a socket, a capture whose
    directory is missing, and kstack not being importable by the child processes."""
    T = _t()
    problems = []
    for h in topo.hosts.values():
        if T._taken(h.syscall_socket):
            problems.append(T.Problem(f"hosts.{h.name}", f"{T._path_text(h.syscall_socket)} exists and is "
                                                         "not a socket; refusing to replace it"))
        for ifn, pcap in h.capture.items():
            why = T._capture_problem(pcap)
            if why:
                problems.append(T.Problem(f"hosts.{h.name}.capture.{ifn}", why))
    if topo.hosts and not (repo_root() / "kstack" / "kernel.py").is_file():
        problems.append(T.Problem("hosts", f"kstack is not found next to nicemu ({repo_root()}): "
                                           "python -m kstack.kernel cannot run"))
    return problems


def repo_root() -> Path:
    """The directory holding the nicemu, kstack and driver packages (children's PYTHONPATH)."""
    return Path(__file__).resolve().parent.parent


# --- commands -------------------------------------------------------------------------------


def kernel_command(topo: "Topology", host: HostSpec) -> list[str]:
    """`python -m kstack.kernel ...` for one host: its devices (with their driver's ring sizes
    from `devices.X.driver`), addresses, routes, forwarding, captures and syscall socket."""
    cmd = [sys.executable, "-m", "kstack.kernel"]
    for i in host.interfaces.values():
        d = topo.devices[i.device]
        opt = f"{d.socket},name={i.name},mode={i.mode}"
        for key, arg in (("rx_ring_size", "rx_ring"), ("tx_ring_size", "tx_ring")):
            if key in d.driver:
                opt += f",{arg}={d.driver[key]}"
        for key in SWITCH_KEYS:
            v = getattr(i, key)
            if v is not None:
                opt += f",{key}={'on' if v else 'off'}"
        cmd += ["--device", opt]
    for i in host.interfaces.values():
        for a in i.addresses:
            cmd += ["--addr", f"{i.name}={a}"]
    for r in host.routes:
        cmd += ["--route", r.to + (f",via={r.via}" if r.via else "") + (f",dev={r.dev}" if r.dev else "")]
    if host.forward:
        cmd.append("--forward")
    for ifn, pcap in host.capture.items():
        cmd += ["--pcap", f"{ifn}={pcap}"]
    cmd += ["--syscall-socket", str(host.syscall_socket)]
    return cmd


def app_command(app: AppSpec) -> list[str]:
    """`python -m kstack.apps.X ARGS...` (the kernel comes from NICEMU_KERNEL)."""
    return [sys.executable, "-m", APPS[app.run].module, *app.args]

