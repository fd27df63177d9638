"""The socket buffer (Linux's struct sk_buff, net/core/skbuff.c), modeled.

One packet's bytes live in a buffer from `head` to `end`; the packet itself is `data..tail`.
Layers move `data` instead of copying: a driver reserves headroom (skb_reserve) so that the
stack can push (skb_push) its headers in front of the payload on the way out, and pulls
(skb_pull) each header off on the way in, after setting the header offsets (mac_header,
network_header, transport_header) so that later layers find them.

    head      data                tail       end
    |headroom | packet (len bytes) | tailroom |

The buffer (with its reference count `dataref`, Linux's skb_shared_info) can be shared by
clones: skb_clone makes a second sk_buff over the same bytes, as a tap (tcpdump) gets one.
Whoever wants to change shared bytes first takes a private copy (skb_cow / skb_unshare).
Buffers come from an SkbPool that counts allocations, frees, clones and copies, and takes
freed buffers back for reuse; every drop is freed with a reason (kfree_skb_reason).

What an skb costs is `truesize`, the unit socket buffers (SO_SNDBUF, SO_RCVBUF), the
neighbour queue and IP reassembly count in. It is set once, where the head is allocated, as
Linux's __alloc_skb sets it: the head asked for (SKB_DATA_ALIGN'ed) plus skb_shared_info,
rounded up to its kmalloc bucket, plus the struct sk_buff (skb_truesize_for). The pool hands
out larger cached buffers (a slab stand-in); the charge follows the request, not the cache.
"""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from kstack.dropreason import SkbDropReason

if TYPE_CHECKING:
    from kstack.netdevice import NetDevice

__all__ = [
    "SkBuff", "SkbPool", "CHECKSUM_NONE", "CHECKSUM_UNNECESSARY", "CHECKSUM_COMPLETE",
    "CHECKSUM_PARTIAL", "NET_SKB_PAD", "NET_IP_ALIGN", "MAX_HEADER", "SKB_DATA_ALIGN",
    "SKB_STRUCT_SIZE", "SKB_SHINFO_SIZE", "kmalloc_size_roundup", "skb_truesize_for",
    "default_pool",
]

# skb->ip_summed (include/linux/skbuff.h)
CHECKSUM_NONE = 0  # RX: the stack must verify; TX: the stack computed it
CHECKSUM_UNNECESSARY = 1  # RX: the device verified the L4 checksum and found it good
CHECKSUM_COMPLETE = 2  # RX: `csum` holds the sum of the packet (not produced by the e1000)
CHECKSUM_PARTIAL = 3  # TX: the device inserts the checksum at csum_start + csum_offset

NET_SKB_PAD = 64  # headroom a driver reserves on receive (max(32, L1_CACHE_BYTES))
NET_IP_ALIGN = 2  # so the IP header after the 14-byte Ethernet header is 4-byte aligned
MAX_HEADER = 128  # headroom the stack reserves on transmit for link + network + transport
SKB_DATA_ALIGN = 64
SKB_STRUCT_SIZE = 256  # SKB_DATA_ALIGN(sizeof(struct sk_buff)): 232 on x86-64
SKB_SHINFO_SIZE = 320  # SKB_DATA_ALIGN(sizeof(struct skb_shared_info)): 320 on x86-64
PAGE_SIZE = 4096
KMALLOC_MAX_CACHE_SIZE = 2 * PAGE_SIZE  # larger kmallocs come from the page allocator


def _align(n: int) -> int:
    return (n + SKB_DATA_ALIGN - 1) & ~(SKB_DATA_ALIGN - 1)


def kmalloc_size_roundup(n: int) -> int:
    """The size kmalloc really gives for n bytes: its slab bucket (8, 16, 32, 64, 96, 128,
    192, then powers of two up to 8 KiB), beyond that whole pages (mm/slab_common.c)."""
    if n > KMALLOC_MAX_CACHE_SIZE:
        return (n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    if n <= 8:
        return 8
    if 64 < n <= 96:
        return 96
    if 128 < n <= 192:
        return 192
    return 1 << (n - 1).bit_length()


def skb_truesize_for(size: int) -> int:
    """skb->truesize of an skb whose head holds `size` bytes (alloc_skb's size plus the
    reserved headroom): __alloc_skb's SKB_HEAD_ALIGN(size) rounded to the kmalloc bucket,
    then SKB_TRUESIZE (the shared info is inside the bucket, the struct sk_buff beside it).
    A 64-byte UDP frame: 128 + 154 bytes -> 192 + 320 = 512 -> 768, as Linux charges."""
    return kmalloc_size_roundup(_align(size) + SKB_SHINFO_SIZE) + SKB_STRUCT_SIZE


class _SharedInfo:
    """skb_shared_info: the buffer and how many sk_buffs point at it."""

    __slots__ = ("buf", "dataref")

    def __init__(self, buf: bytearray) -> None:
        self.buf = buf
        self.dataref = 1


class SkBuff:
    """One packet. Offsets are indexes into `shinfo.buf`; header offsets are -1 until set."""

    __slots__ = (
        "pool", "shinfo", "head", "data", "tail", "end", "mac_header", "network_header",
        "transport_header", "protocol", "dev", "tstamp", "priority", "mark", "ip_summed", "csum",
        "csum_start", "csum_offset", "pkt_type", "cb", "sk", "freed", "cloned", "destructor",
        "truesize",
    )

    def __init__(self, pool: "SkbPool", shinfo: _SharedInfo, truesize: int | None = None) -> None:
        self.pool = pool
        self.shinfo = shinfo
        self.head = 0
        self.end = len(shinfo.buf)
        # skb->truesize: what this skb is charged (see the module docstring); a head made
        # around a whole buffer is charged the whole buffer
        self.truesize = skb_truesize_for(self.end) if truesize is None else truesize
        self._reset_meta()

    def _reset_meta(self) -> None:
        self.data = self.tail = 0
        self.mac_header = self.network_header = self.transport_header = -1
        self.protocol = 0  # EtherType, network byte order in Linux; an int here
        self.dev: NetDevice | None = None
        self.tstamp = 0  # ns, set when the packet enters the stack or is sent
        self.priority = 0  # qdisc band selection (pfifo_fast priomap)
        self.mark = 0
        self.ip_summed = CHECKSUM_NONE
        self.csum = 0
        self.csum_start = self.csum_offset = 0
        self.pkt_type = 0  # PACKET_HOST etc. (kstack.stack)
        self.cb: dict[str, Any] = {}  # skb->cb: per-layer scratch (e.g. IP fragment info)
        self.sk: Any = None  # owning socket on transmit
        self.destructor: Any = None  # skb->destructor: called once when freed (sock_wfree)
        self.freed = False
        self.cloned = False

    # --- geometry --------------------------------------------------------------------------

    @property
    def buf(self) -> bytearray:
        return self.shinfo.buf

    @property
    def len(self) -> int:
        return self.tail - self.data

    def __len__(self) -> int:
        return self.tail - self.data

    def headroom(self) -> int:
        return self.data - self.head

    def tailroom(self) -> int:
        return self.end - self.tail

    def reserve(self, n: int) -> None:
        """skb_reserve: make headroom in an empty buffer."""
        if self.tail != self.data or n < 0 or self.data + n > self.end:
            raise ValueError("skb_reserve: only on an empty buffer, within its size")
        self.data += n
        self.tail += n

    def put(self, n: int) -> int:
        """skb_put: extend the packet by n bytes at the tail; returns their offset in buf."""
        if n < 0 or self.tail + n > self.end:
            raise OverflowError(f"skb_over_panic: put {n} with {self.tailroom()} bytes of tailroom")
        self._writable()
        off = self.tail
        self.tail += n
        return off

    def put_data(self, data: bytes | bytearray | memoryview) -> int:
        """skb_put_data: append bytes (a copy, counted). Returns their offset."""
        off = self.put(len(data))
        self.shinfo.buf[off:off + len(data)] = data
        self.pool.bytes_copied += len(data)
        return off

    def push(self, n: int) -> int:
        """skb_push: prepend n bytes of header room to the packet; returns the new data offset."""
        if n < 0 or self.data - n < self.head:
            raise OverflowError(f"skb_under_panic: push {n} with {self.headroom()} bytes of headroom")
        self._writable()
        self.data -= n
        return self.data

    def push_data(self, header: bytes | bytearray) -> int:
        off = self.push(len(header))
        self.shinfo.buf[off:off + len(header)] = header
        return off

    def pull(self, n: int) -> int:
        """skb_pull: remove n bytes from the front (a header that was processed). Returns
        the new data offset. Pulling past the tail is refused (pskb_may_pull fails)."""
        if n < 0 or n > self.tail - self.data:
            raise ValueError(f"skb_pull of {n} bytes from a packet of {self.len}")
        self.data += n
        return self.data

    def trim(self, length: int) -> None:
        """skb_trim / pskb_trim: cut the packet to `length` bytes (Ethernet padding, a
        datagram shorter than its frame)."""
        if 0 <= length < self.len:
            self.tail = self.data + length

    def may_pull(self, n: int) -> bool:
        """pskb_may_pull: at least n bytes of packet are there."""
        return self.tail - self.data >= n

    # --- access ----------------------------------------------------------------------------

    def view(self, start: int = 0, length: int | None = None) -> memoryview:
        """The packet bytes (a view, no copy) from data+start."""
        a = self.data + start
        b = self.tail if length is None else min(self.tail, a + length)
        return memoryview(self.shinfo.buf)[a:b]

    def tobytes(self) -> bytes:
        """A copy of the packet bytes (data..tail)."""
        return bytes(self.shinfo.buf[self.data:self.tail])

    def header_view(self, offset: int, length: int) -> memoryview:
        """Bytes at an absolute header offset (mac_header etc.)."""
        return memoryview(self.shinfo.buf)[offset:offset + length]

    def reset_mac_header(self) -> None:
        self.mac_header = self.data

    def reset_network_header(self) -> None:
        self.network_header = self.data

    def reset_transport_header(self) -> None:
        self.transport_header = self.data

    # --- sharing ---------------------------------------------------------------------------

    def shared(self) -> bool:
        """skb_cloned: another sk_buff points at the same bytes."""
        return self.shinfo.dataref > 1

    def clone(self) -> "SkBuff":
        """skb_clone: a second sk_buff over the same bytes (no copy), metadata copied."""
        self._alive()
        c = self.pool._new_skb(self.shinfo)
        for name in _META:
            setattr(c, name, getattr(self, name))
        c.cb = dict(self.cb)
        c.sk = None
        self.shinfo.dataref += 1
        self.cloned = c.cloned = True
        self.pool.clones += 1
        return c

    def copy(self) -> "SkBuff":
        """skb_copy: a private sk_buff with its own copy of the whole buffer."""
        self._alive()
        c = self.pool._new_skb(_SharedInfo(bytearray(self.shinfo.buf)))
        for name in _META:
            setattr(c, name, getattr(self, name))
        c.cb = dict(self.cb)
        self.pool.allocs += 1
        self.pool.copies += 1
        self.pool.bytes_copied += self.len
        return c

    def cow(self, headroom: int = 0) -> None:
        """skb_cow: make the bytes private (copy when shared) with at least `headroom`
        bytes in front, before a layer writes into them."""
        self._alive()
        if not self.shared() and self.headroom() >= headroom:
            return
        extra = max(0, headroom - self.headroom())
        old = self.shinfo
        buf = bytearray(extra) + old.buf if extra else bytearray(old.buf)
        shift = extra
        old.dataref -= 1
        self.shinfo = _SharedInfo(buf)
        self.end = len(buf)
        if extra and self.sk is None:  # pskb_expand_head: truesize grows by what was added,
            self.truesize += extra  # unless a socket is charged for it (it keeps its charge)
        self.data += shift
        self.tail += shift
        for name in ("mac_header", "network_header", "transport_header"):
            v = getattr(self, name)
            if v >= 0:
                setattr(self, name, v + shift)
        if self.csum_start:
            self.csum_start += shift
        self.cloned = False
        self.pool.copies += 1
        self.pool.bytes_copied += self.len

    def _writable(self) -> None:
        self._alive()
        if self.shinfo.dataref > 1:
            self.cow()

    def _alive(self) -> None:
        if self.freed:
            raise RuntimeError("use of an sk_buff after it was freed")

    # --- freeing ---------------------------------------------------------------------------

    def consume(self) -> None:
        """consume_skb: the packet was used (delivered, sent); not a drop."""
        self.pool._free(self, None)

    def drop(self, reason: SkbDropReason) -> None:
        """kfree_skb_reason: the packet was dropped for `reason` (counted)."""
        self.pool._free(self, reason)

    def __repr__(self) -> str:
        return (f"<SkBuff len={self.len} headroom={self.headroom()} proto=0x{self.protocol:04x}"
                f"{' cloned' if self.cloned else ''}{' freed' if self.freed else ''}>")


_META = ("head", "data", "tail", "end", "mac_header", "network_header", "transport_header",
         "protocol", "dev", "tstamp", "priority", "mark", "ip_summed", "csum", "csum_start",
         "csum_offset", "pkt_type", "truesize")


class SkbPool:
    """Where sk_buffs come from and go back to (the slab caches skbuff_head_cache and the
    kmalloc'ed data). Counts allocations, frees, clones, copies and drops by reason.

    Buffers of `buffer_size` bytes are cached up to `max_cached` after a free; larger
    requests get a buffer of their own. A buffer goes back to the cache when its last
    sk_buff is freed."""

    def __init__(self, buffer_size: int = 2048 + NET_SKB_PAD, max_cached: int = 1024) -> None:
        self.buffer_size = _align(buffer_size)
        self.max_cached = max_cached
        self._cache: list[bytearray] = []
        self.allocs = 0  # sk_buffs with a new buffer (alloc_skb, skb_copy)
        self.frees = 0  # sk_buffs freed (consumed or dropped)
        self.clones = 0
        self.copies = 0  # copy-on-write and skb_copy
        self.bytes_copied = 0  # bytes copied into or between sk_buffs
        self.cache_hits = 0
        self.drops: Counter[str] = Counter()  # drop reason name -> count
        self.live = 0  # sk_buffs allocated and not yet freed

    def alloc(self, size: int, headroom: int = 0) -> SkBuff:
        """alloc_skb(size) + skb_reserve(headroom): room for `size` bytes after `headroom`."""
        if size < 0 or headroom < 0:
            raise ValueError("alloc_skb: negative size")
        need = _align(size + headroom)
        if need <= self.buffer_size and self._cache:
            buf = self._cache.pop()
            self.cache_hits += 1
        else:
            buf = bytearray(self.buffer_size if need <= self.buffer_size else need)
        skb = self._new_skb(_SharedInfo(buf), skb_truesize_for(size + headroom))
        self.allocs += 1
        if headroom:
            skb.reserve(headroom)
        return skb

    def from_bytes(self, data: bytes | bytearray | memoryview, headroom: int = NET_SKB_PAD) -> SkBuff:
        """An sk_buff holding a copy of `data` (a received frame, a datagram from a user)."""
        skb = self.alloc(len(data), headroom)
        skb.put_data(data)
        return skb

    def _new_skb(self, shinfo: _SharedInfo, truesize: int | None = None) -> SkBuff:
        self.live += 1
        return SkBuff(self, shinfo, truesize)

    def _free(self, skb: SkBuff, reason: SkbDropReason | None) -> None:
        if skb.freed:
            raise RuntimeError("double free of an sk_buff")
        skb.freed = True
        d = skb.destructor
        if d is not None:  # skb->destructor (sock_wfree gives the socket its wmem back)
            skb.destructor = None
            d(skb)
        self.frees += 1
        self.live -= 1
        if reason is not None:
            self.drops[reason.name] += 1
        sh = skb.shinfo
        sh.dataref -= 1
        if sh.dataref == 0 and len(sh.buf) == self.buffer_size and len(self._cache) < self.max_cached:
            self._cache.append(sh.buf)

    def stats(self) -> dict[str, int]:
        return {"skb_allocs": self.allocs, "skb_frees": self.frees, "skb_clones": self.clones,
                "skb_copies": self.copies, "skb_bytes_copied": self.bytes_copied,
                "skb_cache_hits": self.cache_hits, "skb_live": self.live,
                "skb_drops": sum(self.drops.values())}


_default_pool: SkbPool | None = None


def default_pool() -> SkbPool:
    """The process's pool (one kernel per process)."""
    global _default_pool
    if _default_pool is None:
        _default_pool = SkbPool()
    return _default_pool
