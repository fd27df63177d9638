/* Memory ordering and descriptor access for the poll-mode driver (driver/_pmd.pyx).
 *
 * The device writes a descriptor's other fields first and its status byte (DD) last, with a
 * release store. The driver must load the status with acquire semantics before it reads the
 * length or the buffer, or a compiler (or a weakly ordered CPU) may hoist those reads above
 * the DD check and see a half-written descriptor. In the other direction, every descriptor
 * the driver hands back must be visible before the doorbell (RDT/TDT) write that publishes it.
 * On x86 these are compiler barriers only; on arm64 they become ldar / dmb ish.
 *
 * The ordering primitives are the device model's own (one definition for both sides of the
 * bus); this header adds the PMD's names and the little-endian descriptor field accessors.
 */
#ifndef PMD_ATOMIC_H
#define PMD_ATOMIC_H

#include <stdint.h>
#include <string.h>

#include "../../nicemu/include/nicemu_atomic.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the PMD writes descriptors as host-order words: little-endian hosts only"
#endif

/* DD first: nothing else in a descriptor is valid before this load says so. */
static inline uint8_t pmd_load_acquire_u8(const uint8_t *p) { return nicemu_load_acquire_u8(p); }

/* Publish descriptor writes before the doorbell that tells the device about them. */
static inline void pmd_release_fence(void) { nicemu_fence_release(); }

/* Descriptor fields are little-endian; memcpy keeps the compiler honest about aliasing. */
static inline uint16_t pmd_get_u16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

static inline void pmd_put_u64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

#endif
