"""The topology schema: limits, key names, the validated result (`Topology`, `DeviceSpec`,
`CableSpec`, `FaultSpec`), problems (`Problem`, `TopologyError`) and the small value parsers
and message helpers validation shares with nicemu.topology_hosts and the cable kinds.

Kept free of YAML, processes and the device model, so every layer above can read a plan.
"""
from __future__ import annotations

import difflib
import ipaddress
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from nicemu.cable import KINDS
from nicemu.cable.faults import FaultConfig
from nicemu.cable.shm import DEFAULT_RING as SHM_DEFAULT_RING_BYTES  # noqa: F401 - (named here too)
from wire.mac import format_mac, parse_mac as wire_parse_mac

if TYPE_CHECKING:
    from nicemu.topology_hosts import AppSpec, HostSpec

CABLE_KINDS = tuple(KINDS)  # (the registry, nicemu.cable.KINDS, is the list)

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
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\Z")  # \Z: "$" would take a trailing newline
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]+\Z")
_MAC_RE = re.compile(r"^[0-9A-Fa-f]{2}([:-])[0-9A-Fa-f]{2}(\1[0-9A-Fa-f]{2}){4}\Z")
_SIZE_RE = re.compile(r"^\s*(\d{1,18})\s*([KMG]i?B?|B)?\s*\Z", re.IGNORECASE | re.ASCII)

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


class HugeNumber:
    """An integer of more than MAX_NUMBER_DIGITS digits in a topology file: no setting takes
    one, so it is kept as its length. No check turns it into a giant int, no message quotes it
    whole (int() of a 5,000-digit string would even raise)."""

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"<a number of {self.digits} digits>"



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
    """Faults on the frames travelling one way along a cable: a nicemu.cable.faults.FaultConfig whose
    seed is always a number (load() fixes one per cable and direction), so runs repeat."""

    seed: int = 0

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for nicemu.cable.faults.FaultConfig."""
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
    options: Mapping[str, Any] = field(default_factory=dict)  # what the kind's check() returned

    # The options of the built-in kinds, by name (None or empty when the kind has no such one).
    ring_bytes = property(lambda self: self.options.get("ring_bytes"))  # shm
    unix_paths = property(lambda self: self.options.get("unix_paths", {}))  # unix: device -> bound path
    unix_peer = property(lambda self: self.options.get("unix_peer"))  # unix with one device: the outside peer
    local = property(lambda self: self.options.get("local"))  # udp
    remote = property(lambda self: self.options.get("remote"))  # udp
    tap_name = property(lambda self: self.options.get("tap_name"))  # tap
    netns = property(lambda self: self.options.get("netns"))  # tap

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
        m = re.match(r"^\s*(\d{1,15}(?:\.\d{1,15})?)\s*([kKmMgG]?)(?:bps|bit/s)?\s*\Z", v, re.ASCII)
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
    m = (re.match(r"^\[([0-9A-Fa-f:]{1,39})\]:(\d{1,10})\Z", v, re.ASCII)
         or re.match(r"^([^:\[\]\s]{1,64}):(\d{1,10})\Z", v, re.ASCII))
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
