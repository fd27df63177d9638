"""kstack.route via Inet: longest-prefix match, metrics, connected/local/broadcast routes."""
import pytest

from kstack.route import RTN_BROADCAST, RTN_LOCAL, RTN_UNICAST
from kstack_fakes import FakeDevice, FakeNet
from wire.ipv4 import ntoa


@pytest.fixture
def host():
    net = FakeNet()
    h = net.host("r", "198.18.0.1/24")
    h.add_dev(FakeDevice("eth1", net.mac()), net.hub("b"), "198.18.1.1/24")
    h.add_dev(FakeDevice("eth2", net.mac()), net.hub("c"), "198.19.0.1/16")
    yield h
    net.shutdown()
    assert net.live() == 0


def test_connected_local_broadcast(host):
    inet = host.inet
    r = inet.route_get("198.18.0.7")
    assert r.type == RTN_UNICAST and r.dev.name == "eth0" and ntoa(r.nexthop) == "198.18.0.7"
    assert ntoa(r.src) == "198.18.0.1"
    assert inet.route_get("198.18.0.1").type == RTN_LOCAL
    assert inet.route_get("198.18.0.255").type == RTN_BROADCAST
    assert inet.route_get("203.0.113.1") is None
    assert "198.18.0.0/24 dev eth0 proto kernel scope link src 198.18.0.1" in inet.routes()
    assert "local 198.18.0.1 dev eth0 proto kernel scope host src 198.18.0.1" in inet.routes("local")


def test_longest_prefix_wins_over_overlaps(host):
    inet = host.inet
    inet.add_route("0.0.0.0/0", via="198.18.0.254")
    inet.add_route("198.19.0.0/16", via="198.18.1.2")  # same prefix as eth2's connected route
    inet.add_route("198.19.128.0/17", via="198.18.1.3")
    inet.add_route("198.19.200.0/24", via="198.19.0.9")
    inet.add_route("198.19.200.7/32", via="198.18.0.5")

    def nh(dst):
        r = inet.route_get(dst)
        return r.dev.name, ntoa(r.nexthop)
    assert nh("198.51.100.1") == ("eth0", "198.18.0.254")  # default
    assert nh("198.19.1.1")[0] == "eth2"  # /16 connected (metric 0, added first) beats the /16 via
    assert nh("198.19.130.1") == ("eth1", "198.18.1.3")  # /17
    assert nh("198.19.200.1") == ("eth2", "198.19.0.9")  # /24
    assert nh("198.19.200.7") == ("eth0", "198.18.0.5")  # /32
    assert nh("198.19.127.255")[0] == "eth2"


def test_metric_then_removal(host):
    inet = host.inet
    inet.add_route("198.51.100.0/24", via="198.18.0.2", metric=100)
    inet.add_route("198.51.100.0/24", via="198.18.1.2", metric=10)
    assert ntoa(inet.route_get("198.51.100.1").nexthop) == "198.18.1.2"
    assert inet.del_route("198.51.100.0/24", via="198.18.1.2") == 1
    assert ntoa(inet.route_get("198.51.100.1").nexthop) == "198.18.0.2"  # the cache was cleared
    with pytest.raises(FileExistsError):
        inet.add_route("198.51.100.0/24", via="198.18.0.2", metric=100)


def test_gateway_must_be_on_link(host):
    with pytest.raises(OSError):
        host.inet.add_route("0.0.0.0/0", via="198.51.100.1")
    with pytest.raises(OSError):
        host.inet.add_route("0.0.0.0/0", via="198.18.0.254", dev=host.devs["eth1"])


def test_del_address_removes_its_routes(host):
    inet = host.inet
    inet.del_address(host.devs["eth1"], "198.18.1.1/24")
    assert inet.route_get("198.18.1.9") is None
    assert not inet.is_local(0xC6120101)
