"""ARP (RFC 826; Linux's net/ipv4/arp.c): answering for our addresses, learning the
addresses of neighbours, soliciting them for the neighbour table, and announcing ourselves.

arp_rcv checks the packet (an Ethernet/IPv4 ARP of a length that holds its addresses, an
opcode we know, a sender that is a single host); anything else is dropped ARP_INVALID. Then
RFC 826's reception algorithm with its merge flag: if we hold an entry for the sender, its
hardware address is updated ("merge"); if the target is one of our addresses and the packet
is a request, the sender is entered (even when it was not merged) and a reply goes back.
Linux's arp_process is the same algorithm: a request for us creates a STALE entry
(neigh_event_ns) and replies; anything else only updates an entry that exists (arp_accept=0),
to REACHABLE for a reply addressed to us, STALE otherwise.
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from kstack.dropreason import SkbDropReason
from kstack.neighbour import (NEIGH_UPDATE_F_OVERRIDE, NS, NUD_REACHABLE, NUD_STALE, NUD_VALID,
                              Neighbour)
from kstack.skbuff import MAX_HEADER, SkBuff
from kstack.stack import PACKET_HOST, PACKET_OTHERHOST
from wire.arp import ARP_ETH_IP_LEN, ARPHRD_ETHER, ARPOP_REPLY, ARPOP_REQUEST
from wire.ethernet import ETH_HLEN, EtherType
from wire.ipv4 import is_lbcast, is_loopback, is_multicast
from wire.mac import BROADCAST, ZERO

if TYPE_CHECKING:
    from kstack.inet import Inet
    from kstack.netdevice import NetDevice

__all__ = ["Arp"]

_ARP = struct.Struct("!HHBBH6sI6sI")
_ETH = struct.Struct("!6s6sH")


class Arp:
    def __init__(self, inet: "Inet") -> None:
        self.inet = inet
        self.stack = inet.stack
        self.stats = {"requests_in": 0, "replies_in": 0, "requests_out": 0, "replies_out": 0,
                      "gratuitous_out": 0}

    # --- receive ------------------------------------------------------------------------------

    def rcv(self, skb: SkBuff) -> None:
        """arp_rcv + arp_process."""
        dev = skb.dev
        if skb.pkt_type == PACKET_OTHERHOST:
            skb.drop(SkbDropReason.OTHERHOST)
            return
        if skb.len < ARP_ETH_IP_LEN:
            skb.drop(SkbDropReason.ARP_INVALID)
            return
        hrd, pro, hln, pln, op, sha, sip, tha, tip = _ARP.unpack_from(skb.buf, skb.data)
        # RFC 826: "?Do I have the hardware type in ar$hrd? ... ?Do I speak the protocol in ar$pro?"
        if (hrd != ARPHRD_ETHER or pro != EtherType.IPV4 or hln != 6 or pln != 4
                or op not in (ARPOP_REQUEST, ARPOP_REPLY)):
            skb.drop(SkbDropReason.ARP_INVALID)
            return
        # a sender must be a single host; a target must not be multicast or loopback
        if is_multicast(sip) or is_lbcast(sip) or is_loopback(sip) or sha[0] & 1:
            skb.drop(SkbDropReason.ARP_INVALID)
            return
        if is_multicast(tip) or is_loopback(tip):
            skb.drop(SkbDropReason.ARP_INVALID)
            return
        inet = self.inet
        now = skb.tstamp or self.stack.clock()  # the time the frame entered the stack
        if op == ARPOP_REQUEST:
            self.stats["requests_in"] += 1
        else:
            self.stats["replies_in"] += 1
        table = inet.neigh
        if sip == 0:
            # RFC 5227 address probe (duplicate address detection): answer if it is ours,
            # learn nothing
            if op == ARPOP_REQUEST and inet.is_local(tip):
                self.send(ARPOP_REPLY, dev, sha, tip, sha, 0)
            skb.consume()
            return
        if op == ARPOP_REQUEST and inet.is_local(tip):
            if inet.is_local(sip):
                skb.consume()  # someone claims our own address as sender: learn nothing
                return
            # "If the pair <protocol type, sender protocol address> is not already in my
            # translation table, put it there" (tpa is ours), then answer
            if skb.pkt_type == PACKET_HOST:
                table.stats["rcv_probes_ucast"] += 1
            else:
                table.stats["rcv_probes_mcast"] += 1
            n = table.lookup_or_create(dev, sip, now)
            if n is not None:
                n.update(sha, NUD_STALE, NEIGH_UPDATE_F_OVERRIDE, now)
                self.send(ARPOP_REPLY, dev, sha, tip, sha, sip)
            skb.consume()
            return
        # merge: update an entry we hold; create none (Linux's arp_accept=0)
        n = table.lookup(dev, sip)
        if n is not None:
            # arp_is_garp: sender = target; a gratuitous reply also names itself as target
            is_garp = sip == tip and (op == ARPOP_REQUEST or tha == sha)
            override = now > n.updated + self.stack.sysctl.neigh_locktime_ms * NS or is_garp
            state = NUD_REACHABLE if op == ARPOP_REPLY and skb.pkt_type == PACKET_HOST else NUD_STALE
            n.update(sha, state, NEIGH_UPDATE_F_OVERRIDE if override else 0, now)
        skb.consume()

    # --- transmit -----------------------------------------------------------------------------

    def send(self, op: int, dev: "NetDevice", dest_hw: bytes | None, sip: int, tha: bytes | None,
             tip: int) -> None:
        """arp_send: one ARP packet from `dev`, to `dest_hw` (broadcast when None)."""
        skb = self.stack.pool.alloc(ETH_HLEN + ARP_ETH_IP_LEN, MAX_HEADER)
        off = skb.put(ARP_ETH_IP_LEN)
        _ARP.pack_into(skb.buf, off, ARPHRD_ETHER, EtherType.IPV4, 6, 4, op, dev.dev_addr, sip,
                       tha or ZERO, tip)
        skb.reset_network_header()
        off = skb.push(ETH_HLEN)
        _ETH.pack_into(skb.buf, off, dest_hw or BROADCAST, dev.dev_addr, EtherType.ARP)
        skb.reset_mac_header()
        skb.protocol = EtherType.ARP
        skb.dev = dev
        skb.priority = 7  # TC_PRIO_CONTROL, as Linux gives ARP
        self.stats["requests_out" if op == ARPOP_REQUEST else "replies_out"] += 1
        self.stack.dev_queue_xmit(skb)

    def solicit(self, neigh: Neighbour, skb: SkBuff | None, now: int) -> None:
        """arp_solicit: a request for neigh's address. The source address is the queued
        packet's when it is ours (arp_announce=0), else the device's first address. The first
        ucast_solicit probes of a PROBE are unicast to the address held; the rest broadcast."""
        dev = neigh.dev
        inet = self.inet
        saddr = 0
        if skb is not None and skb.network_header >= 0:
            src = int.from_bytes(skb.buf[skb.network_header + 12:skb.network_header + 16], "big")
            if inet.is_local(src):
                saddr = src
        if not saddr:
            saddr = inet.dev_primary_addr(dev, neigh.key)
        dst_hw = None
        # probes was incremented before this call: the first unicast probe sees 1
        if neigh.probes - 1 < self.stack.sysctl.neigh_ucast_solicit and neigh.nud_state & NUD_VALID and neigh.ha:
            dst_hw = neigh.ha
        self.send(ARPOP_REQUEST, dev, dst_hw, saddr, dst_hw, neigh.key)

    def gratuitous(self, dev: "NetDevice", addr: int) -> None:
        """A gratuitous ARP (RFC 5227 "ARP announcement"): a request for our own address, so
        that neighbours holding an old entry update it (inetdev_send_gratuitous_arp)."""
        self.stats["gratuitous_out"] += 1
        self.send(ARPOP_REQUEST, dev, None, addr, None, addr)
