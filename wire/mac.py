"""MAC addresses (IEEE 802): 6 bytes on the wire, "aa:bb:cc:dd:ee:ff" for people."""
from __future__ import annotations

__all__ = ["MAC_LEN", "BROADCAST", "ZERO", "parse_mac", "format_mac", "is_multicast",
           "is_broadcast", "is_unicast", "is_locally_administered", "nth_mac"]

MAC_LEN = 6
BROADCAST = b"\xff" * MAC_LEN
ZERO = b"\x00" * MAC_LEN


def parse_mac(mac: str | bytes | bytearray | memoryview) -> bytes:
    """The 6 bytes of a MAC given as "aa:bb:cc:dd:ee:ff" (or with '-') or as 6 bytes.
    Raises ValueError naming the bad value (quoted, at most 40 characters)."""
    if isinstance(mac, (bytes, bytearray, memoryview)):
        b = bytes(mac)
        if len(b) != MAC_LEN:
            raise ValueError(f"a MAC address is 6 bytes, got {len(b)}")
        return b
    if not isinstance(mac, str):
        raise ValueError(f"a MAC address is a string like 52:54:00:12:34:56, not {type(mac).__name__}")
    parts = mac.strip().replace("-", ":").split(":")
    if len(parts) != MAC_LEN or not all(1 <= len(p) <= 2 for p in parts):
        raise ValueError(f"bad MAC address {_quote(mac)}: six hex bytes separated by ':'")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"bad MAC address {_quote(mac)}: six hex bytes separated by ':'") from None


def format_mac(mac: bytes | bytearray | memoryview) -> str:
    """ "aa:bb:cc:dd:ee:ff" for 6 bytes."""
    if len(mac) != MAC_LEN:
        raise ValueError(f"a MAC address is 6 bytes, got {len(mac)}")
    return ":".join(f"{b:02x}" for b in bytes(mac))


def is_multicast(mac: bytes) -> bool:
    """The I/G bit: the least significant bit of the first byte (broadcast is multicast too)."""
    return bool(mac[0] & 1)


def is_broadcast(mac: bytes) -> bool:
    return bytes(mac) == BROADCAST


def is_unicast(mac: bytes) -> bool:
    return not mac[0] & 1


def is_locally_administered(mac: bytes) -> bool:
    """The U/L bit: set in addresses not assigned by a vendor (52:54:00:... is QEMU's OUI,
    globally administered in form but used for virtual NICs)."""
    return bool(mac[0] & 2)


def nth_mac(base: str | bytes, n: int) -> str:
    """`base` plus n in its last three bytes: the n-th of a row of device addresses."""
    b = parse_mac(base)
    low = (int.from_bytes(b[3:], "big") + n) & 0xFFFFFF
    return format_mac(b[:3] + low.to_bytes(3, "big"))


def _quote(value: str, limit: int = 40) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")
