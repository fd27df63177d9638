"""YAML topologies: which devices exist, which cables join their ports, and which process runs what.

A topology file is checked completely before anything starts: every problem is collected with
the key path it belongs to (``cables[1].faults.nic0.drop``) and the reason, and all of them are
raised together as one `TopologyError`, so a user fixes a config in one pass instead of one
traceback at a time. The schema (every key, default and meaning) is in docs/topology.md.

`load()` turns a file into plain frozen dataclasses (`Topology`, `DeviceSpec`, `CableSpec`,
`FaultSpec`) with every default filled in and every path made absolute, so the supervisor
(`nicemu up`) and each emulator process (`nicemu serve --config FILE --process NAME`) derive the
same plan from the same file. `build_emulator()` wires one process's share of that plan into an
`Emulator`.

A topology file is input like any other, so it is bounded before it is believed: only a
regular file of at most MAX_FILE_BYTES is read (`read_config`), YAML nesting and alias
expansion are bounded while the document is composed (`_Loader`), device, cable and process
counts are capped, and every message quotes a value or key shortened, on one line.
`check_topology` is what `nicemu up --check` runs and what `nicemu up` runs before it creates or
starts anything (the file, every key, then the host: `check_host`); directories for sockets
must be private (nicemu.private_dir).
"""
from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import os
import re
import stat
import zlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import yaml

from nicemu.cable.base import unplugged
from nicemu.faults import PROBABILITY_KEYS, FaultConfig
from nicemu.private_dir import MissingParentError, PrivateDirError, ensure_private_dir, private_dir_problem
from wire.mac import format_mac, parse_mac as wire_parse_mac

if TYPE_CHECKING:  # imported lazily at run time: validation must work without the device built
    from nicemu.emulator import Emulator
    from nicemu.topology_hosts import AppSpec, HostSpec

__all__ = [
    "CABLE_KINDS",
    "CableSpec",
    "DeviceSpec",
    "FaultSpec",
    "Problem",
    "Topology",
    "TopologyError",
    "CreatedDirs",
    "MissingParentError",
    "PrivateDirError",
    "build_emulator",
    "check_host",
    "check_topology",
    "read_config",
    "default_runtime_dir",
    "ensure_private_dir",
    "os_error_text",
    "prepare_dirs",
    "runtime_base",
    "socket_path_problem",
    "load",
    "parse",
]

CABLE_KINDS = ("pair", "shm", "unix", "udp", "tap")

# Limits (docs/topology.md, "Limits"): a topology file is input like any other, and a start
# must not be able to take the machine down.
MAX_FILE_BYTES = 256 << 10  # a topology file; only regular files are read
MAX_DEPTH = 16  # nesting of mappings and lists, what aliases bring in counted
MAX_VALUES = 20_000  # YAML values after expanding aliases (a "billion laughs" stops here)
MAX_NUMBER_DIGITS = 30  # an integer with more digits is no setting of ours
MAX_DEVICES = 64
MAX_CABLES = 64
MAX_PROCESSES = 16  # emulator processes `nicemu up` starts (each is ~15 MB of Python)
MAX_SHM_TOTAL_BYTES = 2 << 30  # shm ring memory of all cables, both directions
MAX_PROBLEMS_SHOWN = 50  # TopologyError.render() lists this many, then counts the rest
PATH_MAX = 4095  # bytes of a file path (Linux's PATH_MAX less the NUL)
NAME_MAX = 255  # bytes of one file name

# The 82540EM has 64 KB of on-chip packet buffer shared between RX and TX (PBA.RXA/TXA in KB).
PBA_TOTAL_KB = 64
PBA_DEFAULT_RX_KB = 48
PBA_DEFAULT_TX_KB = 16
PBA_MIN_KB = 2  # each side must hold one full-size (1522-byte) frame

SHM_DEFAULT_RING_BYTES = 1 << 20
SHM_MIN_RING_BYTES = 1 << 16
SHM_MAX_RING_BYTES = 1 << 30

SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the terminating NUL
IFNAMSIZ_MAX = 15  # Linux interface names: 16 bytes including the NUL

# Where `nicemu up` tells each child which inherited fds make up its shm cable ends:
# JSON {"cable<i>.<device>": "<ShmCableEnd.to_arg()>"}.
ENV_CABLE_ENDS = "NICEMU_CABLE_ENDS"
# Where `nicemu up --runtime-dir` tells each child the runtime directory it chose.
ENV_RUNTIME_DIR = "NICEMU_RUNTIME_DIR"
# The write end of a pipe `nicemu up` gives each child: the child writes one line to it once
# every device and cable of its share is set up ("nicemu: ready"), then closes it.
ENV_READY_FD = "NICEMU_READY_FD"

RESERVED_NAMES = frozenset({"peer"})  # `peer` names the outside end in per-cable maps
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_MAC_RE = re.compile(r"^[0-9A-Fa-f]{2}([:-])[0-9A-Fa-f]{2}(\1[0-9A-Fa-f]{2}){4}$")
_SIZE_RE = re.compile(r"^\s*(\d{1,18})\s*([KMG]i?B?|B)?\s*$", re.IGNORECASE)

# Network safety: emulated traffic may only use loopback or the benchmarking range (RFC 2544).
ALLOWED_NETWORKS = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("198.18.0.0/15"),
    ipaddress.ip_network("::1/128"),
)

TOP_KEYS = ("name", "runtime_dir", "devices", "cables", "hosts", "applications")
DEVICE_KEYS = ("mac", "socket", "pba", "engine", "process", "driver")
# Ring and buffer sizes are programmed by the driver (RDLEN/TDLEN, RCTL.BSIZE), not fixed in the
# device: a topology records the ones a driver attached to the device should use
# (driver.e1000.E1000Config fields), checked against what the 82540EM and the driver allow.
DRIVER_KEYS = ("rx_ring_size", "tx_ring_size", "rx_buffer_len", "tx_buffer_len")
RX_BUFFER_SIZES = (256, 512, 1024, 2048, 4096, 8192, 16384)  # RCTL.BSIZE/BSEX encodings
PBA_KEYS = ("rx_kb", "tx_kb")
ENGINES = ("auto", "cython", "python")
FAULT_KEYS = tuple(f.name for f in fields(FaultConfig))
CABLE_COMMON_KEYS = ("kind", "ends", "capture", "faults")
CABLE_KIND_KEYS: dict[str, tuple[str, ...]] = {
    "pair": (),
    "shm": ("ring_bytes",),
    "unix": ("path", "peer"),
    "udp": ("local", "remote"),
    "tap": ("name", "netns"),
}
CABLE_ENDS: dict[str, tuple[int, int]] = {  # kind -> (min, max) number of devices
    "pair": (2, 2),
    "shm": (2, 2),
    "unix": (1, 2),
    "udp": (1, 1),
    "tap": (1, 1),
}


# --- results ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: where (key path, YAML line) and why."""

    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = self.path or "(top level)"
        if self.line is not None:
            where += f" (line {self.line})"
        return _one_line(f"{where}: {self.message}")


class TopologyError(ValueError):
    """A config that cannot be run; `problems` lists every reason, not only the first."""

    def __init__(self, problems: Iterable[Problem], source: str = "<config>") -> None:
        self.problems = list(problems)
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        n = len(self.problems)
        head = f"{_one_line(self.source)}: {n} problem{'s' if n != 1 else ''}"
        lines = [f"  {p}" for p in self.problems[:MAX_PROBLEMS_SHOWN]]
        if n > MAX_PROBLEMS_SHOWN:
            lines.append(f"  (and {n - MAX_PROBLEMS_SHOWN} more)")
        return head + ":\n" + "\n".join(lines)


def _one_line(text: str) -> str:
    """A message line: control characters (a newline in a key, say) shown escaped."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


@dataclass(frozen=True)
class FaultSpec(FaultConfig):
    """Faults on the frames travelling one way along a cable: a nicemu.faults.FaultConfig whose
    seed is always a number (load() fixes one per cable and direction), so runs repeat."""

    seed: int = 0

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for nicemu.faults.FaultConfig."""
        return {k: getattr(self, k) for k in FAULT_KEYS}


@dataclass(frozen=True)
class DeviceSpec:
    """One emulated 82540EM: its identity, its vfio-user socket and its process group."""

    name: str
    mac: str
    socket: Path
    pba_rx_kb: int = PBA_DEFAULT_RX_KB
    pba_tx_kb: int = PBA_DEFAULT_TX_KB
    engine: str = "auto"
    process: str = ""  # the process group it runs in (always filled in by load())
    driver: Mapping[str, int] = field(default_factory=dict)  # E1000Config settings for its driver

    @property
    def pba(self) -> int:
        """The PBA register value: RX KB in bits 15:0, TX KB in bits 31:16."""
        return (self.pba_tx_kb << 16) | self.pba_rx_kb


@dataclass(frozen=True)
class CableSpec:
    """One cable: its kind, the devices plugged into it, and kind-specific options.

    `faults` is keyed by the sender: a device name (frames that device transmits) or "peer"
    (frames arriving from outside the topology on a one-device cable). `capture` is keyed by
    device name.
    """

    index: int
    kind: str
    ends: tuple[str, ...]
    capture: Mapping[str, Path] = field(default_factory=dict)
    faults: Mapping[str, FaultSpec] = field(default_factory=dict)
    ring_bytes: int | None = None  # shm
    unix_paths: Mapping[str, Path] = field(default_factory=dict)  # unix: device -> bound path
    unix_peer: Path | None = None  # unix with one device: the outside peer's path
    local: tuple[str, int] | None = None  # udp
    remote: tuple[str, int] | None = None  # udp
    tap_name: str | None = None  # tap
    netns: str | None = None  # tap

    def faults_into(self, device: str) -> FaultSpec | None:
        """Faults on the frames this cable delivers to `device`."""
        senders = [e for e in self.ends if e != device] or ["peer"]
        return self.faults.get(senders[0])


@dataclass(frozen=True)
class Topology:
    """A validated topology: every default filled in, every path absolute."""

    name: str
    source: Path | None
    runtime_dir: Path
    devices: Mapping[str, DeviceSpec]
    cables: tuple[CableSpec, ...]
    processes: Mapping[str, tuple[str, ...]]  # process group -> device names, in file order
    # kstack kernels and their applications (nicemu.topology_hosts), started after the emulators
    hosts: Mapping[str, "HostSpec"] = field(default_factory=dict)
    applications: tuple["AppSpec", ...] = ()

    def cable_of(self, device: str) -> CableSpec | None:
        for c in self.cables:
            if device in c.ends:
                return c
        return None

    def process_of(self, device: str) -> str:
        return self.devices[device].process

    def cable_processes(self, cable: CableSpec) -> tuple[str, ...]:
        """The distinct process groups a cable's devices run in, in end order."""
        return tuple(dict.fromkeys(self.devices[e].process for e in cable.ends))

    def shared_cables(self) -> list[CableSpec]:
        """shm cables whose ends run in different processes: the parent creates their memory."""
        return [c for c in self.cables if c.kind == "shm" and len(self.cable_processes(c)) > 1]

    def socket_paths(self) -> list[Path]:
        """Every filesystem socket this topology creates (device sockets, unix cable ends)."""
        paths = [d.socket for d in self.devices.values()]
        for c in self.cables:
            paths.extend(c.unix_paths.values())
        paths.extend(h.syscall_socket for h in self.hosts.values())
        return paths


# --- YAML loading -----------------------------------------------------------------------


class _MarkedDict(dict):
    """A mapping that remembers its YAML line and the line of each key, for error messages."""

    key_lines: dict[Any, int]
    line: int | None = None


class HugeNumber:
    """An integer of more than MAX_NUMBER_DIGITS digits in a topology file: no setting takes
    one, so it is kept as its length. No check turns it into a giant int, no message quotes it
    whole (int() of a 5,000-digit string would even raise)."""

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"<a number of {self.digits} digits>"


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 numbers, duplicate-key detection and bounded input.

    YAML 1.1 reads an unquoted `52:54:00:12:34:56` as a base-60 integer; a MAC written the way
    everybody writes it must stay a string, so the sexagesimal forms are not resolved.

    Bounds, checked while the document is composed (before any value is built): nesting depth
    (MAX_DEPTH; PyYAML's composer recurses, so 10,000 levels would be a RecursionError) and
    the number of values with aliases expanded (MAX_VALUES): a "billion laughs" alias bomb is
    refused when its size passes the limit, never expanded. An alias to the value containing
    it is refused too.
    """

    duplicate_keys: list[tuple[str, int]]

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicate_keys = []
        self._depth = 0
        self._sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (values, height) once composed

    def fetch_flow_collection_start(self, token_class: type) -> None:
        """Flow nesting ([[[[...) is bounded in the scanner already: its look-ahead for simple
        keys would otherwise scan a thousand openers before the composer saw the first."""
        if self.flow_level >= MAX_DEPTH:
            raise yaml.scanner.ScannerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                            self.get_mark())
        super().fetch_flow_collection_start(token_class)

    def compose_node(self, parent: Any, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = self.anchors.get(event.anchor)
            if node is not None and id(node) not in self._sizes:
                raise yaml.composer.ComposerError(
                    None, None, f"the alias *{_excerpt(event.anchor)} refers to the value that "
                                "contains it", event.start_mark)
            return super().compose_node(parent, index)  # an undefined alias is its error
        if self._depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                              self.peek_event().start_mark)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._measure(node)
        return node

    def _measure(self, node: yaml.Node) -> None:
        """Values and height of a composed node, aliases counted as what they stand for."""
        if isinstance(node, yaml.ScalarNode):
            size, height = 1, 1
        else:
            kids = node.value if isinstance(node, yaml.SequenceNode) else [n for kv in node.value for n in kv]
            known = [self._sizes[id(k)] for k in kids]
            size = 1 + sum(k[0] for k in known)
            height = 1 + max((k[1] for k in known), default=0)
        if size > MAX_VALUES:
            raise yaml.composer.ComposerError(None, None, f"more than {MAX_VALUES} values once its "
                                                          "aliases are expanded", node.start_mark)
        if height > MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels "
                                                          "once its aliases are expanded", node.start_mark)
        self._sizes[id(node)] = (size, height)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """A value PyYAML cannot build (a 13th month, `!!int ""`) is a YAML error at its line."""
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, IndexError, KeyError, OverflowError) as e:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this value: {_excerpt(str(e), 80)}", node.start_mark) from None


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0o?[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
        r"|\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> int | HugeNumber:
    """An integer as YAML 1.2 writes it; a very long one is a HugeNumber, not a giant int."""
    text = loader.construct_scalar(node).replace("_", "")
    digits = len(text.lstrip("+-"))
    if digits > MAX_NUMBER_DIGITS:
        return HugeNumber(digits)
    sign = -1 if text.startswith("-") else 1
    body = text.lstrip("+-").lower()
    for prefix, base in (("0b", 2), ("0x", 16), ("0o", 8)):
        if body.startswith(prefix):
            return sign * int(body[2:], base)  # "0x" alone: ValueError, a YAML error at its line
    return sign * int(body, 8 if len(body) > 1 and body.startswith("0") else 10)


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _MarkedDict:
    loader.flatten_mapping(node)
    result = _MarkedDict()
    result.key_lines = {}
    result.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value", key_node.start_mark
            ) from None
        line = key_node.start_mark.line + 1
        if key in result:
            loader.duplicate_keys.append((_describe(key), line))
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = line
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_load(text: str, source: str) -> Any:
    loader: _Loader | None = None
    try:
        loader = _Loader(text)  # (the reader already refuses control characters here)
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        reason = getattr(exc, "problem", None) or str(exc)
        if getattr(exc, "context", None):
            reason = f"{exc.context}: {reason}"
        raise TopologyError([Problem("", f"not valid YAML: {_excerpt(reason, 160)}", line)], source) from None
    except RecursionError:  # a bound above failed to hold; still no traceback
        raise TopologyError([Problem("", f"nested deeper than {MAX_DEPTH} levels")], source) from None
    finally:
        if loader is not None:
            loader.dispose()
    if loader.duplicate_keys:
        raise TopologyError(
            [Problem("", f"key {k} appears more than once", line) for k, line in loader.duplicate_keys],
            source,
        )
    return data


def read_config(path: str | os.PathLike) -> str:
    """The text of a topology file: a regular file of at most MAX_FILE_BYTES, UTF-8.

    Opened without blocking (a FIFO would otherwise wait for a writer forever) and checked with
    fstat before a byte is read (/dev/zero would be read until memory runs out); a device or a
    FIFO is refused, and at most MAX_FILE_BYTES + 1 bytes are ever read."""
    def refuse(why: str) -> TopologyError:
        return TopologyError([Problem("", why)], str(path))

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise refuse(f"cannot read the file: {exc.strerror}") from None
    except ValueError:  # a NUL in the name
        raise refuse("cannot read the file: the name contains a NUL byte") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise refuse(f"not a regular file ({_file_kind(st.st_mode)}); a topology is read from a file")
        if st.st_size > MAX_FILE_BYTES:
            raise refuse(f"the file has {st.st_size} bytes; a topology file may have at most {MAX_FILE_BYTES}")
        chunks: list[bytes] = []
        got = 0
        while got <= MAX_FILE_BYTES:  # the size may have changed since fstat: read at most limit + 1
            chunk = os.read(fd, MAX_FILE_BYTES + 1 - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if got > MAX_FILE_BYTES:
            raise refuse(f"the file has more than {MAX_FILE_BYTES} bytes, the limit of a topology file")
    except OSError as exc:
        raise refuse(f"cannot read the file: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise refuse(f"the file is not UTF-8 text (byte {exc.start})") from None


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


# --- validation -------------------------------------------------------------------------


def _suggest(word: Any, choices: Iterable[str]) -> str:
    """"; did you mean 'x'?" for a word close to one of `choices` (only a short text can be)."""
    if not isinstance(word, str) or len(word) > 2 * EXCERPT_CHARS:
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


EXCERPT_CHARS = 40  # how much of a long value an error message quotes


def _describe(v: Any) -> str:
    """A value for an error message; a long one (say, a whole file that is not YAML mapping)
    is shortened to an excerpt of its first line, so the message stays one readable line."""
    if isinstance(v, bool):
        return f"the boolean {v!r}"
    if isinstance(v, (dict, list)):
        return f"a {'mapping' if isinstance(v, dict) else 'list'}"
    if v is None:
        return "empty"
    if isinstance(v, HugeNumber):
        return f"a number of {v.digits} digits"
    if isinstance(v, (set, frozenset)):
        return "a set"
    text = repr(v)
    if len(text) <= EXCERPT_CHARS + 2:
        return text
    if isinstance(v, str):
        return f"a text of {len(v)} characters starting {v.split(chr(10), 1)[0][:EXCERPT_CHARS]!r}..."
    return text[:EXCERPT_CHARS] + "..."


def _excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """Text (a reason from PyYAML, an anchor name) as one line of at most about `limit` chars."""
    text = _one_line(" ".join(str(text).split()))
    return text if len(text) <= limit else text[:limit] + "..."


def _key_text(key: Any) -> str:
    """A mapping key as one component of a key path: itself if short and plain, else quoted
    and shortened (a key can be any scalar: a 400-digit number, a text with newlines)."""
    if isinstance(key, str) and 0 < len(key) <= EXCERPT_CHARS and key.isprintable() and key.strip() == key:
        return key
    if isinstance(key, str) or isinstance(key, HugeNumber):
        return _describe(key)
    return _excerpt(str(key))


def _path_text(p: Any) -> str:
    """A path for a message: a long one shortened to its start and end."""
    text = _one_line(os.fspath(p)) if isinstance(p, (str, os.PathLike)) else _excerpt(str(p))
    return text if len(text) <= 200 else f"{text[:100]}...{text[-60:]}"


def parse_size(v: Any) -> int | None:
    """A byte count: an integer, or a string such as "64K", "1M", "1MiB" (powers of 1024)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        m = _SIZE_RE.match(v)
        if m:
            unit = (m.group(2) or "B")[0].upper()
            return int(m.group(1)) * {"B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit]
    return None


def parse_rate(v: Any) -> int | None:
    """Bits per second: an integer, or a string with a decimal unit ("100M", "1G", "10k")."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e18:
        return int(v)
    if isinstance(v, str):
        m = re.match(r"^\s*(\d{1,15}(?:\.\d{1,15})?)\s*([kKmMgG]?)(?:bps|bit/s)?\s*$", v)
        if m:
            return int(float(m.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()])
    return None


def parse_mac(v: Any) -> tuple[str | None, str | None]:
    """(normalized "aa:bb:cc:dd:ee:ff", None) or (None, why it is not a usable port MAC)."""
    if not isinstance(v, str):
        if isinstance(v, int) and not isinstance(v, bool):
            return None, "must be a string like \"52:54:00:12:34:56\" (quote it in YAML)"
        return None, f"must be a string like \"52:54:00:12:34:56\", got {_describe(v)}"
    if not _MAC_RE.match(v):
        return None, f"{_describe(v)} is not a MAC address (six hex bytes separated by ':', e.g. 52:54:00:12:34:56)"
    octets = wire_parse_mac(v)
    if octets[0] & 1:
        return None, (
            f"{v!r} is a multicast address (bit 0 of the first byte is set); "
            "a port's own address must be unicast"
        )
    if octets == bytes(6):
        return None, f"{v!r} is the all-zero address, which no port may use"
    return format_mac(octets), None


def socket_path_problem(path: str | os.PathLike) -> str | None:
    """Why `path` (absolute) cannot be a unix socket, or None: sun_path holds 107 bytes."""
    if len(os.fsencode(os.fspath(path))) > SUN_PATH_MAX:
        return f"{_path_text(path)} is longer than {SUN_PATH_MAX} bytes, the limit of a unix socket path"
    return None


def parse_host_port(v: Any) -> tuple[tuple[str, int] | None, str | None]:
    """("host", port) for an allowed address, or why not. Only loopback and 198.18.0.0/15."""
    if not isinstance(v, str):
        return None, f"must be a string \"HOST:PORT\", got {_describe(v)}"
    m = re.match(r"^\[([0-9A-Fa-f:]{1,39})\]:(\d{1,10})$", v) or re.match(r"^([^:\[\]]{1,64}):(\d{1,10})$", v)
    if not m:
        return None, f"{_describe(v)} is not HOST:PORT (e.g. 127.0.0.1:5555, [::1]:5555)"
    host, port = m.group(1), int(m.group(2))
    if host == "localhost":
        host = "127.0.0.1"
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return None, f"{_describe(host)} is not an IP address (host names are not resolved; use 127.0.0.1)"
    if not any(addr in net for net in ALLOWED_NETWORKS):
        return None, (
            f"{host} is outside the allowed networks (loopback 127.0.0.0/8, ::1, and 198.18.0.0/15): "
            "emulated traffic must not reach real networks"
        )
    if not 1 <= port <= 65535:
        return None, f"port {port} is outside 1..65535"
    return (str(addr), port), None


def runtime_base() -> Path:
    """The per-user directory the default runtime directories live in: /tmp/nicemu-$UID."""
    return Path(f"/tmp/nicemu-{os.getuid()}")


def default_runtime_dir(name: str) -> Path:
    """Where sockets go unless the config says otherwise: private to this user and topology."""
    return runtime_base() / name


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
    tap_names: dict[str, int] = {}
    udp_locals: dict[tuple[str, int], int] = {}
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
        c.keys(cab, path, CABLE_COMMON_KEYS + CABLE_KIND_KEYS[kind], f"a {kind} cable")
        # ends
        lo, hi = CABLE_ENDS[kind]
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
        spec: dict[str, Any] = {}
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
        # kind options
        if kind == "shm":
            rb = parse_size(cab.get("ring_bytes", SHM_DEFAULT_RING_BYTES))
            if rb is None:
                c.err(f"{path}.ring_bytes", f"must be a size in bytes (e.g. 1048576 or \"1M\"), got "
                                            f"{_describe(cab.get('ring_bytes'))}", cab, "ring_bytes")
            elif not SHM_MIN_RING_BYTES <= rb <= SHM_MAX_RING_BYTES or rb & (rb - 1):
                c.err(f"{path}.ring_bytes", f"must be a power of two between {SHM_MIN_RING_BYTES} and "
                                            f"{SHM_MAX_RING_BYTES}, got {_describe(rb)}", cab, "ring_bytes")
            else:
                spec["ring_bytes"] = rb
        elif kind == "unix":
            unix_paths: dict[str, Path] = {}
            own = c.path(cab, "path", path, rdir, "a socket path") if len(ends) == 1 else None
            if len(ends) == 2:
                if "path" in cab or "peer" in cab:
                    key = "path" if "path" in cab else "peer"
                    c.err(f"{path}.{key}", "a unix cable between two devices of this topology chooses "
                                           "its own socket paths; `path`/`peer` are for a one-device "
                                           "cable to an outside peer", cab, key)
                for e in ends:
                    unix_paths[e] = rdir / f"cable{i}-{e}.sock"
            else:
                unix_paths[ends[0]] = own or rdir / f"cable{i}-{ends[0]}.sock"
                if "peer" not in cab:
                    c.err(f"{path}.peer", "a unix cable with one device needs `peer`: the socket path "
                                          "of the outside end", cab)
                else:
                    peer = c.path(cab, "peer", path, rdir, "a socket path")
                    if peer is not None:
                        spec["unix_peer"] = peer
            spec["unix_paths"] = unix_paths
        elif kind == "udp":
            for key in ("local", "remote"):
                if key not in cab:
                    c.err(f"{path}.{key}", f"missing: the {key} address as HOST:PORT "
                                           "(127.0.0.1 or 198.18.0.0/15)", cab)
                    continue
                hp, why = parse_host_port(cab[key])
                if why:
                    c.err(f"{path}.{key}", why, cab, key)
                else:
                    spec[key] = hp
            if "local" in spec:
                if spec["local"] in udp_locals:
                    c.err(f"{path}.local", f"{spec['local'][0]}:{spec['local'][1]} is also the local "
                                           f"address of cables[{udp_locals[spec['local']]}]", cab, "local")
                udp_locals[spec["local"]] = i
            if spec.get("local") and spec.get("local") == spec.get("remote"):
                c.err(f"{path}.remote", "is the same as `local`: the cable would talk to itself",
                      cab, "remote")
        elif kind == "tap":
            default_name = f"nm-{ends[0]}"
            tn = cab.get("name", default_name)
            if not isinstance(tn, str) or not _IFNAME_RE.match(tn) or tn in (".", ".."):
                c.err(f"{path}.name", f"must be an interface name of letters, digits, '_', '.', '-', "
                                      f"got {_describe(tn)}", cab, "name")
            elif len(tn) > IFNAMSIZ_MAX:
                if "name" in cab:
                    c.err(f"{path}.name", f"{_describe(tn)} is longer than {IFNAMSIZ_MAX} characters "
                                          "(Linux's limit for interface names)", cab, "name")
                elif ok:  # (an unknown device's name was reported already)
                    c.err(f"{path}.name", f"the default name {_describe(tn)} is longer than {IFNAMSIZ_MAX} "
                                          "characters; set `name`", cab, None)
            else:
                if tn in tap_names:
                    c.err(f"{path}.name", f"TAP {tn!r} is also used by cables[{tap_names[tn]}]",
                          cab, "name")
                tap_names[tn] = i
                spec["tap_name"] = tn
            if "netns" in cab:
                ns = cab["netns"]
                if not isinstance(ns, str) or not _IFNAME_RE.match(ns) or ns in (".", ".."):
                    c.err(f"{path}.netns", f"must be the name of a network namespace (ip netns), "
                                           f"got {_describe(ns)}", cab, "netns")
                else:
                    spec["netns"] = ns
        if ok:
            out.append(CableSpec(index=i, kind=kind, ends=ends, capture=capture, faults=faults, **spec))
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
        if cab.kind != "pair" or not all(e in devices for e in cab.ends):
            continue
        a, b = cab.ends
        pa, pb = devices[a]["_process"], devices[b]["_process"]
        if pa is not None and pb is not None and pa != pb:
            c.err(f"cables[{cab.index}]", f"a pair cable joins two devices inside one process, but "
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


# --- run-time helpers -----------------------------------------------------------------


def os_error_text(e: OSError) -> str:
    """An OSError for the user: its message (and file names), without Python's "[Errno N]"."""
    if not e.strerror:
        return str(e.args[0]) if len(e.args) == 1 else str(e)
    names = [os.fspath(n) for n in (e.filename, e.filename2) if n is not None]
    return f"{' -> '.join(map(str, names))}: {e.strerror}" if names else e.strerror


class CreatedDirs:
    """The directories one run (`nicemu serve`, a `serve --config` process, `nicemu up`)
    created for its sockets; close() removes them again, deepest first, each only if empty.

    The rule, the same for all three commands: a socket's directory is created (0700) if its
    parent exists; a missing parent is an error that names it (MissingParentError), so nothing
    is created then. An existing directory must be private (ours, no group/other access: see
    nicemu.private_dir) and is never chmodded. The one exception is the default runtime directory
    /tmp/nicemu-$UID/<name>: the per-user /tmp/nicemu-$UID is created too when missing, and
    removed at the end if empty (no other run uses it)."""

    def __init__(self) -> None:
        self.paths: list[Path] = []
        self._base: Path | None = None  # the per-user base, to remove if empty at the end

    def runtime_dir(self, path: Path) -> Path:
        """Create (or check) a topology's runtime directory; see the class docstring."""
        default = Path(path).parent == runtime_base()
        before = len(self.paths)
        ensure_private_dir(path, parents=default, created=self.paths)
        if default and len(self.paths) > before:
            self._base = runtime_base()
        return Path(path)

    def socket_dir(self, directory: Path) -> None:
        """A socket's own directory: created 0700 if missing (its parent must exist); an
        existing one must be private (nicemu.private_dir), or PrivateDirError."""
        ensure_private_dir(directory, parents=False, created=self.paths)

    def close(self) -> None:
        for p in [*reversed(self.paths), *([self._base] if self._base is not None else [])]:
            try:
                os.rmdir(p)
            except OSError:
                pass  # not empty (another run, or files a user put there) or already gone
        self.paths, self._base = [], None


def check_host(topo: Topology, devices: Iterable[str] | None = None) -> list[Problem]:
    """Everything on this host a start of `devices` (default: all) would refuse, checked
    without creating anything, so `nicemu up --check`, `nicemu up` (before any process
    starts) and `serve --config` refuse the same configs and a refused start leaves nothing
    behind: the runtime and socket directories (a missing parent, a file in the way, an
    existing directory that is not private), socket paths taken by something that is not a
    socket, capture files whose directory is missing, a `cython` engine that is not built and
    a TAP's network namespace that does not exist."""
    names = list(topo.devices) if devices is None else list(devices)
    rdir = topo.runtime_dir
    problems: list[Problem] = []
    seen = {rdir}
    if _needs_runtime_dir(topo):
        why = private_dir_problem(rdir, parents=rdir.parent == runtime_base())
        if why:
            problems.append(Problem("runtime_dir", why))
    for key, path in _socket_files(topo, names):
        d = path.parent
        if d not in seen and not (d.parent == rdir and not os.path.lexists(rdir)):
            seen.add(d)  # (one below a runtime directory still to be made: made inside it)
            why = private_dir_problem(d)
            if why:
                problems.append(Problem(key, why))
        if _taken(path):
            problems.append(Problem(key, f"{_path_text(path)} exists and is not a socket; refusing to replace it"))
    for c in topo.cables:
        for dev, p in c.capture.items():
            if dev in names:
                why = _capture_problem(p)
                if why:
                    problems.append(Problem(f"cables[{c.index}].capture.{dev}", why))
        if c.netns is not None and c.ends[0] in names and not _netns_exists(c.netns):
            problems.append(Problem(f"cables[{c.index}].netns", f"there is no network namespace {c.netns!r} "
                                                                f"(create it first: ip netns add {c.netns})"))
    cython = [n for n in names if topo.devices[n].engine == "cython"]
    if cython and not _cython_engine_built():
        problems.append(Problem(f"devices.{cython[0]}.engine", "the cython engine is not built (cythonize -i -3 "
                                                              "nicemu/_datapath.pyx), use engine: auto"))
    if devices is None and topo.hosts:  # the whole topology: its kernels and applications too
        from nicemu.topology_hosts import host_problems

        problems += host_problems(topo)
    return problems


def _netns_exists(name: str) -> bool:
    """A named namespace (ip netns add) or a process id, as `ip link set ... netns` takes it."""
    return name.isdigit() or os.path.exists(f"/run/netns/{name}")


def _cython_engine_built() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("nicemu._datapath") is not None
    except (ImportError, ValueError):
        return False


def _taken(path: Path) -> bool:
    """Something that is not a socket sits where a socket is to be bound."""
    try:
        return not stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def _capture_problem(p: Path) -> str | None:
    """Why a pcap file cannot be written at `p`, or None."""
    if not os.path.isdir(p.parent):
        what = "is not a directory" if os.path.lexists(p.parent) else "does not exist"
        return f"the directory {_path_text(p.parent)} {what} (create it first)"
    if os.path.isdir(p):
        return f"{_path_text(p)} is a directory"
    if not os.access(p.parent, os.W_OK | os.X_OK):
        return f"the directory {_path_text(p.parent)} is not writable for us"
    return None


def check_topology(path: str | os.PathLike, *, runtime_dir: str | os.PathLike | None = None) -> Topology:
    """What `nicemu up --check` does, and `nicemu up` before it starts anything: load the file
    (load: the file, its YAML and every key) and check the host (check_host). Raises
    TopologyError listing every problem; creates and starts nothing."""
    topo = load(path, runtime_dir=runtime_dir)
    problems = check_host(topo)
    if problems:
        raise TopologyError(problems, str(path))
    return topo


def _needs_runtime_dir(topo: Topology) -> bool:
    """Some socket of the topology lives under its runtime directory (the default)."""
    return any(_under(p, topo.runtime_dir) for p in topo.socket_paths())


def _socket_files(topo: Topology, names: list[str]) -> list[tuple[str, Path]]:
    """(key path, socket file) of `names`' device sockets and unix cable ends."""
    out = [(f"devices.{n}.socket", topo.devices[n].socket) for n in names]
    for c in topo.cables:
        out += [(f"cables[{c.index}].path", p) for dev, p in c.unix_paths.items() if dev in names]
    return out


def prepare_dirs(topo: Topology, devices: Iterable[str] | None = None) -> CreatedDirs:
    """Create the runtime directory and the socket directories of `devices` (default: all);
    raises TopologyError (nothing created) for what check_host finds. The caller close()s the
    result when its sockets are gone."""
    names = list(topo.devices) if devices is None else list(devices)
    problems = check_host(topo, names)
    if problems:
        raise TopologyError(problems, str(topo.source or topo.name))
    dirs = CreatedDirs()
    try:
        if _needs_runtime_dir(topo):
            dirs.runtime_dir(topo.runtime_dir)
        for _key, path in _socket_files(topo, names):
            dirs.socket_dir(path.parent)
    except (MissingParentError, PrivateDirError) as e:  # the tree changed since check_host
        dirs.close()
        raise TopologyError([Problem("", str(e))], str(topo.source or topo.name)) from None
    except BaseException:
        dirs.close()
        raise
    return dirs


def end_key(cable: CableSpec, device: str) -> str:
    """The name of one cable end in ENV_CABLE_ENDS."""
    return f"cable{cable.index}.{device}"


def inherited_cable_ends(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The shm cable ends `nicemu up` passed to this process: "cable<i>.<device>" -> end arg."""
    raw = (os.environ if env is None else env).get(ENV_CABLE_ENDS)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        raise ValueError(f"{ENV_CABLE_ENDS} is not a JSON object of cable ends: {exc}") from None
    return {str(k): str(v) for k, v in data.items()}


# --- wiring one process --------------------------------------------------------------------


def _topology_problem(topo: Topology, message: str, path: str = "") -> TopologyError:
    return TopologyError([Problem(path, message)], str(topo.source or topo.name))


def build_emulator(config_path: str | os.PathLike, process: str | None = None, *,
                   runtime_dir: str | os.PathLike | None = None,
                   cable_ends: Mapping[str, str] | None = None) -> "Emulator":
    """An Emulator running process `process` of a topology (None: the whole topology).

    This is `nicemu serve --config FILE [--process NAME]`. Under `nicemu up` each child is
    told its runtime directory (NICEMU_RUNTIME_DIR) and the shm cable ends the parent created
    for it (NICEMU_CABLE_ENDS); `runtime_dir` and `cable_ends` override those. Raises
    TopologyError for a bad config or an unknown process, OSError when a resource cannot be
    opened (a socket path in use, no permission for a TAP); nothing is left open then.
    """
    topo = load(config_path, runtime_dir=runtime_dir or os.environ.get(ENV_RUNTIME_DIR) or None)
    if process is None:
        names = list(topo.devices)
    elif process in topo.processes:
        names = list(topo.processes[process])
    else:
        raise _topology_problem(topo, f"no process {process!r} in this topology; its processes are: "
                                      f"{', '.join(topo.processes)}{_suggest(process, topo.processes)}")
    ends_given = inherited_cable_ends() if cable_ends is None else dict(cable_ends)

    from nicemu.dma import DmaMemory
    from nicemu.emulator import Emulator
    from nicemu.nic import Nic

    dirs = prepare_dirs(topo, names)  # checks everything on the host first (check_host)
    try:
        emu = Emulator()
    except BaseException:
        dirs.close()
        raise
    # First closeable, so closed last: after the servers and cables have unlinked their sockets.
    emu.add_closeable(dirs)
    emu.catch_signals()  # a SIGTERM while building must still stop it cleanly
    try:
        nics: dict[str, Any] = {}
        for name in names:
            d = topo.devices[name]
            try:
                nic = Nic(DmaMemory(), mac=d.mac, engine=d.engine, pba=d.pba)
            except ImportError as e:  # engine: cython without the extension built
                raise _topology_problem(topo, f"the {d.engine} engine is not available ({e}); build it "
                                              "(cythonize -i -3 nicemu/_datapath.pyx) or use engine: auto",
                                        f"devices.{name}.engine") from None
            emu.add_device(name, nic, str(d.socket))
            nics[name] = nic
        for cable in topo.cables:
            local = [e for e in cable.ends if e in nics]
            if not local:
                continue
            if cable.kind == "pair":
                a, b = cable.ends
                emu.add_pair(nics[a], nics[b], capture_a=cable.capture.get(a), capture_b=cable.capture.get(b),
                             faults_ab=_fault_kwargs(cable.faults.get(a)),
                             faults_ba=_fault_kwargs(cable.faults.get(b)))
                continue
            for dev, end in _open_ends(topo, cable, local, ends_given):
                emu.add_port(nics[dev], _wrap_end(cable, dev, end))
        for name in names:
            if topo.cable_of(name) is None:  # no cable plugged in: link down, frames go nowhere
                nics[name].attach(unplugged)
                nics[name].set_link(False)
        _control_socket(emu)
    except BaseException:
        emu.close()
        raise
    return emu


def _control_socket(emu: "Emulator") -> None:
    """The control socket `nicemu up` asks for (NICEMU_CONTROL_SOCKET: `nicemu stats` queries
    it, nicemu/control.py); one that cannot be bound is a warning, not a failed start."""
    from nicemu.control import ENV_CONTROL_SOCKET, ControlSocket

    path = os.environ.pop(ENV_CONTROL_SOCKET, None)
    if path:
        try:
            ControlSocket(emu, path)
        except OSError as e:
            import logging

            logging.getLogger("nicemu.control").warning("no control socket %s: %s", path, e)


def _under(path: Path, directory: Path) -> bool:
    return directory == path.parent or directory in path.parents


def _fault_kwargs(spec: FaultSpec | None) -> dict[str, Any] | None:
    return spec.kwargs() if spec is not None else None


def _open_ends(topo: Topology, cable: CableSpec, local: list[str],
               ends_given: Mapping[str, str]) -> list[tuple[str, Any]]:
    """The raw cable ends (before faults and capture) for this process's devices on `cable`."""
    opened: list[tuple[str, Any]] = []
    try:
        if cable.kind == "shm":
            from nicemu.cable.shm import ShmCable, ShmCableEnd

            if len(local) == 2:  # both ends here: make the memory ourselves
                a, b = ShmCable.create(cable.ring_bytes or SHM_DEFAULT_RING_BYTES)
                opened += [(cable.ends[0], a), (cable.ends[1], b)]
            else:
                dev = local[0]
                arg = ends_given.get(end_key(cable, dev))
                if arg is None:
                    procs = topo.cable_processes(cable)
                    raise _topology_problem(
                        topo, f"this shm cable joins processes {procs[0]!r} and {procs[1]!r}; its shared "
                              "memory is created by `nicemu up`, which starts both (run the topology with "
                              "`nicemu up`, or without --process to run it all in one process)",
                        f"cables[{cable.index}]")
                opened.append((dev, ShmCableEnd.from_arg(arg)))
        elif cable.kind == "unix":
            from nicemu.cable.unix import UnixCableEnd

            for dev in local:
                if cable.unix_peer is not None:
                    peer = cable.unix_peer
                else:
                    peer = cable.unix_paths[next(e for e in cable.ends if e != dev)]
                opened.append((dev, UnixCableEnd(cable.unix_paths[dev], peer)))
        elif cable.kind == "udp":
            from nicemu.cable.udp import UdpCableEnd

            opened.append((local[0], UdpCableEnd(local=cable.local, remote=cable.remote)))
        elif cable.kind == "tap":
            from nicemu.cable.tap import TapCableEnd

            kw: dict[str, Any] = {"name": cable.tap_name}
            if cable.netns is not None:
                kw["netns"] = cable.netns
            opened.append((local[0], TapCableEnd(**kw)))
        else:  # pragma: no cover - validation admits only the kinds above
            raise ValueError(f"unknown cable kind {cable.kind!r}")
    except BaseException:
        for _dev, end in opened:
            end.close()
        raise
    return opened


def _wrap_end(cable: CableSpec, dev: str, end: Any) -> Any:
    """Faults on the inside, capture outermost (nicemu.cable.wrap_end): the pcap shows what
    the port itself saw. Faults into this device: on a two-device cable the other end applies
    them on its tx side (so each direction is shaped once); from the outside ("peer") this end
    applies them on receive."""
    from nicemu.cable import wrap_end

    tx = cable.faults.get(dev)
    rx = cable.faults.get("peer") if len(cable.ends) == 1 else None
    return wrap_end(end, capture=cable.capture.get(dev), faults_tx=_fault_kwargs(tx), faults_rx=_fault_kwargs(rx))
