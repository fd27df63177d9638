"""Validating a topology: `parse` (YAML text) and `load` (a file) walk the document once with
a `_Checker` that collects every problem with its key path and line, then raise them together.
Each cable kind checks its own keys (its module's `check`, through nicemu.cable.KINDS).
"""
from __future__ import annotations

import dataclasses
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from nicemu.cable import kind_module
from nicemu.cable.faults import PROBABILITY_KEYS
from nicemu.topology.loader import _MarkedDict, _yaml_load, read_config
from nicemu.topology.rundir import check_host, default_runtime_dir
from nicemu.topology.schema import (CABLE_COMMON_KEYS, CABLE_KINDS, DEVICE_KEYS, DRIVER_KEYS,
                                    ENGINES, FAULT_KEYS, MAX_CABLES, MAX_DEVICES,
                                    MAX_PROCESSES, MAX_SHM_TOTAL_BYTES, NAME_MAX, PATH_MAX,
                                    PBA_DEFAULT_RX_KB, PBA_DEFAULT_TX_KB, PBA_KEYS, PBA_MIN_KB,
                                    PBA_TOTAL_KB, RESERVED_NAMES, RX_BUFFER_SIZES,
                                    SHM_DEFAULT_RING_BYTES, TOP_KEYS, _NAME_RE,
                                    _describe, _is_number, _key_text, _path_text, _suggest,
                                    parse_mac, parse_rate, parse_size,
                                    socket_path_problem, CableSpec, DeviceSpec, FaultSpec, Problem,
                                    Topology, TopologyError)


class _Checker:
    """Walks the parsed YAML once, collecting problems instead of stopping at the first."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[Problem] = []
        self.cable_lines: dict[int, int | None] = {}

    def err(self, path: str, message: str, where: Any = None, key: Any = None) -> None:
        line = None
        if isinstance(where, _MarkedDict):
            line = where.key_lines.get(key) if key is not None else where.line
        elif isinstance(where, int):
            line = where
        self.problems.append(Problem(path, message, line))

    def keys(self, mapping: dict, path: str, allowed: Iterable[str], what: str) -> None:
        allowed = list(allowed)
        for k in mapping:
            if k not in allowed:
                p = f"{path}.{_key_text(k)}" if path else _key_text(k)
                self.err(p, f"unknown key for {what}{_suggest(k, allowed)} (valid: {', '.join(allowed)})",
                         mapping, k)

    def mapping(self, v: Any, path: str, parent: Any = None, key: Any = None) -> dict | None:
        if v is None:
            return _empty()
        if not isinstance(v, dict):
            self.err(path, f"must be a mapping (key: value lines), got {_describe(v)}", parent, key)
            return None
        return v

    def path(self, m: dict, key: Any, path: str, base: Path, what: str) -> Path | None:
        """m[key] as an absolute path (relative to `base`), or None: absent, or not a usable
        path (reported)."""
        if key not in m:
            return None
        v = m[key]
        p = f"{path}.{_key_text(key)}" if path else _key_text(key)
        if not isinstance(v, str) or not v.strip():
            self.err(p, f"must be {what}, got {_describe(v)}", m, key)
            return None
        why = _path_problem(v)
        result = _abs(v, base) if why is None else None
        if result is not None:
            why = _path_problem(str(result))
        if why is not None:
            self.err(p, f"{_describe(v)} {why}", m, key)
            return None
        return result

    def number(self, m: dict, key: str, path: str, *, integer: bool = False, lo: float | None = None,
               hi: float | None = None, default: Any = None) -> Any:
        if key not in m:
            return default
        v = raw = m[key]
        p = f"{path}.{key}"
        if not _is_number(v):
            self.err(p, f"must be {'an integer' if integer else 'a number'}, got {_describe(v)}", m, key)
            return default
        if integer and isinstance(v, float):
            if not v.is_integer():
                self.err(p, f"must be an integer, got {_describe(v)}", m, key)
                return default
            v = int(v)
        if v != v:  # NaN
            self.err(p, "must be a number, got NaN", m, key)
            return default
        if lo is not None and v < lo:
            self.err(p, f"must be at least {lo}, got {_describe(raw)}", m, key)
            return default
        if hi is not None and v > hi:
            self.err(p, f"must be at most {hi}, got {_describe(raw)}", m, key)
            return default
        return v


def _path_problem(text: str) -> str | None:
    """Why `text` cannot name a file (checked before the path reaches any system call)."""
    if "\0" in text:
        return "contains a NUL character, which no file name may"
    try:
        raw = os.fsencode(text)
    except UnicodeEncodeError:
        return "contains a character that cannot be in a file name"
    if len(raw) > PATH_MAX:
        return f"is longer than {PATH_MAX} bytes, the limit of a path"
    if any(len(part) > NAME_MAX for part in raw.split(b"/")):
        return f"has a name longer than {NAME_MAX} bytes, the limit of a file name"
    return None


def _names(names: Iterable[Any], most: int = 8) -> str:
    """A list of names for a message: the first `most` (each shortened), then how many more."""
    names = list(names)
    text = ", ".join(_key_text(n) for n in names[:most]) or "none"
    return text + (f" and {len(names) - most} more" if len(names) > most else "")


def _empty() -> _MarkedDict:
    d = _MarkedDict()
    d.key_lines = {}
    return d


def _abs(p: str, base: Path) -> Path:
    path = Path(os.path.expanduser(p))
    return Path(os.path.normpath(path if path.is_absolute() else base / path))


def parse(text: str, *, source: str = "<config>", name: str | None = None,
          runtime_dir: str | os.PathLike | None = None, cwd: Path | None = None) -> Topology:
    """Validate a topology given as YAML text; raise TopologyError listing every problem.

    `name` is the default topology name (the file stem when loading a file); `runtime_dir`
    overrides the config's own (as `nicemu up --runtime-dir` does). Relative capture and
    runtime_dir paths are taken from `cwd` (default: the current directory); relative socket
    paths from the runtime directory.
    """
    data = _yaml_load(text, source)
    c = _Checker(source)
    cwd = cwd or Path.cwd()
    if data is None:
        raise TopologyError([Problem("", "the file is empty; a topology needs at least `devices:`")], source)
    if not isinstance(data, dict):
        raise TopologyError([Problem("", f"the top level must be a mapping with `devices:` and `cables:`, "
                                         f"got {_describe(data)}")], source)
    c.keys(data, "", TOP_KEYS, "a topology")

    # name, runtime_dir
    topo_name = name or "topology"
    if "name" in data:
        if isinstance(data["name"], str) and _NAME_RE.match(data["name"]):
            topo_name = data["name"]
        else:
            c.err("name", f"must be a name of letters, digits, '_', '.', '-' (at most 32), got "
                          f"{_describe(data['name'])}", data, "name")
    if not _NAME_RE.match(topo_name):
        topo_name = re.sub(r"[^A-Za-z0-9_.-]", "_", topo_name)[:32].lstrip("._-") or "topology"
    if runtime_dir is not None:
        rdir = _abs(os.fspath(runtime_dir), cwd)
    else:
        rdir = c.path(data, "runtime_dir", "", cwd, "a directory path") or default_runtime_dir(topo_name)

    devices = _check_devices(c, data, rdir)
    cables = _check_cables(c, data, devices, rdir, cwd)
    processes = _assign_processes(c, devices, cables)
    claimed = _check_unique_paths(c, devices, cables)
    _check_totals(c, processes[0], cables)
    from nicemu.topology_hosts import check_sections  # (it uses this module's checker)

    hosts, apps = check_sections(c, data, devices, rdir, cwd, claimed)

    if c.problems:
        raise TopologyError(c.problems, source)
    devs = {n: DeviceSpec(name=n, process=processes[1][n], **d) for n, d in devices.items()}
    return Topology(topo_name, None, rdir, devs, tuple(cables), processes[0], hosts, apps)


def _check_totals(c: _Checker, processes: Mapping[str, tuple[str, ...]], cables: list[CableSpec]) -> None:
    """Limits of the whole topology: what a start may cost the machine."""
    if len(processes) > MAX_PROCESSES:
        c.err("devices", f"the devices would run in {len(processes)} emulator processes; at most "
                         f"{MAX_PROCESSES} are started: group devices with `process:`")
    shm = sum(2 * (cab.ring_bytes or SHM_DEFAULT_RING_BYTES) for cab in cables if cab.kind == "shm")
    if shm > MAX_SHM_TOTAL_BYTES:
        c.err("cables", f"the shm cables need {shm} bytes of ring memory in all (both directions); "
                        f"at most {MAX_SHM_TOTAL_BYTES}")


def load(path: str | os.PathLike, *, runtime_dir: str | os.PathLike | None = None) -> Topology:
    """Read (read_config: a regular file, size-limited) and validate a topology file (see
    `parse`)."""
    p = Path(path)
    text = read_config(p)
    topo = parse(text, source=str(path), name=p.stem, runtime_dir=runtime_dir)
    return dataclasses.replace(topo, source=p.resolve())


def _check_devices(c: _Checker, data: dict, rdir: Path) -> dict[str, dict[str, Any]]:
    """Per-device checks; returns name -> DeviceSpec fields (process: explicit name or None)."""
    out: dict[str, dict[str, Any]] = {}
    if "devices" not in data:
        c.err("devices", "missing: a topology needs at least one device")
        return out
    devs = c.mapping(data["devices"], "devices", data, "devices")
    if devs is None:
        return out
    if not devs:
        c.err("devices", "a topology needs at least one device", data, "devices")
    if len(devs) > MAX_DEVICES:
        c.err("devices", f"{len(devs)} devices; a topology may have at most {MAX_DEVICES}", data, "devices")
        return out
    macs: dict[str, str] = {}
    for i, (name, d) in enumerate(devs.items()):
        path = f"devices.{_key_text(name)}"
        if not isinstance(name, str) or not _NAME_RE.match(name):
            c.err(path, "a device name is letters, digits, '_', '.', '-' (at most 32, not starting "
                        "with a punctuation mark)", devs, name)
            continue
        if name in RESERVED_NAMES:
            c.err(path, f"{name!r} is reserved (it names the outside end of a cable)", devs, name)
            continue
        d = c.mapping(d, path, devs, name)
        if d is None:
            continue
        c.keys(d, path, DEVICE_KEYS, "a device")
        spec: dict[str, Any] = {}
        # mac: default 52:54:00:12:34:56 (QEMU's) counting up in file order
        if "mac" in d:
            mac, why = parse_mac(d["mac"])
            if why:
                c.err(f"{path}.mac", why, d, "mac")
        else:
            mac = "52:54:00:12:%02x:%02x" % divmod(0x3456 + i, 256)
        if mac is not None:
            if mac in macs:
                c.err(f"{path}.mac", f"{mac} is also the MAC of devices.{macs[mac]}; each port needs its own",
                      d, "mac" if "mac" in d else None)
            macs[mac] = name
            spec["mac"] = mac
        # socket
        spec["socket"] = c.path(d, "socket", path, rdir, "a socket path") or rdir / f"{name}.sock"
        # pba
        rx, tx = PBA_DEFAULT_RX_KB, PBA_DEFAULT_TX_KB
        if "pba" in d:
            pba = c.mapping(d["pba"], f"{path}.pba", d, "pba")
            if pba is not None:
                c.keys(pba, f"{path}.pba", PBA_KEYS, "the packet buffer allocation")
                lim = PBA_TOTAL_KB - PBA_MIN_KB
                rx_v = c.number(pba, "rx_kb", f"{path}.pba", integer=True, lo=PBA_MIN_KB, hi=lim)
                tx_v = c.number(pba, "tx_kb", f"{path}.pba", integer=True, lo=PBA_MIN_KB, hi=lim)
                bad = ("rx_kb" in pba and rx_v is None) or ("tx_kb" in pba and tx_v is None)
                if not bad:
                    # Like the hardware: what RX does not take is left for TX, and the reverse.
                    rx = rx_v if rx_v is not None else (PBA_TOTAL_KB - tx_v if tx_v is not None else rx)
                    tx = tx_v if tx_v is not None else (PBA_TOTAL_KB - rx_v if rx_v is not None else tx)
                    if rx + tx > PBA_TOTAL_KB:
                        c.err(f"{path}.pba", f"rx_kb + tx_kb = {rx + tx} KB, but the 82540EM has "
                                             f"{PBA_TOTAL_KB} KB of packet buffer in all", d, "pba")
        spec["pba_rx_kb"], spec["pba_tx_kb"] = rx, tx
        # engine
        eng = d.get("engine", "auto")
        if eng not in ENGINES:
            c.err(f"{path}.engine", f"must be one of {', '.join(ENGINES)}, got {_describe(eng)}"
                                    f"{_suggest(eng, ENGINES)}", d, "engine")
            eng = "auto"
        spec["engine"] = eng
        # process (explicit group); None = decided by _assign_processes
        proc = d.get("process")
        if proc is not None and not (isinstance(proc, str) and _NAME_RE.match(proc)):
            c.err(f"{path}.process", f"must be a process name of letters, digits, '_', '.', '-', got "
                                     f"{_describe(proc)}", d, "process")
            proc = None
        spec["_process"] = proc
        # driver: the sizes its driver should use
        drv: dict[str, int] = {}
        if "driver" in d:
            dm = c.mapping(d["driver"], f"{path}.driver", d, "driver")
            if dm is not None:
                dp = f"{path}.driver"
                c.keys(dm, dp, DRIVER_KEYS, "driver settings")
                for key in ("rx_ring_size", "tx_ring_size"):
                    n = c.number(dm, key, dp, integer=True, lo=8, hi=4096)
                    if n is not None and n % 8:
                        c.err(f"{dp}.{key}", f"must be a multiple of 8 descriptors (RDLEN/TDLEN are "
                                             f"multiples of 128 bytes), got {n}", dm, key)
                    elif n is not None:
                        drv[key] = n
                if "rx_buffer_len" in dm:
                    n = parse_size(dm["rx_buffer_len"])
                    if n not in RX_BUFFER_SIZES:
                        c.err(f"{dp}.rx_buffer_len", f"must be one of the sizes RCTL.BSIZE encodes "
                                                     f"({', '.join(map(str, RX_BUFFER_SIZES))}), got "
                                                     f"{_describe(dm['rx_buffer_len'])}", dm, "rx_buffer_len")
                    else:
                        drv["rx_buffer_len"] = n
                n = c.number(dm, "tx_buffer_len", dp, integer=True, lo=256, hi=16384)
                if n is not None:
                    drv["tx_buffer_len"] = n
        spec["driver"] = drv
        spec["_line"] = devs.key_lines.get(name)
        out[name] = spec
    return out


def _check_faults(c: _Checker, v: Any, path: str, senders: list[str], cable_index: int,
                  parent: dict) -> dict[str, FaultSpec]:
    out: dict[str, FaultSpec] = {}
    faults = c.mapping(v, path, parent, "faults")
    if faults is None:
        return out
    for sender, spec in faults.items():
        p = f"{path}.{_key_text(sender)}"
        if sender not in senders:
            c.err(p, f"a fault direction is named by the sender, one of {_names(senders)}"
                     f"{_suggest(sender, senders)}", faults, sender)
            continue
        f = c.mapping(spec, p, faults, sender)
        if f is None:
            continue
        c.keys(f, p, FAULT_KEYS, "faults")
        kw: dict[str, Any] = {}
        for prob in PROBABILITY_KEYS:
            if prob in f:
                v2 = f[prob]
                if not _is_number(v2):
                    c.err(f"{p}.{prob}", f"must be a probability between 0 and 1, got {_describe(v2)}", f, prob)
                elif not 0.0 <= v2 <= 1.0:
                    c.err(f"{p}.{prob}", f"is a probability and must be between 0 and 1, got {_describe(v2)}", f, prob)
                else:
                    kw[prob] = float(v2)
        for key in ("delay_ms", "reorder_timeout_ms"):
            ms = c.number(f, key, p, lo=0, hi=60_000)
            if ms is not None:
                kw[key] = float(ms)
        if "rate_bps" in f:
            rate = parse_rate(f["rate_bps"])
            if rate is None or not 1 <= rate <= 10**12:
                c.err(f"{p}.rate_bps", "must be a positive line rate in bits per second (e.g. 1000000 or "
                                       f"\"100M\"), got {_describe(f['rate_bps'])}", f, "rate_bps")
            else:
                kw["rate_bps"] = rate
        for key, lo, hi in (("corrupt_bits", 1, 64), ("overhead_bytes", 0, 1024), ("limit", 1, 1_000_000)):
            v3 = c.number(f, key, p, integer=True, lo=lo, hi=hi)
            if v3 is not None:
                kw[key] = v3
        seed = c.number(f, "seed", p, integer=True, lo=0, hi=2**63 - 1)
        # Default seed: fixed per cable and direction, so runs repeat without anyone choosing one.
        kw["seed"] = seed if seed is not None else zlib.crc32(f"cables[{cable_index}].{sender}".encode())
        out[sender] = FaultSpec(**kw)
    return out


_AT_KEY = object()


@dataclass
class CableCheck:
    """What a cable kind's `check(cc)` sees: its cable's YAML mapping and where it is, and how to
    report a problem (`err`) or read a path (`file`) the way every other key is checked."""

    checker: _Checker
    cab: dict
    path: str  # "cables[i]"
    index: int
    ends: tuple[str, ...]
    ends_ok: bool  # every end is a known device (messages about a default may rely on it)
    rdir: Path  # the runtime directory: relative socket paths are under it
    seen: dict = field(default_factory=dict)  # shared by the cables of one kind (names in use)

    def err(self, key: str, message: str, at: Any = _AT_KEY) -> None:
        """A problem at `cables[i].key`, on the key's line (at=None: the cable's line)."""
        self.checker.err(f"{self.path}.{key}", message, self.cab, key if at is _AT_KEY else at)

    def file(self, key: str, base: Path, what: str) -> Path | None:
        """cab[key] as an absolute path (relative to `base`), or None (absent, or reported)."""
        return self.checker.path(self.cab, key, self.path, base, what)


def _check_cables(c: _Checker, data: dict, devices: dict[str, dict], rdir: Path,
                  cwd: Path) -> list[CableSpec]:
    out: list[CableSpec] = []
    if "cables" not in data or data["cables"] is None:
        return out
    cables = data["cables"]
    if not isinstance(cables, list):
        c.err("cables", f"must be a list of cables (lines starting with '- kind: ...'), got "
                        f"{_describe(cables)}", data, "cables")
        return out
    if len(cables) > MAX_CABLES:
        c.err("cables", f"{len(cables)} cables; a topology may have at most {MAX_CABLES}", data, "cables")
        return out
    plugged: dict[str, int] = {}  # device -> index of the cable it is plugged into
    seen: dict[str, dict] = {}  # kind -> what its checks remember across cables (names in use)
    for i, cab in enumerate(cables):
        path = f"cables[{i}]"
        cab = c.mapping(cab, path)
        if cab is None:
            continue
        c.cable_lines[i] = getattr(cab, "line", None)
        kind = cab.get("kind")
        if "kind" not in cab:
            c.err(f"{path}.kind", f"missing: one of {', '.join(CABLE_KINDS)}", c.cable_lines[i])
            continue
        if kind not in CABLE_KINDS:
            c.err(f"{path}.kind", f"unknown cable kind {_describe(kind)}{_suggest(kind, CABLE_KINDS)} "
                                  f"(valid: {', '.join(CABLE_KINDS)})", cab, "kind")
            continue
        mod = kind_module(kind)
        c.keys(cab, path, CABLE_COMMON_KEYS + tuple(mod.KEYS), f"a {kind} cable")
        # ends
        lo, hi = mod.ENDS
        count = f"{lo}" if lo == hi else f"{lo} or {hi}"
        ends_v = cab.get("ends")
        if isinstance(ends_v, str):
            ends_v = [ends_v]
        if not isinstance(ends_v, list) or not all(isinstance(e, str) for e in ends_v):
            c.err(f"{path}.ends", f"must be a list of {count} device name{'s' if hi > 1 else ''}, got "
                                  f"{_describe(ends_v) if 'ends' in cab else 'nothing'}", cab, "ends")
            continue
        if not lo <= len(ends_v) <= hi:
            c.err(f"{path}.ends", f"a {kind} cable joins {count} device{'s' if hi > 1 else ''}, got "
                                  f"{len(ends_v)}", cab, "ends")
            continue
        ok = True
        for j, e in enumerate(ends_v):
            if e not in devices:
                c.err(f"{path}.ends[{j}]", f"unknown device {_describe(e)}{_suggest(e, devices)}"
                                           f" (devices: {_names(devices)})", cab, "ends")
                ok = False
            elif e in ends_v[:j]:
                c.err(f"{path}.ends[{j}]", f"device {e!r} is on both ends of the cable", cab, "ends")
                ok = False
            elif e in plugged:
                c.err(f"{path}.ends[{j}]", f"device {e!r} is already plugged into cables[{plugged[e]}]; "
                                           "a device has one port", cab, "ends")
                ok = False
            else:
                plugged[e] = i
        ends = tuple(ends_v)
        # capture: device -> pcap path
        capture: dict[str, Path] = {}
        if "capture" in cab:
            cap = c.mapping(cab["capture"], f"{path}.capture", cab, "capture")
            for dev in (cap or {}):
                cp = f"{path}.capture.{_key_text(dev)}"
                if dev not in ends:
                    c.err(cp, f"a capture is named by the device whose port it records, one of "
                              f"{_names(ends)}{_suggest(dev, ends)}", cap, dev)
                else:
                    pcap = c.path(cap, dev, f"{path}.capture", cwd, "a pcap file path")
                    if pcap is not None:
                        capture[dev] = pcap
        # faults: sender -> spec
        faults: dict[str, FaultSpec] = {}
        if "faults" in cab:
            senders = list(ends) + (["peer"] if len(ends) == 1 else [])
            faults = _check_faults(c, cab["faults"], f"{path}.faults", senders, i, cab)
        # the kind's own options: its module checks them (nicemu.cable.KINDS)
        cc = CableCheck(c, cab, path, i, ends, ok, rdir, seen.setdefault(kind, {}))
        options = mod.check(cc)
        if ok:
            out.append(CableSpec(index=i, kind=kind, ends=ends, capture=capture, faults=faults, options=options))
    return out


def _assign_processes(c: _Checker, devices: dict[str, dict], cables: list[CableSpec]
                      ) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """Group devices into processes: pair cables and equal `process:` names join groups.

    A `pair` cable is an in-process call from one device model into the other, so its two
    devices must share a process; every other device gets a process of its own unless the
    config groups them. Returns (process -> devices, device -> process).
    """
    order = list(devices)
    parent = {d: d for d in order}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            if order.index(ra) > order.index(rb):
                ra, rb = rb, ra
            parent[rb] = ra

    by_name: dict[str, str] = {}
    for d, spec in devices.items():
        name = spec["_process"]
        if name is not None:
            if name in by_name:
                union(by_name[name], d)
            else:
                by_name[name] = d
    for cab in cables:
        if not kind_module(cab.kind).SAME_PROCESS or not all(e in devices for e in cab.ends):
            continue
        a, b = cab.ends
        pa, pb = devices[a]["_process"], devices[b]["_process"]
        if pa is not None and pb is not None and pa != pb:
            c.err(f"cables[{cab.index}]", f"a {cab.kind} cable joins two devices inside one process, but "
                                          f"{a} is in process {pa!r} and {b} in {pb!r}; use a shm or unix "
                                          "cable between processes, or put both in one process",
                  c.cable_lines.get(cab.index))
            continue
        union(a, b)

    groups: dict[str, list[str]] = {}
    for d in order:
        groups.setdefault(find(d), []).append(d)
    explicit_names = {spec["_process"] for spec in devices.values() if spec["_process"]}
    processes: dict[str, tuple[str, ...]] = {}
    of: dict[str, str] = {}
    for root, members in groups.items():
        names = list(dict.fromkeys(devices[m]["_process"] for m in members if devices[m]["_process"]))
        if len(names) > 1:
            continue  # already reported as a pair between forced processes
        if names:
            pname = names[0]
        else:  # an automatic name: the first device's, made unique against the explicit ones
            pname, n = root, 2
            while pname in explicit_names or pname in processes:
                pname, n = f"{root}.{n}", n + 1
        processes[pname] = tuple(members)
        for m in members:
            of[m] = pname
    for d in devices:
        devices[d].pop("_line", None)
        devices[d].pop("_process", None)
        of.setdefault(d, "")
    return processes, of


def _check_unique_paths(c: _Checker, devices: dict[str, dict], cables: list[CableSpec]) -> dict[Path, str]:
    """Two things may not create the same file, and socket paths must fit in sun_path.
    Returns the files claimed (path -> key), for the hosts' sockets and captures."""
    seen: dict[Path, str] = {}

    def claim(p: Path, who: str) -> None:
        if p in seen:
            c.err(who, f"{_path_text(p)} is also used by {seen[p]}")
        else:
            seen[p] = who

    for name, d in devices.items():
        if "socket" not in d:
            continue
        claim(d["socket"], f"devices.{name}.socket")
        why = socket_path_problem(d["socket"])
        if why:
            c.err(f"devices.{name}.socket", f"{why}; use a shorter runtime_dir")
    for cab in cables:
        for dev, p in cab.unix_paths.items():
            claim(p, f"cables[{cab.index}] (unix socket of {dev})")
            why = socket_path_problem(p)
            if why:
                c.err(f"cables[{cab.index}]", f"the socket path {why}")
        why = socket_path_problem(cab.unix_peer) if cab.unix_peer is not None else None
        if why:
            c.err(f"cables[{cab.index}].peer", why)
        for dev, p in cab.capture.items():
            claim(p, f"cables[{cab.index}].capture.{dev}")
    return seen


def check_topology(path: str | os.PathLike, *, runtime_dir: str | os.PathLike | None = None) -> Topology:
    """What `nicemu up --check` does, and `nicemu up` before it starts anything: load the file
    (load: the file, its YAML and every key) and check the host (check_host). Raises
    TopologyError listing every problem; creates and starts nothing."""
    topo = load(path, runtime_dir=runtime_dir)
    problems = check_host(topo)
    if problems:
        raise TopologyError(problems, str(path))
    return topo
