"""The TCP engine's shared names: states by name, the loss-recovery states, shutdown modes,
limits, and TcpEvent by value for the per-segment paths."""
from kstack.dropreason import SkbDropReason
from kstack.tcp.state import TcpEvent, TcpState

SHUT_RD, SHUT_WR, SHUT_RDWR = 0, 1, 2
CA_OPEN, CA_RECOVERY, CA_LOSS = "open", "recovery", "loss"  # Linux's TCP_CA_Open/Recovery/Loss

PAWS_24DAYS = 24 * 86400 * 1_000_000_000  # RFC 7323 5.5: TS.Recent is invalid after 24 days idle
MAX_CTL = 8  # ours: RSTs queued for output at once
MAX_CWND = 1 << 30

ST = TcpState
ESTABLISHED, SYN_SENT, SYN_RECEIVED = ST.ESTABLISHED, ST.SYN_SENT, ST.SYN_RECEIVED
FIN_WAIT_1, FIN_WAIT_2, TIME_WAIT, CLOSED = ST.FIN_WAIT_1, ST.FIN_WAIT_2, ST.TIME_WAIT, ST.CLOSED
CLOSE_WAIT, LAST_ACK, CLOSING = ST.CLOSE_WAIT, ST.LAST_ACK, ST.CLOSING
_SENDING = frozenset({ESTABLISHED, CLOSE_WAIT, FIN_WAIT_1, CLOSING, LAST_ACK})
_RECEIVING = frozenset({ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2})
DR = SkbDropReason
# TcpEvent by value: `_EVENTS[e._value_ | READABLE]` sets a bit without IntFlag's Python-level
# __or__ (about 1.5 µs a call on CPython 3.11), for the per-segment paths
_EVENTS = tuple(TcpEvent(v) for v in range(2 * max(TcpEvent)))
_READABLE = TcpEvent.READABLE._value_
_WRITABLE = TcpEvent.WRITABLE._value_
