"""`hosts:` and `applications:` in a topology (issue 8): checked with the rest of the file, and
`nicemu up` starting emulators, then kstack kernels, then applications, and stopping them all.

Validation tests parse YAML in this process; the others run `python -m nicemu up` for real and
check afterwards that no process, socket or runtime directory is left, whichever way it ended.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nicemu import topology as T
from nicemu import topology_hosts as H
from nicemu.topology import TopologyError
from test_up import (CONFIGS, ROOT, START_TIMEOUT, STOP_TIMEOUT, alive, assert_refused_before_starting,
                     children_of, run_nicemu, start_up, wait_for, write_config)  # noqa: F401 (fixture)

DEVICES = """
devices:
  nic0: {}
  nic1: {}
  nic2: {}
cables:
  - kind: pair
    ends: [nic0, nic1]
"""

GOOD_HOSTS = """
hosts:
  a:
    interfaces:
      eth0: {device: nic0, addresses: [198.18.0.1/24]}
    routes: [{to: 0.0.0.0/0, via: 198.18.0.254}]
  b:
    interfaces:
      eth0: {device: nic1, mode: interrupt, addresses: [198.18.0.2/24]}
applications:
  - {name: echo, host: b, run: udp_echo, args: ["--port", 7]}
  - {name: ping, host: a, run: ping, args: ["-c", "3", "198.18.0.2"], wait: true}
"""


def parse(text: str) -> T.Topology:
    return T.parse(textwrap.dedent(text), source="test.yaml", runtime_dir="/tmp/nicemu-test-rt")


def one_problem(text: str, path: str, *fragments: str) -> T.Problem:
    """Exactly one problem, at `path`, on one line, whose message has every fragment."""
    with pytest.raises(TopologyError) as ei:
        parse(text)
    ps = ei.value.problems
    assert len(ps) == 1, "\n".join(map(str, ps))
    p = ps[0]
    assert p.path == path, str(p)
    assert "\n" not in str(p)
    for f in fragments:
        assert f in p.message, str(p)
    return p


def hosts(body: str) -> str:
    return DEVICES + textwrap.dedent(body)


# --- the schema -------------------------------------------------------------------------------


def test_hosts_and_applications_are_parsed_with_defaults() -> None:
    topo = parse(DEVICES + GOOD_HOSTS)
    a, b = topo.hosts["a"], topo.hosts["b"]
    assert a.interfaces["eth0"] == H.InterfaceSpec("eth0", "nic0", "napi", ("198.18.0.1/24",))
    assert b.interfaces["eth0"].mode == "interrupt"
    assert a.routes == (H.RouteSpec("0.0.0.0/0", "198.18.0.254", None),)
    assert not a.forward and a.capture == {}
    assert a.syscall_socket == Path("/tmp/nicemu-test-rt/kernel-a.sock")
    assert a.syscall_socket in topo.socket_paths()
    echo, ping = topo.applications
    assert (echo.name, echo.host, echo.run, echo.args, echo.wait) == ("echo", "b", "udp_echo", ("--port", "7"), False)
    assert ping.wait and ping.timeout == H.DEFAULT_APP_TIMEOUT


def test_a_topology_without_hosts_has_none() -> None:
    topo = parse(DEVICES)
    assert topo.hosts == {} and topo.applications == ()


def test_kernel_and_app_commands() -> None:
    topo = parse(DEVICES.replace("nic0: {}", "nic0: {driver: {rx_ring_size: 512}}") + GOOD_HOSTS)
    cmd = H.kernel_command(topo, topo.hosts["a"])
    assert cmd[:3] == [sys.executable, "-m", "kstack.kernel"]
    assert "/tmp/nicemu-test-rt/nic0.sock,name=eth0,mode=napi,rx_ring=512" in cmd
    assert cmd[cmd.index("--addr") + 1] == "eth0=198.18.0.1/24"
    assert cmd[cmd.index("--route") + 1] == "0.0.0.0/0,via=198.18.0.254"
    assert cmd[cmd.index("--syscall-socket") + 1] == "/tmp/nicemu-test-rt/kernel-a.sock"
    assert "--forward" not in cmd
    assert H.app_command(topo.applications[1]) == [sys.executable, "-m", "kstack.apps.ping", "-c", "3",
                                                    "198.18.0.2"]


def test_the_registry_names_only_shipped_apps() -> None:
    assert set(H.APPS) == {"ping", "udp_echo", "udp_send", "udp_sink"}
    for kind in H.APPS.values():
        assert (ROOT / (kind.module.replace(".", "/") + ".py")).is_file()


# --- every rule: one problem, one line, naming its key ---------------------------------------------


IF_A = "a:\n    interfaces:\n      eth0: {device: nic0, addresses: [198.18.0.1/24]}\n"

RULES = [
    # (hosts/applications YAML, key path, fragments)
    ("hosts:\n  a:\n    interfaces:\n      eth0: {device: nic9}\n",
     "hosts.a.interfaces.eth0.device", ["unknown device 'nic9'", "did you mean", "devices: nic0, nic1, nic2"]),
    ("hosts:\n  a:\n    interfaces:\n      eth0: {device: nic0}\n  b:\n    interfaces:\n      eth0: {device: nic0}\n",
     "hosts.b.interfaces.eth0.device", ["already driven by hosts.a.interfaces.eth0"]),
    ("hosts:\n  a:\n    interfaces:\n      eth0: {device: nic0}\n      eth1: {device: nic0}\n",
     "hosts.a.interfaces.eth1.device", ["already driven"]),
    ("hosts:\n  a:\n    interfaces:\n      eth0: {device: nic0, mode: polling}\n",
     "hosts.a.interfaces.eth0.mode", ["napi, interrupt"]),
    ("hosts:\n  a:\n    interfaces:\n      eth0: {device: nic0, addresses: [10.0.0.1/24]}\n",
     "hosts.a.interfaces.eth0.addresses[0]", ["outside 198.18.0.0/15"]),
    ("hosts:\n  a:\n    interfaces:\n      eth0: {device: nic0, addresses: [198.18.0.1/8]}\n",
     "hosts.a.interfaces.eth0.addresses[0]", ["outside 198.18.0.0/15"]),
    ("hosts:\n  a:\n    interfaces:\n      eth0: {device: nic0, addresses: [198.18.0.1]}\n",
     "hosts.a.interfaces.eth0.addresses[0]", ["prefix length"]),
    ("hosts:\n  a:\n    interfaces:\n      eth0: {device: nic0, addresses: [198.18.0.300/24]}\n",
     "hosts.a.interfaces.eth0.addresses[0]", ["not an IPv4 prefix"]),
    ("hosts:\n  a:\n    interfaces:\n      eth0: {device: nic0, addresses: [198.18.0.255/24]}\n",
     "hosts.a.interfaces.eth0.addresses[0]", ["broadcast"]),
    ("hosts:\n  a:\n    interfaces:\n      eth0: {device: nic0, addresses: [198.18.0.1/24]}\n"
     "  b:\n    interfaces:\n      eth0: {device: nic1, addresses: [198.18.0.1/24]}\n",
     "hosts.b.interfaces.eth0.addresses[0]", ["also hosts.a.interfaces.eth0.addresses[0]"]),
    ("hosts:\n  a:\n    interfaces: {}\n", "hosts.a.interfaces", ["at least one interface"]),
    ("hosts:\n  a: {}\n", "hosts.a.interfaces", ["missing"]),
    ("hosts:\n  a:\n    interfaces:\n      eth0: {device: nic0, adresses: []}\n",
     "hosts.a.interfaces.eth0.adresses", ["did you mean 'addresses'"]),
    ("hosts:\n  a:\n    interfacs: {}\n    interfaces:\n      eth0: {device: nic0}\n",
     "hosts.a.interfacs", ["did you mean 'interfaces'"]),
    ("hosts:\n  a:\n    interfaces:\n      this-name-is-too-long: {device: nic0}\n",
     "hosts.a.interfaces.this-name-is-too-long", ["at most 15"]),
    ("hosts:\n  " + IF_A + "    routes: [{to: 0.0.0.0/0, via: 198.18.5.1}]\n",
     "hosts.a.routes[0].via", ["not on a connected network", "198.18.0.0/24 (eth0)"]),
    ("hosts:\n  " + IF_A + "    routes: [{to: 0.0.0.0/0, via: 10.0.0.1}]\n",
     "hosts.a.routes[0].via", ["outside 198.18.0.0/15"]),
    ("hosts:\n  " + IF_A + "    routes: [{to: 0.0.0.0/0, via: 198.18.0.1}]\n",
     "hosts.a.routes[0].via", ["an address of this host"]),
    ("hosts:\n  " + IF_A + "    routes: [{to: 198.18.2.1/24, via: 198.18.0.254}]\n",
     "hosts.a.routes[0].to", ["host bits set"]),
    ("hosts:\n  " + IF_A + "    routes: [{to: 198.18.2.0/24}]\n",
     "hosts.a.routes[0]", ["`via`", "`dev`"]),
    ("hosts:\n  " + IF_A + "    routes: [{to: 198.18.2.0/24, dev: eth9}]\n",
     "hosts.a.routes[0].dev", ["unknown interface"]),
    ("hosts:\n  " + IF_A + "    routes: [{via: 198.18.0.254}]\n", "hosts.a.routes[0].to", ["missing"]),
    ("hosts:\n  " + IF_A + "    routes: [{to: default, via: 198.18.0.254}, {to: 0.0.0.0/0, via: 198.18.0.253}]\n",
     "hosts.a.routes[1].to", ["also the destination of routes[0]"]),
    ("hosts:\n  " + IF_A + "    routes: 198.18.0.254\n", "hosts.a.routes", ["must be a list"]),
    ("hosts:\n  " + IF_A + "    forward: yes please\n", "hosts.a.forward", ["true or false"]),
    ("hosts:\n  " + IF_A + "    capture: {eth1: a.pcap}\n", "hosts.a.capture.eth1", ["interface of this host"]),
    ("hosts:\n  " + IF_A + "applications:\n  - {host: a, run: pong}\n",
     "applications[0].run", ["unknown application 'pong'", "did you mean 'ping'", "ping, udp_echo"]),
    ("hosts:\n  " + IF_A + "applications:\n  - {host: a, run: /bin/sh}\n",
     "applications[0].run", ["unknown application"]),
    ("hosts:\n  " + IF_A + "applications:\n  - {host: c, run: ping}\n",
     "applications[0].host", ["unknown host 'c'"]),
    ("hosts:\n  " + IF_A + "applications:\n  - {run: ping}\n", "applications[0].host", ["missing"]),
    ("hosts:\n  " + IF_A + "applications:\n  - {host: a, run: ping}\n  - {host: a, run: ping}\n",
     "applications[1].name", ["also the name of applications[0]"]),
    ("hosts:\n  " + IF_A + "applications:\n  - {host: a, run: ping, args: [--kernel, /tmp/x]}\n",
     "applications[0].args[0]", ["set by nicemu up"]),
    ("hosts:\n  " + IF_A + "applications:\n  - {host: a, run: ping, args: \"-c 3\"}\n",
     "applications[0].args", ["must be a list"]),
    ("hosts:\n  " + IF_A + "applications:\n  - {host: a, run: ping, args: [[1]]}\n",
     "applications[0].args[0]", ["a text or a number"]),
    ("hosts:\n  " + IF_A + "applications:\n  - {host: a, run: ping, wait: maybe}\n",
     "applications[0].wait", ["true or false"]),
    ("hosts:\n  " + IF_A + "applications:\n  - {host: a, run: ping, timeout: 5}\n",
     "applications[0].timeout", ["wait: true"]),
    ("hosts:\n  " + IF_A + "applications:\n  - {host: a, run: ping, wait: true, timeout: 0}\n",
     "applications[0].timeout", ["at least"]),
    ("hosts:\n  " + IF_A + "applications:\n  - {host: a, run: ping, command: rm}\n",
     "applications[0].command", ["unknown key"]),
    ("hosts:\n  " + IF_A + "applications: {ping: a}\n", "applications", ["must be a list"]),
    ("hosts: [a, b]\n", "hosts", ["must be a mapping"]),
]


@pytest.mark.parametrize("body, path, fragments", RULES, ids=[r[1] + ":" + r[2][0][:20] for r in RULES])
def test_each_rule_is_one_line_naming_its_key(body: str, path: str, fragments: list[str]) -> None:
    one_problem(DEVICES + body, path, *fragments)


def test_a_capture_file_used_twice_is_refused() -> None:
    text = DEVICES.replace("ends: [nic0, nic1]", "ends: [nic0, nic1]\n    capture: {nic0: x.pcap}") + \
        "hosts:\n  " + IF_A + "    capture: {eth0: x.pcap}\n"
    one_problem(text, "hosts.a.capture.eth0", "also used by cables[0].capture.nic0")


def test_a_syscall_socket_that_collides_with_a_device_socket_is_refused() -> None:
    text = DEVICES.replace("nic2: {}", "kernel-a: {}") + "hosts:\n  " + IF_A
    one_problem(text, "hosts.a (its syscall socket)", "also used by devices.kernel-a.socket")


def test_limits_on_hosts_applications_and_arguments() -> None:
    many_devs = "devices:\n" + "".join(f"  n{i}: {{process: one}}\n" for i in range(H.MAX_HOSTS + 1))
    many_hosts = "hosts:\n" + "".join(f"  h{i}:\n    interfaces:\n      eth0: {{device: n{i}}}\n"
                                      for i in range(H.MAX_HOSTS + 1))
    one_problem(many_devs + many_hosts, "hosts", f"at most {H.MAX_HOSTS}")
    apps = "applications:\n" + "".join(f"  - {{name: p{i}, host: a, run: ping}}\n"
                                       for i in range(H.MAX_APPLICATIONS + 1))
    one_problem(DEVICES + "hosts:\n  " + IF_A + apps, "applications", f"at most {H.MAX_APPLICATIONS}")
    args = "[" + ", ".join(["-q"] * (H.MAX_ARGS + 1)) + "]"
    one_problem(DEVICES + "hosts:\n  " + IF_A + f"applications:\n  - {{host: a, run: ping, args: {args}}}\n",
                "applications[0].args", f"at most {H.MAX_ARGS}")
    long_arg = "x" * (H.MAX_ARG_CHARS + 1)
    p = one_problem(DEVICES + "hosts:\n  " + IF_A + f"applications:\n  - {{host: a, run: ping, args: [{long_arg}]}}\n",
                    "applications[0].args[0]", f"at most {H.MAX_ARG_CHARS}")
    assert len(str(p)) < 300  # quoted shortened, never whole


def test_every_host_problem_is_reported_at_once() -> None:
    text = DEVICES + textwrap.dedent("""
        hosts:
          a:
            interfaces:
              eth0: {device: nic9, addresses: [10.1.1.1/24]}
        applications:
          - {host: a, run: pong}
        """)
    with pytest.raises(TopologyError) as ei:
        parse(text)
    paths = [p.path for p in ei.value.problems]
    assert paths == ["hosts.a.interfaces.eth0.device", "hosts.a.interfaces.eth0.addresses[0]",
                     "applications[0].run"], paths


# --- up --check and the host checks ----------------------------------------------------------


@pytest.mark.parametrize("name", ["hosts-pair", "hosts-router"])
def test_up_check_on_the_examples(tmp_path: Path, name: str) -> None:
    r = run_nicemu(tmp_path, "up", str(CONFIGS / f"{name}.yaml"), "--check", "--runtime-dir", str(tmp_path / "rt"))
    assert r.returncode == 0, r.stderr
    assert "config OK" in r.stdout
    assert f"host a: kernel with syscall socket {tmp_path / 'rt' / 'kernel-a.sock'}" in r.stdout
    assert "applications[1] ping on a: ping -c 3" in r.stdout
    assert not (tmp_path / "rt").exists()
    topo = T.load(CONFIGS / f"{name}.yaml")
    assert len(topo.hosts) == (2 if name == "hosts-pair" else 3)
    if name == "hosts-router":
        assert topo.hosts["r"].forward and len(topo.hosts["r"].interfaces) == 2


def test_up_and_check_refuse_a_bad_host_alike(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, DEVICES + "hosts:\n  a:\n    interfaces:\n"
                                           "      eth0: {device: nic0, addresses: [192.168.1.1/24]}\n")
    err = assert_refused_before_starting(tmp_path, cfg, "hosts.a.interfaces.eth0.addresses[0]",
                                         "--runtime-dir", str(tmp_path / "rt"))
    assert "outside 198.18.0.0/15" in err


def test_up_refuses_a_file_where_a_syscall_socket_goes(tmp_path: Path) -> None:
    rt = tmp_path / "rt"
    rt.mkdir(mode=0o700)
    (rt / "kernel-a.sock").write_text("mine")
    cfg = write_config(tmp_path, DEVICES + "hosts:\n  " + IF_A)
    assert_refused_before_starting(tmp_path, cfg, "kernel-a.sock exists and is not a socket",
                                   "--runtime-dir", str(rt))
    assert (rt / "kernel-a.sock").read_text() == "mine"


def test_up_refuses_a_host_capture_in_a_missing_directory(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, DEVICES + "hosts:\n  " + IF_A + "    capture: {eth0: nodir/a.pcap}\n")
    assert_refused_before_starting(tmp_path, cfg, "hosts.a.capture.eth0", "--runtime-dir", str(tmp_path / "rt"))


# --- nicemu up with kernels and applications, for real -----------------------------------------


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children_of(todo.pop())
        out += kids
        todo += kids
    return out


def ping_loss(text: str, who: str = "ping") -> str:
    lines = [ln for ln in text.splitlines() if ln.startswith(f"[{who}] ") and "packet loss" in ln]
    assert len(lines) == 1, text
    return lines[0]


def assert_nothing_left(up) -> None:
    for pid in up.children:
        wait_for(lambda: not alive(pid), STOP_TIMEOUT, f"process {pid} to exit")
    wait_for(lambda: not up.rt.exists() or not any(up.rt.rglob("*")), STOP_TIMEOUT,
             "the runtime directory to be empty")


def test_hosts_pair_runs_kernels_and_apps_and_sigterm_stops_everything(start_up, tmp_path: Path) -> None:
    up = start_up(CONFIGS / "hosts-pair.yaml")
    up.wait_up(nprocs=5)  # 2 emulator processes, 2 kernels, the echo server (ping has finished)
    out = up.out
    assert "3 packets transmitted, 3 received, 0% packet loss" in ping_loss(out)
    assert "nicemu up: application 'ping' finished (exit status 0)" in out
    ka, kb = up.rt / "kernel-a.sock", up.rt / "kernel-b.sock"
    assert f"NICEMU_KERNEL={ka} python -m kstack.apps.ping" in out
    assert "[echo] udp_echo: listening on 0.0.0.0:7" in out
    assert out.index("host b: kernel up") < out.index("[echo] udp_echo: listening") < out.index("[ping] PING")
    cmds = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in up.children}
    assert sum(b"kstack.kernel" in c for c in cmds.values()) == 2
    assert sum(b"kstack.apps.udp_echo" in c for c in cmds.values()) == 1

    # By hand, as the printed line says: b pings a through b's kernel.
    r = subprocess.run([sys.executable, "-m", "kstack.apps.ping", "-c", "2", "-i", "0.2", "198.18.0.1"],
                       env={**os.environ, "PYTHONPATH": str(ROOT), "NICEMU_KERNEL": str(kb)},
                       capture_output=True, text=True, timeout=START_TIMEOUT)
    assert r.returncode == 0 and "2 received, 0% packet loss" in r.stdout, r.stdout + r.stderr

    up.signal(signal.SIGTERM)
    assert up.wait() == 0, up.err
    out = up.out
    # stopped in reverse: the application first (it still reports), then the kernels
    assert "[echo] udp_echo: echoed" in out
    assert out.index("[echo] udp_echo: echoed") < out.index('[host a] {"event": "stats"')
    assert out.rstrip().endswith("nicemu up: hosts-pair stopped")
    assert "Traceback" not in out + up.err
    assert_nothing_left(up)
    assert not up.rt.exists()


def test_hosts_router_forwards_between_two_hosts(start_up) -> None:
    up = start_up(CONFIGS / "hosts-router.yaml")
    up.wait_up(nprocs=6)  # 2 emulator processes (one per pair cable), 3 kernels, the echo server
    out = up.out
    assert "0% packet loss" in ping_loss(out)
    assert "ttl=63" in out  # one hop through r
    up.signal(signal.SIGINT)
    assert up.wait() == 0, up.err
    assert_nothing_left(up)


def test_kill_9_of_the_supervisor_leaves_no_process(start_up) -> None:
    up = start_up(CONFIGS / "hosts-pair.yaml")
    up.wait_up(nprocs=5)
    family = descendants(up.proc.pid)
    assert len(family) == 5
    up.signal(signal.SIGKILL)
    up.proc.wait(timeout=STOP_TIMEOUT)
    for pid in family:  # PR_SET_PDEATHSIG: kernels and applications follow, as emulators do
        wait_for(lambda: not alive(pid), STOP_TIMEOUT, f"process {pid} to follow the supervisor")
    try:
        wait_for(lambda: not any(up.rt.rglob("*")), STOP_TIMEOUT, "every socket to be unlinked")
    except AssertionError:
        raise AssertionError(f"left: {list(up.rt.rglob('*'))}\n{up.out}\n{up.err}")


def test_a_failed_wait_app_stops_the_topology(start_up, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, DEVICES + textwrap.dedent("""
        hosts:
          a:
            interfaces:
              eth0: {device: nic0, addresses: [198.18.0.1/24]}
            capture: {eth0: a.pcap}
        applications:
          - {name: lost, host: a, run: ping, args: ["-c", "1", "-W", "1", "198.18.0.9"], wait: true}
          - {name: never, host: a, run: udp_echo}
        """))
    up = start_up(cfg)
    assert up.proc.wait(timeout=START_TIMEOUT + STOP_TIMEOUT) == 1
    assert "1 packets transmitted, 0 received" in ping_loss(up.out, "lost")
    assert "application 'lost'" in up.err and "exited with status 1; stopping" in up.err
    assert "[never]" not in up.out  # the next application never started
    assert (tmp_path / "a.pcap").stat().st_size > 24  # the ARP requests nobody answered
    assert not up.rt.exists()


def test_a_dying_kernel_stops_the_topology(start_up) -> None:
    up = start_up(CONFIGS / "hosts-pair.yaml")
    up.wait_up(nprocs=5)
    kernels = [pid for pid in up.children if b"kstack.kernel" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    os.kill(kernels[0], signal.SIGKILL)
    assert up.wait() == 1
    assert "was killed by SIGKILL; stopping the others" in up.err
    assert_nothing_left(up)  # its syscall socket too, removed by the supervisor
    assert not up.rt.exists()


# --- the seams --------------------------------------------------------------------------------


def test_the_supervisor_and_the_schema_import_neither_kstack_nor_driver() -> None:
    import ast

    topology = sorted(p.relative_to(ROOT / "nicemu").as_posix() for p in (ROOT / "nicemu" / "topology").glob("*.py"))
    for name in (*topology, "topology_hosts.py", "supervisor.py", "supervisor_hosts.py"):
        tree = ast.parse((ROOT / "nicemu" / name).read_text())
        for node in ast.walk(tree):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for m in mods:
                assert m.split(".")[0] not in ("kstack", "driver"), f"nicemu/{name} imports {m}"


def test_the_relay_shows_lines_with_their_owner_and_bounds_a_long_one(monkeypatch) -> None:
    import io

    from nicemu import supervisor_hosts
    from nicemu.supervisor_hosts import LineRelay

    MAX_LINE = 1000  # (the real bound is 1 MiB, more than a pipe holds)
    monkeypatch.setattr(supervisor_hosts, "MAX_LINE", MAX_LINE)

    r, w = os.pipe()
    out, seen = io.StringIO(), []
    relay = LineRelay(r, "[x] ", out, seen.append)
    os.write(w, b"one\ntw")
    assert relay.pump()
    os.write(w, b"o\n" + b"z" * (MAX_LINE + 5))
    relay.pump()
    os.close(w)
    assert not relay.pump() and relay.fd is None
    lines = out.getvalue().splitlines()
    assert lines[:2] == ["[x] one", "[x] two"]
    assert [len(x) for x in lines[2:]] == [4 + MAX_LINE, 4 + 5]  # in pieces, never held whole
    assert seen[:2] == ["one", "two"]


def test_applications_beside_hosts_that_are_not_a_mapping_give_one_line(tmp_path: Path) -> None:
    """Found by the topology fuzzer (seed 20261204): `hosts:` a 6000-digit number beside an
    `applications:` list raised TypeError instead of a one-line problem."""
    from nicemu import topology as T
    f = tmp_path / "t.yaml"
    f.write_text("devices:\n  nic0: {mac: '52:54:00:00:00:0a'}\n  nic1: {mac: '52:54:00:00:00:0b'}\n"
                 "cables:\n- {kind: pair, ends: [nic0, nic1]}\n"
                 "hosts: " + "5" * 6000 + "\napplications:\n- {host: a, run: ping}\n")
    with pytest.raises(T.TopologyError) as e:
        T.check_topology(f)
    assert "hosts (line" in str(e.value) and "6000 digits" in str(e.value)


# Found by the topology fuzzer (seed 20261204 case 167, swap_type): a mapping or a list where a
# name is looked up in a dict (applications[i].host, .run, routes[j].dev) raised "TypeError:
# unhashable type"; every such value is checked to be a text before it is looked up.
UNHASHABLE = [
    ("applications:\n  - {host: {x: 1}, run: ping}\n", "applications[0].host", ["unknown host a mapping"]),
    ("applications:\n  - {host: [a], run: ping}\n", "applications[0].host", ["unknown host a list"]),
    ("applications:\n  - {host: a, run: [ping]}\n", "applications[0].run", ["unknown application a list"]),
    ("applications:\n  - {host: a, run: {ping: 1}}\n", "applications[0].run",
     ["unknown application a mapping"]),
    ("applications:\n  - {host: a, run: !!set {ping}}\n", "applications[0].run", ["unknown application a set"]),
    ("hosts:\n  a:\n    interfaces:\n      eth0: {device: nic0, addresses: [198.18.0.1/24]}\n"
     "    routes: [{to: 0.0.0.0/0, dev: [eth0]}]\n", "hosts.a.routes[0].dev", ["unknown interface a list"]),
    ("hosts:\n  a:\n    interfaces:\n      eth0: {device: nic0, addresses: [198.18.0.1/24]}\n"
     "    routes: [{to: 0.0.0.0/0, dev: {eth0: 1}}]\n", "hosts.a.routes[0].dev",
     ["unknown interface a mapping"]),
    ("hosts:\n  a:\n    interfaces:\n      eth0: {device: nic0, mode: [napi]}\n", "hosts.a.interfaces.eth0.mode",
     ["must be one of napi, interrupt, got a list"]),
]


@pytest.mark.parametrize("body,path,fragments", UNHASHABLE, ids=[u[1] + "-" + str(i) for i, u in
                                                                  enumerate(UNHASHABLE)])
def test_a_mapping_or_list_where_a_name_goes_is_one_line(body: str, path: str, fragments: list[str]) -> None:
    text = DEVICES + body
    if "hosts:" not in body:  # the application's own problem, on a good host
        text += "hosts:\n  a:\n    interfaces:\n      eth0: {device: nic0}\n"
    one_problem(text, path, *fragments)


# Texts that looked right to a `^...$` pattern with `\d`: a trailing newline ("$" matches before
# it) or another script's digits (int() reads them) went on to the kernel's command line as they
# were. Names and addresses are matched whole, in ASCII.
NOT_QUITE_TEXT = [
    ('hosts:\n  "a\\n":\n    interfaces:\n      eth0: {device: nic0}\n', "hosts.'a\\n'", ["a host name"]),
    ('hosts:\n  a:\n    interfaces:\n      "eth0\\n": {device: nic0}\n', "hosts.a.interfaces.'eth0\\n'",
     ["an interface name"]),
    ('hosts:\n  a:\n    interfaces:\n      eth0: {device: nic0, addresses: ["198.18.0.1/24\\n"]}\n',
     "hosts.a.interfaces.eth0.addresses[0]", ["must be an IPv4 address with its prefix length"]),
    ("hosts:\n  a:\n    interfaces:\n      eth0: {device: nic0, addresses: [\u0661\u0669\u0668.18.0.1/24]}\n",
     "hosts.a.interfaces.eth0.addresses[0]", ["must be an IPv4 address with its prefix length"]),
    ('hosts:\n  a:\n    interfaces:\n      eth0: {device: nic0, addresses: [198.18.0.1/24]}\n'
     '    routes: [{to: 0.0.0.0/0, via: "198.18.0.254\\n"}]\n', "hosts.a.routes[0].via",
     ["must be the gateway's IPv4 address"]),
    ('hosts:\n  a:\n    interfaces:\n      eth0: {device: nic0, addresses: [198.18.0.1/24]}\n'
     'applications:\n  - {name: "p\\n", host: a, run: ping}\n', "applications[0].name", ["must be a name"]),
]


@pytest.mark.parametrize("body,path,fragments", NOT_QUITE_TEXT, ids=[str(i) for i in range(len(NOT_QUITE_TEXT))])
def test_a_name_or_address_with_a_newline_or_foreign_digits_is_refused(body: str, path: str,
                                                                        fragments: list[str]) -> None:
    one_problem(DEVICES + body, path, *fragments)


def test_a_tap_namespace_name_is_bounded_and_quoted_short(tmp_path: Path) -> None:
    """Found by the topology fuzzer (seed 40 case 45): a 400-character `netns` passed the schema
    and `nicemu check` quoted it twice, an 884-character problem line."""
    with pytest.raises(TopologyError) as ei:
        parse(f"devices: {{a: {{}}}}\ncables: [{{kind: tap, ends: [a], netns: '{'6' * 400}'}}]\n")
    [p] = ei.value.problems
    assert p.path == "cables[0].netns" and "at most 255" in p.message and len(str(p)) < 200
    ns = "n" * 200  # a name the schema takes, but too long to quote in full
    topo = parse(f"devices: {{a: {{}}}}\ncables: [{{kind: tap, ends: [a], netns: {ns}}}]\n")
    [line] = [str(q) for q in T.check_host(topo) if q.path == "cables[0].netns"]
    assert "there is no network namespace a text of 200 characters" in line and len(line) < 200
