"""A cable to the Linux kernel: the port is a TAP device, so the real network stack is the peer.

/dev/net/tun with TUNSETIFF (IFF_TAP | IFF_NO_PI) gives a network interface whose frames we
read and write on a file descriptor. The device is not made persistent, so the kernel removes
it the moment the last descriptor closes: nothing is left behind even after kill -9.

The kernel speaks frames without FCS; the NIC's wire carries them with. Towards the NIC the
cable pads short frames to 60 bytes (as the sending MAC would) and appends the FCS; towards
the kernel it checks and strips the FCS, and drops a frame whose FCS is bad (a real receiving
MAC would, and count it: `tx_bad_fcs`).

Options (YAML keys of a `tap` cable end):
    name    interface name; "%d" lets the kernel pick a number (`end.ifname` is the name
            the kernel gave)                                        (default "nicemu%d")
    netns   create the interface inside this existing network namespace (`ip netns add NAME`):
            a short-lived thread enters the namespace (setns), opens /dev/net/tun there and
            leaves; the interface never appears in the caller's namespace, and the descriptor
            keeps working from here                                  (default None)

The interface is created down; configure it with iproute2 (addresses in tests come from
198.18.0.0/15). Needs CAP_NET_ADMIN (root) and /dev/net/tun.
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading

from nicemu.cable.base import CableError, Poller, Timer
from nicemu.fcs import FCS_LEN, append_fcs, check_fcs

__all__ = ["TapCableEnd", "tap_available"]

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
ETH_ZLEN = 60  # minimum frame without FCS
CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"  # where `ip netns add NAME` keeps the namespace


def _setns(fd: int) -> None:
    """setns(fd, CLONE_NEWNET) for the calling thread (os.setns is Python 3.12+)."""
    if hasattr(os, "setns"):
        os.setns(fd, CLONE_NEWNET)
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _create_tap(name_b: bytes, ifname: str) -> tuple[int, bytes]:
    """Open /dev/net/tun and attach a TAP in the calling thread's network namespace."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise CableError(e.errno, f"tap cable: cannot open /dev/net/tun: {e.strerror}") from None
    try:
        ifr = struct.pack("16sH22x", name_b, IFF_TAP | IFF_NO_PI)
        res = fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError as e:
        os.close(fd)
        raise CableError(e.errno, f"tap cable: TUNSETIFF {ifname!r} failed: {e.strerror}") from None
    return fd, res


def _create_tap_in_netns(name_b: bytes, ifname: str, netns: str) -> tuple[int, bytes]:
    """Create the TAP inside `netns`: a thread of its own enters the namespace (setns changes
    only the calling thread's), opens /dev/net/tun there (the tun file binds to the opener's
    namespace), returns to ours and ends. The fd keeps working from any namespace."""
    if not netns or "/" in netns or netns in (".", ".."):
        raise CableError(errno.EINVAL, f"tap cable: bad network namespace name {netns!r}")
    # a name from `ip netns add`, or a process id (as `ip link set ... netns PID` takes it)
    path = f"/proc/{netns}/ns/net" if netns.isdigit() else os.path.join(NETNS_RUN_DIR, netns)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise CableError(e.errno, f"tap cable: cannot create {ifname} in netns {netns!r}: "
                                  f"no such network namespace ({path}: {e.strerror})") from None
    out: dict = {}

    def work() -> None:
        try:
            home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            out["error"] = e
            return
        try:
            _setns(target)
            try:
                out["tap"] = _create_tap(name_b, ifname)
            finally:
                _setns(home)  # the thread ends anyway; return for good measure
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            out["error"] = e
        finally:
            os.close(home)

    try:
        t = threading.Thread(target=work, name="nicemu-tap-netns", daemon=True)
        t.start()
        t.join()
    finally:
        os.close(target)
    err = out.get("error")
    if err is not None:
        if "tap" in out:
            os.close(out["tap"][0])
        if isinstance(err, CableError):
            raise err
        raise CableError(getattr(err, "errno", None) or errno.EINVAL,
                         f"tap cable: cannot create {ifname} in netns {netns!r}: {err}")
    return out["tap"]


def tap_available() -> str | None:
    """None if a TAP can be created here, else the reason it cannot."""
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun does not exist"
    if os.geteuid() != 0:
        return "creating a TAP device needs root (CAP_NET_ADMIN)"
    return None


class TapCableEnd:
    """One TAP interface as a cable end (a CableEnd)."""

    kind = "tap"  # the YAML cable kind (stats, logs)

    RECV_BATCH = 256

    def __init__(self, name: str = "nicemu%d", netns: str | None = None) -> None:
        ifname = name
        if not isinstance(ifname, str):
            raise ValueError(f"tap name must be a string, got {ifname!r}")
        name_b = ifname.encode()
        if not name_b or len(name_b) >= IFNAMSIZ or b"/" in name_b or b" " in name_b:
            raise ValueError(f"tap name must be 1..15 characters without '/' or spaces, got {ifname!r}")
        if netns is None:
            fd, res = _create_tap(name_b, ifname)
        else:
            fd, res = _create_tap_in_netns(name_b, ifname, netns)
        self.fd = fd
        self.ifname = res[:IFNAMSIZ].rstrip(b"\0").decode()
        self.netns = netns
        self._closed = False
        self._blocked = False
        self._timer = Timer()
        self._poller = Poller()
        self._poller.watch(fd)
        self._poller.watch(self._timer.fileno())
        self.tx_frames = 0
        self.rx_frames = 0
        self.tx_bad_fcs = 0  # frames from the NIC whose FCS was wrong: not given to the kernel
        self.tx_dropped = 0  # runts or write errors
        self.last_error: str | None = None

    @property
    def link_up(self) -> bool:
        return not self._closed  # the TAP has carrier while we hold its fd

    def fileno(self) -> int | None:
        return None if self._closed else self._poller.fileno()

    def send(self, frame: bytes) -> bool:
        """A frame from the NIC (FCS included) to the kernel, without its FCS."""
        if self._closed:
            return True
        if self._blocked:
            return False
        if len(frame) < 14 + FCS_LEN:
            self.tx_dropped += 1
            return True
        if not check_fcs(frame):
            self.tx_bad_fcs += 1
            return True
        try:
            os.write(self.fd, memoryview(frame)[:-FCS_LEN])
        except BlockingIOError:
            self._blocked = True
            self._timer.arm_in(50_000)
            return False
        except OSError as e:  # e.g. EIO: the interface is down
            self.tx_dropped += 1
            self.last_error = f"write: {e}"
            return True
        self.tx_frames += 1
        return True

    def writable(self) -> bool:
        return not self._blocked

    def recv_frames(self) -> list[bytes]:
        """Frames from the kernel, padded to 60 bytes and with their FCS added."""
        if self._closed:
            return []
        if self._blocked:
            self._timer.clear()
            self._blocked = False
        out: list[bytes] = []
        for _ in range(self.RECV_BATCH):
            try:
                data = os.read(self.fd, 65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self.last_error = f"read: {e}"
                break
            if not data:
                break
            if len(data) < ETH_ZLEN:
                data += bytes(ETH_ZLEN - len(data))
            out.append(append_fcs(data))
        self.rx_frames += len(out)
        return out

    def close(self) -> None:
        """Close the fd: the kernel deletes the (non-persistent) interface."""
        if self._closed:
            return
        self._closed = True
        self._poller.close()
        self._timer.close()
        os.close(self.fd)


# --- the `tap` kind of a topology (registered in nicemu.cable.KINDS) ---------------------

ENDS = (1, 1)
KEYS = ("name", "netns")
SAME_PROCESS = False
NAME_MAX = 255  # a namespace is a file in /run/netns


def check(cc) -> dict:
    """`name` (default nm-<device>) an interface name no other cable uses; `netns` a namespace name."""
    from nicemu.topology.schema import _IFNAME_RE, IFNAMSIZ_MAX, _describe

    spec: dict = {}
    taps = cc.seen.setdefault("name", {})
    tn = cc.cab.get("name", f"nm-{cc.ends[0]}")
    if not isinstance(tn, str) or not _IFNAME_RE.match(tn) or tn in (".", ".."):
        cc.err("name", f"must be an interface name of letters, digits, '_', '.', '-', got {_describe(tn)}")
    elif len(tn) > IFNAMSIZ_MAX:
        if "name" in cc.cab:
            cc.err("name", f"{_describe(tn)} is longer than {IFNAMSIZ_MAX} characters "
                           "(Linux's limit for interface names)")
        elif cc.ends_ok:  # (an unknown device's name was reported already)
            cc.err("name", f"the default name {_describe(tn)} is longer than {IFNAMSIZ_MAX} "
                           "characters; set `name`", at=None)
    else:
        if tn in taps:
            cc.err("name", f"TAP {tn!r} is also used by cables[{taps[tn]}]")
        taps[tn] = cc.index
        spec["tap_name"] = tn
    if "netns" in cc.cab:
        ns = cc.cab["netns"]
        if (not isinstance(ns, str) or not _IFNAME_RE.fullmatch(ns) or ns in (".", "..")
                or len(ns) > NAME_MAX):  # (a file in /run/netns)
            cc.err("netns", f"must be the name of a network namespace (ip netns, at most "
                            f"{NAME_MAX} characters), got {_describe(ns)}")
        else:
            spec["netns"] = ns
    return spec


def host_problems(cable) -> list[tuple[str, str]]:
    """A namespace that does not exist (yet): `ip netns add` it first."""
    from nicemu.topology.schema import EXCERPT_CHARS, _describe

    ns = cable.netns
    if ns is None or ns.isdigit() or os.path.exists(os.path.join(NETNS_RUN_DIR, ns)):
        return []  # (a process id names its namespace too, as `ip link set ... netns` takes it)
    hint = f"ip netns add {ns}" if len(ns) <= EXCERPT_CHARS else "ip netns add"
    return [("netns", f"there is no network namespace {_describe(ns)} (create it first: {hint})")]


def build(cable, local: list[str], ctx) -> list:
    kw: dict = {"name": cable.tap_name}
    if cable.netns is not None:
        kw["netns"] = cable.netns
    return [(local[0], TapCableEnd(**kw))]


make = TapCableEnd
