"""kstack TCP end to end with real processes: an emulator with two devices back to back, a
kernel process per host, applications in their own processes over kstack.socket.

- tcp_echo: a client's messages (1 byte to 200 kB) come back byte-exact; a connect to a
  closed port is ECONNREFUSED.
- tcp_bulk: 50 MB each way at once (the issue's figure; KSTACK_TCP_BULK_BYTES sets another
  size for quick local runs), checked by SHA-256, in NAPI and in interrupt mode; TCP counters
  on both kernels, nothing held afterwards.
- http_server/http_client: a generated body and a file, keep-alive, 404.
- A cable that drops, reorders and corrupts 1% of the frames both ways: 50 MB each way still
  byte-exact, with retransmissions counted and the corrupted frames counted by the devices as
  CRC errors.

Every wait is bounded (application timeouts, socket timeouts); nothing asserts a time."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest

from kstack.apps.http_common import generated_body
from kstack.apps.tcp_bulk import stream_sha256
from kstack_procs import APP_TIMEOUT, ENV, ROOT, KernelLab, two_kernels
from test_kstack_e2e import emulator_stats, find_key, stop_all, stop_app

ECHO_PORT = 7007
BULK_PORT = 5001
HTTP_PORT = 8080
BULK_BYTES = int(os.environ.get("KSTACK_TCP_BULK_BYTES", 50_000_000))  # each way
BULK_TIMEOUT = max(APP_TIMEOUT, BULK_BYTES / 100_000)  # 8 Mbit/s each way at the least

# A TCP client over kstack.socket: connects, sends each message and reads its echo back,
# then checks that a closed port is refused. One JSON line.
ECHO_CLIENT = textwrap.dedent(
    """
    import json, sys
    from kstack import socket as ks
    path, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sizes = [int(x) for x in sys.argv[4].split(",")]
    ks.connect_kernel(path)
    s = ks.socket(ks.AF_INET, ks.SOCK_STREAM)
    s.settimeout(20)
    s.setsockopt(ks.IPPROTO_TCP, ks.TCP_NODELAY, 1)
    s.connect((host, port))
    out = {"echoed": 0, "wrong": 0, "bytes": 0, "peer": list(s.getpeername())}
    for i, n in enumerate(sizes):
        msg = bytes((i + k * 7) & 0xFF for k in range(n))
        s.sendall(msg)
        got = b""
        while len(got) < n:
            b = s.recv(65536)
            if not b:
                break
            got += b
        out["echoed"] += got == msg
        out["wrong"] += got != msg
        out["bytes"] += len(got)
    s.shutdown(ks.SHUT_WR)
    out["eof"] = s.recv(10) == b""
    s.close()
    r = ks.socket(ks.AF_INET, ks.SOCK_STREAM)
    r.settimeout(20)
    try:
        r.connect((host, port + 1))
        out["refused"] = False
    except ConnectionRefusedError:
        out["refused"] = True
    r.close()
    print(json.dumps(out), flush=True)
    """
)


def run_py(code: str, *args: str, timeout: float = APP_TIMEOUT) -> dict:
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       env=ENV, cwd=ROOT, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def last_json(text: str) -> dict:
    return json.loads([ln for ln in text.splitlines() if ln.startswith("{")][-1])


def bulk_both_ways(klab: KernelLab, ka_sock: str, kb_sock: str, nbytes: int) -> list[dict]:
    """A sink on each kernel and a sender on each towards the other, at the same time."""
    sinks = [klab.app_bg("kstack.apps.tcp_bulk", "sink", "--port", str(BULK_PORT), "-i", "0",
                         "--kernel", k, name=f"sink-{n}", ready="tcp_bulk: listening")
             for n, k in (("a", ka_sock), ("b", kb_sock))]
    senders = [subprocess.Popen([sys.executable, "-m", "kstack.apps.tcp_bulk", "send", dst,
                                 "--port", str(BULK_PORT), "--bytes", str(nbytes), "--seed", str(seed),
                                 "-i", "0", "--kernel", k],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
               for k, dst, seed in ((ka_sock, "198.18.0.2", 11), (kb_sock, "198.18.0.1", 22))]
    results = []
    for p in senders:
        try:
            out, err = p.communicate(timeout=BULK_TIMEOUT)
        except subprocess.TimeoutExpired:
            for q in senders:
                q.kill()
                q.communicate(timeout=10)
            raise
        assert p.returncode == 0, out + err
        results.append(last_json(out))
    for s in sinks:
        s.p.wait(timeout=APP_TIMEOUT)  # the senders saw the sinks' EOF: they are closing
        s._t.join(timeout=5)
        while not s.lines.empty():
            s.seen.append(s.lines.get())
        assert s.p.returncode == 0, s.seen[-5:]
        results.append(last_json("\n".join(s.seen)))
    send_a, send_b, sink_a, sink_b = results
    assert send_a["bytes"] == nbytes and send_b["bytes"] == nbytes
    assert send_a["sha256"] == stream_sha256(11, nbytes) == sink_b["sha256"]
    assert send_b["sha256"] == stream_sha256(22, nbytes) == sink_a["sha256"]
    assert sink_a["bytes"] == sink_b["bytes"] == nbytes
    return results


def check_clean(stats: dict) -> None:
    snmp = stats["snmp"]
    assert snmp.get("TcpCurrEstab", 0) == 0
    assert stats["skb"]["skb_live"] == 0


@pytest.mark.parametrize("mode", ["napi", "interrupt"])
def test_echo_and_bulk_both_ways(klab, mode):
    ka, kb, ka_sock, kb_sock = two_kernels(klab, mode, mode)
    echo = klab.app_bg("kstack.apps.tcp_echo", "--port", str(ECHO_PORT), "--kernel", kb_sock,
                       name="tcp_echo", ready="tcp_echo: listening")
    sizes = [1, 100, 1460, 1461, 5000, 65536, 200_000]
    got = run_py(ECHO_CLIENT, ka_sock, "198.18.0.2", str(ECHO_PORT), ",".join(map(str, sizes)))
    assert got["echoed"] == len(sizes) and got["wrong"] == 0 and got["bytes"] == sum(sizes)
    assert got["eof"] and got["refused"] and got["peer"] == ["198.18.0.2", ECHO_PORT]
    echoed = stop_app(echo)
    assert echoed["connections"] == 1 and echoed["bytes"] == sum(sizes) and echoed["errors"] == 0

    bulk_both_ways(klab, ka_sock, kb_sock, BULK_BYTES)
    sa, sb = ka.stats(), kb.stats()
    for s in (sa, sb):
        snmp = s["snmp"]
        assert snmp["TcpActiveOpens"] >= 1 and snmp["TcpPassiveOpens"] >= 1
        assert snmp.get("TcpInCsumErrors", 0) == 0
    assert sb["snmp"]["TcpOutRsts"] >= 1  # the refused connect
    stop_all(ka, kb)


def test_http_server_and_client(klab, tmp_path):
    ka, kb, ka_sock, kb_sock = two_kernels(klab)
    root = tmp_path / "www"
    root.mkdir()
    page = b"<html><body>kstack</body></html>\n" * 1000
    (root / "index.html").write_bytes(page)
    srv = klab.app_bg("kstack.apps.http_server", "--port", str(HTTP_PORT), "--root", str(root),
                      "--kernel", kb_sock, name="http_server", ready="http_server: listening")
    base = f"http://198.18.0.2:{HTTP_PORT}"
    r = klab.app("kstack.apps.http_client", "--kernel", ka_sock, "--sha256", "-n", "3",
                 f"{base}/bytes/1000000")
    assert r.returncode == 0, r.stdout + r.stderr
    res = last_json(r.stdout)
    assert res["status"] == 200 and res["requests"] == 3 and res["bytes"] == 1_000_000
    assert res["sha256"] == hashlib.sha256(generated_body(0, 1_000_000)).hexdigest()
    assert res["connections"] == 1  # keep-alive: three requests on one connection
    r = klab.app("kstack.apps.http_client", "--kernel", ka_sock, f"{base}/index.html")
    assert r.returncode == 0, r.stderr
    assert page.decode() in r.stdout and last_json(r.stdout)["status"] == 200
    r = klab.app("kstack.apps.http_client", "--kernel", ka_sock, f"{base}/nothing-here")
    assert last_json(r.stdout)["status"] == 404
    r = klab.app("kstack.apps.http_client", "--kernel", ka_sock, f"{base}/../../etc/passwd")
    assert last_json(r.stdout)["status"] in (400, 404)
    served = stop_app(srv)
    assert served["requests"] >= 6 and served["errors"] == 0
    stop_all(ka, kb)


def test_bulk_over_a_lossy_reordering_corrupting_cable(klab):
    faults = {"drop": 0.01, "reorder": 0.01, "corrupt": 0.01, "seed": 5}
    topo = {"devices": {"nic0": {"mac": "52:54:00:12:34:56"}, "nic1": {"mac": "52:54:00:12:34:57"}},
            "cables": [{"kind": "pair", "ends": ["nic0", "nic1"],
                        "faults": {"nic0": dict(faults), "nic1": {**faults, "seed": 6}}}]}
    socks = klab.emulator_config(topo, name="tcp-lossy")
    ka, kb, ka_sock, kb_sock = two_kernels(klab, "napi", "interrupt",
                                           sockets=(socks["nic0"], socks["nic1"]))
    bulk_both_ways(klab, ka_sock, kb_sock, BULK_BYTES)
    sa, sb = ka.stats(), kb.stats()
    assert sa["snmp"].get("TcpRetransSegs", 0) + sb["snmp"].get("TcpRetransSegs", 0) > 0
    emu = emulator_stats(klab)
    corrupted = sum(find_key(emu, "corrupted"))
    crc = sum(find_key(sa, "rx_crc_errors")) + sum(find_key(sb, "rx_crc_errors"))
    assert corrupted > 0 and crc > 0
    stop_all(ka, kb)


# Errors and readiness through the channel as Linux gives them, on one kernel (its own
# address: the loopback path). One JSON line of what each step saw.
ERRORS_APP = textwrap.dedent(
    """
    import errno, json, struct, sys
    from kstack import socket as ks
    ks.connect_kernel(sys.argv[1])
    me = sys.argv[2]
    out = {}
    L = ks.socket(ks.AF_INET, ks.SOCK_STREAM)
    L.bind((me, 9000)); L.listen(4)
    L2 = ks.socket(ks.AF_INET, ks.SOCK_STREAM)
    try:
        L2.bind((me, 9000))
    except OSError as e:
        out["bind_again"] = errno.errorcode[e.errno]
    L2.close()
    L.settimeout(0.1)
    try:
        L.accept()
    except TimeoutError:
        out["accept_timeout"] = True
    c = ks.socket(ks.AF_INET, ks.SOCK_STREAM)
    c.setblocking(False)
    try:
        c.connect((me, 9000))
    except BlockingIOError as e:
        out["connect"] = errno.errorcode[e.errno]
    r, w, x = ks.select([], [c], [], 5)
    out["writable"] = w == [c]
    out["so_error"] = c.getsockopt(ks.SOL_SOCKET, ks.SO_ERROR)
    L.settimeout(5)
    s, peer = L.accept()
    out["peer_ok"] = peer == c.getsockname()
    try:
        c.recv(10)
    except BlockingIOError:
        out["recv_nonblocking"] = "EAGAIN"
    s.settimeout(0.1)
    try:
        s.recv(10)
    except TimeoutError:
        out["recv_timeout"] = True
    c.setblocking(True)
    c.sendall(b"ping")
    p = ks.poll(); p.register(s, ks.POLLIN)
    p.poll(5000)  # waits in the kernel until "ping" is there
    p.register(c, ks.POLLIN | ks.POLLOUT)
    ready = dict(p.poll(5000))
    out["poll"] = [ready.get(s.fileno(), 0), ready.get(c.fileno(), 0)]
    s.settimeout(5)
    out["recv"] = s.recv(10).decode()
    s.setsockopt(ks.SOL_SOCKET, ks.SO_LINGER, struct.pack("ii", 1, 0))
    out["linger"] = list(struct.unpack("ii", s.getsockopt(ks.SOL_SOCKET, ks.SO_LINGER, 8)))
    s.close()  # linger 0: a RST
    c.settimeout(5)
    try:
        c.recv(10)
    except ConnectionResetError:
        out["reset"] = True
    try:
        c.send(b"x")
    except OSError as e:
        out["send_after_reset"] = errno.errorcode[e.errno]
    c.close()
    # linger > 0: close waits for the FIN's ACK
    c = ks.socket(ks.AF_INET, ks.SOCK_STREAM); c.settimeout(5)
    c.connect((me, 9000)); s, _ = L.accept()
    c.setsockopt(ks.SOL_SOCKET, ks.SO_LINGER, struct.pack("ii", 1, 5))
    c.sendall(b"x" * 100000)
    s.settimeout(5)
    got = 0
    c.close()
    while True:
        b = s.recv(65536)
        if not b:
            break
        got += len(b)
    out["linger_close_delivered"] = got
    s.close()
    r = ks.socket(ks.AF_INET, ks.SOCK_STREAM); r.setblocking(False)
    try:
        r.connect((me, 9001))
    except BlockingIOError:
        pass
    ks.select([r], [r], [], 5)
    out["refused_so_error"] = errno.errorcode.get(r.getsockopt(ks.SOL_SOCKET, ks.SO_ERROR))
    r.close()
    L.close()
    print(json.dumps(out), flush=True)
    """
)


def test_errors_and_readiness_through_the_channel(klab):
    ka, kb, ka_sock, kb_sock = two_kernels(klab)
    got = run_py(ERRORS_APP, ka_sock, "198.18.0.1")
    assert got == {
        "bind_again": "EADDRINUSE", "accept_timeout": True, "connect": "EINPROGRESS",
        "writable": True, "so_error": 0, "peer_ok": True, "recv_nonblocking": "EAGAIN",
        "recv_timeout": True, "recv": "ping", "poll": [1, 4],  # s: POLLIN, c: POLLOUT only
        "linger": [1, 0], "reset": True, "send_after_reset": "EPIPE",
        "linger_close_delivered": 100000, "refused_so_error": "ECONNREFUSED"}, got
    sa = ka.stats()
    assert sa["snmp"]["TcpExtTCPAbortOnData"] == 1
    stop_all(ka, kb)


def test_kill_9_of_a_sender_mid_transfer_leaves_nothing(klab):
    ka, kb, ka_sock, kb_sock = two_kernels(klab)
    sink = klab.app_bg("kstack.apps.tcp_bulk", "sink", "--port", str(BULK_PORT), "-i", "0",
                       "--kernel", kb_sock, name="sink", ready="tcp_bulk: listening")
    sender = klab.app_bg("kstack.apps.tcp_bulk", "send", "198.18.0.2", "--port", str(BULK_PORT),
                         "--bytes", str(10 ** 9), "-i", "0.2", "--kernel", ka_sock, name="sender",
                         ready="[send]")
    sender.kill9()
    sink.p.wait(timeout=APP_TIMEOUT)  # the kernel closed the dead sender's socket: EOF or RST
    sink._t.join(timeout=5)
    while not sink.lines.empty():
        sink.seen.append(sink.lines.get())
    flow = last_json("\n".join(sink.seen))["flows"][0]
    assert 0 < flow["bytes"] < 10 ** 9
    for k in (ka, kb):  # the orphan finished (FIN or RST) and nothing is held
        k.wait_stats(lambda s: s["snmp"].get("TcpCurrEstab", 0) == 0 and s["skb"]["skb_live"] == 0)
    stop_all(ka, kb)


def test_gro_and_gso_switched_per_device(klab):
    """`--device ...,gro=off` on b and `gso=off` on a: a's data leaves as MSS-sized segments
    and b hands every frame up alone; the other way (the defaults) b sends GSO packets and a
    merges. Both ways byte-exact."""
    a, b = klab.emulator_pair()
    ka_sock, kb_sock = str(klab.dir / "ka.sock"), str(klab.dir / "kb.sock")
    ka = klab.kernel("--device", f"{a},name=eth0,gso=off", "--addr", "eth0=198.18.0.1/24",
                     "--syscall-socket", ka_sock, name="kernel-a")
    kb = klab.kernel("--device", f"{b},name=eth0,gro=off", "--addr", "eth0=198.18.0.2/24",
                     "--syscall-socket", kb_sock, name="kernel-b")
    bulk_both_ways(klab, ka_sock, kb_sock, 3_000_000)
    sa, sb = ka.stats(), kb.stats()
    na, nb = sa["devices"]["eth0"]["netdev"], sb["devices"]["eth0"]["netdev"]
    assert na.get("gso_packets", 0) == 0  # a: GSO off
    assert nb.get("gro_held", 0) == 0 and nb.get("gro_packets", 0) == 0  # b: GRO off
    assert nb["gso_packets"] > 0 and nb["gso_wire_packets"] > 4 * nb["gso_packets"]  # b: default on
    assert na["gro_packets"] > 0 and na["gro_wire_packets"] > 4 * na["gro_packets"]  # a: default on
    for s in (sa, sb):
        assert s["snmp"].get("TcpInCsumErrors", 0) == 0
    stop_all(ka, kb)


def test_tails_through_the_doorbell_page(klab):
    """`--device ...,doorbell_page=on`: the kernels' TDT/RDT writes go to the doorbell page the
    emulator polls (docs/transport.md); a message only wakes a sleeping emulator. Byte-exact
    both ways, and the page counted in `ethtool -S`; without the option no page."""
    a, b = klab.emulator_pair()
    ka_sock, kb_sock = str(klab.dir / "ka.sock"), str(klab.dir / "kb.sock")
    ka = klab.kernel("--device", f"{a},name=eth0,doorbell_page=on", "--addr", "eth0=198.18.0.1/24",
                     "--syscall-socket", ka_sock, name="kernel-a")
    kb = klab.kernel("--device", f"{b},name=eth0", "--addr", "eth0=198.18.0.2/24",
                     "--syscall-socket", kb_sock, name="kernel-b")
    bulk_both_ways(klab, ka_sock, kb_sock, 2_000_000)
    ea, eb = ka.stats()["ethtool"]["eth0"], kb.stats()["ethtool"]["eth0"]
    assert ea["page_doorbells"] + ea["page_wakeups"] > 100 and ea["page_doorbells"] > 0
    assert "page_doorbells" not in eb  # b did not ask
    stop_all(ka, kb)
