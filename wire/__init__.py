"""Packet formats and the helpers every layer needs: the one home for them.

As smoltcp's `wire` module: each protocol a module with its constants (named as the RFC or
IEEE names them), a parse() that checks untrusted bytes and raises `MalformedPacket`, and an
emit() that builds bytes from a plain representation. The device (nicemu/), the drivers
(driver/) and the modeled kernel (kstack/) all import from here; this package imports none of
them.

    mac.py        MAC addresses: parse, format, broadcast/multicast tests
    ethernet.py   Ethernet II header, EtherTypes, frame sizes, FCS length
    checksum.py   the internet checksum (RFC 1071) and the pseudo-header sum
    arp.py, ipv4.py, icmp.py, udp.py   one protocol each
"""
from __future__ import annotations

__all__ = ["MalformedPacket"]


class MalformedPacket(ValueError):
    """Bytes that are not a valid packet of the format asked for. The message says which
    rule failed, so the caller can count the drop with a reason."""
