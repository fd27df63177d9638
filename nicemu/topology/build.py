"""Building one emulator process from a topology (`nicemu serve --config FILE [--process
NAME]`): its devices, its share of the cables (each kind's `build`, nicemu.cable.KINDS),
faults and captures around the ends, and the control socket.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from nicemu.cable import kind_module
from nicemu.cable.base import unplugged
from nicemu.topology.rundir import end_key, inherited_cable_ends, prepare_dirs
from nicemu.topology.schema import ENV_RUNTIME_DIR, CableSpec, FaultSpec, Problem, Topology, TopologyError, _suggest
from nicemu.topology.validate import load

if TYPE_CHECKING:
    from nicemu.emulator import Emulator


@dataclass
class BuildContext:
    """What a cable kind's `build(cable, local, ctx)` may use: the plan, the emulator and the
    devices of this process, and the shm ends `nicemu up` passed down (NICEMU_CABLE_ENDS)."""

    topo: Topology
    emu: "Emulator"
    nics: dict[str, Any]
    ends_given: Mapping[str, str]

    end_key = staticmethod(end_key)

    def problem(self, message: str, path: str = "") -> TopologyError:
        """An error to raise for a start this plan cannot make (it names the key)."""
        return _topology_problem(self.topo, message, path)

    @staticmethod
    def fault_kwargs(spec: FaultSpec | None) -> dict[str, Any] | None:
        return _fault_kwargs(spec)


def _topology_problem(topo: Topology, message: str, path: str = "") -> TopologyError:
    return TopologyError([Problem(path, message)], str(topo.source or topo.name))


def build_emulator(config_path: str | os.PathLike, process: str | None = None, *,
                   runtime_dir: str | os.PathLike | None = None,
                   cable_ends: Mapping[str, str] | None = None) -> "Emulator":
    """An Emulator running process `process` of a topology (None: the whole topology).

    This is `nicemu serve --config FILE [--process NAME]`. Under `nicemu up` each child is
    told its runtime directory (NICEMU_RUNTIME_DIR) and the shm cable ends the parent created
    for it (NICEMU_CABLE_ENDS); `runtime_dir` and `cable_ends` override those. Raises
    TopologyError for a bad config or an unknown process, OSError when a resource cannot be
    opened (a socket path in use, no permission for a TAP); nothing is left open then.
    """
    topo = load(config_path, runtime_dir=runtime_dir or os.environ.get(ENV_RUNTIME_DIR) or None)
    if process is None:
        names = list(topo.devices)
    elif process in topo.processes:
        names = list(topo.processes[process])
    else:
        raise _topology_problem(topo, f"no process {process!r} in this topology; its processes are: "
                                      f"{', '.join(topo.processes)}{_suggest(process, topo.processes)}")
    ends_given = inherited_cable_ends() if cable_ends is None else dict(cable_ends)

    from nicemu.dma import DmaMemory
    from nicemu.emulator import Emulator
    from nicemu.nic import Nic

    dirs = prepare_dirs(topo, names)  # checks everything on the host first (check_host)
    try:
        emu = Emulator()
    except BaseException:
        dirs.close()
        raise
    # First closeable, so closed last: after the servers and cables have unlinked their sockets.
    emu.add_closeable(dirs)
    emu.catch_signals()  # a SIGTERM while building must still stop it cleanly
    try:
        nics: dict[str, Any] = {}
        ctx = BuildContext(topo, emu, nics, ends_given)
        for name in names:
            d = topo.devices[name]
            try:
                nic = Nic(DmaMemory(), mac=d.mac, engine=d.engine, pba=d.pba)
            except ImportError as e:  # engine: cython without the extension built
                raise _topology_problem(topo, f"the {d.engine} engine is not available ({e}); build it "
                                              "(cythonize -i -3 nicemu/_datapath.pyx) or use engine: auto",
                                        f"devices.{name}.engine") from None
            emu.add_device(name, nic, str(d.socket))
            nics[name] = nic
        for cable in topo.cables:
            local = [e for e in cable.ends if e in nics]
            if not local:
                continue
            opened = kind_module(cable.kind).build(cable, local, ctx)  # (the kind's builder)
            for n, (dev, end) in enumerate(opened):
                try:
                    emu.add_port(nics[dev], _wrap_end(cable, dev, end))
                except BaseException:
                    for _dev, rest in opened[n + 1:]:
                        rest.close()
                    raise
        for name in names:
            if topo.cable_of(name) is None:  # no cable plugged in: link down, frames go nowhere
                nics[name].attach(unplugged)
                nics[name].set_link(False)
        _control_socket(emu)
    except BaseException:
        emu.close()
        raise
    return emu


def _control_socket(emu: "Emulator") -> None:
    """The control socket `nicemu up` asks for (NICEMU_CONTROL_SOCKET: `nicemu stats` queries
    it, nicemu/control.py); one that cannot be bound is a warning, not a failed start."""
    from nicemu.control import ENV_CONTROL_SOCKET, ControlSocket

    path = os.environ.pop(ENV_CONTROL_SOCKET, None)
    if path:
        try:
            ControlSocket(emu, path)
        except OSError as e:
            import logging

            logging.getLogger("nicemu.control").warning("no control socket %s: %s", path, e)


def _fault_kwargs(spec: FaultSpec | None) -> dict[str, Any] | None:
    return spec.kwargs() if spec is not None else None


def _wrap_end(cable: CableSpec, dev: str, end: Any) -> Any:
    """Faults on the inside, capture outermost (nicemu.cable.wrap_end): the pcap shows what
    the port itself saw. Faults into this device: on a two-device cable the other end applies
    them on its tx side (so each direction is shaped once); from the outside ("peer") this end
    applies them on receive."""
    from nicemu.cable import wrap_end

    tx = cable.faults.get(dev)
    rx = cable.faults.get("peer") if len(cable.ends) == 1 else None
    return wrap_end(end, capture=cable.capture.get(dev), faults_tx=_fault_kwargs(tx), faults_rx=_fault_kwargs(rx))
