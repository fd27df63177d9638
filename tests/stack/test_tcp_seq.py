"""kstack.tcp.seq and isn: arithmetic modulo 2^32, RFC 6528 ISNs."""
from kstack.tcp.isn import IsnGenerator
from kstack.tcp.seq import SEQ_GEQ, SEQ_GT, SEQ_LEQ, SEQ_LT, seq_add, seq_in, seq_sub


def test_comparisons_wrap():
    assert SEQ_LT(0xFFFFFFF0, 0x10) and SEQ_GT(0x10, 0xFFFFFFF0)
    assert SEQ_LEQ(5, 5) and SEQ_GEQ(5, 5) and not SEQ_LT(5, 5)
    assert seq_add(0xFFFFFFFF, 2) == 1 and seq_sub(1, 0xFFFFFFFF) == 2 and seq_sub(0xFFFFFFFF, 1) == -2
    assert seq_in(0, 0xFFFFFFFE, 3) and not seq_in(3, 0xFFFFFFFE, 3)


def test_isn_keyed_per_stack_and_moves_with_the_clock():
    g = IsnGenerator(b"k" * 16)
    a, b = ("198.18.0.1", 1000), ("198.18.0.2", 80)
    assert g.isn(a, b, 0) != g.isn(b, a, 0)
    assert (g.isn(a, b, 4000 * 1000) - g.isn(a, b, 0)) & 0xFFFFFFFF == 1000  # 4 µs ticks
    assert IsnGenerator(b"j" * 16).isn(a, b, 0) != g.isn(a, b, 0)
