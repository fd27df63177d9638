"""kstack.skbuff: geometry, clone sharing, copy-on-write, pool accounting; kstack.timer."""
from __future__ import annotations

import pytest

from kstack.dropreason import SkbDropReason
from kstack.skbuff import NET_SKB_PAD, SkbPool
from kstack.timer import TimerQueue


def test_reserve_put_push_pull_geometry() -> None:
    pool = SkbPool()
    skb = pool.alloc(100, headroom=64)
    assert skb.headroom() == 64 and skb.len == 0
    skb.put_data(b"payload")
    skb.push_data(b"HDR:")
    assert skb.tobytes() == b"HDR:payload" and skb.headroom() == 60
    skb.reset_network_header()
    skb.pull(4)
    assert skb.tobytes() == b"payload" and skb.network_header == skb.data - 4
    skb.trim(3)
    assert skb.tobytes() == b"pay"
    with pytest.raises(ValueError):
        skb.pull(10)
    with pytest.raises(OverflowError):
        skb.push(1000)
    with pytest.raises(OverflowError):
        skb.put(1 << 20)
    skb.consume()
    assert pool.live == 0 and pool.allocs == 1 and pool.frees == 1


def test_clone_shares_then_copy_on_write() -> None:
    pool = SkbPool()
    skb = pool.from_bytes(b"abcdef")
    c = skb.clone()
    assert c.shared() and skb.shared() and c.buf is skb.buf and pool.clones == 1
    c.push_data(b"X")  # writing into a shared buffer takes a private copy first
    assert c.buf is not skb.buf and not c.shared() and not skb.shared()
    assert skb.tobytes() == b"abcdef" and c.tobytes() == b"Xabcdef"
    assert pool.copies == 1
    c.consume()
    skb.drop(SkbDropReason.NO_SOCKET)
    assert pool.live == 0 and pool.drops == {"NO_SOCKET": 1}


def test_cow_grows_headroom_and_keeps_header_offsets() -> None:
    pool = SkbPool()
    skb = pool.from_bytes(b"0123456789", headroom=2)
    skb.reset_network_header()
    skb.cow(headroom=40)
    assert skb.headroom() >= 40 and skb.tobytes() == b"0123456789"
    assert skb.network_header == skb.data
    skb.consume()


def test_double_free_and_use_after_free_refused() -> None:
    pool = SkbPool()
    skb = pool.alloc(10)
    skb.consume()
    with pytest.raises(RuntimeError):
        skb.consume()
    with pytest.raises(RuntimeError):
        skb.clone()


def test_pool_reuses_buffers_after_last_reference() -> None:
    pool = SkbPool(max_cached=4)
    skb = pool.alloc(100, NET_SKB_PAD)
    c = skb.clone()
    skb.consume()
    assert pool.cache_hits == 0
    c.consume()  # the last reference returns the buffer
    pool.alloc(100).consume()
    assert pool.cache_hits == 1
    big = pool.alloc(10_000)  # larger than the cached size: its own buffer, not cached
    big.consume()
    assert pool.live == 0


def test_timer_queue_order_rearm_delete() -> None:
    q = TimerQueue()
    fired: list[str] = []
    a = q.timer(lambda now: fired.append("a"))
    b = q.timer(lambda now: fired.append("b"))
    c = q.timer(lambda now: fired.append("c"))
    a.mod(300)
    b.mod(100)
    c.mod(200)
    a.mod(50)  # re-armed earlier: the old entry is stale
    c.delete()
    assert q.next_deadline() == 50
    assert q.run(99) == 1 and fired == ["a"]
    assert q.run(1000) == 1 and fired == ["a", "b"]
    assert q.next_deadline() is None and not a.pending
