/* A linear layer over GGUF Q8_0 weights kept 8-bit, for taskloom.ops.q8_linear.
 *
 * W [n, k] is held as int8 codes q [n, k] and a float32 scale per 32 weights s [n, k / 32]:
 * weight (v, c) is q[v, c] * s[v, c / 32], rounded once to bf16, exactly the value a bf16
 * model loaded from the same file holds (taskloom.models.gguf_weights dequantizes so). y =
 * x W^T for bf16 x: each product of two bf16 values is exact in float32, the sums are
 * float32 and each output is rounded once to bf16, as a bf16 GEMM computes them; only the
 * order of the sums differs.
 *
 * Threads split the n output columns. Each takes Q8_COLS weight rows at a time, dequantizes
 * them once into a bf16 block that stays in its L1/L2 cache, and runs every row of x over
 * that block, TILE_ROWS rows of x by TILE_COLS weight rows at a time in registers (AVX-512
 * BF16 dot products where the CPU has them: 32 products an instruction). W is read from
 * memory once a call, at half the bytes of bf16 weights: at the few rows of a decode step,
 * which are memory-bound, that halves the time.
 */
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define Q8_GROUP 32
#define Q8_COLS 32                 /* weight rows dequantized into a thread's block at once */
#define TILE_ROWS 4                /* rows of x in the register tile */
#define TILE_COLS 4                /* weight rows in the register tile */
#define PARALLEL_MIN_WORK 65536    /* weights below which one thread runs */

/* 1 where the dot products are AVX-512 BF16's, 0 where they are the scalar loop */
int q8_linear_vectorized(void) {
#if defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}

/* rows [v0, v0 + cols) of W as bf16 into blk [cols, k] */
static void dequantize_block(const int8_t *q, const float *s, int64_t k, int64_t v0,
                             int64_t cols, uint16_t *blk) {
    const int64_t groups = k / Q8_GROUP;
    for (int64_t v = 0; v < cols; v++) {
        const int8_t *qv = q + (v0 + v) * k;
        const float *sv = s + (v0 + v) * groups;
        uint16_t *o = blk + v * k;
#if defined(__AVX512BF16__)
        for (int64_t g = 0; g < groups; g++) {
            const __m512 sc = _mm512_set1_ps(sv[g]);
            const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                _mm_loadu_si128((const __m128i *)(qv + g * Q8_GROUP)))), sc);
            const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                _mm_loadu_si128((const __m128i *)(qv + g * Q8_GROUP + 16)))), sc);
            /* round to nearest even, as finite_float_to_bf16 */
            _mm512_storeu_si512(o + g * Q8_GROUP, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
#else
        for (int64_t c = 0; c < k; c++)
            o[c] = finite_float_to_bf16((float)qv[c] * sv[c / Q8_GROUP]);
#endif
    }
}

/* out[r * TILE_COLS + c] = x[r] . w[c] over k, for R rows of x (stride xs) and C rows of the
 * block w (stride k); R and C are constants where this is inlined */
static inline __attribute__((always_inline)) void dot_tile(
        const uint16_t *x, int64_t xs, const uint16_t *w, int64_t k, const int R, const int C,
        float *out) {
#if defined(__AVX512BF16__)
    __m512 acc[TILE_ROWS * TILE_COLS];
    for (int i = 0; i < R * C; i++)
        acc[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < k; g += Q8_GROUP) {
        __m512bh wv[TILE_COLS];
        for (int c = 0; c < C; c++)
            wv[c] = (__m512bh)_mm512_loadu_si512(w + c * k + g);
        for (int r = 0; r < R; r++) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + r * xs + g);
            for (int c = 0; c < C; c++)
                acc[r * C + c] = _mm512_dpbf16_ps(acc[r * C + c], xv, wv[c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++)
            out[r * TILE_COLS + c] = _mm512_reduce_add_ps(acc[r * C + c]);
#else
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            float part[16] = {0};
            for (int64_t j = 0; j < k; j++)
                part[j % 16] += bf16_to_float(x[r * xs + j]) * bf16_to_float(w[c * k + j]);
            float sum = 0.0f;
            for (int l = 0; l < 16; l++)
                sum += part[l];
            out[r * TILE_COLS + c] = sum;
        }
#endif
}

#define TILE(R, C) dot_tile(xr, xs, w, k, R, C, out)
#define TILE_C(R)                                                        \
    switch (cols) {                                                      \
        case 1: TILE(R, 1); break;                                       \
        case 2: TILE(R, 2); break;                                       \
        case 3: TILE(R, 3); break;                                       \
        default: TILE(R, 4); break;                                      \
    }

/* y [m, n] (bf16, row stride ys) = x [m, k] (bf16, row stride xs) times W^T, each output
 * rounded once to bf16 from its float32 sum. Returns 1 if k is not a multiple of 32, 2 if a
 * thread cannot allocate its block. */
int q8_linear_bf16(const uint16_t *x, int64_t xs, int64_t m, const int8_t *q, const float *s,
                   int64_t n, int64_t k, uint16_t *y, int64_t ys) {
    if (k % Q8_GROUP)
        return 1;
    int failed = 0;
    #pragma omp parallel if (n * k >= PARALLEL_MIN_WORK)
    {
        uint16_t *blk = aligned_alloc(64, sizeof(uint16_t) * (size_t)(Q8_COLS * k + 32));
        if (blk == NULL) {
            #pragma omp atomic write
            failed = 2;
        }
        #pragma omp for schedule(static)
        for (int64_t v0 = 0; v0 < n; v0 += Q8_COLS) {
            if (blk == NULL)
                continue;
            const int64_t v1 = v0 + Q8_COLS < n ? v0 + Q8_COLS : n;
            dequantize_block(q, s, k, v0, v1 - v0, blk);
            for (int64_t r0 = 0; r0 < m; r0 += TILE_ROWS) {
                const int64_t rows = m - r0 < TILE_ROWS ? m - r0 : TILE_ROWS;
                const uint16_t *xr = x + r0 * xs;
                for (int64_t c0 = v0; c0 < v1; c0 += TILE_COLS) {
                    const int64_t cols = v1 - c0 < TILE_COLS ? v1 - c0 : TILE_COLS;
                    const uint16_t *w = blk + (c0 - v0) * k;
                    float out[TILE_ROWS * TILE_COLS] = {0};
                    switch (rows) {
                        case 1: TILE_C(1) break;
                        case 2: TILE_C(2) break;
                        case 3: TILE_C(3) break;
                        default: TILE_C(4) break;
                    }
                    for (int64_t r = 0; r < rows; r++)
                        for (int64_t c = 0; c < cols; c++)
                            y[(r0 + r) * ys + c0 + c] = float_to_bf16(out[r * TILE_COLS + c]);
                }
            }
        }
        free(blk);
    }
    return failed;
}
