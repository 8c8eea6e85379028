/* Linear layers over 4-bit weights by integer dot products, for taskloom.ops.int4_vnni:
 * y = x W^T for bf16 x [m, k] and W [n, k] kept as 4-bit codes in groups of 32 along k,
 * w = code * scale + min.
 *
 * Weight layout: tiles of 16 rows (n % 16 == 0), one after another; in a tile, for each group
 * g and quarter t (0-3) of it, 64 bytes: row i's 4 bytes at 4 i, byte b holding the codes of
 * columns 32 g + 8 t + b (low nibble) and 32 g + 8 t + 4 + b (high nibble). Scales and mins
 * fp16, per tile [groups][16]: the 16 rows' values for group g side by side.
 *
 * So one 64-byte load holds 8 codes of each of 16 rows, in the 16 lanes of a vector, and one
 * group's products for 16 rows are integer multiply-adds (vpdpbusd: unsigned codes times
 * signed int8 activations, 64 products an instruction, with AVX-512 VNNI) against four bytes
 * of x broadcast to every lane; its sum is scaled once for the group, and the 16 lanes are the
 * 16 outputs in the end (no horizontal sums). For that each row of x is first quantized per
 * group of 32 to a 16-bit code in two int8 parts, hi and lo (see quantize_row): 16 multiply-
 * adds a group, 8 for each part, and 256 dot(hi) + dot(lo) is the group's integer sum. One
 * part, as llama.cpp's activations for its 4-bit files, would halve the products and move the
 * outputs by ~0.5% (taskloom.ops.int4_vnni says what that does to greedy outputs). A group's
 * sum is scale * xscale * sum_c code_c xq_c + min * sum_c x_c, the last with the group's
 * float32 sum of x itself.
 *
 * A tile (16 rows x k / 2 bytes) is read from memory once for every X_BLOCK rows of x and
 * from L1 for each TILE_ROWS of them; threads split the tiles. Only for CPUs with AVX-512
 * VNNI (Intel since Cascade Lake, AMD since Zen 4): elsewhere q4_linear_available() is 0 and
 * the caller keeps torch's int4 kernel and its layout.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define Q4_VNNI 1
#else
#define Q4_VNNI 0
#endif

#if !Q4_VNNI

int q4_linear_available(void) { return 0; }

int q4_linear_bf16(const uint16_t *x, int64_t xs, int64_t m, const uint8_t *codes,
                   const uint16_t *scales, const uint16_t *mins, int64_t n, int64_t k,
                   uint16_t *y, int64_t ys) {
    (void)x, (void)xs, (void)m, (void)codes, (void)scales, (void)mins, (void)n, (void)k;
    (void)y, (void)ys;
    return 3;
}

#else

#include <immintrin.h>

#define GROUP 32
#define LANES 16                  /* weight rows a tile holds */
#define TILE_ROWS 4               /* rows of x whose sums a tile's pass keeps in registers */
#define X_BLOCK 64                /* rows of x a tile's pass from memory serves */
#define PARALLEL_MIN_WORK 65536   /* weights below which one thread runs */

int q4_linear_available(void) { return 1; }

/* x [k] bf16 -> per group of 32, xq: 64 bytes, its int8 codes hi (32) then lo (32), x / xs =
 * hi + lo / 256 with hi = round(x / xs) and lo = round(256 (x / xs - hi)), xs = amax / 127
 * (so 256 hi + lo is a 16-bit code, and lo saturates only at +128); xsc its scale xs / 256,
 * xsm its float32 sum of x */
static void quantize_row(const uint16_t *x, int64_t k, int8_t *xq, float *xsc, float *xsm) {
    for (int64_t g = 0; g < k / GROUP; g++) {
        const uint16_t *xg = x + g * GROUP;
        const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
            _mm256_loadu_si256((const __m256i *)xg)), 16));
        const __m512 hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
            _mm256_loadu_si256((const __m256i *)(xg + 16))), 16));
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo),
                                                              _mm512_abs_ps(hi)));
        const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        for (int h = 0; h < 2; h++) {
            const __m512 t = _mm512_mul_ps(h ? hi : lo, inv);      /* |t| <= 127 */
            const __m512i q = _mm512_cvtps_epi32(t);              /* rounded to nearest even */
            const __m512 rest = _mm512_mul_ps(_mm512_sub_ps(t, _mm512_cvtepi32_ps(q)),
                                              _mm512_set1_ps(256.0f));
            int8_t *dst = xq + g * 2 * GROUP + 16 * h;
            _mm_storeu_si128((__m128i *)dst, _mm512_cvtsepi32_epi8(q));
            _mm_storeu_si128((__m128i *)(dst + GROUP),
                             _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(rest)));
        }
        xsc[g] = amax / 127.0f / 256.0f;
        xsm[g] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
    }
}

/* 16 floats -> bf16, rounded to nearest even (float_to_bf16, for every value but NaNs with
 * the top mantissa bits set): integer ops, as AVX-512 BF16 is not implied by VNNI */
static inline __m256i to_bf16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd);
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(u, bias), 16));
}

/* four bytes of x, broadcast to every lane */
static inline __m512i quad(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return _mm512_set1_epi32(v);
}

/* out[r] = the 16 outputs x[r] . w[i] of one tile (codes wt, scales st, mins mt) for R rows
 * of quantized x (xq, xsc, xsm: the first row's; 2 k and k / 32 apart) */
static inline __attribute__((always_inline)) void tile_dots(
        const uint8_t *wt, const uint16_t *st, const uint16_t *mt, int64_t k,
        const int8_t *xq, const float *xsc, const float *xsm, const int R, __m512 *out) {
    const int64_t groups = k / GROUP;
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    for (int r = 0; r < R; r++)
        out[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *wg = wt + g * 4 * 64;
        __m512i wlo[4], whi[4];
        for (int t = 0; t < 4; t++) {
            const __m512i wv = _mm512_loadu_si512(wg + 64 * t);
            wlo[t] = _mm512_and_si512(wv, low4);
            whi[t] = _mm512_and_si512(_mm512_srli_epi16(wv, 4), low4);
        }
        const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(st + g * LANES)));
        const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(mt + g * LANES)));
        for (int r = 0; r < R; r++) {
            const int8_t *xh = xq + r * 2 * k + g * 2 * GROUP, *xl = xh + GROUP;
            /* two sums, of the hi and the lo codes' products (two dependency chains) */
            __m512i dh = _mm512_setzero_si512(), dl = _mm512_setzero_si512();
            for (int t = 0; t < 4; t++) {
                dh = _mm512_dpbusd_epi32(dh, wlo[t], quad(xh + 8 * t));
                dl = _mm512_dpbusd_epi32(dl, wlo[t], quad(xl + 8 * t));
                dh = _mm512_dpbusd_epi32(dh, whi[t], quad(xh + 8 * t + 4));
                dl = _mm512_dpbusd_epi32(dl, whi[t], quad(xl + 8 * t + 4));
            }
            const __m512i dot = _mm512_add_epi32(_mm512_slli_epi32(dh, 8), dl);
            const __m512 xs = _mm512_set1_ps(xsc[r * groups + g]);
            out[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(s, xs), out[r]);
            out[r] = _mm512_fmadd_ps(mn, _mm512_set1_ps(xsm[r * groups + g]), out[r]);
        }
    }
}

#define DOTS(R) tile_dots(wt, st, mt, k, q + r0 * 2 * k, qs + r0 * groups, qm + r0 * groups, \
                          R, out)

/* y [m, n] (bf16, row stride ys) = x [m, k] (bf16, row stride xs) times W^T for the 4-bit
 * W above. Returns 1 if k % 32 or n % 16, 2 if the quantized x cannot be allocated. */
int q4_linear_bf16(const uint16_t *x, int64_t xs, int64_t m, const uint8_t *codes,
                   const uint16_t *scales, const uint16_t *mins, int64_t n, int64_t k,
                   uint16_t *y, int64_t ys) {
    if (k % GROUP || n % LANES)
        return 1;
    const int64_t groups = k / GROUP, tiles = n / LANES;
    const int64_t xblocks = (m + X_BLOCK - 1) / X_BLOCK;
    int8_t *q = malloc((size_t)(2 * m * k));
    float *qs = malloc(sizeof(float) * (size_t)(m * groups));
    float *qm = malloc(sizeof(float) * (size_t)(m * groups));
    if (q == NULL || qs == NULL || qm == NULL) {
        free(q);
        free(qs);
        free(qm);
        return 2;
    }
    #pragma omp parallel if (n * k >= PARALLEL_MIN_WORK)
    {
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < m; r++)
            quantize_row(x + r * xs, k, q + r * 2 * k, qs + r * groups, qm + r * groups);
        #pragma omp for collapse(2) schedule(static)
        for (int64_t xb = 0; xb < xblocks; xb++)
            for (int64_t tile = 0; tile < tiles; tile++) {
                const uint8_t *wt = codes + tile * LANES * (k / 2);
                const uint16_t *st = scales + tile * LANES * groups;
                const uint16_t *mt = mins + tile * LANES * groups;
                const int64_t end = (xb + 1) * X_BLOCK < m ? (xb + 1) * X_BLOCK : m;
                for (int64_t r0 = xb * X_BLOCK; r0 < end; r0 += TILE_ROWS) {
                    __m512 out[TILE_ROWS];
                    const int64_t rows = end - r0 < TILE_ROWS ? end - r0 : TILE_ROWS;
                    switch (rows) {
                        case 1: DOTS(1); break;
                        case 2: DOTS(2); break;
                        case 3: DOTS(3); break;
                        default: DOTS(4); break;
                    }
                    for (int64_t r = 0; r < rows; r++)
                        _mm256_storeu_si256((__m256i *)(y + (r0 + r) * ys + tile * LANES),
                                            to_bf16(out[r]));
                }
            }
    }
    free(q);
    free(qs);
    free(qm);
    return 0;
}

#endif
