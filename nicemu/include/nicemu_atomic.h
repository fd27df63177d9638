/* Memory ordering between the device model and the driver, as on a real bus.
 *
 * The device writes every other field of a descriptor first and the status byte (DD) last,
 * with a release store; a consumer reads the status byte with an acquire load before anything
 * else. On x86 both compile to plain moves plus a compiler barrier; on weaker machines they emit
 * the fences needed when the driver runs in another thread or process sharing the memory.
 */
#ifndef NICEMU_ATOMIC_H
#define NICEMU_ATOMIC_H

#include <stdint.h>

static inline void nicemu_store_release_u8(uint8_t *p, uint8_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

static inline uint8_t nicemu_load_acquire_u8(const uint8_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

static inline void nicemu_store_release_u32(uint32_t *p, uint32_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

static inline uint32_t nicemu_load_acquire_u32(const uint32_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

static inline void nicemu_fence_release(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }

static inline void nicemu_fence_acquire(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }

#endif /* NICEMU_ATOMIC_H */
