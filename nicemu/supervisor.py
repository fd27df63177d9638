"""`nicemu up CONFIG`: start every emulator process of a topology, watch them, stop them all.

Why a supervisor: a topology spans several processes (one per process group, see
nicemu.topology), some of which share resources that must exist before either starts (the
memory of a `shm` cable between two processes). The supervisor

1. validates the config and checks the host (topology.check_topology, what `up --check` does:
   a TopologyError lists every problem; the CLI exits 2), before anything is created,
2. prepares the private runtime directory (0700; an existing one must already be private, it
   is never chmodded) and refuses to start over a live socket,
3. creates the shared resources itself and hands each child exactly its part with
   `pass_fds` (then drops its own copies, so a dead child reads as "link down" to its peer),
4. starts `python -m nicemu serve --config FILE --process NAME` per process group, each in its
   own process group (a terminal's Ctrl-C reaches only the supervisor, which then stops the
   children in order) and with PR_SET_PDEATHSIG, so the children get SIGTERM and clean up even
   if the supervisor is killed with SIGKILL,
5. waits, sleeping on a signal wake-up descriptor (SIGCHLD, SIGTERM, SIGINT, SIGHUP); a child
   that dies takes the topology down with a message naming it and a non-zero exit; SIGUSR1 is
   passed on to every child (each prints a `nicemu: stats {json}` line),
6. stops: SIGTERM to every child, SIGKILL to any still alive after `stop_timeout` seconds (or at
   once on a second Ctrl-C), reaps them all, removes socket files left behind and the
   directories it created (the runtime directory, and /tmp/nicemu-$UID if no other run uses it).

Hosts and applications (the `hosts:` and `applications:` sections, nicemu.topology_hosts) come
after the emulators: one `python -m kstack.kernel` per host, each waited for until it printed its
{"event": "up"} line, then the applications in file order (a server until its "listening" line,
a `wait: true` one until it has finished, successfully). Their output reaches us through a pipe
and is shown line by line with its owner's name (nicemu.supervisor_hosts.LineRelay). They get
the same process group and PR_SET_PDEATHSIG as the emulators, and are stopped first, in reverse:
applications, then kernels, then emulators. nicemu imports neither kstack nor driver: they are
commands.

"Up" means every child said it is ready: each gets the write end of a pipe (ENV_READY_FD) and
writes to it after it printed `nicemu: ready`, i.e. once all its devices listen and all its
cables are open. A socket that exists is not enough: a child binds its device sockets before it
opens its cables.
"""
from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

import nicemu
from nicemu import topology as T
from nicemu import topology_hosts as H
from nicemu.control import ENV_CONTROL_SOCKET, control_path
from nicemu.supervisor_hosts import LineRelay, host_summary

__all__ = ["Supervisor", "SupervisorError", "describe", "run_up"]

PR_SET_PDEATHSIG = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
DEFAULT_STOP_TIMEOUT = 5.0
DEFAULT_READY_TIMEOUT = 30.0
_POLL = 0.05  # seconds between socket checks while children start


class SupervisorError(RuntimeError):
    """`nicemu up` could not start or keep the topology running (message for the user)."""


@dataclass
class Child:
    """One process of the topology: an emulator process ("process"), a host's kernel ("host")
    or an application ("app")."""

    name: str
    devices: tuple[str, ...]
    popen: subprocess.Popen
    pass_fds: tuple[int, ...] = ()
    status: int | None = None  # Popen.returncode once reaped
    ready_fd: int | None = None  # read end of its readiness pipe, until it said "ready"
    ready: bool = False
    kind: str = "process"
    host: str = ""  # an application's host
    relay: LineRelay | None = None  # its output (hosts and applications)
    finished: bool = False  # an application that ended with status 0: not a failure

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        if self.status is None:
            self.status = self.popen.poll()
        return self.status

    def death(self) -> str:
        """How this (reaped) process ended, for the user: which one, its devices, the reason."""
        return f"{self.what()} {exit_reason(self.status)}"

    def what(self) -> str:
        if self.kind == "host":
            return f"host {self.name!r} (pid {self.pid}, kernel on devices {', '.join(self.devices)})"
        if self.kind == "app":
            return f"application {self.name!r} (pid {self.pid}, on host {self.host})"
        return f"process {self.name!r} (pid {self.pid}, devices {', '.join(self.devices)})"


def exit_reason(status: int) -> str:
    """Popen.returncode in words: 'exited with status 3' / 'was killed by SIGKILL'."""
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"was killed by {name}"
    return f"exited with status {status}"


def describe(topo: T.Topology) -> list[str]:
    """The plan, as lines for the user: processes, devices with MAC and socket, cables."""
    n_p, n_d = len(topo.processes), len(topo.devices)
    lines = [f"topology {topo.name}: {n_p} process{'es' if n_p != 1 else ''}, {n_d} device"
             f"{'s' if n_d != 1 else ''}, runtime directory {topo.runtime_dir}"]
    for pname, devs in topo.processes.items():
        lines.append(f"  process {pname}:")
        for d in devs:
            spec = topo.devices[d]
            lines.append(f"    {d}  {spec.mac}  {spec.socket}")
    for c in topo.cables:
        extra = ""
        if c.kind == "shm":
            extra = f" ring_bytes={c.ring_bytes}"
        elif c.kind == "udp":
            extra = f" local={c.local[0]}:{c.local[1]} remote={c.remote[0]}:{c.remote[1]}"
        elif c.kind == "tap":
            extra = f" name={c.tap_name}" + (f" netns={c.netns}" if c.netns else "")
        elif c.kind == "unix" and c.unix_peer is not None:
            extra = f" peer={c.unix_peer}"
        if c.capture:
            extra += " capture=" + ",".join(f"{d}:{p}" for d, p in c.capture.items())
        if c.faults:
            extra += " faults=" + ",".join(c.faults)
        lines.append(f"  cables[{c.index}] {c.kind} {' - '.join(c.ends)}{extra}")
    for h in topo.hosts.values():
        lines.append(f"  host {h.name}: kernel with syscall socket {h.syscall_socket}"
                     + (" (forwarding)" if h.forward else ""))
        for i in h.interfaces.values():
            cap = f" capture={h.capture[i.name]}" if i.name in h.capture else ""
            lines.append(f"    {i.name}  {i.device}  {i.mode}  {' '.join(i.addresses) or '(no address)'}{cap}")
        for r in h.routes:
            lines.append(f"    route {r.to}" + (f" via {r.via}" if r.via else "") + (f" dev {r.dev}" if r.dev else ""))
    for a in topo.applications:
        lines.append(f"  applications[{a.index}] {a.name} on {a.host}: {' '.join([a.run, *a.args])}"
                     + (f" (waited for, at most {a.timeout:g} s)" if a.wait else ""))
    return lines


def _pdeathsig_preexec(parent: int) -> Callable[[], None]:
    """Runs in the child between fork and exec: die with the supervisor, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)  # loaded in the parent: nothing to load after fork
    prctl = libc.prctl

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os._exit(1)

    return preexec


class Supervisor:
    """Runs one topology's emulator processes (see the module docstring)."""

    def __init__(self, topo: T.Topology, *, stop_timeout: float = DEFAULT_STOP_TIMEOUT,
                 ready_timeout: float = DEFAULT_READY_TIMEOUT, log_level: str | None = None,
                 out: TextIO | None = None, err: TextIO | None = None) -> None:
        if topo.source is None:
            raise ValueError("nicemu up needs a topology loaded from a file (children re-read it)")
        self.topo = topo
        self.stop_timeout = stop_timeout
        self.ready_timeout = ready_timeout
        self.log_level = log_level
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.children: list[Child] = []
        self.dirs: T.CreatedDirs | None = None  # what _prepare_runtime_dir created
        self.stop_requested: int | None = None  # the signal that asked us to stop
        self.signals_seen = 0
        self.ready = False  # every child said it is ready (so it handles SIGUSR1)
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._old_handlers: dict[int, Any] = {}
        self._old_wakeup: int | None = None

    # --- the whole life -------------------------------------------------------------------

    def run(self) -> int:
        """Start, wait until stopped or a child dies, stop. Returns the exit status."""
        self._install_signals()
        try:
            try:
                self.start()
                if not self.wait_ready():
                    return 1 if self.stop_requested is None else 0
                self.ready = True
                if not (self.start_hosts() and self.start_apps()):
                    return 1 if self.stop_requested is None else 0
                self._say(f"nicemu up: {self.topo.name} is up ({self._counts()}); Ctrl-C or SIGTERM "
                          "stops it")
                for line in self._next_steps():
                    self._say(line)
                return self.watch()
            except SupervisorError as e:
                self._complain(f"nicemu up: {e}")
                return 1
            finally:
                self.stop()
                if self.children:
                    self._say(f"nicemu up: {self.topo.name} stopped")
                for c in self.children:
                    if c.relay is not None:
                        c.relay.close()
        finally:
            self._restore_signals()

    def start(self) -> None:
        """Prepare the runtime directory and shared resources, then start every child."""
        topo = self.topo
        self._prepare_runtime_dir()
        self._refuse_live_sockets()
        for line in describe(topo):
            self._say(line)
        shared = self._create_shared_ends()
        try:
            env_base = self._child_env()
            env_base[T.ENV_RUNTIME_DIR] = str(topo.runtime_dir)
            preexec = _pdeathsig_preexec(os.getpid())
            for pname, devices in topo.processes.items():
                if self.stop_requested is not None:
                    return
                mine = {k: end for k, (dev, end) in shared.items() if dev in devices}
                env = dict(env_base)
                if mine:
                    env[T.ENV_CABLE_ENDS] = json.dumps({k: end.to_arg() for k, end in mine.items()})
                fds = tuple(fd for end in mine.values() for fd in end.fds())
                cmd = [sys.executable, "-m", "nicemu", "serve", "--config", str(topo.source),
                       "--process", pname]
                if self.log_level:
                    cmd += ["--log-level", self.log_level]
                ctl = self._control_path(pname)
                if ctl is not None:  # `nicemu stats` asks it for counters (nicemu/control.py)
                    env[ENV_CONTROL_SOCKET] = ctl
                ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
                env[T.ENV_READY_FD] = str(ready_w)
                try:
                    popen = subprocess.Popen(cmd, env=env, pass_fds=(*fds, ready_w),
                                             stdin=subprocess.DEVNULL, preexec_fn=preexec,
                                             process_group=0)
                except BaseException as e:
                    os.close(ready_r)
                    if isinstance(e, OSError):
                        raise SupervisorError(f"cannot start process {pname!r}: "
                                              f"{T.os_error_text(e)}") from None
                    raise
                finally:
                    os.close(ready_w)  # the child's copy is the only one: EOF when it dies
                self.children.append(Child(pname, devices, popen, fds, ready_fd=ready_r))
                # The child owns its ends now; our copies would keep its peer's link up after
                # the child died.
                for end in mine.values():
                    end.release()
        finally:
            for _key, (_dev, end) in shared.items():
                end.release()  # idempotent; also covers ends never handed out

    def start_hosts(self) -> bool:
        """One kernel per host, in file order, each waited for until its {"event": "up"} line;
        then where its syscall socket is. False: a stop was asked or something died (said)."""
        for h in self.topo.hosts.values():
            if self.stop_requested is not None:
                return False
            devices = tuple(i.device for i in h.interfaces.values())
            child = self._spawn_relayed(h.name, "host", H.kernel_command(self.topo, h), self._child_env(),
                                        f"[host {h.name}] ", devices=devices)
            if not self._wait_for(lambda: child.ready, self.ready_timeout,
                                  f"host {h.name!r} (kernel pid {child.pid}) not up"):
                return False
            self._say(f"nicemu up: host {h.name}: kernel up (pid {child.pid}: {host_summary(h)}); its "
                      f"applications: {H.ENV_KERNEL}={h.syscall_socket} python -m kstack.apps.ping ...")
        return True

    def start_apps(self) -> bool:
        """The applications in file order: a server until it says it listens, a `wait: true`
        one until it has ended (status 0, or the topology stops). False: a stop was asked or
        something failed (said)."""
        for a in self.topo.applications:
            if self.stop_requested is not None:
                return False
            env = self._child_env()
            env[H.ENV_KERNEL] = str(self.topo.hosts[a.host].syscall_socket)
            kind = H.APPS[a.run]
            child = self._spawn_relayed(a.name, "app", H.app_command(a), env, f"[{a.name}] ",
                                        host=a.host, ready_line=kind.ready)
            if a.wait:
                if not self._wait_for(lambda: child.poll() is not None, a.timeout,
                                      f"application {a.name!r} (pid {child.pid}) still running after "
                                      f"its timeout", exempt=child):
                    return False
                if child.relay is not None:
                    child.relay.pump()  # what it printed last, before our verdict
                if child.status != 0:
                    self._complain(f"nicemu up: {child.death()}; stopping")
                    return False
                child.finished = True
                self._say(f"nicemu up: application {a.name!r} finished (exit status 0)")
            elif kind.ready is not None:
                if not self._wait_for(lambda: child.ready, self.ready_timeout,
                                      f"application {a.name!r} (pid {child.pid}) not ready"):
                    return False
        return True

    def _spawn_relayed(self, name: str, kind: str, cmd: list[str], env: dict[str, str], prefix: str, *,
                       devices: tuple[str, ...] = (), host: str = "",
                       ready_line: str | None = None) -> Child:
        """Start a kernel or an application with its stdout and stderr on a pipe we relay."""
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        try:
            popen = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out_w,
                                     stderr=subprocess.STDOUT, preexec_fn=_pdeathsig_preexec(os.getpid()),
                                     process_group=0)
        except BaseException as e:
            os.close(out_r)
            if isinstance(e, OSError):
                raise SupervisorError(f"cannot start {kind} {name!r}: {T.os_error_text(e)}") from None
            raise
        finally:
            os.close(out_w)
        child = Child(name, devices, popen, kind=kind, host=host)

        def on_line(line: str) -> None:
            if child.ready:
                return
            if kind == "host":
                child.ready = _is_up_event(line)
            elif ready_line is not None:
                child.ready = line.startswith(ready_line)

        child.relay = LineRelay(out_r, prefix, self.out, on_line)
        self.children.append(child)
        return child

    def _wait_for(self, done: Callable[[], bool], timeout: float, late: str,
                  exempt: Child | None = None) -> bool:
        """Relay output and sleep until done() (True); False on a stop signal, a child's death
        (other than `exempt`'s) or after `timeout` seconds (`late` says what was late)."""
        deadline = time.monotonic() + timeout
        while True:
            if done():
                return True
            if self.stop_requested is not None:
                return False
            dead = self._dead_child(exempt)
            if dead is not None:
                self._complain(f"nicemu up: {dead.death()} while starting; stopping the others")
                return False
            now = time.monotonic()
            if now >= deadline:
                self._complain(f"nicemu up: {late} after {timeout:g} s; stopping")
                return False
            self._sleep(min(deadline - now, 1.0))

    def _child_env(self) -> dict[str, str]:
        """The environment of every child: ours, with the project on PYTHONPATH and none of
        the descriptors meant for another child."""
        python_path = str(Path(nicemu.__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (python_path, env.get("PYTHONPATH", "")) if p)
        for key in (T.ENV_CABLE_ENDS, T.ENV_READY_FD, H.ENV_KERNEL, ENV_CONTROL_SOCKET):
            env.pop(key, None)
        return env

    def _control_path(self, pname: str) -> str | None:
        """An emulator process's control socket, unless it would collide with a socket of
        the topology or not fit sun_path."""
        path = control_path(self.topo.runtime_dir, pname)
        if path is None or Path(path) in set(self.topo.socket_paths()):
            return None
        return path

    def _counts(self) -> str:
        """"2 processes" / "1 process, 2 hosts, 1 application" for the "is up" line."""
        def n(count: int, word: str, plural: str) -> str:
            return f"{count} {word if count == 1 else plural}"

        parts = [n(sum(c.kind == "process" for c in self.children), "process", "processes")]
        if self.topo.hosts:
            parts.append(n(len(self.topo.hosts), "host", "hosts"))
        if self.topo.applications:
            parts.append(n(len(self.topo.applications), "application", "applications"))
        return ", ".join(parts)

    def _next_steps(self) -> list[str]:
        """What to do with a running topology, after the "is up" line."""
        topo = self.topo
        lines = [f"nicemu up: runtime directory {topo.runtime_dir}",
                 f"nicemu up: counters of every process: nicemu stats {topo.source} --runtime-dir "
                 f"{topo.runtime_dir} (or kill -USR1 {os.getpid()}: a stats line from each)"]
        hosted = {i.device for h in (topo.hosts or {}).values() for i in h.interfaces.values()}
        for name, d in topo.devices.items():
            if name not in hosted:
                lines.append(f"nicemu up: device {name} waits for a driver: python -m driver.kernel "
                             f"--socket {d.socket} (or python -m driver.pmd --socket {d.socket})")
        return lines

    def wait_ready(self) -> bool:
        """Wait until every child said it is ready (its devices listen, its cables are open).
        False: a child died, a stop was asked, or a child was not ready in time (the reason
        is printed)."""
        deadline = time.monotonic() + self.ready_timeout
        while True:
            pending = [c for c in self.children if not c.ready]
            if not pending:
                return True
            if self.stop_requested is not None:
                return False
            dead = self._dead_child()
            if dead is not None:
                self._complain(f"nicemu up: {dead.death()} while starting; stopping the others")
                return False
            now = time.monotonic()
            if now > deadline:
                names = ", ".join(f"{c.name!r} (devices {', '.join(c.devices)})" for c in pending)
                self._complain(f"nicemu up: process{'es' if len(pending) > 1 else ''} {names} not "
                               f"ready after {self.ready_timeout:g} s; stopping")
                return False
            fds = [c.ready_fd for c in pending if c.ready_fd is not None]
            wake = [self._wake_r] if self._wake_r is not None else []
            # A child that closed its pipe without a word is dying: poll until it is reaped.
            timeout = min(deadline - now, _POLL if len(fds) < len(pending) or not wake else 1.0)
            readable, _, _ = select.select(fds + wake, [], [], max(0.0, timeout))
            for c in pending:
                if c.ready_fd is not None and c.ready_fd in readable:
                    c.ready = _read_ready(c.ready_fd)
                    os.close(c.ready_fd)
                    c.ready_fd = None
            if self._wake_r is not None and self._wake_r in readable:
                self._drain_wake()

    def watch(self) -> int:
        """Sleep until a stop signal (0) or a child's death (1)."""
        while True:
            if self.stop_requested is not None:
                name = signal.Signals(self.stop_requested).name
                n = sum(1 for c in self.children if c.poll() is None)
                self._say(f"nicemu up: {name}: stopping {n} process{'es' if n != 1 else ''}")
                return 0
            dead = self._dead_child()
            if dead is not None:
                self._complain(f"nicemu up: {dead.death()}; stopping the others")
                return 1
            self._sleep(None if self._wake_r is not None else 0.5)

    def stop(self) -> None:
        """Stop the applications, then the kernels, then the emulator processes (each stage
        in reverse order of start), then remove what they left behind."""
        signals_at_start = self.signals_seen
        for kind in ("app", "host", "process"):
            self._stop_stage([c for c in reversed(self.children) if c.kind == kind], signals_at_start)
        for c in self.children:
            if c.relay is not None:
                c.relay.pump()  # the last lines (a kernel's final stats), until EOF
        self._cleanup_files()

    def _stop_stage(self, children: list[Child], signals_at_start: int) -> None:
        """SIGTERM each child, SIGKILL the ones still alive after stop_timeout (or after a
        second stop signal), reap them all."""
        live = [c for c in children if c.poll() is None]
        for c in live:
            _signal(c, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        while True:
            live = [c for c in live if c.poll() is None]
            if not live:
                break
            now = time.monotonic()
            if now >= deadline or self.signals_seen > signals_at_start:  # impatient: a 2nd Ctrl-C
                for c in live:
                    what = {"host": "host", "app": "application"}.get(c.kind, "process")
                    self._complain(f"nicemu up: {what} {c.name!r} (pid {c.pid}) did not stop; killing it")
                    _signal(c, signal.SIGKILL)
                for c in live:
                    c.popen.wait()
                    c.poll()
                break
            self._sleep(min(_POLL, deadline - now))

    # --- steps ------------------------------------------------------------------------------

    def _prepare_runtime_dir(self) -> None:
        """The runtime directory and the socket directories (the children find them made);
        whatever check_host finds (a missing parent, a directory that is not private, a
        missing capture directory) is a TopologyError (exit 2), raised before anything is
        created."""
        try:
            self.dirs = T.prepare_dirs(self.topo)
        except OSError as e:
            raise SupervisorError(f"runtime directory: {T.os_error_text(e)}") from None

    def _refuse_live_sockets(self) -> None:
        """Two copies of a topology would fight over its sockets: say so before starting."""
        listening = _listening_paths()
        for name, d in self.topo.devices.items():
            live = (str(d.socket) in listening) if listening is not None else _accepts(d.socket)
            if _is_socket(d.socket) and live:
                raise SupervisorError(f"{d.socket} (device {name}) is served by another process; is "
                                      f"topology {self.topo.name!r} already up?")

    def _create_shared_ends(self) -> dict[str, tuple[str, Any]]:
        """shm cables between processes: create the memory here, one end per child."""
        shared: dict[str, tuple[str, Any]] = {}
        cables = self.topo.shared_cables()
        if not cables:
            return shared
        from nicemu.cable.shm import ShmCable

        try:
            for c in cables:
                a, b = ShmCable.create(c.ring_bytes or T.SHM_DEFAULT_RING_BYTES)
                shared[T.end_key(c, c.ends[0])] = (c.ends[0], a)
                shared[T.end_key(c, c.ends[1])] = (c.ends[1], b)
        except BaseException as e:
            for _dev, end in shared.values():
                end.release()
            if isinstance(e, (OSError, ValueError)):
                why = T.os_error_text(e) if isinstance(e, OSError) else str(e)
                raise SupervisorError(f"cannot create the shared memory of a shm cable: {why}") from None
            raise
        return shared

    def _cleanup_files(self) -> None:
        """Remove sockets the children left (e.g. after SIGKILL) and our runtime directory.

        Only dead sockets go: one still bound by a live process belongs to someone else (say,
        the copy of this topology that made our start fail)."""
        bound = _unix_paths(listening_only=False)
        controls = [Path(c) for c in map(self._control_path, self.topo.processes) if c is not None]
        for p in [*self.topo.socket_paths(), *controls] if self.children else []:
            if bound is not None and str(p) in bound:
                continue
            try:
                if stat.S_ISSOCK(os.lstat(p).st_mode):
                    os.unlink(p)
            except FileNotFoundError:
                pass
            except OSError as e:
                self._complain(f"nicemu up: cannot remove {p}: {T.os_error_text(e)}")
        if self.dirs is not None:
            self.dirs.close()  # only what we created, only if empty
            self.dirs = None
        for c in self.children:
            if c.ready_fd is not None:
                os.close(c.ready_fd)
                c.ready_fd = None

    def _dead_child(self, exempt: Child | None = None) -> Child | None:
        """A child that ended and should not have. An application that ended with status 0
        has done its work: it is said once and marked finished, not a failure."""
        for c in self.children:
            if c is exempt or c.finished or c.poll() is None:
                continue
            if c.kind == "app" and c.status == 0:
                c.finished = True
                if c.relay is not None:
                    c.relay.pump()
                self._say(f"nicemu up: {c.death()}")
                continue
            return c
        return None

    # --- signals ----------------------------------------------------------------------------

    def _install_signals(self) -> None:
        """Signals only set a flag and write to a socket our select sleeps on (no races)."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return  # embedded use: no handlers; the loops poll instead
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (self._wake_r, self._wake_w):
            s.setblocking(False)
        self._old_wakeup = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in STOP_SIGNALS:
            self._old_handlers[sig] = signal.signal(sig, self._on_stop_signal)
        self._old_handlers[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, self._on_sigchld)
        self._old_handlers[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._on_report_signal)

    def _restore_signals(self) -> None:
        for sig, h in self._old_handlers.items():
            signal.signal(sig, h)
        self._old_handlers.clear()
        if self._wake_w is not None:
            signal.set_wakeup_fd(self._old_wakeup if self._old_wakeup is not None else -1)
            self._wake_r.close()
            self._wake_w.close()
            self._wake_r = self._wake_w = None

    def _on_stop_signal(self, signum: int, _frame: Any) -> None:
        self.signals_seen += 1
        if self.stop_requested is None:
            self.stop_requested = signum

    def _on_report_signal(self, _signum: int, _frame: Any) -> None:
        """SIGUSR1: every emulator process prints its stats line (on our shared stdout). Only
        once all are up: until its Emulator catches SIGUSR1, the signal would kill a child."""
        if not self.ready:
            return
        for c in self.children:  # a kernel prints a stats line too, once it is up
            if c.status is None and (c.kind == "process" or (c.kind == "host" and c.ready)):
                _signal(c, signal.SIGUSR1)

    def _on_sigchld(self, _signum: int, _frame: Any) -> None:
        pass  # the wake-up fd already woke the loop; children are polled there

    def _sleep(self, timeout: float | None) -> None:
        """Sleep until a signal arrives, a child prints (relayed here), or timeout seconds pass."""
        relays = [c.relay for c in self.children if c.relay is not None and c.relay.fd is not None]
        if self._wake_r is None and not relays:
            time.sleep(timeout if timeout is not None else 0.5)
            return
        if self._wake_r is None and timeout is None:
            timeout = 0.5
        fds = [r.fd for r in relays] + ([self._wake_r] if self._wake_r is not None else [])
        readable, _, _ = select.select(fds, [], [], timeout)
        for r in relays:
            if r.fd in readable:
                r.pump()
        if self._wake_r is not None and self._wake_r in readable:
            self._drain_wake()

    def _drain_wake(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(512):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    # --- output -----------------------------------------------------------------------------

    def _say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def _complain(self, line: str) -> None:
        print(line, file=self.err, flush=True)


def _signal(c: Child, sig: int) -> None:
    try:
        c.popen.send_signal(sig)
    except ProcessLookupError:
        pass


def _is_up_event(line: str) -> bool:
    """A kernel's {"event": "up", ...} line."""
    if not line.startswith("{"):
        return False
    try:
        obj = json.loads(line)
    except ValueError:
        return False
    return isinstance(obj, dict) and obj.get("event") == "up"


def _read_ready(fd: int) -> bool:
    """A readable readiness pipe: True if the child wrote to it, False on EOF (it died)."""
    try:
        return os.read(fd, 64) != b""
    except OSError:
        return False


def _is_socket(p: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(p).st_mode)
    except OSError:
        return False


def _unix_paths(listening_only: bool) -> set[str] | None:
    """Paths of bound AF_UNIX sockets (only those in listen() state, /proc/net/unix flag
    __SO_ACCEPTCON, if listening_only), or None if /proc cannot tell. Checked without
    connecting: a probe connection would be a vfio-user client to the device."""
    try:
        with open("/proc/net/unix") as f:
            next(f)
            out = set()
            for line in f:
                parts = line.split(None, 7)
                if len(parts) == 8 and (not listening_only or int(parts[3], 16) & 0x10000):
                    out.add(parts[7].rstrip("\n"))
            return out
    except (OSError, ValueError, StopIteration):
        return None


def _listening_paths() -> set[str] | None:
    return _unix_paths(listening_only=True)


def _accepts(p: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(p))
        return True
    except OSError:
        return False
    finally:
        s.close()


def run_up(config: str | os.PathLike, *, runtime_dir: str | os.PathLike | None = None,
           stop_timeout: float = DEFAULT_STOP_TIMEOUT, ready_timeout: float = DEFAULT_READY_TIMEOUT,
           check: bool = False, log_level: str | None = None) -> int:
    """`nicemu up`: raises TopologyError for a bad config (the CLI prints it and exits 2).

    `--check` and a real start run the same checks (topology.check_topology: the file, every
    key, the directories, sockets and capture files on this host), all before anything is
    created or started."""
    topo = T.check_topology(config, runtime_dir=runtime_dir)
    if check:
        for line in describe(topo):
            print(line)
        print("config OK")
        return 0
    return Supervisor(topo, stop_timeout=stop_timeout, ready_timeout=ready_timeout,
                      log_level=log_level).run()
