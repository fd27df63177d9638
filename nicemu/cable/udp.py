"""A cable to a peer anywhere on the network: each frame (FCS included) is one UDP datagram.

This is QEMU's `-netdev socket,udp=REMOTE,localaddr=LOCAL`: bind a local address, send every
frame to the remote address, accept datagrams only from the remote address. Two emulated
NICs on two hosts are joined by giving each the other's address. (Tests use 127.0.0.1 only.)

Options (YAML keys of a `udp` cable end):
    local   "HOST:PORT" to bind (IPv6 as "[::1]:PORT", or a (host, port) tuple); port 0
            picks a free port, which `end.local_address` reports  (default "127.0.0.1:0")
    remote  "HOST:PORT" of the peer's `local`; None: frames are dropped until
            `end.set_remote(...)` names it                       (default None)

Link state: UDP has no connection, so like QEMU the link is up while the end is open.
Datagrams are not reliable: a frame lost by the network is simply lost, as on a wire; a full
socket buffer refuses the frame (the NIC keeps it in its TX packet buffer) and the end
retries shortly (see DatagramEnd).
"""
from __future__ import annotations

import errno
import socket

from nicemu.cable.base import CableError, DatagramEnd

__all__ = ["UdpCableEnd", "parse_address"]


def parse_address(text: str | tuple[str, int], what: str = "address") -> tuple[int, tuple]:
    """'HOST:PORT', '[V6]:PORT' or (host, port) -> (family, sockaddr)."""
    if isinstance(text, tuple) and len(text) == 2:
        host, port = str(text[0]), text[1]
        if isinstance(port, bool) or not isinstance(port, int):
            raise ValueError(f"udp cable {what}: port {port!r} is not a number")
    else:
        if not isinstance(text, str) or ":" not in text:
            raise ValueError(f"udp cable {what}: expected 'HOST:PORT', got {text!r}")
        host, _, port_s = text.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            port = int(port_s)
        except ValueError:
            raise ValueError(f"udp cable {what}: port {port_s!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"udp cable {what}: port {port} is out of range 0..65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, proto=socket.IPPROTO_UDP)
    except socket.gaierror as e:
        raise ValueError(f"udp cable {what}: cannot resolve {host!r}: {e}") from None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


class UdpCableEnd(DatagramEnd):
    """One end of a UDP cable (a CableEnd)."""

    kind = "udp"  # the YAML cable kind (stats, logs)

    def __init__(self, local: str | tuple[str, int] = "127.0.0.1:0", remote: str | tuple[str, int] | None = None) -> None:
        family, laddr = parse_address(local, "local")
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(laddr)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        except OSError as e:
            sock.close()
            raise CableError(e.errno or errno.EINVAL, f"udp cable: cannot bind {local}: {e.strerror or e}") from None
        super().__init__(sock, None)
        self.family = family
        if remote is not None:
            self.set_remote(remote)

    @property
    def local_address(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"[{host}]:{port}" if self.family == socket.AF_INET6 else f"{host}:{port}"

    def set_remote(self, remote: str | tuple[str, int]) -> None:
        """Name the peer (its `local_address`)."""
        family, raddr = parse_address(remote, "remote")
        if family != self.family:
            raise ValueError(f"udp cable: remote {remote} is not of the local address's family")
        self.peer = raddr

    def _from_peer(self, addr) -> bool:
        p = self.peer
        return p is not None and addr[0] == p[0] and addr[1] == p[1]


# --- the `udp` kind of a topology (registered in nicemu.cable.KINDS) ---------------------

ENDS = (1, 1)
KEYS = ("local", "remote")
SAME_PROCESS = False


def check(cc) -> dict:
    """`local` and `remote` as HOST:PORT in the allowed networks; no two cables bind one local."""
    from nicemu.topology.schema import parse_host_port

    spec: dict = {}
    locals_ = cc.seen.setdefault("local", {})
    for key in ("local", "remote"):
        if key not in cc.cab:
            cc.err(key, f"missing: the {key} address as HOST:PORT (127.0.0.1 or 198.18.0.0/15)", at=None)
            continue
        hp, why = parse_host_port(cc.cab[key])
        if why:
            cc.err(key, why)
        else:
            spec[key] = hp
    if "local" in spec:
        if spec["local"] in locals_:
            cc.err("local", f"{spec['local'][0]}:{spec['local'][1]} is also the local "
                            f"address of cables[{locals_[spec['local']]}]")
        locals_[spec["local"]] = cc.index
    if spec.get("local") and spec.get("local") == spec.get("remote"):
        cc.err("remote", "is the same as `local`: the cable would talk to itself")
    return spec


def build(cable, local: list[str], ctx) -> list:
    return [(local[0], UdpCableEnd(local=cable.local, remote=cable.remote))]


make = UdpCableEnd
