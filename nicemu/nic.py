"""The emulated 82540EM: the device's control plane around a per-frame data path engine.

How it is built
---------------
- Register file. `Nic.regs` is an `array('I')` of the 0x20000 / 4 BAR0 words, indexed by
  `offset >> 2`. It is the one copy of the device state that software sees: the data path
  engine reads the ring registers from it and adds to the statistics words in it directly.
- Dispatch. `nicemu.regs.REGISTERS` is the register table (offset -> name, reset value, read
  kind, write kind), as QEMU's e1000.c has macreg_readops / macreg_writeops. At import, each
  kind is turned into one handler below (`_read_icr`, `_write_ims`, `_write_tdt`, ...), giving
  two lists indexed by word: an access is a bounds check and one list lookup. `None` in a list
  means "plain": the word itself, with no side effect. Offsets missing from the table read 0
  and ignore writes, as undecoded addresses do on hardware; so do unaligned offsets. Offsets
  outside BAR0 are a caller bug and raise ValueError.
- Data path. The per-frame work (descriptor walks, DMA, FCS, filtering, write-back, the RX and
  TX packet buffers, statistics) is the engine's: `nicemu._datapath.Datapath` (Cython) or
  `nicemu.datapath_ref.RefDatapath` (pure Python), see docs/architecture.md "Nic <-> datapath
  engine" and docs/datapath.md. The Nic calls it on the doorbells (TDT, RDT, TCTL/RCTL with EN)
  and on `receive()`; each call returns an event word: ICR causes to raise now, plus
  EV_RX_DONE / EV_TX_IDE, which start the delay timers, and EV_TX_MORE (below).
- Bounded doorbells. One TX walk fetches at most TX_BUDGET (4096) descriptors, so a TDT write
  costs a bounded amount of work whatever the ring holds (the largest ring has 65,528
  descriptors). When a walk stops with descriptors left (EV_TX_MORE) the Nic arms a TX
  continuation due at once: `next_deadline()` says "now", `run_timers()` walks again, and a
  doorbell that comes meanwhile only stores TDT (the pending walk will reach it). In an event
  loop the device's other work and other devices get their turn between two walks; a full
  ring of up to 4096 descriptors still goes out before the TDT write returns.
- Interrupts. ICR holds the pending causes, IMS the enabled ones; the INTx line (`irq`) is
  (ICR & IMS) != 0, except that with ITR set the line may not rise again until ITR * 256 ns
  after it last rose. `on_irq(level)` is called on every change of the line, and again with
  True when the line is still high after an ICR read or an IMS write (the vfio-user server
  signals its eventfd then, see vfio-user-subset.md).
- Time. Nothing here sleeps or reads a clock except through `clock()` (ns; default
  time.monotonic_ns, tests inject a fake). The delay timers (RDTR/RADV -> RXT0, TIDV/TADV ->
  TXDW) and the ITR hold-off are deadlines in clock ns; `run_timers()` fires the ones that are
  due and `next_deadline()` tells an event loop when to call it next.
- Reset. Power-on, CTRL.RST and `reset()` put every register back to its table reset value,
  reload RAL0/RAH0 from the EEPROM (with AV), set STATUS.LU from the cable, empty the engine's
  packet buffers, cancel the timers and lower the line.

See docs/device.md for the registers, where each behavior comes from in the SDM, and what is
not modeled.
"""
from __future__ import annotations

import time
import warnings
from array import array
from typing import Callable, Sequence

from nicemu import tracepoint
from nicemu import regs as R
from nicemu.dma import DmaMemory
from nicemu.eeprom import Eeprom, format_mac
from nicemu.pci import PciConfig

__all__ = ["Nic", "make_engine"]

# Plain ints for the hot paths (IntFlag arithmetic builds enum objects).
_M32 = 0xFFFFFFFF
_BAR0_SIZE = R.BAR0_SIZE
_ICR = R.ICR >> 2
_IMS = R.IMS >> 2
_ITR = R.ITR >> 2
_STATUS = R.STATUS >> 2
_PBA = R.PBA >> 2
_RDTR = R.RDTR >> 2
_RADV = R.RADV >> 2
_TIDV = R.TIDV >> 2
_TADV = R.TADV >> 2
_ICR_VALID = R.ICR_VALID
_RXT0 = int(R.Icr.RXT0)
_TXDW = int(R.Icr.TXDW)
_LSC = int(R.Icr.LSC)
_LU = int(R.Status.LU)
_CTRL_RST = int(R.Ctrl.RST)
_RCTL_EN = int(R.Rctl.EN)
_TCTL_EN = int(R.Tctl.EN)
_EV_RX_DONE = R.EV_RX_DONE
_EV_TX_IDE = R.EV_TX_IDE
_EV_TX_MORE = R.EV_TX_MORE
_RING_LEN_MASK = R.RING_LEN_MASK
_RING_INDEX_MASK = R.RING_INDEX_MASK
_DESC_SIZE = R.DESC_SIZE
_MDIC_KEEP = 0x2FFF0000  # REGADD, PHYADD, OP, INT_EN: what software asked for
_MDIC_DONE = int(R.Mdic.READY | R.Mdic.ERROR)

EngineFactory = Callable[[array, DmaMemory], object]


def make_engine(kind: str | EngineFactory, regs: array, mem: DmaMemory) -> object:
    """The data path engine for `regs` and `mem`.

    "cython": nicemu._datapath.Datapath (ImportError if the extension is not built);
    "python": nicemu.datapath_ref.RefDatapath; "auto": Cython if it imports, else the
    reference with a RuntimeWarning (it is 50 to 200 times slower). A callable is called as
    kind(regs, mem) (tests use it to plug in a stand-in).
    """
    if callable(kind):
        return kind(regs, mem)
    if kind == "cython":
        from nicemu._datapath import Datapath

        return Datapath(regs, mem)
    if kind == "python":
        from nicemu.datapath_ref import RefDatapath

        return RefDatapath(regs, mem)
    if kind == "auto":
        try:
            from nicemu._datapath import Datapath
        except ImportError as e:
            warnings.warn(
                f"nicemu: the Cython data path is not built ({e}); using the pure-Python "
                "reference, which is much slower (pip install . builds it)",
                RuntimeWarning,
                stacklevel=3,
            )
            from nicemu.datapath_ref import RefDatapath

            return RefDatapath(regs, mem)
        return Datapath(regs, mem)
    raise ValueError(f"engine must be 'auto', 'cython', 'python' or a factory, got {kind!r}")


class Nic:
    """One 82540EM: PCI config space, BAR0 registers, EEPROM, interrupts, timers, link."""

    def __init__(
        self,
        mem: DmaMemory,
        mac: str | bytes = "52:54:00:12:34:56",
        clock: Callable[[], int] | None = None,
        engine: str | EngineFactory = "auto",
        pba: int = R.PBA_DEFAULT,
    ) -> None:
        """`pba` is the packet buffer split the device powers up with (RX KB in bits 15:0, TX KB
        in bits 31:16), as a board's EEPROM would set it; reset returns PBA to it."""
        self.mem = mem
        self.pba_reset = pba & _M32
        self.clock: Callable[[], int] = clock if clock is not None else time.monotonic_ns
        self.eeprom = Eeprom(mac)
        self.pci = PciConfig()
        self.regs = array("I", bytes(R.BAR0_SIZE))
        self.engine = make_engine(engine, self.regs, mem)
        self.engine.bus_master = False
        self.on_irq: Callable[[bool], None] | None = None
        self.irq = False
        self.link_up = True
        self._peer: Nic | None = None
        # Deadlines in clock ns (None: not running).
        self._rdtr_at: int | None = None  # receive packet timer, restarted by each packet
        self._radv_at: int | None = None  # receive absolute timer, from the first packet
        self._tidv_at: int | None = None
        self._tadv_at: int | None = None
        self._itr_at: int | None = None  # when a held-off interrupt may be signalled
        self._last_irq_at: int | None = None  # when the line last rose
        self._tx_more_at: int | None = None  # a TX walk that ran out of budget continues then
        # The earliest of the six, kept up to date by _timers_changed() at every change: an
        # event loop asks for it once or twice per turn, so it must cost one attribute read.
        self._deadline: int | None = None
        self._reset_device()

    def __repr__(self) -> str:
        return f"<Nic {self.mac} link={'up' if self.link_up else 'down'} irq={int(self.irq)}>"

    # --- PCI configuration space ---------------------------------------------------------------

    def config_read(self, offset: int, size: int = 4) -> int:
        return self.pci.read(offset, size)

    def config_write(self, offset: int, value: int, size: int = 4) -> None:
        was_master = self.engine.bus_master
        self.pci.write(offset, value, size)
        master = self.pci.bus_master
        self.engine.bus_master = master  # COMMAND.BME gates all DMA
        if master and not was_master:
            # Work that waited for DMA proceeds: the TX ring up to TDT, the RX packet buffer.
            self._transmit()
            ev = self.engine.drain_rx()
            if ev:
                self._service(ev)

    # --- BAR0 ---------------------------------------------------------------------------------

    def read32(self, offset: int) -> int:
        """Read the register at `offset`, with its read side effect (ICR, statistics)."""
        if 0 <= offset < _BAR0_SIZE:
            if offset & 3:
                return 0
            i = offset >> 2
            handler = _READ[i]
            return self.regs[i] if handler is None else handler(self, i)
        raise ValueError(f"BAR0 offset {offset:#x} is outside [0, {R.BAR0_SIZE:#x})")

    def write32(self, offset: int, value: int) -> None:
        """Write the register at `offset` (value masked to 32 bits), with its side effect."""
        if 0 <= offset < _BAR0_SIZE:
            if offset & 3:
                return
            i = offset >> 2
            handler = _WRITE[i]
            if handler is None:
                self.regs[i] = value & _M32
            else:
                handler(self, i, value & _M32)
            return
        raise ValueError(f"BAR0 offset {offset:#x} is outside [0, {R.BAR0_SIZE:#x})")

    def write_tail(self, offset: int, values: Sequence[int]) -> None:
        """Writes of `values`, in order, to the register at `offset`: what write32(offset, v)
        for each v does. The vfio-user server hands a burst of posted doorbells that arrived
        together here, typically TDT or RDT.

        For TDT and RDT the earlier values are skipped, so that one TX walk or one RX drain
        does the work, when that makes no difference software could see (`_tail_supersedes`):
        the walk to an earlier tail is a prefix of the walk to the last one, and the one cause
        bit a shorter walk could raise on its own is already set. Otherwise each value goes
        through the register's write handler in turn, as write32 would. (Either way the
        handler is the one write32 uses: one place per register's behavior.)"""
        if not 0 <= offset < _BAR0_SIZE:
            raise ValueError(f"BAR0 offset {offset:#x} is outside [0, {R.BAR0_SIZE:#x})")
        if offset & 3 or not values:
            return
        i = offset >> 2
        handler = _WRITE[i]
        if len(values) > 1 and i in _TAIL_RULES and self._tail_supersedes(i, values):
            values = values[-1:]
        for value in values:
            if handler is None:
                self.regs[i] = value & _M32
            else:
                handler(self, i, value & _M32)

    def _tail_supersedes(self, i: int, values: Sequence[int]) -> bool:
        """True if writing values[-1] alone to tail register `i` (TDT or RDT) is the same as
        writing every value in turn.

        TDT: each write walks the TX ring from TDH to the new tail; RDT: each write drains the
        RX packet buffer into descriptors from RDH up to the new tail. When every value is a
        valid index (below the ring's descriptor count, with TDH/RDH valid too) and lies no
        further from the head than the next one, the walk or drain for an earlier value is a
        prefix of the one for the last: the same descriptors are read and written back in the
        same order, the same frames are sent or stored. What a prefix alone can add is one cause
        bit: TXQE (the ring emptied at the earlier tail) or RXDMT0 (free descriptors counted
        against the earlier, nearer tail); so both must already be pending in ICR. Delay timers
        started by the skipped doorbell start at the clock reading of the last one instead, a
        difference of the time the emulator takes to handle a message. A tail that moves
        backwards (a driver bug: the device would wrap the whole ring) or an invalid ring always
        takes the exact path."""
        len_i, head_i, cause = _TAIL_RULES[i]
        regs = self.regs
        if not regs[_ICR] & cause:
            return False
        n = (regs[len_i] & _RING_LEN_MASK) // _DESC_SIZE
        head = regs[head_i] & _RING_INDEX_MASK
        if head >= n:  # also n == 0: no ring
            return False
        prev = 0
        for value in values:
            tail = value & _RING_INDEX_MASK
            if tail >= n:
                return False
            ahead = (tail - head) % n  # distance from the head, in ring order
            if ahead < prev:
                return False
            prev = ahead
        return True

    def peek32(self, offset: int) -> int:
        """The register word without any read side effect (for tools and debugging)."""
        if not 0 <= offset < R.BAR0_SIZE:
            raise ValueError(f"BAR0 offset {offset:#x} is outside [0, {R.BAR0_SIZE:#x})")
        return 0 if offset & 3 or offset not in R.REGISTERS else self.regs[offset >> 2]

    # --- the cable ----------------------------------------------------------------------------

    def receive(self, frame: bytes) -> None:
        """A frame arrives from the cable (FCS included); DMA'd before this returns if it can."""
        ev = self.engine.receive(frame)
        if ev:
            self._service(ev)

    def transmitted(self) -> list[bytes]:
        """Frames put on the cable since the last call, FCS included (when no sink is attached)."""
        return self.engine.take_transmitted()

    def attach(self, sink: Callable[[bytes], bool] | None) -> None:
        """Send transmitted frames to `sink(frame) -> bool`; False keeps the frame in the TX
        packet buffer until tx_ready(). None: collect them for transmitted()."""
        self.engine.sink = sink

    def tx_ready(self) -> None:
        """The cable can take frames again: send what waits in the TX packet buffer."""
        ev = self.engine.tx_resume()
        if ev:
            self._service(ev)
        if self._peer is not None:
            self._peer._service_events()

    def connect(self, peer: "Nic") -> None:
        """Join this device and `peer` back to back in-process: frames go engine to engine."""
        if peer is self:
            raise ValueError("a Nic cannot be connected to itself")
        self.disconnect()
        peer.disconnect()
        self.engine.link(peer.engine)
        peer.engine.link(self.engine)
        self._peer = peer
        peer._peer = self

    def disconnect(self) -> None:
        """Undo connect() on both ends: frames go to the sink (or transmitted()) again."""
        peer = self._peer
        if peer is None:
            return
        self.engine.link(None)
        peer.engine.link(None)
        self._peer = peer._peer = None

    def set_link(self, up: bool) -> None:
        """Cable plugged (True) or unplugged: STATUS.LU follows, and a change raises ICR.LSC.

        This is what the PHY reports to software; carrying frames is the cable's business
        (the emulator's cables stop delivering when they are cut)."""
        up = bool(up)
        if up == self.link_up:
            return
        self.link_up = up
        status = self.regs[_STATUS] & ~_LU
        self.regs[_STATUS] = status | _LU if up else status
        self.regs[_ICR] |= _LSC
        self._update_irq()

    # --- whole-device operations ------------------------------------------------------------

    def reset(self) -> None:
        """Device reset, as CTRL.RST or vfio-user DEVICE_RESET: every register to its reset
        value, RAL0/RAH0 reloaded from the EEPROM, packet buffers emptied, timers cancelled,
        line lowered. PCI configuration space is kept, as Linux's pci_reset_function saves and
        restores it around a function reset (bus mastering stays as software left it)."""
        self._reset_device()

    @property
    def mac(self) -> str:
        """The EEPROM's MAC address as 'aa:bb:cc:dd:ee:ff'."""
        return format_mac(self.eeprom.mac)

    @property
    def dma_errors(self) -> int:
        """DMA accesses the engine refused because they fell outside mapped memory."""
        return self.engine.dma_errors

    # --- timers -------------------------------------------------------------------------------

    def next_deadline(self) -> int | None:
        """Clock ns of the earliest pending timer (delay timers, ITR hold-off), or None."""
        return self._deadline

    def _timers_changed(self) -> None:
        """Recompute the earliest deadline; called wherever a timer is armed, moved or
        cancelled (a cancel while none runs needs no call: the earliest is None already)."""
        due = None
        for t in (self._rdtr_at, self._radv_at, self._tidv_at, self._tadv_at, self._itr_at, self._tx_more_at):
            if t is not None and (due is None or t < due):
                due = t
        self._deadline = due

    def run_timers(self) -> None:
        """Fire the timers that are due by the clock (and continue a TX walk that ran out of
        budget: it is due at once)."""
        now = self.clock()
        if _due(self._tx_more_at, now):
            self._tx_more_at = None
            self._timers_changed()
            self._walk_tx()
        causes = 0
        if _due(self._rdtr_at, now) or _due(self._radv_at, now):
            self._rdtr_at = self._radv_at = None
            causes |= _RXT0
        if _due(self._tidv_at, now) or _due(self._tadv_at, now):
            self._tidv_at = self._tadv_at = None
            causes |= _TXDW
        if causes:
            self._timers_changed()
            self.regs[_ICR] |= causes
            self._update_irq()
        elif _due(self._itr_at, now):
            self._update_irq()

    # --- internals: reset ---------------------------------------------------------------------

    def _reset_device(self) -> None:
        regs = self.regs
        memoryview(regs).cast("B")[:] = _ZERO_BAR0  # in place: the engine holds a view of it
        for i, value in _RESET_VALUES:
            regs[i] = value
        regs[_PBA] = self.pba_reset
        if self.link_up:
            regs[_STATUS] |= _LU
        ral, rah = self.eeprom.receive_address()
        regs[R.RAL(0) >> 2] = ral
        regs[R.RAH(0) >> 2] = rah
        self.engine.reset()
        self._rdtr_at = self._radv_at = self._tidv_at = self._tadv_at = self._itr_at = None
        self._tx_more_at = None
        self._deadline = None
        self._last_irq_at = None
        if self.irq:
            self._set_line(False)

    # --- internals: interrupts ------------------------------------------------------------------

    def _service(self, ev: int) -> None:
        """Act on an engine event word: start delay timers, raise causes, update the line."""
        if ev & _EV_RX_DONE:
            self._rx_done()
        if ev & _EV_TX_IDE:
            self._tx_ide()
        if ev & _EV_TX_MORE and self._tx_more_at is None:
            self._tx_more_at = self.clock()  # due now: walk again at the next run_timers()
            self._timers_changed()
        causes = ev & _M32
        if causes:
            self.regs[_ICR] |= causes
        if tracepoint.enabled:
            tracepoint.emit("dev.icr.cause", ICR=hex(self.regs[_ICR]), IMS=hex(self.regs[_IMS]))
        self._update_irq()

    def _service_events(self) -> None:
        """Take the events that frames from a linked peer raised in our engine."""
        ev = self.engine.take_events()
        if ev:
            self._service(ev)

    def _rx_done(self) -> None:
        """A frame reached the RX ring (SDM "Receive Interrupt Delay Timer / Packet Timer" and
        "Receive Interrupt Absolute Delay Timer"): RXT0 at once with RDTR = 0; otherwise
        (re)start the packet timer and, if not running, the absolute one."""
        regs = self.regs
        rdtr = regs[_RDTR] & R.DELAY_TIMER
        if not rdtr:
            self._rdtr_at = self._radv_at = None
            regs[_ICR] |= _RXT0
            if self._deadline is not None:
                self._timers_changed()
            return
        now = self.clock()
        self._rdtr_at = now + rdtr * R.DELAY_UNIT_NS
        if self._radv_at is None:
            radv = regs[_RADV] & R.DELAY_TIMER
            if radv:
                self._radv_at = now + radv * R.DELAY_UNIT_NS
        self._timers_changed()

    def _tx_ide(self) -> None:
        """An RS|IDE descriptor was written back (SDM "Transmit Interrupts", "Transmit Interrupt
        Delay Value"): the same with TIDV (restarted by each) and TADV (from the first) -> TXDW."""
        regs = self.regs
        tidv = regs[_TIDV] & R.DELAY_TIMER
        if not tidv:
            self._tidv_at = self._tadv_at = None
            regs[_ICR] |= _TXDW
            if self._deadline is not None:
                self._timers_changed()
            return
        now = self.clock()
        self._tidv_at = now + tidv * R.DELAY_UNIT_NS
        if self._tadv_at is None:
            tadv = regs[_TADV] & R.DELAY_TIMER
            if tadv:
                self._tadv_at = now + tadv * R.DELAY_UNIT_NS
        self._timers_changed()

    def _update_irq(self, resignal: bool = False) -> None:
        """Drive the line from (ICR & IMS), holding a rising edge off for ITR (SDM "Interrupt
        Throttling")."""
        regs = self.regs
        if not regs[_ICR] & regs[_IMS]:
            if self._itr_at is not None:
                self._itr_at = None
                self._timers_changed()
            if self.irq:
                self._set_line(False)
            return
        if self.irq:
            if resignal and self.on_irq is not None:
                self.on_irq(True)
            return
        now = self.clock()
        interval = regs[_ITR] & R.ITR_INTERVAL
        if interval and self._last_irq_at is not None:
            allowed = self._last_irq_at + interval * R.ITR_UNIT_NS
            if now < allowed:
                if self._itr_at != allowed:
                    self._itr_at = allowed  # run_timers() signals it then
                    self._timers_changed()
                return
        if self._itr_at is not None:
            self._itr_at = None
            self._timers_changed()
        self._last_irq_at = now
        self._set_line(True)

    def _set_line(self, level: bool) -> None:
        self.irq = level
        if tracepoint.enabled and level:
            tracepoint.emit("dev.irq.raise", ICR=hex(self.regs[_ICR]), IMS=hex(self.regs[_IMS]))
        self.pci.set_interrupt_status(level)
        if self.on_irq is not None:
            self.on_irq(level)

    # --- read handlers (one per behavior; `None` in the table is a plain read) -----------------

    def _read_undecoded(self, i: int) -> int:
        return 0

    def _read_write_only(self, i: int) -> int:
        """ICS, IMC are write-only (SDM "Interrupt Cause Set Register", "Interrupt Mask Clear
        Register"): reads return 0."""
        return 0

    def _read_icr(self, i: int) -> int:
        """ICR (SDM "Interrupt Cause Read Register"): return the pending causes, clearing them."""
        regs = self.regs
        value = regs[i]
        if tracepoint.enabled and value:
            tracepoint.emit("dev.icr.read", ICR=hex(value))
        if value:
            regs[i] = 0
            self._update_irq(resignal=True)
        return value

    def _read_clear_on_read(self, i: int) -> int:
        """Statistics (SDM "Statistics Registers"): the count, which reading clears."""
        regs = self.regs
        value = regs[i]
        regs[i] = 0
        return value

    def _read_stat_high(self, i: int) -> int:
        """High dword of a 64-bit statistic (GORCH, GOTCH, TORH, TOTH): reading it clears the
        pair, so software reads low then high."""
        regs = self.regs
        value = regs[i]
        regs[i] = 0
        regs[i - 1] = 0
        return value

    # --- write handlers (one per behavior; `None` in the table is a plain store) ---------------

    def _write_ignored(self, i: int, value: int) -> None:
        """Undecoded offsets and read-only registers (STATUS, EECD, statistics)."""

    def _write_ctrl(self, i: int, value: int) -> None:
        """CTRL (SDM "Device Control Register"): RST resets the whole device and reads 0 again
        (self-clearing)."""
        if value & _CTRL_RST:
            self._reset_device()
        else:
            self.regs[i] = value

    def _write_eerd(self, i: int, value: int) -> None:
        """EERD (SDM "EEPROM Read Register"): START reads the word at bits 15:8; DONE and the data
        follow at once."""
        self.regs[i] = self.eeprom.eerd(value)

    def _write_mdic(self, i: int, value: int) -> None:
        """MDIC (SDM "MDI Control Register"): no PHY is modeled; the access completes at once with
        ERROR set and data 0, so a driver polling READY never hangs."""
        self.regs[i] = (value & _MDIC_KEEP) | _MDIC_DONE

    def _write_icr(self, i: int, value: int) -> None:
        """ICR: writing 1s clears those causes."""
        self.regs[i] &= ~value & _M32
        self._update_irq()

    def _write_ics(self, i: int, value: int) -> None:
        """ICS (SDM "Interrupt Cause Set Register"): writing 1s sets those causes in ICR (software
        interrupts)."""
        self.regs[_ICR] |= value & _ICR_VALID
        self._update_irq()

    def _write_ims(self, i: int, value: int) -> None:
        """IMS (SDM "Interrupt Mask Set/Read Register"): writing 1s enables those causes."""
        self.regs[i] |= value & _ICR_VALID
        self._update_irq(resignal=True)

    def _write_imc(self, i: int, value: int) -> None:
        """IMC (SDM "Interrupt Mask Clear Register"): writing 1s disables those causes."""
        self.regs[_IMS] &= ~value & _M32
        self._update_irq()

    def _write_itr(self, i: int, value: int) -> None:
        """ITR (SDM "Interrupt Throttling Register"): minimum gap between interrupts, bits 15:0 in
        256 ns units."""
        self.regs[i] = value & R.ITR_INTERVAL
        self._update_irq()  # a held-off interrupt now waits for the new gap (or none)

    def _write_rctl(self, i: int, value: int) -> None:
        """RCTL (SDM "Receive Control Register"): with EN set, frames waiting in the RX packet
        buffer go to the ring."""
        self.regs[i] = value
        if value & _RCTL_EN:
            ev = self.engine.drain_rx()
            if ev:
                self._service(ev)

    def _write_tctl(self, i: int, value: int) -> None:
        """TCTL (SDM "Transmit Control Register"): with EN set, what the ring holds from TDH to TDT
        is sent."""
        self.regs[i] = value
        if value & _TCTL_EN:
            self._transmit()

    def _write_ring_base(self, i: int, value: int) -> None:
        """RDBAL/TDBAL (SDM "Receive/Transmit Descriptor Base Address Low"): descriptors are 16-byte
        aligned; bits 3:0 read 0."""
        self.regs[i] = value & R.RING_BASE_MASK

    def _write_ring_len(self, i: int, value: int) -> None:
        """RDLEN/TDLEN (SDM "Receive/Transmit Descriptor Length"): bits 19:7, a multiple of 128
        bytes; the rest read 0, so a misprogrammed length becomes a valid (maybe empty) ring."""
        self.regs[i] = value & R.RING_LEN_MASK

    def _write_head(self, i: int, value: int) -> None:
        """RDH/TDH (SDM "Receive/Transmit Descriptor Head"): 16-bit descriptor index."""
        self.regs[i] = value & R.RING_INDEX_MASK

    def _write_rdt(self, i: int, value: int) -> None:
        """RDT (SDM "Receive Descriptor Tail"): new buffers up to RDT - 1; frames waiting in the RX
        packet buffer are DMA'd into them before this returns."""
        self.regs[i] = value & R.RING_INDEX_MASK
        ev = self.engine.drain_rx()
        if ev:
            self._service(ev)

    def _write_tdt(self, i: int, value: int) -> None:
        """TDT (SDM "Transmit Descriptor Tail"): the doorbell. Descriptors from TDH to TDT are sent
        before this returns (when TCTL.EN), up to TX_BUDGET of them; the rest at run_timers()."""
        self.regs[i] = value & R.RING_INDEX_MASK
        if tracepoint.enabled:
            tracepoint.emit("dev.tdt.doorbell", TDT=self.regs[i], TDH=self.regs[i - 2])
        self._transmit()

    def _write_rdtr(self, i: int, value: int) -> None:
        """RDTR (SDM "Receive Delay Timer Register"): delay bits 15:0 in 1.024 us units; FPD (bit
        31, self-clearing) ends a running delay and raises RXT0 now."""
        self.regs[i] = value & R.DELAY_TIMER
        if value & R.DELAY_FPD and (self._rdtr_at is not None or self._radv_at is not None):
            self._rdtr_at = self._radv_at = None
            self._timers_changed()
            self.regs[_ICR] |= _RXT0
            self._update_irq()

    def _write_tidv(self, i: int, value: int) -> None:
        """TIDV (SDM "Transmit Interrupt Delay Value"): as RDTR, for TXDW."""
        self.regs[i] = value & R.DELAY_TIMER
        if value & R.DELAY_FPD and (self._tidv_at is not None or self._tadv_at is not None):
            self._tidv_at = self._tadv_at = None
            self._timers_changed()
            self.regs[_ICR] |= _TXDW
            self._update_irq()

    def _write_delay(self, i: int, value: int) -> None:
        """RADV/TADV (SDM "Receive Interrupt Absolute Delay Timer", "Transmit Absolute Interrupt
        Delay Value"): absolute delay, bits 15:0 in 1.024 us units."""
        self.regs[i] = value & R.DELAY_TIMER

    def _write_rah(self, i: int, value: int) -> None:
        """RAH (SDM "Receive Address High"): AV (bit 31), AS (17:16), MAC bytes 4..5 (15:0); the
        rest read 0."""
        self.regs[i] = value & R.RAH_MASK

    def _transmit(self) -> None:
        """A doorbell (TDT, TCTL.EN, bus mastering on): walk the TX ring now, unless a walk that
        ran out of budget is pending; that one goes on to the new TDT at run_timers()."""
        if self._tx_more_at is None:
            self._walk_tx()

    def _walk_tx(self) -> None:
        ev = self.engine.transmit()
        if ev:
            self._service(ev)
        if self._peer is not None:
            self._peer._service_events()  # the frames we sent raised events in the peer


def _due(deadline: int | None, now: int) -> bool:
    return deadline is not None and now >= deadline


# --- dispatch tables, built once from nicemu.regs.REGISTERS --------------------------------------

_READ_KINDS = {
    R.READ_PLAIN: None,
    R.READ_STAT_LOW: None,
    R.READ_WRITE_ONLY: Nic._read_write_only,
    R.READ_ICR: Nic._read_icr,
    R.READ_CLEAR: Nic._read_clear_on_read,
    R.READ_STAT_HIGH: Nic._read_stat_high,
}
_WRITE_KINDS = {
    R.WRITE_PLAIN: None,
    R.WRITE_READ_ONLY: Nic._write_ignored,
    R.WRITE_CTRL: Nic._write_ctrl,
    R.WRITE_EERD: Nic._write_eerd,
    R.WRITE_MDIC: Nic._write_mdic,
    R.WRITE_ICR: Nic._write_icr,
    R.WRITE_ICS: Nic._write_ics,
    R.WRITE_IMS: Nic._write_ims,
    R.WRITE_IMC: Nic._write_imc,
    R.WRITE_ITR: Nic._write_itr,
    R.WRITE_RCTL: Nic._write_rctl,
    R.WRITE_TCTL: Nic._write_tctl,
    R.WRITE_RING_BASE: Nic._write_ring_base,
    R.WRITE_RING_LEN: Nic._write_ring_len,
    R.WRITE_HEAD: Nic._write_head,
    R.WRITE_RDT: Nic._write_rdt,
    R.WRITE_TDT: Nic._write_tdt,
    R.WRITE_RDTR: Nic._write_rdtr,
    R.WRITE_TIDV: Nic._write_tidv,
    R.WRITE_DELAY: Nic._write_delay,
    R.WRITE_RAH: Nic._write_rah,
}


def _dispatch_tables() -> tuple[list, list]:
    read = [Nic._read_undecoded] * R.NREGS
    write = [Nic._write_ignored] * R.NREGS
    for off, reg in R.REGISTERS.items():
        read[off >> 2] = _READ_KINDS[reg.read]
        write[off >> 2] = _WRITE_KINDS[reg.write]
    return read, write


_READ, _WRITE = _dispatch_tables()
# Tail registers whose superseded doorbells write_tail() may skip: tail word -> (ring length
# word, head word, the ICR cause a walk to an earlier tail could raise on its own).
_TAIL_RULES = {
    R.TDT >> 2: (R.TDLEN >> 2, R.TDH >> 2, int(R.Icr.TXQE)),
    R.RDT >> 2: (R.RDLEN >> 2, R.RDH >> 2, int(R.Icr.RXDMT0)),
}
_RESET_VALUES = [(off >> 2, reg.reset) for off, reg in R.REGISTERS.items() if reg.reset]
_ZERO_BAR0 = bytes(R.BAR0_SIZE)
