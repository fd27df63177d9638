"""YAML topologies: which devices exist, which cables join their ports, and which process runs what.

A topology file is checked completely before anything starts: every problem is collected with
the key path it belongs to (``cables[1].faults.nic0.drop``) and the reason, and all of them are
raised together as one `TopologyError`, so a user fixes a config in one pass instead of one
traceback at a time. The schema (every key, default and meaning) is in docs/topology.md.

The package is split by job, each module importing only the ones above it:

    schema.py    limits, key names, the result dataclasses (`Topology`, `DeviceSpec`,
                 `CableSpec`, `FaultSpec`), `Problem`/`TopologyError`, value parsers
    loader.py    reading the file (`read_config`) and bounded YAML (`_yaml_load`)
    rundir.py    run directories and the host: `check_host`, `prepare_dirs`, `CreatedDirs`
    validate.py  `parse`, `load`, `check_topology`; each cable kind checks its own keys
                 (its module's `check`, found through nicemu.cable.KINDS)
    build.py     `build_emulator`: one process's share of the plan; each kind's `build`

`load()` turns a file into plain frozen dataclasses with every default filled in and every path
made absolute, so the supervisor (`nicemu up`) and each emulator process (`nicemu serve
--config FILE --process NAME`) derive the same plan from the same file.

A topology file is input like any other, so it is bounded before it is believed: only a
regular file of at most MAX_FILE_BYTES is read, YAML nesting and alias expansion are bounded
while the document is composed, device, cable and process counts are capped, and every
message quotes a value or key shortened, on one line. `check_topology` is what `nicemu up
--check` runs and what `nicemu up` runs before it creates or starts anything; directories for
sockets must be private (nicemu.private_dir).

Everything is re-exported here: `from nicemu import topology as T; T.load(...)`.
"""
from __future__ import annotations

from nicemu.private_dir import MissingParentError, PrivateDirError, ensure_private_dir
from nicemu.topology import build, loader, rundir, schema, validate
from nicemu.topology.build import BuildContext, build_emulator
from nicemu.topology.loader import HugeNumber, _yaml_load, read_config
from nicemu.topology.rundir import (CreatedDirs, _capture_problem, _taken, check_host, default_runtime_dir, end_key,
                                    inherited_cable_ends, os_error_text, prepare_dirs, runtime_base)
from nicemu.topology.schema import (ALLOWED_NETWORKS, CABLE_COMMON_KEYS, CABLE_KINDS, DEVICE_KEYS, DRIVER_KEYS,
                                    ENGINES, ENV_CABLE_ENDS, ENV_READY_FD, ENV_RUNTIME_DIR, EXCERPT_CHARS,
                                    FAULT_KEYS, IFNAMSIZ_MAX, MAX_CABLES, MAX_DEPTH, MAX_DEVICES, MAX_FILE_BYTES,
                                    MAX_NUMBER_DIGITS, MAX_PROBLEMS_SHOWN, MAX_PROCESSES, MAX_SHM_TOTAL_BYTES,
                                    MAX_VALUES, NAME_MAX, PATH_MAX, PBA_DEFAULT_RX_KB, PBA_DEFAULT_TX_KB, PBA_KEYS,
                                    PBA_MIN_KB, PBA_TOTAL_KB, RESERVED_NAMES, RX_BUFFER_SIZES,
                                    SHM_DEFAULT_RING_BYTES, SUN_PATH_MAX, TOP_KEYS, CableSpec, DeviceSpec,
                                    FaultSpec, Problem, Topology, TopologyError, _describe, _IFNAME_RE,
                                    _key_text, _NAME_RE, _path_text, _suggest, parse_host_port, parse_mac,
                                    parse_rate, parse_size, socket_path_problem)
from nicemu.topology.validate import CableCheck, _Checker, _names, check_topology, load, parse

__all__ = [
    "CABLE_KINDS",
    "BuildContext",
    "CableCheck",
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
