"""The TCP fast paths (header prediction on input, the full-segment loop on output) are taken
on bulk traffic and agree with the full path: the same segments out, the same state, the same
counters, over random transfers with loss, duplication and reordering. The C common path
(kstack/tcp/_fast.pyx) and its Python twin are each held to the full path, and to each other
with the header-prediction counters included."""
import random

import pytest

from kstack.tcp import TcpConfig, TcpConnection
from kstack.tcp import connection as conn_mod
from kstack.tcp import fastpath
from test_tcp_link import MS, established_pair, transfer

try:
    from kstack.tcp import _fast
except ImportError:  # not built: the Python twin alone
    _fast = None

NAMES = ("_rcv_predicted", "_xmit_full_segments", "_output_predicted")
IMPLS = {"python": tuple(getattr(TcpConnection, n) for n in NAMES)}
if _fast is not None:
    IMPLS["cython"] = (_fast.rcv_predicted, _fast.xmit_full_segments, _fast.output_predicted)


@pytest.fixture(params=sorted(IMPLS))
def impl(request, monkeypatch):
    """Run the test with one implementation of the common path."""
    for name, f in zip(NAMES, IMPLS[request.param]):
        monkeypatch.setattr(fastpath, name.lstrip("_"), f)
    return request.param


def test_the_c_path_is_built_and_chosen():
    # setup.py builds every kstack/**/_*.pyx; NICEMU_PY_TCP=1 forces the twin
    import os
    if os.environ.get("NICEMU_PY_TCP") == "1" or _fast is None:
        pytest.skip("the Python twin runs here")
    assert conn_mod.fast_path_kind() == "cython"

HP_COUNTERS = ("TcpExtTCPHPHits", "TcpExtTCPHPAcks")


def test_header_prediction_is_taken_on_bulk_data(impl):
    link, counters = established_pair()
    data = bytes(range(256)) * 800
    assert transfer(link, link.a, data) == data
    # every in-order data segment of a clean bulk transfer is predicted; most ACKs too
    segs = sum(1 for f, s in link.log if f == "a" and s.payload)
    assert counters["TcpExtTCPHPHits"] == segs
    assert counters["TcpExtTCPHPAcks"] > 0


def test_no_prediction_when_turned_off(monkeypatch):
    monkeypatch.setattr(TcpConnection, "fast_path", False)
    link, counters = established_pair()
    data = b"x" * 50000
    assert transfer(link, link.a, data) == data
    assert counters["TcpExtTCPHPHits"] == counters["TcpExtTCPHPAcks"] == 0


def test_out_of_order_data_takes_the_full_path(impl):
    link, counters = established_pair()
    assert transfer(link, link.a, b"w" * 3000) == b"w" * 3000
    hits = counters["TcpExtTCPHPHits"]
    first = []
    # hold back the first data segment: the next ones arrive out of order
    link.drop = lambda s, f: f == "a" and bool(s.payload) and not first and not first.append(1)
    data = b"y" * 20000
    assert transfer(link, link.a, data) == data
    assert counters["TcpExtTCPOFOQueue"] > 0
    # the segments that went to the out-of-order queue were not predicted
    assert counters["TcpExtTCPHPHits"] - hits < sum(1 for f, s in link.log if f == "a" and s.payload)


def _state(c: TcpConnection) -> dict:
    d = {k: v for k, v in vars(c).items() if k not in ("counters", "config", "ofo", "sb", "rtt")}
    d["sndq"], d["rcvq"] = bytes(c.sndq), bytes(c.rcvq)
    d["ctl"] = [s.emit() for s in c.ctl]
    d["ofo"] = ([(b[0], bytes(b[1]), b[2]) for b in c.ofo.blocks], c.ofo.bytes, c.ofo._stamp)
    d["sb"] = ([tuple(iv) for iv in c.sb.intervals], c.sb.sacked)
    d["rtt"] = tuple(getattr(c.rtt, k) for k in c.rtt.__slots__)
    return d


SCENARIOS = [
    {},
    {"sack": False},
    {"timestamps": False, "window_scaling": False},
    {"rcvbuf": 20000, "sndbuf": 8000, "nodelay": True},
    {"gso_max_size": 65215, "rcvbuf": 262144, "sndbuf": 262144},  # GSO segments, unsplit
]
SCENARIO_IDS = ["defaults", "nosack", "nots-nows", "small-buffers", "gso"]
FAULTS = [(0.0, 0.0, 0.0), (0.02, 0.0, 0.0), (0.02, 0.05, 0.01)]


def _run(fast: bool, seed: int, cfg: dict, loss: float, reorder: float, dup: float):
    TcpConnection.fast_path = fast
    try:
        link, counters = established_pair(cfg_a=TcpConfig(**cfg), cfg_b=TcpConfig(**cfg))
        rnd = random.Random(seed)
        link.drop = lambda s, f: rnd.random() < loss
        link.extra_delay = lambda s, f: rnd.randrange(3 * MS) if rnd.random() < reorder else 0
        link.dup = lambda s, f: rnd.random() < dup
        data_a = rnd.randbytes(rnd.randrange(20_000, 200_000))
        data_b = rnd.randbytes(rnd.randrange(1_000, 60_000))
        got_b = transfer(link, link.a, data_a)
        got_a = transfer(link, link.b, data_b)
        link.a.shutdown(1, link.now)
        link.run(horizon=link.now + 5_000 * MS)
        return (got_b == data_a and got_a == data_b, [(f, s.emit()) for f, s in link.log],
                _state(link.a), _state(link.b), counters)
    finally:
        TcpConnection.fast_path = True


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("cfg", SCENARIOS, ids=SCENARIO_IDS)
def test_fast_path_agrees_with_full_path(seed, cfg, impl):
    loss, reorder, dup = FAULTS[seed % 3]
    ok_f, segs_f, a_f, b_f, c_f = _run(True, seed, cfg, loss, reorder, dup)
    ok_s, segs_s, a_s, b_s, c_s = _run(False, seed, cfg, loss, reorder, dup)
    assert ok_f and ok_s
    assert segs_f == segs_s  # the same segments, byte for byte, in the same order
    assert a_f == a_s and b_f == b_s
    assert {k: v for k, v in c_f.items() if k not in HP_COUNTERS} == dict(c_s)
    assert c_f["TcpExtTCPHPHits"] > 0 and not any(c_s[k] for k in HP_COUNTERS)


@pytest.mark.skipif(_fast is None, reason="kstack/tcp/_fast.pyx is not built")
@pytest.mark.parametrize("seed", range(100, 106))
@pytest.mark.parametrize("cfg", SCENARIOS, ids=SCENARIO_IDS)
def test_c_path_agrees_with_its_python_twin(seed, cfg, monkeypatch):
    """Same segments, state and counters, the header-prediction counters included."""
    runs = []
    for impl in (IMPLS["cython"], IMPLS["python"]):
        for name, f in zip(NAMES, impl):
            monkeypatch.setattr(fastpath, name.lstrip("_"), f)
        runs.append(_run(True, seed, cfg, *FAULTS[seed % 3]))
    (ok_c, segs_c, a_c, b_c, c_c), (ok_p, segs_p, a_p, b_p, c_p) = runs
    assert ok_c and ok_p
    assert segs_c == segs_p and a_c == a_p and b_c == b_p and c_c == c_p
    assert c_c["TcpExtTCPHPHits"] > 0


def test_output_prediction_is_taken_on_bulk_data(impl, monkeypatch):
    """Most output calls of a bulk transfer end in _output_predicted, not the full loop."""
    calls = {"full": 0, "all": 0}
    full, outer = TcpConnection._write_xmit, TcpConnection.segments_to_send

    def counted_full(self, *a):
        calls["full"] += 1
        return full(self, *a)

    def counted_all(self, now):
        calls["all"] += 1
        return outer(self, now)

    monkeypatch.setattr(TcpConnection, "_write_xmit", counted_full)
    monkeypatch.setattr(TcpConnection, "segments_to_send", counted_all)
    link, counters = established_pair()
    data = bytes(range(256)) * 1000
    assert transfer(link, link.a, data) == data
    assert calls["full"] < calls["all"] // 4


def test_gso_builds_segments_of_whole_mss_multiples(impl):
    """With config.gso_max_size the full-segment loop sends few large segments (whole MSS
    multiples up to the cap); TcpOutSegs counts the wire segments they stand for."""
    cfg = dict(gso_max_size=65215, rcvbuf=262144, sndbuf=262144)
    link, counters = established_pair(cfg_a=TcpConfig(**cfg), cfg_b=TcpConfig(**cfg))
    out0, log0 = counters["TcpOutSegs"], len(link.log)
    data = bytes(range(256)) * 2000
    assert transfer(link, link.a, data) == data
    mss = link.a.mss
    log = link.log[log0:]
    sizes = [len(s.payload) for f, s in log if f == "a" and s.payload]
    big = [n for n in sizes if n > mss]
    assert big and all(n % mss == 0 and n <= 65215 for n in big)
    wire = sum(-(-n // mss) for n in sizes)
    acks = sum(1 for f, s in log if not s.payload)
    assert counters["TcpOutSegs"] - out0 == wire + acks
