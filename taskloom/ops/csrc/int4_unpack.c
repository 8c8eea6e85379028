/* Unpacking of torch's packed int4 CPU weights into bf16, for taskloom.ops.int4_linear.
 *
 * torch's `_convert_weight_to_int4pack_for_cpu` stores a weight [N, K] of 4-bit codes in row
 * blocks of B rows (64 with AVX512, 32 with AVX2): per block, per input column k, B/2 bytes,
 * byte j holding row j in its low nibble and row B/2 + j in its high one. Each group of
 * `group` columns has a bf16 scale and zero per row (`sz` [K / group, N, 2]), and the weight
 * is `(q - 8) * scale + zero`.
 *
 * `int4_unpack_t` writes the transposed weight W^T [K, N] in bf16 for row blocks
 * [nb_begin, nb_end): for each column k a block's B rows come out as B contiguous values, so
 * the loop over them vectorizes. Each value is `q * s + (z - 8 s)` in float32, a product and
 * a sum each rounded (compile with -ffp-contract=off: no fused multiply-add), rounded once to
 * bf16 (nearest, ties to even), the same operations as the torch fallback performs.
 */
#include "bf16.h"

#define MAX_BLOCK 64

/* 256-bit vectors: 10% faster here than the 512-bit ones the library is compiled for */
__attribute__((target("prefer-vector-width=256")))
int int4_unpack_t(const uint8_t *packed, const uint16_t *sz, uint16_t *out, int64_t n,
                  int64_t k, int64_t group, int64_t block, int64_t nb_begin, int64_t nb_end) {
    if (block > MAX_BLOCK || block % 2 || k % group || n % block)
        return 1;
    const int64_t half = block / 2;
    for (int64_t nb = nb_begin; nb < nb_end; nb++) {
        const uint8_t *src = packed + nb * k * half;
        for (int64_t g = 0; g < k / group; g++) {
            float s[MAX_BLOCK], z[MAX_BLOCK];
            for (int64_t r = 0; r < block; r++) {
                const uint16_t *p = sz + (g * n + nb * block + r) * 2;
                s[r] = bf16_to_float(p[0]);
                z[r] = bf16_to_float(p[1]) - 8.0f * s[r];
            }
            for (int64_t c = g * group; c < (g + 1) * group; c++) {
                const uint8_t *b = src + c * half;
                uint16_t *o = out + c * n + nb * block;
                for (int64_t j = 0; j < half; j++) {
                    o[j] = finite_float_to_bf16((float)(b[j] & 15) * s[j] + z[j]);
                    o[half + j] =
                        finite_float_to_bf16((float)(b[j] >> 4) * s[half + j] + z[half + j]);
                }
            }
        }
    }
    return 0;
}
