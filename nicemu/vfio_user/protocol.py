"""The vfio-user message codec (the subset in docs/reference/vfio-user-subset.md), sans-IO.

Nothing here touches a socket. `Decoder` takes bytes (or lets a caller `recv_into` its buffer
directly, so that a burst of posted writes arrives in one syscall) and hands out complete
messages; the `*_struct` objects below are each command's payload layout; `pack_*` helpers
build whole messages. Every size is checked before it is trusted: a peer controls all of it.

Byte order: the spec says host endianness for the header and the command structs ('=' here);
the data of a region access is the device's own (PCI is little-endian), which the two ends
handle themselves.
"""
from __future__ import annotations

import enum
import errno
import json
import struct
from typing import Iterator, NamedTuple

__all__ = [
    "Command", "MsgType", "Flags", "ProtocolError", "FramingError", "Message", "Decoder",
    "HEADER", "HEADER_SIZE", "MAX_DATA_XFER_SIZE", "MAX_MSG_SIZE", "MAX_MSG_FDS",
    "MAX_VERSION_JSON", "MAX_JSON_DEPTH", "VERSION_MAJOR", "VERSION_MINOR", "pack_message",
    "pack_error", "parse_version", "pack_version", "json_depth",
]

# --- header -------------------------------------------------------------------------------
HEADER = struct.Struct("=HHIII")  # msg id, command, message size (header included), flags, error
HEADER_SIZE = HEADER.size  # 16

VERSION_MAJOR = 0
VERSION_MINOR = 1

# A region access moves at most this much data (announced in VERSION as max_data_xfer_size);
# a message may be this plus its fixed part. Anything larger is refused unread (E2BIG).
MAX_DATA_XFER_SIZE = 1 << 20
MAX_MSG_SIZE = MAX_DATA_XFER_SIZE + 64
MAX_MSG_FDS = 8  # announced as max_msg_fds; the server's ancillary buffer holds this many
# VERSION capabilities: at most this many bytes of JSON, nested at most this deep (a real
# client sends a few hundred bytes, three levels); checked before parsing (parse_version)
MAX_VERSION_JSON = 4096
MAX_JSON_DEPTH = 8


class Command(enum.IntEnum):
    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DEVICE_RESET = 13


COMMANDS = frozenset(int(c) for c in Command)


class MsgType(enum.IntEnum):
    COMMAND = 0
    REPLY = 1


class Flags(enum.IntFlag):
    TYPE_MASK = 0xF  # bits 3:0: MsgType
    NO_REPLY = 0x10
    ERROR = 0x20


REPLY_ERROR = int(MsgType.REPLY | Flags.ERROR)
# plain ints for hot paths (IntEnum/IntFlag arithmetic costs a Python call each)
TYPE_MASK = 0xF
TYPE_REPLY = 1
FLAG_NO_REPLY = 0x10
FLAG_ERROR = 0x20

# --- command payloads ---------------------------------------------------------------------
VERSION = struct.Struct("=HH")  # major, minor; then a JSON capabilities string (NUL-terminated)

DMA_MAP = struct.Struct("=IIQQQ")  # argsz, flags, offset (in the fd), address (bus), size
DMA_MAP_READ = 1 << 0
DMA_MAP_WRITE = 1 << 1

DMA_UNMAP = struct.Struct("=IIQQ")  # argsz, flags, address, size

DEVICE_INFO = struct.Struct("=IIII")  # argsz, flags, num_regions, num_irqs
DEVICE_FLAGS_RESET = 1 << 0  # VFIO_DEVICE_FLAGS_RESET
DEVICE_FLAGS_PCI = 1 << 1  # VFIO_DEVICE_FLAGS_PCI

REGION_INFO = struct.Struct("=IIIIQQ")  # argsz, flags, index, cap_offset, size, offset
REGION_INFO_FLAG_READ = 1 << 0
REGION_INFO_FLAG_WRITE = 1 << 1

IRQ_INFO = struct.Struct("=IIII")  # argsz, flags, index, count
IRQ_INFO_EVENTFD = 1 << 0

IRQ_SET = struct.Struct("=IIIII")  # argsz, flags, index, start, count; then data
IRQ_SET_DATA_NONE = 1 << 0
IRQ_SET_DATA_BOOL = 1 << 1
IRQ_SET_DATA_EVENTFD = 1 << 2
IRQ_SET_ACTION_MASK = 1 << 3
IRQ_SET_ACTION_UNMASK = 1 << 4
IRQ_SET_ACTION_TRIGGER = 1 << 5

REGION_ACCESS = struct.Struct("=QII")  # offset, region, count; a write (and a read's reply) adds data

# VFIO PCI region and IRQ indices
BAR0_REGION = 0
ROM_REGION = 6
CONFIG_REGION = 7
VGA_REGION = 8
NUM_REGIONS = 9
INTX_IRQ = 0
MSI_IRQ = 1
MSIX_IRQ = 2
NUM_IRQS = 5  # INTx, MSI, MSI-X, ERR, REQ as VFIO PCI counts them


class ProtocolError(Exception):
    """A message the receiver refuses; `errno` goes into the Error reply."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(f"{message} ({errno.errorcode.get(err, err)})")
        self.errno = err


class FramingError(ProtocolError):
    """The byte stream itself is broken (a header whose size is below 16): no way to find the
    next message, so the connection has to go."""


class Message(NamedTuple):
    """One complete message. `payload` is a view into the decoder's buffer: valid until the
    decoder is used again (copy it to keep it). `start` is its offset in the byte stream
    (the server uses it to match file descriptors that came with it)."""

    msg_id: int
    command: int
    flags: int
    error: int
    payload: memoryview
    start: int

    @property
    def end(self) -> int:
        return self.start + HEADER_SIZE + len(self.payload)

    @property
    def is_reply(self) -> bool:
        return self.flags & TYPE_MASK == TYPE_REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & FLAG_NO_REPLY)


class Decoder:
    """Turns a byte stream into `Message`s.

    The buffer is one preallocated bytearray (never resized, so views into it stay valid and
    the hot path allocates nothing but the message tuple). A caller either `feed`s bytes or
    reads straight into `writable()` and calls `commit(n)`. `messages()` yields every complete
    message in the buffer; an oversized one is not buffered: the decoder raises ProtocolError
    (E2BIG) for it once and then silently skips its bytes, so the stream stays in step.
    A header announcing fewer than 16 bytes raises FramingError: the stream cannot be resynced.
    """

    def __init__(self, max_msg_size: int = MAX_MSG_SIZE) -> None:
        if max_msg_size < HEADER_SIZE:
            raise ValueError("max_msg_size must hold a header")
        self.max_msg_size = max_msg_size
        self.buf = bytearray(max_msg_size)
        self.view = memoryview(self.buf)
        self.start = 0  # first unconsumed byte in buf
        self.end = 0  # one past the last received byte in buf
        self.base = 0  # stream offset of buf[0]
        self._skip = 0  # bytes of an oversized message still to drop
        self.last_oversized = (0, 0, 0)  # (msg id, command, flags) of the last one refused
        self.skip_start = -1  # stream offset of the last oversized message (being) skipped

    # --- input ------------------------------------------------------------------------

    @property
    def stream_pos(self) -> int:
        """Stream offset one past the last byte received."""
        return self.base + self.end

    @property
    def consumed_pos(self) -> int:
        """Stream offset of the first byte not yet handed out (or skipped)."""
        return self.base + self.start

    @property
    def skipping(self) -> bool:
        """An oversized message is being dropped as its bytes arrive (it began at skip_start)."""
        return self._skip > 0

    def pending(self) -> int:
        """Bytes of an incomplete message held (non-zero at EOF = the peer left mid-message)."""
        return self.end - self.start + self._skip

    def peek_header(self) -> tuple[int, int, int, int, int] | None:
        """The header of the next message (msg id, command, size, flags, error) once its 16
        bytes are in, complete or not; None before."""
        if self.end - self.start < HEADER_SIZE:
            return None
        return HEADER.unpack_from(self.buf, self.start)

    def writable(self) -> memoryview:
        """Free space at the end of the buffer to receive into (compacts first if needed)."""
        if self.start and (self.start == self.end or len(self.buf) - self.end < HEADER_SIZE * 64):
            self._compact()
        return self.view[self.end :]

    def commit(self, n: int) -> None:
        """`n` bytes were written into `writable()`."""
        self.end += n
        if self._skip:
            self._drop_skipped()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Copy `data` in (tests and simple callers). Between feeds of more than one buffer's
        worth, take the messages out (`messages()`), as the server does after every read."""
        data = memoryview(data).cast("B")
        while len(data):
            w = self.writable()
            if not len(w):
                raise ProtocolError(errno.E2BIG, "decoder buffer full: take messages() out between feeds")
            n = min(len(w), len(data))
            w[:n] = data[:n]
            self.commit(n)
            data = data[n:]

    def _compact(self) -> None:
        n = self.end - self.start
        self.buf[0:n] = self.buf[self.start : self.end]  # same length: no resize, views stay valid
        self.base += self.start
        self.start, self.end = 0, n

    def _drop_skipped(self) -> None:
        n = min(self._skip, self.end - self.start)
        self.start += n
        self._skip -= n

    # --- output -----------------------------------------------------------------------

    def next_message(self) -> Message | None:
        """The next complete message, or None until more bytes arrive.

        Raises FramingError (size field below 16: the stream is lost) or ProtocolError E2BIG
        (an oversized message, then skipped; `last_oversized` names it; call again to go on).
        """
        start, end = self.start, self.end
        if end - start < HEADER_SIZE:
            return None
        msg_id, command, size, flags, err = HEADER.unpack_from(self.buf, start)
        if size < HEADER_SIZE:
            raise FramingError(errno.EINVAL, f"message size {size} is smaller than the header")
        if size > self.max_msg_size:
            self.last_oversized = (msg_id, command, flags)
            self.skip_start = self.base + start
            self._skip = size
            self._drop_skipped()
            raise ProtocolError(
                errno.E2BIG, f"message {msg_id} (command {command}) of {size} bytes exceeds "
                f"the {self.max_msg_size}-byte limit")
        if end - start < size:
            if len(self.buf) - start < size:  # make room for the rest of it
                self._compact()
            return None
        self.start = start + size
        return Message(msg_id, command, flags, err, self.view[start + HEADER_SIZE : start + size], self.base + start)

    def messages(self) -> Iterator[Message]:
        """Yield the complete messages buffered so far, in order."""
        while (msg := self.next_message()) is not None:
            yield msg


# --- building messages -----------------------------------------------------------------

def pack_message(msg_id: int, command: int, payload: bytes = b"", *, flags: int = 0, error: int = 0) -> bytes:
    return HEADER.pack(msg_id, command, HEADER_SIZE + len(payload), flags, error) + payload


def pack_error(msg_id: int, command: int, err: int) -> bytes:
    """An Error reply: the header alone."""
    return HEADER.pack(msg_id, command, HEADER_SIZE, REPLY_ERROR, err)


def pack_version(major: int, minor: int, capabilities: dict) -> bytes:
    """VERSION payload: major, minor, JSON capabilities, NUL-terminated (as libvfio-user sends)."""
    return VERSION.pack(major, minor) + json.dumps(capabilities).encode() + b"\0"


def parse_version(payload: bytes | memoryview) -> tuple[int, int, dict]:
    """(major, minor, capabilities) from a VERSION payload; ProtocolError when malformed.

    The capabilities are checked for size (MAX_VERSION_JSON), encoding (UTF-8) and nesting
    (MAX_JSON_DEPTH) before the JSON parser sees them: json.loads recurses once per level, and
    a peer must not be able to make it raise RecursionError or work on megabytes."""
    if len(payload) < VERSION.size:
        raise ProtocolError(errno.EINVAL, f"VERSION payload of {len(payload)} bytes, need {VERSION.size}")
    major, minor = VERSION.unpack_from(payload)
    raw = payload[VERSION.size :]
    if len(raw) > MAX_VERSION_JSON + 1:  # + its NUL
        raise ProtocolError(errno.EINVAL, f"VERSION capabilities of {len(raw)} bytes exceed "
                                          f"the {MAX_VERSION_JSON}-byte limit")
    caps: dict = {}
    try:
        text = bytes(raw).rstrip(b"\0").decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(errno.EINVAL, "VERSION capabilities are not UTF-8") from None
    if text:
        depth = json_depth(text)
        if depth > MAX_JSON_DEPTH:
            raise ProtocolError(errno.EINVAL, f"VERSION capabilities nest {depth} levels deep, "
                                              f"more than {MAX_JSON_DEPTH}")
        try:
            caps = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise ProtocolError(errno.EINVAL, f"VERSION capabilities are not JSON: {e}") from None
        if not isinstance(caps, dict):
            raise ProtocolError(errno.EINVAL, "VERSION capabilities must be a JSON object")
    return major, minor, caps


def json_depth(text: str) -> int:
    """How deep the arrays and objects of JSON `text` nest, counted without parsing (brackets
    inside strings do not count). Malformed text gets some number; json.loads refuses it."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "[" or ch == "{":
            depth += 1
            if depth > deepest:
                deepest = depth
        elif ch == "]" or ch == "}":
            depth -= 1
    return deepest


def server_capabilities() -> dict:
    return {"capabilities": {"max_msg_fds": MAX_MSG_FDS, "max_data_xfer_size": MAX_DATA_XFER_SIZE}}


def expect_size(command: int, payload: memoryview | bytes, size: int) -> None:
    """Raise EINVAL unless the payload is exactly `size` bytes (fixed-size commands)."""
    if len(payload) != size:
        raise ProtocolError(
            errno.EINVAL, f"{Command(command).name} payload is {len(payload)} bytes, expected {size}")


def expect_argsz(command: int, argsz: int, size: int) -> None:
    """Raise EINVAL when a request's argsz is smaller than its fixed part (as VFIO and
    libvfio-user refuse it): argsz says how much the client provides."""
    if argsz < size:
        raise ProtocolError(errno.EINVAL, f"{command_name(command)} argsz {argsz} is smaller than {size}")


def command_name(command: int) -> str:
    try:
        return Command(command).name
    except ValueError:
        return f"command {command}"
