"""The receiver's out-of-order queue, bounded (Linux's tcp_data_queue_ofo / out_of_order_queue).

Blocks are disjoint, sorted by offset from RCV.NXT, merged on insert; data already held wins
over a retransmitted copy (the bytes are the same from a correct peer). Memory is charged as
Linux charges truesize: the bytes plus an overhead per block, so a flood of one-byte segments
cannot make the block list long. Over the limit a segment is dropped (TcpExtTCPOFODrop).
"""
from __future__ import annotations

from kstack.tcp.seq import SEQ_MASK

__all__ = ["OfoQueue", "OFO_BLOCK_OVERHEAD"]

OFO_BLOCK_OVERHEAD = 256  # ours: the sk_buff head a block stands for


class OfoQueue:
    __slots__ = ("blocks", "bytes", "limit", "_stamp")

    def __init__(self, limit: int) -> None:
        self.blocks: list[list] = []  # [seq, bytearray, stamp], ascending from RCV.NXT
        self.bytes = 0  # data bytes held
        self.limit = limit
        self._stamp = 0

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def charge(self) -> int:
        return self.bytes + OFO_BLOCK_OVERHEAD * len(self.blocks)

    def insert(self, seq: int, data: bytes | memoryview, rcv_nxt: int) -> bool:
        """Hold `data` (which starts after RCV.NXT) at `seq`. False when the memory limit
        refuses it (nothing held changes)."""
        n = len(data)
        s = (seq - rcv_nxt) & SEQ_MASK
        e = s + n
        blocks = self.blocks
        self._stamp += 1
        # the common case: it extends the last block
        if blocks:
            last = blocks[-1]
            ls = (last[0] - rcv_nxt) & SEQ_MASK
            le = ls + len(last[1])
            if s == le:
                if self.charge + n > self.limit:
                    return False
                last[1] += data
                last[2] = self._stamp
                self.bytes += n
                return True
        # find the blocks that overlap or touch [s, e)
        first = len(blocks)
        lo, hi = s, e
        merge = []
        for i, b in enumerate(blocks):
            bs = (b[0] - rcv_nxt) & SEQ_MASK
            be = bs + len(b[1])
            if be < s:
                continue
            if bs > e:
                if first == len(blocks):
                    first = i
                break
            if first == len(blocks):
                first = i
            merge.append((bs, b))
            lo = min(lo, bs)
            hi = max(hi, be)
        held = sum(len(b[1]) for _, b in merge)
        added = (hi - lo) - held
        extra_blocks = 1 - len(merge)
        if added <= 0 and merge and len(merge) == 1 and merge[0][0] <= s and hi == merge[0][0] + len(merge[0][1]):
            merge[0][1][2] = self._stamp  # a duplicate: nothing new
            return True
        if self.charge + added + extra_blocks * OFO_BLOCK_OVERHEAD > self.limit:
            return False
        buf = bytearray(hi - lo)
        buf[s - lo:e - lo] = data
        for bs, b in merge:
            buf[bs - lo:bs - lo + len(b[1])] = b[1]
        blocks[first:first + len(merge)] = [[(rcv_nxt + lo) & SEQ_MASK, buf, self._stamp]]
        self.bytes += added
        return True

    def pop_ready(self, rcv_nxt: int) -> bytearray | None:
        """The bytes that now follow RCV.NXT, if the first block reaches it (trimmed of what
        is already received); blocks wholly below RCV.NXT are discarded."""
        blocks = self.blocks
        while blocks:
            b = blocks[0]
            off = (rcv_nxt - b[0]) & SEQ_MASK
            if off >= 0x80000000:
                return None  # the first block starts after RCV.NXT: a hole remains
            del blocks[0]
            self.bytes -= len(b[1])
            if off < len(b[1]):
                return b[1] if off == 0 else b[1][off:]
        return None

    def sack_blocks(self, n: int) -> tuple:
        """Up to n blocks, the most recently changed first (RFC 2018 4: "the first SACK block
        ... MUST specify the contiguous block of data containing the segment which triggered
        this ACK"; the rest repeat the most recently reported)."""
        if not self.blocks:
            return ()
        order = sorted(self.blocks, key=lambda b: -b[2])[:n]
        return tuple((b[0], (b[0] + len(b[1])) & SEQ_MASK) for b in order)

    def clear(self) -> None:
        self.blocks.clear()
        self.bytes = 0
