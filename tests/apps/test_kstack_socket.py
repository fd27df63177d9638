"""kstack.socket and the shipped applications, in real separate processes, against a
SyscallServer over the loopback Socks (kstack_loopsock) served by a thread of this process."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from kstack import socket as ksocket
from kstack_loopsock import ServerThread

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _wait(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if cond():
                return True
        except RuntimeError:
            pass
        time.sleep(0.01)
    return False


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def kernel(tmp_path):
    shm_before = set(os.listdir("/dev/shm"))
    fds_before = _fds()
    path = str(tmp_path / "kernel.sock")
    st = ServerThread(path)
    st.path = path
    yield st
    ksocket.disconnect_kernel()  # this process's channel, if a test made one
    st.close()
    assert set(os.listdir("/dev/shm")) == shm_before
    assert _wait(lambda: _fds() <= fds_before), _fds() - fds_before


def _env(path: str) -> dict[str, str]:
    return {**os.environ, ksocket.ENV: path, "PYTHONPATH": ROOT}


def _app(path: str, code: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=_env(path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _run(path: str, code: str, timeout: float = 30) -> str:
    p = _app(path, code)
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err
    return out


def test_send_and_receive_both_ways_between_processes(kernel):
    server = _app(kernel.path, """
        from kstack import socket as k
        s = k.socket(k.AF_INET, k.SOCK_DGRAM)
        s.bind(("198.18.0.1", 5001))
        print("ready", flush=True)
        s.settimeout(10)
        data, addr = s.recvfrom(100)
        s.sendto(data.upper(), addr)
        buf = bytearray(8)
        n, addr = s.recvfrom_into(buf)
        print(bytes(buf[:n]), addr[1] > 0, flush=True)
    """)
    assert server.stdout.readline().strip() == "ready"
    out = _run(kernel.path, """
        from kstack import socket as k
        with k.socket(k.AF_INET, k.SOCK_DGRAM) as c:
            c.settimeout(10)
            c.connect(("198.18.0.1", 5001))
            c.send(b"hello")
            print(c.recv(100), c.getpeername(), c.getsockname()[1] > 0)
            c.sendto(b"0123456789", ("198.18.0.1", 5001))
    """)
    assert out.strip() == "b'HELLO' ('198.18.0.1', 5001) True"
    rest, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
    assert rest.strip() == "b'01234567' True"  # truncated to the buffer, as Linux does
    st = kernel.server.stats()
    assert st["syscalls"]["sendto"] == 3 and st["bytes_copied_in"] >= 20


def test_timeout_nonblocking_and_errnos(kernel):
    out = _run(kernel.path, """
        import errno
        from kstack import socket as k
        s = k.socket(k.AF_INET, k.SOCK_DGRAM)
        s.bind(("0.0.0.0", 5002))
        s.settimeout(0.05)
        try:
            s.recv(10)
        except k.timeout as e:
            print("timeout", type(e).__name__, e)
        s.setblocking(False)
        try:
            s.recv(10)
        except BlockingIOError as e:
            print("eagain", e.errno == errno.EAGAIN)
        print(s.gettimeout(), s.getblocking())
        t = k.socket(k.AF_INET, k.SOCK_DGRAM)
        def err(f, *a):
            try:
                f(*a)
            except OSError as e:
                return errno.errorcode.get(e.errno, e.errno)
            return "ok"
        print(err(t.bind, ("0.0.0.0", 5002)), err(t.send, b"x"), err(t.getpeername),
              err(t.setsockopt, k.SOL_SOCKET, 999, 1), err(k.socket, k.AF_INET, 1, 17))
        t.setsockopt(k.SOL_SOCKET, k.SO_RCVBUF, 4096)
        t.setsockopt(k.IPPROTO_IP, k.IP_TOS, 0x10)
        print(t.getsockopt(k.SOL_SOCKET, k.SO_RCVBUF), t.getsockopt(k.IPPROTO_IP, k.IP_TOS),
              t.getsockopt(k.SOL_SOCKET, k.SO_ERROR))
        t.close()
        print(err(t.recv, 1), err(t.close))
        try:
            t.sendto(b"x", ("198.18.0.1", 70000))
        except OverflowError:
            print("overflow")
    """)
    lines = out.splitlines()
    assert lines[0] == "timeout TimeoutError timed out"
    assert lines[1] == "eagain True"
    assert lines[2] == "0.0 False"
    assert lines[3] == "EADDRINUSE EDESTADDRREQ ENOTCONN ENOPROTOOPT EPROTONOSUPPORT"
    assert lines[4] == "8192 16 0"
    assert lines[5] == "EBADF ok"
    assert lines[6] == "overflow"


def test_select_and_poll(kernel):
    app = _app(kernel.path, """
        from kstack import socket as k
        a = k.socket(); a.bind(("0.0.0.0", 5003))
        b = k.socket(); b.bind(("0.0.0.0", 5004))
        print(k.select([a, b], [], [], 0.05)[0] == [], flush=True)   # nothing: times out
        r, w, x = k.select([], [a], [], 0)
        print(w == [a], flush=True)
        print("ready", flush=True)
        r, w, x = k.select([a, b], [], [], 10)
        print(r == [b], b.recv(10), flush=True)
        p = k.poll()
        p.register(a, k.POLLIN)
        p.register(b.fileno(), k.POLLIN)
        print(p.poll(10000) == [(a.fileno(), k.POLLIN)], a.recv(10), flush=True)
        p.unregister(b)
        print(p.poll(0), flush=True)
    """)
    assert app.stdout.readline().strip() == "True"
    assert app.stdout.readline().strip() == "True"
    assert app.stdout.readline().strip() == "ready"
    time.sleep(0.1)  # the select is parked in the kernel (or about to be): either way works
    ksocket.connect_kernel(kernel.path)
    s = ksocket.socket()
    s.sendto(b"to-b", ("198.18.0.1", 5004))
    assert app.stdout.readline().strip() == "True b'to-b'"
    s.sendto(b"to-a", ("198.18.0.1", 5003))
    s.close()
    out, err = app.communicate(timeout=30)
    assert app.returncode == 0, err
    assert out.splitlines() == ["True b'to-a'", "[]"]


def test_kill_9_releases_sockets_and_memory(kernel):
    app = _app(kernel.path, """
        import time
        from kstack import socket as k
        socks = [k.socket() for _ in range(3)]
        socks[0].bind(("0.0.0.0", 5005))
        socks[1].settimeout(None)
        print("ready", flush=True)
        socks[1].recv(10)   # a multishot receive armed in the kernel when the kill comes
    """)
    assert app.stdout.readline().strip() == "ready"
    # changed on purpose: recv arms a standing (multishot) receive and waits in the app
    assert _wait(lambda: kernel.server.stats()["multishot"] == 1)
    assert 5005 in kernel.net.ports
    app.send_signal(signal.SIGKILL)
    app.wait(10)
    app.stdout.close()
    app.stderr.close()
    assert _wait(lambda: kernel.server.stats()["apps"] == 0)
    assert kernel.net.closed == 3 and 5005 not in kernel.net.ports
    st = kernel.server.stats()
    assert st["parked"] == 0 and st["multishot"] == 0 and st["counters"]["disconnect_exit"] == 1


def test_kernel_death_fails_calls_instead_of_hanging(tmp_path):
    path = str(tmp_path / "k.sock")
    srv = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "kstack_loopsock.py"), path],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout.readline().strip() == "ready"
        app = _app(path, """
            import errno
            from kstack import socket as k
            s = k.socket(); s.bind(("0.0.0.0", 5006))
            print("ready", flush=True)
            try:
                s.recv(10)
            except OSError as e:
                print(errno.errorcode[e.errno])
        """)
        assert app.stdout.readline().strip() == "ready"
        time.sleep(0.1)
        srv.kill()
        out, _ = app.communicate(timeout=30)
        assert out.strip() == "ECONNRESET"
    finally:
        srv.kill()
        srv.wait()
        srv.stdout.close()


def test_ping_app(kernel):
    p = subprocess.run([sys.executable, "-m", "kstack.apps.ping", "-c", "3", "-i", "0.05", "-s", "100",
                        "198.18.0.2"], env=_env(kernel.path), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "PING 198.18.0.2 (198.18.0.2) 100(128) bytes of data."
    for i in range(3):
        assert lines[1 + i].startswith(f"108 bytes from 198.18.0.2: icmp_seq={i + 1} ttl=64 time=")
        assert lines[1 + i].endswith(" ms")
    assert lines[5] == "--- 198.18.0.2 ping statistics ---"
    assert lines[6].startswith("3 packets transmitted, 3 received, 0% packet loss, time ")
    assert lines[7].startswith("rtt min/avg/max/mdev = ")
    res = json.loads(lines[8])
    assert res["app"] == "ping" and res["received"] == 3
    assert res["costs"]["syscalls_by_op"]["sendto"] == 3 and res["costs"]["cpu_ns"] > 0


def test_udp_send_to_sink_and_echo(kernel):
    env = _env(kernel.path)
    sink = subprocess.Popen([sys.executable, "-m", "kstack.apps.udp_sink", "--port", "5007", "--count", "500"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert sink.stdout.readline().startswith("udp_sink: listening on 0.0.0.0:5007")
    snd = subprocess.run([sys.executable, "-m", "kstack.apps.udp_send", "198.18.0.1", "5007", "--count",
                          "500", "--size", "100"], env=env, capture_output=True, text=True, timeout=60)
    assert snd.returncode == 0, snd.stderr
    sent = json.loads(snd.stdout.splitlines()[-1])
    assert sent["sent"] == 500 and sent["costs"]["bytes_copied_in"] == 50000
    out, err = sink.communicate(timeout=60)
    got = json.loads(out.splitlines()[-1])
    assert got["received"] == 500 and got["lost"] == 0 and got["bytes"] == 50000
    assert got["costs"]["bytes_copied_out"] == 50000

    echo = subprocess.Popen([sys.executable, "-m", "kstack.apps.udp_echo", "--port", "5008", "--count", "2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert echo.stdout.readline().startswith("udp_echo: listening")
    out = _run(kernel.path, """
        from kstack import socket as k
        s = k.socket(); s.settimeout(10)
        for m in (b"one", b"two"):
            s.sendto(m, ("198.18.0.1", 5008)); print(s.recv(10))
    """)
    assert out.split() == ["b'one'", "b'two'"]
    rest, err = echo.communicate(timeout=30)
    assert json.loads(rest.splitlines()[-1])["echoed"] == 2


def test_no_kernel_is_a_clear_error(tmp_path):
    p = subprocess.run([sys.executable, "-m", "kstack.apps.ping", "-c", "1", "--kernel",
                        str(tmp_path / "none.sock"), "198.18.0.2"], capture_output=True, text=True,
                       timeout=30, env={**os.environ, "PYTHONPATH": ROOT})
    assert p.returncode == 2 and "cannot reach the kernel" in p.stderr


def test_async_send_errors_surface_as_pending_socket_errors(kernel):
    out = _run(kernel.path, """
        import errno
        from kstack import socket as k
        s = k.socket(); s.bind(("198.18.0.1", 5010))
        print(s.sendto(b"abc", ("198.19.255.1", 9)))      # async: returns at once
        print(errno.errorcode[s.getsockopt(k.SOL_SOCKET, k.SO_ERROR)], s.getsockopt(k.SOL_SOCKET, k.SO_ERROR))
        s.sendto(b"abc", ("198.19.255.1", 9))
        k.select([], [s], [], 0)                             # any later call reaps the failure
        try:
            s.sendto(b"ok", ("198.18.0.1", 5010))
        except OSError as e:
            print("send", errno.errorcode[e.errno])
        s.sendto(b"abc", ("198.19.255.1", 9))
        s.getsockname()
        try:
            s.recv(10)
        except OSError as e:
            print("recv", errno.errorcode[e.errno])
        print(s.sendto(b"fine", ("198.18.0.1", 5010)), s.recv(10))
        t = k.socket()
        try:
            t.sendto(b"x", ("198.19.255.1", 9))               # never bound: synchronous
        except OSError as e:
            print("first send", errno.errorcode[e.errno])
        c = k.costs()
        print(c["async_errors"], c["submissions"] > 0, c["syscalls"] == c["submissions"] + c["completions_reaped"])
    """)
    assert out.splitlines() == ["3", "ENETUNREACH 0", "send ENETUNREACH", "recv ENETUNREACH",
                                "4 b'fine'", "first send ENETUNREACH", "3 True True"]


def test_select_counts_datagrams_already_in_the_completion_ring(kernel):
    ksocket.connect_kernel(kernel.path)
    a = ksocket.socket()
    a.bind(("198.18.0.1", 5011))
    a.setblocking(False)
    with pytest.raises(BlockingIOError):
        a.recv(10)  # arms the multishot receive (and a flush: nothing yet)
    b = ksocket.socket()
    b.sendto(b"one", ("198.18.0.1", 5011))
    b.sendto(b"two", ("198.18.0.1", 5011))
    assert _wait(lambda: kernel.server.stats()["counters"].get("multishot_delivered") == 2)
    assert not kernel.net.ports[5011].queue  # in the completion ring, not in the socket
    assert ksocket.select([a], [], [], 0)[0] == [a]
    p = ksocket.poll()
    p.register(a, ksocket.POLLIN)
    assert p.poll(0) == [(a.fileno(), ksocket.POLLIN)]
    assert a.recv(10, ksocket.MSG_PEEK) == b"one"
    assert a.recv(10) == b"one"
    assert ksocket.select([a], [], [], 0)[0] == [a]
    assert a.recvfrom(10) == (b"two", ("198.18.0.1", b.getsockname()[1]))
    assert ksocket.select([a], [], [], 0)[0] == []
    assert p.poll(0) == []
    a.close()
    b.close()


def test_kill_9_mid_stream_leaves_nothing_behind(kernel):
    rx = _app(kernel.path, """
        from kstack import socket as k
        s = k.socket(); s.bind(("198.18.0.1", 5012)); s.settimeout(10)
        print("ready", flush=True)
        n = 0
        while True:
            s.recv(100); n += 1
            if n == 100:
                print("flowing", flush=True)
    """)
    assert rx.stdout.readline().strip() == "ready"
    tx = _app(kernel.path, """
        from kstack import socket as k
        s = k.socket(); s.connect(("198.18.0.1", 5012))
        while True:
            s.send(b"y" * 18)
    """)
    assert rx.stdout.readline().strip() == "flowing"
    st = kernel.server.stats()
    assert st["apps"] == 2 and st["multishot"] == 1
    for p in (tx, rx):
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        p.stdout.close()
        p.stderr.close()
    assert _wait(lambda: kernel.server.stats()["apps"] == 0)
    st = kernel.server.stats()
    assert st["parked"] == 0 and st["multishot"] == 0
    assert st["counters"]["disconnect_exit"] == 2 and st["counters"].get("corrupt", 0) == 0
    assert kernel.net.ports == {} and kernel.net.closed == 2


def test_sync_mode_still_works(kernel):
    out = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        from kstack import socket as k
        a = k.socket(); a.bind(("198.18.0.1", 5013)); a.settimeout(5)
        b = k.socket(); b.connect(("198.18.0.1", 5013))
        for i in range(3):
            b.send(bytes([65 + i]))
        print(a.recv(5), a.recv(5), a.recv(5), k.costs()["syscalls_by_op"])
    """)], env={**_env(kernel.path), "NICEMU_ASYNC_SEND": "0", "NICEMU_MULTISHOT": "0"},
        capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split(" {")[0] == "b'A' b'B' b'C'"
    assert "'recvfrom': 3" in out.stdout and "recv_multishot" not in out.stdout
