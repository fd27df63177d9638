"""82540EM register offsets, bit definitions and descriptor layouts, named as the SDM names them.

Everything here is a fact from docs/reference/e1000-subset.md (Intel 8254x SDM); the
device (nicemu.nic, the datapaths) and the driver (driver/) both import it, so the two sides
can never disagree about a bit.
"""
from __future__ import annotations

import enum
import struct
from typing import NamedTuple

BAR0_SIZE = 0x20000  # 128 KiB of MMIO
NREGS = BAR0_SIZE // 4

# --- register offsets (BAR0) --------------------------------------------------------------
CTRL = 0x0000
STATUS = 0x0008
EECD = 0x0010
EERD = 0x0014
CTRL_EXT = 0x0018
MDIC = 0x0020
ICR = 0x00C0
ITR = 0x00C4
ICS = 0x00C8
IMS = 0x00D0
IMC = 0x00D8
RCTL = 0x0100
TCTL = 0x0400
TIPG = 0x0410
PBA = 0x1000
RDBAL = 0x2800
RDBAH = 0x2804
RDLEN = 0x2808
RDH = 0x2810
RDT = 0x2818
RDTR = 0x2820
RADV = 0x282C
TDBAL = 0x3800
TDBAH = 0x3804
TDLEN = 0x3808
TDH = 0x3810
TDT = 0x3818
TIDV = 0x3820
TADV = 0x382C
RXCSUM = 0x5000
MTA = 0x5200  # 128 dwords, 0x5200..0x53FC
MTA_WORDS = 128
RA = 0x5400  # RAL[n] = RA + 8n, RAH[n] = RA + 8n + 4, n = 0..15
RA_ENTRIES = 16


def RAL(n: int) -> int:
    return RA + 8 * n


def RAH(n: int) -> int:
    return RA + 8 * n + 4


# --- statistics (clear on read, saturating) -----------------------------------------------
CRCERRS = 0x4000
ALGNERRC = 0x4004
SYMERRS = 0x4008
RXERRC = 0x400C
MPC = 0x4010
COLC = 0x4028
PRC64 = 0x405C
PRC127 = 0x4060
PRC255 = 0x4064
PRC511 = 0x4068
PRC1023 = 0x406C
PRC1522 = 0x4070
GPRC = 0x4074
BPRC = 0x4078
MPRC = 0x407C
GPTC = 0x4080
GORCL = 0x4088
GORCH = 0x408C
GOTCL = 0x4090
GOTCH = 0x4094
RNBC = 0x40A0
RUC = 0x40A4
RFC = 0x40A8
ROC = 0x40AC
RJC = 0x40B0
TORL = 0x40C0
TORH = 0x40C4
TOTL = 0x40C8
TOTH = 0x40CC
TPR = 0x40D0
TPT = 0x40D4
PTC64 = 0x40D8
PTC127 = 0x40DC
PTC255 = 0x40E0
PTC511 = 0x40E4
PTC1023 = 0x40E8
PTC1522 = 0x40EC
MPTC = 0x40F0
BPTC = 0x40F4

STATS_32 = {
    "CRCERRS": CRCERRS, "ALGNERRC": ALGNERRC, "SYMERRS": SYMERRS, "RXERRC": RXERRC, "MPC": MPC,
    "COLC": COLC, "PRC64": PRC64, "PRC127": PRC127, "PRC255": PRC255, "PRC511": PRC511,
    "PRC1023": PRC1023, "PRC1522": PRC1522, "GPRC": GPRC, "BPRC": BPRC, "MPRC": MPRC,
    "GPTC": GPTC, "RNBC": RNBC, "RUC": RUC, "RFC": RFC, "ROC": ROC, "RJC": RJC, "TPR": TPR,
    "TPT": TPT, "PTC64": PTC64, "PTC127": PTC127, "PTC255": PTC255, "PTC511": PTC511,
    "PTC1023": PTC1023, "PTC1522": PTC1522, "MPTC": MPTC, "BPTC": BPTC,
}
# 64-bit pairs: (low, high); reading the high dword clears the pair.
STATS_64 = {"GORC": (GORCL, GORCH), "GOTC": (GOTCL, GOTCH), "TOR": (TORL, TORH), "TOT": (TOTL, TOTH)}


# --- bits -----------------------------------------------------------------------------------
class Ctrl(enum.IntFlag):
    FD = 0x1
    LRST = 0x8
    ASDE = 0x20
    SLU = 0x40
    SPEED_1000 = 0x200
    SPEED = 0x300
    RST = 0x04000000
    VME = 0x40000000
    PHY_RST = 0x80000000


class Status(enum.IntFlag):
    FD = 0x1
    LU = 0x2
    TXOFF = 0x10
    SPEED_1000 = 0x80
    SPEED = 0xC0


class Eerd(enum.IntFlag):
    START = 0x1
    DONE = 0x10
    ADDR_SHIFT = 8
    DATA_SHIFT = 16


class Icr(enum.IntFlag):
    """Interrupt causes; ICR, ICS, IMS and IMC share these bits."""

    TXDW = 0x01
    TXQE = 0x02
    LSC = 0x04
    RXSEQ = 0x08
    RXDMT0 = 0x10
    RXO = 0x40
    RXT0 = 0x80
    TXD_LOW = 0x8000


ICR_VALID = int(Icr.TXDW | Icr.TXQE | Icr.LSC | Icr.RXSEQ | Icr.RXDMT0 | Icr.RXO | Icr.RXT0 | Icr.TXD_LOW)


class Rctl(enum.IntFlag):
    EN = 0x2
    SBP = 0x4
    UPE = 0x8
    MPE = 0x10
    LPE = 0x20
    LBM = 0xC0
    RDMTS = 0x300
    MO = 0x3000
    BAM = 0x8000
    BSIZE = 0x30000
    VFE = 0x40000
    BSEX = 0x02000000
    SECRC = 0x04000000


RCTL_RDMTS_SHIFT = 8
RCTL_MO_SHIFT = 12
RCTL_BSIZE_SHIFT = 16


_RX_BUFFER_SIZES = (2048, 1024, 512, 256)  # RCTL.BSIZE 00..11 with BSEX = 0
_RX_BUFFER_SIZES_BSEX = (2048, 16384, 8192, 4096)  # with BSEX = 1 (00 is reserved: 2048)


def rx_buffer_size(rctl: int) -> int:
    """Receive buffer size from RCTL.BSIZE/BSEX (SDM 13.4.22). Plain ints: the data path calls
    this per frame."""
    bsize = (rctl >> RCTL_BSIZE_SHIFT) & 3
    if rctl & 0x02000000:  # Rctl.BSEX
        return _RX_BUFFER_SIZES_BSEX[bsize]
    return _RX_BUFFER_SIZES[bsize]


class Tctl(enum.IntFlag):
    EN = 0x2
    PSP = 0x8
    CT = 0xFF0
    COLD = 0x3FF000


class Rah(enum.IntFlag):
    AV = 0x80000000


class Rxcsum(enum.IntFlag):
    IPOFL = 0x100
    TUOFL = 0x200


PBA_DEFAULT = 0x00100030  # 48 KB RX, 16 KB TX


# --- PCI ----------------------------------------------------------------------------------
PCI_VENDOR_ID = 0x8086
PCI_DEVICE_ID = 0x100E
PCI_CLASS_ETHERNET = 0x020000


class PciCommand(enum.IntFlag):
    MEMORY = 0x2
    MASTER = 0x4


# --- descriptors (16 bytes, little-endian) ------------------------------------------------
DESC_SIZE = 16

# RX legacy: addr u64, length u16, csum u16, status u8, errors u8, special u16
RX_DESC = struct.Struct("<QHHBBH")
RXD_ADDR = 0
RXD_LENGTH = 8
RXD_CSUM = 10
RXD_STATUS = 12
RXD_ERRORS = 13
RXD_SPECIAL = 14


class RxdStatus(enum.IntFlag):
    DD = 0x01
    EOP = 0x02
    IXSM = 0x04
    VP = 0x08
    TCPCS = 0x20
    IPCS = 0x40


class RxdErrors(enum.IntFlag):
    CE = 0x01
    SE = 0x02
    SEQ = 0x04
    CXE = 0x10
    TCPE = 0x20
    IPE = 0x40
    RXE = 0x80


# TX legacy: addr u64, length u16, cso u8, cmd u8, sta u8 (low nibble), css u8, special u16
TX_DESC = struct.Struct("<QHBBBBH")
TXD_ADDR = 0
TXD_LENGTH = 8
TXD_CSO = 10
TXD_CMD = 11
TXD_STA = 12
TXD_CSS = 13
TXD_SPECIAL = 14


class TxdCmd(enum.IntFlag):
    EOP = 0x01
    IFCS = 0x02
    IC = 0x04
    RS = 0x08
    RPS = 0x10
    DEXT = 0x20
    VLE = 0x40
    IDE = 0x80


class TxdSta(enum.IntFlag):
    DD = 0x1
    EC = 0x2
    LC = 0x4
    TU = 0x8


# --- frame sizes ----------------------------------------------------------------------------
ETH_ZLEN_FCS = 64  # minimum frame, FCS included
ETH_MAX_FCS = 1522  # maximum frame without LPE (VLAN tagged), FCS included
ETH_MAX_LPE = 16384  # with RCTL.LPE
FCS_LEN = 4


# --- Nic <-> datapath engine events (docs/architecture.md) -----------------------------------
# An engine call returns ICR cause bits to raise now, plus these bits above the ICR range: two
# start the Nic's delay timers, one asks it to continue a TX walk later.
EV_RX_DONE = 1 << 32  # a frame was written to the RX ring: RDTR/RADV -> RXT0
EV_TX_IDE = 1 << 33  # an RS|IDE TX descriptor was written back: TIDV/TADV -> TXDW
EV_TX_MORE = 1 << 34  # the walk fetched its budget of TX descriptors and more wait: walk again
EV_CAUSES = 0xFFFFFFFF  # the ICR part of an event word

# --- more register bits -------------------------------------------------------------------
CTRL_RESET = int(Ctrl.FD | Ctrl.SLU | Ctrl.SPEED_1000)  # power-on CTRL
STATUS_RESET = int(Status.FD | Status.SPEED_1000)  # power-on STATUS, plus LU while the cable is up


class Mdic(enum.IntFlag):
    """MDI control (SDM "MDI Control Register"). nicemu models no PHY: an access completes at once with ERROR."""

    DATA = 0xFFFF
    READY = 0x10000000
    INT_EN = 0x20000000
    ERROR = 0x40000000


ITR_INTERVAL = 0xFFFF  # ITR bits 15:0, in 256 ns units
ITR_UNIT_NS = 256
DELAY_TIMER = 0xFFFF  # RDTR/RADV/TIDV/TADV bits 15:0, in 1.024 us units
DELAY_UNIT_NS = 1024
DELAY_FPD = 0x80000000  # RDTR/TIDV bit 31: flush partial descriptor block (fire the timer now)
RING_LEN_MASK = 0x000FFF80  # RDLEN/TDLEN bits 19:7: a multiple of 128 bytes, at most 1 MiB
RING_BASE_MASK = 0xFFFFFFF0  # RDBAL/TDBAL: descriptors are 16-byte aligned, bits 3:0 read 0
RING_INDEX_MASK = 0xFFFF  # RDH/RDT/TDH/TDT: 16-bit descriptor indices
RAH_MASK = 0x8003FFFF  # RAH: AV, AS (17:16), MAC bytes 4..5 (15:0)
RAH_AS = 0x00030000

# --- EEPROM -------------------------------------------------------------------------------
EEPROM_WORDS = 64
EEPROM_CHECKSUM_WORD = 0x3F
EEPROM_CHECKSUM = 0xBABA  # the sum of words 0..0x3F
EEPROM_SUBSYSTEM_ID = 0x0B  # word offsets of the PCI identity the 8254x loads at power-on
EEPROM_SUBSYSTEM_VENDOR = 0x0C
EEPROM_DEVICE_ID = 0x0D
EEPROM_VENDOR_ID = 0x0E

PCI_SUBSYSTEM_VENDOR_ID = 0x8086
PCI_SUBSYSTEM_ID = 0x001E  # PRO/1000 MT Desktop Adapter, the usual 82540EM board


# --- the register table ---------------------------------------------------------------------
# One entry per register: offset -> Register(name, reset value, read kind, write kind), as in
# QEMU's e1000.c macreg_readops/macreg_writeops. The kinds name a behavior; nicemu.nic.Nic
# turns each kind into its handler once, at construction, so an access is one list lookup.
# Offsets not in the table read 0 and ignore writes (hardware leaves them undecoded).

# read kinds
READ_PLAIN = "plain"  # the register word
READ_WRITE_ONLY = "write_only"  # ICS, IMC: write-only, read 0
READ_ICR = "icr"  # return the pending causes and clear them
READ_CLEAR = "clear_on_read"  # 32-bit statistics
READ_STAT_LOW = "stat_low"  # low dword of a 64-bit statistic: plain
READ_STAT_HIGH = "stat_high"  # high dword: return it and clear the pair

# write kinds
WRITE_PLAIN = "plain"  # store the value
WRITE_READ_ONLY = "read_only"  # ignore (STATUS, statistics)
WRITE_CTRL = "ctrl"  # RST: self-clearing device reset
WRITE_EERD = "eerd"  # START: read the EEPROM word, DONE with data in 31:16
WRITE_MDIC = "mdic"  # no PHY: completes at once with READY | ERROR
WRITE_ICR = "icr"  # write 1s to clear causes
WRITE_ICS = "ics"  # write 1s to set causes
WRITE_IMS = "ims"  # write 1s to enable causes
WRITE_IMC = "imc"  # write 1s to disable causes
WRITE_ITR = "itr"  # throttle interval, bits 15:0
WRITE_RCTL = "rctl"  # store; with EN set, drain the RX packet buffer
WRITE_TCTL = "tctl"  # store; with EN set, transmit what the ring holds
WRITE_RING_BASE = "ring_base"  # RDBAL/TDBAL: bits 3:0 read 0
WRITE_RING_LEN = "ring_len"  # RDLEN/TDLEN: bits 19:7 only
WRITE_HEAD = "head"  # RDH/TDH: 16 bits
WRITE_RDT = "rdt"  # 16 bits; drain the RX packet buffer into the new descriptors
WRITE_TDT = "tdt"  # 16 bits; transmit up to the new tail
WRITE_RDTR = "rdtr"  # 16-bit delay; FPD fires a pending RXT0 now
WRITE_TIDV = "tidv"  # 16-bit delay; FPD fires a pending TXDW now
WRITE_DELAY = "delay"  # RADV/TADV: 16-bit delay
WRITE_RAH = "rah"  # AV, AS, MAC bytes 4..5


class Register(NamedTuple):
    """One row of REGISTERS."""

    name: str
    reset: int
    read: str
    write: str


def _register_table() -> dict[int, Register]:
    R = Register
    t = {
        CTRL: R("CTRL", CTRL_RESET, READ_PLAIN, WRITE_CTRL),
        STATUS: R("STATUS", STATUS_RESET, READ_PLAIN, WRITE_READ_ONLY),
        EECD: R("EECD", 0, READ_PLAIN, WRITE_READ_ONLY),
        EERD: R("EERD", 0, READ_PLAIN, WRITE_EERD),
        CTRL_EXT: R("CTRL_EXT", 0, READ_PLAIN, WRITE_PLAIN),
        MDIC: R("MDIC", 0, READ_PLAIN, WRITE_MDIC),
        ICR: R("ICR", 0, READ_ICR, WRITE_ICR),
        ITR: R("ITR", 0, READ_PLAIN, WRITE_ITR),
        ICS: R("ICS", 0, READ_WRITE_ONLY, WRITE_ICS),
        IMS: R("IMS", 0, READ_PLAIN, WRITE_IMS),
        IMC: R("IMC", 0, READ_WRITE_ONLY, WRITE_IMC),
        RCTL: R("RCTL", 0, READ_PLAIN, WRITE_RCTL),
        TCTL: R("TCTL", 0, READ_PLAIN, WRITE_TCTL),
        TIPG: R("TIPG", 0, READ_PLAIN, WRITE_PLAIN),
        PBA: R("PBA", PBA_DEFAULT, READ_PLAIN, WRITE_PLAIN),
        RDBAL: R("RDBAL", 0, READ_PLAIN, WRITE_RING_BASE),
        RDBAH: R("RDBAH", 0, READ_PLAIN, WRITE_PLAIN),
        RDLEN: R("RDLEN", 0, READ_PLAIN, WRITE_RING_LEN),
        RDH: R("RDH", 0, READ_PLAIN, WRITE_HEAD),
        RDT: R("RDT", 0, READ_PLAIN, WRITE_RDT),
        RDTR: R("RDTR", 0, READ_PLAIN, WRITE_RDTR),
        RADV: R("RADV", 0, READ_PLAIN, WRITE_DELAY),
        TDBAL: R("TDBAL", 0, READ_PLAIN, WRITE_RING_BASE),
        TDBAH: R("TDBAH", 0, READ_PLAIN, WRITE_PLAIN),
        TDLEN: R("TDLEN", 0, READ_PLAIN, WRITE_RING_LEN),
        TDH: R("TDH", 0, READ_PLAIN, WRITE_HEAD),
        TDT: R("TDT", 0, READ_PLAIN, WRITE_TDT),
        TIDV: R("TIDV", 0, READ_PLAIN, WRITE_TIDV),
        TADV: R("TADV", 0, READ_PLAIN, WRITE_DELAY),
        RXCSUM: R("RXCSUM", 0, READ_PLAIN, WRITE_PLAIN),
    }
    for i in range(MTA_WORDS):
        t[MTA + 4 * i] = R(f"MTA[{i}]", 0, READ_PLAIN, WRITE_PLAIN)
    for n in range(RA_ENTRIES):
        t[RAL(n)] = R(f"RAL[{n}]", 0, READ_PLAIN, WRITE_PLAIN)
        t[RAH(n)] = R(f"RAH[{n}]", 0, READ_PLAIN, WRITE_RAH)
    for name, off in STATS_32.items():
        t[off] = R(name, 0, READ_CLEAR, WRITE_READ_ONLY)
    for name, (low, high) in STATS_64.items():
        t[low] = R(name + "L", 0, READ_STAT_LOW, WRITE_READ_ONLY)
        t[high] = R(name + "H", 0, READ_STAT_HIGH, WRITE_READ_ONLY)
    return dict(sorted(t.items()))


REGISTERS: dict[int, Register] = _register_table()
REGISTER_NAMES: dict[int, str] = {off: r.name for off, r in REGISTERS.items()}
