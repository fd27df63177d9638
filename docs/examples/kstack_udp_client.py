"""A tiny application of the modeled kernel stack: send three UDP datagrams to an echo server
through kstack.socket (shaped like Python's socket module) and print the replies.

    NICEMU_KERNEL=/tmp/nicemu-$UID/hosts-pair/kernel-a.sock python docs/examples/kstack_udp_client.py 198.18.0.2

NICEMU_KERNEL names the kernel process (one host of `nicemu up`): every call below is a system
call into it over its syscall rings, and the datagrams go through its UDP, IP, ARP, qdisc and
e1000 driver to the emulated NIC.
"""
import sys

from kstack import socket as ksocket


def main() -> int:
    server = sys.argv[1] if len(sys.argv) > 1 else "198.18.0.2"
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    with ksocket.socket(ksocket.AF_INET, ksocket.SOCK_DGRAM) as s:
        s.settimeout(5.0)
        for i in range(3):
            s.sendto(f"hello {i}".encode(), (server, port))
            data, (host, sport) = s.recvfrom(2048)
            print(f"{host}:{sport} echoed {data.decode()!r}")
        print(f"from {s.getsockname()[0]}:{s.getsockname()[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
