"""The eleven states of RFC 9293 3.3.2 and the socket layer's event edges."""
from __future__ import annotations

import enum

__all__ = ["TcpState", "TcpEvent", "SYNCHRONIZED"]


class TcpState(enum.IntEnum):
    """Numbered as Linux's TCP_* (include/net/tcp_states.h), which `ss` prints."""

    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECEIVED = 3  # Linux: TCP_SYN_RECV
    FIN_WAIT_1 = 4
    FIN_WAIT_2 = 5
    TIME_WAIT = 6
    CLOSED = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11


# RFC 9293 3.10.7.4: the states in which a connection is synchronized
SYNCHRONIZED = frozenset({TcpState.ESTABLISHED, TcpState.FIN_WAIT_1, TcpState.FIN_WAIT_2,
                          TcpState.CLOSE_WAIT, TcpState.CLOSING, TcpState.LAST_ACK,
                          TcpState.TIME_WAIT})


class TcpEvent(enum.IntFlag):
    """Edges since the socket layer last took them (TcpConnection.take_events)."""

    NONE = 0
    ESTABLISHED = 1  # the handshake completed (connect returns, accept may take it)
    READABLE = 2  # data or EOF arrived
    WRITABLE = 4  # send-buffer space came back (at least a third of sndbuf free)
    CLOSED = 8  # the connection reached CLOSED: the socket layer may forget it
    RESET = 16  # a RST arrived or the connection failed: `error` says why
