"""Shared helpers for tests that run kstack kernels and applications as real processes.

- `KernelLab` (a `test_driver_process.Lab`): emulators (`emulator_pair()`, or
  `emulator_config(topology)` for a YAML topology with faults, several cables or a TAP),
  kernel processes (`kernel(...)`, waits for its "up" event), applications run to completion
  with a timeout (`app(...)`) or in the background (`app_bg(...)`), and a UDP client
  (`udp_client(...)`).
- `klab_session()`: the body of the `klab` fixture (tests/conftest.py): a KernelLab, closed
  afterwards, checking that every process was reaped, the directory removed and nothing new
  is in /dev/shm.
- `two_kernels(klab, ...)`: two kernels back to back (198.18.0.1/24 and 198.18.0.2/24).
- `ping_summary(text)`: the numbers of iputils' summary line.

Every wait here is bounded: subprocess runs have timeouts, the client's socket calls too.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import uuid
from typing import Any, Iterator

import yaml

from test_driver_process import ENV, MAC0, MAC1, ROOT, Lab, Proc

__all__ = ["ENV", "MAC0", "MAC1", "ROOT", "KernelLab", "Proc", "klab_session", "shm_entries",
           "two_kernels", "ping_summary", "UDP_CLIENT", "APP_TIMEOUT", "ip", "NetnsPeer"]

APP_TIMEOUT = 60.0  # seconds any application may take before the test fails (never a hang)


def shm_entries() -> set[str]:
    try:
        return {n for n in os.listdir("/dev/shm") if "nicemu" in n or "kstack" in n}
    except OSError:
        return set()


# A UDP client over kstack.socket, run as its own process: sends each payload (hex, argv[4:])
# to HOST PORT and waits for its echo; one JSON line: sent, echoed (byte-exact, in order of
# sending), lost and wrong (an echo that was not the payload sent).
UDP_CLIENT = textwrap.dedent(
    """
    import json, sys
    from kstack import socket as ks
    path, host, port, wait = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    payloads = [bytes.fromhex(x) for x in sys.argv[5].split(",")] if sys.argv[5] else []
    ks.connect_kernel(path)
    s = ks.socket(ks.AF_INET, ks.SOCK_DGRAM)
    s.settimeout(wait)
    out = {"sent": 0, "echoed": 0, "lost": 0, "wrong": 0, "sizes": []}
    for p in payloads:
        s.sendto(p, (host, port))
        out["sent"] += 1
        while True:
            try:
                data, addr = s.recvfrom(65535)
            except TimeoutError:
                out["lost"] += 1
                break
            if data == p and addr == (host, port):
                out["echoed"] += 1
                out["sizes"].append(len(data))
                break
            out["wrong"] += 1  # a late echo of an earlier payload, or garbage
    s.close()
    print(json.dumps(out), flush=True)
    """
)


def payloads(sizes: list[int], seed: int = 0) -> list[bytes]:
    """Distinct, recognisable payloads of the given sizes."""
    out = []
    for i, n in enumerate(sizes):
        head = f"kstack-{seed}-{i}-".encode()
        body = bytes((i * 7 + k * 13 + seed) & 0xFF for k in range(max(0, n - len(head))))
        out.append((head + body)[:n])
    return out


class KernelLab(Lab):
    """A Lab with kstack kernels, applications and topologies from YAML."""

    def kernel(self, *args: str, name: str = "kernel") -> Proc:
        p = self.start([sys.executable, "-m", "kstack.kernel", *args], name)
        p.up = p.event("up")
        return p

    def app(self, *args: str, timeout: float = APP_TIMEOUT) -> subprocess.CompletedProcess:
        """`python -m ARGS...` run to completion (a timeout fails the test, never hangs it)."""
        return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                              env=ENV, cwd=ROOT, timeout=timeout)

    def app_bg(self, *args: str, name: str = "app", ready: str | None = None) -> Proc:
        """`python -m ARGS...` in the background; waits for a line starting with `ready`."""
        p = self.start([sys.executable, "-m", *args], name)
        if ready is not None:
            p.line(lambda ln: ln.startswith(ready))
        return p

    def udp_client(self, kernel_sock: str, host: str, port: int, data: list[bytes],
                   wait: float = 5.0, timeout: float = APP_TIMEOUT) -> dict[str, Any]:
        r = subprocess.run([sys.executable, "-c", UDP_CLIENT, kernel_sock, host, str(port), str(wait),
                            ",".join(d.hex() for d in data)],
                           capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout)
        assert r.returncode == 0, r.stdout + r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])

    def emulator_config(self, topology: dict | str, name: str = "topo") -> dict[str, str]:
        """One `nicemu serve --config` process running the whole topology (a dict, or the path
        of a YAML file), with this lab's directory as its runtime directory; returns each
        device's socket path."""
        if isinstance(topology, dict):
            text = yaml.safe_dump({k: v for k, v in topology.items() if k not in ("name", "runtime_dir")},
                                  sort_keys=False)
        else:  # the file's text as it is (PyYAML would read an unquoted MAC as a number)
            with open(topology) as f:
                text = "".join(ln for ln in f if not ln.startswith(("name:", "runtime_dir:")))
        devices = yaml.safe_load(text)["devices"]
        path = self.dir / f"{name}.yaml"
        path.write_text(f"name: {name}\nruntime_dir: {self.dir}\n{text}")
        emu = self.start([sys.executable, "-m", "nicemu", "serve", "--config", str(path)], f"emulator-{name}")
        emu.line(lambda ln: ln == "nicemu: ready", timeout=30)
        self.emu = emu
        return {dev: str(self.dir / f"{dev}.sock") for dev in devices}


def klab_session() -> Iterator[KernelLab]:
    shm_before = shm_entries()
    lb = KernelLab()
    try:
        yield lb
    finally:
        lb.close()
    assert all(p.p.poll() is not None for p in lb.procs)
    assert not lb.dir.exists()
    assert shm_entries() <= shm_before


def two_kernels(klab: KernelLab, mode_a: str = "napi", mode_b: str = "interrupt",
                pcap: bool = False, sockets: tuple[str, str] | None = None) -> tuple[Proc, Proc, str, str]:
    """Kernels a (198.18.0.1/24) and b (198.18.0.2/24) on two devices back to back (a new
    emulator pair, or the given device sockets); returns them and their syscall sockets."""
    a, b = sockets if sockets is not None else klab.emulator_pair()
    ka_sock, kb_sock = str(klab.dir / "ka.sock"), str(klab.dir / "kb.sock")
    extra = ["--pcap", f"eth0={klab.dir / 'a.pcap'}"] if pcap else []
    ka = klab.kernel("--device", f"{a},name=eth0,mode={mode_a}", "--addr", "eth0=198.18.0.1/24",
                     "--syscall-socket", ka_sock, *extra, name="kernel-a")
    kb = klab.kernel("--device", f"{b},name=eth0,mode={mode_b}", "--addr", "eth0=198.18.0.2/24",
                     "--syscall-socket", kb_sock, name="kernel-b")
    return ka, kb, ka_sock, kb_sock


_SUMMARY = re.compile(r"^(\d+) packets transmitted, (\d+) received, (?:\+(\d+) errors, )?"
                      r"([\d.]+)% packet loss, time \d+ms$", re.M)


def ping_summary(text: str) -> dict[str, float]:
    """iputils' summary line: transmitted, received, errors, loss (percent)."""
    m = _SUMMARY.search(text)
    assert m, f"no ping summary line in {text!r}"
    return {"transmitted": int(m[1]), "received": int(m[2]), "errors": int(m[3] or 0),
            "loss": float(m[4])}


# --- a Linux peer in a network namespace (test_kstack_linux, test_kstack_tcp_linux) ---------------

def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


class NetnsPeer:
    """A namespace with a TAP whose other side is the emulated device, and a kstack kernel on
    that device (its eth0 captured to `pcap`)."""

    def __init__(self, klab: KernelLab) -> None:
        self.klab = klab
        self.ns = f"nicemu-test-{uuid.uuid4().hex[:8]}"
        self.tap = f"nmk{uuid.uuid4().hex[:8]}"
        self.pcap = klab.dir / "kstack.pcap"  # kstack's --pcap: what its eth0 sees
        self.ksock = str(klab.dir / "k.sock")
        ip("netns", "add", self.ns)

    def start_kernel(self, mode: str, linux: str, kstack: str, **cable_extra: Any) -> None:
        """The emulator with the TAP cable (and `cable_extra`: faults, capture), `linux`/24 on
        the TAP in the namespace, then the kernel with `kstack`/24 on eth0."""
        cable = {"kind": "tap", "ends": ["k0"], "name": self.tap, "netns": self.ns, **cable_extra}
        socks = self.klab.emulator_config({"devices": {"k0": {"mac": MAC0}}, "cables": [cable]},
                                          name="linux")
        for cmd in (["ip", "addr", "add", f"{linux}/24", "dev", self.tap],
                    ["ip", "link", "set", "dev", self.tap, "up"],
                    ["ip", "link", "set", "dev", "lo", "up"]):
            r = self.run(*cmd)
            assert r.returncode == 0, r.stderr
        self.k = self.klab.kernel("--device", f"{socks['k0']},name=eth0,mode={mode}",
                                  "--addr", f"eth0={kstack}/24", "--syscall-socket", self.ksock,
                                  "--pcap", f"eth0={self.pcap}", name="kernel")

    def run(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns, *cmd], capture_output=True, text=True,
                              timeout=timeout, env=ENV, cwd=ROOT)

    def counters(self, *files: str) -> dict[str, int]:
        """Linux's /proc/net/snmp-style tables in the namespace, as nstat names them
        (IpReasmOKs, TcpExtTCPSACKReorder, ...)."""
        out: dict[str, int] = {}
        for f in files:
            lines = self.run("cat", f).stdout.splitlines()
            for names, values in zip(lines[::2], lines[1::2]):
                proto, *keys = names.split()
                _, *vals = values.split()
                for k, v in zip(keys, vals):
                    if v.lstrip("-").isdigit():
                        out[proto.rstrip(":") + k] = int(v)
        return out

    def close(self) -> None:
        self.klab.close()  # every process: the emulator's exit closes (and so removes) the TAP
        ip("netns", "del", self.ns, check=False)
