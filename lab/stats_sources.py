"""Where `nicemu stats` gets its figures: the processes of a running `nicemu up`, found from
the topology file and its runtime directory, and one query to each.

Finding the processes: `nicemu up` keeps no state file (a supervisor killed with SIGKILL could
not remove it, and the runtime directory must then be empty). What it leaves instead are the
listening sockets of its children in the private runtime directory: each emulator process's
control socket (`ctl-<process>.sock`) or device sockets, each host kernel's syscall socket.
/proc/net/unix maps a socket path to its inode and /proc/PID/fd to the process holding it (our
own processes only: another user's fds are not readable). The supervisor is their parent, and
the applications are its other children (`python -m kstack.apps.<run>`).

Asking them: an emulator answers `stats` on its control socket (nicemu/control.py); a kernel
answers a STATS call on its syscall channel (kstack.syscall, Op.STATS) with report() and the
TCP connections. CPU ns and context switches of every process come from /proc/PID/schedstat
and /proc/PID/status, so even a process that answers nothing (an application) is measured.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Proc", "find_processes", "query_emulator", "query_kernel", "proc_costs", "QUERY_TIMEOUT"]

QUERY_TIMEOUT = 2.0  # seconds one process may take to answer


@dataclass
class Proc:
    """One process of the running topology."""

    kind: str  # "supervisor", "emulator", "host", "app"
    name: str
    pid: int
    devices: tuple[str, ...] = ()
    control: str | None = None  # an emulator's control socket
    syscall_socket: str | None = None  # a host's
    extra: dict[str, Any] = field(default_factory=dict)


def _unix_inodes() -> dict[str, int]:
    """Path -> inode of every listening AF_UNIX socket with a path (/proc/net/unix)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                parts = line.split(None, 7)
                if len(parts) == 8 and int(parts[3], 16) & 0x10000:
                    out[parts[7].rstrip("\n")] = int(parts[6])
    except (OSError, ValueError, StopIteration):
        pass
    return out


def _socket_owners(inodes: set[int]) -> dict[int, int]:
    """Inode -> pid holding it, among this user's processes."""
    want = {f"socket:[{i}]": i for i in inodes}
    found: dict[int, int] = {}
    if not want:
        return found
    me = os.getuid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != me:
                continue
            fds = os.listdir(f"/proc/{entry.name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{entry.name}/fd/{fd}")
            except OSError:
                continue
            if target in want:
                found.setdefault(want[target], int(entry.name))
        if len(found) == len(want):
            break
    return found


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("PPid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _children(pid: int) -> list[int]:
    """Direct children of pid, in pid order (the order they were started in, normally)."""
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and _ppid(int(entry.name)) == pid:
            out.append(int(entry.name))
    return sorted(out)


def find_processes(topo: Any) -> list[Proc]:
    """The live processes of topology `topo` (nicemu.topology.Topology): supervisor,
    emulators, kernels, applications. Empty if it is not up."""
    from nicemu.control import control_path

    inodes = _unix_inodes()
    wanted: dict[str, int] = {}  # path -> inode
    emus: list[Proc] = []
    for pname, devs in topo.processes.items():
        ctl = control_path(topo.runtime_dir, pname)
        paths = ([ctl] if ctl else []) + [str(topo.devices[d].socket) for d in devs]
        live = [p for p in paths if p in inodes]
        if live:
            wanted.update({p: inodes[p] for p in live})
            emus.append(Proc("emulator", pname, -1, tuple(devs),
                             control=ctl if ctl in inodes else None, extra={"paths": live}))
    hosts: list[Proc] = []
    for h in topo.hosts.values():
        path = str(h.syscall_socket)
        if path in inodes:
            wanted[path] = inodes[path]
            devs = tuple(i.device for i in h.interfaces.values())
            hosts.append(Proc("host", h.name, -1, devs, syscall_socket=path, extra={"paths": [path]}))
    owners = _socket_owners(set(wanted.values()))
    out: list[Proc] = []
    for p in emus + hosts:
        pid = next((owners[wanted[x]] for x in p.extra.pop("paths") if wanted[x] in owners), None)
        if pid is not None:
            p.pid = pid
            out.append(p)
    parents = {_ppid(p.pid) for p in out}
    parents.discard(None)
    if len(parents) == 1:
        sup = parents.pop()
        known = {p.pid for p in out}
        apps = [a for a in topo.applications]
        others = [c for c in _children(sup) if c not in known]
        used: set[int] = set()
        for a in apps:  # match by what they run, in file order
            mod = f"kstack.apps.{a.run}"
            pid = next((c for c in others if c not in used and mod in _cmdline(c)), None)
            if pid is not None:
                used.add(pid)
                out.append(Proc("app", a.name, pid, extra={"host": a.host, "run": a.run}))
        out.insert(0, Proc("supervisor", "nicemu up", sup))
    return out


def query_emulator(path: str, timeout: float = QUERY_TIMEOUT) -> dict:
    """`stats` on an emulator's control socket: {"stats": ..., "process": ...}."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(timeout)
        s.connect(path)
        s.send(b"stats")
        data = s.recv(1 << 22)
    finally:
        s.close()
    if not data:
        raise ConnectionError(f"{path}: no answer")
    return json.loads(data)


def query_kernel(path: str, timeout: float = QUERY_TIMEOUT) -> dict:
    """A STATS call on a kernel's syscall channel, waited for at most `timeout` seconds."""
    from kstack.syscall.channel import Op
    from kstack.syscall.client import KernelChannel

    ch = KernelChannel(path, timeout)
    try:
        cid = ch.submit(Op.STATS)
        deadline = time.monotonic() + timeout
        while True:
            c = ch.poll_completion(cid)
            if c is not None:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path}: no answer to STATS in {timeout:g} s")
            time.sleep(0.002)
        if c.result < 0:
            raise OSError(-c.result, f"STATS: {os.strerror(-c.result)}")
        return json.loads(c.payload)
    finally:
        ch.close()


def proc_costs(pid: int) -> dict[str, int]:
    """CPU ns and run-queue wait (/proc/PID/schedstat, threads summed) and context switches
    (/proc/PID/status) of any of our processes; {} if it is gone."""
    out: dict[str, int] = {"cpu_ns": 0, "run_delay_ns": 0}
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                cpu, wait = (int(x) for x in f.read().split()[:2])
        except (OSError, ValueError):
            continue
        out["cpu_ns"] += cpu
        out["run_delay_ns"] += wait
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches"):
                    out["nvcsw"] = int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches"):
                    out["nivcsw"] = int(line.split()[1])
    except (OSError, ValueError):
        return {}
    out["ctx_switches"] = out.get("nvcsw", 0) + out.get("nivcsw", 0)
    return out
