"""VfioUserBus: the driver's Bus to a device in an emulator process, over vfio-user.

The driver side owns host memory, as a host does: `VfioUserBus` creates the DmaMemory (a
memfd), DMA_MAPs it at bus address 0 and attaches an eventfd as the INTx trigger. Then:
- write32 is a posted REGION_WRITE (No_reply): one sendmsg, no wait, as a PCIe doorbell;
- read32 is a REGION_READ round trip; because the server handles commands in order, its reply
  also proves every earlier posted write is done (PCIe's "read flushes posted writes");
- wait_irq waits on the eventfd and the socket together, so an emulator that dies wakes the
  driver with BusError instead of leaving it asleep; check_present looks at the socket alone,
  without waiting, for a driver that polls memory and never sleeps.
Every failure of the transport (EOF, a socket error, an Error reply, a timeout) is BusError.
"""
from __future__ import annotations

import errno
import fcntl
import math
import mmap
import os
import select
import socket
import struct
import time

from driver.bus import BusError
from nicemu.dma import DmaMemory
from nicemu.regs import RDT, TDT
from nicemu.vfio_user import doorbell as db
from nicemu.vfio_user import protocol as p
from nicemu.vfio_user.protocol import Command, Flags

__all__ = ["VfioUserBus", "BusError"]

DEFAULT_MEM_SIZE = 4 << 20
_WRITE32 = struct.Struct("=HHIIIQIII")  # header + REGION_ACCESS + one dword, packed at once
_READ = struct.Struct("=HHIIIQII")  # header + REGION_ACCESS
_NO_REPLY = int(Flags.NO_REPLY)
_ERROR = int(Flags.ERROR)
_REGION_WRITE = int(Command.REGION_WRITE)
_REGION_READ = int(Command.REGION_READ)
_FD_SETSIZE = 1024  # select() cannot watch descriptors from here on (glibc's FD_SETSIZE)


def _errname(err: int) -> str:
    return f"{errno.errorcode.get(err, err)}: {os.strerror(err)}" if err else "no errno"


class VfioUserBus:
    """A `driver.bus.Bus` to the device served on `socket_path`.

    `mem_size`: bytes of DMA memory to create and map at bus address 0 (`self.mem`).
    `timeout`: seconds a reply may take before the device is declared gone.
    One thread at a time: requests and wait_irq share the socket, as a driver's single
    context does.
    """

    def __init__(self, socket_path: str, mem_size: int = DEFAULT_MEM_SIZE, *, timeout: float = 5.0,
                 doorbell_page: bool = False, page_engine: str = "cython") -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.bar0_size = 0
        self.reads = 0  # BAR0 accesses, as InProcessBus counts them (the driver's stats show them)
        self.writes = 0
        self._id = 0
        self._sent = 0  # messages sent on this connection (the doorbell page's `after`)
        # the doorbell page (docs/transport.md): asked for with doorbell_page=True, used if offered
        self.page = None  # DoorbellPage / DoorbellPageRef once the emulator took it
        self._page_mm: mmap.mmap | None = None
        self._page_seq = [0, 0]
        self.page_doorbells = 0  # tail writes that went to the page alone
        self.page_wakeups = 0  # ... that found NEED_WAKE set and were sent as a REGION_WRITE too
        self._buf = bytearray(p.HEADER_SIZE + p.REGION_ACCESS.size + p.MAX_DATA_XFER_SIZE)
        self._view = memoryview(self._buf)
        self._eventfd: int | None = None
        self._reply_deadline: float | None = None  # set once a reply comes in pieces
        self.mem: DmaMemory | None = None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.settimeout(timeout)  # a stopped emulator must not hang connect()
            try:
                self.sock.connect(socket_path)
            except OSError as e:
                raise BusError(f"cannot connect to the emulator at {socket_path}: {e}") from None
            self.sock.settimeout(None)
            # A blocking socket with kernel timeouts: socket.settimeout() would add a poll()
            # before every recv and send, a syscall per MMIO access for nothing.
            tv = struct.pack("ll", int(timeout), int((timeout % 1) * 1e6))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
            try:
                self._negotiate(doorbell_page)
            except (p.ProtocolError, struct.error, ValueError, TypeError, AttributeError, OverflowError,
                    RecursionError) as e:
                # the emulator is as untrusted as any peer: a bad reply is a bus error, not a crash
                raise BusError(f"malformed reply from the emulator: {type(e).__name__}: {e}") from None
            self.mem = DmaMemory(mem_size, name="nicemu-driver-dma")
            self.dma_map(self.mem.fd, 0, mem_size)
            if self._page_offer is not None:
                self._setup_page(page_engine)
            self._eventfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._set_irq_eventfd(self._eventfd)
            self._poll = select.poll()  # poll, not select(): no FD_SETSIZE limit on fd numbers
            self._poll.register(self._eventfd, select.POLLIN)
            self._poll.register(self.sock, select.POLLIN)
            self._sock_poll = select.poll()  # the socket alone: check_present()
            self._sock_poll.register(self.sock, select.POLLIN)
            # poll() counts in whole milliseconds (CPython rounds a timeout up), so a 100 us
            # wait would sleep 1 ms; select() takes microseconds. It is used for finite timeouts
            # when both descriptors fit in an fd_set (as ppoll would be, had Python one).
            watched = (self._eventfd, self.sock.fileno())
            self._select_fds = list(watched) if max(watched) < _FD_SETSIZE else None
        except BaseException:
            self.close()
            raise

    # --- setup ----------------------------------------------------------------------------

    def _negotiate(self, doorbell_page: bool = False) -> None:
        ours: dict = {"max_msg_fds": 1, "max_data_xfer_size": p.MAX_DATA_XFER_SIZE}
        if doorbell_page:
            ours[db.CAPABILITY] = {"version": 1}
        reply = self._request(Command.VERSION, p.pack_version(p.VERSION_MAJOR, p.VERSION_MINOR,
                                                              {"capabilities": ours}))
        major, minor, caps = p.parse_version(reply)
        if major != p.VERSION_MAJOR:
            raise BusError(f"emulator speaks vfio-user {major}.{minor}")
        self.server_caps = caps.get("capabilities", {})
        self.max_data_xfer_size = int(self.server_caps.get("max_data_xfer_size", 4096))
        offer = self.server_caps.get(db.CAPABILITY) if doorbell_page else None
        # the page as this client knows it, or nothing: an emulator that does not offer it (or
        # offers another layout) gets the plain protocol
        self._page_offer = offer if (isinstance(offer, dict) and offer.get("version") == 1
                                     and offer.get("command") == db.COMMAND
                                     and offer.get("size") == db.PAGE_SIZE) else None

        info = self._request(Command.DEVICE_GET_INFO, p.DEVICE_INFO.pack(p.DEVICE_INFO.size, 0, 0, 0))
        _, self.device_flags, self.num_regions, self.num_irqs = p.DEVICE_INFO.unpack(info)
        if not self.device_flags & p.DEVICE_FLAGS_PCI or self.num_regions <= p.CONFIG_REGION:
            raise BusError(f"not a PCI device (flags {self.device_flags:#x}, {self.num_regions} regions)")
        self.bar0_size = self.region_info(p.BAR0_REGION)[1]
        self.config_size = self.region_info(p.CONFIG_REGION)[1]
        if self.bar0_size == 0 or self.config_size < 64:
            raise BusError(f"device regions too small: BAR0 {self.bar0_size}, config {self.config_size}")
        irq = self._request(Command.DEVICE_GET_IRQ_INFO, p.IRQ_INFO.pack(p.IRQ_INFO.size, 0, p.INTX_IRQ, 0))
        _, irq_flags, _, count = p.IRQ_INFO.unpack(irq)
        if count < 1 or not irq_flags & p.IRQ_INFO_EVENTFD:
            raise BusError("the device has no INTx that can signal an eventfd")

    def _setup_page(self, engine: str) -> None:
        """A sealed memfd page of our own, sent with NICEMU_DOORBELL_PAGE; from then on TDT and
        RDT writes go to it (write32)."""
        fd = os.memfd_create("nicemu-doorbell", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, db.PAGE_SIZE)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            mm = mmap.mmap(fd, db.PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            try:
                self._request(db.COMMAND, db.PAGE_REQUEST.pack(db.PAGE_REQUEST.size, db.FLAG_ENABLE, 0,
                                                               db.PAGE_SIZE), fds=[fd])
            except BaseException:
                mm.close()
                raise
        finally:
            os.close(fd)
        self._page_mm = mm
        self.page = db.make_page(mm, engine)

    @property
    def doorbell_page(self) -> bool:
        """Whether TDT/RDT writes go to the doorbell page."""
        return self.page is not None

    def region_info(self, index: int) -> tuple[int, int]:
        """(flags, size) of region `index`."""
        reply = self._request(Command.DEVICE_GET_REGION_INFO, p.REGION_INFO.pack(p.REGION_INFO.size, 0, index, 0, 0, 0))
        _, flags, _, _, size, _ = p.REGION_INFO.unpack(reply)
        return flags, size

    def dma_map(self, fd: int, address: int, size: int, offset: int = 0, writable: bool = True) -> None:
        flags = p.DMA_MAP_READ | (p.DMA_MAP_WRITE if writable else 0)
        self._request(Command.DMA_MAP, p.DMA_MAP.pack(p.DMA_MAP.size, flags, offset, address, size), fds=[fd])

    def dma_unmap(self, address: int, size: int) -> None:
        self._request(Command.DMA_UNMAP, p.DMA_UNMAP.pack(p.DMA_UNMAP.size, 0, address, size))

    def _set_irq_eventfd(self, fd: int) -> None:
        flags = p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER
        self._request(Command.DEVICE_SET_IRQS, p.IRQ_SET.pack(p.IRQ_SET.size, flags, p.INTX_IRQ, 0, 1), fds=[fd])

    # --- the Bus ---------------------------------------------------------------------------

    def read32(self, offset: int) -> int:
        if not 0 <= offset < self.bar0_size:
            raise ValueError(f"BAR0 offset {offset:#x} is outside [0, {self.bar0_size:#x})")
        self.reads += 1
        data = self._region_read(p.BAR0_REGION, offset, 4)
        return int.from_bytes(data, "little")

    def write32(self, offset: int, value: int) -> None:
        if not 0 <= offset < self.bar0_size:  # as Nic.write32: a driver bug, not a device error
            raise ValueError(f"BAR0 offset {offset:#x} is outside [0, {self.bar0_size:#x})")
        self.writes += 1
        page = self.page
        if page is not None and (offset == TDT or offset == RDT):
            # the tail goes to the page; a REGION_WRITE of it only if the emulator sleeps
            slot = db.SLOT_TDT if offset == TDT else db.SLOT_RDT
            seq = self._page_seq[slot] = (self._page_seq[slot] + 1) & 0xFFFF
            if not page.client_write(slot, (value & 0xFFFF) | seq << 16 | (self._sent & 0xFFFFFFFF) << 32):
                self.page_doorbells += 1
                return
            self.page_wakeups += 1
        self._sent += 1
        self._id = msg_id = (self._id + 1) & 0xFFFF
        msg = _WRITE32.pack(msg_id, _REGION_WRITE, _WRITE32.size, _NO_REPLY, 0, offset, p.BAR0_REGION, 4,
                            value & 0xFFFFFFFF)
        try:
            self.sock.sendall(msg)
        except OSError as e:
            raise BusError(f"emulator gone: posted write to {offset:#x} failed: {e}") from None

    def config_read(self, offset: int, size: int = 4) -> int:
        return int.from_bytes(self._region_read(p.CONFIG_REGION, offset, size), "little")

    def config_write(self, offset: int, value: int, size: int = 4) -> None:
        self._request(Command.REGION_WRITE,
                      p.REGION_ACCESS.pack(offset, p.CONFIG_REGION, size) + value.to_bytes(size, "little"))

    def read_region(self, region: int, offset: int, count: int) -> bytes:
        """A raw REGION_READ (e.g. the whole config space)."""
        return bytes(self._region_read(region, offset, count))

    def irq_fd(self) -> int:
        if self._eventfd is None:
            raise BusError("bus is closed")
        return self._eventfd

    def wait_irq(self, timeout: float | None) -> bool:
        """Wait for the INTx eventfd; the socket is watched too: EOF means the emulator died."""
        efd = self.irq_fd()
        try:
            if timeout is not None and timeout > 0 and self._select_fds is not None:
                ready = select.select(self._select_fds, (), (), timeout)[0]  # microseconds
            else:
                ready = [fd for fd, _ in self._poll.poll(None if timeout is None else
                                                         max(0, math.ceil(timeout * 1000)))]
        except OSError as e:
            raise BusError(f"wait for interrupt failed: {e}") from None
        if not ready:
            return False
        if efd in ready:
            try:
                os.eventfd_read(efd)
            except BlockingIOError:  # consumed elsewhere meanwhile
                pass
            return True
        self._socket_readable("while waiting for an interrupt")
        return False  # spurious wake-up

    def check_present(self) -> None:
        """BusError if the emulator has gone, without waiting (DPDK's rte_eth_dev_is_removed).

        A polling driver touches the socket only for doorbells and statistics, so without
        this it learns of a dead emulator only at its next register read. One non-blocking
        poll() of the socket: cheap enough every 100 ms, too dear for every burst.
        """
        if self.sock.fileno() < 0:
            raise BusError("bus is closed")
        try:
            ready = self._sock_poll.poll(0)
        except OSError as e:
            raise BusError(f"emulator gone: {e}") from None
        if ready:
            self._socket_readable("while the driver polled its rings")

    def _socket_readable(self, when: str) -> None:
        """The socket is readable with no request out: BusError unless the wake-up was spurious.

        The server never talks unasked, so what is there is EOF, an error or a protocol fault.
        """
        try:
            data = self.sock.recv(p.HEADER_SIZE, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as e:
            raise BusError(f"emulator gone: {e}") from None
        if not data:
            raise BusError(f"emulator gone: the connection closed {when}")
        raise BusError(f"unexpected message from the emulator {when}: {bytes(data)!r}")

    def reset(self) -> None:
        self._request(Command.DEVICE_RESET, b"")

    def close(self) -> None:
        """Disconnect (the emulator resets the device) and free the DMA memory."""
        if self.sock.fileno() >= 0:
            self.sock.close()
        if self._eventfd is not None:
            os.close(self._eventfd)
            self._eventfd = None
        if self.page is not None:
            self.page.release()
            self.page = None
        if self._page_mm is not None:
            self._page_mm.close()
            self._page_mm = None
        if self.mem is not None:
            self.mem.close()

    def __enter__(self) -> "VfioUserBus":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- messages -------------------------------------------------------------------------

    def _region_read(self, region: int, offset: int, count: int) -> memoryview:
        self._sent += 1
        self._id = msg_id = (self._id + 1) & 0xFFFF
        try:
            self.sock.sendall(_READ.pack(msg_id, _REGION_READ, _READ.size, 0, 0, offset, region, count))
        except OSError as e:
            raise BusError(f"emulator gone: read of region {region} at {offset:#x} failed: {e}") from None
        payload = self._reply(msg_id, _REGION_READ, _READ.size + count)
        if len(payload) != p.REGION_ACCESS.size + count:
            raise BusError(f"REGION_READ reply of {len(payload)} bytes for {count} bytes of data")
        return payload[p.REGION_ACCESS.size :]

    def _request(self, command: int, payload: bytes, fds: list[int] | None = None) -> memoryview:
        """Send a command and return its reply's payload (valid until the next request)."""
        self._sent += 1
        self._id = msg_id = (self._id + 1) & 0xFFFF
        msg = p.pack_message(msg_id, command, payload)
        try:
            if fds:
                sent = socket.send_fds(self.sock, [msg], fds)
                if sent < len(msg):
                    self.sock.sendall(msg[sent:])
            else:
                self.sock.sendall(msg)
        except OSError as e:
            raise self._gone(f"{p.command_name(command)} failed: {e}") from None
        return self._reply(msg_id, command)

    def _gone(self, what: str) -> BusError:
        """The connection broke: if the server left a last word (EBUSY for a second client,
        sent just before it closed), report that instead of the bare socket error."""
        try:
            data = self.sock.recv(p.HEADER_SIZE, socket.MSG_DONTWAIT)
        except OSError:
            data = b""
        if len(data) == p.HEADER_SIZE:
            _, _, _, flags, err = p.HEADER.unpack(data)
            if flags & Flags.ERROR and err == errno.EBUSY:
                return BusError(f"device busy: another driver holds it ({_errname(err)})")
        return BusError(f"emulator gone: {what}")

    def _reply(self, msg_id: int, command: int, expect: int = p.HEADER_SIZE) -> memoryview:
        """Receive one reply; BusError on EOF, timeout, an Error reply or a mismatched id.

        Replies come one at a time (the client waits for each), so asking for up to `expect`
        bytes (the size the reply should have) never reads into a later message, and a read32
        costs one recv.
        """
        self._reply_deadline = None
        have = self._recv_at_least(0, p.HEADER_SIZE, expect, command)
        rid, rcmd, size, flags, err = p.HEADER.unpack_from(self._buf)
        if flags & _ERROR:
            if rid != msg_id and err == errno.EBUSY:
                raise BusError(f"device busy: another driver holds it ({_errname(err)})")
            raise BusError(f"emulator refused {p.command_name(command)}: {_errname(err)}")
        if size < p.HEADER_SIZE or size > len(self._buf):
            raise BusError(f"bad reply size {size}")
        if have < size:
            have = self._recv_at_least(have, size, size, command)
        if rid != msg_id or rcmd != command or flags & p.TYPE_MASK != p.TYPE_REPLY or have != size:
            raise BusError(f"unexpected reply (id {rid}, command {rcmd}, {have} bytes) to "
                           f"{p.command_name(command)} id {msg_id}")
        return self._view[p.HEADER_SIZE : size]

    def _recv_at_least(self, have: int, need: int, upto: int, command: int) -> int:
        """Receive until `need` bytes are in. SO_RCVTIMEO bounds each recv; the whole reply
        gets `timeout` too, from its first partial piece on, so an emulator that dribbles a
        byte at a time cannot hold a register read for minutes (the clock is read only then)."""
        while have < need:
            try:
                n = self.sock.recv_into(self._view[have:upto])
            except (socket.timeout, BlockingIOError):  # SO_RCVTIMEO expired
                raise BusError(f"emulator did not answer {p.command_name(command)} in {self.timeout} s") from None
            except OSError as e:
                raise BusError(f"emulator gone: {e}") from None
            if n == 0:
                raise BusError(f"emulator gone: connection closed during {p.command_name(command)}")
            have += n
            if have < need:
                now = time.monotonic()
                if self._reply_deadline is None:
                    self._reply_deadline = now + self.timeout
                elif now > self._reply_deadline:
                    raise BusError(f"emulator did not answer {p.command_name(command)} in {self.timeout} s "
                                   f"({have} bytes of it came)")
        return have
