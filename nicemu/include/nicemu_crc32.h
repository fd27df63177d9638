/* CRC-32 (IEEE 802.3, the polynomial of zlib's crc32) for the Ethernet FCS.
 *
 * Two implementations, same results as zlib.crc32(data, crc):
 * - slicing-by-8: eight 256-entry tables (8 KiB, built once by nicemu_crc32_init), 8 bytes per
 *   step; portable, used for short tails and where the CPU lacks carry-less multiply;
 * - carry-less multiply folding (PCLMULQDQ, Intel's "Fast CRC Computation for Generic
 *   Polynomials Using PCLMULQDQ", 2009; the constants are the bit-reflected ones of that paper,
 *   as in Linux's crc32-pclmul and Chromium's zlib): 64 bytes per step, for buffers of 32 bytes
 *   or more on x86-64 CPUs that have it (checked once at run time).
 * zlib 1.2.x handles short buffers a byte at a time (over 100 ns for a 64-byte frame), which is
 * why the device does not call it; no library is needed.
 */
#ifndef NICEMU_CRC32_H
#define NICEMU_CRC32_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

static uint32_t nicemu_crc_table[8][256];
static int nicemu_crc_ready = 0;
static int nicemu_crc_clmul = 0;

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define NICEMU_HAVE_CLMUL 1

/* Fold `len` bytes (len >= 16, a multiple of 16) into the raw CRC register `crc` (not
 * inverted): returns the new raw register. From 64 bytes on, four 128-bit lanes are folded in
 * parallel and then into one; shorter buffers go straight to the one-lane loop. */
__attribute__((target("pclmul,sse4.1")))
static uint32_t nicemu_crc32_clmul(uint32_t crc, const uint8_t *buf, size_t len) {
    const __m128i k1k2 = _mm_set_epi64x(0x01c6e41596LL, 0x0154442bd4LL);
    const __m128i k3k4 = _mm_set_epi64x(0x00ccaa009eLL, 0x01751997d0LL);
    const __m128i k5k0 = _mm_set_epi64x(0, 0x0163cd6124LL);
    const __m128i poly = _mm_set_epi64x(0x01f7011641LL, 0x01db710641LL);
    __m128i x0, x1, x2, x3, x4, x5, x6, x7, x8, y5, y6, y7, y8;

    if (len < 64) {
        x1 = _mm_xor_si128(_mm_loadu_si128((const __m128i *)buf), _mm_cvtsi32_si128((int)crc));
        x0 = k3k4;
        buf += 16;
        len -= 16;
        goto one_lane;
    }
    x1 = _mm_loadu_si128((const __m128i *)(buf + 0x00));
    x2 = _mm_loadu_si128((const __m128i *)(buf + 0x10));
    x3 = _mm_loadu_si128((const __m128i *)(buf + 0x20));
    x4 = _mm_loadu_si128((const __m128i *)(buf + 0x30));
    x1 = _mm_xor_si128(x1, _mm_cvtsi32_si128((int)crc));
    x0 = k1k2;
    buf += 64;
    len -= 64;
    while (len >= 64) { /* four lanes in parallel */
        x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
        x6 = _mm_clmulepi64_si128(x2, x0, 0x00);
        x7 = _mm_clmulepi64_si128(x3, x0, 0x00);
        x8 = _mm_clmulepi64_si128(x4, x0, 0x00);
        x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
        x2 = _mm_clmulepi64_si128(x2, x0, 0x11);
        x3 = _mm_clmulepi64_si128(x3, x0, 0x11);
        x4 = _mm_clmulepi64_si128(x4, x0, 0x11);
        y5 = _mm_loadu_si128((const __m128i *)(buf + 0x00));
        y6 = _mm_loadu_si128((const __m128i *)(buf + 0x10));
        y7 = _mm_loadu_si128((const __m128i *)(buf + 0x20));
        y8 = _mm_loadu_si128((const __m128i *)(buf + 0x30));
        x1 = _mm_xor_si128(_mm_xor_si128(x1, x5), y5);
        x2 = _mm_xor_si128(_mm_xor_si128(x2, x6), y6);
        x3 = _mm_xor_si128(_mm_xor_si128(x3, x7), y7);
        x4 = _mm_xor_si128(_mm_xor_si128(x4, x8), y8);
        buf += 64;
        len -= 64;
    }
    /* fold the four lanes into one */
    x0 = k3k4;
    x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, x2), x5);
    x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, x3), x5);
    x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, x4), x5);
one_lane:
    while (len >= 16) {
        x2 = _mm_loadu_si128((const __m128i *)buf);
        x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
        x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
        x1 = _mm_xor_si128(_mm_xor_si128(x1, x2), x5);
        buf += 16;
        len -= 16;
    }
    /* 128 -> 64 bits */
    x2 = _mm_clmulepi64_si128(x1, x0, 0x10);
    x3 = _mm_setr_epi32(~0, 0, ~0, 0);
    x1 = _mm_srli_si128(x1, 8);
    x1 = _mm_xor_si128(x1, x2);
    x0 = k5k0;
    x2 = _mm_srli_si128(x1, 4);
    x1 = _mm_and_si128(x1, x3);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_xor_si128(x1, x2);
    /* Barrett reduction to 32 bits */
    x0 = poly;
    x2 = _mm_and_si128(x1, x3);
    x2 = _mm_clmulepi64_si128(x2, x0, 0x10);
    x2 = _mm_and_si128(x2, x3);
    x2 = _mm_clmulepi64_si128(x2, x0, 0x00);
    x1 = _mm_xor_si128(x1, x2);
    return (uint32_t)_mm_extract_epi32(x1, 1);
}
#endif

static void nicemu_crc32_init(void) {
    if (nicemu_crc_ready)
        return;
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ 0xEDB88320u : c >> 1;
        nicemu_crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = nicemu_crc_table[0][i];
        for (int t = 1; t < 8; t++) {
            c = nicemu_crc_table[0][c & 0xFF] ^ (c >> 8);
            nicemu_crc_table[t][i] = c;
        }
    }
#ifdef NICEMU_HAVE_CLMUL
    __builtin_cpu_init();
    nicemu_crc_clmul = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
#endif
    nicemu_crc_ready = 1;
}

/* Slicing-by-8 on the raw register (little-endian hosts). */
static inline uint32_t nicemu_crc32_slice8(uint32_t c, const uint8_t *p, size_t n) {
    while (n >= 8) {
        uint32_t lo, hi;
        memcpy(&lo, p, 4);
        memcpy(&hi, p + 4, 4);
        lo ^= c;
        c = nicemu_crc_table[7][lo & 0xFF] ^ nicemu_crc_table[6][(lo >> 8) & 0xFF] ^
            nicemu_crc_table[5][(lo >> 16) & 0xFF] ^ nicemu_crc_table[4][lo >> 24] ^
            nicemu_crc_table[3][hi & 0xFF] ^ nicemu_crc_table[2][(hi >> 8) & 0xFF] ^
            nicemu_crc_table[1][(hi >> 16) & 0xFF] ^ nicemu_crc_table[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n--)
        c = nicemu_crc_table[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c;
}

/* crc32(crc, p, n) with zlib's conventions (pass 0 to start). */
static inline uint32_t nicemu_crc32(uint32_t crc, const uint8_t *p, size_t n) {
    uint32_t c = ~crc;
#ifdef NICEMU_HAVE_CLMUL
    if (n >= 32 && nicemu_crc_clmul) {
        size_t chunk = n & ~(size_t)15;
        c = nicemu_crc32_clmul(c, p, chunk);
        p += chunk;
        n -= chunk;
    }
#endif
    return ~nicemu_crc32_slice8(c, p, n);
}

/* The portable path alone (tests compare both with zlib). */
static inline uint32_t nicemu_crc32_portable(uint32_t crc, const uint8_t *p, size_t n) {
    return ~nicemu_crc32_slice8(~crc, p, n);
}

#endif /* NICEMU_CRC32_H */
