"""The reference echo server: Python over the real Linux kernel's UDP sockets on loopback.

    python -m lab.linux_echo

Prints {"event": "up", "port": P}; echoes every datagram until SIGTERM, then prints
{"event": "counters", "echoed": N}. Leaves when its parent goes (PR_SET_PDEATHSIG by the
controller), so it never outlives the demo.
"""
from __future__ import annotations

import json
import signal
import socket
import sys


def main() -> int:
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(0.2)
    print(json.dumps({"event": "up", "port": s.getsockname()[1]}), flush=True)
    echoed = 0
    while not stop:
        try:
            data, addr = s.recvfrom(2048)
        except (TimeoutError, InterruptedError):
            continue
        s.sendto(data, addr)
        echoed += 1
    print(json.dumps({"event": "counters", "echoed": echoed}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
