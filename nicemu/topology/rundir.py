"""Run directories and the host: where sockets go (`runtime_base`, `default_runtime_dir`),
what a start would refuse on this host (`check_host`, `check_topology`), the directories a run
makes and removes again (`prepare_dirs`, `CreatedDirs`), and the cable ends `nicemu up`
passes to its children (`end_key`, `inherited_cable_ends`).
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Iterable, Mapping

from nicemu.cable import kind_module
from nicemu.private_dir import MissingParentError, PrivateDirError, ensure_private_dir, private_dir_problem
from nicemu.topology.schema import ENV_CABLE_ENDS, CableSpec, Problem, Topology, TopologyError, _path_text


def runtime_base() -> Path:
    """The per-user directory the default runtime directories live in: /tmp/nicemu-$UID."""
    return Path(f"/tmp/nicemu-{os.getuid()}")


def default_runtime_dir(name: str) -> Path:
    """Where sockets go unless the config says otherwise: private to this user and topology."""
    return runtime_base() / name


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
        hook = getattr(kind_module(c.kind), "host_problems", None)  # (the kind's own needs)
        if hook is not None and c.ends[0] in names:
            problems += [Problem(f"cables[{c.index}].{key}", why) for key, why in hook(c)]
    cython = [n for n in names if topo.devices[n].engine == "cython"]
    if cython and not _cython_engine_built():
        problems.append(Problem(f"devices.{cython[0]}.engine", "the cython engine is not built (cythonize -i -3 "
                                                              "nicemu/_datapath.pyx), use engine: auto"))
    if devices is None and topo.hosts:  # the whole topology: its kernels and applications too
        from nicemu.topology_hosts import host_problems

        problems += host_problems(topo)
    return problems


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


def _under(path: Path, directory: Path) -> bool:
    return directory == path.parent or directory in path.parents
