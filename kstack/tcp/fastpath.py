"""The choice of the TCP common path: kstack/tcp/_fast.pyx (C) when it is built, else the
Python methods of TcpConnection (its twin); NICEMU_PY_TCP=1 forces the twin. The engine calls
`fastpath.rcv_predicted(conn, seg, now)`, `fastpath.output_predicted(conn, now)` and
`fastpath.xmit_full_segments(conn, now, out, mss)`; tests and benchmarks set these three
names to compare the implementations."""
import os

rcv_predicted = None
xmit_full_segments = None
output_predicted = None
_KIND = "python"


def select(cls) -> None:
    """Called once by kstack.tcp.connection with TcpConnection."""
    global rcv_predicted, xmit_full_segments, output_predicted, _KIND
    rcv_predicted = cls._rcv_predicted
    xmit_full_segments = cls._xmit_full_segments
    output_predicted = cls._output_predicted
    if os.environ.get("NICEMU_PY_TCP") != "1":
        try:
            from kstack.tcp import _fast
        except ImportError:
            return
        rcv_predicted = _fast.rcv_predicted
        xmit_full_segments = _fast.xmit_full_segments
        output_predicted = _fast.output_predicted
        _KIND = "cython"


def kind(cls) -> str:
    return _KIND if rcv_predicted is not cls._rcv_predicted else "python"
