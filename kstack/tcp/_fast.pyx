# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The TCP engine's per-segment common path in C: TcpConnection._rcv_predicted (with
_new_ack's OPEN case it calls), _output_predicted (with _select_window and the pure ACK of
_segment) and _xmit_full_segments, step for step (their docstrings say what and why). Sequence numbers are uint32_t, so RFC 9293's arithmetic modulo
2^32 is the machine's; the connection and the segments stay the Python objects the socket
layer sees (TcpConnection's attributes, wire.tcp.TcpSegment). tests/test_tcp_fastpath.py holds
this module, its Python twin and the full path to the same segments, state and counters.
"""
from libc.stdint cimport uint32_t, int64_t

from wire.tcp import TcpSegment
from kstack.tcp.state import TcpEvent

DEF TH_FIN = 0x01
DEF TH_SYN = 0x02
DEF TH_RST = 0x04
DEF TH_PSH = 0x08
DEF TH_ACK = 0x10
DEF HALF = 0x80000000
DEF MAX_CWND = 1 << 30

cdef tuple _EVENTS = tuple(TcpEvent(v) for v in range(2 * max(TcpEvent)))
cdef long _READABLE = TcpEvent.READABLE._value_
cdef long _WRITABLE = TcpEvent.WRITABLE._value_
cdef object _new_segment = TcpSegment.__new__
cdef object _Segment = TcpSegment
cdef str CA_OPEN = "open"  # connection.CA_OPEN


cdef inline bint _seq_lt(uint32_t a, uint32_t b):
    cdef uint32_t d = b - a
    return 0 < d < HALF


cdef inline bint _u32(object v, uint32_t* out) except -1:
    """v as a sequence number, False when it is not one (a segment built by hand)."""
    cdef int64_t x
    try:
        x = v
    except (OverflowError, TypeError):
        return False
    if x < 0 or x > 0xFFFFFFFF:
        return False
    out[0] = <uint32_t>x
    return True


def rcv_predicted(conn, seg, int64_t now):
    """TcpConnection._rcv_predicted in C: True when the segment was taken."""
    cdef int flags = seg.flags
    cdef uint32_t seq, rcv_nxt, ack, una, acked, wnd, wl1, d, tsval = 0
    cdef Py_ssize_t plen
    cdef bint ts_ok
    if (flags & ~TH_PSH) != TH_ACK:
        return False
    if not _u32(seg.seq, &seq):
        return False
    rcv_nxt = conn.rcv_nxt
    if seq != rcv_nxt or seg.sack or seg.mss is not None or seg.wscale is not None \
            or seg.sack_permitted:
        return False
    if conn.ca_state != CA_OPEN or conn.sb.intervals or conn.ofo.blocks \
            or conn.ofo_fin is not None or conn.fin_seq is not None:
        return False
    tsval_o = seg.tsval
    ts_ok = conn.ts_ok
    if ts_ok:
        if tsval_o is None or not _u32(tsval_o, &tsval):
            return False
        d = <uint32_t>conn.ts_recent - tsval
        if 0 < d < HALF:
            return False  # PAWS would reject it
    if not _u32(seg.ack, &ack):
        return False
    una = conn.snd_una
    acked = ack - una
    if acked > <uint32_t>(<uint32_t>conn.snd_nxt - una):
        return False
    if <int64_t>conn.max_snd_wnd + acked >= HALF:
        return False
    payload = seg.payload
    plen = len(payload)
    if plen:
        if conn.orphan or conn.rd_shut:
            return False
        wnd = <uint32_t>conn.rcv_adv - rcv_nxt
        if wnd >= HALF or <uint32_t>plen > wnd:
            return False
    elif not acked:
        return False
    c = conn.counters
    conn.last_recv = now
    conn.ka_probes_out = 0
    # the send window
    wl1 = conn.snd_wl1
    d = seq - wl1
    if (0 < d < HALF) or (d == 0 and <uint32_t>(ack - <uint32_t>conn.snd_wl2) < HALF):
        w = seg.window << conn.snd_wscale
        conn.snd_wnd = w
        conn.snd_wl1 = seq
        conn.snd_wl2 = ack
        if w > conn.max_snd_wnd:
            conn.max_snd_wnd = w
        if w:
            conn.t_persist = None
            conn.probes_out = 0
    if acked:
        _new_ack_open(conn, ack, acked, now, seg)
    if ts_ok and <uint32_t>(<uint32_t>conn.rcv_wup - seq) < HALF \
            and <uint32_t>(tsval - <uint32_t>conn.ts_recent) < HALF:
        conn.ts_recent = tsval
        conn.ts_recent_stamp = now
    if not plen:
        c["TcpExtTCPHPAcks"] += 1
        return True
    if plen > conn.rcv_mss:
        conn.rcv_mss = min(plen, conn.config.mss)
    rcvq = conn.rcvq
    rcvq += payload
    conn.rcvq = rcvq
    conn.rcv_nxt = <uint32_t>(seq + <uint32_t>plen)
    conn.events = _EVENTS[conn.events._value_ | _READABLE]
    delack = conn.delack_bytes + plen
    conn.delack_bytes = delack
    if not conn.ack_now:
        if delack >= 2 * conn.rcv_mss:
            conn.ack_now = True
        elif conn.t_delack is None:
            conn.t_delack = now + conn.config.delack_min
    c["TcpExtTCPHPHits"] += 1
    return True


cdef _new_ack_open(conn, uint32_t ack, uint32_t acked, int64_t now, seg):
    """TcpConnection._new_ack in CA_OPEN with an empty SACK scoreboard (what header
    prediction requires)."""
    cdef uint32_t q_acked = ack - <uint32_t>conn.sndq_seq
    cdef Py_ssize_t n, qlen
    cdef int64_t mss, cwnd
    if q_acked < HALF and q_acked:
        sndq = conn.sndq
        qlen = len(sndq)
        n = q_acked if q_acked < qlen else qlen
        if n:
            del sndq[:n]
            conn.sndq_seq = <uint32_t>(<uint32_t>conn.sndq_seq + <uint32_t>n)
            if conn.want_writable:
                cfg = conn.config
                if cfg.sndbuf - (qlen - n) >= cfg.sndbuf // 3:
                    conn.want_writable = False
                    conn.events = _EVENTS[conn.events._value_ | _WRITABLE]
    conn.snd_una = ack
    if _seq_lt(conn.high_rxt, ack):
        conn.high_rxt = ack
    if _seq_lt(conn.lost_end, ack):
        conn.lost_end = ack
    rtt = conn.rtt
    rtt_seq = conn.rtt_seq
    if rtt_seq is not None and <uint32_t>(ack - <uint32_t>rtt_seq) < HALF:
        rtt.sample(now - conn.rtt_time)
        conn.rtt_seq = None
    # (the timestamp sample of _new_ack is taken only outside CA_OPEN)
    rtt.backoff = 0
    conn.retransmits = 0
    conn.probes_out = 0
    conn.t_rtx = None if ack == <uint32_t>conn.snd_nxt else now + rtt.rto
    mss = conn.mss
    conn.dupacks = 0
    conn.reno_sacked = 0
    cwnd = conn.cwnd
    if cwnd < conn.ssthresh:
        cwnd = cwnd + (acked if acked < 2 * mss else 2 * mss)
        conn.cwnd = cwnd if cwnd < MAX_CWND else MAX_CWND
    else:
        ba = conn.bytes_acked + acked
        if ba >= cwnd:
            ba -= cwnd
            cwnd += mss
            conn.cwnd = cwnd if cwnd < MAX_CWND else MAX_CWND
        conn.bytes_acked = ba


def xmit_full_segments(conn, int64_t now, list out, Py_ssize_t mss):
    """TcpConnection._xmit_full_segments in C."""
    sndq = conn.sndq
    cdef Py_ssize_t qlen = len(sndq), off, end, k, i
    cdef uint32_t nxt = conn.snd_nxt, una, flight, wnd_left, first
    cdef int64_t cwnd
    off = <uint32_t>(nxt - <uint32_t>conn.sndq_seq)
    if off >= HALF or qlen - off < mss or mss <= 0:
        return
    una = conn.snd_una
    flight = nxt - una
    wnd_left = <uint32_t>(una + <uint32_t>conn.snd_wnd - nxt)
    if wnd_left >= HALF:
        wnd_left = 0
    k = (qlen - off) // mss
    if wnd_left // mss < k:
        k = wnd_left // mss
    cwnd = conn.cwnd
    if flight:
        i = (cwnd - flight) // mss if cwnd > flight else 0
        if i < k:
            k = i
    elif k:
        i = 1 + ((cwnd - mss) // mss if cwnd > mss else 0)
        if i < k:
            k = i
    if k <= 0:
        return
    field = _select_window(conn)
    lport, rport, rcv_nxt = conn.lport, conn.rport, conn.rcv_nxt
    cdef bint ts = conn.ts_ok
    tsval = tsecr = None
    if ts:
        tsval, tsecr = conn._ts_now(now) if now < 0 else \
            (now // 1000000 + <int64_t>conn.ts_offset) & 0xFFFFFFFF, conn.ts_recent
    first = nxt
    # GSO: up to `per` full-sized segments in one (TcpConnection._xmit_full_segments)
    cdef Py_ssize_t gso = conn.config.gso_max_size, per, n, left
    per = gso // mss if gso > mss else 1
    left = k
    while left:
        n = per if per < left else left
        left -= n
        end = off + n * mss
        seg = _new_segment(_Segment)
        seg.sport = lport
        seg.dport = rport
        seg.seq = nxt
        seg.ack = rcv_nxt
        seg.flags = TH_ACK | TH_PSH if end == qlen else TH_ACK
        seg.window = field
        seg.urgent = 0
        seg.mss = None
        seg.wscale = None
        seg.sack_permitted = False
        seg.sack = ()
        seg.tsval = tsval
        seg.tsecr = tsecr if ts else 0
        seg.payload = sndq[off:end]
        seg.checksum = 0
        out.append(seg)
        off = end
        nxt = nxt + <uint32_t>(n * mss)
    conn.counters["TcpOutSegs"] += k
    if conn.rtt_seq is None:
        conn.rtt_seq = <uint32_t>(first + <uint32_t>mss)
        conn.rtt_time = now
    conn.last_send = now
    if conn.t_rtx is None:
        conn.t_rtx = now + conn.rtt.rto
    conn.snd_nxt = nxt
    conn.ack_now = False
    conn.delack_bytes = 0
    conn.t_delack = None


cdef object _select_window(conn):
    """TcpConnection._select_window in C: the window field, RCV.ADV and RCV.WUP moved."""
    cdef int ws = conn.rcv_wscale
    cdef uint32_t rcv_nxt = conn.rcv_nxt
    cdef uint32_t cur32 = <uint32_t>conn.rcv_adv - rcv_nxt
    cdef int64_t cur = cur32 if cur32 < HALF else 0
    cfg = conn.config
    cdef int64_t rcvbuf = cfg.rcvbuf
    cdef int64_t free = rcvbuf - len(conn.rcvq) - <int64_t>conn.ofo.bytes
    cdef int64_t thresh = conn.rcv_mss
    cdef int64_t win, field
    if free < 0:
        free = 0
    if rcvbuf // 2 < thresh:
        thresh = rcvbuf // 2
    win = free if free - cur >= thresh else cur
    field = (win + (<int64_t>1 << ws) - 1) >> ws
    if field > 65535:
        field = 65535
    conn.rcv_adv = <uint32_t>(rcv_nxt + <uint32_t>(field << ws))
    conn.rcv_wup = rcv_nxt
    return field


def output_predicted(conn, int64_t now):
    """TcpConnection._output_predicted in C: the segments, or None with nothing changed."""
    if conn.ctl or conn._send_syn or conn._send_probe or conn._force_send \
            or conn.ca_state != CA_OPEN or conn.sb.intervals or conn.fin_seq is not None \
            or conn.t_persist is not None or (conn.sack_ok and conn.ofo.blocks):
        return None
    cdef int64_t mss = conn.mss
    if mss <= 0 or now < 0:
        return None
    cdef uint32_t una = conn.snd_una, nxt = conn.snd_nxt, u32, flight, wnd_left
    cfg = conn.config
    cdef int64_t cwnd = conn.cwnd, unsent, k, rest, pipe, init
    cdef bint restart = False
    if una == nxt and cfg.slow_start_after_idle:
        last_send = conn.last_send
        if last_send and now - last_send > conn.rtt.rto:
            restart = True
            init = cfg.init_cwnd * mss
            if init < cwnd:
                cwnd = init
    u32 = <uint32_t>(<uint32_t>conn.sndq_seq + <uint32_t>len(conn.sndq) - nxt)
    unsent = u32 if u32 < HALF else 0
    if unsent:
        flight = nxt - una
        wnd_left = <uint32_t>(una + <uint32_t>conn.snd_wnd - nxt)
        if wnd_left >= HALF:
            wnd_left = 0
        k = unsent // mss
        if wnd_left // mss < k:
            k = wnd_left // mss
        if flight:
            rest = (cwnd - flight) // mss if cwnd > flight else 0
        else:
            rest = 1 + ((cwnd - mss) // mss if cwnd > mss else 0)
        if (flight or k) and rest < k:
            k = rest
        rest = unsent - k * mss
        if rest:
            pipe = flight + k * mss
            if not ((rest if rest < mss else mss) > cwnd - pipe and pipe > 0):
                return None
    if restart:
        conn.cwnd = cwnd
    cdef list out = []
    if unsent:
        xmit_full_segments(conn, now, out, mss)
    if conn.ack_now:
        out.append(_ack_segment(conn, now))
        conn.counters["TcpOutSegs"] += 1
    return out


cdef object _ack_segment(conn, int64_t now):
    """TcpConnection._segment(SND.NXT, 0, b"", now, ()) in C: a pure ACK."""
    seg = _new_segment(_Segment)
    seg.sport = conn.lport
    seg.dport = conn.rport
    seg.seq = conn.snd_nxt
    seg.ack = conn.rcv_nxt
    seg.flags = TH_ACK
    seg.window = _select_window(conn)
    seg.urgent = 0
    seg.mss = None
    seg.wscale = None
    seg.sack_permitted = False
    seg.sack = ()
    if conn.ts_ok:
        seg.tsval = (now // 1000000 + <int64_t>conn.ts_offset) & 0xFFFFFFFF
        seg.tsecr = conn.ts_recent
    else:
        seg.tsval = None
        seg.tsecr = 0
    seg.payload = b""
    seg.checksum = 0
    conn.ack_now = False
    conn.delack_bytes = 0
    conn.t_delack = None
    return seg
