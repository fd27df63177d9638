"""kstack over the real kernel-style e1000 driver and two emulated NICs in-process: UDP both
ways with the checksum offloaded (TX IC on one side, RXCSUM on the other) or in software, a
4000-byte ping fragmented both ways, and every sk_buff back in its pool."""
import time
import warnings

import pytest

from driver.e1000 import E1000, E1000Config
from driver.inprocess_bus import InProcessBus
from kstack.inet import install
from kstack.sock import IPPROTO_ICMP, SOCK_DGRAM, SOCK_RAW
from kstack.stack import NetStack
from nicemu import DmaMemory
from nicemu.nic import Nic
from wire.icmp import ICMP_ECHOREPLY, IcmpMessage


class Host:
    def __init__(self, nic: Nic, cidr: str, csum: bool) -> None:
        self.nic = nic
        self.stack = NetStack()
        self.inet = install(self.stack)
        self.bus = InProcessBus(nic)
        self.drv = E1000(self.bus, E1000Config(tx_csum=csum, rx_csum=csum), name="eth0")
        self.stack.register_netdev(self.drv)
        self.stack.dev_open(self.drv)
        self.inet.add_address(self.drv, cidr)

    def turn(self) -> None:
        self.drv.process(0.0)
        self.stack.run_timers()
        if self.drv.qdisc.pending():
            self.drv.qdisc.run()

    def close(self) -> None:
        self.inet.shutdown()
        self.stack.dev_close(self.drv)
        self.drv.close()
        self.bus.close()
        self.nic.mem.close()


@pytest.fixture
def hosts():
    made = []

    def make(csum_a: bool, csum_b: bool):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            na = Nic(DmaMemory(4 << 20), mac="52:54:00:00:aa:01")
            nb = Nic(DmaMemory(4 << 20), mac="52:54:00:00:bb:02")
        na.connect(nb)
        a, b = Host(na, "198.18.0.1/24", csum_a), Host(nb, "198.18.0.2/24", csum_b)
        made.extend((a, b))
        return a, b

    yield make
    for h in made:
        h.close()
    for h in made:
        assert h.stack.pool.live == 0


def run_until(a, b, cond, limit=10.0):
    end = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < end, "condition never held"
        a.turn()
        b.turn()


def readable(s):
    return lambda: s.poll() & 1


@pytest.mark.parametrize("csum_a, csum_b", [(True, False), (False, True), (True, True)])
def test_udp_and_ping_over_e1000(hosts, csum_a, csum_b):
    a, b = hosts(csum_a, csum_b)
    run_until(a, b, lambda: a.drv.carrier and b.drv.carrier)
    u = b.stack.socket(2, SOCK_DGRAM)
    u.bind(("0.0.0.0", 7))
    c = a.stack.socket(2, SOCK_DGRAM)
    c.sendmsg(b"through the e1000", ("198.18.0.2", 7))
    run_until(a, b, readable(u))
    data, addr = u.recvmsg(100)
    assert data == b"through the e1000"
    u.sendmsg(b"and back", addr)
    run_until(a, b, readable(c))
    assert c.recvmsg(100) == (b"and back", ("198.18.0.2", 7))
    c.sendmsg(bytes(range(256)) * 16, ("198.18.0.2", 7))
    run_until(a, b, readable(u))
    assert u.recvmsg(5000)[0] == bytes(range(256)) * 16
    p = a.stack.socket(2, SOCK_RAW, IPPROTO_ICMP)
    p.sendmsg(IcmpMessage.echo(7, 1, b"p" * 4000).emit(), ("198.18.0.2", 0))
    run_until(a, b, readable(p))
    d = p.recvmsg(9000)[0]
    assert IcmpMessage.parse(d[20:]).type == ICMP_ECHOREPLY and len(d) == 4028
    for h in (a, b):
        assert h.stack.snmp["UdpInCsumErrors"] == 0 and h.stack.snmp["IpInHdrErrors"] == 0
        assert not h.stack.pool.drops
    assert a.stack.snmp["IpReasmOKs"] == 1 and b.stack.snmp["IpReasmOKs"] == 2
    for s in (u, c, p):
        s.close()
