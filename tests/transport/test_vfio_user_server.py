"""The vfio-user server and the Emulator loop in this process (the loop on a thread), reached
through real AF_UNIX sockets by VfioUserBus and by a raw client that sends broken messages."""
from __future__ import annotations

import errno
import os
import socket
import stat
import struct
import threading
import time
from types import SimpleNamespace

import pytest

from conftest import RxRing, TxRing, enable_bus_master, make_frame, with_fcs
from driver.bus import BusError
from driver.vfio_user_client import VfioUserBus
from nicemu import DmaMemory
from nicemu import regs as R
from nicemu.cable.pair import pipe
from nicemu.emulator import Emulator
from nicemu.nic import Nic
from nicemu.vfio_user import protocol as p
from nicemu.vfio_user.protocol import Command
from nicemu.vfio_user.server import MAX_HELD_FDS, listen_unix

MAC = "52:54:00:12:34:56"
PEER = "52:54:00:65:43:21"
MEM = 1 << 20


def wait_for(cond, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


@pytest.fixture
def served(tmp_path):
    """One device served by an Emulator running on a thread; stopped and joined after."""
    nic = Nic(DmaMemory(), mac=MAC, engine="python")
    emu = Emulator()
    path = str(tmp_path / "run" / "nic0.sock")
    server = emu.add_device("nic0", nic, path)
    cable, far = pipe()
    emu.add_port(nic, cable)
    thread = threading.Thread(target=emu.run, name="emulator", daemon=True)
    thread.start()
    yield SimpleNamespace(nic=nic, emu=emu, server=server, path=path, far=far)
    emu.stop()
    thread.join(5)
    assert not thread.is_alive()
    far.close()
    assert not os.path.exists(path)


@pytest.fixture
def bus(served):
    b = VfioUserBus(served.path, MEM)
    yield b
    b.close()


class Raw:
    """A hand-driven client: sends whatever bytes a test wants, reads replies one by one."""

    def __init__(self, path: str, negotiate: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.next_id = 100
        if negotiate:
            hdr, _ = self.request(Command.VERSION, p.pack_version(0, 1, {}))
            assert hdr[3] & p.Flags.ERROR == 0

    def send(self, command: int, payload: bytes = b"", *, flags: int = 0, fds=(), size: int | None = None) -> int:
        self.next_id += 1
        msg = p.HEADER.pack(self.next_id, command, p.HEADER_SIZE + len(payload) if size is None else size,
                            flags, 0) + payload
        if fds:
            socket.send_fds(self.sock, [msg], list(fds))
        else:
            self.sock.sendall(msg)
        return self.next_id

    def recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def recv(self) -> tuple[tuple, bytes]:
        hdr = p.HEADER.unpack(self.recv_exact(16))
        return hdr, self.recv_exact(hdr[2] - 16)

    def request(self, command: int, payload: bytes = b"", **kw) -> tuple[tuple, bytes]:
        msg_id = self.send(command, payload, **kw)
        hdr, body = self.recv()
        assert hdr[0] == msg_id
        return hdr, body

    def expect_error(self, err: int, command: int, payload: bytes = b"", **kw) -> None:
        hdr, body = self.request(command, payload, **kw)
        assert hdr[3] == p.REPLY_ERROR and hdr[4] == err, (hdr, errno.errorcode.get(hdr[4]))
        assert body == b""

    def read32(self, offset: int) -> int:
        hdr, body = self.request(Command.REGION_READ, p.REGION_ACCESS.pack(offset, 0, 4))
        assert hdr[3] == p.MsgType.REPLY
        return struct.unpack_from("<I", body, 16)[0]

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(served):
    r = Raw(served.path)
    yield r
    r.close()


def open_fds() -> set[int]:
    return set(int(x) for x in os.listdir("/proc/self/fd"))


# --- the socket -----------------------------------------------------------------------------

def test_socket_is_0600_in_a_0700_directory(served):
    assert stat.S_IMODE(os.stat(served.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(served.path)).st_mode) == 0o700
    assert stat.S_ISSOCK(os.stat(served.path).st_mode)


def test_stale_socket_is_replaced_live_and_non_socket_refused(tmp_path):
    path = str(tmp_path / "s.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens: what kill -9 leaves
    sock, created = listen_unix(path)
    assert created is None
    with pytest.raises(OSError, match="served by another process"):
        listen_unix(path)
    sock.close()
    os.unlink(path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a socket"):
        listen_unix(str(tmp_path / "file"))


# --- a driver through VfioUserBus ---------------------------------------------------------------

def test_handshake_and_regions(bus):
    assert bus.bar0_size == 0x20000 and bus.config_size == 256
    assert bus.num_regions == 9 and bus.num_irqs == 5
    assert bus.region_info(1) == (0, 0)  # BAR1: not implemented
    assert bus.max_data_xfer_size == p.MAX_DATA_XFER_SIZE
    assert bus.mem.size == MEM


def test_config_space_ids_and_eerd_mac(bus):
    assert bus.config_read(0x00, 2) == 0x8086
    assert bus.config_read(0x02, 2) == 0x100E
    assert bus.config_read(0x08) >> 8 == 0x020000
    words = []
    for addr in range(3):
        bus.write32(R.EERD, addr << 8 | R.Eerd.START)
        words.append(bus.read32(R.EERD) >> 16)
    assert struct.pack("<3H", *words) == bytes.fromhex(MAC.replace(":", ""))
    whole = bus.read_region(p.CONFIG_REGION, 0, 256)
    assert whole[:4] == struct.pack("<HH", 0x8086, 0x100E)


def test_posted_writes_are_done_before_a_later_read(bus, served):
    before = served.server.messages
    for i in range(2000):
        bus.write32(R.TIPG, i)
    assert bus.read32(R.TIPG) == 1999
    assert served.server.messages - before == 2001
    assert served.server.posted_errors == 0


def test_multi_dword_bar0_read(bus):
    for i in range(4):
        bus.write32(R.MTA + 4 * i, 0x11111111 * (i + 1))
    data = bus.read_region(0, R.MTA, 16)
    assert struct.unpack("<4I", data) == (0x11111111, 0x22222222, 0x33333333, 0x44444444)


def test_intx_eventfd_rises_once_and_again_after_icr_read(bus):
    bus.write32(R.IMS, R.Icr.TXDW)
    assert not bus.wait_irq(0.05)
    bus.write32(R.ICS, R.Icr.TXDW)
    assert bus.wait_irq(2.0)
    assert not bus.wait_irq(0.05)  # one rising edge, one signal
    assert bus.read32(R.ICR) == R.Icr.TXDW  # clears: the line falls
    bus.write32(R.ICS, R.Icr.TXDW)
    assert bus.wait_irq(2.0)
    bus.read32(R.ICR)


def test_intx_signalled_when_ims_unmasks_a_pending_cause(bus):
    bus.write32(R.ICS, R.Icr.RXT0)  # pending, masked
    assert not bus.wait_irq(0.05)
    bus.write32(R.IMS, R.Icr.RXT0)
    assert bus.wait_irq(2.0)
    bus.write32(R.IMS, R.Icr.TXDW)  # still high after another IMS write: signalled again
    assert bus.wait_irq(2.0)
    bus.read32(R.ICR)


def test_itr_held_off_interrupt_is_fired_by_the_loop_timer(bus):
    bus.write32(R.ITR, 0xFFFF)  # 16.8 ms between interrupts
    bus.write32(R.IMS, R.Icr.TXDW)
    bus.write32(R.ICS, R.Icr.TXDW)
    assert bus.wait_irq(2.0)
    bus.read32(R.ICR)
    t0 = time.monotonic()
    bus.write32(R.ICS, R.Icr.TXDW)  # within the gap: held off until the loop's deadline
    assert bus.wait_irq(2.0)
    assert time.monotonic() - t0 > 0.005  # not at once (the gap is 16.8 ms)


def test_tx_frame_goes_through_dma_map_to_the_cable(bus, served):
    enable_bus_master(bus)
    tx = TxRing(bus).setup()
    frame = make_frame(dst=b"\xff" * 6, size=60)
    tx.send([frame])
    assert bus.read32(R.TDH) == 1  # the read is ordered after the TDT doorbell
    assert tx.sta(0) & R.TxdSta.DD
    wait_for(lambda: len(served.far.inbox) == 1)
    assert served.far.recv_frames() == [with_fcs(frame)]
    assert bus.read32(R.GPTC) == 1 and bus.read32(R.TPT) == 1


def test_rx_frame_from_the_cable_lands_in_the_ring(bus, served):
    enable_bus_master(bus)
    rx = RxRing(bus).setup()
    bus.write32(R.IMS, R.Icr.RXT0)
    frame = with_fcs(make_frame(size=100))
    assert served.far.send(frame)
    assert bus.wait_irq(2.0)
    assert bus.read32(R.RDH) == 1
    addr, length, _, status, errors, _ = rx.desc(0)
    assert status & R.RxdStatus.DD and status & R.RxdStatus.EOP and errors == 0
    assert rx.data(0) == frame
    assert bus.read32(R.GPRC) == 1


def test_descriptor_outside_the_mapping_is_a_counted_dma_error(bus, served):
    enable_bus_master(bus)
    tx = TxRing(bus).setup()
    frame = make_frame(size=60)
    bus.mem.write(tx.base, R.TX_DESC.pack(MEM + 0x1000, len(frame), 0, int(R.TxdCmd.EOP | R.TxdCmd.RS), 0, 0, 0))
    bus.write32(R.TDT, 1)
    bus.read32(R.STATUS)  # flush
    assert served.nic.dma_errors >= 1
    assert served.far.recv_frames() == []
    # the device keeps working: a good frame after it goes out
    tx.tail = 1
    tx.send([frame])
    assert bus.read32(R.TDH) == 2
    wait_for(lambda: len(served.far.inbox) == 1)


def test_dma_unmap_takes_memory_away_from_the_device(bus, served):
    enable_bus_master(bus)
    tx = TxRing(bus).setup()
    bus.dma_unmap(0, MEM)
    assert served.nic.mem.regions == []
    errors = served.nic.dma_errors
    tx.send([make_frame(size=60)])
    bus.read32(R.STATUS)
    assert served.nic.dma_errors > errors
    with pytest.raises(BusError, match="EINVAL"):
        bus.dma_unmap(0, MEM)  # no longer mapped
    bus.dma_map(bus.mem.fd, 0, MEM)  # and back
    assert len(served.nic.mem.regions) == 1


def test_device_reset_command(bus):
    bus.write32(R.TIPG, 0x1234)
    bus.write32(R.IMS, 0xFF)
    bus.reset()
    assert bus.read32(R.TIPG) == 0 and bus.read32(R.IMS) == 0
    assert bus.read32(R.PBA) == R.PBA_DEFAULT


# --- clients coming and going -------------------------------------------------------------------

def test_second_client_is_refused_with_ebusy(bus, served):
    with pytest.raises(BusError, match="busy"):
        VfioUserBus(served.path, MEM)
    r = Raw(served.path, negotiate=False)
    hdr = p.HEADER.unpack(r.recv_exact(16))
    assert hdr == (0, 0, 16, p.REPLY_ERROR, errno.EBUSY)
    assert r.closed_by_peer()
    r.close()
    assert bus.read32(R.STATUS) & R.Status.FD  # the first client is unaffected
    assert served.server.clients_refused == 2


def test_disconnect_resets_the_device_and_a_new_client_is_accepted(served):
    b1 = VfioUserBus(served.path, MEM)
    enable_bus_master(b1)
    b1.write32(R.TIPG, 0xABCD)
    b1.write32(R.IMS, R.Icr.TXDW)
    assert b1.read32(R.TIPG) == 0xABCD
    b1.close()
    wait_for(lambda: not served.server.connected)
    assert served.nic.mem.regions == [] and served.server.irq_fd is None
    with VfioUserBus(served.path, MEM) as b2:
        assert b2.read32(R.TIPG) == 0 and b2.read32(R.IMS) == 0
        assert b2.config_read(0x04, 2) & R.PciCommand.MASTER == 0
        assert len(served.nic.mem.regions) == 1


def test_emulator_stopping_gives_the_driver_bus_errors(tmp_path):
    nic = Nic(DmaMemory(), mac=MAC, engine="python")
    emu = Emulator()
    path = str(tmp_path / "nic.sock")
    emu.add_device("nic0", nic, path)
    thread = threading.Thread(target=emu.run, daemon=True)
    thread.start()
    b = VfioUserBus(path, MEM)
    emu.stop()
    thread.join(5)
    assert not os.path.exists(path)
    with pytest.raises(BusError, match="emulator gone"):
        b.wait_irq(5.0)
    with pytest.raises(BusError, match="emulator gone"):
        b.read32(R.STATUS)
    b.close()


# --- bad messages: an Error reply (or a clean disconnect), and the server goes on ---------------

def _access(offset, region, count):
    return p.REGION_ACCESS.pack(offset, region, count)


BAD_REQUESTS = [
    ("unknown command", errno.ENOSYS, 99, b""),
    ("unknown command 6", errno.ENOSYS, 6, b""),
    ("GET_INFO short", errno.EINVAL, Command.DEVICE_GET_INFO, bytes(15)),
    ("GET_INFO long", errno.EINVAL, Command.DEVICE_GET_INFO, bytes(17)),
    ("REGION_INFO short", errno.EINVAL, Command.DEVICE_GET_REGION_INFO, bytes(31)),
    ("REGION_INFO bad index", errno.EINVAL, Command.DEVICE_GET_REGION_INFO, p.REGION_INFO.pack(32, 0, 9, 0, 0, 0)),
    ("IRQ_INFO bad index", errno.EINVAL, Command.DEVICE_GET_IRQ_INFO, p.IRQ_INFO.pack(16, 0, 5, 0)),
    ("IRQ_INFO short", errno.EINVAL, Command.DEVICE_GET_IRQ_INFO, bytes(12)),
    ("SET_IRQS short", errno.EINVAL, Command.DEVICE_SET_IRQS, bytes(19)),
    ("SET_IRQS MSI", errno.EINVAL, Command.DEVICE_SET_IRQS, p.IRQ_SET.pack(20, 0x21, 1, 0, 0)),
    ("SET_IRQS eventfd without fd", errno.EINVAL, Command.DEVICE_SET_IRQS, p.IRQ_SET.pack(20, 0x24, 0, 0, 1)),
    ("SET_IRQS mask action", errno.EINVAL, Command.DEVICE_SET_IRQS, p.IRQ_SET.pack(20, 0x09, 0, 0, 1)),
    ("DMA_MAP without fd", errno.EINVAL, Command.DMA_MAP, p.DMA_MAP.pack(32, 3, 0, 0x100000, 4096)),
    ("DMA_MAP short", errno.EINVAL, Command.DMA_MAP, bytes(24)),
    ("DMA_UNMAP unmapped", errno.EINVAL, Command.DMA_UNMAP, p.DMA_UNMAP.pack(24, 0, 0x100000, 4096)),
    ("DMA_UNMAP short", errno.EINVAL, Command.DMA_UNMAP, bytes(8)),
    ("READ short", errno.EINVAL, Command.REGION_READ, bytes(12)),
    ("READ bad region", errno.EINVAL, Command.REGION_READ, _access(0, 9, 4)),
    ("READ size-0 region", errno.EINVAL, Command.REGION_READ, _access(0, 1, 4)),
    ("READ past BAR0", errno.EINVAL, Command.REGION_READ, _access(0x20000, 0, 4)),
    ("READ straddling BAR0 end", errno.EINVAL, Command.REGION_READ, _access(0x1FFFC, 0, 8)),
    ("READ huge offset", errno.EINVAL, Command.REGION_READ, _access(2**64 - 4, 0, 8)),
    ("READ BAR0 half dword", errno.EINVAL, Command.REGION_READ, _access(0, 0, 2)),
    ("READ zero count", errno.EINVAL, Command.REGION_READ, _access(0, 0, 0)),
    ("READ past config", errno.EINVAL, Command.REGION_READ, _access(254, 7, 4)),
    ("READ config odd size", errno.EINVAL, Command.REGION_READ, _access(1, 7, 3)),
    ("WRITE count mismatch", errno.EINVAL, Command.REGION_WRITE, _access(0x410, 0, 4) + bytes(3)),
    ("WRITE short", errno.EINVAL, Command.REGION_WRITE, bytes(10)),
    ("WRITE past BAR0", errno.EINVAL, Command.REGION_WRITE, _access(0x20000, 0, 4) + bytes(4)),
    ("RESET with payload", errno.EINVAL, Command.DEVICE_RESET, bytes(4)),
    ("VERSION major 1", errno.ENOTSUP, Command.VERSION, p.pack_version(1, 0, {})),
    ("VERSION bad json", errno.EINVAL, Command.VERSION, struct.pack("=HH", 0, 1) + b"{"),
    # json.loads recurses per level: deep nesting must be refused before it parses
    ("VERSION nested json", errno.EINVAL, Command.VERSION, struct.pack("=HH", 0, 1) + b"[" * 2000 + b"]" * 2000),
    ("VERSION nested object", errno.EINVAL, Command.VERSION,
     struct.pack("=HH", 0, 1) + b'{"a":' * 9 + b"1" + b"}" * 9),
    ("VERSION huge json", errno.EINVAL, Command.VERSION, struct.pack("=HH", 0, 1) + b"[" * 100_000),
    ("VERSION not utf-8", errno.EINVAL, Command.VERSION, struct.pack("=HH", 0, 1) + b'{"\xff": 1}'),
    # the 32-bit short paths check offset + count against the region as the general one does
    ("READ 4 bytes at 0x1FFFD", errno.EINVAL, Command.REGION_READ, _access(0x1FFFD, 0, 4)),
    ("READ 4 bytes at 0x1FFFE", errno.EINVAL, Command.REGION_READ, _access(0x1FFFE, 0, 4)),
    ("WRITE 4 bytes at 0x1FFFD", errno.EINVAL, Command.REGION_WRITE, _access(0x1FFFD, 0, 4) + bytes(4)),
    # argsz smaller than the fixed part, flags nicemu does not implement, data nobody takes
    ("GET_INFO argsz 0", errno.EINVAL, Command.DEVICE_GET_INFO, p.DEVICE_INFO.pack(0, 0, 0, 0)),
    ("REGION_INFO argsz 8", errno.EINVAL, Command.DEVICE_GET_REGION_INFO, p.REGION_INFO.pack(8, 0, 0, 0, 0, 0)),
    ("IRQ_INFO argsz 4", errno.EINVAL, Command.DEVICE_GET_IRQ_INFO, p.IRQ_INFO.pack(4, 0, 0, 0)),
    ("SET_IRQS argsz 0", errno.EINVAL, Command.DEVICE_SET_IRQS, p.IRQ_SET.pack(0, 0x21, 0, 0, 1)),
    ("SET_IRQS trailing data", errno.EINVAL, Command.DEVICE_SET_IRQS, p.IRQ_SET.pack(21, 0x21, 0, 0, 1) + b"\1"),
    ("DMA_MAP argsz 0", errno.EINVAL, Command.DMA_MAP, p.DMA_MAP.pack(0, 3, 0, 0x100000, 4096)),
    ("DMA_UNMAP argsz 0", errno.EINVAL, Command.DMA_UNMAP, p.DMA_UNMAP.pack(0, 0, 0, 4096)),
    ("DMA_UNMAP all flag", errno.EINVAL, Command.DMA_UNMAP, p.DMA_UNMAP.pack(24, 2, 0, 0)),
]


@pytest.mark.parametrize("name, err, command, payload", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_gets_an_error_reply_and_the_stream_goes_on(raw, served, name, err, command, payload):
    raw.write_before = raw.read32(R.STATUS)
    raw.expect_error(err, command, payload)
    assert raw.read32(R.STATUS) == raw.write_before  # same connection, still in step
    assert served.server.connected


def test_command_before_version_is_refused(served):
    r = Raw(served.path, negotiate=False)
    r.expect_error(errno.EINVAL, Command.REGION_READ, _access(8, 0, 4))
    r.request(Command.VERSION, p.pack_version(0, 1, {}))
    assert r.read32(R.STATUS) & R.Status.FD
    r.close()


def test_a_reply_sent_as_a_command_is_refused(raw):
    raw.expect_error(errno.EINVAL, Command.DEVICE_RESET, flags=p.MsgType.REPLY)


def test_oversized_message_is_refused_and_skipped(raw, served):
    size = p.MAX_MSG_SIZE + 4096
    msg_id = raw.send(Command.REGION_WRITE, _access(0, 0, size - 32) + bytes(size - 32))
    hdr, _ = raw.recv()
    assert hdr == (msg_id, Command.REGION_WRITE, 16, p.REPLY_ERROR, errno.E2BIG)
    assert raw.read32(R.STATUS) & R.Status.FD
    assert served.server.connected


def test_posted_write_errors_are_counted_not_answered(raw, served):
    raw.send(Command.REGION_WRITE, _access(0x20000, 0, 4) + bytes(4), flags=p.Flags.NO_REPLY)
    raw.send(Command.REGION_WRITE, _access(0x410, 0, 4) + struct.pack("<I", 7), flags=p.Flags.NO_REPLY)
    assert raw.read32(0x410) == 7  # the next reply is the read's: nothing was sent for the bad write
    assert served.server.posted_errors == 1


def test_size_below_header_closes_the_connection_cleanly(served):
    r = Raw(served.path)
    r.sock.sendall(p.HEADER.pack(1, Command.REGION_READ, 8, 0, 0))
    hdr = p.HEADER.unpack(r.recv_exact(16))
    assert hdr[3] == p.REPLY_ERROR and hdr[4] == errno.EINVAL
    assert r.closed_by_peer()
    r.close()
    wait_for(lambda: not served.server.connected)
    with VfioUserBus(served.path, MEM) as b:
        assert b.read32(R.STATUS) & R.Status.FD


def test_disconnect_mid_message_resets_and_serves_the_next_client(served):
    b = VfioUserBus(served.path, MEM)
    b.write32(R.TIPG, 5)
    b.read32(R.TIPG)
    b.sock.sendall(p.HEADER.pack(9, Command.REGION_WRITE, 36, 0, 0) + bytes(7))  # 23 of 36 bytes
    b.close()
    wait_for(lambda: not served.server.connected)
    assert served.nic.mem.regions == []
    with VfioUserBus(served.path, MEM) as b2:
        assert b2.read32(R.TIPG) == 0


def test_unexpected_fds_are_closed_and_refused(raw, served):
    before = open_fds()
    r, w = os.pipe()
    raw.expect_error(errno.EINVAL, Command.REGION_READ, _access(8, 0, 4), fds=[r])
    raw.expect_error(errno.EINVAL, Command.DEVICE_RESET, fds=[r, w])
    os.close(r)
    os.close(w)
    assert raw.read32(R.STATUS) & R.Status.FD
    assert open_fds() == before  # the server closed its copies (same process: same fd table)


def test_dma_map_of_a_fd_that_cannot_be_mapped(raw):
    before = open_fds()
    r, w = os.pipe()
    raw.expect_error(errno.EINVAL, Command.DMA_MAP, p.DMA_MAP.pack(32, 3, 0, 0, 4096), fds=[r])
    mem = DmaMemory(4096)
    # past the end of the memfd
    raw.expect_error(errno.EINVAL, Command.DMA_MAP, p.DMA_MAP.pack(32, 3, 0, 0, 8192), fds=[mem.fd])
    # good, then overlapping
    hdr, _ = raw.request(Command.DMA_MAP, p.DMA_MAP.pack(32, 3, 0, 0x10000, 4096), fds=[mem.fd])
    assert hdr[3] == p.MsgType.REPLY
    raw.expect_error(errno.EINVAL, Command.DMA_MAP, p.DMA_MAP.pack(32, 3, 0, 0x10800, 4096), fds=[mem.fd])
    raw.expect_error(errno.EINVAL, Command.DMA_MAP, p.DMA_MAP.pack(32, 3, 0, 0x20000, 4096), fds=[mem.fd, mem.fd])
    raw.request(Command.DMA_UNMAP, p.DMA_UNMAP.pack(24, 0, 0x10000, 4096))
    os.close(r)
    os.close(w)
    mem.close()
    assert open_fds() == before


def test_set_irqs_refuses_a_non_eventfd(raw):
    r, w = os.pipe()
    raw.expect_error(errno.EINVAL, Command.DEVICE_SET_IRQS, p.IRQ_SET.pack(20, 0x24, 0, 0, 1), fds=[r])
    os.close(r)
    os.close(w)


def test_set_irqs_data_none_triggers_and_tears_down(raw, served):
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    raw.request(Command.DEVICE_SET_IRQS, p.IRQ_SET.pack(20, 0x24, 0, 0, 1), fds=[efd])
    raw.request(Command.DEVICE_SET_IRQS, p.IRQ_SET.pack(20, 0x21, 0, 0, 1))  # DATA_NONE|TRIGGER: fire
    assert os.eventfd_read(efd) == 1
    raw.request(Command.DEVICE_SET_IRQS, p.IRQ_SET.pack(20, 0x21, 0, 0, 0))  # count 0: detach
    assert served.server.irq_fd is None
    os.close(efd)


def test_replies_back_up_without_losing_any(raw):
    # 3000 reads of 4 KiB are ~12 MiB of replies: far more than the socket holds. The server
    # must stop reading requests while its replies wait, and lose none.
    n, count = 3000, 4096
    req = b"".join(p.HEADER.pack(i, Command.REGION_READ, 32, 0, 0) + _access(R.MTA, 0, count) for i in range(n))
    raw.sock.sendall(req)
    for i in range(n):
        hdr, body = raw.recv()
        assert hdr[0] == i and len(body) == 16 + count
    assert raw.read32(R.STATUS) & R.Status.FD


def test_fds_arriving_amid_a_burst_of_posted_writes_reach_their_message(raw, served):
    # Posted writes, a DMA_MAP with its fd, more posted writes: all sent without waiting, so
    # the server reads them in few batches and must still give the fd to the DMA_MAP.
    mem = DmaMemory(8192)
    burst = b"".join(p.HEADER.pack(i, Command.REGION_WRITE, 36, p.Flags.NO_REPLY, 0) + _access(R.TIPG, 0, 4)
                     + struct.pack("<I", i) for i in range(500))
    raw.sock.sendall(burst)
    map_id = raw.send(Command.DMA_MAP, p.DMA_MAP.pack(32, 3, 0, 0x40000, 8192), fds=[mem.fd])
    raw.sock.sendall(burst)
    hdr, _ = raw.recv()
    assert hdr[0] == map_id and hdr[3] == p.MsgType.REPLY
    assert raw.read32(R.TIPG) == 499
    assert [(r.addr, r.size) for r in served.nic.mem.regions] == [(0x40000, 8192)]
    mem.close()


def test_fds_on_a_posted_write_are_closed_and_the_write_refused(raw, served):
    before = open_fds()
    r, w = os.pipe()
    raw.send(Command.REGION_WRITE, _access(R.TIPG, 0, 4) + struct.pack("<I", 9), flags=p.Flags.NO_REPLY, fds=[r])
    os.close(r)
    os.close(w)
    assert raw.read32(R.TIPG) == 0
    assert served.server.posted_errors == 1
    assert open_fds() == before


# --- the Emulator loop ----------------------------------------------------------------------------

class FakeCable:
    """A CableEnd whose link, frames and writability a test controls; readable via an eventfd."""

    def __init__(self) -> None:
        self.efd = os.eventfd(0, os.EFD_NONBLOCK)
        self.link_up = True
        self.inbox: list[bytes] = []
        self.sent: list[bytes] = []
        self.accept = True
        self.fail = False
        self.closed = False

    def ring(self) -> None:
        os.eventfd_write(self.efd, 1)

    def fileno(self) -> int:
        return self.efd

    def send(self, frame: bytes) -> bool:
        if not self.accept:
            return False
        self.sent.append(bytes(frame))
        return True

    def writable(self) -> bool:
        return self.accept

    def recv_frames(self) -> list[bytes]:
        try:
            os.eventfd_read(self.efd)
        except BlockingIOError:
            pass
        if self.fail:
            raise OSError("cable broke")
        frames, self.inbox = self.inbox, []
        return frames

    def close(self) -> None:
        self.closed = True
        os.close(self.efd)


def test_emulator_port_follows_link_and_resumes_tx():
    nic = Nic(DmaMemory(MEM), mac=MAC, engine="python")
    enable_bus_master(nic)
    cable = FakeCable()
    with Emulator() as emu:
        emu.add_port(nic, cable)
        assert nic.read32(R.STATUS) & R.Status.LU
        cable.link_up = False
        cable.ring()
        emu.run_once(1.0)
        assert not nic.read32(R.STATUS) & R.Status.LU
        assert nic.read32(R.ICR) & R.Icr.LSC
        cable.link_up = True
        cable.accept = False  # the cable is full: the frame waits in the TX packet buffer
        tx = TxRing(nic).setup()
        tx.send([make_frame(size=60)])
        assert cable.sent == []
        cable.accept = True
        cable.ring()
        emu.run_once(1.0)
        assert cable.sent == [with_fcs(make_frame(size=60))]
        rx = RxRing(nic).setup()
        cable.inbox.append(with_fcs(make_frame(size=70)))
        cable.ring()
        emu.run_once(1.0)
        assert rx.desc(0)[3] & R.RxdStatus.DD
    assert cable.closed


def test_emulator_survives_a_failing_cable_and_unplugs_it():
    nic = Nic(DmaMemory(MEM), mac=MAC, engine="python")
    cable = FakeCable()
    with Emulator() as emu:
        port = emu.add_port(nic, cable)
        cable.fail = True
        for _ in range(100):
            cable.ring()
            emu.run_once(1.0)
        assert port.errors == 100 and port.fd is None
        assert not nic.read32(R.STATUS) & R.Status.LU


def test_emulator_timeout_follows_the_earliest_deadline():
    now = [1_000_000_000]
    clock = lambda: now[0]  # noqa: E731
    nic = Nic(DmaMemory(MEM), mac=MAC, engine="python", clock=clock)
    emu = Emulator(clock=clock)
    emu.add_nic(nic)
    assert emu._timeout() is None  # idle: sleep until I/O
    nic.write32(R.ITR, 1000)  # 256 us gap
    nic.write32(R.IMS, R.Icr.TXDW)
    nic.write32(R.ICS, R.Icr.TXDW)
    nic.read32(R.ICR)
    nic.write32(R.ICS, R.Icr.TXDW)  # held off
    assert not nic.irq
    assert emu._timeout() == pytest.approx(256e-6)
    now[0] += 256_000
    emu.run_once(0)
    assert nic.irq
    emu.close()


def test_emulator_waits_for_a_sub_millisecond_deadline_with_microsecond_select(monkeypatch):
    """epoll rounds timeouts up to whole milliseconds; a 256 us ITR gap must not become 1 ms, so
    the loop waits with select() (microseconds) when the deadline is under a millisecond."""
    import select as select_module

    waits: list[float] = []
    real_select = select_module.select

    def recording_select(r, w, x, timeout):
        waits.append(timeout)
        return real_select(r, w, x, timeout)

    monkeypatch.setattr(select_module, "select", recording_select)
    emu = Emulator()
    emu.run_once(0.000256)
    emu.run_once(0.002)  # a long wait: epoll's millisecond resolution is fine
    emu.run_once(0)
    assert waits == [0.000256]
    emu.close()


def test_emulator_stop_from_a_signal_handler_wakes_the_loop(tmp_path):
    emu = Emulator()
    emu.add_device("nic0", Nic(DmaMemory(), mac=MAC, engine="python"), str(tmp_path / "s.sock"))
    threading.Timer(0.2, emu.stop).start()
    t0 = time.monotonic()
    emu.run()  # main thread: SIGTERM/SIGINT handlers installed, then restored
    assert time.monotonic() - t0 < 5
    assert not os.path.exists(tmp_path / "s.sock")


@pytest.mark.parametrize("partial", [b"\x01\x00\x09", p.HEADER.pack(9, Command.REGION_READ, 32, 0, 0) + bytes(5)],
                         ids=["inside the header", "inside the payload"])
def test_eof_mid_message_is_a_clean_disconnect(served, partial):
    r = Raw(served.path)
    r.sock.sendall(partial)
    r.close()
    wait_for(lambda: not served.server.connected)
    with VfioUserBus(served.path, MEM) as b:
        assert b.read32(R.STATUS) & R.Status.FD


def test_many_clients_leak_no_descriptors(served):
    with VfioUserBus(served.path, MEM):
        pass
    wait_for(lambda: not served.server.connected)
    before = open_fds()
    for _ in range(20):
        b = VfioUserBus(served.path, MEM)
        b.write32(R.IMS, R.Icr.TXDW)
        b.write32(R.ICS, R.Icr.TXDW)
        assert b.wait_irq(2.0)
        b.close()
        wait_for(lambda: not served.server.connected)
    assert open_fds() == before  # memfds, eventfds and sockets of both sides all closed


def test_dma_map_must_be_readable_and_writable(raw):
    mem = DmaMemory(4096)
    for flags in (0, 1, 2):
        raw.expect_error(errno.ENOTSUP, Command.DMA_MAP, p.DMA_MAP.pack(32, flags, 0, 0, 4096), fds=[mem.fd])
    mem.close()


def test_dma_regions_are_capped(raw, served):
    from nicemu.vfio_user.server import MAX_DMA_REGIONS

    mem = DmaMemory(4096 * MAX_DMA_REGIONS)
    for i in range(MAX_DMA_REGIONS):
        hdr, _ = raw.request(Command.DMA_MAP, p.DMA_MAP.pack(32, 3, 4096 * i, 4096 * i, 4096), fds=[mem.fd])
        assert hdr[3] == p.MsgType.REPLY
    raw.expect_error(errno.ENOSPC, Command.DMA_MAP, p.DMA_MAP.pack(32, 3, 0, 1 << 30, 4096), fds=[mem.fd])
    assert len(served.nic.mem.regions) == MAX_DMA_REGIONS
    mem.close()


def test_unaligned_bar0_access_reads_0_and_is_ignored_as_in_process(raw):
    hdr, body = raw.request(Command.REGION_READ, _access(R.STATUS + 1, 0, 4))
    assert hdr[3] == p.MsgType.REPLY and body[16:] == bytes(4)
    raw.send(Command.REGION_WRITE, _access(R.TIPG + 2, 0, 4) + b"\xff" * 4, flags=p.Flags.NO_REPLY)
    assert raw.read32(R.TIPG) == 0


def test_bus_offsets_outside_bar0_are_value_errors(bus):
    with pytest.raises(ValueError, match="outside"):
        bus.read32(0x20000)
    with pytest.raises(ValueError, match="outside"):
        bus.write32(-4, 0)
    assert bus.read32(R.STATUS) & R.Status.FD


def test_a_driver_reconnecting_at_once_is_not_refused(served):
    # The loop may see the new connect before the old connection's hang-up: the server checks
    # the old client first, so a driver restarted right after its predecessor died gets in.
    for _ in range(10):
        b = VfioUserBus(served.path, MEM)
        b.write32(R.TIPG, 1)
        b.close()
    with VfioUserBus(served.path, MEM) as b:
        assert b.read32(R.TIPG) == 0
    assert served.server.clients_refused == 0


def test_emulator_stats_and_dma_error_warnings(tmp_path, caplog):
    """What has no register is reported by the emulator: stats() (the SIGUSR1 line) and a
    warning, at most one a second per device, when a device counts new DMA errors."""
    import logging

    from conftest import FakeClock

    clock = FakeClock()
    nic = Nic(DmaMemory(), mac=MAC, engine="python", clock=clock)
    emu = Emulator(clock=clock)
    emu.add_device("nic0", nic, str(tmp_path / "nic0.sock"))
    cable, far = pipe()
    emu.add_port(nic, cable)
    reports: list[dict] = []
    emu.report = reports.append
    messages = lambda: [r.getMessage() for r in caplog.records]  # noqa: E731
    try:
        with caplog.at_level(logging.WARNING, logger="nicemu.emulator"):
            emu.run_once(0)
            assert not caplog.records
            nic.engine.dma_errors += 2  # as the engine counts an access outside the mapping
            emu.run_once(0)
            emu.run_once(0)
            assert messages() == ["nic0: 2 DMA error(s): a descriptor or buffer address outside the "
                                  "DMA_MAP'd memory (2 in all); the access was not made"]
            assert emu._timeout() is None  # nothing held back: the loop may sleep
            clock.advance(500_000_000)
            nic.engine.dma_errors += 1
            emu.run_once(0)  # within the second: held back ...
            assert len(caplog.records) == 1
            assert emu._timeout() == pytest.approx(0.5)  # ... and the loop wakes for it
            clock.advance(500_000_000)
            emu.run_once(0)
            assert messages()[1].startswith("nic0: 1 DMA error(s)") and "(3 in all)" in messages()[1]
            assert emu._timeout() is None
        stats = emu.stats()
        d = stats["devices"]["nic0"]
        assert stats["pid"] == os.getpid()
        assert d["mac"] == MAC and d["client"] is False and d["dma_errors"] == 3
        assert d["link"] is True and d["cable"]["kind"] == cable.kind
        assert {"clients_served", "error_replies", "posted_errors", "irqs_signalled", "rx_dropped"} <= set(d)
        thread = threading.Thread(target=emu.run, daemon=True)
        thread.start()
        emu._on_report_signal(0, None)  # what SIGUSR1 does: the loop wakes and reports
        wait_for(lambda: reports)
        emu.stop()
        thread.join(5)
        assert reports[0]["devices"]["nic0"]["dma_errors"] == 3
    finally:
        emu.close()
        far.close()


def test_fds_sent_with_an_oversized_message_are_closed_not_given_to_the_next(raw, served):
    before = open_fds()
    r, w = os.pipe()
    size = p.MAX_MSG_SIZE + 4096
    msg = p.HEADER.pack(77, Command.REGION_WRITE, size, 0, 0) + _access(0, 0, size - 32) + bytes(size - 32)
    sent = socket.send_fds(raw.sock, [msg], [r])  # the fd rides on the first part of it
    raw.sock.sendall(msg[sent:])
    assert raw.recv()[0] == (77, Command.REGION_WRITE, 16, p.REPLY_ERROR, errno.E2BIG)
    assert raw.read32(R.STATUS) & R.Status.FD
    # closed once skipped (counted: listing /proc/self/fd takes the lowest free fd itself)
    assert served.server._fds == [] and len(open_fds()) == len(before) + 2
    mem = DmaMemory(8192)
    hdr, _ = raw.request(Command.DMA_MAP, p.DMA_MAP.pack(32, 3, 0, 0x40000, 8192), fds=[mem.fd])
    assert hdr[3] == p.MsgType.REPLY  # its own fd only: the stray one did not make it two
    raw.request(Command.DMA_UNMAP, p.DMA_UNMAP.pack(24, 0, 0x40000, 8192))
    assert raw.read32(R.STATUS) & R.Status.FD
    os.close(r)
    os.close(w)
    mem.close()
    assert open_fds() == before  # the server closed its copy of the stray fd


# --- doorbell bursts: Nic.write_tail and the server's runs of posted tail writes ----------------

EOP_IFCS_RS = int(R.TxdCmd.EOP | R.TxdCmd.IFCS | R.TxdCmd.RS)
EOP_IFCS = int(R.TxdCmd.EOP | R.TxdCmd.IFCS)


def _engines() -> list:
    try:
        import nicemu._datapath  # noqa: F401
    except ImportError:
        return ["python"]
    return ["python", "cython"]


def _queue_tx(nic, first: int, frames: list[bytes], cmds: list[int] | None = None) -> None:
    """TX descriptors from `first` on, without ringing the doorbell (TxRing's layout)."""
    for k, frame in enumerate(frames):
        slot = (first + k) % 16
        addr = 0x80000 + slot * 2048
        nic.mem.write(addr, frame)
        cmd = EOP_IFCS_RS if cmds is None else cmds[k]
        nic.mem.write(0x800 + 16 * slot, R.TX_DESC.pack(addr, len(frame), 0, cmd, 0, 0, 0))


class _Twins:
    """Identical devices (write_tail, each write in turn, the last write alone) with a TX ring;
    a sink per device that can refuse."""

    def __init__(self, engine: str) -> None:
        self.nics, self.sent, self.room = [], [], []
        for i in range(3):
            nic = Nic(DmaMemory(MEM), mac=MAC, engine=engine)
            enable_bus_master(nic)
            sent: list[bytes] = []
            room = [1 << 30]

            def sink(frame, sent=sent, room=room):
                if room[0] <= 0:
                    return False
                room[0] -= 1
                sent.append(bytes(frame))
                return True

            nic.attach(sink)
            TxRing(nic).setup()
            self.nics.append(nic)
            self.sent.append(sent)
            self.room.append(room)

    def each(self, fn) -> None:
        for nic in self.nics:
            fn(nic)

    def state(self, k: int) -> tuple:
        nic = self.nics[k]
        return bytes(nic.regs), nic.mem.read(0, 0x1000), self.sent[k], nic.irq, nic.next_deadline()

    def close(self) -> None:
        for nic in self.nics:
            nic.mem.close()


@pytest.fixture(params=_engines())
def twins(request):
    t = _Twins(request.param)
    yield t
    t.close()


def _transmits(nic) -> int:
    return nic.regs[R.GPTC >> 2]


@pytest.mark.parametrize("case", ["forward", "txqe_clear", "backwards", "beyond_ring", "partial_packet",
                                  "back_pressure"])
def test_write_tail_tdt_is_the_same_as_each_write_in_turn(twins, case):
    """Nic.write_tail(TDT, values) vs write32(TDT, v) for each v on an identical device: the same
    register file (statistics, ICR, TDH), descriptors, frames on the cable, line and deadline,
    whether the values were coalesced into one walk or not."""
    frames = [make_frame(size=60 + k) for k in range(12)]
    cmds = None
    if case in ("partial_packet", "txqe_clear"):  # frame 5 spans descriptors 5 and 6; tail 6 splits it
        cmds = [EOP_IFCS_RS] * 5 + [0] + [EOP_IFCS_RS] * 6
    twins.each(lambda nic: _queue_tx(nic, 0, frames, cmds))
    if case != "txqe_clear":  # a first walk empties the ring: TXQE pending, as in steady state
        twins.each(lambda nic: nic.write32(R.TDT, 1))
        assert all(nic.peek32(R.ICR) & R.Icr.TXQE for nic in twins.nics)
    values = {"forward": [2, 5, 5, 9], "txqe_clear": [3, 6], "backwards": [6, 3],
              "beyond_ring": [4, 99], "partial_packet": [5, 6], "back_pressure": [4, 10]}[case]
    if case == "back_pressure":
        for room in twins.room:
            room[0] = 5  # the cable takes 5 more frames, then refuses: the walk stops short
    coalesced = case in ("forward", "partial_packet", "back_pressure")
    assert twins.nics[0]._tail_supersedes(R.TDT >> 2, values) == coalesced  # the path taken
    twins.nics[0].write_tail(R.TDT, values)
    for v in values:
        twins.nics[1].write32(R.TDT, v)
    twins.nics[2].write32(R.TDT, values[-1])
    assert twins.state(0) == twins.state(1)
    # Where write_tail must not coalesce, the last write alone would indeed differ: TXQE (the
    # ring emptied at tail 3, not at 6, where a packet is split), the wrap, the invalid tail.
    assert (twins.state(2) == twins.state(1)) == (case not in ("txqe_clear", "backwards", "beyond_ring"))
    if case == "forward":
        assert len(twins.sent[0]) == 9 and twins.nics[0].peek32(R.TDH) == 9
    if case == "backwards":  # a tail moved backwards: the device wrapped the whole ring, both ways
        assert twins.nics[0].peek32(R.TDH) == 3 and len(twins.sent[0]) > 6


def test_write_tail_skips_only_what_cannot_be_seen(stub_nic):
    """The rule itself, on a stand-in engine that counts walks: one walk for a forward run with
    TXQE (RDT: RXDMT0) already pending; every value walked otherwise."""
    nic = stub_nic
    nic.write32(R.TDLEN, 16 * 16)
    nic.write32(R.RDLEN, 16 * 16)
    calls = nic.engine.calls

    def walks(offset: int, values: list[int], icr: int, head: int = 0) -> int:
        nic.regs[R.ICR >> 2] = icr
        nic.regs[(R.TDH if offset == R.TDT else R.RDH) >> 2] = head
        calls.clear()
        nic.write_tail(offset, values)
        return calls.count("transmit" if offset == R.TDT else "drain_rx")

    TXQE, RXDMT0 = int(R.Icr.TXQE), int(R.Icr.RXDMT0)
    assert walks(R.TDT, [2, 4, 8], TXQE) == 1
    assert nic.peek32(R.TDT) == 8
    assert walks(R.TDT, [2, 4, 8], 0) == 3  # the walk to 2 or 4 could raise TXQE on its own
    assert walks(R.TDT, [8, 4], TXQE) == 2  # backwards: the device would wrap the ring
    assert walks(R.TDT, [14, 2], TXQE, head=12) == 1  # forward across the end of the ring
    assert walks(R.TDT, [3, 16], TXQE) == 2  # 16 is not an index of a 16-descriptor ring
    assert walks(R.TDT, [0x10003, 5], TXQE) == 1  # the register keeps 16 bits: 3, then 5
    assert walks(R.TDT, [7], TXQE) == 1
    assert walks(R.RDT, [3, 9, 15], RXDMT0) == 1
    assert walks(R.RDT, [3, 9, 15], TXQE) == 3  # RXDMT0 could be raised against a nearer tail
    assert walks(R.RDT, [9, 3], RXDMT0, head=2) == 2
    nic.regs[R.RDLEN >> 2] = 0
    assert walks(R.RDT, [3, 9], RXDMT0) == 2  # no ring
    calls.clear()
    nic.write_tail(R.TIPG, [1, 2, 3])  # any other register: each write, as write32
    assert nic.peek32(R.TIPG) == 3 and calls == []
    with pytest.raises(ValueError):
        nic.write_tail(R.BAR0_SIZE, [1])


@pytest.mark.parametrize("rxdmt0", [False, True])
def test_write_tail_rdt_drains_waiting_frames_as_each_write_would(twins, rxdmt0):
    """Frames held in the RX packet buffer (no free descriptor), then a burst of RDT writes:
    the same frames in the same descriptors, the same ICR (RXDMT0 counted as each write would),
    whether coalesced (RXDMT0 pending) or not."""
    frames = [with_fcs(make_frame(size=60 + k)) for k in range(6)]
    for nic in twins.nics:
        RxRing(nic).setup(give=0)
        for f in frames:
            nic.receive(f)
        assert nic.peek32(R.RDH) == 0
        nic.regs[R.ICR >> 2] = int(R.Icr.RXDMT0) if rxdmt0 else 0
    values = [2, 4, 15]
    assert twins.nics[0]._tail_supersedes(R.RDT >> 2, values) == rxdmt0  # the path taken
    twins.nics[0].write_tail(R.RDT, values)
    for v in values:
        twins.nics[1].write32(R.RDT, v)
    twins.nics[2].write32(R.RDT, values[-1])
    assert twins.state(0) == twins.state(1)
    # RDT 2 leaves 0 free descriptors (RXDMT0); RDT 15 alone would leave 9 of 16 (none)
    assert (twins.state(2) == twins.state(1)) == rxdmt0
    assert twins.nics[0].peek32(R.RDH) == 6
    assert twins.nics[0].mem.read(0x10000, 60) == frames[0][:60]


def _posted(offset: int, value: int, msg_id: int = 1) -> bytes:
    return struct.pack("=HHIIIQIII", msg_id, Command.REGION_WRITE, 36, p.Flags.NO_REPLY, 0, offset, 0, 4, value)


def _spy_write_tail(monkeypatch, nic) -> list[tuple[int, list[int]]]:
    runs: list[tuple[int, list[int]]] = []
    real = nic.write_tail

    def spy(offset, values):
        runs.append((offset, list(values)))
        real(offset, values)

    monkeypatch.setattr(nic, "write_tail", spy)
    return runs


def _tx_burst_state(bus, served, burst: bytes | None, runs: list | None = None) -> tuple:
    """Program a TX ring, queue 6 frames, send frame 0 (TXQE pending: the ring emptied), then
    TDT 2, 4, 6 each flushed on its own (`burst` None) or `burst` in one piece; flush and
    return the register file, the descriptors and the frames that went out."""
    bus.reset()
    enable_bus_master(bus)
    TxRing(bus).setup()
    _queue_tx(bus, 0, [make_frame(size=60 + k) for k in range(6)])
    bus.write32(R.TDT, 1)
    bus.read32(R.STATUS)
    if runs is not None:
        runs.clear()
    if burst is None:
        for v in (2, 4, 6):
            bus.write32(R.TDT, v)
            bus.read32(R.STATUS)  # one at a time: never two in one buffer
    else:
        bus.sock.sendall(burst)
    bus.read32(R.STATUS)  # handled in order: every write of the burst is done
    wait_for(lambda: len(served.far.inbox) >= served.nic.peek32(R.TDH))
    frames = served.far.recv_frames()
    return bytes(served.nic.regs), bus.mem.read(0x800, 16 * 16), frames


def test_posted_tail_writes_in_one_buffer_are_coalesced_with_the_same_result(bus, served, monkeypatch):
    """TDT 2, 4, 6 arriving together reach the device as one run (one walk: only the last tail
    matters, TXQE is pending); the device state and the frames on the cable are those of the
    same writes each flushed on its own."""
    runs = _spy_write_tail(monkeypatch, served.nic)
    separate = _tx_burst_state(bus, served, None, runs)
    assert all(len(values) == 1 for _, values in runs)
    together = _tx_burst_state(bus, served, b"".join(_posted(R.TDT, v, v) for v in (2, 4, 6)), runs)
    assert runs == [(R.TDT, [2, 4, 6])]
    assert served.nic.peek32(R.ICR) & R.Icr.TXQE
    assert together == separate
    assert len(together[2]) == 6  # frame 0 before the burst, 1 to 5 in it


def test_a_write_between_two_doorbells_ends_the_run(bus, served, monkeypatch):
    """TDT 2, TCTL off, TDT 4 in one buffer: not coalesced (TDT 4 alone would send nothing,
    as TCTL.EN is clear when it comes): only frame 1 goes out, TDH stops at 2."""
    runs = _spy_write_tail(monkeypatch, served.nic)
    before = served.server.messages
    _, _, frames = _tx_burst_state(bus, served, _posted(R.TDT, 2) + _posted(R.TCTL, 0, 2) + _posted(R.TDT, 4, 3),
                                   runs)
    assert len(frames) == 2  # frame 0 before the burst, frame 1 in it
    assert served.nic.peek32(R.TDH) == 2 and served.nic.peek32(R.TDT) == 4
    assert runs == [(R.TDT, [2])]  # TDT 4 was the last message in the buffer: plain write32
    assert served.server.messages - before >= 4 and served.server.posted_errors == 0


def test_wait_irq_sub_millisecond_timeout_is_not_rounded_to_a_millisecond(bus, monkeypatch):
    """poll() counts whole milliseconds; a 200 us wait uses select() with the timeout as given."""
    import driver.vfio_user_client as client

    seen = []
    real = client.select.select

    def spy(r, w, x, timeout):
        seen.append(timeout)
        return real(r, w, x, timeout)

    monkeypatch.setattr(client.select, "select", spy)
    assert not bus.wait_irq(0.0002)
    assert seen == [0.0002]
    bus.write32(R.IMS, R.Icr.TXDW)
    bus.write32(R.ICS, R.Icr.TXDW)
    assert bus.wait_irq(2.0)
    assert not bus.wait_irq(0)  # a zero timeout only looks (poll)
    assert seen == [0.0002, 2.0]
    bus.read32(R.ICR)


def test_emulator_turn_leaves_the_exact_earliest_deadline(tmp_path):
    """The loop asks each source for its deadline once a turn; when a timer fired, it asks
    again, as firing may arm another source's timer (here: a released frame starts RDTR)."""
    now = [1_000_000_000]
    clock = lambda: now[0]  # noqa: E731
    nic = Nic(DmaMemory(MEM), mac=MAC, engine="python", clock=clock)
    enable_bus_master(nic)
    RxRing(nic).setup()
    nic.write32(R.RDTR, 10)  # RXT0 10.24 us after a frame

    class Delayed:  # a timer source holding one frame until t = +1 ms
        due = now[0] + 1_000_000

        def next_deadline(self):
            return self.due

        def run_timers(self):
            self.due = None
            nic.receive(with_fcs(make_frame(size=60)))

    emu = Emulator(clock=clock)
    emu.add_nic(nic)
    emu.add_timer_source(Delayed())
    emu.run_once(0)
    assert emu._earliest == now[0] + 1_000_000
    now[0] += 1_000_000
    emu.run_once(0)
    assert nic.peek32(R.RDH) == 1
    assert emu._earliest == now[0] + 10 * 1024 == nic.next_deadline()
    assert emu._timeout() == pytest.approx(10.24e-6)
    emu.close()
    nic.mem.close()


def test_only_a_pair_that_can_hold_frames_is_a_timer_source():
    """A plain pair goes engine to engine and never holds a frame: the loop does not ask it
    for a deadline every turn. A pair with faults (delays) does, and its deadline is honoured."""
    nics = [Nic(DmaMemory(MEM), mac=MAC, engine="python") for _ in range(4)]
    with Emulator() as emu:
        fast = emu.add_pair(nics[0], nics[1])
        slow = emu.add_pair(nics[2], nics[3], faults_ab={"delay_ms": 0.1})
        assert fast not in emu.timer_sources and slow in emu.timer_sources
        assert emu._deadline_sources == (*nics, slow)
    for nic in nics:
        nic.mem.close()


# --- hostile clients (issue 7): fd limits, fair turns, accept() backoff ---------------------------

def test_fds_with_a_command_that_takes_none_are_closed_before_it_completes(raw, served):
    before = open_fds()
    r, w = os.pipe()
    msg = p.HEADER.pack(50, Command.REGION_WRITE, 36, 0, 0) + _access(R.TIPG, 0, 4) + struct.pack("<I", 5)
    socket.send_fds(raw.sock, [msg[:20]], [r, w])  # the header says: a command that takes no fds
    os.close(r)
    os.close(w)
    wait_for(lambda: open_fds() == before)  # the server's copies are closed while it waits for the rest
    raw.sock.sendall(msg[20:])
    assert raw.recv()[0] == (50, Command.REGION_WRITE, 16, p.REPLY_ERROR, errno.EINVAL)
    assert raw.read32(R.TIPG) == 0  # refused, not applied
    assert served.server.fds_refused == 2 and served.server.connected


def _expect_dropped(sock: socket.socket) -> None:
    """An Error reply (id 0, command 0, EINVAL) if it got out, then EOF."""
    data = b""
    try:
        while True:
            chunk = sock.recv(64)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    assert data in (b"", p.pack_error(0, 0, errno.EINVAL)), data


def test_more_than_max_msg_fds_with_one_message_drops_the_client(served):
    r = Raw(served.path)
    mem = DmaMemory(8192)
    before = open_fds()
    fds = [mem.fd] * (p.MAX_MSG_FDS + 1)  # the kernel passes 8 and closes the 9th (MSG_CTRUNC)
    r.send(Command.DMA_MAP, p.DMA_MAP.pack(32, 3, 0, 0x40000, 8192), fds=fds)
    _expect_dropped(r.sock)
    r.close()
    wait_for(lambda: not served.server.connected)
    assert open_fds() <= before
    mem.close()
    assert served.server.clients_dropped == 1 and served.server.fds_refused == p.MAX_MSG_FDS
    assert served.nic.mem.regions == []
    with VfioUserBus(served.path, MEM) as b:
        assert b.read32(R.STATUS) & R.Status.FD


@pytest.mark.parametrize("command", [Command.REGION_WRITE, Command.DMA_MAP, 99])
def test_fds_trickled_into_one_message_drop_the_client_at_max_msg_fds(served, command):
    r = Raw(served.path)
    before = open_fds()
    a, b = os.pipe()
    r.sock.sendall(p.HEADER.pack(7, command, 1 << 20, 0, 0))
    dropped = False
    for _ in range(100):  # 800 fds if nothing stops it
        try:
            socket.send_fds(r.sock, [b"\0"], [a, b] * 4)
        except (BrokenPipeError, ConnectionResetError):
            dropped = True
            break
        # ours, and what the server holds: the message's fds, plus one read's worth for an
        # instant before it drops the client (MAX_HELD_FDS); never the 800 sent
        assert len(open_fds() - before) <= 2 + MAX_HELD_FDS
    os.close(a)
    os.close(b)
    assert dropped
    _expect_dropped(r.sock)
    r.close()
    wait_for(lambda: not served.server.connected)
    assert open_fds() <= before
    assert served.server.clients_dropped == 1 and served.server.fds_refused == 2 * p.MAX_MSG_FDS


def test_fds_on_bytes_skipped_unread_are_bounded_too(served):
    r = Raw(served.path)
    before = open_fds()
    a, b = os.pipe()
    r.send(Command.REGION_WRITE, size=p.MAX_MSG_SIZE + 1)  # oversized: skipped as it arrives
    assert r.recv()[0][3:] == (p.REPLY_ERROR, errno.E2BIG)
    dropped = False
    for _ in range(100):
        try:
            socket.send_fds(r.sock, [b"\0"], [a, b] * 4)
        except (BrokenPipeError, ConnectionResetError):
            dropped = True
            break
    os.close(a)
    os.close(b)
    assert dropped
    _expect_dropped(r.sock)
    r.close()
    wait_for(lambda: not served.server.connected)
    assert open_fds() <= before and served.server.clients_dropped == 1


def _turn_until(emu: Emulator, cond, turns: int = 200) -> int:
    for n in range(1, turns + 1):
        emu.run_once(0.01)
        if cond():
            return n
    raise AssertionError("condition not met")


def test_a_burst_from_one_client_is_handled_in_bounded_batches_per_turn(tmp_path):
    """One device's client sends far more than a turn's work; the other device's request that
    arrived at the same time is answered in the first turn, and the burst over several."""
    from nicemu.vfio_user.server import WORK_PER_TURN

    emu = Emulator()
    nic_a, nic_b = Nic(DmaMemory(), mac=MAC, engine="python"), Nic(DmaMemory(), mac=PEER, engine="python")
    sa = emu.add_device("a", nic_a, str(tmp_path / "a.sock"))
    sb = emu.add_device("b", nic_b, str(tmp_path / "b.sock"))
    a, b = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    try:
        for sock, path, server in ((a, sa.socket_path, sa), (b, sb.socket_path, sb)):
            sock.connect(path)
            sock.sendall(p.pack_message(1, Command.VERSION, p.pack_version(0, 1, {})))
            _turn_until(emu, lambda server=server: server.messages == 1)
            sock.recv(4096)
        n = 2 * WORK_PER_TURN + 100
        a.sendall(b"".join(p.pack_message(i, Command.REGION_WRITE, _access(R.TIPG, 0, 4) + struct.pack("<I", i),
                                          flags=p.Flags.NO_REPLY) for i in range(n)))
        b.sendall(p.pack_message(2, Command.REGION_READ, _access(R.STATUS, 0, 4)))
        emu.run_once(0.01)
        assert sa.messages - 1 == WORK_PER_TURN  # one batch, not the whole burst
        b.settimeout(0)
        assert p.HEADER.unpack(b.recv(36)[:16])[0] == 2  # answered in that same turn
        assert _turn_until(emu, lambda: sa.messages - 1 == n) == 2  # one batch a turn
        assert nic_a.read32(R.TIPG) == n - 1
    finally:
        a.close()
        b.close()
        emu.close()


def test_a_run_of_doorbells_is_bounded_by_the_turn_too(tmp_path, monkeypatch):
    from nicemu.vfio_user.server import WORK_PER_TURN

    emu = Emulator()
    nic = Nic(DmaMemory(), mac=MAC, engine="python")
    server = emu.add_device("a", nic, str(tmp_path / "a.sock"))
    runs = _spy_write_tail(monkeypatch, nic)
    a = socket.socket(socket.AF_UNIX)
    try:
        a.connect(server.socket_path)
        a.sendall(p.pack_message(1, Command.VERSION, p.pack_version(0, 1, {})))
        _turn_until(emu, lambda: server.messages == 1)
        a.sendall(b"".join(_posted(R.TDT, 0, i) for i in range(WORK_PER_TURN + 10)))
        emu.run_once(0.01)
        assert [len(v) for _, v in runs] == [WORK_PER_TURN]
        _turn_until(emu, lambda: server.messages == WORK_PER_TURN + 11)
        assert [len(v) for _, v in runs] == [WORK_PER_TURN, 10]
    finally:
        a.close()
        emu.close()


class _FailingListener:
    """Stands in for the listening socket: accept() fails with `err` while `failing`."""

    def __init__(self, sock: socket.socket, err: int) -> None:
        self.sock, self.err, self.failing, self.calls = sock, err, True, 0

    def accept(self):
        self.calls += 1
        if self.failing:
            raise OSError(self.err, os.strerror(self.err))
        return self.sock.accept()

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("err", [errno.EMFILE, errno.ENFILE, errno.ENOBUFS])
def test_a_failing_accept_backs_off_and_is_logged_once(tmp_path, caplog, err):
    from conftest import FakeClock
    from nicemu.vfio_user.server import ACCEPT_BACKOFF_MAX_NS, ACCEPT_BACKOFF_MIN_NS

    clock = FakeClock()
    emu = Emulator(clock=clock)
    server = emu.add_device("a", Nic(DmaMemory(), mac=MAC, engine="python"), str(tmp_path / "a.sock"))
    server.listener = listener = _FailingListener(server.listener, err)
    client = socket.socket(socket.AF_UNIX)
    try:
        client.connect(server.socket_path)  # queued: the listening socket stays readable
        for _ in range(50):
            emu.run_once(0)
        assert listener.calls == 1 and server.accept_errors == 1  # not polled again, not spinning
        assert emu._timeout() == ACCEPT_BACKOFF_MIN_NS / 1e9  # the loop sleeps until the retry
        waited = 0
        for k in range(12):  # the backoff doubles up to its maximum
            step = min(ACCEPT_BACKOFF_MAX_NS, ACCEPT_BACKOFF_MIN_NS << k)
            clock.advance(step)
            waited += step
            emu.run_once(0)
            emu.run_once(0)
            assert listener.calls == k + 2
        assert step == ACCEPT_BACKOFF_MAX_NS
        listener.failing = False
        clock.advance(ACCEPT_BACKOFF_MAX_NS)
        emu.run_once(0)
        emu.run_once(0)
        assert server.connected and server.accept_errors == 13
        text = caplog.text
        assert text.count("a: accept failed") == 1 and text.count("accepting connections again") == 1
    finally:
        client.close()
        emu.close()
