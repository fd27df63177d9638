"""Topology validation: every mistake named by its key path and reason, all reported at once."""
from __future__ import annotations

import os
import stat
import textwrap
from pathlib import Path

import pytest

from nicemu import topology as T
from nicemu.private_dir import PrivateDirError, check_private_dir, private_dir_problem
from nicemu.topology import TopologyError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def parse(text: str, **kw) -> T.Topology:
    kw.setdefault("runtime_dir", "/tmp/nicemu-test-rt")
    return T.parse(textwrap.dedent(text), source="test.yaml", **kw)


def problems(text: str, **kw) -> list[T.Problem]:
    with pytest.raises(TopologyError) as ei:
        parse(text, **kw)
    return ei.value.problems


def one_problem(text: str, path: str, *fragments: str) -> T.Problem:
    """Exactly one problem, at `path`, whose message contains every fragment."""
    ps = problems(text)
    assert len(ps) == 1, "\n".join(map(str, ps))
    p = ps[0]
    assert p.path == path, str(p)
    for f in fragments:
        assert f in p.message, str(p)
    return p


PAIR = """
devices:
  nic0: {mac: "52:54:00:12:34:56"}
  nic1: {mac: "52:54:00:12:34:57"}
cables:
  - kind: pair
    ends: [nic0, nic1]
"""


# --- the example configs ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pair", "shm", "unix", "udp", "tap", "faults"])
def test_example_configs_are_valid(name: str) -> None:
    topo = T.load(CONFIGS / f"{name}.yaml")
    assert topo.name == name
    assert topo.runtime_dir == Path(f"/tmp/nicemu-{os.getuid()}/{name}")
    assert topo.source == (CONFIGS / f"{name}.yaml").resolve()
    assert topo.devices
    kinds = {c.kind for c in topo.cables}
    assert kinds == ({"pair"} if name == "faults" else {name})


def test_every_cable_kind_has_an_example() -> None:
    kinds = set()
    for f in CONFIGS.glob("*.yaml"):
        kinds |= {c.kind for c in T.load(f).cables}
    assert kinds == set(T.CABLE_KINDS)
    faulty = T.load(CONFIGS / "faults.yaml").cables[0]
    assert faulty.capture and faulty.faults


# --- defaults -----------------------------------------------------------------------------


def test_defaults_are_filled_in() -> None:
    topo = parse("devices:\n  a: {}\n  b:\n")
    a, b = topo.devices["a"], topo.devices["b"]
    assert (a.mac, b.mac) == ("52:54:00:12:34:56", "52:54:00:12:34:57")  # QEMU's, counting up
    assert a.socket == Path("/tmp/nicemu-test-rt/a.sock")
    assert (a.pba_rx_kb, a.pba_tx_kb, a.pba) == (48, 16, 0x00100030)  # the 82540EM reset value
    assert a.engine == "auto"
    assert topo.processes == {"a": ("a",), "b": ("b",)}  # one process per device
    assert topo.cables == ()


def test_runtime_dir_default_and_relative_sockets() -> None:
    topo = T.parse("name: lab\ndevices:\n  a: {socket: sub/a.sock}\n", source="x")
    assert topo.runtime_dir == Path(f"/tmp/nicemu-{os.getuid()}/lab")
    assert topo.devices["a"].socket == topo.runtime_dir / "sub/a.sock"
    topo = T.parse("runtime_dir: /tmp/elsewhere\ndevices:\n  a: {socket: /run/x/a.sock}\n", source="x")
    assert topo.runtime_dir == Path("/tmp/elsewhere")
    assert topo.devices["a"].socket == Path("/run/x/a.sock")


def test_runtime_dir_override_wins(tmp_path: Path) -> None:
    topo = T.parse("runtime_dir: /tmp/from-config\ndevices: {a: {}}\n", runtime_dir=tmp_path)
    assert topo.runtime_dir == tmp_path and topo.devices["a"].socket == tmp_path / "a.sock"


def test_capture_paths_are_relative_to_cwd(tmp_path: Path) -> None:
    topo = T.parse(PAIR + "    capture: {nic0: out/n0.pcap}\n", cwd=tmp_path)
    assert topo.cables[0].capture == {"nic0": tmp_path / "out/n0.pcap"}


def test_unquoted_mac_stays_a_string() -> None:
    # YAML 1.1 would read 52:54:00:12:34:56 as a base-60 integer.
    topo = parse("devices:\n  a: {mac: 52:54:00:12:34:56}\n  b: {mac: 52-54-00-AB-CD-EF}\n")
    assert topo.devices["a"].mac == "52:54:00:12:34:56"
    assert topo.devices["b"].mac == "52:54:00:ab:cd:ef"


def test_numbers_still_parse_as_numbers() -> None:
    topo = parse(PAIR + "    faults: {nic0: {drop: 0.25, delay_ms: 1e1, seed: 0x10, limit: 1_000}}\n")
    f = topo.cables[0].faults["nic0"]
    assert (f.drop, f.delay_ms, f.seed, f.limit) == (0.25, 10.0, 16, 1000)


def test_pba_one_side_leaves_the_rest_to_the_other() -> None:
    topo = parse("devices:\n  a: {pba: {rx_kb: 40}}\n  b: {pba: {tx_kb: 8}}\n  c: {pba: {rx_kb: 30, tx_kb: 20}}\n")
    assert (topo.devices["a"].pba_rx_kb, topo.devices["a"].pba_tx_kb) == (40, 24)
    assert (topo.devices["b"].pba_rx_kb, topo.devices["b"].pba_tx_kb) == (56, 8)
    assert topo.devices["c"].pba == (20 << 16) | 30


def test_sizes_and_rates_accept_units() -> None:
    topo = parse("""
        devices: {a: {}, b: {}, c: {}}
        cables:
          - {kind: shm, ends: [a, b], ring_bytes: 256KiB, faults: {a: {rate_bps: 1.5G}, b: {rate_bps: 10k}}}
    """)
    c = topo.cables[0]
    assert c.ring_bytes == 256 * 1024
    assert c.faults["a"].rate_bps == 1_500_000_000 and c.faults["b"].rate_bps == 10_000
    assert parse("devices: {a: {}, b: {}}\ncables: [{kind: shm, ends: [a, b]}]").cables[0].ring_bytes == 1 << 20


def test_fault_seed_defaults_are_fixed_per_direction() -> None:
    text = PAIR + "    faults: {nic0: {drop: 0.1}, nic1: {drop: 0.1}}\n"
    f1, f2 = parse(text).cables[0].faults, parse(text).cables[0].faults
    assert f1 == f2  # the same config injects the same faults on every run
    assert f1["nic0"].seed != f1["nic1"].seed


def test_fault_spec_is_what_the_fault_injector_takes() -> None:
    from nicemu.cable.faults import FaultConfig

    topo = parse(PAIR + "    faults: {nic0: {drop: 0.1, corrupt: 0.2, corrupt_bits: 3, duplicate: 0.3, "
                        "reorder: 0.4, reorder_timeout_ms: 5, delay_ms: 2, rate_bps: 1M, "
                        "overhead_bytes: 20, limit: 64, seed: 7}}\n")
    cfg = FaultConfig(**topo.cables[0].faults["nic0"].kwargs())
    assert (cfg.drop, cfg.corrupt_bits, cfg.rate_bps, cfg.limit, cfg.seed) == (0.1, 3, 1_000_000, 64, 7)
    assert FaultConfig(**T.FaultSpec().kwargs()) == FaultConfig(seed=0)


# --- process groups -------------------------------------------------------------------------


def test_pair_devices_share_a_process() -> None:
    topo = parse("""
        devices: {a: {}, b: {}, c: {}, d: {}}
        cables:
          - {kind: pair, ends: [b, c]}
          - {kind: unix, ends: [a, d]}
    """)
    assert topo.processes == {"a": ("a",), "b": ("b", "c"), "d": ("d",)}
    assert topo.process_of("c") == "b"
    assert topo.shared_cables() == []  # unix crosses processes but needs no parent resource
    assert topo.cable_processes(topo.cables[1]) == ("a", "d")


def test_explicit_process_groups_and_pairs_follow_them() -> None:
    topo = parse("""
        devices:
          a: {process: left}
          b: {}
          c: {process: left}
          d: {}
        cables:
          - {kind: pair, ends: [b, c]}
          - {kind: shm, ends: [a, d]}
    """)
    assert topo.processes == {"left": ("a", "b", "c"), "d": ("d",)}
    assert [c.index for c in topo.shared_cables()] == [1]


def test_shm_in_one_process_needs_no_shared_resource() -> None:
    topo = parse("devices: {a: {process: p}, b: {process: p}}\ncables: [{kind: shm, ends: [a, b]}]")
    assert topo.processes == {"p": ("a", "b")} and topo.shared_cables() == []


def test_automatic_process_names_do_not_collide_with_explicit_ones() -> None:
    topo = parse("devices: {a: {}, b: {process: a}}\n")
    assert topo.processes == {"a.2": ("a",), "a": ("b",)}


def test_pair_between_forced_processes_is_refused() -> None:
    one_problem("""
        devices: {a: {process: p1}, b: {process: p2}}
        cables: [{kind: pair, ends: [a, b]}]
    """, "cables[0]", "pair cable", "'p1'", "'p2'")


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, path, fragments",
    [
        ("devcies: {a: {}}\n", "devcies", ["unknown key", "did you mean 'devices'"]),
        ("devices: {a: {maс: x, mca: 1}}\n", "devices.a.mca", ["did you mean 'mac'"]),
        ("devices: {a: {pba: {rxkb: 8}}}\n", "devices.a.pba.rxkb", ["did you mean 'rx_kb'"]),
        (PAIR + "    faults: {nic0: {dorp: 0.1}}\n", "cables[0].faults.nic0.dorp", ["did you mean 'drop'"]),
        (PAIR + "    ring_bytes: 4096\n", "cables[0].ring_bytes", ["unknown key for a pair cable"]),
        ("devices: {a: {}}\ncables: [{kind: tpa, ends: [a]}]\n", "cables[0].kind", ["did you mean 'tap'"]),
        ("devices: {a: {}}\ncables: [{ends: [a]}]\n", "cables[0].kind", ["missing"]),
        ("devices: {a: {engine: cyton}}\n", "devices.a.engine", ["did you mean 'cython'"]),
    ],
)
def test_unknown_keys_and_values_suggest_a_close_match(text: str, path: str, fragments: list[str]) -> None:
    ps = [p for p in problems(text) if p.path == path]
    assert len(ps) == 1, ps
    for f in fragments:
        assert f in ps[0].message, str(ps[0])


@pytest.mark.parametrize(
    "mac, fragment",
    [
        ('"01:00:5e:00:00:01"', "multicast"),
        ('"ff:ff:ff:ff:ff:ff"', "multicast"),
        ('"53:54:00:12:34:56"', "multicast"),  # bit 0 of 0x53
        ('"00:00:00:00:00:00"', "all-zero"),
        ('"52:54:00:12:34"', "not a MAC address"),
        ('"52:54:00:12:34:5g"', "not a MAC address"),
        ('"52:54:00-12:34:56"', "not a MAC address"),
        ("525400123456", "must be a string"),
        ("[1, 2]", "must be a string"),
        ("true", "must be a string"),
    ],
)
def test_bad_mac(mac: str, fragment: str) -> None:
    one_problem(f"devices:\n  a: {{mac: {mac}}}\n", "devices.a.mac", fragment)


def test_duplicate_mac() -> None:
    one_problem('devices:\n  a: {mac: "52:54:00:00:00:01"}\n  b: {mac: "52:54:00:00:00:01"}\n',
                "devices.b.mac", "also the MAC of devices.a")


@pytest.mark.parametrize(
    "pba, path, fragment",
    [
        ("{rx_kb: 60, tx_kb: 16}", "devices.a.pba", "76 KB"),
        ("{rx_kb: -4}", "devices.a.pba.rx_kb", "at least 2"),
        ("{rx_kb: 0}", "devices.a.pba.rx_kb", "at least 2"),
        ("{tx_kb: 63}", "devices.a.pba.tx_kb", "at most 62"),
        ("{rx_kb: forty}", "devices.a.pba.rx_kb", "must be an integer, got 'forty'"),
        ("{rx_kb: 32.5}", "devices.a.pba.rx_kb", "must be an integer"),
        ("{rx_kb: true}", "devices.a.pba.rx_kb", "boolean"),
        ("48", "devices.a.pba", "must be a mapping"),
    ],
)
def test_impossible_pba(pba: str, path: str, fragment: str) -> None:
    one_problem(f"devices:\n  a: {{pba: {pba}}}\n", path, fragment)


@pytest.mark.parametrize(
    "ring, fragment",
    [("3000", "power of two"), ("4096", "between 65536"), ("-1", "power of two"), ("2G", "between"),
     ("lots", "must be a size"), ("1.5", "must be a size")],
)
def test_impossible_shm_ring(ring: str, fragment: str) -> None:
    one_problem(f"devices: {{a: {{}}, b: {{}}}}\ncables: [{{kind: shm, ends: [a, b], ring_bytes: {ring}}}]\n",
                "cables[0].ring_bytes", fragment)


def test_device_on_two_cables() -> None:
    one_problem("""
        devices: {a: {}, b: {}, c: {}}
        cables:
          - {kind: pair, ends: [a, b]}
          - {kind: unix, ends: [c, a]}
    """, "cables[1].ends[1]", "'a' is already plugged into cables[0]")


def test_cable_naming_an_unknown_device() -> None:
    one_problem("devices: {nic0: {}, nic1: {}}\ncables: [{kind: pair, ends: [nic0, nic2]}]\n",
                "cables[0].ends[1]", "unknown device 'nic2'", "did you mean", "devices: nic0, nic1")


@pytest.mark.parametrize(
    "cable, path, fragment",
    [
        ("{kind: pair, ends: [a]}", "cables[0].ends", "joins 2 devices, got 1"),
        ("{kind: shm, ends: [a, b, c]}", "cables[0].ends", "joins 2 devices, got 3"),
        ("{kind: tap, ends: [a, b]}", "cables[0].ends", "joins 1 device, got 2"),
        ("{kind: pair, ends: [a, a]}", "cables[0].ends[1]", "both ends"),
        ("{kind: pair}", "cables[0].ends", "got nothing"),
        ("{kind: pair, ends: {a: b}}", "cables[0].ends", "got a mapping"),
    ],
)
def test_bad_ends(cable: str, path: str, fragment: str) -> None:
    one_problem(f"devices: {{a: {{}}, b: {{}}, c: {{}}}}\ncables: [{cable}]\n", path, fragment)


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("drop", "1.5", "between 0 and 1, got 1.5"),
        ("corrupt", "-0.1", "between 0 and 1"),
        ("duplicate", "often", "probability"),
        ("reorder", "true", "probability"),
        ("delay_ms", "-1", "at least 0"),
        ("rate_bps", "0", "positive line rate"),
        ("rate_bps", "fast", "positive line rate"),
        ("seed", "1.5", "integer"),
        ("limit", "0", "at least 1"),
        ("corrupt_bits", "0", "at least 1"),
    ],
)
def test_bad_faults(key: str, value: str, fragment: str) -> None:
    one_problem(PAIR + f"    faults: {{nic0: {{{key}: {value}}}}}\n", f"cables[0].faults.nic0.{key}", fragment)


def test_fault_direction_names() -> None:
    one_problem(PAIR + "    faults: {nic2: {drop: 0.1}}\n", "cables[0].faults.nic2", "named by the sender")
    one_problem(PAIR + "    faults: {peer: {drop: 0.1}}\n", "cables[0].faults.peer", "one of nic0, nic1")
    topo = parse("devices: {a: {}}\ncables: [{kind: udp, ends: [a], local: '127.0.0.1:4000', "
                 "remote: '127.0.0.1:4001', faults: {a: {drop: 0.1}, peer: {delay_ms: 3}}}]\n")
    c = topo.cables[0]
    assert c.faults["a"].drop == 0.1 and c.faults_into("a") == c.faults["peer"]


def test_capture_names_an_end() -> None:
    one_problem(PAIR + "    capture: {nic3: x.pcap}\n", "cables[0].capture.nic3", "one of nic0, nic1")
    one_problem(PAIR + "    capture: {nic0: 5}\n", "cables[0].capture.nic0", "pcap file path")


@pytest.mark.parametrize(
    "addr, fragment",
    [
        ("10.0.0.1:4000", "outside the allowed networks"),
        ("192.168.1.1:4000", "outside the allowed networks"),
        ("8.8.8.8:53", "outside the allowed networks"),
        ("198.20.0.1:4000", "outside the allowed networks"),  # just past 198.18.0.0/15
        ("0.0.0.0:4000", "outside the allowed networks"),
        ("[fe80::1]:4000", "outside the allowed networks"),
        ("example.com:4000", "not an IP address"),
        ("127.0.0.1", "not HOST:PORT"),
        ("127.0.0.1:0", "outside 1..65535"),
        ("127.0.0.1:70000", "outside 1..65535"),
    ],
)
def test_udp_addresses_must_be_safe(addr: str, fragment: str) -> None:
    one_problem(f"devices: {{a: {{}}}}\ncables: [{{kind: udp, ends: [a], local: '127.0.0.1:4000', "
                f"remote: '{addr}'}}]\n", "cables[0].remote", fragment)


@pytest.mark.parametrize("addr", ["127.0.0.1:9", "127.9.9.9:9", "198.18.0.1:9", "198.19.255.254:9",
                                  "localhost:9", "[::1]:9"])
def test_udp_allowed_addresses(addr: str) -> None:
    topo = parse(f"devices: {{a: {{}}}}\ncables: [{{kind: udp, ends: [a], local: '{addr}', "
                 "remote: '127.0.0.1:4001'}]\n")
    assert topo.cables[0].local[1] == 9


def test_udp_needs_both_addresses_and_distinct_locals() -> None:
    one_problem("devices: {a: {}}\ncables: [{kind: udp, ends: [a], remote: '127.0.0.1:1'}]\n",
                "cables[0].local", "missing")
    one_problem("devices: {a: {}}\ncables: [{kind: udp, ends: [a], local: '127.0.0.1:1', "
                "remote: '127.0.0.1:1'}]\n", "cables[0].remote", "talk to itself")
    one_problem("""
        devices: {a: {}, b: {}}
        cables:
          - {kind: udp, ends: [a], local: '127.0.0.1:5000', remote: '127.0.0.1:5001'}
          - {kind: udp, ends: [b], local: '127.0.0.1:5000', remote: '127.0.0.1:5002'}
    """, "cables[1].local", "also the local address of cables[0]")


def test_tap_names() -> None:
    one_problem("devices: {a: {}}\ncables: [{kind: tap, ends: [a], name: this-is-too-long0}]\n",
                "cables[0].name", "longer than 15")
    one_problem("devices: {a: {}}\ncables: [{kind: tap, ends: [a], name: 'tap 0'}]\n",
                "cables[0].name", "interface name")
    one_problem("devices: {a-very-long-device: {}}\ncables: [{kind: tap, ends: [a-very-long-device]}]\n",
                "cables[0].name", "set `name`")
    one_problem("""
        devices: {a: {}, b: {}}
        cables: [{kind: tap, ends: [a], name: t0}, {kind: tap, ends: [b], name: t0}]
    """, "cables[1].name", "also used by cables[0]")
    c = parse("devices: {a: {}}\ncables: [{kind: tap, ends: [a], netns: lab}]\n").cables[0]
    assert (c.tap_name, c.netns) == ("nm-a", "lab")


def test_unix_cable_paths() -> None:
    topo = parse("devices: {a: {}, b: {}}\ncables: [{kind: unix, ends: [a, b]}]\n")
    rt = Path("/tmp/nicemu-test-rt")
    assert topo.cables[0].unix_paths == {"a": rt / "cable0-a.sock", "b": rt / "cable0-b.sock"}
    c = parse("devices: {a: {}}\ncables: [{kind: unix, ends: [a], path: me.sock, peer: /tmp/o.sock}]\n").cables[0]
    assert (c.unix_paths, c.unix_peer) == ({"a": rt / "me.sock"}, Path("/tmp/o.sock"))
    assert set(topo.socket_paths()) == {rt / "a.sock", rt / "b.sock", rt / "cable0-a.sock", rt / "cable0-b.sock"}
    one_problem("devices: {a: {}}\ncables: [{kind: unix, ends: [a]}]\n", "cables[0].peer", "needs `peer`")
    one_problem("devices: {a: {}, b: {}}\ncables: [{kind: unix, ends: [a, b], peer: /x}]\n",
                "cables[0].peer", "chooses its own socket paths")


def test_duplicate_socket_paths() -> None:
    one_problem("devices:\n  a: {socket: s.sock}\n  b: {socket: ./sub/../s.sock}\n",
                "devices.b.socket", "also used by devices.a.socket")
    one_problem("devices:\n  a: {socket: cable0-b.sock}\n  b: {}\n  c: {}\ncables: [{kind: unix, ends: [b, c]}]\n",
                "cables[0] (unix socket of b)", "also used by devices.a.socket")
    one_problem(PAIR + "    capture: {nic0: x.pcap, nic1: ./x.pcap}\n", "cables[0].capture.nic1", "also used")


def test_socket_path_too_long() -> None:
    one_problem(f"devices:\n  a: {{socket: /tmp/{'x' * 120}.sock}}\n", "devices.a.socket", "longer than 107")


def test_bad_names() -> None:
    one_problem("devices: {'a b': {}}\n", "devices.a b", "device name")
    one_problem("devices: {peer: {}}\n", "devices.peer", "reserved")
    one_problem("devices: {a: {process: 'x/y'}}\n", "devices.a.process", "process name")
    one_problem("name: 'my lab'\ndevices: {a: {}}\n", "name", "letters")


def test_every_problem_is_reported_at_once() -> None:
    ps = problems("""
        devices:
          nic0: {mac: "01:00:00:00:00:01", pba: {rx_kb: 70}}
          nic1: {mac: nope, color: blue}
        cables:
          - {kind: pair, ends: [nic0, nic5], faults: {nic0: {drop: 2}}}
          - {kind: udp, ends: [nic1], local: "10.1.1.1:1", remote: "127.0.0.1:2"}
    """)
    paths = [p.path for p in ps]
    assert paths == [
        "devices.nic0.mac", "devices.nic0.pba.rx_kb", "devices.nic1.color", "devices.nic1.mac",
        "cables[0].ends[1]", "cables[0].faults.nic0.drop", "cables[1].local",
    ], paths


def test_error_text_names_file_line_path_and_reason() -> None:
    with pytest.raises(TopologyError) as ei:
        T.parse("devices:\n  nic0:\n    mac: 01:02:03:04:05:06\n", source="lab.yaml")
    text = str(ei.value)
    assert text.startswith("lab.yaml: 1 problem:\n")
    assert "devices.nic0.mac (line 3): '01:02:03:04:05:06' is a multicast address" in text


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("devices: [a, b]\n", "must be a mapping"),
        ("devices: {}\n", "at least one device"),
        ("cables: []\n", "missing"),
        ("devices: {a: {}}\ncables: {kind: pair}\n", "must be a list"),
        ("devices:\n  a: {mac: '52:54:00:00:00:01'\n", "not valid YAML"),
        ("devices:\n  a: {}\n  a: {}\n", "'a' appears more than once"),
        ("devices: {a: !!python/object:os.system {}}\n", "not valid YAML"),
    ],
)
def test_structure_errors(text: str, fragment: str) -> None:
    ps = problems(text)
    assert any(fragment in p.message for p in ps), ps


def test_yaml_errors_carry_the_line() -> None:
    ps = problems("devices:\n  a: {}\n  a: {}\n")
    assert ps[0].line == 3
    ps = problems("devices:\n  a: {mac: [\n\n")
    assert ps[0].line is not None


def test_load_reports_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="cannot read the file"):
        T.load(tmp_path / "missing.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(TopologyError, match="not UTF-8"):
        T.load(tmp_path / "bin.yaml")


# --- the private runtime directory ---------------------------------------------------------


def test_ensure_private_dir_creates_0700_and_only_chmods_what_it_made(tmp_path: Path) -> None:
    d = tmp_path / "a" / "b"
    with pytest.raises(T.MissingParentError):
        T.ensure_private_dir(d)  # one level unless asked
    made: list[Path] = []
    T.ensure_private_dir(d, parents=True, created=made)
    assert made == [tmp_path / "a", d]
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(d.parent).st_mode) == 0o700
    T.ensure_private_dir(d)  # an existing private directory of ours: fine, untouched
    (tmp_path / "link").symlink_to(d)
    with pytest.raises(OSError, match="symlink"):
        T.ensure_private_dir(tmp_path / "link")
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match="not a directory"):
        T.ensure_private_dir(tmp_path / "file")


@pytest.mark.parametrize("mode", [0o755, 0o1777, 0o770, 0o701])
def test_an_existing_directory_that_is_not_private_is_refused_not_chmodded(tmp_path: Path, mode: int) -> None:
    """Defect 5: `up` turned an existing 1777 runtime directory into 0700 (with runtime_dir:
    /tmp, /tmp itself). It is refused now, and its mode stays what it was."""
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, mode)
    with pytest.raises(PrivateDirError, match="group/other"):
        T.ensure_private_dir(d)
    assert stat.S_IMODE(os.stat(d).st_mode) == mode
    assert "group/other" in private_dir_problem(d)


def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    with pytest.raises(PrivateDirError, match="belongs to uid 65534"):
        check_private_dir(d)
    assert "belongs to uid 65534" in private_dir_problem(d)


def test_a_directory_in_a_parent_others_can_write_is_refused(tmp_path: Path) -> None:
    """Without the sticky bit, another user could rename our private directory away and put
    theirs in its place; /tmp (1777) is fine."""
    parent = tmp_path / "open"
    parent.mkdir()
    os.chmod(parent, 0o777)
    (parent / "rt").mkdir(mode=0o700)
    with pytest.raises(PrivateDirError, match="sticky"):
        check_private_dir(parent / "rt")
    assert "sticky" in private_dir_problem(parent / "new")  # nor is one made there
    os.chmod(parent, 0o1777)
    check_private_dir(parent / "rt")
    assert private_dir_problem(parent / "new") is None
    assert not (parent / "new").exists()


def test_inherited_cable_ends() -> None:
    assert T.inherited_cable_ends({}) == {}
    env = {T.ENV_CABLE_ENDS: '{"cable0.nic1": "b:5,6,7,8"}'}
    assert T.inherited_cable_ends(env) == {"cable0.nic1": "b:5,6,7,8"}
    with pytest.raises(ValueError, match=T.ENV_CABLE_ENDS):
        T.inherited_cable_ends({T.ENV_CABLE_ENDS: "[1"})


def test_driver_sizes() -> None:
    topo = parse("devices:\n  a: {driver: {rx_ring_size: 512, tx_ring_size: 64, rx_buffer_len: 4K, "
                 "tx_buffer_len: 1024}}\n  b: {}\n")
    assert topo.devices["a"].driver == {"rx_ring_size": 512, "tx_ring_size": 64, "rx_buffer_len": 4096,
                                        "tx_buffer_len": 1024}
    assert topo.devices["b"].driver == {}
    from driver.e1000 import E1000Config

    E1000Config(**topo.devices["a"].driver)  # what the topology accepts, the driver accepts
    one_problem("devices:\n  a: {driver: {rx_ring_size: 100}}\n", "devices.a.driver.rx_ring_size", "multiple of 8")
    one_problem("devices:\n  a: {driver: {tx_ring_size: 8192}}\n", "devices.a.driver.tx_ring_size", "at most 4096")
    one_problem("devices:\n  a: {driver: {rx_buffer_len: 3000}}\n", "devices.a.driver.rx_buffer_len", "BSIZE")
    one_problem("devices:\n  a: {driver: {rx_rings: 8}}\n", "devices.a.driver.rx_rings", "did you mean 'rx_ring_size'")


def test_whole_cable_problems_point_at_the_cable() -> None:
    p = one_problem("""
        devices:
          a: {process: p1}
          b: {process: p2}
        cables:
          - kind: pair
            ends: [a, b]
    """, "cables[0]", "pair cable")
    assert p.line == 6
    p = one_problem("devices: {a: {}}\ncables:\n  - kind: udp\n    ends: [a]\n    remote: '127.0.0.1:5'\n",
                    "cables[0].local", "missing")
    assert p.line == 3


def test_created_dirs_make_one_level_and_remove_only_what_they_made(tmp_path: Path) -> None:
    dirs = T.CreatedDirs()
    with pytest.raises(T.MissingParentError) as e:
        dirs.socket_dir(tmp_path / "a" / "b")
    assert (e.value.directory, e.value.parent) == (tmp_path / "a" / "b", tmp_path / "a")
    assert list(tmp_path.iterdir()) == []
    dirs.socket_dir(tmp_path / "a")
    dirs.socket_dir(tmp_path / "a")  # once is enough
    dirs.socket_dir(tmp_path)  # exists: not ours to remove
    assert dirs.paths == [tmp_path / "a"] and stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o700
    (tmp_path / "keep").mkdir()
    dirs.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]


def test_created_dirs_leave_a_directory_still_in_use(tmp_path: Path) -> None:
    dirs = T.CreatedDirs()
    dirs.runtime_dir(tmp_path / "rt")
    (tmp_path / "rt" / "someone-else.sock").write_text("")
    dirs.close()
    assert (tmp_path / "rt" / "someone-else.sock").exists()


def test_check_dirs_names_every_missing_parent(tmp_path: Path) -> None:
    topo = parse(f"""
        devices:
          nic0: {{socket: {tmp_path}/gone/sub/nic0.sock}}
          nic1: {{}}
          nic2: {{socket: {tmp_path}/new/nic2.sock}}
        """, runtime_dir=tmp_path / "no" / "rt")
    assert [str(p) for p in T.check_host(topo)] == [
        f"runtime_dir: the directory {tmp_path}/no does not exist; nicemu creates only {tmp_path}/no/rt "
        f"itself (create {tmp_path}/no first, or choose another path)",
        f"devices.nic0.socket: the directory {tmp_path}/gone does not exist; nicemu creates only "
        f"{tmp_path}/gone/sub itself (create {tmp_path}/gone first, or choose another path)",
    ]
    assert [str(p.path) for p in T.check_host(topo, ["nic2"])] == ["runtime_dir"]
    with pytest.raises(TopologyError):
        T.prepare_dirs(topo)
    assert list(tmp_path.iterdir()) == []  # refused before anything was made


def test_the_default_runtime_dir_is_made_with_its_base(tmp_path: Path, monkeypatch) -> None:
    base = tmp_path / "nicemu-uid"
    monkeypatch.setattr(T.rundir, "runtime_base", lambda: base)  # (where the run directories live)
    topo = parse("devices:\n  nic0: {}\n", runtime_dir=base / "lab")
    dirs = T.prepare_dirs(topo)
    assert dirs.paths == [base, base / "lab"]
    dirs.close()
    assert list(tmp_path.iterdir()) == []
    base.mkdir()  # made by another run: removed by the last one to leave it empty
    dirs = T.prepare_dirs(topo)
    (base / "other").mkdir()
    dirs.close()
    assert [p.name for p in base.iterdir()] == ["other"]


@pytest.mark.parametrize("value, expected", [
    ("short", "'short'"),
    ("a" * 200, "a text of 200 characters starting '" + "a" * 40 + "'..."),
    ("line one\nline two" + "z" * 100, "a text of 117 characters starting 'line one'..."),
    (list(range(3)), "a list"),
])
def test_values_in_messages_are_shortened(value, expected: str) -> None:
    assert T._describe(value) == expected


# --- hostile files (issue 7, defect 8): refused in bounded time, one line naming the key ---------


def assert_one_line_each(err: TopologyError) -> None:
    for p in err.problems:
        text = str(p)
        assert "\n" not in text and len(text) < 400, text


def refused(text: str, **kw) -> list[T.Problem]:
    with pytest.raises(TopologyError) as ei:
        parse(text, **kw)
    assert_one_line_each(ei.value)
    return ei.value.problems


@pytest.mark.parametrize("opener, closer", [("[", "]"), ("{", "}"), ("{a: ", "}"), ("[a, ", "]")])
def test_ten_thousand_levels_of_nesting_are_refused_without_recursion(opener: str, closer: str) -> None:
    ps = refused("devices: " + opener * 10_000 + "x" + closer * 10_000 + "\n")
    assert f"nested deeper than {T.MAX_DEPTH} levels" in ps[0].message


def test_deep_block_nesting_is_refused() -> None:
    text = "devices:\n" + "".join(" " * (i + 1) + "a:\n" for i in range(3000))
    assert "nested deeper" in refused(text)[0].message


def test_legitimate_nesting_passes() -> None:
    topo = parse(PAIR + "    faults:\n      nic0: {drop: 0.1}\n")
    assert topo.cables[0].faults["nic0"].drop == 0.1


def billion_laughs(levels: int = 9) -> str:
    lines = ['lol0: &lol0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"lol{i}: &lol{i} [" + ", ".join([f"*lol{i - 1}"] * 10) + "]")
    return "\n".join(lines) + "\ndevices: {nic0: {}}\n"


def test_a_billion_laughs_alias_bomb_is_refused_not_expanded() -> None:
    ps = refused(billion_laughs())
    assert f"more than {T.MAX_VALUES} values once its aliases are expanded" in ps[0].message


def test_a_merge_key_bomb_is_refused() -> None:
    text = "m0: &m0 {a: 1, b: 2}\n" + "".join(
        f"m{i}: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * 10)}]}}\n" for i in range(1, 8)) + "devices: {nic0: {}}\n"
    assert "aliases are expanded" in refused(text)[0].message


@pytest.mark.parametrize("text", ["devices: &a [*a]\n", "devices: &a {x: *a}\n"])
def test_an_alias_inside_its_own_value_is_refused(text: str) -> None:
    assert "refers to the value that contains it" in refused(text)[0].message


def test_anchors_aliases_and_merge_keys_still_work() -> None:
    topo = parse("""
        devices:
          nic0: &dev {pba: {rx_kb: 40}}
          nic1: {<<: *dev, mac: "52:54:00:12:34:99"}
        cables:
          - kind: pair
            ends: [nic0, nic1]
            faults:
              nic0: &slow {delay_ms: 1, rate_bps: 100M}
              nic1: *slow
    """)
    assert topo.devices["nic1"].pba_rx_kb == 40 and topo.devices["nic1"].mac == "52:54:00:12:34:99"
    assert topo.cables[0].faults["nic1"].rate_bps == 100_000_000


@pytest.mark.parametrize("value, path, fragment", [
    ("9" * 400, "devices.a.pba.rx_kb", "got a number of 400 digits"),
    ("9" * 5000, "devices.a.pba.rx_kb", "got a number of 5000 digits"),  # int() would raise
    ("1e300", "devices.a.pba.rx_kb", "got 1e+300"),
    ("-" + "9" * 400, "devices.a.pba.rx_kb", "got a number of 400 digits"),
])
def test_huge_numbers_are_never_quoted_whole(value: str, path: str, fragment: str) -> None:
    ps = refused(f"devices: {{a: {{pba: {{rx_kb: {value}}}}}}}\n")
    assert [p.path for p in ps] == [path] and fragment in ps[0].message, ps


@pytest.mark.parametrize("cable, path", [
    ("{kind: shm, ends: [a, b], ring_bytes: '%s'}", "cables[0].ring_bytes"),
    ("{kind: udp, ends: [a], local: '127.0.0.1:%s', remote: '127.0.0.1:5'}", "cables[0].local"),
    ("{kind: pair, ends: [a, b], faults: {a: {rate_bps: '%s'}}}", "cables[0].faults.a.rate_bps"),
    ("{kind: pair, ends: [a, b], faults: {a: {seed: %s}}}", "cables[0].faults.a.seed"),
])
@pytest.mark.parametrize("digits", [400, 5000])
def test_huge_numbers_in_texts_are_refused_shortened(cable: str, path: str, digits: int) -> None:
    ps = refused("devices: {a: {}, b: {}}\ncables:\n  - " + cable % ("9" * digits) + "\n")
    assert [p.path for p in ps] == [path], ps
    assert "9" * 50 not in str(ps[0])


@pytest.mark.parametrize("value", ["0x_", "._", "!!int ''", "!!float x", "2001-13-45", "!!int 0o9"])
def test_values_yaml_cannot_build_are_yaml_errors(value: str) -> None:
    ps = refused(f"devices: {{a: {{pba: {{rx_kb: {value}}}}}}}\n")
    assert ps[0].line == 1 and "not valid YAML" in ps[0].message


@pytest.mark.parametrize("key, shown", [
    ('"a\\nb"', "devices.nic0.'a\\nb' (line 3): unknown key"),
    ("k" * 500, "devices.nic0.a text of 500 characters starting 'kkkk"),
])
def test_keys_in_paths_stay_one_short_line(key: str, shown: str) -> None:
    ps = refused(f"devices:\n  nic0:\n    {key}: 1\n")
    assert str(ps[0]).startswith(shown), ps


@pytest.mark.parametrize("value, fragment", [
    ('"a\\0b"', "NUL"),
    ('"a\\ud800b"', "cannot be in a file name"),
    ('"' + "x" * 300 + '"', "longer than 255 bytes"),
    ('"' + "/x" * 2100 + '"', "longer than 4095 bytes"),
])
def test_paths_no_system_call_could_take_are_refused(value: str, fragment: str) -> None:
    ps = refused(f"devices: {{a: {{socket: {value}}}}}\n")
    assert [p.path for p in ps] == ["devices.a.socket"] and fragment in ps[0].message, ps


def test_device_cable_and_process_counts_are_capped() -> None:
    """200 devices started 200 processes and took 3.1 GiB: refused now, before anything runs."""
    many = "devices:\n" + "".join(f"  n{i}: {{}}\n" for i in range(200))
    ps = refused(many)
    assert [p.path for p in ps] == ["devices"] and f"at most {T.MAX_DEVICES}" in ps[0].message
    procs = "devices:\n" + "".join(f"  n{i}: {{}}\n" for i in range(T.MAX_PROCESSES + 1))
    ps = refused(procs)
    assert [p.path for p in ps] == ["devices"] and "group devices with `process:`" in ps[0].message
    grouped = "devices:\n" + "".join(f"  n{i}: {{process: p{i % 4}}}\n" for i in range(T.MAX_DEVICES))
    assert len(parse(grouped).processes) == 4
    cables = "devices: {a: {}}\ncables:\n" + "  - {kind: tap, ends: [a]}\n" * (T.MAX_CABLES + 1)
    ps = refused(cables)
    assert [p.path for p in ps] == ["cables"] and f"at most {T.MAX_CABLES}" in ps[0].message


def test_shm_ring_memory_is_capped_in_all() -> None:
    devs = "".join(f"  n{i}: {{process: p}}\n" for i in range(4))
    cables = "".join(f"  - {{kind: shm, ends: [n{2 * i}, n{2 * i + 1}], ring_bytes: 1G}}\n" for i in range(2))
    ps = refused(f"devices:\n{devs}cables:\n{cables}")
    assert [p.path for p in ps] == ["cables"] and "ring memory" in ps[0].message


def test_a_long_list_of_problems_is_cut_short() -> None:
    text = "devices:\n  nic0:\n" + "".join(f"    bad{i}: 1\n" for i in range(200))
    with pytest.raises(TopologyError) as ei:
        parse(text)
    rendered = ei.value.render()
    assert len(ei.value.problems) == 200
    assert len(rendered.splitlines()) == 1 + T.MAX_PROBLEMS_SHOWN + 1 and "(and 150 more)" in rendered


# --- reading the file: regular files only, size-limited -------------------------------------------


def test_dev_zero_is_refused_without_reading_it() -> None:
    with pytest.raises(TopologyError, match="not a regular file .a character device."):
        T.load("/dev/zero")


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "topo.yaml"
    os.mkfifo(fifo)
    with pytest.raises(TopologyError, match="not a regular file .a FIFO."):
        T.load(fifo)  # opened O_NONBLOCK: no writer needed to get here


def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="a directory"):
        T.load(tmp_path)


def test_a_file_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("devices: {a: {}}\n" + "#" * T.MAX_FILE_BYTES)
    with pytest.raises(TopologyError, match=f"at most {T.MAX_FILE_BYTES}"):
        T.load(big)
    ok = tmp_path / "ok.yaml"
    ok.write_text("devices: {a: {}}\n" + "#" * (T.MAX_FILE_BYTES - 100) + "\n")
    assert list(T.load(ok).devices) == ["a"]


def test_invalid_utf8_and_control_characters_are_one_line_errors(tmp_path: Path) -> None:
    for raw in (b"devices: {a: {}}\n\xff\xfe", b"devices: {a: \x01}\n", b"devices:\x00\n"):
        f = tmp_path / "x.yaml"
        f.write_bytes(raw)
        with pytest.raises(TopologyError) as ei:
            T.load(f)
        assert_one_line_each(ei.value)


# --- the host checks: what `up --check` and `up` refuse alike, with nothing created ----------------


def check(tmp_path: Path, text: str, **kw) -> list[str]:
    cfg = tmp_path / "topo.yaml"
    cfg.write_text(textwrap.dedent(text))
    try:
        T.check_topology(cfg, **kw)
    except TopologyError as e:
        assert_one_line_each(e)
        return [str(p) for p in e.problems]
    return []


def test_check_refuses_a_runtime_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "rt").write_text("")
    assert check(tmp_path, f"runtime_dir: {tmp_path}/rt\ndevices: {{a: {{}}}}\n") == [
        f"runtime_dir: {tmp_path}/rt is not a directory"]


def test_check_refuses_a_runtime_dir_without_parent(tmp_path: Path) -> None:
    ps = check(tmp_path, f"runtime_dir: {tmp_path}/no/rt\ndevices: {{a: {{}}}}\n")
    assert len(ps) == 1 and ps[0].startswith(f"runtime_dir: the directory {tmp_path}/no does not exist")


@pytest.mark.parametrize("mode", [0o1777, 0o755])
def test_check_refuses_an_existing_runtime_dir_that_is_not_private(tmp_path: Path, mode: int) -> None:
    rt = tmp_path / "rt"
    rt.mkdir()
    os.chmod(rt, mode)
    ps = check(tmp_path, f"runtime_dir: {rt}\ndevices: {{a: {{}}}}\n")
    assert len(ps) == 1 and ps[0].startswith("runtime_dir: ") and "group/other" in ps[0]
    assert stat.S_IMODE(os.stat(rt).st_mode) == mode


def test_check_refuses_a_missing_capture_directory(tmp_path: Path) -> None:
    ps = check(tmp_path, PAIR + f"    capture: {{nic1: {tmp_path}/no/such/dir/nic1.pcap}}\n",
               runtime_dir=tmp_path / "rt")
    assert ps == [f"cables[0].capture.nic1: the directory {tmp_path}/no/such/dir does not exist (create it first)"]


def test_check_refuses_a_socket_path_taken_by_a_file(tmp_path: Path) -> None:
    (tmp_path / "nic0.sock").write_text("")
    ps = check(tmp_path, f"devices: {{nic0: {{socket: {tmp_path}/nic0.sock}}}}\n", runtime_dir=tmp_path / "rt")
    assert ps == [f"devices.nic0.socket: {tmp_path}/nic0.sock exists and is not a socket; refusing to replace it"]


def test_check_refuses_a_socket_directory_of_another_user(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    ps = check(tmp_path, f"devices: {{nic0: {{socket: {theirs}/nic0.sock}}}}\n", runtime_dir=tmp_path / "rt")
    assert len(ps) == 1 and ps[0].startswith("devices.nic0.socket: ") and "uid 65534" in ps[0]


def test_check_creates_nothing_and_passes_a_good_config(tmp_path: Path) -> None:
    assert check(tmp_path, PAIR + f"    capture: {{nic0: {tmp_path}/nic0.pcap}}\n",
                 runtime_dir=tmp_path / "rt") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["topo.yaml"]


def test_check_refuses_a_tap_namespace_that_does_not_exist(tmp_path: Path) -> None:
    ns = "nicemu-test-no-such-ns"
    assert not os.path.exists(f"/run/netns/{ns}")
    ps = check(tmp_path, f"devices: {{a: {{}}}}\ncables: [{{kind: tap, ends: [a], netns: {ns}}}]\n",
               runtime_dir=tmp_path / "rt")
    assert ps == [f"cables[0].netns: there is no network namespace '{ns}' (create it first: ip netns add {ns})"]


@pytest.mark.parametrize("text", [
    "devices:\n  \"nic0\\n\": {mac: '52:54:00:12:34:56'}\n",
    "devices:\n  nic0: {mac: \"52:54:00:12:34:56\\n\"}\n",
    "devices:\n  nic0: {mac: '52:54:00:12:34:56', pba: {rx_kb: \"\\u0664\\u0660\"}}\n",
])
def test_names_macs_and_numbers_are_matched_whole_in_ascii(tmp_path, text: str) -> None:
    """A trailing newline ('$' accepts one) or digits of another script (int() reads them)
    must not pass: such a name would end up in a socket path or a command line."""
    from nicemu import topology as T
    f = tmp_path / "t.yaml"
    f.write_text(text)
    with pytest.raises(T.TopologyError):
        T.check_topology(f)
