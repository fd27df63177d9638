"""Child processes of the lab's commands: started in their own process group with
PR_SET_PDEATHSIG (they die with the controller, even on SIGKILL), read without threads, and
sampled from /proc; the run directory under /tmp/nicemu-UID that a command's sockets live in.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

CHILD_STOP_TIMEOUT = 3.0  # s a child gets after SIGTERM before SIGKILL


class DemoError(RuntimeError):
    """Something the user should read: a child died, a device went away, a timeout."""


class Interrupted(Exception):
    """SIGINT/SIGTERM/SIGHUP arrived: stop everything and exit with 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class ProcSample:
    """What /proc says about one process at one moment."""

    ctx_switches: int  # voluntary + involuntary
    cpu_seconds: float  # user + system


def proc_sample(pid: int) -> ProcSample:
    """Context switches from /proc/PID/status, CPU time from /proc/PID/stat."""
    ctx = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                ctx += int(line.split()[1])
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": field 3 is fields[0]
    ticks = int(fields[11]) + int(fields[12])  # fields 14 and 15: utime, stime
    return ProcSample(ctx, ticks / os.sysconf("SC_CLK_TCK"))


class Child:
    """A child process reporting JSON lines on stdout, read without threads or blocking
    (no threads: the children are started with a preexec_fn, which threads make unsafe)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], preexec: Any,
                 stdin: bool = False) -> None:
        self.name = name
        self.popen = subprocess.Popen(
            argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=env, preexec_fn=preexec, process_group=0)
        self._stdout = self.popen.stdout.fileno()
        self.fds = {self._stdout: bytearray(), self.popen.stderr.fileno(): bytearray()}
        for fd in self.fds:
            os.set_blocking(fd, False)
        self.events: deque[dict] = deque()
        self.stderr_tail: deque[str] = deque(maxlen=15)
        self.text: deque[str] = deque(maxlen=200)  # stdout lines that are not events
        self.info: dict = {}  # its "up" event

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def pump(self, fd: int) -> None:
        """Read what `fd` has; complete stdout lines become events."""
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            rest = self.fds.pop(fd, b"")
            if rest:
                self._line(fd, bytes(rest))
            return
        buf = self.fds[fd]
        buf += data
        while (nl := buf.find(b"\n")) >= 0:
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            self._line(fd, line)

    def _line(self, fd: int, line: bytes) -> None:
        text = line.decode(errors="replace").rstrip()
        if fd == self._stdout:
            try:
                ev = json.loads(text)
            except ValueError:
                ev = None
            if isinstance(ev, dict) and "event" in ev:
                self.events.append(ev)
                return
            if isinstance(ev, dict):  # an application's closing report
                self.events.append({"event": "report", **ev})
                return
            self.text.append(text)
        if text:
            self.stderr_tail.append(text)

    def take(self, name: str) -> dict | None:
        """The first queued event called `name` (others before it are dropped); an "error"
        event raises DemoError."""
        while self.events:
            ev = self.events.popleft()
            if ev["event"] == "error":
                raise DemoError(f"{self.name} (pid {self.pid}): {ev.get('message')}")
            if ev["event"] == name:
                return ev
        return None

    def send(self, line: str) -> None:
        try:
            self.popen.stdin.write(line.encode() + b"\n")
            self.popen.stdin.flush()
        except OSError:
            pass  # it died: the wait for its answer says so

    def why_dead(self) -> str:
        rc = self.popen.returncode
        how = (f"was killed by {signal.Signals(-rc).name}" if rc is not None and rc < 0
               else f"exited with status {rc}")
        tail = "\n    ".join(self.stderr_tail)
        return f"{self.name} (pid {self.pid}) {how}" + (f"; it said:\n    {tail}" if tail else "")

    def stop(self, kill_now: bool = False, timeout: float = CHILD_STOP_TIMEOUT) -> None:
        """SIGTERM (or SIGKILL), wait, SIGKILL if it lingers; reap; close the pipes."""
        if self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGKILL if kill_now else signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
        self.popen.wait()
        for fd in list(self.fds):  # keep its last words for an error message
            self.pump(fd)
        for f in (self.popen.stdout, self.popen.stderr):
            with contextlib.suppress(OSError):
                f.close()
        self.fds.clear()



def pdeathsig_preexec(parent: int | None = None) -> Any:
    """Children die with the controller, even when it is killed with SIGKILL (the
    supervisor's PR_SET_PDEATHSIG preexec_fn, which `nicemu up` uses for its children).
    `parent`: the controller's pid (default this process: the function is a Popen
    preexec_fn); a forked child calls `pdeathsig_preexec(parent)()` itself (die_with)."""
    from nicemu.supervisor import _pdeathsig_preexec as preexec

    return preexec(os.getpid() if parent is None else parent)


def die_with(parent: int, target: Any, *args: Any) -> Any:
    """A multiprocessing (fork) target that first sets PR_SET_PDEATHSIG towards `parent`
    (exits at once if `parent` is already gone), then runs target(*args):
    ctx.Process(target=die_with, args=(os.getpid(), target, *args))."""
    pdeathsig_preexec(parent)()
    return target(*args)


@contextlib.contextmanager
def stdout_to_devnull() -> Iterator[None]:
    """Processes started inside inherit /dev/null as stdout (the emulator's banner lines
    would otherwise land in the middle of the narration)."""
    sys.stdout.flush()
    saved = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


PARENT_MARK = "made-parent"  # in a run's directory: that run created /tmp/nicemu-UID


def run_directory(kind: str = "_demo") -> tuple[Path, bool]:
    """A private directory for this run's config and sockets: /tmp/nicemu-UID/_demo-PID (no
    topology's runtime directory starts with "_"; `kind` "_bench" for `nicemu bench`), and whether this run is to remove the
    per-user parent /tmp/nicemu-UID at the end if it is empty then: it created the parent, or
    it swept away the directory of a dead demo that had (marked by a PARENT_MARK file).

    The controller removes its directory when it ends; one left by a demo that was killed with
    SIGKILL (its children are gone too: PR_SET_PDEATHSIG) is removed by the next demo."""
    from nicemu.supervisor import _listening_paths
    from nicemu.topology import default_runtime_dir, ensure_private_dir

    mine = default_runtime_dir(f"{kind}-{os.getpid()}")
    created_parent = not mine.parent.exists()
    parent = ensure_private_dir(mine.parent)
    listening = _listening_paths() or set()
    for old in parent.glob(f"{kind}-*"):
        pid = old.name[len(kind) + 1 :]
        if not pid.isdigit() or Path(f"/proc/{pid}").exists():
            continue  # that demo is still running
        if any(str(sock) in listening for sock in old.glob("*.sock")):
            continue  # something still serves there: not ours to remove
        if (old / PARENT_MARK).exists():
            created_parent = True  # it would have removed the parent: we do it in its place
        shutil.rmtree(old, ignore_errors=True)
    for attempt in range(5):
        try:
            ensure_private_dir(mine)
            break
        except FileNotFoundError:  # another run removed the (empty) parent just now: again
            if attempt == 4:
                raise
            created_parent = True
    if created_parent:
        (mine / PARENT_MARK).touch()
    return mine, created_parent


def remove_parent_if_empty(run_dir: Path) -> None:
    """Remove the per-user parent of `run_dir` if it is empty. rmdir removes only an empty
    directory, atomically: a parent that another run (a demo, `nicemu up`) has put anything
    in is left alone. A run that made the parent and is about to make its own directory in
    it may lose the parent in between; run_directory retries for that case."""
    with contextlib.suppress(OSError):  # not empty, or already gone: either way, not ours
        os.rmdir(run_dir.parent)



class Reaper:
    """A watcher process that removes a run's directory once this process is gone, however it
    ends: kill -9 included, when nothing of ours runs any more. It waits on a pipe whose only
    writer is this process (and children forked from it, which die with it: die_with);
    end-of-file means we are gone. `close()` at a normal end tells it that we cleaned up
    ourselves, and reaps it.

    Forked before any thread starts (fork with threads is unsafe); its own session, so a
    Ctrl-C in the terminal does not kill it before it has done its job; stdio on /dev/null, so
    that it holds no pipe of whoever reads our output."""

    LINGER = (0.3, 1.5)  # s after our death: remove, then once more after the children's exits

    def __init__(self, path: Path, remove_parent: bool) -> None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the watcher
            code = 0
            try:
                os.close(w)
                os.setsid()
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                os.closerange(3, r)
                os.closerange(r + 1, 1 << 16)
                last = b""
                while chunk := os.read(r, 64):
                    last = chunk
                if not last.endswith(b"x"):  # died without saying it had cleaned up
                    for pause in self.LINGER:
                        time.sleep(pause)  # its children are stopping (PR_SET_PDEATHSIG)
                        shutil.rmtree(path, ignore_errors=True)
                shutil.rmtree(path, ignore_errors=True)
                if remove_parent:
                    remove_parent_if_empty(path)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(r)
        self.pid, self._w = pid, w

    def close(self) -> None:
        """We cleaned up: the watcher removes what is left (nothing, normally) and exits now."""
        if self._w is None:
            return
        with contextlib.suppress(OSError):
            os.write(self._w, b"x")
        os.close(self._w)
        self._w = None
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


@contextlib.contextmanager
def reaped_tempdir(kind: str = "_bench") -> Iterator[Path]:
    """A run directory (run_directory(kind)) that is this process's tempfile.tempdir while the
    block runs, removed at its end and, if this process is killed with SIGKILL, by a Reaper.
    What a benchmark makes with tempfile (its sockets, its run directories) goes in there, so
    that nothing stays behind however it ends. Enter it before any thread starts (the Reaper
    forks)."""
    run_dir, made_parent = run_directory(kind)
    reaper = Reaper(run_dir, made_parent)
    saved, tempfile.tempdir = tempfile.tempdir, str(run_dir)
    try:
        yield run_dir
    finally:
        tempfile.tempdir = saved
        shutil.rmtree(run_dir, ignore_errors=True)
        if made_parent:
            remove_parent_if_empty(run_dir)
        reaper.close()
