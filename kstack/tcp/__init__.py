"""kstack TCP: a sans-IO protocol engine after RFC 9293 (and 5961, 7323, 2018, 6675, 6298,
5681, 6582, 6528, 1122), shaped by Linux's net/ipv4/tcp_*.c. No sockets, clocks or threads:
the socket layer feeds segments and `now` in and puts what comes out on the wire.

    seq.py         modulo-2^32 comparisons (SEQ_LT, ...)
    isn.py         initial sequence numbers (RFC 6528)
    config.py      TcpConfig: the tunables with Linux's defaults
    state.py       TcpState (the eleven states), TcpEvent (edges for the socket layer)
    options.py     option negotiation on the SYNs (MSS, window scale, SACK, timestamps)
    buffers.py     the send queue and the out-of-order queue (bounded)
    sack.py        the sender's SACK scoreboard (RFC 6675: IsLost, pipe, NextSeg)
    rtt.py         the retransmission timer's estimator (RFC 6298)
    constants.py   the names the parts share (states, CA states, limits)
    input.py       segment arrival: RFC 9293 3.10.7's checks, header prediction, text, FIN, RST
    congestion.py  the ACK: window update, RTT samples, congestion control, loss recovery
    output.py      the advertised window, segment building, tcp_write_xmit, the output fast path
    timers.py      retransmission, persist, keepalive, TIME_WAIT
    fastpath.py    the common path's implementation: _fast.pyx (C) or the Python twin
    connection.py  TcpConnection: the TCB (made of the parts above), opens, user calls
"""
from kstack.tcp.config import TcpConfig
from kstack.tcp.connection import (SHUT_RD, SHUT_RDWR, SHUT_WR, TcpConnection, fast_path_kind,
                                   reset_for)
from kstack.tcp.isn import IsnGenerator
from kstack.tcp.state import TcpEvent, TcpState

__all__ = ["TcpConfig", "TcpConnection", "TcpEvent", "TcpState", "IsnGenerator", "reset_for",
           "SHUT_RD", "SHUT_WR", "SHUT_RDWR", "fast_path_kind"]
