# kstack.skbuff.skb_truesize_for in C, for the compiled paths that charge an skb they make
# (kstack/_txfast.pyx, kstack/_rxfast.pyx); each checks it against the Python one on import.

cdef inline Py_ssize_t kmalloc_size_roundup(Py_ssize_t n) noexcept nogil:
    """kstack.skbuff.kmalloc_size_roundup."""
    cdef Py_ssize_t b = 8
    if n > 8192:
        return (n + 4095) & ~4095
    if n <= 8:
        return 8
    if 64 < n <= 96:
        return 96
    if 128 < n <= 192:
        return 192
    while b < n:
        b <<= 1
    return b


cdef inline Py_ssize_t skb_truesize_for(Py_ssize_t size) noexcept nogil:
    """kstack.skbuff.skb_truesize_for: SKB_HEAD_ALIGN(size) in its kmalloc bucket + struct sk_buff."""
    return kmalloc_size_roundup(((size + 63) & ~63) + 320) + 256
