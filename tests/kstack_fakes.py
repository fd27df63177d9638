"""Fakes for kstack tests: a NetDevice that records what it is given, a wire (a hub) that
carries frames between such devices, and a network of NetStacks with a fake clock.

    net = FakeNet()
    a = net.host("a", "198.18.0.1/24")          # a NetStack with one FakeDevice on hub "lan"
    b = net.host("b", "198.18.0.2/24")
    net.settle()                                 # carry frames and run due timers until quiet
    net.advance(ms)                              # move the fake clock, run timers, settle
"""
from __future__ import annotations

import struct
from typing import Any

import pytest

from kstack.inet import Inet, install
from kstack.netdevice import NETDEV_TX_BUSY, NETDEV_TX_OK, NetDevice, NetdevFeatures
from kstack.skbuff import CHECKSUM_PARTIAL, CHECKSUM_UNNECESSARY, SkBuff
from kstack.stack import NetStack, Sysctl
from wire.checksum import fold, ones_sum
from wire.mac import nth_mac, parse_mac

MS = 1_000_000
S = 1_000_000_000


class FakeDevice(NetDevice):
    """Records every frame handed to ndo_start_xmit (as bytes) and frees the skb, as a
    driver does once a frame is sent. `busy` makes it answer NETDEV_TX_BUSY (and stop its
    queue, as a driver whose ring is full). With `tx_csum`, a CHECKSUM_PARTIAL skb gets its
    checksum inserted as the e1000's TX IC would; `rx_csum` marks every received frame
    CHECKSUM_UNNECESSARY, as a driver does on the RXCSUM good bit."""

    def __init__(self, name: str, mac: str, mtu: int = 1500, tx_csum: bool = False,
                 rx_csum: bool = False) -> None:
        super().__init__(name, mtu)
        self._mac = parse_mac(mac)
        self.sent: list[bytes] = []
        self.partial_sent = 0
        self.busy = False
        self.rx_csum = rx_csum
        if tx_csum:
            self.features |= NetdevFeatures.IP_CSUM
        if rx_csum:
            self.features |= NetdevFeatures.RXCSUM
        self.stats = {"rx_packets": 0, "tx_packets": 0, "rx_bytes": 0, "tx_bytes": 0,
                      "tx_busy": 0}

    @property
    def dev_addr(self) -> bytes:
        return self._mac

    def ndo_open(self) -> None:
        pass

    def ndo_stop(self) -> None:
        pass

    def ndo_start_xmit(self, skb: SkBuff, xmit_more: bool = False) -> int:
        if self.busy:
            self.stats["tx_busy"] += 1
            self.netif_stop_queue()
            return NETDEV_TX_BUSY
        frame = bytearray(skb.tobytes())
        if skb.ip_summed == CHECKSUM_PARTIAL:
            start = skb.csum_start - skb.data
            c = ~fold(ones_sum(frame[start:])) & 0xFFFF
            struct.pack_into("!H", frame, start + skb.csum_offset, c or 0xFFFF)
            self.partial_sent += 1
        self.sent.append(bytes(frame))
        self.stats["tx_packets"] += 1
        self.stats["tx_bytes"] += len(frame)
        skb.consume()
        return NETDEV_TX_OK

    def ndo_get_stats64(self) -> dict[str, int]:
        return dict(self.stats)

    def receive(self, frame: bytes) -> None:
        """A frame arrives from the wire (what the driver's RX path does)."""
        skb = self.netdev_alloc_skb(len(frame))
        skb.put_data(frame)
        if self.rx_csum:
            skb.ip_summed = CHECKSUM_UNNECESSARY
        self.stats["rx_packets"] += 1
        self.stats["rx_bytes"] += len(frame)
        self.netif_receive_skb(skb)

    def take(self) -> list[bytes]:
        out, self.sent = self.sent, []
        return out


class Host:
    def __init__(self, net: "FakeNet", name: str, sysctl: Sysctl | None = None) -> None:
        self.name = name
        self.stack = NetStack(clock=net.clock, sysctl=sysctl or Sysctl(), name=name)
        self.inet: Inet = install(self.stack)
        self.devs: dict[str, FakeDevice] = {}

    def add_dev(self, dev: FakeDevice, hub: "Hub | None", cidr: str | None = None,
                qdisc: str = "pfifo_fast") -> FakeDevice:
        self.stack.register_netdev(dev, qdisc)
        self.stack.dev_open(dev)
        dev.netif_carrier_on()
        self.devs[dev.name] = dev
        if hub is not None:
            hub.plug(dev)
        if cidr:
            self.inet.add_address(dev, cidr)
        return dev

    @property
    def dev(self) -> FakeDevice:
        return next(iter(self.devs.values()))

    def socket(self, type: int, proto: int = 0) -> Any:
        return self.stack.socket(2, type, proto)


class Hub:
    """A shared segment: a frame sent by one device reaches every other one."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.devs: list[FakeDevice] = []
        self.log: list[tuple[str, bytes]] = []  # (sender, frame), everything carried
        self.drop_filter = None  # callable(frame) -> True to lose the frame

    def plug(self, dev: FakeDevice) -> None:
        self.devs.append(dev)

    def carry(self) -> int:
        n = 0
        for d in self.devs:
            for frame in d.take():
                n += 1
                self.log.append((d.name, frame))
                if self.drop_filter is not None and self.drop_filter(frame):
                    continue
                for peer in self.devs:
                    if peer is not d:
                        peer.receive(frame)
        return n


class FakeNet:
    """Hosts on hubs, one fake clock (ns)."""

    def __init__(self) -> None:
        self.t = [0]
        self.hosts: dict[str, Host] = {}
        self.hubs: dict[str, Hub] = {}
        self._macs = 0

    def clock(self) -> int:
        return self.t[0]

    def hub(self, name: str) -> Hub:
        if name not in self.hubs:
            self.hubs[name] = Hub(name)
        return self.hubs[name]

    def mac(self) -> str:
        self._macs += 1
        return nth_mac("52:54:00:00:00:00", self._macs)

    def host(self, name: str, cidr: str | None = None, hub: str = "lan",
             sysctl: Sysctl | None = None, **dev_kw: Any) -> Host:
        h = Host(self, name, sysctl)
        self.hosts[name] = h
        if cidr is not None:
            h.add_dev(FakeDevice("eth0", self.mac(), **dev_kw), self.hub(hub), cidr)
        return h

    def settle(self, rounds: int = 1000) -> None:
        """Carry frames and run due timers until nothing moves."""
        for _ in range(rounds):
            moved = 0
            for h in self.hosts.values():
                moved += h.stack.run_timers(self.t[0])
                for d in h.devs.values():
                    if d.qdisc.pending():
                        moved += d.qdisc.run()
            for hub in self.hubs.values():
                moved += hub.carry()
            if not moved:
                return
        raise AssertionError("the network did not settle")

    def advance(self, ns: int, step: int | None = None) -> None:
        """Move time forward by `ns` in steps, firing timers in order and settling."""
        end = self.t[0] + ns
        while True:
            self.settle()
            nxt = min((d for h in self.hosts.values() if (d := h.stack.next_deadline()) is not None),
                      default=None)
            if nxt is None or nxt > end:
                break
            self.t[0] = max(self.t[0], nxt)
        self.t[0] = end
        self.settle()

    def live(self) -> int:
        return sum(h.stack.pool.live for h in self.hosts.values())

    def shutdown(self) -> None:
        for h in self.hosts.values():
            h.inet.shutdown()
            for d in h.devs.values():
                d.qdisc.reset()


def ip_frame(dst_mac: bytes, src_mac: bytes, src: str, dst: str, proto: int, payload: bytes,
             ttl: int = 64, ident: int = 1, flags_frag: int = 0, tos: int = 0,
             total_length: int | None = None, options: bytes = b"") -> bytes:
    """An Ethernet frame carrying an IPv4 datagram built with wire.ipv4 (for crafted input)."""
    from wire.ipv4 import Ipv4Header, addr_to_int
    h = Ipv4Header(addr_to_int(src), addr_to_int(dst), proto, ttl=ttl, ident=ident,
                   flags_frag=flags_frag, tos=tos, options=options)
    h.total_length = total_length if total_length is not None else h.header_len + len(payload)
    return dst_mac + src_mac + b"\x08\x00" + h.emit() + payload


def udp_payload(src: str, dst: str, sport: int, dport: int, data: bytes, csum: bool = True) -> bytes:
    from wire.ipv4 import addr_to_int
    from wire.udp import UdpHeader
    if csum:
        return UdpHeader(sport, dport).emit(data, addr_to_int(src), addr_to_int(dst))
    return UdpHeader(sport, dport).emit(data)


def frames_of(hub: Hub, ethertype: bytes = b"\x08\x00") -> list[bytes]:
    return [f for _, f in hub.log if f[12:14] == ethertype]


# --- fixtures: a test module takes them with `from kstack_fakes import net, pair` ---------------

@pytest.fixture
def net():
    """A FakeNet, shut down after the test, with no socket or buffer left alive."""
    n = FakeNet()
    yield n
    n.shutdown()
    assert n.live() == 0


@pytest.fixture
def pair(net):
    """Hosts a (198.18.0.1) and b (198.18.0.2) on one /24, settled."""
    a = net.host("a", "198.18.0.1/24")
    b = net.host("b", "198.18.0.2/24")
    net.settle()
    return a, b
