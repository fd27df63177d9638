"""ping over a kstack raw ICMP socket, with iputils' output.

    python -m kstack.apps.ping [-c COUNT] [-s SIZE] [-i INTERVAL] [-W TIMEOUT] [-t TTL] [--kernel PATH] DEST

A raw socket receives every ICMP packet with its IPv4 header (as Linux's does): replies are
matched by identifier (this process's pid) and sequence number, the TTL read from the IP
header. RTTs are measured by this process's clock from the send call to the receive call.
Exit status as iputils: 0 when a reply came, 1 when none did, 2 on an error.
"""
from __future__ import annotations

import argparse
import math
import os
import struct
import sys
import time

from kstack import socket as ksocket
from kstack.apps.common import Stop, add_kernel_arg, open_kernel, report
from wire.checksum import internet_checksum

ICMP_ECHOREPLY, ICMP_DEST_UNREACH, ICMP_ECHO, ICMP_TIME_EXCEEDED = 0, 3, 8, 11
_UNREACH = {0: "Destination Net Unreachable", 1: "Destination Host Unreachable",
            2: "Destination Protocol Unreachable", 3: "Destination Port Unreachable",
            4: "Frag needed and DF set"}


def echo_request(ident: int, seq: int, size: int) -> bytes:
    """ICMP echo request: 8-byte header, then a timestamp and a byte pattern as iputils."""
    body = struct.pack("!Q", time.monotonic_ns())[:size] + bytes((8 + i) & 0xFF for i in range(max(0, size - 8)))
    hdr = struct.pack("!BBHHH", ICMP_ECHO, 0, 0, ident, seq)
    csum = internet_checksum(hdr + body)
    return struct.pack("!BBHHH", ICMP_ECHO, 0, csum, ident, seq) + body


def parse_reply(data: bytes) -> tuple[int, int, int, int, int, int] | None:
    """(type, code, id, seq, ttl, icmp length) of a packet read from the raw socket, or None.
    For an ICMP error the id and seq are those of our request quoted inside it."""
    ttl = 0
    if len(data) >= 20 and data[0] >> 4 == 4:
        ihl = (data[0] & 15) * 4
        ttl = data[8]
        data = data[ihl:]
    if len(data) < 8:
        return None
    typ, code, _csum, ident, seq = struct.unpack_from("!BBHHH", data)
    if typ in (ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED):
        inner = data[8:]
        if len(inner) < 28 or inner[0] >> 4 != 4:
            return None
        ihl = (inner[0] & 15) * 4
        if len(inner) < ihl + 8 or inner[9] != 1:
            return None
        _t, _c, _s, ident, seq = struct.unpack_from("!BBHHH", inner, ihl)
    return typ, code, ident, seq, ttl, len(data)


def fmt_ms(ms: float) -> str:
    """iputils' precision: fewer decimals as the time grows."""
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ping", description=__doc__.split("\n\n")[0])
    p.add_argument("-c", dest="count", type=int, default=0, help="stop after COUNT replies sent")
    p.add_argument("-s", dest="size", type=int, default=56, help="data bytes (default 56)")
    p.add_argument("-i", dest="interval", type=float, default=1.0, help="seconds between requests")
    p.add_argument("-W", dest="timeout", type=float, default=2.0, help="seconds to wait for a reply")
    p.add_argument("-t", dest="ttl", type=int, default=None, help="IP time to live (IP_TTL)")
    p.add_argument("destination")
    add_kernel_arg(p)
    args = p.parse_args(argv)
    if not 0 <= args.size <= 65507 or args.interval < 0 or args.timeout <= 0:
        p.error("size 0..65507, interval >= 0, timeout > 0")
    if args.ttl is not None and not 1 <= args.ttl <= 255:
        p.error("ttl 1..255")
    open_kernel(args)
    stop = Stop()
    dest = args.destination
    ident = os.getpid() & 0xFFFF
    try:
        s = ksocket.socket(ksocket.AF_INET, ksocket.SOCK_RAW, ksocket.IPPROTO_ICMP)
        if args.ttl is not None:
            s.setsockopt(ksocket.IPPROTO_IP, ksocket.IP_TTL, args.ttl)
    except OSError as e:
        print(f"ping: socket: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"PING {dest} ({dest}) {args.size}({args.size + 28}) bytes of data.", flush=True)
    sent_at: dict[int, float] = {}
    rtts: list[float] = []
    got: set[int] = set()
    errors = 0
    transmitted = 0
    start = time.monotonic()
    seq = 0
    last_send = start
    while not stop.set and (args.count == 0 or transmitted < args.count):
        seq = (seq + 1) & 0xFFFF
        try:
            s.sendto(echo_request(ident, seq, args.size), (dest, 0))
        except OSError as e:
            print(f"ping: sendmsg: {e.strerror or e}", flush=True)
            errors += 1
        last_send = time.monotonic()
        sent_at[seq] = last_send
        transmitted += 1
        last = args.count and transmitted >= args.count
        wait_until = last_send + (args.timeout if last else max(args.interval, 0.0))
        while not stop.set:
            left = wait_until - time.monotonic()
            if left <= 0 or (last and seq in got):
                break
            s.settimeout(left)
            try:
                data, addr = s.recvfrom(65535)
            except TimeoutError:
                break
            except OSError as e:
                print(f"ping: recvmsg: {e.strerror or e}", flush=True)
                break
            t = time.monotonic()
            r = parse_reply(data)
            if r is None:
                continue
            typ, code, rid, rseq, ttl, n = r
            if rid != ident or rseq not in sent_at:
                continue
            src = addr[0] if addr else dest
            if typ == ICMP_ECHOREPLY:
                if rseq in got:
                    print(f"{n} bytes from {src}: icmp_seq={rseq} ttl={ttl} (DUP!)", flush=True)
                    continue
                got.add(rseq)
                ms = (t - sent_at[rseq]) * 1000
                rtts.append(ms)
                print(f"{n} bytes from {src}: icmp_seq={rseq} ttl={ttl} time={fmt_ms(ms)} ms", flush=True)
            elif typ in (ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED):
                errors += 1
                what = _UNREACH.get(code, f"Dest Unreachable, Bad Code: {code}") \
                    if typ == ICMP_DEST_UNREACH else "Time to live exceeded"
                print(f"From {src} icmp_seq={rseq} {what}", flush=True)
    elapsed_ms = (last_send - start) * 1000
    s.close()
    received = len(got)
    loss = 100.0 * (transmitted - received) / transmitted if transmitted else 0.0
    err = f"+{errors} errors, " if errors else ""
    print(f"\n--- {dest} ping statistics ---")
    print(f"{transmitted} packets transmitted, {received} received, {err}{loss:g}% packet loss, "
          f"time {elapsed_ms:.0f}ms")
    result: dict = {"destination": dest, "transmitted": transmitted, "received": received,
                    "errors": errors, "loss_percent": loss, "time_ms": round(elapsed_ms)}
    if rtts:
        mn, mx = min(rtts), max(rtts)
        avg = sum(rtts) / len(rtts)
        mdev = math.sqrt(max(0.0, sum(r * r for r in rtts) / len(rtts) - avg * avg))
        print(f"rtt min/avg/max/mdev = {mn:.3f}/{avg:.3f}/{mx:.3f}/{mdev:.3f} ms")
        result.update(rtt_min_ms=mn, rtt_avg_ms=avg, rtt_max_ms=mx, rtt_mdev_ms=mdev)
    report("ping", result)
    return 0 if received else 1


if __name__ == "__main__":
    sys.exit(main())
