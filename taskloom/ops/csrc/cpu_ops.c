/* The CPU path's layer ops in bfloat16, one loop each, for taskloom.ops.cpu_kernels.
 *
 * A decode step of a small model on the CPU is mostly operator overhead: eager torch runs
 * RMSNorm as eight operations, rotary embedding and the KV-cache write as twenty, and decode
 * attention as a gather of every context key into a padded batch before its kernel. These do
 * each in one call. They round as the torch references do (taskloom.ops.rmsnorm, .rotary,
 * .activation, .attention): every elementwise bf16 operation of the reference is computed in
 * float32 and rounded to bf16 at the same point, so the residual add, rotary and the cache
 * write are bit for bit the reference's (compile with -ffp-contract=off: no fused
 * multiply-add). Reductions (RMSNorm's mean of squares, attention's dot products and softmax)
 * are summed in float32 in their own order, and exp is our own polynomial, so those differ
 * from torch's by float32 roundings.
 *
 * Rows are split over OpenMP threads when a call has enough work for it; the library is
 * loaded after torch and shares torch's OpenMP runtime (the same libgomp.so.1) and its thread
 * count. Strides are in elements; the last dimension of every tensor is contiguous.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"

#define LANES 16                    /* partial sums: one AVX-512 vector of float32 */
#define PARALLEL_MIN_WORK 65536     /* elements of work below which one thread runs */

/* exp(x) in float32 (Cephes' expf: Cody-Waite range reduction and a degree-6 polynomial,
 * within 2 ulp), without branches or libm calls so that loops over it vectorize. x is
 * clamped to [-87, 88] (ternaries, not fminf: those vectorize only under finite math); k is
 * rounded to nearest by adding and taking away 1.5 * 2^23. */
static inline float exp_f32(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - k * 0.693359375f;
    r = r - k * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    uint32_t bits = (uint32_t)((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* The sum of LANES partial sums, pairwise (a few vector adds, not LANES dependent ones);
 * overwrites them. */
static inline float lane_sum(float *part) {
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int l = 0; l < w; l++)
            part[l] += part[l + w];
    return part[0];
}

/* RMSNorm of rows of x [n, h] (row stride xs), optionally after the residual add: with
 * `res` non-NULL the normalised value is round(x + res), stored to res_out (stride ros).
 * out = round(w * round(v / sqrt(mean(v^2) + eps))), as taskloom.ops.rmsnorm computes. */
void rms_norm_bf16(const uint16_t *x, int64_t xs, const uint16_t *res, int64_t rs,
                   const uint16_t *w, uint16_t *out, int64_t os, uint16_t *res_out,
                   int64_t ros, int64_t n, int64_t h, float eps) {
    #pragma omp parallel for if (n * h >= PARALLEL_MIN_WORK)
    for (int64_t i = 0; i < n; i++) {
        const uint16_t *xi = x + i * xs;
        const uint16_t *src = xi;
        if (res != NULL) {
            const uint16_t *ri = res + i * rs;
            uint16_t *si = res_out + i * ros;
            for (int64_t j = 0; j < h; j++)
                si[j] = float_to_bf16(bf16_to_float(xi[j]) + bf16_to_float(ri[j]));
            src = si;
        }
        float part[LANES] = {0};
        int64_t j = 0;
        for (; j + LANES <= h; j += LANES)
            for (int l = 0; l < LANES; l++) {
                float v = bf16_to_float(src[j + l]);
                part[l] += v * v;
            }
        for (; j < h; j++) {
            float v = bf16_to_float(src[j]);
            part[0] += v * v;
        }
        float r = 1.0f / sqrtf(lane_sum(part) / (float)h + eps);
        uint16_t *oi = out + i * os;
        for (j = 0; j < h; j++)
            oi[j] = float_to_bf16(bf16_to_float(w[j]) * round_bf16(bf16_to_float(src[j]) * r));
    }
}

static inline void silu_and_mul_row(const uint16_t *restrict g, const uint16_t *restrict u,
                                    uint16_t *restrict o, int64_t inter) {
    for (int64_t j = 0; j < inter; j++) {
        float gj = bf16_to_float(g[j]);
        float s = round_bf16(gj / (1.0f + exp_f32(-gj)));
        o[j] = float_to_bf16(s * bf16_to_float(u[j]));
    }
}

/* out [n, inter] = round(round(silu(gate)) * up) of x [n, 2 * inter] = [gate | up]. */
void silu_and_mul_bf16(const uint16_t *x, int64_t xs, uint16_t *out, int64_t os, int64_t n,
                       int64_t inter) {
    #pragma omp parallel for if (n * inter >= PARALLEL_MIN_WORK)
    for (int64_t i = 0; i < n; i++)
        silu_and_mul_row(x + i * xs, x + i * xs + inter, out + i * os, inter);
}

/* Rotate-half rotary of one head (d/2 pairs) by bf16-rounded cos/sin, each product and sum
 * rounded as the reference's bf16 tensor operations round them. */
static inline void rotate_head(const uint16_t *x, uint16_t *o, const float *c, const float *s,
                               int64_t half) {
    for (int64_t j = 0; j < half; j++) {
        float x1 = bf16_to_float(x[j]), x2 = bf16_to_float(x[half + j]);
        o[j] = float_to_bf16(round_bf16(x1 * c[j]) - round_bf16(x2 * s[j]));
        o[half + j] = float_to_bf16(round_bf16(x2 * c[j]) + round_bf16(x1 * s[j]));
    }
}

#define MAX_HALF 512

/* Rotary embedding of q [n, nq, d] into q_out [n, nq, d] (contiguous) and of k [n, nkv, d],
 * stored with v (unless NULL) at each token's slot of the caches k_cache/v_cache [slots, nkv,
 * d]; tokens with a negative slot are rotated but not stored. cos_sin [max_pos, d] holds
 * cos | sin in float32, rounded to bf16 first as the reference does. Returns 1 for a
 * position outside [0, max_pos), 2 for a head_dim it cannot take, 0 otherwise. */
int rotary_to_cache_bf16(const int64_t *pos, int64_t n, const uint16_t *q, int64_t qs,
                         int64_t nq, const uint16_t *k, int64_t ks, const uint16_t *v,
                         int64_t vs, int64_t nkv, int64_t d, const float *cos_sin,
                         int64_t max_pos, uint16_t *q_out, uint16_t *k_cache,
                         uint16_t *v_cache, const int64_t *slots) {
    const int64_t half = d / 2;
    if (d % 2 || half > MAX_HALF)
        return 2;
    for (int64_t i = 0; i < n; i++)
        if (pos[i] < 0 || pos[i] >= max_pos)
            return 1;
    #pragma omp parallel for if (n * (nq + 2 * nkv) * d >= PARALLEL_MIN_WORK)
    for (int64_t i = 0; i < n; i++) {
        float c[MAX_HALF], s[MAX_HALF];
        const float *cs = cos_sin + pos[i] * d;
        for (int64_t j = 0; j < half; j++) {
            c[j] = round_bf16(cs[j]);
            s[j] = round_bf16(cs[half + j]);
        }
        for (int64_t hd = 0; hd < nq; hd++)
            rotate_head(q + i * qs + hd * d, q_out + (i * nq + hd) * d, c, s, half);
        if (slots[i] < 0)
            continue;
        for (int64_t hd = 0; hd < nkv; hd++) {
            rotate_head(k + i * ks + hd * d, k_cache + (slots[i] * nkv + hd) * d, c, s, half);
            if (v != NULL)
                memcpy(v_cache + (slots[i] * nkv + hd) * d, v + i * vs + hd * d, d * sizeof *v);
        }
    }
    return 0;
}

#if defined(__AVX512F__)
#include <immintrin.h>

static inline __m512 load_bf16x16(const uint16_t *p) {
    __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

#define MAX_GROUP 16
#define MAX_ACC 24     /* float32 vectors of a weighted sum kept in registers */

/* s[g] = q[g] . k over d, for the group's g < group query heads (q float32 [group, d]). */
static inline __attribute__((always_inline)) void dot_group(
        const float *q, const uint16_t *k, int64_t d, int64_t group, float *s) {
#if defined(__AVX512F__)
    if (d % 16 == 0) {
        __m512 acc[MAX_GROUP];
        for (int64_t g = 0; g < group; g++)
            acc[g] = _mm512_setzero_ps();
        for (int64_t t = 0; t < d; t += 16) {
            __m512 kv = load_bf16x16(k + t);
            for (int64_t g = 0; g < group; g++)
                acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * d + t), kv, acc[g]);
        }
        for (int64_t g = 0; g < group; g++)
            s[g] = _mm512_reduce_add_ps(acc[g]);
        return;
    }
#endif
    for (int64_t g = 0; g < group; g++) {
        float part[LANES] = {0};
        for (int64_t t = 0; t < d; t++)
            part[t % LANES] += q[g * d + t] * bf16_to_float(k[t]);
        s[g] = lane_sum(part);
    }
}

/* acc[g] += p[g] * v over d, for the group's query heads (acc float32 [group, d]). */
static inline __attribute__((always_inline)) void axpy_group(
        const float *p, const uint16_t *v, int64_t d, int64_t group, float *acc) {
#if defined(__AVX512F__)
    if (d % 16 == 0) {
        for (int64_t t = 0; t < d; t += 16) {
            __m512 vv = load_bf16x16(v + t);
            for (int64_t g = 0; g < group; g++) {
                float *a = acc + g * d + t;
                _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(p[g]), vv,
                                                    _mm512_loadu_ps(a)));
            }
        }
        return;
    }
#endif
    for (int64_t g = 0; g < group; g++)
        for (int64_t t = 0; t < d; t++)
            acc[g * d + t] += p[g] * bf16_to_float(v[t]);
}

/* One query group's attention: the group's query heads qi [group, d] against the keys and
 * values at rows si[:len] of k/v (row stride kvs), into oi [group, d]. buf: the group's
 * scaled queries and accumulators [2, group, d], then its scores [group, len] (head-major:
 * a head's softmax runs over contiguous scores). Inlined into `attend` for the common group
 * sizes and head dims, so that their loops have constant bounds. */
static inline __attribute__((always_inline)) void attend_one(
        const uint16_t *qi, const uint16_t *k, const uint16_t *v, int64_t kvs,
        const int64_t *si, int64_t len, const int64_t d, const int64_t group, float scale,
        float *buf, uint16_t *oi) {
    float *qf = buf, *acc = buf + group * d, *scores = buf + 2 * group * d;
    for (int64_t t = 0; t < group * d; t++) {
        qf[t] = bf16_to_float(qi[t]) * scale;
        acc[t] = 0.0f;
    }
    float s[MAX_GROUP], sum[MAX_GROUP];
    for (int64_t j = 0; j < len; j++) {
        dot_group(qf, k + si[j] * kvs, d, group, s);
        for (int64_t g = 0; g < group; g++)
            scores[g * len + j] = s[g];
    }
    for (int64_t g = 0; g < group; g++) {
        float *sg = scores + g * len, m[LANES];
        for (int l = 0; l < LANES; l++)
            m[l] = -INFINITY;
        int64_t j = 0;
        for (; j + LANES <= len; j += LANES)     /* lane-wise: a chain of maxes is slow */
            for (int l = 0; l < LANES; l++)
                m[l] = sg[j + l] > m[l] ? sg[j + l] : m[l];
        for (; j < len; j++)
            m[0] = sg[j] > m[0] ? sg[j] : m[0];
        float mx = m[0];
        for (int l = 1; l < LANES; l++)
            mx = m[l] > mx ? m[l] : mx;
        float part[LANES] = {0};
        j = 0;
        for (; j + LANES <= len; j += LANES)
            for (int l = 0; l < LANES; l++) {
                sg[j + l] = exp_f32(sg[j + l] - mx);
                part[l] += sg[j + l];
            }
        for (; j < len; j++) {
            sg[j] = exp_f32(sg[j] - mx);
            part[0] += sg[j];
        }
        sum[g] = lane_sum(part);
    }
#if defined(__AVX512F__)
    if (d % 16 == 0 && group * d <= 16 * MAX_ACC) {
        /* the weighted sum in registers: group * d / 16 accumulators, constant in number
         * where this is inlined for a group size and head dim */
        const int64_t c = d / 16;
        __m512 a[MAX_ACC];
        for (int64_t r = 0; r < group * c; r++)
            a[r] = _mm512_setzero_ps();
        for (int64_t j = 0; j < len; j++) {
            const uint16_t *vj = v + si[j] * kvs;
            for (int64_t t = 0; t < c; t++) {
                __m512 vv = load_bf16x16(vj + 16 * t);
                for (int64_t g = 0; g < group; g++)
                    a[g * c + t] = _mm512_fmadd_ps(_mm512_set1_ps(scores[g * len + j]), vv,
                                                   a[g * c + t]);
            }
        }
        for (int64_t r = 0; r < group * c; r++)
            _mm512_storeu_ps(acc + 16 * r, a[r]);
    } else
#endif
    for (int64_t j = 0; j < len; j++) {
        for (int64_t g = 0; g < group; g++)
            s[g] = scores[g * len + j];
        axpy_group(s, v + si[j] * kvs, d, group, acc);
    }
    for (int64_t g = 0; g < group; g++)
        for (int64_t t = 0; t < d; t++)
            oi[g * d + t] = float_to_bf16(acc[g * d + t] / sum[g]);
}

#define ATTEND(D, G) attend_one(qi, k, v, kvs, si, len, D, G, scale, buf, oi)
#define ATTEND_GROUP(G)                 \
    case G:                             \
        if (d == 64)                    \
            ATTEND(64, G);              \
        else if (d == 128)              \
            ATTEND(128, G);             \
        else                            \
            ATTEND(d, G);               \
        return;

static void attend(const uint16_t *qi, const uint16_t *k, const uint16_t *v, int64_t kvs,
                   const int64_t *si, int64_t len, int64_t d, int64_t group, float scale,
                   float *buf, uint16_t *oi) {
    switch (group) {
        ATTEND_GROUP(1) ATTEND_GROUP(2) ATTEND_GROUP(3) ATTEND_GROUP(4)
        ATTEND_GROUP(5) ATTEND_GROUP(6) ATTEND_GROUP(7) ATTEND_GROUP(8)
    }
    ATTEND(d, group);
}

/* Decode attention of b single-token queries over the paged cache, read in place. Query row
 * rows[i] of q [tokens, nh, d] (row stride qs) attends to the cache slots slots[i, :lens[i]]
 * (row stride ss) of k_cache/v_cache [slots, nkv, d]; the nh / nkv (at most MAX_GROUP) query
 * heads of a group share their KV head and each key is read once for them. Scores, softmax
 * and the weighted sum are float32 (with fused multiply-adds where AVX-512 is); the output
 * row out[rows[i]] (stride os) is rounded to bf16 once. Returns 1 if a row has no context or
 * the heads do not group, 2 if it cannot allocate its scores. */
int decode_attention_bf16(const uint16_t *q, int64_t qs, const int64_t *rows, int64_t b,
                          const uint16_t *k_cache, const uint16_t *v_cache,
                          const int64_t *slots, int64_t ss, const int64_t *lens, int64_t nh,
                          int64_t nkv, int64_t d, float scale, uint16_t *out, int64_t os) {
    if (nkv <= 0 || nh % nkv || nh / nkv > MAX_GROUP)
        return 1;
    int64_t max_len = 0, total = 0;
    for (int64_t i = 0; i < b; i++) {
        if (lens[i] < 1)
            return 1;
        max_len = lens[i] > max_len ? lens[i] : max_len;
        total += lens[i];
    }
    const int64_t group = nh / nkv;
    int failed = 0;
    #pragma omp parallel if (total * nh * d >= 4 * PARALLEL_MIN_WORK)
    {
        /* per thread: `attend`'s buffer */
        float *buf = malloc(sizeof(float) * (size_t)(group * (2 * d + max_len)));
        if (buf == NULL) {
            #pragma omp atomic write
            failed = 2;
        }
        #pragma omp for schedule(dynamic)
        for (int64_t task = 0; task < b * nkv; task++) {
            if (buf == NULL)
                continue;
            const int64_t i = task / nkv, hk = task % nkv;
            attend(q + rows[i] * qs + hk * group * d, k_cache + hk * d, v_cache + hk * d,
                   nkv * d, slots + i * ss, lens[i], d, group, scale, buf,
                   out + rows[i] * os + hk * group * d);
        }
        free(buf);
    }
    return failed;
}
