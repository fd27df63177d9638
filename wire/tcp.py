"""TCP (RFC 9293 3.1): the header, its options, and the checksum over the IPv4 pseudo-header.

    source port, destination port, sequence number, acknowledgment number,
    data offset (4 bits, 32-bit words) | reserved (4) | flags (CWR ECE URG ACK PSH RST SYN FIN),
    window, checksum, urgent pointer, options (to the data offset), data.

Options (RFC 9293 3.2): "an option may begin on any octet boundary"; kind 0 (EOL) and 1 (NOP)
are one octet, every other kind has a length octet that counts kind and length. Known kinds:
MSS (2, RFC 9293), window scale (3, RFC 7323), SACK-permitted (4) and SACK (5, RFC 2018),
timestamps (8, RFC 7323). "A TCP implementation MUST be able to receive a TCP Option without
a length octet if it is EOL or NOP, and MUST ignore options it does not implement" (MUST-64):
unknown kinds are skipped by their length; a length below 2 or past the header is malformed.

A TcpSegment is one flat object (no per-option objects): the engine reads its fields directly.
`payload` may be a memoryview of the received buffer: it is valid for the call that takes it.
"""
from __future__ import annotations

import struct

from wire import MalformedPacket
from wire.checksum import fold, ones_sum
from wire.ipv4 import IPPROTO_TCP

__all__ = [
    "TCP_MIN_HLEN", "TCP_MAX_HLEN", "TH_FIN", "TH_SYN", "TH_RST", "TH_PSH", "TH_ACK", "TH_URG",
    "TH_ECE", "TH_CWR", "TCPOPT_EOL", "TCPOPT_NOP", "TCPOPT_MSS", "TCPOPT_WINDOW",
    "TCPOPT_SACK_PERMITTED", "TCPOPT_SACK", "TCPOPT_TIMESTAMP", "TCP_MAX_WSCALE",
    "TCP_DEFAULT_MSS", "HDR", "TcpSegment", "tcp_checksum", "flags_str",
]

TCP_MIN_HLEN = 20  # data offset 5
TCP_MAX_HLEN = 60  # data offset is 4 bits of 32-bit words

TH_FIN = 0x01
TH_SYN = 0x02
TH_RST = 0x04
TH_PSH = 0x08
TH_ACK = 0x10
TH_URG = 0x20
TH_ECE = 0x40
TH_CWR = 0x80

TCPOPT_EOL = 0
TCPOPT_NOP = 1
TCPOPT_MSS = 2
TCPOPT_WINDOW = 3
TCPOPT_SACK_PERMITTED = 4
TCPOPT_SACK = 5
TCPOPT_TIMESTAMP = 8

TCP_MAX_WSCALE = 14  # RFC 7323 2.3: "the shift count must be limited to 14"
TCP_DEFAULT_MSS = 536  # RFC 9293 3.7.1: "the default send MSS is 536" when no option came

# sport, dport, seq, ack, offset<<4 (reserved low bits), flags, window, checksum, urgent
HDR = struct.Struct("!HHIIBBHHH")
_U16 = struct.Struct("!H")
_U32x2 = struct.Struct("!II")
# The common data/ACK segment with timestamps (RFC 7323 appendix A's layout, Linux's on every
# segment after the handshake): the header, NOP NOP TS(8, 10), TSval, TSecr: 32 bytes that
# pack and unpack in one call.
HDR_TS = struct.Struct("!HHIIBBHHHIII")
TS_PREFIX = 0x0101080A  # NOP, NOP, kind 8, length 10
_TS_OFF_BYTE = (32 // 4) << 4

_FLAG_NAMES = ((TH_FIN, "F"), (TH_SYN, "S"), (TH_RST, "R"), (TH_PSH, "P"), (TH_ACK, "."),
               (TH_URG, "U"), (TH_ECE, "E"), (TH_CWR, "W"))


def flags_str(flags: int) -> str:
    """tcpdump's flag letters: S, F, R, P, '.' for ACK."""
    return "".join(n for f, n in _FLAG_NAMES if flags & f) or "none"


def _pseudo_sum(src: int, dst: int, length: int) -> int:
    """The pseudo-header's unfolded sum from the addresses as ints (RFC 9293 3.1): the same
    one's complement sum as wire.checksum.pseudo_header_sum without building its 12 bytes."""
    return (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF) + IPPROTO_TCP + length


def tcp_checksum(segment: bytes | bytearray | memoryview, src: int, dst: int) -> int:
    """The checksum field for `segment` (its checksum field zero)."""
    return ~fold(ones_sum(segment, _pseudo_sum(src, dst, len(segment)))) & 0xFFFF


class TcpSegment:
    """A TCP segment: header fields, the options we know, and the payload.

    Options absent are None (mss, wscale, tsval) or False/() (sack_permitted, sack). `tsecr`
    is meaningful only when tsval is not None. `sack` is a tuple of (left, right) edges."""

    __slots__ = ("sport", "dport", "seq", "ack", "flags", "window", "urgent", "mss", "wscale",
                 "sack_permitted", "sack", "tsval", "tsecr", "payload", "checksum")

    def __init__(self, sport: int, dport: int, seq: int = 0, ack: int = 0, flags: int = 0,
                 window: int = 0, payload: bytes | bytearray | memoryview = b"", *,
                 urgent: int = 0, mss: int | None = None, wscale: int | None = None,
                 sack_permitted: bool = False, sack: tuple = (), tsval: int | None = None,
                 tsecr: int = 0, checksum: int = 0) -> None:
        self.sport = sport
        self.dport = dport
        self.seq = seq
        self.ack = ack
        self.flags = flags
        self.window = window
        self.urgent = urgent
        self.mss = mss
        self.wscale = wscale
        self.sack_permitted = sack_permitted
        self.sack = sack
        self.tsval = tsval
        self.tsecr = tsecr
        self.payload = payload
        self.checksum = checksum

    def __repr__(self) -> str:
        opts = []
        if self.mss is not None:
            opts.append(f"mss {self.mss}")
        if self.wscale is not None:
            opts.append(f"wscale {self.wscale}")
        if self.sack_permitted:
            opts.append("sackOK")
        if self.sack:
            opts.append("sack " + " ".join(f"{l}:{r}" for l, r in self.sack))
        if self.tsval is not None:
            opts.append(f"TS val {self.tsval} ecr {self.tsecr}")
        o = f" [{', '.join(opts)}]" if opts else ""
        return (f"<TCP {self.sport} > {self.dport} [{flags_str(self.flags)}] seq {self.seq} "
                f"ack {self.ack} win {self.window} len {len(self.payload)}{o}>")

    @property
    def seg_len(self) -> int:
        """SEG.LEN: data octets plus one for SYN and one for FIN (RFC 9293 3.4)."""
        return len(self.payload) + (self.flags & TH_SYN) // TH_SYN + (self.flags & TH_FIN)

    # -- parse -----------------------------------------------------------------------------

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview, src: int | None = None,
              dst: int | None = None) -> "TcpSegment":
        """Parse and check a segment (`data` is exactly the IP payload). The checksum is checked
        when src and dst are given. The payload is a memoryview of `data` (no copy).

        The common segments, no options or exactly NOP NOP TS (what every segment of a
        timestamped connection carries), are read with one unpack; any other layout goes
        through the option walk."""
        n = len(data)
        if n < TCP_MIN_HLEN:
            raise MalformedPacket(f"{n} bytes are shorter than the TCP header")
        if src is not None and dst is not None:
            if fold(ones_sum(data, _pseudo_sum(src, dst, n))) != 0xFFFF:
                # the header is checked first so that its errors keep their names
                cls._check_offset(data, n)
                raise MalformedPacket("TCP checksum is wrong")
        off = data[12]
        if off == _TS_OFF_BYTE and n >= 32:
            (sport, dport, seq, ack, off, flags, window, csum, urg, prefix, tsval,
             tsecr) = HDR_TS.unpack_from(data, 0)
            if prefix == TS_PREFIX:
                # every slot stored here, without __init__'s keyword parsing
                seg = cls.__new__(cls)
                seg.sport, seg.dport, seg.seq, seg.ack = sport, dport, seq, ack
                seg.flags, seg.window, seg.urgent, seg.checksum = flags, window, urg, csum
                seg.mss = seg.wscale = None
                seg.sack_permitted = False
                seg.sack = ()
                seg.tsval, seg.tsecr = tsval, tsecr
                seg.payload = memoryview(data)[32:]
                return seg
        hlen = cls._check_offset(data, n)
        sport, dport, seq, ack, off, flags, window, csum, urg = HDR.unpack_from(data, 0)
        seg = cls(sport, dport, seq, ack, flags, window, memoryview(data)[hlen:], urgent=urg,
                  checksum=csum)
        if hlen > TCP_MIN_HLEN:
            seg._parse_options(bytes(data[TCP_MIN_HLEN:hlen]))
        return seg

    @staticmethod
    def _check_offset(data, n: int) -> int:
        """The header length from the data offset, or MalformedPacket."""
        hlen = (data[12] >> 4) * 4
        if hlen < TCP_MIN_HLEN:
            raise MalformedPacket(f"TCP data offset {hlen // 4} is below 5")
        if hlen > n:
            raise MalformedPacket(f"TCP data offset {hlen // 4} is past the {n} bytes there")
        return hlen

    def _parse_options(self, opts: bytes) -> None:
        i = 0
        end = len(opts)
        while i < end:
            kind = opts[i]
            if kind == TCPOPT_EOL:
                return
            if kind == TCPOPT_NOP:
                i += 1
                continue
            if i + 1 >= end:
                raise MalformedPacket(f"TCP option {kind} has no length octet")
            olen = opts[i + 1]
            if olen < 2 or i + olen > end:
                raise MalformedPacket(f"TCP option {kind} length {olen} is invalid")
            if kind == TCPOPT_MSS:
                if olen != 4:
                    raise MalformedPacket(f"TCP MSS option length {olen} is not 4")
                self.mss = _U16.unpack_from(opts, i + 2)[0]
            elif kind == TCPOPT_WINDOW:
                if olen != 3:
                    raise MalformedPacket(f"TCP window scale option length {olen} is not 3")
                self.wscale = opts[i + 2]
            elif kind == TCPOPT_SACK_PERMITTED:
                if olen != 2:
                    raise MalformedPacket(f"TCP SACK-permitted option length {olen} is not 2")
                self.sack_permitted = True
            elif kind == TCPOPT_SACK:
                # RFC 2018 3: "a SACK option that specifies n blocks will have a length of
                # 8*n+2 bytes"
                if (olen - 2) % 8 or olen == 2:
                    raise MalformedPacket(f"TCP SACK option length {olen} is not 8*n+2")
                self.sack = tuple(_U32x2.unpack_from(opts, j) for j in range(i + 2, i + olen, 8))
            elif kind == TCPOPT_TIMESTAMP:
                if olen != 10:
                    raise MalformedPacket(f"TCP timestamps option length {olen} is not 10")
                self.tsval, self.tsecr = _U32x2.unpack_from(opts, i + 2)
            i += olen

    # -- emit ------------------------------------------------------------------------------

    def options_bytes(self) -> bytes:
        """The options, padded with NOPs as Linux lays them out (tcp_options_write): 4-byte
        aligned so that the timestamps start on a word boundary."""
        out = bytearray()
        if self.mss is not None:
            out += bytes((TCPOPT_MSS, 4)) + _U16.pack(self.mss)
        if self.tsval is not None:
            if self.sack_permitted:
                out += bytes((TCPOPT_SACK_PERMITTED, 2, TCPOPT_TIMESTAMP, 10))
            else:
                out += bytes((TCPOPT_NOP, TCPOPT_NOP, TCPOPT_TIMESTAMP, 10))
            out += _U32x2.pack(self.tsval, self.tsecr)
        elif self.sack_permitted:
            out += bytes((TCPOPT_NOP, TCPOPT_NOP, TCPOPT_SACK_PERMITTED, 2))
        if self.wscale is not None:
            out += bytes((TCPOPT_NOP, TCPOPT_WINDOW, 3, self.wscale))
        if self.sack:
            out += bytes((TCPOPT_NOP, TCPOPT_NOP, TCPOPT_SACK, 2 + 8 * len(self.sack)))
            for left, right in self.sack:
                out += _U32x2.pack(left, right)
        if len(out) > TCP_MAX_HLEN - TCP_MIN_HLEN:
            raise ValueError(f"{len(out)} bytes of TCP options do not fit in 40")
        return bytes(out)

    def emit(self, src: int | None = None, dst: int | None = None) -> bytes:
        """Header + options + payload; with src and dst the checksum is computed, else the
        field is zero (checksum offload fills it).

        A segment whose only option is the timestamp (or none) is packed in one call (HDR_TS
        or HDR) and joined to its payload; the checksum is summed over the header with a zero
        field and the payload, then packed in (the header is 4-byte aligned, so the two sums
        add)."""
        payload = self.payload
        if self.mss is None and self.wscale is None and not self.sack_permitted and not self.sack:
            if self.tsval is not None:
                args = (self.sport, self.dport, self.seq, self.ack, _TS_OFF_BYTE, self.flags,
                        self.window, 0, self.urgent, TS_PREFIX, self.tsval, self.tsecr)
                hdr_struct = HDR_TS
            else:
                args = (self.sport, self.dport, self.seq, self.ack, (TCP_MIN_HLEN // 4) << 4,
                        self.flags, self.window, 0, self.urgent)
                hdr_struct = HDR
            if src is None or dst is None:
                return hdr_struct.pack(*args) + payload
            hdr = hdr_struct.pack(*args)
            total = ones_sum(payload, ones_sum(hdr, _pseudo_sum(src, dst, len(hdr) + len(payload))))
            args = args[:7] + (~fold(total) & 0xFFFF,) + args[8:]
            return hdr_struct.pack(*args) + payload
        opts = self.options_bytes()
        hlen = TCP_MIN_HLEN + len(opts)
        seg = bytearray(HDR.pack(self.sport, self.dport, self.seq, self.ack, (hlen // 4) << 4,
                                 self.flags, self.window, 0, self.urgent))
        seg += opts
        seg += payload
        if src is not None and dst is not None:
            c = tcp_checksum(seg, src, dst)
            seg[16] = c >> 8
            seg[17] = c & 0xFF
        return bytes(seg)

    @property
    def header_len(self) -> int:
        return TCP_MIN_HLEN + len(self.options_bytes())
