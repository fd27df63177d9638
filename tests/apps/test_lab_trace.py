"""Tracepoints and `nicemu trace`.

- nicemu.tracepoint: off by default (emit records nothing), on in memory or to FILE.<pid>,
  flushed when the buffer fills, read back line by line.
- A traced in-process run (two Nic(engine="python") back to back, the e1000 driver and a
  NetStack on each): one UDP datagram records the RX stages from the wire to the socket and
  the TX stages from the copy to the wire, in that order.
- `nicemu trace --svg FILE` end to end: both timelines with every stage the issue names, a
  valid SVG, and nothing left behind (processes, run directory, /dev/shm). No timing asserted.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from nicemu import tracepoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tp():
    """Tracing on in memory for one test, and off and empty afterwards."""
    tracepoint.clear()
    tracepoint.enable()
    yield tracepoint
    tracepoint.disable()
    tracepoint.clear()
    tracepoint._path = None


def stages(events) -> list[str]:
    return [e[2] for e in events]


def in_order(seen: list[str], wanted: list[str]) -> list[str]:
    """The stages of `wanted` not found in `seen` as a subsequence, in order."""
    pos = 0
    missing = []
    for w in wanted:
        try:
            pos = seen.index(w, pos) + 1
        except ValueError:
            missing.append(w)
    return missing


# --- the module ---------------------------------------------------------------------------

def test_off_by_default_records_nothing():
    assert "NICEMU_TRACE" not in os.environ and not tracepoint.enabled
    tracepoint.emit("x.y", a=1)
    assert tracepoint.events() == []


def test_enable_buffers_in_memory_with_pid_and_clock(tp):
    t0 = time.monotonic_ns()
    tp.emit("dev.rx.wire", len=64)
    tp.emit("drv.top_half", ICR="0x80")
    ev = tp.events()
    assert stages(ev) == ["dev.rx.wire", "drv.top_half"]
    assert all(e[1] == os.getpid() for e in ev)
    assert t0 <= ev[0][0] <= ev[1][0] <= time.monotonic_ns()
    assert ev[0][3] == {"len": 64}
    tp.disable()
    tp.emit("ignored")
    assert len(tp.events()) == 2  # disabling keeps what was recorded
    tp.flush()  # no file: flushing keeps them in memory
    assert len(tp.events()) == 2


def test_flush_writes_json_lines_to_file_pid(tp, tmp_path, monkeypatch):
    prefix = str(tmp_path / "trace")
    tp.enable(prefix)
    monkeypatch.setattr(tracepoint, "MAX_BUFFERED", 3)
    for i in range(4):
        tp.emit("s", i=i, obj=object())  # not JSON-able: written as its str()
    path = f"{prefix}.{os.getpid()}"
    assert len(tp.events()) == 1  # the first three went to the file when the buffer filled
    tp.flush()
    assert tp.events() == []
    with open(path, "a") as f:
        f.write('{"t": 1, "pid"')  # a writer killed mid-line: skipped on reading
    got = tracepoint.read_events(path)
    assert [e["state"]["i"] for e in got] == [0, 1, 2, 3]
    assert all(e["pid"] == os.getpid() and e["stage"] == "s" for e in got)


def test_environment_enables_a_new_process(tmp_path):
    prefix = tmp_path / "t"
    code = "from nicemu import tracepoint as t; assert t.enabled; t.emit('hello', n=1)"
    env = {**os.environ, "NICEMU_TRACE": str(prefix), "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    files = list(tmp_path.glob("t.*"))
    assert len(files) == 1  # written at exit, to FILE.<pid>
    (ev,) = tracepoint.read_events(str(files[0]))
    assert ev["stage"] == "hello" and ev["state"] == {"n": 1}


# --- a traced run in one process ----------------------------------------------------------------

RX_STAGES = ["dev.rx.wire", "dev.rx.fcs", "dev.rx.filter", "dev.rx.pktbuf", "dev.rx.dma",
             "dev.rx.writeback", "dev.icr.cause", "drv.napi_poll", "drv.rx.desc_dd", "drv.skb_alloc",
             "l2.eth_type_trans", "l3.ip_rcv", "l4.udp_rcv", "sock.queue", "sock.copy_to_user"]
TX_STAGES = ["sock.copy_from_user", "l4.udp_output", "l3.ip_output", "l2.neigh_output",
             "qdisc.enqueue", "qdisc.dequeue", "drv.xmit", "drv.tx.doorbell", "dev.tdt.doorbell",
             "dev.tx.dma", "dev.tx.fcs", "dev.tx.wire", "dev.rx.wire"]


def test_traced_in_process_run_records_the_stages_in_order(tp, monkeypatch):
    monkeypatch.setenv("KSTACK_RXFAST", "py")
    monkeypatch.setenv("KSTACK_TXFAST", "py")
    from driver.e1000 import E1000, E1000Config
    from driver.inprocess_bus import InProcessBus
    from kstack.inet import install
    from kstack.sock import AF_INET, SOCK_DGRAM
    from kstack.stack import NetStack
    from nicemu import DmaMemory
    from nicemu.nic import Nic

    monkeypatch.setattr(E1000, "tx_c", None, raising=False)  # the driver's TX in Python (KSTACK_E1000TX=py)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        na = Nic(DmaMemory(4 << 20), mac="52:54:00:00:aa:01", engine="python")
        nb = Nic(DmaMemory(4 << 20), mac="52:54:00:00:bb:02", engine="python")
    na.connect(nb)
    hosts = []
    for nic, cidr in ((na, "198.18.0.1/24"), (nb, "198.18.0.2/24")):
        stack = NetStack()
        inet = install(stack)
        bus = InProcessBus(nic)
        drv = E1000(bus, E1000Config(), name="eth0")
        stack.register_netdev(drv)
        stack.dev_open(drv)
        inet.add_address(drv, cidr)
        hosts.append((nic, stack, inet, bus, drv))

    def turn_until(cond, limit: float = 10.0) -> None:
        end = time.monotonic() + limit
        while not cond():
            assert time.monotonic() < end, "condition never held"
            for _, stack, _, _, drv in hosts:
                drv.process(0.0)
                stack.run_timers()
                if drv.qdisc.pending():
                    drv.qdisc.run()

    try:
        turn_until(lambda: all(h[4].carrier for h in hosts))
        sa = hosts[0][1].socket(AF_INET, SOCK_DGRAM)
        sb = hosts[1][1].socket(AF_INET, SOCK_DGRAM)
        sb.bind(("198.18.0.2", 7007))
        sa.sendmsg(b"warm-up", ("198.18.0.2", 7007))  # ARP first: not part of the trace
        turn_until(lambda: sb.poll() & 1)
        sb.recvmsg(2048)
        tp.clear()
        sa.sendmsg(b"traced", ("198.18.0.2", 7007))
        turn_until(lambda: sb.poll() & 1)
        assert sb.recvmsg(2048)[0] == b"traced"
        seen = stages(tp.events())
        assert in_order(seen, TX_STAGES) == []
        rx_from = seen.index("dev.rx.wire")
        assert in_order(seen[rx_from:], RX_STAGES) == []
        assert all(pid == os.getpid() for _, pid, _, _ in tp.events())
        sa.close()
        sb.close()
    finally:
        for nic, stack, inet, bus, drv in hosts:
            inet.shutdown()
            stack.dev_close(drv)
            drv.close()
            bus.close()
            nic.mem.close()


# --- nicemu trace end to end ------------------------------------------------------------------

ISSUE_STAGES = ["wire (in)", "FCS check", "address filter", "RX packet buffer", "DMA",
                "descriptor write-back", "interrupt or poll", "top half", "bottom half/NAPI poll",
                "sk_buff", "L2", "L3", "L4", "socket queue", "copy to the application", "qdisc",
                "driver", "TX ring doorbell", "FCS", "wire (out)"]


def _shm() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


def _environ_mentions(text: str) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/environ", "rb") as f:
                    if text.encode() in f.read():
                        pids.append(int(d))
            except OSError:
                continue
    return pids


def test_nicemu_trace_end_to_end(tmp_path):
    svg = tmp_path / "trace.svg"
    shm_before = _shm()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("NICEMU_TRACE", None)
    p = subprocess.Popen([sys.executable, "-m", "lab", "trace", "--svg", str(svg)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, out + err
    assert "kernel path:" in out and "bypass path:" in out and "pure-Python twins" in out
    table = out[out.index("side by side"):]
    rows = {ln[:26].strip(): ln[26:] for ln in table.splitlines()[2:] if ln[:26].strip()}
    for name in ISSUE_STAGES:
        assert name in rows, name
        kernel_cell = rows[name][:36].strip()
        assert kernel_cell != "-", f"the kernel path has no {name!r}"
    for name in ("wire (in)", "FCS check", "address filter", "RX packet buffer", "DMA",
                 "descriptor write-back", "interrupt or poll", "copy to the application", "driver",
                 "TX ring doorbell", "FCS", "wire (out)"):
        assert rows[name][36:].strip() != "-", f"the bypass path has no {name!r}"
    for name in ("top half", "sk_buff", "L3", "L4", "socket queue", "qdisc"):
        assert rows[name][36:].strip() == "-", f"the bypass path should have no {name!r}"
    for proc in ("client", "kernel-a", "kernel-b", "udp_echo", "emulator-k", "emulator-b",
                 "pmd-echo", "pmd-gen"):
        assert f" {proc} " in out, proc
    root = ET.parse(svg).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    texts = " ".join(t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text"))
    assert "kernel path" in texts and "bypass path" in texts and "wire in" in texts
    assert len(list(root.iter("{http://www.w3.org/2000/svg}title"))) > 40  # a tick per event
    run_dir = Path(f"/tmp/nicemu-{os.getuid()}/_demo-{p.pid}")
    assert not run_dir.exists()
    assert _environ_mentions(str(run_dir)) == []  # no child of the run is left
    assert _shm() <= shm_before
