"""TCP sockets (Linux's net/ipv4/tcp_ipv4.c, inet_connection_sock.c, inet_hashtables.c,
tcp_minisocks.c): the kernel side of SOCK_STREAM on the sans-IO engine in kstack.tcp.

The engine (TcpConnection) owns one connection's TCB; this module owns what lies between
connections and the IP layer:

- demux (tcp_v4_rcv): the established hash by 4-tuple, then the listeners by port (bound to
  the address beats a wildcard); no socket -> a RST (never for a RST, TcpOutRsts);
- checksums: verified on input unless the device said CHECKSUM_UNNECESSARY (TcpInCsumErrors,
  TcpInErrs, TCP_CSUM); computed on output, or left to the device (CHECKSUM_PARTIAL) when it
  has NETIF_F_IP_CSUM, the route is not local and the segment fits the path MTU;
- ports (inet_csk_get_port): bind conflicts as Linux has them (SO_REUSEADDR lets a socket
  share a port with sockets that are not listening, TIME_WAIT included), ephemeral ports from
  a random start in ip_local_port_range;
- listen: a SYN queue (connections in SYN-RECEIVED) and an accept queue, both bounded by the
  backlog (min(backlog, somaxconn)); a SYN or a handshake's last ACK that finds them full is
  dropped (TcpExtListenOverflows, TcpExtListenDrops), as Linux does without syncookies;
- the timers: one Timer per connection in stack.timers, re-armed from conn.next_deadline();
- orphans: close() hands the connection to the stack, which finishes it (FIN-WAIT, TIME_WAIT)
  with bounds on orphans (tcp_max_orphans) and TIME_WAIT entries (tcp_max_tw_buckets);
- counters: TcpInSegs/TcpOutSegs for what this layer sees, TcpCurrEstab as a gauge, the
  engine's own counters go into the same stack.snmp.

The table (demux, ports, listen queues, output; TcpSysctl, ss) is kstack.tcp_table's;
this module has TcpSock, the factory and install().

TcpSock keeps Sock's contract: non-blocking, BlockingIOError (EAGAIN, EINPROGRESS, EALREADY)
when a call must wait, wake() on every state edge, poll() as tcp_poll.
"""
from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from kstack.sock import (IPPROTO_TCP, MSG_PEEK, POLLERR, POLLHUP, POLLIN, POLLNVAL, POLLOUT,
                         SHUT_RD, SHUT_RDWR, SHUT_WR, SO_ERROR, SO_KEEPALIVE, SO_LINGER, SO_RCVBUF,
                         SO_SNDBUF, SOCK_STREAM, SOL_SOCKET, TCP_NODELAY, Address, Sock, inet_addr)
from kstack.tcp import TcpConfig, TcpConnection, TcpEvent, TcpState
from kstack.tcp.config import S
from kstack.tcp_table import _CONNECTING, TcpSysctl, TcpTable, ss
from wire.ipv4 import ntoa

if TYPE_CHECKING:
    from kstack.inet import Inet

__all__ = ["TcpSock", "TcpTable", "TcpSysctl", "tcp_socket", "install", "ss",
           "TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT", "TCP_MAXSEG", "TCP_INFO"]

TCP_MAXSEG = 2
TCP_KEEPIDLE = 4
TCP_KEEPINTVL = 5
TCP_KEEPCNT = 6
TCP_INFO = 11

_ESTAB_LIKE = (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT)  # what TcpCurrEstab counts
# tcp_close's wait for SO_LINGER: the states in which the FIN is not yet acknowledged
LINGER_WAIT_STATES = (TcpState.FIN_WAIT_1, TcpState.CLOSING, TcpState.LAST_ACK)

# socket->state (SS_*): what a repeated connect() answers (__inet_stream_connect)
SS_UNCONNECTED, SS_CONNECTING, SS_CONNECTED = 0, 1, 2


_addr = inet_addr


def _err(code: int) -> OSError:
    return OSError(code, errno.errorcode.get(code, "error"))


class TcpSock(Sock):
    """One TCP socket: a listener, a connection (possibly an orphan after close), or neither
    yet. `conn` is the engine's connection once connect() or a SYN made one."""

    def __init__(self, stack: Any, family: int, type: int, protocol: int) -> None:
        super().__init__(stack, family, type, protocol or IPPROTO_TCP)
        self.inet: "Inet" = stack.protocols["inet"]
        self.table: TcpTable = stack.protocols["tcp"]
        self.rcvbuf = self.table.sysctl.default_rcvbuf
        self.sndbuf = self.table.sysctl.default_sndbuf
        self.config = TcpConfig(rcvbuf=self.rcvbuf, sndbuf=self.sndbuf,
                                challenge_limiter=self.table.limiter)
        self.conn: TcpConnection | None = None
        self.saddr = 0  # bound (or chosen) local address; 0: any
        self.sport = 0
        self.daddr = 0
        self.dport = 0
        self.bound = False  # in the bind table (bhash)
        self.user_bound = False  # by bind(): connect keeps the address
        self.listening = False
        self.backlog = 0
        self.synq: list[TcpSock] = []  # children in SYN-RECEIVED (the request queue)
        self.acceptq: list[TcpSock] = []  # children established, not accepted yet
        self.parent: TcpSock | None = None  # the listener of a child not yet accepted
        self.sock_state = SS_UNCONNECTED
        self.linger: int = -1  # SO_LINGER: -1 off, else seconds
        self.orphan = False  # closed by the application, finishing in the stack
        self.hashed = False  # in the established hash
        self.estab_counted = False  # counted in TcpCurrEstab
        self.shut_rd = False
        self.listen_shut = False
        self.state_seen: TcpState | None = None
        self.timer = stack.timers.timer(self._on_timer, "tcp")

    # --- naming --------------------------------------------------------------------------------

    @property
    def state(self) -> TcpState:
        if self.listening:
            return TcpState.LISTEN
        return self.conn.state if self.conn is not None else TcpState.CLOSED

    def _local(self) -> tuple[str, int]:
        return (ntoa(self.saddr), self.sport)

    def _remote(self) -> tuple[str, int]:
        return (ntoa(self.daddr), self.dport)

    def getsockname(self) -> Address:
        return self._local()

    def getpeername(self) -> Address:
        if self.conn is None or self.listening or self.conn.state in (TcpState.SYN_SENT, TcpState.CLOSED):
            raise OSError(errno.ENOTCONN, "not connected")
        return self._remote()

    # --- bind, listen, accept ------------------------------------------------------------------

    def bind(self, addr: Address) -> None:
        if self.closed:
            raise OSError(errno.EBADF, "closed")
        ip, port = _addr(addr)
        if self.bound or self.conn is not None:
            raise OSError(errno.EINVAL, "already bound")
        if ip and not self.inet.is_local(ip):
            raise OSError(errno.EADDRNOTAVAIL, "cannot assign requested address")
        self.table.get_port(self, ip, port)
        self.user_bound = True

    def listen(self, backlog: int) -> None:
        if self.closed:
            raise OSError(errno.EBADF, "closed")
        if self.conn is not None:
            raise OSError(errno.EINVAL, "connected")
        somaxconn = self.stack.sysctl.somaxconn
        backlog = max(0, min(int(backlog), somaxconn))
        if self.listening:
            self.backlog = backlog  # listen() again changes the backlog, as Linux allows
            return
        if not self.bound:
            self.table.get_port(self, 0, 0)
        if self.table.listen_conflict(self):
            raise OSError(errno.EADDRINUSE, "address already in use")
        self.backlog = backlog
        self.listening = True
        self.listen_shut = False
        self.table.listen_hash(self)
        self.wake()

    def accept(self) -> tuple["TcpSock", Address]:
        if self.closed:
            raise OSError(errno.EBADF, "closed")
        if not self.listening or self.listen_shut:
            raise OSError(errno.EINVAL, "not listening")
        if not self.acceptq:
            raise BlockingIOError(errno.EAGAIN, "no connection to accept")
        child = self.acceptq.pop(0)
        child.parent = None
        child.sock_state = SS_CONNECTED
        return child, child._remote()

    # --- connect -------------------------------------------------------------------------------

    def connect(self, addr: Address) -> None:
        """__inet_stream_connect: the first call starts the handshake and raises EINPROGRESS;
        a later one answers EALREADY while it runs, 0 once when it completed (then EISCONN),
        or the error it failed with."""
        if self.closed:
            raise OSError(errno.EBADF, "closed")
        if self.listening:
            raise OSError(errno.EINVAL, "listening")
        if self.sock_state == SS_CONNECTED:
            raise OSError(errno.EISCONN, "already connected")
        if self.sock_state == SS_CONNECTING:
            return self._connect_result()
        if self.conn is not None:
            raise OSError(errno.EISCONN, "already connected")
        ip, port = _addr(addr)
        res = self.inet.ip.route_output(ip)
        if res is None:
            raise OSError(errno.ENETUNREACH, "network is unreachable")
        if self.err:
            err, self.err = self.err, 0
            raise _err(err)
        self.table.connect(self, ip, port, res)
        self.sock_state = SS_CONNECTING
        raise BlockingIOError(errno.EINPROGRESS, "operation now in progress")

    def _connect_result(self) -> None:
        conn = self.conn
        st = conn.state if conn is not None else TcpState.CLOSED
        if st in _CONNECTING:
            raise BlockingIOError(errno.EALREADY, "operation already in progress")
        if st == TcpState.CLOSED:
            self.sock_state = SS_UNCONNECTED
            err = self.err or (conn.error if conn is not None else 0) or errno.ECONNABORTED
            self.err = 0
            if conn is not None:
                conn.error = 0
            raise _err(err)
        self.sock_state = SS_CONNECTED

    # --- data ----------------------------------------------------------------------------------

    def sendmsg(self, data: bytes, addr: Address | None, flags: int = 0) -> int:
        """tcp_sendmsg: what the send buffer takes (EAGAIN when it takes nothing); EPIPE
        when the connection cannot send."""
        if self.closed:
            raise OSError(errno.EBADF, "closed")
        conn = self.conn
        if self.err:
            err, self.err = self.err, 0
            raise _err(err)
        if conn is None or self.listening:
            raise OSError(errno.EPIPE, "broken pipe")
        if conn.state in _CONNECTING:
            raise BlockingIOError(errno.EAGAIN, "connecting")
        if not len(data):
            return 0
        now = self.stack.clock()
        try:
            n = conn.send(data, now)
        except BlockingIOError:
            raise
        except OSError:
            self._push(now)
            raise
        self._push(now)
        if n == 0:
            raise BlockingIOError(errno.EAGAIN, "send buffer full")
        return n

    def recvmsg(self, bufsize: int, flags: int = 0) -> tuple[bytes, Address | None]:
        if self.closed:
            raise OSError(errno.EBADF, "closed")
        conn = self.conn
        if conn is None or self.listening:
            if self.err:
                err, self.err = self.err, 0
                raise _err(err)
            raise OSError(errno.ENOTCONN, "not connected")
        if conn.state in _CONNECTING:
            raise BlockingIOError(errno.EAGAIN, "connecting")
        if bufsize <= 0:
            return b"", None
        if self.shut_rd and not conn.readable():
            return b"", None
        if self.err:
            err, self.err = self.err, 0
            raise _err(err)
        data = conn.recv(bufsize, peek=bool(flags & MSG_PEEK))  # the engine's error once
        if data and not flags & MSG_PEEK:
            self._push(self.stack.clock())  # the window opened: maybe a window update
        return bytes(data), None

    def shutdown(self, how: int) -> None:
        if self.closed:
            raise OSError(errno.EBADF, "closed")
        if how not in (SHUT_RD, SHUT_WR, SHUT_RDWR):
            raise OSError(errno.EINVAL, "how")
        if self.listening:
            if how != SHUT_WR:  # inet_shutdown: a listener stops; accept answers EINVAL
                self.listen_shut = True
                self.table.listen_stop(self)
                self.wake()
            return
        conn = self.conn
        if conn is None or conn.state in (TcpState.CLOSED, TcpState.SYN_SENT):
            if conn is not None and conn.state == TcpState.SYN_SENT:
                self._abort()
                return
            raise OSError(errno.ENOTCONN, "not connected")
        now = self.stack.clock()
        if how in (SHUT_RD, SHUT_RDWR):
            self.shut_rd = True
        conn.shutdown(how, now)
        self._push(now)
        self.wake()

    # --- readiness -----------------------------------------------------------------------------

    def poll(self) -> int:
        """tcp_poll."""
        if self.closed:
            return POLLNVAL
        conn = self.conn
        mask = POLLERR if self.err or conn is not None and conn.error else 0
        if self.listening:
            return mask | (POLLIN if self.acceptq else 0)
        if conn is None:
            return mask | POLLOUT | POLLHUP
        st = conn.state
        if st in _CONNECTING:
            return mask
        if st == TcpState.CLOSED:
            return mask | POLLIN | POLLHUP
        if conn.readable() or self.shut_rd:
            mask |= POLLIN
        if conn.writable():
            mask |= POLLOUT
        return mask

    # --- options -------------------------------------------------------------------------------

    def setsockopt(self, level: int, option: int, value: int) -> None:
        cfg = self.config
        v = int(value)
        if level == IPPROTO_TCP:
            if option == TCP_NODELAY:
                cfg.nodelay = bool(v)
                if self.conn is not None:
                    self.conn.config.nodelay = bool(v)
                    self._push(self.stack.clock())  # Linux pushes pending data at once
                return
            if option in (TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT):
                if not 1 <= v <= (255 if option == TCP_KEEPCNT else 32767):
                    raise OSError(errno.EINVAL, "keepalive option out of range")
                name = {TCP_KEEPIDLE: "keepalive_time", TCP_KEEPINTVL: "keepalive_intvl",
                        TCP_KEEPCNT: "keepalive_probes"}[option]
                self._set_cfg(name, v if option == TCP_KEEPCNT else v * S)
                return
            raise OSError(errno.ENOPROTOOPT, "setsockopt")
        if level == SOL_SOCKET:
            if option == SO_KEEPALIVE:
                if self.conn is not None:
                    self.conn.set_keepalive(bool(v), self.stack.clock())
                    self._push(self.stack.clock())
                self._set_cfg("keepalive", bool(v))
                return
            if option == SO_LINGER:
                self.linger = -1 if v < 0 else min(v, 0x7FFFFFFF)
                return
            if option in (SO_RCVBUF, SO_SNDBUF):
                super().setsockopt(level, option, value)
                self._set_cfg("rcvbuf" if option == SO_RCVBUF else "sndbuf",
                              self.rcvbuf if option == SO_RCVBUF else self.sndbuf)
                return
        super().setsockopt(level, option, value)

    def _set_cfg(self, name: str, value: Any) -> None:
        setattr(self.config, name, value)
        if self.conn is not None and self.conn.config is not self.config:
            setattr(self.conn.config, name, value)

    def getsockopt(self, level: int, option: int) -> int:
        cfg = self.config
        if level == IPPROTO_TCP:
            if option == TCP_NODELAY:
                return int(cfg.nodelay)
            if option == TCP_KEEPIDLE:
                return cfg.keepalive_time // S
            if option == TCP_KEEPINTVL:
                return cfg.keepalive_intvl // S
            if option == TCP_KEEPCNT:
                return cfg.keepalive_probes
            if option == TCP_MAXSEG:
                return cfg.mss
            raise OSError(errno.ENOPROTOOPT, "getsockopt")
        if level == SOL_SOCKET:
            if option == SO_KEEPALIVE:
                return int(cfg.keepalive)
            if option == SO_LINGER:  # l_onoff in bit 32 (a result must not look like -errno)
                return 0 if self.linger < 0 else (1 << 32) | self.linger
            if option == SO_ERROR:
                err, self.err = self.err, 0
                if not err and self.conn is not None:
                    err, self.conn.error = self.conn.error, 0
                return err
        return super().getsockopt(level, option)

    # --- close ---------------------------------------------------------------------------------

    def close(self) -> None:
        """tcp_close: a listener stops (its children are reset); a connection with SO_LINGER
        0 is reset (TcpExtTCPAbortOnData); otherwise the engine closes (a FIN, or a RST with
        unread data) and the connection becomes an orphan the stack finishes."""
        if self.closed:
            return
        self.closed = True
        table = self.table
        if self.listening:
            table.listen_stop(self)
            table.listen_unhash(self)
            self.listening = False
            table.unbind(self)
            self.wake()
            return
        conn = self.conn
        if conn is None or conn.state == TcpState.CLOSED:
            self._destroy()
            self.wake()
            return
        now = self.stack.clock()
        if conn.state in _CONNECTING:
            conn.abort(now)
        elif self.linger == 0:
            self.stack.snmp["TcpExtTCPAbortOnData"] += 1
            conn.abort(now)
        else:
            try:
                conn.close(now)
            except OSError:
                pass  # already closing: the engine finishes what it started
        self.orphan = True
        table.orphans += 1
        self._push(now)
        if self.conn is not None and self.hashed and table.orphans > table.sysctl.tcp_max_orphans:
            self.stack.snmp["TcpExtTCPAbortOnMemory"] += 1
            self._abort()
        self.wake()

    def lingering(self) -> bool:
        """True while a close with SO_LINGER > 0 must still wait (the FIN not acknowledged)."""
        return (self.linger > 0 and self.conn is not None and self.hashed
                and self.conn.state in LINGER_WAIT_STATES)

    def _abort(self) -> None:
        now = self.stack.clock()
        if self.conn is not None and self.conn.state != TcpState.CLOSED:
            self.conn.abort(now)
        self._push(now)

    # --- the engine's outputs --------------------------------------------------------------------

    def _on_timer(self, now: int) -> None:
        conn = self.conn
        if conn is None:
            return
        conn.timer_expired(now)
        self._push(now)

    def _push(self, now: int) -> None:
        """After every call into the engine: put its segments on the wire, act on its events,
        follow its state, re-arm the timer."""
        conn = self.conn
        if conn is None:
            return
        table = self.table
        mss = conn.mss
        for seg in conn.segments_to_send(now):
            table.xmit(seg, self.saddr, self.daddr, self.tos, self.ttl, False, mss)
        ev = conn.take_events()
        st = conn.state
        edge = st != self.state_seen
        self.state_seen = st
        snmp = self.stack.snmp
        estab = st in _ESTAB_LIKE
        if estab != self.estab_counted:
            self.estab_counted = estab
            snmp["TcpCurrEstab"] += 1 if estab else -1
        if ev & TcpEvent.ESTABLISHED and self.parent is not None:
            table.child_established(self)
        if st == TcpState.CLOSED:
            self._finish()
        elif st == TcpState.TIME_WAIT and self.orphan and id(self) not in table.tw:
            table.time_wait_enter(self)
        if self.conn is not None and self.hashed:
            d = conn.next_deadline()
            if d is None:
                self.timer.delete()
            elif d != self.timer.expires:
                self.timer.mod(d)
        if (ev or edge) and self._wakeups:
            self.wake()

    def _finish(self) -> None:
        """The connection reached CLOSED: forget it in the hash; an orphan or a child no one
        will accept goes entirely."""
        self.timer.delete()
        table = self.table
        if self.hashed:
            table.unhash(self)
        parent = self.parent
        if parent is not None and self in parent.synq:
            parent.synq.remove(self)
            self.parent = None
            self._destroy()
            return
        if self.orphan or self.closed:
            self._destroy()
        elif not self.user_bound:
            table.unbind(self)  # tcp_set_state(TCP_CLOSE) puts an autobound port back

    def _destroy(self) -> None:
        table = self.table
        self.timer.delete()
        if self.hashed:
            table.unhash(self)
        if self.orphan:
            self.orphan = False
            table.orphans -= 1
        if self.estab_counted:
            self.estab_counted = False
            self.stack.snmp["TcpCurrEstab"] -= 1
        table.time_wait_leave(self)
        table.unbind(self)


def tcp_socket(stack: Any, family: int, type: int, protocol: int) -> TcpSock:
    """The factory registered for (SOCK_STREAM, IPPROTO_TCP)."""
    return TcpSock(stack, family, type, protocol)


def install(inet: "Inet") -> TcpTable:
    """tcp_v4_init + inet_add_protocol(IPPROTO_TCP) + the SOCK_STREAM factory."""
    stack = inet.stack
    if "tcp" in stack.protocols:
        return stack.protocols["tcp"]
    table = TcpTable(inet)
    stack.protocols["tcp"] = table
    inet.tcp = table
    inet.add_protocol(IPPROTO_TCP, table.rcv, table.err)
    stack.register_socket(SOCK_STREAM, IPPROTO_TCP, tcp_socket)
    return table
