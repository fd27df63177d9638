"""IPv4 (RFC 791): the header, its constants, and address helpers.

Addresses are 4 bytes on the wire; inside kstack they are ints (what struct "!I" gives), which
makes masks and hashing cheap; people see "198.18.0.1". Prefixes are (network int, length).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from wire import MalformedPacket
from wire.checksum import internet_checksum

__all__ = [
    "IPVERSION", "IPV4_MIN_HLEN", "IPV4_MAX_HLEN", "IP_MAXPACKET", "IP_DF", "IP_MF", "IP_OFFMASK",
    "IPPROTO_ICMP", "IPPROTO_TCP", "IPPROTO_UDP", "IPOPT_END", "IPOPT_NOOP", "MAXTTL",
    "IPDEFTTL", "IPTOS_PREC_INTERNETCONTROL", "INADDR_ANY", "INADDR_BROADCAST", "Ipv4Header",
    "aton", "ntoa", "addr_to_int", "int_to_addr", "parse_prefix", "prefix_mask",
    "format_prefix", "is_multicast", "is_loopback", "is_zeronet", "is_lbcast",
    "HDR", "decrease_ttl",
]

IPVERSION = 4
IPV4_MIN_HLEN = 20  # IHL 5: "the minimum value for a correct header is 5" (RFC 791 3.1)
IPV4_MAX_HLEN = 60  # IHL is 4 bits of 32-bit words
IP_MAXPACKET = 65535  # Total Length is 16 bits
IP_DF = 0x4000  # "Bit 1: (DF) 0 = May Fragment, 1 = Don't Fragment"
IP_MF = 0x2000  # "Bit 2: (MF) 0 = Last Fragment, 1 = More Fragments"
IP_OFFMASK = 0x1FFF  # Fragment Offset, in units of 8 octets
IPOPT_END = 0  # "End of Option list"
IPOPT_NOOP = 1  # "No Operation"
MAXTTL = 255
IPDEFTTL = 64  # Linux's net.ipv4.ip_default_ttl (RFC 1700 suggested 64)
IPTOS_PREC_INTERNETCONTROL = 0xC0  # precedence 6, used on ICMP errors (RFC 1812 4.3.2.5)

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17

INADDR_ANY = 0
INADDR_BROADCAST = 0xFFFFFFFF  # "limited broadcast" (RFC 919)

# version/IHL, TOS, total length, id, flags/fragment offset, TTL, protocol, checksum, src, dst
HDR = struct.Struct("!BBHHHBBHII")


def aton(addr: str) -> bytes:
    """The 4 bytes of a dotted-quad address; ValueError for anything else."""
    parts = addr.strip().split(".")
    if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 for p in parts):
        raise ValueError(f"bad IPv4 address {addr!r}")
    vals = [int(p) for p in parts]
    if any(v > 255 for v in vals):
        raise ValueError(f"bad IPv4 address {addr!r}")
    return bytes(vals)


def ntoa(addr: bytes | int) -> str:
    """Dotted quad for 4 bytes or an int."""
    if isinstance(addr, int):
        return f"{addr >> 24 & 255}.{addr >> 16 & 255}.{addr >> 8 & 255}.{addr & 255}"
    if len(addr) != 4:
        raise ValueError("an IPv4 address is 4 bytes")
    return ".".join(str(b) for b in addr)


def addr_to_int(addr: str | bytes | int) -> int:
    if isinstance(addr, int):
        if not 0 <= addr <= 0xFFFFFFFF:
            raise ValueError(f"bad IPv4 address {addr}")
        return addr
    if isinstance(addr, str):
        addr = aton(addr)
    if len(addr) != 4:
        raise ValueError("an IPv4 address is 4 bytes")
    return int.from_bytes(addr, "big")


def int_to_addr(addr: int) -> bytes:
    return addr.to_bytes(4, "big")


def prefix_mask(plen: int) -> int:
    """The netmask of a prefix length as an int (24 -> 0xFFFFFF00)."""
    if not 0 <= plen <= 32:
        raise ValueError(f"prefix length {plen} is not in 0..32")
    return (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF


def parse_prefix(text: str, default_len: int = 32) -> tuple[int, int]:
    """"198.18.0.1/24" -> (address int, 24); the address is not masked (it may be a host's)."""
    addr, _, plen = text.partition("/")
    n = default_len
    if plen:
        if not plen.isdigit():
            raise ValueError(f"bad prefix length in {text!r}")
        n = int(plen)
    prefix_mask(n)
    return addr_to_int(addr), n


def format_prefix(net: int, plen: int) -> str:
    return f"{ntoa(net)}/{plen}"


def is_multicast(a: int) -> bool:
    return (a >> 28) == 0xE  # 224.0.0.0/4


def is_loopback(a: int) -> bool:
    return (a >> 24) == 127


def is_zeronet(a: int) -> bool:
    return (a >> 24) == 0  # "this network" (RFC 1122 3.2.1.3)


def is_lbcast(a: int) -> bool:
    return a == INADDR_BROADCAST


def decrease_ttl(buf: bytearray, off: int) -> int:
    """ip_decrease_ttl: TTL - 1 with the checksum updated incrementally (RFC 1624): the TTL is
    the high byte of a 16-bit word, so the sum changes by 0x0100. Returns the new TTL."""
    check = (buf[off + 10] << 8 | buf[off + 11]) + 0x0100
    check = (check + (check >> 16)) & 0xFFFF
    buf[off + 10] = check >> 8
    buf[off + 11] = check & 0xFF
    buf[off + 8] -= 1
    return buf[off + 8]


@dataclass(slots=True)
class Ipv4Header:
    """A plain IPv4 header. `options` are the raw option bytes (a multiple of 4 long)."""

    src: int
    dst: int
    protocol: int
    total_length: int = 0
    ttl: int = IPDEFTTL
    tos: int = 0
    ident: int = 0
    flags_frag: int = 0  # DF/MF and the offset in 8-byte units, as on the wire
    checksum: int = 0
    options: bytes = b""

    @property
    def ihl(self) -> int:
        return (IPV4_MIN_HLEN + len(self.options)) // 4

    @property
    def header_len(self) -> int:
        return IPV4_MIN_HLEN + len(self.options)

    @property
    def frag_offset(self) -> int:
        """The fragment's offset in bytes."""
        return (self.flags_frag & IP_OFFMASK) * 8

    @property
    def more_fragments(self) -> bool:
        return bool(self.flags_frag & IP_MF)

    @property
    def dont_fragment(self) -> bool:
        return bool(self.flags_frag & IP_DF)

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview, check_csum: bool = True) -> "Ipv4Header":
        """Check a received header as RFC 791 / RFC 1122 3.2.1 require; raise MalformedPacket
        naming the first rule broken. `data` may be longer than the datagram (link padding)."""
        if len(data) < IPV4_MIN_HLEN:
            raise MalformedPacket(f"{len(data)} bytes are shorter than an IPv4 header")
        vihl, tos, tot, ident, ff, ttl, proto, csum, src, dst = HDR.unpack_from(data, 0)
        if vihl >> 4 != IPVERSION:
            raise MalformedPacket(f"version {vihl >> 4} is not 4")
        hlen = (vihl & 15) * 4
        if hlen < IPV4_MIN_HLEN:
            raise MalformedPacket(f"IHL {vihl & 15} is below 5")
        if len(data) < hlen:
            raise MalformedPacket(f"IHL {vihl & 15} runs past the {len(data)} bytes there")
        if check_csum and internet_checksum(data[:hlen]) != 0:
            raise MalformedPacket("header checksum is wrong")
        if tot < hlen:
            raise MalformedPacket(f"total length {tot} is shorter than the header ({hlen})")
        if tot > len(data):
            raise MalformedPacket(f"total length {tot} is longer than the {len(data)} bytes there")
        return cls(src, dst, proto, tot, ttl, tos, ident, ff, csum, bytes(data[IPV4_MIN_HLEN:hlen]))

    def emit(self, payload_len: int | None = None) -> bytes:
        """The header with its checksum; total_length from `payload_len` when given."""
        if len(self.options) % 4 or len(self.options) > IPV4_MAX_HLEN - IPV4_MIN_HLEN:
            raise ValueError("IPv4 options must be padded to 4 bytes, at most 40")
        tot = self.header_len + payload_len if payload_len is not None else self.total_length
        hdr = bytearray(HDR.pack((IPVERSION << 4) | self.ihl, self.tos, tot, self.ident,
                                 self.flags_frag, self.ttl, self.protocol, 0, self.src, self.dst))
        hdr += self.options
        c = internet_checksum(hdr)
        hdr[10] = c >> 8
        hdr[11] = c & 0xFF
        return bytes(hdr)
