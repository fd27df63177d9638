# cython: boundscheck=False, wraparound=False, cdivision=True
"""The UDP send fast path, compiled. kstack/txfast.py is the readable twin with the same
steps, conditions and counters (tests/test_kstack_txfast.py holds them equal); read the
why there. Here the header building, the payload copy into the sk_buff and the checksums are
C over the skb's buffer; the objects of the model (sk_buff, counters, driver) are the same.
What does not change between sends (route, hh, device, socket options) is the dst's cached
send state, read from its slots while its generation holds (kstack/dstgen.py)."""
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy
from wire._csum cimport csum_sum16 as _sum16, csum_fold as _fold  # RFC 1071 sums: one home

from kstack.netdevice import NETDEV_TX_BUSY
from kstack.qdisc import DEV_TX_WEIGHT
from nicemu import tracepoint
from kstack.skbuff import CHECKSUM_NONE, CHECKSUM_PARTIAL, MAX_HEADER, SKB_DATA_ALIGN, SkBuff, SkbPool, _SharedInfo
from kstack.skbuff import skb_truesize_for as _py_truesize_for
from kstack._truesize cimport skb_truesize_for
from kstack._slots cimport slot_get, slot_offset, slot_set, slots_new
from cpython.dict cimport PyDict_GetItem, PyDict_SetItem
from cpython.object cimport PyObject
from collections import Counter
from kstack.txfast import UdpDst, dst_tx_fill, sock_wfree
from kstack.dstgen import DST_GENID, DstGenid
from wire.udp import UDP_MAX_PAYLOAD
from kstack.syscall.channel import MAX_MMSG as _CH_MAX_MMSG

cdef int _TX_BUSY = NETDEV_TX_BUSY
cdef int _PARTIAL = CHECKSUM_PARTIAL
cdef Py_ssize_t _MAX_HEADER = MAX_HEADER


def sock_wfree_c(skb):
    """kstack.txfast.sock_wfree compiled (the destructor the compiled udp_send sets): the
    skb's truesize back to the socket, and a writer woken once half of SO_SNDBUF is free."""
    sk = skb.sk
    cdef Py_ssize_t w = <Py_ssize_t>sk.wmem - <Py_ssize_t>skb.truesize
    sk.wmem = w
    if sk.nospace and w << 1 <= <Py_ssize_t>sk.sndbuf:
        sk.nospace = False
        sk.wake()


cdef object _wfree = sock_wfree_c
cdef object _SkbPool = SkbPool
cdef object _SkBuff = SkBuff
cdef object _Shinfo = _SharedInfo
cdef Py_ssize_t _ALIGN = SKB_DATA_ALIGN


cdef object _alloc(object pool, Py_ssize_t size, Py_ssize_t headroom):
    """SkbPool.alloc(size, headroom) (alloc_skb + skb_reserve) with the pool's bookkeeping
    done here for the pool class itself: a cached buffer or a new one, allocs, cache_hits,
    live; any other pool (or a subclass) is asked the usual way."""
    if type(pool) is not _SkbPool:
        return pool.alloc(size, headroom)
    cdef Py_ssize_t need = (size + headroom + _ALIGN - 1) & ~(_ALIGN - 1)
    cdef Py_ssize_t bsize = pool.buffer_size
    cache = pool._cache
    if need <= bsize and cache:
        buf = cache.pop()
        pool.cache_hits += 1
    else:
        buf = bytearray(bsize if need <= bsize else need)
    pool.live += 1
    sh = _sh_tp_new(_Shinfo)  # _SharedInfo(buf)
    sh.buf = buf
    sh.dataref = 1
    skb = _skb_new(pool, sh, len(buf), skb_truesize_for(size + headroom))
    pool.allocs += 1
    skb.data = headroom  # skb_reserve on the empty buffer
    skb.tail = headroom
    return skb


# SkBuff.__init__ + _reset_meta, field by field (no Python frames): the fields must be all of
# SkBuff's, checked when this module loads (a new field fails the import, and the tests)
_SKB_FIELDS = ("pool", "shinfo", "head", "data", "tail", "end", "mac_header", "network_header",
               "transport_header", "protocol", "dev", "tstamp", "priority", "mark", "ip_summed",
               "csum", "csum_start", "csum_offset", "pkt_type", "cb", "sk", "freed", "cloned",
               "destructor", "truesize")
if set(SkBuff.__slots__) != set(_SKB_FIELDS):
    raise ImportError("kstack.skbuff.SkBuff's fields changed: update kstack/_txfast.pyx _skb_new")
cdef object _skb_tp_new = SkBuff.__new__
if set(_SharedInfo.__slots__) != {"buf", "dataref"}:
    raise ImportError("kstack.skbuff._SharedInfo's fields changed: update kstack/_txfast.pyx _alloc")
cdef object _sh_tp_new = _SharedInfo.__new__
assert CHECKSUM_NONE == 0

# the send loop sets an skb's fields straight into its slots (kstack/_slots.pxd): every
# field of SkBuff (the check above), at the offsets its member descriptors give
if SkBuff.__new__ is not object.__new__ or _SharedInfo.__new__ is not object.__new__:
    raise ImportError("SkBuff/_SharedInfo have a __new__ of their own: update kstack/_txfast.pyx")
cdef Py_ssize_t _O_CB = slot_offset(SkBuff, "cb")
cdef Py_ssize_t _O_CLONED = slot_offset(SkBuff, "cloned")
cdef Py_ssize_t _O_CSUM = slot_offset(SkBuff, "csum")
cdef Py_ssize_t _O_CSUM_OFFSET = slot_offset(SkBuff, "csum_offset")
cdef Py_ssize_t _O_CSUM_START = slot_offset(SkBuff, "csum_start")
cdef Py_ssize_t _O_DATA = slot_offset(SkBuff, "data")
cdef Py_ssize_t _O_DESTRUCTOR = slot_offset(SkBuff, "destructor")
cdef Py_ssize_t _O_DEV = slot_offset(SkBuff, "dev")
cdef Py_ssize_t _O_END = slot_offset(SkBuff, "end")
cdef Py_ssize_t _O_FREED = slot_offset(SkBuff, "freed")
cdef Py_ssize_t _O_HEAD = slot_offset(SkBuff, "head")
cdef Py_ssize_t _O_IP_SUMMED = slot_offset(SkBuff, "ip_summed")
cdef Py_ssize_t _O_MAC_HEADER = slot_offset(SkBuff, "mac_header")
cdef Py_ssize_t _O_MARK = slot_offset(SkBuff, "mark")
cdef Py_ssize_t _O_NETWORK_HEADER = slot_offset(SkBuff, "network_header")
cdef Py_ssize_t _O_PKT_TYPE = slot_offset(SkBuff, "pkt_type")
cdef Py_ssize_t _O_POOL = slot_offset(SkBuff, "pool")
cdef Py_ssize_t _O_PRIORITY = slot_offset(SkBuff, "priority")
cdef Py_ssize_t _O_PROTOCOL = slot_offset(SkBuff, "protocol")
cdef Py_ssize_t _O_SHINFO = slot_offset(SkBuff, "shinfo")
cdef Py_ssize_t _O_SK = slot_offset(SkBuff, "sk")
cdef Py_ssize_t _O_TAIL = slot_offset(SkBuff, "tail")
cdef Py_ssize_t _O_TRANSPORT_HEADER = slot_offset(SkBuff, "transport_header")
cdef Py_ssize_t _O_TRUESIZE = slot_offset(SkBuff, "truesize")
cdef Py_ssize_t _O_TSTAMP = slot_offset(SkBuff, "tstamp")
cdef Py_ssize_t _O_SH_BUF = slot_offset(_SharedInfo, "buf")
cdef Py_ssize_t _O_SH_DATAREF = slot_offset(_SharedInfo, "dataref")
cdef object _ONE = 1
cdef object _Counter = Counter

# the socket's cached send state (kstack.txfast.UdpDst, filled by dst_tx_fill) and the
# generation it is valid under (kstack.dstgen), read straight from their slots
cdef object _UdpDst = UdpDst
cdef object _GEN = DST_GENID
cdef object _fill = dst_tx_fill
if type(DST_GENID) is not DstGenid:
    raise ImportError("kstack.dstgen.DST_GENID is not a DstGenid")
cdef Py_ssize_t _O_GEN = slot_offset(DstGenid, "value")
cdef Py_ssize_t _O_D_TX_GEN = slot_offset(UdpDst, "tx_gen")
cdef Py_ssize_t _O_D_NEIGH = slot_offset(UdpDst, "neigh")
cdef Py_ssize_t _O_D_DEV = slot_offset(UdpDst, "dev")
cdef Py_ssize_t _O_D_QDISC = slot_offset(UdpDst, "qdisc")
cdef Py_ssize_t _O_D_POOL = slot_offset(UdpDst, "pool")
cdef Py_ssize_t _O_D_IP = slot_offset(UdpDst, "ip")
cdef Py_ssize_t _O_D_TAPS = slot_offset(UdpDst, "taps")
cdef Py_ssize_t _O_D_HH = slot_offset(UdpDst, "hh")
cdef Py_ssize_t _O_D_MTU = slot_offset(UdpDst, "mtu")
cdef Py_ssize_t _O_D_HW = slot_offset(UdpDst, "hw_csum")
cdef Py_ssize_t _O_D_TOS = slot_offset(UdpDst, "tos")
cdef Py_ssize_t _O_D_PRIO = slot_offset(UdpDst, "priority")
cdef Py_ssize_t _O_D_TTL = slot_offset(UdpDst, "ttl")
cdef Py_ssize_t _O_D_SPORT = slot_offset(UdpDst, "sport")
cdef Py_ssize_t _O_D_DPORT = slot_offset(UdpDst, "dport")
cdef Py_ssize_t _O_D_SNDBUF = slot_offset(UdpDst, "sndbuf")
cdef Py_ssize_t _O_D_SRC = slot_offset(UdpDst, "src")
cdef Py_ssize_t _O_D_DADDR = slot_offset(UdpDst, "daddr")
cdef Py_ssize_t _O_D_IDENTS = slot_offset(UdpDst, "idents")
cdef Py_ssize_t _O_D_IDENT_I = slot_offset(UdpDst, "ident_i")
cdef Py_ssize_t _O_D_STACK = slot_offset(UdpDst, "stack")
cdef Py_ssize_t _O_D_BATCH = slot_offset(UdpDst, "batch")
cdef Py_ssize_t _O_D_SNMP = slot_offset(UdpDst, "snmp")
cdef Py_ssize_t _O_D_NSTATS = slot_offset(UdpDst, "nstats")


cdef int _dst_ready(sk, d) except -1:
    """sk_dst_check + the hh_cache for the compiled send: 1 when d's cached send state is of
    the current generation (one identity compare), else refilled by the twin's dst_tx_fill
    (the one fill for both paths; it runs after a bump only); 0: not for the fast path."""
    if type(d) is not _UdpDst:
        return 0
    if slot_get(d, _O_D_TX_GEN) is slot_get(_GEN, _O_GEN):
        return 1
    if sk.closed or not sk.connected:
        return 0
    return 1 if _fill(sk, d) else 0


cdef inline bint _dst_per_send_ok(d, dev) except -1:
    """What the generation does not cover and is read at each send: no learned path MTU
    (ipv4's pmtu), no packet tap on the device, the pool of the class the loop inlines."""
    if slot_get(d, _O_D_IP).pmtu:
        return False
    taps = slot_get(d, _O_D_TAPS)
    if taps and taps.get(dev.ifindex):
        return False
    return True


cdef inline void _count(object d, object key, Py_ssize_t k) except *:
    """d[key] += k for the stack's counters: a Counter (a missing key is 0, its __missing__)
    or a dict, without a dict subclass's slot dispatch (Python-level d[key] on a Counter goes
    through its type's __getitem__/__setitem__ wrappers); anything else the usual way."""
    cdef PyObject* v
    t = type(d)
    if t is _Counter or t is dict:
        v = PyDict_GetItem(d, key)
        if v is NULL:
            if t is dict:
                raise KeyError(key)
            PyDict_SetItem(d, key, k)
        else:
            PyDict_SetItem(d, key, <object>v + k)
    else:
        d[key] += k
for _n in (0, 1, 60, 126, 154, 155, 200, 1000, 1600, 3000, 8000, 9000, 70000):
    if skb_truesize_for(_n) != _py_truesize_for(_n):
        raise ImportError("kstack.skbuff.skb_truesize_for changed: update kstack/_truesize.pxd")


def skb_alloc(pool, Py_ssize_t size, Py_ssize_t headroom):
    """The send path's SkbPool.alloc (tests hold it equal to the pool's own)."""
    return _alloc(pool, size, headroom)


cdef object _skb_new(object pool, object shinfo, Py_ssize_t end, Py_ssize_t truesize):
    """SkBuff(pool, shinfo, truesize): the same fields with the same initial values."""
    skb = _skb_tp_new(_SkBuff)
    skb.pool = pool
    skb.shinfo = shinfo
    skb.head = 0
    skb.end = end
    skb.truesize = truesize
    skb.data = 0
    skb.tail = 0
    skb.mac_header = -1
    skb.network_header = -1
    skb.transport_header = -1
    skb.protocol = 0
    skb.dev = None
    skb.tstamp = 0
    skb.priority = 0
    skb.mark = 0
    skb.ip_summed = 0  # CHECKSUM_NONE
    skb.csum = 0
    skb.csum_start = 0
    skb.csum_offset = 0
    skb.pkt_type = 0
    skb.cb = {}
    skb.sk = None
    skb.destructor = None
    skb.freed = False
    skb.cloned = False
    return skb


cdef inline void _put16(uint8_t* p, uint32_t v) noexcept nogil:
    p[0] = (v >> 8) & 0xFF
    p[1] = v & 0xFF


cdef inline void _put32(uint8_t* p, uint32_t v) noexcept nogil:
    p[0] = (v >> 24) & 0xFF
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF


cdef Py_ssize_t _UDP_MAX = UDP_MAX_PAYLOAD
cdef Py_ssize_t _DEV_TX_WEIGHT = DEV_TX_WEIGHT


cdef void _qdisc_xmit(qd, skb) except *:
    """__dev_xmit_skb without the bypass (the driver's queue is stopped, or frames wait in the
    qdisc): enqueue (a drop is counted and freed), then __qdisc_run, as dev_queue_xmit does;
    pfifo_fast's compiled ones (kstack/_qdisc.pyx) unless tracepoints want the twins."""
    c = qd.c_ops
    if c is not None and not tracepoint.enabled:
        if c.enqueue(qd, skb):
            c.run(qd, _DEV_TX_WEIGHT)
    elif qd.enqueue(skb):
        qd.run()


def sendmsg_connected(sk, data):
    """UdpSock.sendmsg for its common case, compiled: a connected socket, no address given,
    no pending error, its cached dst and send state of the current generation (else refilled
    by dst_tx_fill: open, connected, the FIB's genid, the neighbour alive and usable, the
    device up), the payload within UDP's limit, room in SO_SNDBUF, and udp_send taking it.
    Returns the bytes sent, or -1 with nothing changed: UdpSock.sendmsg then runs its own
    checks in their order (and raises what they raise)."""
    if sk.err or sk._tx_fast is not _udp_send_fn:
        return -1
    d = sk._dst  # None for a closed or unconnected socket
    if d is None or not _dst_ready(sk, d):
        return -1
    cdef Py_ssize_t n = len(data)
    if n > _UDP_MAX or <Py_ssize_t>sk.wmem >= <Py_ssize_t>slot_get(d, _O_D_SNDBUF):
        return -1
    nb = slot_get(d, _O_D_NEIGH)
    cdef const uint8_t[::1] dv
    cdef const uint8_t* src_p
    if type(slot_get(d, _O_D_POOL)) is _SkbPool:  # sendmmsg's loop for one datagram: each field set once
        if type(data) is bytes:
            src_p = <const uint8_t*>PyBytes_AS_STRING(data)
        else:
            dv = data
            src_p = &dv[0] if n else NULL
        return n if _send_run(sk, src_p, 1, 0, 0, n, d, nb) == 1 else -1
    if _udp_send(sk, d, data, <int>slot_get(d, _O_D_DPORT)):
        return n
    return -1


def udp_send(sk, d, data, int dport):
    """See kstack.txfast.udp_send."""
    return _udp_send(sk, d, data, dport)


cdef object _udp_send_fn = udp_send  # sendmsg_connected serves sockets whose fast path is this


cdef bint _udp_send(sk, d, data, int dport) except -1:
    cdef const uint8_t[::1] dv
    cdef const uint8_t* src_p
    cdef Py_ssize_t nlen
    if type(data) is bytes:
        src_p = <const uint8_t*>PyBytes_AS_STRING(data)
        nlen = PyBytes_GET_SIZE(data)
    else:
        dv = data
        nlen = dv.shape[0]
        src_p = &dv[0] if nlen else NULL
    return _udp_send_p(sk, d, src_p, nlen, dport)


cdef Py_ssize_t _MAX_MMSG = 1024  # kstack.syscall.channel.MAX_MMSG (checked at import below)


def mmsg_check(const uint8_t[::1] p, Py_ssize_t count):
    """kstack.syscall.channel.unpack_mmsg's checks, compiled: `count` (1..MAX_MMSG) entries of
    a u16 little-endian length and the bytes, covering the payload exactly; else ValueError."""
    cdef Py_ssize_t n = p.shape[0], off = 0, i, ln
    if count < 1 or count > _MAX_MMSG:
        raise ValueError("sendmmsg count out of range")
    for i in range(count):
        if off + 2 > n:
            raise ValueError("sendmmsg entry header past the payload")
        ln = p[off] | (<Py_ssize_t>p[off + 1] << 8)
        off += 2
        if off + ln > n:
            raise ValueError("sendmmsg entry past the payload")
        off += ln
    if off != n:
        raise ValueError("sendmmsg payload longer than its entries")


def mmsg_entry(payload, Py_ssize_t count, Py_ssize_t k):
    """Datagram k of a checked SENDMMSG payload (mmsg_check first), as a memoryview slice;
    kstack.syscall.channel.mmsg_entry is the twin."""
    cdef const uint8_t[::1] p = payload
    mmsg_check(p, count)
    if not 0 <= k < count:
        raise IndexError("sendmmsg entry out of range")
    cdef Py_ssize_t off = 0, i, ln
    for i in range(k):
        off += 2 + (p[off] | (<Py_ssize_t>p[off + 1] << 8))
    ln = p[off] | (<Py_ssize_t>p[off + 1] << 8)
    return memoryview(payload)[off + 2:off + 2 + ln]


def sendmmsg_connected(sk, payload, Py_ssize_t count, Py_ssize_t start=0):
    """sendmmsg(2)'s loop over a checked SENDMMSG payload (mmsg_check first: nothing is sent
    from a malformed one) for a connected socket, each datagram as sendmsg_connected and
    udp_send send one, without an object per datagram: the copy_from_user goes from the record
    straight into the sk_buff. Starts at datagram `start` (the ones before it were sent by an
    earlier call); returns the index of the first not sent (count: all); the caller sends that
    one the usual way (it failed a fast-path condition: the layered path decides, raises or
    parks). kstack.txfast.sendmmsg_connected is the twin.

    What cannot change while the batch runs (the route, the neighbour, the device's address,
    flags, MTU and features, the socket's options: no timer, softirq or call runs in between)
    is looked up once per batch, with one clock read; what can (SO_SNDBUF room, the driver's
    queue, the qdisc) is checked before every datagram; the counters are added once at the end
    (in a finally: a batch that stops on an exception counts what it sent)."""
    cdef const uint8_t[::1] p = payload
    mmsg_check(p, count)
    cdef Py_ssize_t off = 0, i = 0
    if start < 0:
        raise ValueError("negative start")
    while i < start and i < count:
        off += 2 + (p[off] | (<Py_ssize_t>p[off + 1] << 8))
        i += 1
    if i >= count:
        return count
    return _send_run(sk, &p[0], count, off, i, -1)


cdef Py_ssize_t _send_run(sk, const uint8_t* p, Py_ssize_t count, Py_ssize_t off, Py_ssize_t i,
                          Py_ssize_t raw_len, object d=None, object n=None) except -1:
    """The loop of sendmmsg_connected from datagram i at offset off of the entries at p; with
    raw_len >= 0, one datagram of raw_len bytes at p instead (sendmsg_connected: count 1).
    `d` and `n` given: the caller has just checked the socket, its dst and the neighbour
    (sendmsg_connected), they are not looked at again. Returns the index of the first
    datagram not sent."""
    cdef Py_ssize_t ln
    if d is None:
        if sk.err:
            return i
        d = sk._dst  # None for a closed or unconnected socket
        if d is None or not _dst_ready(sk, d):
            return i
        n = slot_get(d, _O_D_NEIGH)
    # everything below but the pool's cache, the batch and the clock is the dst's cached
    # send state (dst_tx_fill): read from its slots, not looked up again
    dev = slot_get(d, _O_D_DEV)
    qd = slot_get(d, _O_D_QDISC)
    pool = slot_get(d, _O_D_POOL)
    if type(pool) is not _SkbPool or not _dst_per_send_ok(d, dev):
        return i
    hh = slot_get(d, _O_D_HH)
    if type(hh) is not bytes or PyBytes_GET_SIZE(hh) != 14:
        raise TypeError("the cached hardware header is 14 bytes")
    cdef Py_ssize_t mtu = slot_get(d, _O_D_MTU)
    cdef Py_ssize_t sndbuf = slot_get(d, _O_D_SNDBUF)
    cdef bint hw = slot_get(d, _O_D_HW) is True
    cdef int tos = slot_get(d, _O_D_TOS)
    stack = slot_get(d, _O_D_STACK)
    ttl = slot_get(d, _O_D_TTL) or stack.sysctl.ip_default_ttl
    cdef uint8_t ttl8 = <uint8_t>(<int>ttl)
    cdef uint32_t src = slot_get(d, _O_D_SRC)
    cdef uint32_t dst = slot_get(d, _O_D_DADDR)
    cdef uint32_t sport = <uint32_t>(<int>slot_get(d, _O_D_SPORT))
    cdef uint32_t dport = <uint32_t>(<int>slot_get(d, _O_D_DPORT))
    prio = slot_get(d, _O_D_PRIO)
    idents = slot_get(d, _O_D_IDENTS)
    ident_i = slot_get(d, _O_D_IDENT_I)
    cache = pool._cache
    cdef Py_ssize_t bsize = pool.buffer_size
    batch = slot_get(d, _O_D_BATCH).xmit_batch_devs
    cdef bint more = batch is not None
    ops = getattr(dev, "tx_c", None)
    now = stack.clock()
    cdef const uint8_t* hhp = <const uint8_t*>PyBytes_AS_STRING(hh)
    cdef Py_ssize_t sent = 0, hits = 0, allocs = 0, copied = 0, qpk = 0, qbytes = 0, byp = 0
    cdef Py_ssize_t ulen, tot, need, o = _MAX_HEADER, mh = _MAX_HEADER - 34, w, ts
    cdef uint32_t ident, c
    cdef uint64_t psum
    cdef uint8_t* b
    cdef uint8_t* ip
    cdef uint8_t* uh
    cdef bint queued = False
    try:
        while i < count:
            if raw_len >= 0:
                ln = raw_len
                off = -2  # the datagram's bytes at p + off + 2 = p
            else:
                ln = p[off] | (<Py_ssize_t>p[off + 1] << 8)
            ulen = 8 + ln
            tot = ulen + 20
            if ln > _UDP_MAX or tot > mtu:
                break
            w = sk.wmem
            if w >= sndbuf:
                break
            # sock_alloc_send_skb: SkbPool.alloc for the pool class (see _alloc), the
            # counters kept here until the end of the batch
            need = (ulen + _MAX_HEADER + _ALIGN - 1) & ~(_ALIGN - 1)
            if need <= bsize and cache:
                buf = cache.pop()
                hits += 1
            else:
                buf = bytearray(bsize if need <= bsize else need)
            allocs += 1
            sh = slots_new(_Shinfo)
            slot_set(sh, _O_SH_BUF, buf)
            slot_set(sh, _O_SH_DATAREF, _ONE)
            ts = skb_truesize_for(ulen + _MAX_HEADER)
            sk.wmem = w + ts
            b = <uint8_t*>PyByteArray_AS_STRING(buf)
            if ln:
                memcpy(b + o + 8, &p[off + 2], ln)
            copied += ln
            ident = (<uint32_t>idents[ident_i] + 1) & 0xFFFF
            idents[ident_i] = ident
            psum = (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF) + 17 + ulen
            ip = b + o - 20
            ip[0] = 0x45
            ip[1] = tos
            _put16(ip + 2, <uint32_t>tot)
            _put16(ip + 4, ident)
            _put16(ip + 6, 0x4000)
            ip[8] = ttl8
            ip[9] = 17
            ip[10] = 0
            ip[11] = 0
            _put32(ip + 12, src)
            _put32(ip + 16, dst)
            _put16(ip + 10, ~_fold(_sum16(ip, 20)) & 0xFFFF)
            uh = b + o
            _put16(uh, sport)
            _put16(uh + 2, dport)
            _put16(uh + 4, <uint32_t>ulen)
            if hw:
                c = _fold(psum)
            else:
                uh[6] = 0
                uh[7] = 0
                c = ~_fold(_sum16(uh, ulen) + psum) & 0xFFFF
                if c == 0:
                    c = 0xFFFF
            _put16(uh + 6, c)
            memcpy(b + mh, hhp, 14)  # neigh_hh_output: the cached header
            # SkBuff(pool, shinfo) with its final fields, each set once (see _skb_new)
            skb = slots_new(_SkBuff)
            slot_set(skb, _O_POOL, pool)
            slot_set(skb, _O_SHINFO, sh)
            slot_set(skb, _O_HEAD, 0)
            slot_set(skb, _O_END, PyByteArray_GET_SIZE(buf))
            slot_set(skb, _O_TRUESIZE, ts)
            slot_set(skb, _O_DATA, mh)
            slot_set(skb, _O_TAIL, o + ulen)
            slot_set(skb, _O_MAC_HEADER, mh)
            slot_set(skb, _O_NETWORK_HEADER, o - 20)
            slot_set(skb, _O_TRANSPORT_HEADER, o)
            slot_set(skb, _O_PROTOCOL, 0x0800)
            slot_set(skb, _O_DEV, dev)
            slot_set(skb, _O_TSTAMP, now)
            slot_set(skb, _O_PRIORITY, prio)
            slot_set(skb, _O_MARK, 0)
            if hw:
                slot_set(skb, _O_IP_SUMMED, _PARTIAL)
                slot_set(skb, _O_CSUM_START, o)
                slot_set(skb, _O_CSUM_OFFSET, 6)
            else:
                slot_set(skb, _O_IP_SUMMED, 0)
                slot_set(skb, _O_CSUM_START, 0)
                slot_set(skb, _O_CSUM_OFFSET, 0)
            slot_set(skb, _O_CSUM, 0)
            slot_set(skb, _O_PKT_TYPE, 4)  # PACKET_OUTGOING
            slot_set(skb, _O_CB, {})
            slot_set(skb, _O_SK, sk)
            slot_set(skb, _O_DESTRUCTOR, _wfree)
            slot_set(skb, _O_FREED, False)
            slot_set(skb, _O_CLONED, False)
            sent += 1
            off += 2 + ln
            i += 1
            if dev.queue_stopped or qd._qlen or qd._requeued is not None:
                _qdisc_xmit(qd, skb)  # behind the frames queued before it
                continue
            byp += 1
            if ops is not None:
                r = ops.xmit(dev, skb, more)
            else:
                r = dev.ndo_start_xmit(skb, more)
            if r == _TX_BUSY:
                qd._requeue(skb)
                break
            qpk += 1
            qbytes += tot + 14
            if more and not queued:
                queued = True
                if dev not in batch:
                    batch.append(dev)
    finally:
        if allocs:
            pool.allocs += allocs
            pool.live += allocs
            pool.cache_hits += hits
            pool.bytes_copied += copied
        if sent:
            snmp = slot_get(d, _O_D_SNMP)
            _count(snmp, "UdpOutDatagrams", sent)
            _count(snmp, "IpOutRequests", sent)
            ns = slot_get(d, _O_D_NSTATS)
            _count(ns, "lookups", sent)
            _count(ns, "hits", sent)
            n.used = now
            qd.runs += byp
        if qpk:
            qd.packets += qpk
            qd.bytes += qbytes
    return i


cdef bint _udp_send_p(sk, d, const uint8_t* src_p, Py_ssize_t nlen, int dport) except -1:
    if not _dst_ready(sk, d):
        return False  # sk_dst_check / hh: something changed and the fill refused
    n = slot_get(d, _O_D_NEIGH)
    dev = slot_get(d, _O_D_DEV)
    qd = slot_get(d, _O_D_QDISC)
    cdef Py_ssize_t ulen = 8 + nlen
    cdef Py_ssize_t tot = ulen + 20
    if tot > <Py_ssize_t>slot_get(d, _O_D_MTU) or not _dst_per_send_ok(d, dev):
        return False
    hh = slot_get(d, _O_D_HH)
    if type(hh) is not bytes or PyBytes_GET_SIZE(hh) != 14:
        raise TypeError("the cached hardware header is 14 bytes")
    stack = slot_get(d, _O_D_STACK)
    now = stack.clock()
    pool = slot_get(d, _O_D_POOL)
    skb = _alloc(pool, ulen, _MAX_HEADER)
    buf = skb.shinfo.buf
    if type(buf) is not bytearray:
        raise TypeError("sk_buff buffers are bytearrays")
    sk.wmem += <Py_ssize_t>skb.truesize
    skb.sk = sk
    skb.destructor = _wfree
    cdef uint8_t* b = <uint8_t*>PyByteArray_AS_STRING(buf)
    cdef Py_ssize_t o = _MAX_HEADER
    if nlen:
        memcpy(b + o + 8, src_p, nlen)
    pool.bytes_copied += nlen
    cdef uint32_t src = slot_get(d, _O_D_SRC)
    cdef uint32_t dst = slot_get(d, _O_D_DADDR)
    idents = slot_get(d, _O_D_IDENTS)
    i = slot_get(d, _O_D_IDENT_I)
    cdef uint32_t ident = (<uint32_t>idents[i] + 1) & 0xFFFF
    idents[i] = ident
    cdef int tos = slot_get(d, _O_D_TOS)
    ttl = slot_get(d, _O_D_TTL) or stack.sysctl.ip_default_ttl
    cdef uint64_t psum = (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF) + 17 + ulen
    cdef uint8_t* ip = b + o - 20
    ip[0] = 0x45
    ip[1] = tos
    _put16(ip + 2, <uint32_t>tot)
    _put16(ip + 4, ident)
    _put16(ip + 6, 0x4000)
    ip[8] = <uint8_t>(<int>ttl)
    ip[9] = 17
    ip[10] = 0
    ip[11] = 0
    _put32(ip + 12, src)
    _put32(ip + 16, dst)
    _put16(ip + 10, ~_fold(_sum16(ip, 20)) & 0xFFFF)
    cdef uint8_t* uh = b + o
    _put16(uh, <uint32_t>(<int>slot_get(d, _O_D_SPORT)))
    _put16(uh + 2, <uint32_t>dport)
    _put16(uh + 4, <uint32_t>ulen)
    cdef uint32_t c
    if slot_get(d, _O_D_HW) is True:
        c = _fold(psum)
        skb.ip_summed = _PARTIAL
        skb.csum_start = o
        skb.csum_offset = 6
    else:
        uh[6] = 0
        uh[7] = 0
        c = ~_fold(_sum16(uh, ulen) + psum) & 0xFFFF
        if c == 0:
            c = 0xFFFF
    _put16(uh + 6, c)
    cdef Py_ssize_t mh = o - 34
    memcpy(b + mh, PyBytes_AS_STRING(hh), 14)  # neigh_hh_output: the cached header
    skb.data = mh
    skb.tail = o + ulen
    skb.transport_header = o
    skb.network_header = o - 20
    skb.mac_header = mh
    skb.protocol = 0x0800
    skb.priority = slot_get(d, _O_D_PRIO)
    skb.dev = dev
    skb.tstamp = now
    skb.pkt_type = 4  # PACKET_OUTGOING
    snmp = slot_get(d, _O_D_SNMP)
    snmp["UdpOutDatagrams"] += 1
    snmp["IpOutRequests"] += 1
    ns = slot_get(d, _O_D_NSTATS)
    ns["lookups"] += 1
    ns["hits"] += 1
    n.used = now
    if dev.queue_stopped or qd._qlen or qd._requeued is not None:
        _qdisc_xmit(qd, skb)  # behind the frames queued before it
        return True
    qd.runs += 1
    batch = slot_get(d, _O_D_BATCH).xmit_batch_devs
    more = batch is not None
    # a driver's optional compiled transmit (E1000.tx_c: xmit(dev, skb, xmit_more), what its
    # ndo_start_xmit calls) without the method's Python frame; any other device as usual
    ops = getattr(dev, "tx_c", None)
    if ops is not None:
        r = ops.xmit(dev, skb, more)
    else:
        r = dev.ndo_start_xmit(skb, more)
    if r == _TX_BUSY:
        qd._requeue(skb)
        return True
    qd.packets += 1
    qd.bytes += tot + 14
    if more and dev not in batch:
        batch.append(dev)
    return True


if _CH_MAX_MMSG != _MAX_MMSG:
    raise ImportError("kstack.syscall.channel.MAX_MMSG changed: update kstack/_txfast.pyx")
