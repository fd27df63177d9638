"""Why a packet was dropped: Linux's enum skb_drop_reason (include/net/dropreason-core.h).

Every kfree_skb in kstack names one of these, so `nicemu stats` can say where packets went.
Names are Linux's where Linux has one; ours are marked. Add a reason here, never a string at
the drop site.
"""
from __future__ import annotations

import enum

__all__ = ["SkbDropReason"]


class SkbDropReason(enum.Enum):
    NOT_SPECIFIED = enum.auto()
    NO_SOCKET = enum.auto()  # no socket bound to the destination port
    PKT_TOO_SMALL = enum.auto()  # shorter than its headers
    PKT_TOO_BIG = enum.auto()  # larger than the MTU with DF set
    SOCKET_RCVBUFF = enum.auto()  # the socket's receive queue is full (SO_RCVBUF)
    SOCKET_CLOSE = enum.auto()  # the socket closed with packets queued
    UDP_CSUM = enum.auto()
    TCP_CSUM = enum.auto()
    ICMP_CSUM = enum.auto()
    IP_CSUM = enum.auto()
    IP_INHDR = enum.auto()  # bad version, IHL or total length
    IP_INADDRERRORS = enum.auto()  # a destination address we do not take (martian, not ours)
    IP_NOPROTO = enum.auto()  # no handler for the IP protocol
    IP_OUTNOROUTES = enum.auto()  # no route to the destination
    IP_INNOROUTES = enum.auto()  # forwarding: no route
    IP_TTL_EXCEEDED = enum.auto()  # ours: TTL reached zero while forwarding
    IP_FRAG_REASM_TIMEOUT = enum.auto()  # ours (Linux counts IpReasmFails)
    IP_FRAG_TOO_FAR = enum.auto()  # fragment beyond 64 KiB
    IP_FRAG_OVERLAP = enum.auto()  # ours: an overlap that disagrees with data held
    IP_FRAG_MEM = enum.auto()  # ours: the reassembly memory limit (ipfrag_high_thresh)
    IP_FORWARDING_DISABLED = enum.auto()  # ours: not for us and forwarding is off
    OTHERHOST = enum.auto()  # a frame to another MAC (promiscuous)
    MAC_HDR = enum.auto()  # ours: shorter than the Ethernet header
    UNHANDLED_PROTO = enum.auto()  # no packet_type for the EtherType
    ARP_INVALID = enum.auto()  # ours: a malformed or foreign ARP packet
    NEIGH_FAILED = enum.auto()  # address resolution failed
    NEIGH_QUEUEFULL = enum.auto()  # too many packets waiting for resolution
    NEIGH_DEAD = enum.auto()  # the neighbour entry was removed
    QDISC_DROP = enum.auto()  # the qdisc was full (txqueuelen)
    DEV_READY = enum.auto()  # the device is down or has no carrier
    TX_ERROR = enum.auto()  # ours: the driver could not send (dropped and counted there)
    ICMP_RATELIMIT = enum.auto()  # ours: an ICMP error suppressed by the rate limit
    IP_RPFILTER = enum.auto()
    DUP_FRAG = enum.auto()
    FRAG_INCOMPLETE = enum.auto()  # ours: a reassembly queue evicted incomplete
    NEIGH_CREATEFAIL = enum.auto()  # the neighbour table is full (gc_thresh3)
    IP_INVALID_SOURCE = enum.auto()  # a martian source (multicast, broadcast, 0/8, 127/8)
    IP_INVALID_DEST = enum.auto()  # a martian destination (0/8, 127/8 from outside)
    IP_FRAG_QUEUES = enum.auto()  # ours: too many reassembly queues at once
    ICMP_ERROR = enum.auto()  # ours: an ICMP error nobody could take (no socket, bad inner header)
    IP_SOURCE_ROUTE = enum.auto()  # ours: a source-routed datagram (accept_source_route=0)
    TCP_INVALID_SEQUENCE = enum.auto()  # not within the receive window (RFC 9293 3.10.7.4)
    TCP_RESET = enum.auto()  # a RST was taken (the connection ends)
    TCP_FLAGS = enum.auto()  # no ACK, or flags that make no sense in the state
    TCP_OLD_DATA = enum.auto()  # all the data was received before (a retransmission)
    TCP_ZEROWINDOW = enum.auto()  # data while our window is zero
    TCP_OVERWINDOW = enum.auto()  # data past the window we advertised
    TCP_OFO_DROP = enum.auto()  # the out-of-order queue's memory limit
    TCP_RFC7323_PAWS = enum.auto()  # an old timestamp (PAWS)
    TCP_ACK_UNSENT_DATA = enum.auto()  # an ACK for data we never sent
    TCP_TOO_OLD_ACK = enum.auto()  # an ACK below SND.UNA - MAX.SND.WND (RFC 5961 5.2)
    TCP_CLOSE = enum.auto()  # data for a closed or closing connection
    TCP_RFC5961_CHALLENGE = enum.auto()  # ours: answered with a challenge ACK (RST or SYN in window)
