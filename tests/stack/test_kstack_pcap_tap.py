"""The pcap tap: clones of frames in and out of a netdev, written as tcpdump writes them, and
read back by our reader and by tshark without a malformed packet."""
from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from kstack.netdevice import NETDEV_TX_OK, NetDevice
from kstack.pcap_tap import PcapTap
from kstack.skbuff import SkbPool
from kstack.stack import NetStack
from nicemu.cable.capture import LINKTYPE_ETHERNET, read_pcap
from wire.checksum import fold, internet_checksum, pseudo_header_sum
from wire.mac import BROADCAST, parse_mac

MAC_A = parse_mac("52:54:00:00:aa:01")
MAC_B = parse_mac("52:54:00:00:bb:02")
IP_A, IP_B = bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2])


class LoopDev(NetDevice):
    """A device that keeps what it is given to send (and frees it)."""

    def __init__(self) -> None:
        super().__init__("eth0")
        self.sent: list[bytes] = []

    @property
    def dev_addr(self) -> bytes:
        return MAC_A

    def ndo_open(self) -> None:
        self.netif_carrier_on()

    def ndo_stop(self) -> None:
        pass

    def ndo_start_xmit(self, skb, xmit_more: bool = False) -> int:
        self.sent.append(skb.tobytes())
        skb.consume()
        return NETDEV_TX_OK

    def ndo_get_stats64(self) -> dict[str, int]:
        return {}


def arp_request() -> bytes:
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, MAC_B, IP_B, bytes(6), IP_A)
    return BROADCAST + MAC_B + b"\x08\x06" + body + bytes(18)


def ipv4(proto: int, payload: bytes, src: bytes = IP_A, dst: bytes = IP_B) -> bytes:
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, 64, proto, 0, src, dst))
    struct.pack_into("!H", hdr, 10, internet_checksum(hdr))
    return bytes(hdr) + payload


def udp_frame(dst_mac: bytes, src_mac: bytes, payload: bytes) -> bytes:
    ulen = 8 + len(payload)
    seg = bytearray(struct.pack("!HHHH", 4000, 7, ulen, 0) + payload)
    struct.pack_into("!H", seg, 6, internet_checksum(seg, pseudo_header_sum(IP_A, IP_B, 17, ulen)) or 0xFFFF)
    return dst_mac + src_mac + b"\x08\x00" + ipv4(17, bytes(seg))


def icmp_echo_frame(dst_mac: bytes, src_mac: bytes) -> bytes:
    msg = bytearray(struct.pack("!BBHHH", 8, 0, 0, 0x1234, 1) + bytes(range(56)))
    struct.pack_into("!H", msg, 2, internet_checksum(msg))
    return dst_mac + src_mac + b"\x08\x00" + ipv4(1, bytes(msg), src=IP_B, dst=IP_A)


@pytest.fixture
def setup(tmp_path):
    pool = SkbPool()
    stack = NetStack(pool=pool)
    dev = LoopDev()
    stack.register_netdev(dev)
    stack.dev_open(dev)
    seen: list[bytes] = []

    def handler(skb) -> None:
        seen.append(skb.tobytes())
        # a layer that writes into the shared bytes must copy first: the tap keeps its view
        skb.cow()
        skb.buf[skb.data] ^= 0xFF
        skb.consume()

    stack.dev_add_pack(0x0800, handler)
    stack.dev_add_pack(0x0806, handler)
    return stack, dev, pool, tmp_path / "eth0.pcap"


def test_tap_writes_frames_in_and_out_as_tcpdump_does(setup):
    stack, dev, pool, path = setup
    tap = PcapTap(stack, dev, path)
    rx = [arp_request(), icmp_echo_frame(MAC_A, MAC_B), udp_frame(MAC_A, MAC_B, b"x" * 100)]
    for f in rx:
        dev.netif_receive_skb(pool.from_bytes(f))
    tx = [udp_frame(MAC_B, MAC_A, b"reply" * 20), udp_frame(MAC_B, MAC_A, bytes(1400))]
    for f in tx:
        skb = pool.from_bytes(f)
        skb.dev = dev
        stack.dev_queue_xmit(skb)
    assert dev.sent == tx
    assert tap.stats()["frames_in"] == 3 and tap.stats()["frames_out"] == 2
    tap.close()
    tap.close()  # idempotent
    link, records = read_pcap(path)
    assert link == LINKTYPE_ETHERNET  # no FCS bits: the frames end at the payload
    assert [r.data for r in records] == rx + tx  # the handler's later write did not reach them
    assert all(r.orig_len == len(r.data) for r in records)
    assert pool.live == 0 and pool.clones == 5 and not pool.drops
    # removed: no more clones
    dev.netif_receive_skb(pool.from_bytes(rx[0]))
    assert pool.clones == 5


def test_direction_and_snaplen(setup):
    stack, dev, pool, path = setup
    with PcapTap(stack, dev, path, direction="out", snaplen=64) as tap:
        dev.netif_receive_skb(pool.from_bytes(arp_request()))
        skb = pool.from_bytes(udp_frame(MAC_B, MAC_A, bytes(200)))
        skb.dev = dev
        stack.dev_queue_xmit(skb)
    _, records = read_pcap(path)
    assert len(records) == 1 and len(records[0].data) == 64 and records[0].orig_len == 14 + 20 + 8 + 200
    assert tap.stats()["frames_in"] == 0 and pool.live == 0
    with pytest.raises(ValueError, match="direction"):
        PcapTap(stack, dev, path, direction="sideways")


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
def test_tshark_reads_the_capture_without_malformed_packets(setup):
    stack, dev, pool, path = setup
    with PcapTap(stack, dev, path):
        dev.netif_receive_skb(pool.from_bytes(arp_request()))
        dev.netif_receive_skb(pool.from_bytes(icmp_echo_frame(MAC_A, MAC_B)))
        for n in (0, 18, 1472):
            skb = pool.from_bytes(udp_frame(MAC_B, MAC_A, bytes(n)))
            skb.dev = dev
            stack.dev_queue_xmit(skb)
    out = subprocess.run(
        ["tshark", "-n", "-r", str(path), "-o", "ip.check_checksum:TRUE", "-o", "udp.check_checksum:TRUE",
         "-T", "fields", "-e", "frame.protocols", "-e", "_ws.malformed", "-e", "_ws.expert.severity"],
        capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    assert len(out) == 5
    protos = [line.split("\t")[0] for line in out]
    assert protos[0] == "eth:ethertype:arp"
    assert protos[1] == "eth:ethertype:ip:icmp:data"
    assert all(p.startswith("eth:ethertype:ip:udp") for p in protos[2:])
    assert all(line.split("\t")[1] == "" for line in out), out  # no _ws.malformed
    bad = subprocess.run(["tshark", "-n", "-r", str(path), "-Y", "_ws.malformed || _ws.expert.severity >= error"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert bad == ""
