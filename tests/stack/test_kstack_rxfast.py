"""The receive fast path agrees with the slow path: the compiled kstack._rxfast, its Python
twin kstack.rxfast and the driver's own loop (the slow path for every frame) give the same
socket deliveries, completion-ring records, counters and drops on the same descriptors.

A fake device: frames are written into the RX buffers the driver posted and their
descriptors completed (DD, EOP, errors, checksum status) by the test, then clean_rx_irq runs.
Frames: good UDP datagrams to a multishot socket, and hostile and uncommon ones (bad IP and
UDP checksums, lying lengths, fragments, options, other addresses and MACs, broadcasts,
martian sources, ARP, ICMP, unknown ports, truncated frames, frame errors, frames over
several buffers, descriptor lengths past the buffer), with a small credit, a small ring and a
small SO_RCVBUF so that the full-buffer paths run too."""
from __future__ import annotations

import random
from collections import Counter
import struct
import warnings

import pytest

from driver.e1000 import E1000, E1000Config
from driver.inprocess_bus import InProcessBus
from kstack import rxfast
from kstack.inet import install
from kstack.sock import SO_RCVBUF, SOCK_DGRAM, SOL_SOCKET
from kstack.stack import NetStack
from kstack.syscall.channel import Op
from kstack.syscall.server import _Multishot
from nicemu import DmaMemory
from nicemu.nic import Nic
from wire.checksum import internet_checksum
from wire.udp import udp_checksum

MODES = ["off", "py", "c"]
MAC_B = bytes.fromhex("525400000b02")
MAC_A = bytes.fromhex("525400000a01")
IP_A, IP_B, IP_OTHER = 0xC6120001, 0xC6120002, 0xC6120009
PORT = 9000

try:
    import kstack._rxfast  # noqa: F401
    HAVE_C = True
except ImportError:
    HAVE_C = False


class FakeCQ:
    """The completion ring: records pushed, `room` of them at most until drained."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.records: list[tuple] = []
        self.tail = 0
        self.want = 0

    def push(self, op, call_id, fd=-1, a0=0, a1=0, a2=0, payload=b"", addr=None, flags=0):
        if self.room <= 0:
            return False
        self.room -= 1
        self.records.append((op, call_id, fd, a0, bytes(payload), addr, flags))
        self.tail += 1
        return True

    def want_space(self, n):
        self.want += 1
        return self.room > 0


class FakeApp:
    def __init__(self, cq: FakeCQ) -> None:
        self.cq = cq
        self.dead = False
        self.ms_starved = False
        self.backlog: list = []


class FakeLayout:
    max_payload = 64


class FakeServer:
    def __init__(self) -> None:
        self.layout = FakeLayout()
        self.counters: Counter[str] = Counter()
        self.woken = 0

    def _sock_woken(self, app, fd):
        self.woken += 1


class Box:
    """Host B: a stack over the e1000 driver, one UDP socket with a multishot receive."""

    def __init__(self, mode: str, credit: int, cq_room: int, rcvbuf: int, rx_csum: bool) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            self.nic = Nic(DmaMemory(4 << 20), mac="52:54:00:00:0b:02")
        self.t = [1_000_000_000]
        self.stack = NetStack(clock=lambda: self.t[0])
        self.inet = install(self.stack)
        self.bus = InProcessBus(self.nic)
        self.drv = E1000(self.bus, E1000Config(rx_csum=rx_csum, rx_ring_size=64), name="eth0")
        self.drv.rx_fast = rxfast.select(mode)
        self.stack.register_netdev(self.drv)
        self.stack.dev_open(self.drv)
        self.inet.add_address(self.drv, "198.18.0.2/24")
        self.sock = self.stack.socket(2, SOCK_DGRAM, 0)
        self.sock.setsockopt(SOL_SOCKET, SO_RCVBUF, rcvbuf)
        self.sock.bind(("0.0.0.0", PORT))
        self.cq = FakeCQ(cq_room)
        self.app = FakeApp(self.cq)
        self.server = FakeServer()
        self.ms = _Multishot(77, self.server, self.app, 5)
        self.ms.credit = credit
        self.sock.ms = self.ms
        self.slow = 0  # frames handed to the slow path (netif_receive_skb)
        inner = self.drv.netif_receive_skb

        def counted(skb):
            self.slow += 1
            inner(skb)

        self.drv.netif_receive_skb = counted

    def feed(self, frames: list[tuple[bytes, int, int, int | None]], budget: int) -> int:
        """Complete one descriptor per (frame, status, errors, length) from next_to_clean,
        then run clean_rx_irq(budget). Returns the work done."""
        drv = self.drv
        ring = drv.rx_ring
        i = ring.next_to_clean
        for frame, status, errors, length in frames:
            assert i != ring.next_to_use
            addr = ring.buffer_addr[i]
            if not drv.config.strip_fcs:
                frame = frame + bytes(4)  # the FCS the device stored (the driver trims it)
            data = frame[:drv.config.rx_buffer_len]
            drv._mem.view(addr, len(data))[:] = data
            o = i * 16
            ln = len(frame) if length is None else length
            ring.desc[o + 8:o + 10] = struct.pack("<H", ln & 0xFFFF)
            ring.desc[o + 13] = errors
            ring.desc[o + 12] = status
            i = (i + 1) % ring.count
        return drv.clean_rx_irq(budget)

    def state(self) -> dict:
        sk = self.sock
        queued = [(bytes(s.shinfo.buf[s.data:s.tail]), s.ip_summed) for s in sk.queue]
        st = self.drv.stats.as_dict()
        st.pop("poll_histogram")
        return {
            "cq": list(self.cq.records), "queued": queued, "rmem": sk.rmem, "drops": sk.drops,
            "snmp": dict(+self.stack.snmp), "pool": self.stack.pool.stats(),
            "pool_drops": dict(self.stack.pool.drops), "driver": st,
            "ms": (self.ms.credit, self.ms.direct, self.ms.direct_bytes, self.ms.notified),
            "app": (self.app.ms_starved, self.cq.want), "woken": self.server.woken,
            "server": dict(self.server.counters),
            "ring": (self.drv.rx_ring.next_to_clean, self.drv.rx_ring.next_to_use),
            "discarding": self.drv._discarding,
        }

    def close(self) -> None:
        self.inet.shutdown()
        self.stack.dev_close(self.drv)
        self.drv.close()
        self.bus.close()
        self.nic.mem.close()


# --- frames --------------------------------------------------------------------------------

def ip_hdr(src, dst, payload_len, proto=17, ihl=5, frag=0, tot=None, options=b"", csum_ok=True,
           version=4):
    tot = 20 + len(options) + payload_len if tot is None else tot
    h = bytearray(struct.pack("!BBHHHBBHII", version << 4 | ihl, 0, tot, 1, frag, 64, proto, 0,
                              src, dst) + options)
    c = internet_checksum(h)
    struct.pack_into("!H", h, 10, c if csum_ok else c ^ 0x1234)
    return bytes(h)


def udp_frame(payload: bytes, *, src=IP_A, dst=IP_B, sport=5555, dport=PORT, mac=MAC_B,
              csum="good", ulen=None, **ip) -> bytes:
    ulen_v = 8 + len(payload) if ulen is None else ulen
    seg = bytearray(struct.pack("!HHHH", sport, dport, ulen_v, 0) + payload)
    if csum == "good":
        struct.pack_into("!H", seg, 6, udp_checksum(bytes(seg), src, dst) or 0xFFFF)
    elif csum == "bad":
        struct.pack_into("!H", seg, 6, udp_checksum(bytes(seg), src, dst) ^ 0x0F0F or 1)
    return mac + MAC_A + b"\x08\x00" + ip_hdr(src, dst, len(seg), **ip) + bytes(seg)


DD, EOP, IXSM, TCPCS = 0x01, 0x02, 0x04, 0x20
GOOD = DD | EOP


def hostile(rng: random.Random, k: int) -> tuple[bytes, int, int, int | None]:
    """One frame of kind k (a good one for most k), its status, errors and length."""
    pay = bytes(rng.randrange(256) for _ in range(rng.choice((0, 1, 18, 33, 63, 100))))
    kinds = [
        lambda: udp_frame(pay),
        lambda: udp_frame(pay, csum="zero"),
        lambda: udp_frame(pay, csum="bad"),
        lambda: udp_frame(pay, csum_ok=False),
        lambda: udp_frame(pay, tot=rng.choice((0, 10, 19, 200, 1400))),
        lambda: udp_frame(pay, ulen=rng.choice((0, 7, 8 + len(pay) + 1, 300))),
        lambda: udp_frame(pay, ulen=8 + len(pay) // 2),  # shorter than the IP payload: trimmed
        lambda: udp_frame(pay, frag=0x2000),
        lambda: udp_frame(pay, frag=5),
        lambda: udp_frame(pay, ihl=6, options=b"\x01\x01\x01\x00"),
        lambda: udp_frame(pay, ihl=6, options=b"\x07\x09\x00\x00"),
        lambda: udp_frame(pay, dst=IP_OTHER),
        lambda: udp_frame(pay, dst=0xC61200FF),
        lambda: udp_frame(pay, mac=b"\xff" * 6, dst=0xFFFFFFFF),
        lambda: udp_frame(pay, mac=bytes.fromhex("020000000001")),
        lambda: udp_frame(pay, src=rng.choice((0x7F000001, 0xE0000001, 0, IP_B, 0xFFFFFFFF))),
        lambda: udp_frame(pay, dport=rng.choice((1, 53, PORT + 1))),
        lambda: udp_frame(pay, proto=1),
        lambda: udp_frame(pay, version=6),
        lambda: udp_frame(pay, ihl=4),
        lambda: udp_frame(pay) + bytes(rng.randrange(1, 30)),  # Ethernet padding
        lambda: MAC_B + MAC_A + b"\x08\x06" + bytes(28),
        lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80))),
        lambda: udp_frame(pay)[:rng.randrange(14, 42)],
        lambda: MAC_B + MAC_A + b"\x86\xdd" + bytes(40),
    ]
    frame = kinds[k % len(kinds)]() if k >= 0 else udp_frame(pay)
    status, errors, length = GOOD, 0, None
    r = rng.random()
    if r < 0.08:
        status |= TCPCS  # RXCSUM said good (it is trusted only with rx_csum on)
    elif r < 0.12:
        status |= IXSM
    elif r < 0.15:
        errors = 0x20  # TCPE
    elif r < 0.17:
        errors = 0x01  # CRC error
    elif r < 0.19:
        status = DD  # no EOP: the frame spans buffers
    elif r < 0.20:
        length = 5000  # a write-back longer than the buffer
    return frame, status, errors, length


def run_all(frames_batches, budgets, **box) -> dict:
    out = {}
    for mode in MODES:
        if mode == "c" and not HAVE_C:
            continue
        b = Box(mode, **box)
        try:
            work = [b.feed(fr, bud) for fr, bud in zip(frames_batches, budgets)]
            out[mode] = (work, b.state(), b.slow)
        finally:
            b.close()
    return out


def assert_agree(out: dict) -> None:
    ref = out["off"]
    for mode, got in out.items():
        for key in ref[1]:
            assert got[1][key] == ref[1][key], f"{mode}: {key} differs"
        assert got[0] == ref[0], f"{mode}: work done differs"


# --- tests -----------------------------------------------------------------------------------

def test_multishot_op_matches_channel():
    assert rxfast.RECV_MULTISHOT == int(Op.RECV_MULTISHOT)


@pytest.mark.parametrize("rx_csum", [False, True])
def test_good_datagrams_take_the_fast_path_and_agree(rx_csum):
    rng = random.Random(1)
    batches = [[hostile(rng, -1)[:1] + (GOOD, 0, None) for _ in range(20)] for _ in range(3)]
    out = run_all(batches, [64, 20, 64], credit=1000, cq_room=1000, rcvbuf=1 << 20, rx_csum=rx_csum)
    assert_agree(out)
    st = out["off"][1]
    assert len(st["cq"]) == 60 and st["snmp"]["UdpInDatagrams"] == 60
    assert st["snmp"]["IpInReceives"] == 60 and st["snmp"]["IpInDelivers"] == 60
    assert st["pool"]["skb_frees"] >= 60 and not st["queued"]  # (an ARP of ours may be live)
    assert out["off"][2] == 60 and out["py"][2] == 0
    if HAVE_C:
        assert out["c"][2] == 0


@pytest.mark.parametrize("seed", range(12))
def test_hostile_frames_agree(seed):
    rng = random.Random(seed)
    batches, budgets = [], []
    for _ in range(6):
        batches.append([hostile(rng, rng.randrange(-8, 26)) for _ in range(rng.randrange(1, 40))])
        budgets.append(rng.choice((4, 16, 64)))
    credit = rng.choice((0, 3, 40, 1000))
    out = run_all(batches, budgets, credit=credit, cq_room=rng.choice((2, 30, 1000)),
                  rcvbuf=rng.choice((0, 5000, 1 << 20)), rx_csum=bool(seed & 1))
    assert_agree(out)


def test_full_receive_buffer_drops_agree():
    """No credit: datagrams queue on the socket until SO_RCVBUF, then drop (counted)."""
    rng = random.Random(7)
    batches = [[(udp_frame(bytes(18)), GOOD, 0, None) for _ in range(30)]]
    out = run_all(batches, [64], credit=0, cq_room=1000, rcvbuf=0, rx_csum=False)
    assert_agree(out)
    st = out["off"][1]
    assert st["snmp"]["UdpRcvbufErrors"] > 0 and st["pool_drops"].get("SOCKET_RCVBUFF")
    assert not st["cq"] and st["queued"]
    del rng


def test_ring_full_falls_back_to_the_socket_queue():
    batches = [[(udp_frame(bytes([i]) * 10), GOOD, 0, None) for i in range(10)]]
    out = run_all(batches, [64], credit=100, cq_room=4, rcvbuf=1 << 20, rx_csum=False)
    assert_agree(out)
    st = out["off"][1]
    assert len(st["cq"]) == 4 and len(st["queued"]) == 6 and st["app"][0]  # ms_starved
