/* Linears over GGUF blocks on int16 dot products (AVX-512 VNNI's vpdpwssd), called by block_linear.c's linears on
 * the 16-wide layouts from INT16_MIN_ROWS rows on: prefill, and decode steps of many sequences.
 *
 * block_linear.c's fp32 kernels dequantize a weight once per 16 rows (AVX-512's tiles) and multiply in fp32: 16
 * multiply-adds per instruction, the FMA units' peak. vpdpwssd does 32 (16 lanes of two int16 products added into an
 * int32) in the same time (AVX2 has no such instruction to gain by: its vpmaddwd, 16 int16 multiply-adds, and the add
 * after it, measured 36 GMAC/s on a Zen 3 core against fp32 FMA's 49). Here x is rounded per 32 inputs to int16 (scale
 * s = the block's largest |x| / 32767, so each value to within 2^-16 of that largest |x|, as block_int8.c's two int8
 * pieces round it for decode), the weights' integer q are unpacked to int16 pairs once per call for a group of 16
 * outputs, and each (row, block) sums its 32 products exactly in int32; one convert, a multiply and two FMAs per block
 * then apply the scales:
 *     y += (d s) . sum_i q_i x'_i  +  m . sum_i x_i
 * (m the sub-block's min, times the fp32 sum of the block's x; Q6_K's sub-blocks of 16 take a scale each and no
 * min). llama.cpp rounds x to int8 for its quantized GEMMs (2^-8 of the largest); this keeps x at 2^-16, within the
 * tolerance the decode kernels meet against the fp32 linear on the dequantized weights.
 *
 * Per thread a group's q are unpacked into [k / 2][16 lanes] int32 words (input pair p's two int16 q of output j in
 * lane j) with its scales, and every tile of WIDE_ROWS rows multiplies them from L1/L2: per (row, block) 16
 * vpdpwssd, a convert, a multiply and two FMAs, where fp32 takes 32 FMAs plus its share of the dequantizing. x's rows
 * are rounded once per call into the linear's scratch, tile-major ([tile][pair][row]), so one pointer with constant
 * offsets reaches a tile's rows; each row's sums run in one order wherever its tile puts it, so a row's outputs do not
 * depend on the rows beside it. A block with a NaN or infinity gets a NaN scale and zero integers: its row's
 * outputs are NaN (block_int8.c's rule). SmolLM2's layer linears, Q4_1, 512 rows, two AVX-512 cores (Zen 5):
 * 4.8 ms against the fp32 kernels' 9.2 (750 against 394 GFLOP/s); from memory, as decode reads them, kernels.h. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "block_layouts.h"
#include "block_readers.h"
#include "kernels.h"
#include "vector_math.h"

#if defined(__AVX512VNNI__) && defined(__AVX512F__)
#include <immintrin.h>

enum { WIDE_ROWS = 12, PAIRS = QK / 2 }; /* rows per tile: 12 int32 and 12 fp32 accumulators in 32 registers */

/* x's rows rounded: per tile of WIDE_ROWS rows (rt in the last), pairs[k / 2][rt] (int32 words of two int16),
 * scales[k / 32][rt] and sums[k / 32][rt]. */
typedef struct {
    int32_t *pairs;
    float *scales, *sums;
} rounded_t;

static rounded_t round_rows(const float *x, int64_t x_row, int64_t tokens, int64_t k, float *scratch,
                            int32_t num_threads) {
    const int64_t blocks = k / QK;
    rounded_t r = {(int32_t *)scratch, scratch + tokens * k / 2, scratch + tokens * k / 2 + tokens * blocks};
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1 && tokens >= 4 * WIDE_ROWS)
    for (int64_t t0 = 0; t0 < tokens; t0 += WIDE_ROWS) {
        const int64_t rt = tokens - t0 < WIDE_ROWS ? tokens - t0 : WIDE_ROWS;
        int32_t *pairs = r.pairs + t0 * k / 2;
        float *scales = r.scales + t0 * blocks, *sums = r.sums + t0 * blocks;
        for (int64_t t = 0; t < rt; ++t) {
            const float *row = x + (t0 + t) * x_row;
            for (int64_t b = 0; b < blocks; ++b) {
                const __m512 lo = _mm512_loadu_ps(row + QK * b), hi = _mm512_loadu_ps(row + QK * b + 16);
                const __m512 abs_lo = _mm512_abs_ps(lo), abs_hi = _mm512_abs_ps(hi);
                const __m512 huge = _mm512_set1_ps(3.402823466e38f); /* NaN and infinity compare above it */
                const __mmask16 bad = _mm512_cmp_ps_mask(abs_lo, huge, _CMP_NLE_UQ) |
                                      _mm512_cmp_ps_mask(abs_hi, huge, _CMP_NLE_UQ);
                const float scale = bad ? NAN : _mm512_reduce_max_ps(_mm512_max_ps(abs_lo, abs_hi)) / 32767.0f;
                int16_t q[QK] = {0};
                if (scale > 0.0f) { /* dividing, not multiplying by the inverse: subnormal scales stay exact */
                    const __m512 by = _mm512_set1_ps(scale);
                    _mm256_storeu_si256((__m256i *)q, _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(lo / by)));
                    _mm256_storeu_si256((__m256i *)(q + 16), _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(hi / by)));
                }
                scales[b * rt + t] = scale;
                sums[b * rt + t] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
                for (int p = 0; p < PAIRS; ++p) {
                    int32_t word;
                    memcpy(&word, q + 2 * p, sizeof(word));
                    pairs[(b * PAIRS + p) * rt + t] = word;
                }
            }
        }
    }
    return r;
}

typedef uint32_t u32x16 __attribute__((vector_size(64)));

/* A group's integer q, less CENTER, as int16 pairs, wq[k / 2][16] (pair p's q(2p) | q(2p + 1) << 16 of output j in
 * lane j), and its scales per sub-block of SUB inputs, d[k / SUB][16] and m[k / SUB][16] (w = d * (q - CENTER) + m,
 * m the layout's plus CENTER * d). Centring the unsigned kinds' q keeps the two terms from being each several times
 * the weight and cancelling (Q4_0's m = -8 d: then 0 exactly), so their sums round as the fp32 linear's do. */
#define UNPACK(NAME, INPUTS, SUB, SCALES, QS, BLOCK_BYTES, CENTER)                                                     \
    static void NAME(const uint8_t *group, int64_t k, int32_t *wq, float *d, float *m) {                               \
        for (int64_t b = 0; b < k / INPUTS; ++b) {                                                                     \
            const uint8_t *block = group + b * BLOCK_BYTES;                                                            \
            for (int s = 0; s < INPUTS; s += SUB) {                                                                    \
                const scales16 scales = SCALES(block, s);                                                              \
                store16(d + (b * INPUTS + s) / SUB * 16, scales.d);                                                    \
                store16(m + (b * INPUTS + s) / SUB * 16, scales.m + (float)(CENTER) * scales.d);                       \
                for (int run = s; run < s + SUB; run += 8) {                                                           \
                    _Pragma("GCC unroll 4") for (int i = 0; i < 8; i += 2) {                                           \
                        const u32x16 low = (u32x16)(QS(block, run, i) - (CENTER)) & 0xffff;                            \
                        const u32x16 pair = low | (u32x16)(QS(block, run, i + 1) - (CENTER)) << 16;                    \
                        memcpy(wq + (b * INPUTS + run + i) / 2 * 16, &pair, sizeof(pair));                             \
                    }                                                                                                  \
                }                                                                                                      \
            }                                                                                                          \
        }                                                                                                              \
    }

UNPACK(unpack_q4x16, QK, QK, q4x16_scales, q4x16_q, Q4X16_BLOCK, 8)
UNPACK(unpack_q8x16, QK, QK, q8x16_scales, q8x16_q, Q8X16_BLOCK, 0)
UNPACK(unpack_q4kx16, QK_K, QK, q4kx16_scales, q4kx16_q, Q4KX16_BLOCK, 8)
UNPACK(unpack_q5kx16, QK_K, QK, q5kx16_scales, q5kx16_q, Q5KX16_BLOCK, 16)
UNPACK(unpack_q6kx16, QK_K, 16, q6kx16_scales, q6kx16_q, Q6KX16_BLOCK, 0)

/* y[rt, 16] (rows n apart) = a tile's rounded rows times one unpacked group (+ bias[16]), its scales per SUB (32 or
 * 16) inputs, the min's term only where the layout has one (HAS_MIN, with SUB 32). Inlined per constant rt. */
static inline __attribute__((always_inline)) void wide_tile(const int32_t *xq, const float *xs, const float *xsum,
                                                            const int32_t *wq, const float *d, const float *m,
                                                            int64_t blocks, const float *bias, float *y, int64_t n,
                                                            const int sub, const int has_min, const int rt) {
    __m512 f[WIDE_ROWS];
    for (int t = 0; t < rt; ++t) f[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
        const int32_t *xb = xq + b * PAIRS * rt, *wb = wq + b * PAIRS * 16;
        for (int h = 0; h < QK / sub; ++h) {
            __m512i acc[WIDE_ROWS];
            for (int t = 0; t < rt; ++t) acc[t] = _mm512_setzero_si512();
#pragma GCC unroll 16
            for (int p = h * sub / 2; p < (h + 1) * sub / 2; ++p) {
                const __m512i w = _mm512_load_si512(wb + 16 * p);
                for (int t = 0; t < rt; ++t)
                    acc[t] = _mm512_dpwssd_epi32(acc[t], w, _mm512_set1_epi32(xb[p * rt + t]));
            }
            const __m512 dh = _mm512_loadu_ps(d + (b * (QK / sub) + h) * 16);
            for (int t = 0; t < rt; ++t) f[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t]), dh * xs[b * rt + t], f[t]);
        }
        if (has_min) {
            const __m512 mb = _mm512_loadu_ps(m + b * 16);
            for (int t = 0; t < rt; ++t) f[t] = _mm512_fmadd_ps(mb, _mm512_set1_ps(xsum[b * rt + t]), f[t]);
        }
    }
    const __m512 bg = bias != NULL ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
    for (int t = 0; t < rt; ++t) _mm512_storeu_ps(y + t * n, f[t] + bg);
}

#define EACH_WIDE_TILE(...)                                                                                           \
    switch (rt) {                                                                                                      \
    case 1: wide_tile(__VA_ARGS__, 1); break;                                                                          \
    case 2: wide_tile(__VA_ARGS__, 2); break;                                                                          \
    case 3: wide_tile(__VA_ARGS__, 3); break;                                                                          \
    case 4: wide_tile(__VA_ARGS__, 4); break;                                                                          \
    case 5: wide_tile(__VA_ARGS__, 5); break;                                                                          \
    case 6: wide_tile(__VA_ARGS__, 6); break;                                                                          \
    case 7: wide_tile(__VA_ARGS__, 7); break;                                                                          \
    case 8: wide_tile(__VA_ARGS__, 8); break;                                                                          \
    case 9: wide_tile(__VA_ARGS__, 9); break;                                                                          \
    case 10: wide_tile(__VA_ARGS__, 10); break;                                                                        \
    case 11: wide_tile(__VA_ARGS__, 11); break;                                                                        \
    default: wide_tile(__VA_ARGS__, WIDE_ROWS); break;                                                                 \
    }

/* y[T, N] = x[T, K] (rows x_row apart) . w^T (+ bias[N]) for w in a 16-wide layout whose blocks hold INPUTS inputs:
 * N a multiple of 16, K of INPUTS; scratch holds T * K floats (the rounded rows take 9/16 of them). */
#define WIDE_LINEAR(NAME, UNPACK, INPUTS, SUB, HAS_MIN, BLOCK_BYTES)                                                   \
    void NAME(const float *x, int64_t x_row, const uint8_t *w, const float *bias, float *y, int64_t tokens,           \
              int64_t n, int64_t k, float *scratch, int32_t num_threads) {                                             \
        const int64_t blocks = k / QK;                                                                                 \
        const rounded_t r = round_rows(x, x_row, tokens, k, scratch, num_threads);                                     \
        _Pragma("omp parallel num_threads(num_threads) if (num_threads > 1)") {                                        \
            int32_t *wq = aligned_alloc(64, (size_t)k / 2 * 16 * sizeof(int32_t));                                     \
            float *d = aligned_alloc(64, (size_t)k / SUB * 16 * sizeof(float) * 2), *m = d + k / SUB * 16;             \
            _Pragma("omp for schedule(static)") for (int64_t g = 0; g < n / 16; ++g) {                                 \
                UNPACK(w + g * (k / INPUTS) * BLOCK_BYTES, k, wq, d, m);                                               \
                const float *bg = bias != NULL ? bias + g * 16 : NULL;                                                 \
                for (int64_t t0 = 0; t0 < tokens; t0 += WIDE_ROWS) {                                                   \
                    const int rt = tokens - t0 < WIDE_ROWS ? (int)(tokens - t0) : WIDE_ROWS;                           \
                    const int32_t *xq = r.pairs + t0 * k / 2;                                                          \
                    const float *xs = r.scales + t0 * blocks, *xsum = r.sums + t0 * blocks;                            \
                    float *yt = y + t0 * n + g * 16;                                                                   \
                    EACH_WIDE_TILE(xq, xs, xsum, wq, d, m, blocks, bg, yt, n, SUB, HAS_MIN)                            \
                }                                                                                                      \
            }                                                                                                          \
            free(wq);                                                                                                  \
            free(d);                                                                                                   \
        }                                                                                                              \
    }

WIDE_LINEAR(linear_q4x16_i16, unpack_q4x16, QK, QK, 1, Q4X16_BLOCK)
WIDE_LINEAR(linear_q8x16_i16, unpack_q8x16, QK, QK, 0, Q8X16_BLOCK)
WIDE_LINEAR(linear_q4kx16_i16, unpack_q4kx16, QK_K, QK, 1, Q4KX16_BLOCK)
WIDE_LINEAR(linear_q5kx16_i16, unpack_q5kx16, QK_K, QK, 1, Q5KX16_BLOCK)
WIDE_LINEAR(linear_q6kx16_i16, unpack_q6kx16, QK_K, 16, 0, Q6KX16_BLOCK)

#endif
