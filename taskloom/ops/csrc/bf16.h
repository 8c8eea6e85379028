/* bfloat16 <-> float32 as torch converts them (c10::BFloat16): widening is exact; narrowing
 * rounds to nearest, ties to even, and makes every NaN torch's quiet NaN 0x7FC0. */
#ifndef TASKLOOM_BF16_H
#define TASKLOOM_BF16_H

#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)(((u & 0x7FFFFFFFu) > 0x7F800000u) ? 0x7FC0u : rounded);
}

/* float_to_bf16 for finite values (weights), without the NaN select */
static inline uint16_t finite_float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* float -> bf16 -> float: a value rounded as a bf16 tensor would hold it */
static inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

#endif
