"""The TCP fast paths (header prediction on input, the full-segment loop on output) are taken
on bulk traffic and agree with the full path: the same segments out, the same state, the same
counters, over random transfers with loss, duplication and reordering."""
import random

import pytest

from kstack.tcp import TcpConfig, TcpConnection
from test_tcp_link import MS, established_pair, transfer

HP_COUNTERS = ("TcpExtTCPHPHits", "TcpExtTCPHPAcks")


def test_header_prediction_is_taken_on_bulk_data(monkeypatch):
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


def test_out_of_order_data_takes_the_full_path():
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
@pytest.mark.parametrize("cfg", [
    {},
    {"sack": False},
    {"timestamps": False, "window_scaling": False},
    {"rcvbuf": 20000, "sndbuf": 8000, "nodelay": True},
], ids=["defaults", "nosack", "nots-nows", "small-buffers"])
def test_fast_path_agrees_with_full_path(seed, cfg):
    loss, reorder, dup = [(0.0, 0.0, 0.0), (0.02, 0.0, 0.0), (0.02, 0.05, 0.01)][seed % 3]
    ok_f, segs_f, a_f, b_f, c_f = _run(True, seed, cfg, loss, reorder, dup)
    ok_s, segs_s, a_s, b_s, c_s = _run(False, seed, cfg, loss, reorder, dup)
    assert ok_f and ok_s
    assert segs_f == segs_s  # the same segments, byte for byte, in the same order
    assert a_f == a_s and b_f == b_s
    assert {k: v for k, v in c_f.items() if k not in HP_COUNTERS} == dict(c_s)
    assert c_f["TcpExtTCPHPHits"] > 0 and not any(c_s[k] for k in HP_COUNTERS)
