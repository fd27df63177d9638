"""Fuzzing topology files: mutations of the example configs through what `nicemu up --check` does.

Each case writes one file (or picks a special one: a FIFO, /dev/zero, a directory, a file over
the size limit) and runs topology.check_topology on it: the file is read, its YAML parsed and
every key and the host checked; nothing is created and nothing started. Mutations of the
configs in configs/: keys dropped, unknown keys added, values of the wrong type, huge numbers,
deep nesting, random and invalid UTF-8 bytes, YAML anchors and aliases (legitimate reuse, a
"billion laughs" bomb, an alias inside its own value), YAML tags, very long strings and keys,
paths no system call takes, too many devices.

Invariants, checked on every case (FuzzFailure names the seed, the case and an excerpt):
- the outcome is a Topology or a TopologyError: never another exception, never a traceback;
- every problem is one line of bounded length naming its key (or the top level, for a file
  that is no topology at all: not YAML, not a regular file, too big);
- what must be refused is refused: an alias bomb (not expanded), nesting past MAX_DEPTH, an
  alias inside its own value, a FIFO, /dev/zero, a file over MAX_FILE_BYTES, more than
  MAX_DEVICES devices;
- a valid topology keeps the limits (devices, processes, socket path lengths);
- bounded time (a watchdog per case, and CPU time per case), bounded memory (peak RSS over
  the run) and nothing created on disk (the runtime directory a case names stays absent).
"""
from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from nicemu import topology as T
from nicemu.fuzz import FuzzFailure, FuzzReport

CASE_CPU_SECONDS = 10.0  # a hang detector with a wide margin, not a performance check
CASE_WALL_SECONDS = 60.0  # the watchdog for a case that blocks (a FIFO opened for reading)
MAX_RSS_GROWTH_KB = 256 * 1024  # what a run may add to the process's peak RSS
MAX_LINE = 500  # characters of one problem line

_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # writing the cases: libyaml if built
_CONFIGS = Path(__file__).resolve().parent.parent.parent / "configs"
_FALLBACK = """devices:
  nic0: {mac: "52:54:00:12:34:56"}
  nic1: {mac: "52:54:00:12:34:57", pba: {rx_kb: 40}}
cables:
  - kind: pair
    ends: [nic0, nic1]
    faults: {nic0: {drop: 0.01, seed: 1}}
"""


class _Case:
    """One input: its kind, the file to check, what it must give, and a description."""

    def __init__(self, kind: str, path: Path, must_refuse: str | None = None,
                 runtime_dir: Path | None = None) -> None:
        self.kind = kind
        self.path = path
        self.must_refuse = must_refuse  # a fragment some problem must contain, if refusal is required
        self.runtime_dir = runtime_dir  # --runtime-dir, or None: the file's own (or the default)
        self.note = ""

    def describe(self) -> str:
        try:
            raw = self.path.read_bytes()[:160] if self.path.is_file() else b""
        except OSError:
            raw = b""
        return f"{self.kind} {self.note} file {self.path} starting {raw!r}"


def run(seed: int, iterations: int, log: Callable[[str], None] | None = None) -> FuzzReport:
    """Check `iterations` mutated topology files drawn from random.Random(seed)."""
    report = FuzzReport(target="topology", seed=seed)
    rng = random.Random(seed)
    bases = _base_configs()
    rss_start = _peak_rss_kb()
    work = Path(tempfile.mkdtemp(prefix="nicemu-fuzz-topology-"))
    try:
        for i in range(iterations):
            case = _make_case(rng, bases, work, i)
            report.tried(case.kind)
            if log is not None:
                log(f"topology seed {seed} case {i}: {case.kind} {case.note}")
            outcome = _check_case(case, seed, i)
            report.saw(outcome)
            report.iterations += 1
            _clean(work, case)
            grown = _peak_rss_kb() - rss_start
            if grown > MAX_RSS_GROWTH_KB:
                raise FuzzFailure(f"topology seed {seed} case {i}: peak RSS grew by {grown} KB "
                                  f"(limit {MAX_RSS_GROWTH_KB}): {case.describe()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


# --- checking one case -----------------------------------------------------------------------


def _check_case(case: _Case, seed: int, i: int) -> str:
    """Run the check, enforce every invariant; the outcome for the report."""
    def fail(what: str) -> FuzzFailure:
        return FuzzFailure(f"topology seed {seed} case {i}: {what}; {case.describe()}")

    cpu0 = time.process_time()
    try:
        with _watchdog(CASE_WALL_SECONDS):
            topo = T.check_topology(case.path, runtime_dir=case.runtime_dir)
    except T.TopologyError as e:
        if type(e) is not T.TopologyError:
            raise fail(f"raised {type(e).__name__}, not TopologyError") from None
        _check_problems(e, fail)
        if case.must_refuse and not any(case.must_refuse in str(p) for p in e.problems):
            raise fail(f"refused, but not for {case.must_refuse!r}: {e.problems[:3]}")
        outcome = "refused: " + ("top level" if not e.problems[0].path else "a key")
    except _Hang:
        raise fail(f"no answer within {CASE_WALL_SECONDS} s") from None
    except Exception as e:  # the invariant: nothing but TopologyError
        raise fail(f"raised {type(e).__name__}: {str(e)[:200]}") from None
    else:
        if case.must_refuse:
            raise fail(f"accepted, but must be refused for {case.must_refuse!r}")
        _check_topology(topo, fail)
        outcome = "valid"
    cpu = time.process_time() - cpu0
    if cpu > CASE_CPU_SECONDS:
        raise fail(f"took {cpu:.1f} s of CPU")
    if case.runtime_dir is not None and os.path.lexists(case.runtime_dir):
        raise fail(f"the check created {case.runtime_dir}")
    return outcome


def _check_problems(e: T.TopologyError, fail: Callable[[str], FuzzFailure]) -> None:
    if not e.problems:
        raise fail("a TopologyError with no problem")
    for p in e.problems:
        line = str(p)
        if "\n" in line or "\r" in line:
            raise fail(f"a problem of more than one line: {line[:200]!r}")
        if len(line) > MAX_LINE:
            raise fail(f"a problem line of {len(line)} characters: {line[:200]!r}")
    rendered = e.render().splitlines()
    if len(rendered) > T.MAX_PROBLEMS_SHOWN + 2:
        raise fail(f"the error renders as {len(rendered)} lines")


def _check_topology(topo: T.Topology, fail: Callable[[str], FuzzFailure]) -> None:
    """A topology that passed keeps the limits a start relies on."""
    if not 1 <= len(topo.devices) <= T.MAX_DEVICES or len(topo.cables) > T.MAX_CABLES:
        raise fail(f"accepted {len(topo.devices)} devices and {len(topo.cables)} cables")
    if len(topo.processes) > T.MAX_PROCESSES:
        raise fail(f"accepted {len(topo.processes)} processes")
    grouped = [d for devs in topo.processes.values() for d in devs]
    if sorted(grouped) != sorted(topo.devices):
        raise fail(f"devices and processes disagree: {topo.processes}")
    for p in topo.socket_paths():
        if not p.is_absolute() or T.socket_path_problem(p):
            raise fail(f"accepted the socket path {str(p)[:120]!r}")
    for c in topo.cables:
        if any(e not in topo.devices for e in c.ends):
            raise fail(f"cables[{c.index}] names an unknown device")


class _Hang(Exception):
    pass


@contextmanager
def _watchdog(seconds: float) -> Iterator[None]:
    """SIGALRM after `seconds` on the main thread (where the tests and the command run), unless
    somebody else already uses SIGALRM; elsewhere only the CPU-time check holds."""
    usable = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None)
    if not usable:
        yield
        return

    def expire(_sig: int, _frame: Any) -> None:
        raise _Hang()

    signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


def _peak_rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _clean(work: Path, case: _Case) -> None:
    """Remove what the case itself wrote (the check must have written nothing)."""
    for p in work.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink()


# --- making cases ----------------------------------------------------------------------------


def _base_configs() -> list[Any]:
    """The example configs as plain data (dicts, lists, scalars), MACs as strings."""
    texts = [p.read_text() for p in sorted(_CONFIGS.glob("*.yaml"))] if _CONFIGS.is_dir() else []
    out = []
    for text in texts or [_FALLBACK]:
        try:
            out.append(_plain(T._yaml_load(text, "<example>")))
        except T.TopologyError:
            continue
    return out or [_plain(T._yaml_load(_FALLBACK, "<fallback>"))]


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def _make_case(rng: random.Random, bases: list[Any], work: Path, i: int) -> _Case:
    kind = rng.choice(sorted(_MUTATIONS))
    case = _MUTATIONS[kind](rng, _copy(rng.choice(bases)), work)
    case.kind = kind
    if case.runtime_dir is None and rng.random() < 0.7 and kind != "paths":
        case.runtime_dir = work / f"rt{i}"  # where sockets would go: must stay absent
    return case


def _copy(v: Any) -> Any:
    return _plain(v)


class _Doc:
    """A config as data plus raw YAML fragments: placeholders in the data are replaced by the
    fragments in the dumped text (huge numbers, nesting, tags and aliases no dumper writes)."""

    def __init__(self, data: Any) -> None:
        self.data = data
        self.fragments: dict[str, str] = {}

    def fragment(self, text: str) -> str:
        token = f"zzfrag{len(self.fragments)}zz"
        self.fragments[token] = text
        return token

    def text(self, rng: random.Random) -> str:
        out = yaml.dump(self.data, Dumper=_DUMPER, default_flow_style=rng.random() < 0.3, sort_keys=False,
                        allow_unicode=True, width=1 << 20)
        for token, frag in self.fragments.items():
            out = out.replace(f"'{token}'", frag).replace(token, frag)
        return out


def _write(work: Path, name: str, content: str | bytes) -> Path:
    p = work / name
    p.write_bytes(content.encode("utf-8", "surrogatepass") if isinstance(content, str) else content)
    return p


def _spots(v: Any, path: tuple = ()) -> list[tuple]:
    """Every key path in the data (dict keys and list indexes), parents before children."""
    out = []
    if isinstance(v, dict):
        for k, x in v.items():
            out.append(path + (k,))
            out.extend(_spots(x, path + (k,)))
    elif isinstance(v, list):
        for j, x in enumerate(v):
            out.append(path + (j,))
            out.extend(_spots(x, path + (j,)))
    return out


def _container(data: Any, spot: tuple) -> tuple[Any, Any]:
    parent = data
    for step in spot[:-1]:
        parent = parent[step]
    return parent, spot[-1]


def _set_somewhere(rng: random.Random, data: Any, value: Any) -> str:
    """Replace the value at a random key path (or add a key at the top); returns where."""
    spots = _spots(data)
    if not spots or rng.random() < 0.1:
        key = rng.choice(["devices", "cables", "name", "runtime_dir"])
        data[key] = value
        return key
    spot = rng.choice(spots)
    parent, key = _container(data, spot)
    parent[key] = value
    return ".".join(map(str, spot))


def _random_scalar(rng: random.Random) -> Any:
    return rng.choice([
        None, True, False, 0, -1, 1, 2**31, 2**64, -(2**63), 0.5, -0.0, float("inf"), float("nan"),
        "", " ", "x", "nic0", "peer", "52:54:00:12:34:56", "01:00:5e:00:00:01", "1M", "64K", "100M",
        "127.0.0.1:5555", "[::1]:1", "8.8.8.8:53", "localhost:0", "../../etc/passwd", "/tmp", "~",
        "é", "\u202e", "a\tb", [], {}, [1, "a"], {"k": "v"}, {"drop": 2}, {"rx_kb": 70},
    ])


# one function per kind of input: (rng, data, work dir) -> _Case


def _drop_key(rng: random.Random, data: Any, work: Path) -> _Case:
    spots = [s for s in _spots(data)]
    case_note = ""
    for _ in range(rng.randint(1, 3)):
        if not spots:
            break
        spot = rng.choice(spots)
        parent, key = _container(data, spot)
        if isinstance(parent, dict) and key in parent:
            del parent[key]
        elif isinstance(parent, list) and isinstance(key, int) and key < len(parent):
            parent.pop(key)
        case_note += ".".join(map(str, spot)) + " "
        spots = _spots(data)
    case = _Case("", _write(work, "c.yaml", _Doc(data).text(rng)))
    case.note = f"dropped {case_note.strip()}"
    return case


_KEY_WORDS = ["mac", "macc", "socket", "pba", "engine", "process", "driver", "kind", "ends", "capture",
              "faults", "ring_bytes", "path", "peer", "local", "remote", "name", "netns", "drop", "seed",
              "rx_kb", "devices", "cables", "runtime_dir", "<<", "peer", "nic0", "nic9"]


def _unknown_key(rng: random.Random, data: Any, work: Path) -> _Case:
    dicts = [data] + [_container(data, s)[0][s[-1]] for s in _spots(data)
                      if isinstance(_container(data, s)[0][s[-1]], dict)]
    target = rng.choice(dicts)
    word = rng.choice(_KEY_WORDS)
    key = rng.choice([word, word + "x", word[:-1] or "k", word.upper(), f"{word}{rng.randint(0, 99)}"])
    doc = _Doc(data)
    target[key if key != "<<" else "zzmerge"] = _random_scalar(rng)
    text = doc.text(rng).replace("zzmerge", "<<")  # a merge key with a plain value: not a mapping
    case = _Case("", _write(work, "c.yaml", text))
    case.note = f"added {key!r}"
    return case


def _swap_type(rng: random.Random, data: Any, work: Path) -> _Case:
    notes = []
    for _ in range(rng.randint(1, 3)):
        notes.append(_set_somewhere(rng, data, _random_scalar(rng)))
    case = _Case("", _write(work, "c.yaml", _Doc(data).text(rng)))
    case.note = f"retyped {', '.join(notes)}"
    return case


def _huge_number(rng: random.Random, data: Any, work: Path) -> _Case:
    doc = _Doc(data)
    digits = rng.choice([19, 20, 31, 64, 400, 4301, 6000])
    body = str(rng.randint(1, 9)) + "".join(rng.choice("0123456789") for _ in range(digits - 1))
    text = rng.choice([body, "-" + body, body + ".5", f"1e{body[:6]}", "0x" + body[:digits // 2],
                       f"'{body}'", f"'{body}K'", f"'127.0.0.1:{body}'", f"'{body}M'", "0b" + "1" * digits])
    where = _set_somewhere(rng, data, doc.fragment(text))
    case = _Case("", _write(work, "c.yaml", doc.text(rng)))
    case.note = f"{digits} digits at {where}"
    return case


def _deep_nesting(rng: random.Random, data: Any, work: Path) -> _Case:
    """Nesting around MAX_DEPTH and far past it (10,000 levels were a RecursionError). A value
    sits at least two levels down (the top mapping, then a key's value), so `levels` more
    collections reach past MAX_DEPTH once levels >= MAX_DEPTH - 1: that must be refused."""
    depth = rng.choice([T.MAX_DEPTH - 4, T.MAX_DEPTH - 1, T.MAX_DEPTH, 100, 10_000])
    style = rng.choice(["list", "map", "mixed", "block"])
    if style == "block":  # indentation, the whole file
        levels = min(depth, 600)  # 600 levels of indentation: 180 KB
        text = "devices:\n" + "".join(" " * (k + 1) + "a:\n" for k in range(levels))
        where = "devices"
    else:
        opener, closer, per = {"list": ("[", "]", 1), "map": ("{a: ", "}", 1), "mixed": ("[{a: ", "}]", 2)}[style]
        count = depth // per
        levels = count * per
        doc = _Doc(data)
        where = _set_somewhere(rng, data, doc.fragment(opener * count + "x" + closer * count))
        text = doc.text(rng)
    must = "nested deeper" if levels >= T.MAX_DEPTH - 1 else None
    case = _Case("", _write(work, "c.yaml", text), must)
    case.note = f"{style} {levels} levels at {where}"
    return case


def _random_bytes(rng: random.Random, data: Any, work: Path) -> _Case:
    text = _Doc(data).text(rng).encode()
    n = rng.randint(1, 64)
    noise = rng.randbytes(n)
    if rng.random() < 0.3:
        content = rng.randbytes(rng.randint(0, 2000))
    else:
        at = rng.randint(0, len(text))
        content = text[:at] + noise + text[at + rng.randint(0, n):]
    case = _Case("", _write(work, "c.yaml", content))
    case.note = f"{len(content)} bytes"
    return case


def _invalid_utf8(rng: random.Random, data: Any, work: Path) -> _Case:
    text = _Doc(data).text(rng).encode()
    bad = rng.choice([b"\xff", b"\xfe\xff", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80",
                      b"\xc0\xaf", b"\x00", b"\x1b[2J", b"\xef\xbb\xbf"])
    at = rng.randint(0, len(text))
    case = _Case("", _write(work, "c.yaml", text[:at] + bad + text[at:]))
    case.note = f"{bad!r} at byte {at}"
    return case


def _aliases(rng: random.Random, data: Any, work: Path) -> _Case:
    """Legitimate reuse: an anchored device merged into the others, faults reused."""
    doc = _Doc(data)
    devs = data.get("devices") if isinstance(data, dict) else None
    if isinstance(devs, dict) and devs:
        names = list(devs)
        first = devs[names[0]] if isinstance(devs[names[0]], dict) else {}
        body = {k: v for k, v in first.items() if k != "mac"}
        devs[names[0]] = doc.fragment("&dev " + _flow(body | {"mac": first.get("mac", "52:54:00:12:34:56")}))
        for j, name in enumerate(names[1:], 1):
            mac = devs[name].get("mac", f"52:54:00:12:35:{j:02x}") if isinstance(devs[name], dict) else "x"
            devs[name] = doc.fragment(f"{{<<: *dev, mac: {_flow(mac)}}}")
    for cab in data.get("cables") or [] if isinstance(data, dict) else []:
        faults = cab.get("faults") if isinstance(cab, dict) else None
        if isinstance(faults, dict) and len(faults) > 1:
            senders = list(faults)
            faults[senders[0]] = doc.fragment("&f " + _flow(faults[senders[0]]))
            faults[senders[1]] = doc.fragment("*f")
    case = _Case("", _write(work, "c.yaml", doc.text(rng)))
    case.note = "merge keys and aliases"
    return case


def _alias_bomb(rng: random.Random, data: Any, work: Path) -> _Case:
    """A billion laughs: 9 levels of 10 aliases each (10^9 values if expanded)."""
    width, levels = rng.choice([(10, 9), (9, 10), (2, 40), (100, 4)])
    lines = ["lol0: &lol0 [" + ", ".join(["lol"] * width) + "]"]
    for k in range(1, levels):
        lines.append(f"lol{k}: &lol{k} [" + ", ".join([f"*lol{k - 1}"] * width) + "]")
    merge = rng.random() < 0.3
    if merge:  # the same through merge keys
        lines = ["m0: &m0 {" + ", ".join(f"k{j}: v" for j in range(width)) + "}"]
        for k in range(1, levels):
            lines.append(f"m{k}: &m{k} {{<<: [" + ", ".join([f"*m{k - 1}"] * width) + "]}")
    last = f"*m{levels - 1}" if merge else f"*lol{levels - 1}"
    doc = _Doc(data)
    where = _set_somewhere(rng, data, doc.fragment(last))
    text = "\n".join(lines) + "\n" + doc.text(rng)
    case = _Case("", _write(work, "c.yaml", text), "once its aliases are expanded")
    case.note = f"{width}^{levels} {'merge ' if merge else ''}at {where}"
    return case


def _recursive_alias(rng: random.Random, data: Any, work: Path) -> _Case:
    doc = _Doc(data)
    frag = rng.choice(["&r [*r]", "&r {a: *r}", "&r [1, [2, *r]]", "&r {<<: *r}", "&r {a: [*r]}"])
    where = _set_somewhere(rng, data, doc.fragment(frag))
    case = _Case("", _write(work, "c.yaml", doc.text(rng)), "refers to the value that contains it")
    case.note = f"{frag} at {where}"
    return case


def _tags(rng: random.Random, data: Any, work: Path) -> _Case:
    doc = _Doc(data)
    frag = rng.choice([
        "!!binary aGVsbG8=", "!!binary '***'", "!!set {a, b}", "!!omap [a: 1, b: 2]", "!!omap [1]",
        "!!pairs [a: 1]", "!!timestamp 2001-13-45", "!!timestamp 2001-12-14t21:59:43.10-05:00",
        "!!python/object:os.system {}", "!!python/name:os.system ''", "!!int ''", "!!int '0x'",
        "!!int '+'", "!!int '0o9'", "!!float 'x'", "!!float ''", "!!bool maybe", "!!null x", "!foo bar",
        "!<tag:yaml.org,2002:str> 1", "!!str", "!!map [1]", "!!seq {a: 1}", "0x_", "0b_", "._", "0o_",
        "2001-02-30", "- 1", "? [a]", "{[a]: 1}", "{{a: 1}: 2}", "*undefined", "&a &b x", "%YAML 1.1",
    ])
    where = _set_somewhere(rng, data, doc.fragment(frag))
    case = _Case("", _write(work, "c.yaml", doc.text(rng)))
    case.note = f"{frag} at {where}"
    return case


def _long_string(rng: random.Random, data: Any, work: Path) -> _Case:
    n = rng.choice([41, 200, 1000, 5000, 30_000])
    alphabet = rng.choice(["a", "0123456789", "ab/", "x\n", "é€😀", "\x01\x7f", " ", ":"])
    text = "".join(rng.choice(alphabet) for _ in range(n))
    as_key = rng.random() < 0.4
    doc = _Doc(data)
    if as_key and isinstance(data, dict):
        target = data.get("devices") if isinstance(data.get("devices"), dict) else data
        target[text] = {}
        where = "a key"
    else:
        where = _set_somewhere(rng, data, text)
    case = _Case("", _write(work, "c.yaml", doc.text(rng)))
    case.note = f"{n} characters of {alphabet!r} as {where}"
    return case


def _many_devices(rng: random.Random, data: Any, work: Path) -> _Case:
    n = rng.choice([1, 2, T.MAX_PROCESSES, T.MAX_PROCESSES + 1, T.MAX_DEVICES, T.MAX_DEVICES + 1, 200])
    grouped = rng.random() < 0.5
    devices = {f"n{j}": ({"process": f"p{j % 4}"} if grouped else {}) for j in range(n)}
    text = yaml.dump({"devices": devices}, Dumper=_DUMPER, sort_keys=False)
    if rng.random() < 0.5:  # and as many cables
        text += "cables:\n" + "".join(f"  - {{kind: tap, ends: [n{j}]}}\n" for j in range(n))
    must = f"at most {T.MAX_DEVICES}" if n > T.MAX_DEVICES else None
    case = _Case("", _write(work, "c.yaml", text), must)
    case.note = f"{n} devices{' in 4 processes' if grouped else ''}"
    return case


def _paths(rng: random.Random, data: Any, work: Path) -> _Case:
    """Paths no system call takes, and directories nicemu must not use or change."""
    (work / "afile").write_text("")
    (work / "open").mkdir(exist_ok=True)
    os.chmod(work / "open", 0o1777)
    choice = rng.choice([
        ("runtime_dir", "/tmp", "runtime_dir: "),  # 1777 (or another user's): refused, never chmodded
        ("runtime_dir", str(work / "open"), "group/other"),
        ("runtime_dir", str(work / "afile"), "is not a directory"),
        ("runtime_dir", str(work / "no" / "rt"), "does not exist"),
        ("runtime_dir", "a\0b", "NUL"),
        ("runtime_dir", "a\ud800b", "cannot be in a file name"),
        ("runtime_dir", "x" * 300, "longer than 255"),
        ("runtime_dir", "/x" * 2100, "longer than 4095"),
        ("socket", "/" + "s" * 200 + ".sock", "longer than 107"),
        ("socket", str(work / "afile"), "is not a socket"),
        ("socket", str(work / "open" / "nic.sock"), "group/other"),
        ("capture", str(work / "none" / "x.pcap"), "does not exist"),
        ("capture", str(work), "is a directory"),
        ("capture", "c\0.pcap", "NUL"),
    ])
    key, text, must = choice
    doc = _Doc(data)
    value = doc.fragment(json.dumps(text))  # a JSON string is a YAML one, escapes (NUL, \ud800) included
    if key == "runtime_dir" and isinstance(data, dict):
        data["runtime_dir"] = value
    elif key == "socket" and isinstance(data, dict) and isinstance(data.get("devices"), dict):
        dev = next(iter(data["devices"]))
        if not isinstance(data["devices"][dev], dict):
            data["devices"][dev] = {}
        data["devices"][dev]["socket"] = value
    elif key == "capture" and isinstance(data, dict) and data.get("cables"):
        cab = data["cables"][0]
        cab["capture"] = {cab["ends"][0]: value}
    else:
        must = None
    case = _Case("", _write(work, "c.yaml", doc.text(rng)), must)
    case.note = f"{key} {text[:40]!r}"
    return case


def _special_file(rng: random.Random, data: Any, work: Path) -> _Case:
    what = rng.choice(["fifo", "dev_zero", "directory", "too_big", "missing", "symlink_loop", "empty",
                       "padded"])
    must: str | None = "not a regular file"
    if what == "fifo":
        path = work / "fifo.yaml"
        os.mkfifo(path)  # nobody writes: a blocking open or read would hang here
    elif what == "dev_zero":
        path = Path("/dev/zero")
    elif what == "directory":
        path = work / "dir.yaml"
        path.mkdir()
    elif what == "too_big":
        path = _write(work, "big.yaml", b"#" * (T.MAX_FILE_BYTES + 1))
        must = f"at most {T.MAX_FILE_BYTES}"
    elif what == "missing":
        path, must = work / "missing.yaml", "cannot read the file"
    elif what == "symlink_loop":
        path = work / "loop.yaml"
        path.symlink_to(path)
        must = "cannot read the file"
    elif what == "empty":
        path, must = _write(work, "empty.yaml", b""), "the file is empty"
    else:  # a config padded with a long comment (tests/apps/test_topology.py reads one at the
        # limit)
        text = _Doc(data).text(rng).encode()
        path = _write(work, "padded.yaml", text + b"#" * (32 << 10) + b"\n")
        must = None
    case = _Case("", path, must)
    case.note = what
    return case


def _flow(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=1 << 20).strip().removesuffix("...").strip()


_MUTATIONS: dict[str, Callable[[random.Random, Any, Path], _Case]] = {
    "drop_key": _drop_key,
    "unknown_key": _unknown_key,
    "swap_type": _swap_type,
    "huge_number": _huge_number,
    "deep_nesting": _deep_nesting,
    "random_bytes": _random_bytes,
    "invalid_utf8": _invalid_utf8,
    "aliases": _aliases,
    "alias_bomb": _alias_bomb,
    "recursive_alias": _recursive_alias,
    "yaml_tags": _tags,
    "long_string": _long_string,
    "many_devices": _many_devices,
    "paths": _paths,
    "special_file": _special_file,
}
