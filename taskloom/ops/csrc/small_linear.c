/* Linear layers for the few rows of a decode step's lm head, for taskloom.ops.small_linear:
 * y = x W^T for bf16 x [m, k], W [n, k] in bf16 or as GGUF Q8_0 kept 8-bit.
 *
 * At a few rows an lm head is a pass over the vocabulary matrix, bound by how fast it streams
 * from memory; torch's bf16 GEMM (oneDNN) streams it at a third of the speed a plain loop
 * does here. The loop takes one weight row at a time (threads split the rows), reads it once
 * for every row of x (TILE_ROWS rows of x at a time in registers), and multiplies with
 * AVX-512 BF16 dot products (32 products an instruction) where the CPU has them.
 *
 * Q8_0: codes q [n, k] int8 and a float32 scale per 32 weights s [n, k / 32]; weight (v, c)
 * is q[v, c] * s[v, c / 32], rounded once to bf16, exactly the value a bf16 model loaded
 * from the same file holds (taskloom.models.gguf_weights dequantizes so). Up to TILE_ROWS
 * rows of x each group of 32 is dequantized in registers as it is read; above, each weight
 * row is dequantized once into a buffer in L1 and read from there for every tile of x.
 *
 * Each product of two bf16 values is exact in float32, the sums are float32 and each output
 * is rounded once to bf16, as a bf16 GEMM computes them; only the order of the sums differs.
 */
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define Q8_GROUP 32
#define TILE_ROWS 4                /* rows of x whose sums a weight row's pass keeps */
#define PARALLEL_MIN_WORK 65536    /* weights below which one thread runs */

/* 1 where the dot products are AVX-512 BF16's, 0 where they are the scalar loop */
int small_linear_vectorized(void) {
#if defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX512BF16__)
/* 32 weights of a Q8_0 group as bf16 (rounded to nearest even, as finite_float_to_bf16) */
static inline __attribute__((always_inline)) __m512bh q8_group(const int8_t *qg, float scale) {
    const __m512 sc = _mm512_set1_ps(scale);
    const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
        _mm_loadu_si128((const __m128i *)qg))), sc);
    const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
        _mm_loadu_si128((const __m128i *)(qg + 16)))), sc);
    return _mm512_cvtne2ps_pbh(hi, lo);
}
#endif

/* out[r] = x[r] . w over k for R rows of x (stride xs; R a constant where this is inlined),
 * w one weight row: bf16 at wb, or (wb NULL) Q8_0 codes qv with scales sv */
static inline __attribute__((always_inline)) void row_dots(
        const uint16_t *x, int64_t xs, const uint16_t *wb, const int8_t *qv, const float *sv,
        int64_t k, const int R, float *out) {
#if defined(__AVX512BF16__)
    __m512 acc[TILE_ROWS];
    for (int r = 0; r < R; r++)
        acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < k / Q8_GROUP; g++) {
        const __m512bh w = wb != NULL ? (__m512bh)_mm512_loadu_si512(wb + g * Q8_GROUP)
                                      : q8_group(qv + g * Q8_GROUP, sv[g]);
        for (int r = 0; r < R; r++)
            acc[r] = _mm512_dpbf16_ps(
                acc[r], (__m512bh)_mm512_loadu_si512(x + r * xs + g * Q8_GROUP), w);
    }
    for (int r = 0; r < R; r++)
        out[r] = _mm512_reduce_add_ps(acc[r]);
#else
    for (int r = 0; r < R; r++) {
        float part[16] = {0};
        for (int64_t c = 0; c < k; c++) {
            const float w = wb != NULL ? bf16_to_float(wb[c])
                                       : round_bf16((float)qv[c] * sv[c / Q8_GROUP]);
            part[c % 16] += bf16_to_float(x[r * xs + c]) * w;
        }
        float sum = 0.0f;
        for (int l = 0; l < 16; l++)
            sum += part[l];
        out[r] = sum;
    }
#endif
}

#define DOTS(R) row_dots(x + r0 * xs, xs, wb, qv, sv, k, R, out)

/* y [m, n] (bf16, row stride ys) = x [m, k] (bf16, row stride xs) times W^T, W bf16 at w
 * (row stride ws) or, w NULL, Q8_0 codes q and scales s. Returns 1 if k is not a multiple
 * of 32, 2 if a thread cannot allocate its row buffer. */
static int linear_rows(const uint16_t *x, int64_t xs, int64_t m, const uint16_t *w,
                       int64_t ws, const int8_t *q, const float *s, int64_t n, int64_t k,
                       uint16_t *y, int64_t ys) {
    if (k % Q8_GROUP)
        return 1;
    const int64_t groups = k / Q8_GROUP;
    const int buffered = w == NULL && m > TILE_ROWS;   /* Q8_0 read more than once a row */
    int failed = 0;
    #pragma omp parallel if (n * k >= PARALLEL_MIN_WORK)
    {
        uint16_t *row = buffered ? aligned_alloc(64, sizeof(uint16_t) * (size_t)k) : NULL;
        if (buffered && row == NULL) {
            #pragma omp atomic write
            failed = 2;
        }
        #pragma omp for schedule(static)
        for (int64_t v = 0; v < n; v++) {
            if (buffered && row == NULL)
                continue;
            const int8_t *qv = q == NULL ? NULL : q + v * k;
            const float *sv = s == NULL ? NULL : s + v * groups;
            const uint16_t *wb = w == NULL ? NULL : w + v * ws;
            if (buffered) {
#if defined(__AVX512BF16__)
                for (int64_t g = 0; g < groups; g++)
                    _mm512_store_si512(row + g * Q8_GROUP,
                                       (__m512i)q8_group(qv + g * Q8_GROUP, sv[g]));
#else
                for (int64_t c = 0; c < k; c++)
                    row[c] = finite_float_to_bf16((float)qv[c] * sv[c / Q8_GROUP]);
#endif
                wb = row;
            }
            for (int64_t r0 = 0; r0 < m; r0 += TILE_ROWS) {
                float out[TILE_ROWS] = {0};
                switch (m - r0 < TILE_ROWS ? m - r0 : TILE_ROWS) {
                    case 1: DOTS(1); break;
                    case 2: DOTS(2); break;
                    case 3: DOTS(3); break;
                    default: DOTS(4); break;
                }
                for (int64_t r = 0; r < TILE_ROWS && r0 + r < m; r++)
                    y[(r0 + r) * ys + v] = float_to_bf16(out[r]);
            }
        }
        free(row);
    }
    return failed;
}

int bf16_linear_bf16(const uint16_t *x, int64_t xs, int64_t m, const uint16_t *w, int64_t ws,
                     int64_t n, int64_t k, uint16_t *y, int64_t ys) {
    return linear_rows(x, xs, m, w, ws, NULL, NULL, n, k, y, ys);
}

int q8_linear_bf16(const uint16_t *x, int64_t xs, int64_t m, const int8_t *q, const float *s,
                   int64_t n, int64_t k, uint16_t *y, int64_t ys) {
    return linear_rows(x, xs, m, NULL, 0, q, s, n, k, y, ys);
}
