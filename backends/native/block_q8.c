/* Q4_0 and Q4_1 linears on x rounded to int8 as llama.cpp rounds it (its Q8_1): what `--int8-activations` runs at
 * every row count, for the engine's linears on those blocks, which it then packs as q4cxG.
 *
 * Prefill's linears are bound by multiply-adds, and fp32's cost one FMA lane each. With x rounded per 32 inputs to a
 * scale s and int8 q (|q| <= 127), a block's dot product with the weights' 4-bit q is an integer: vpmaddubsw
 * multiplies 32 byte pairs and adds them in pairs into int16 in one instruction, 1.6x the multiply-adds of two FMAs
 * on a Zen 3 core (82 against 51 G a second). Each pair sum is at most 2 x 15 x 127 = 3,810, so a block's eight
 * products add in int16 without saturating (30,480 < 32,767) and one vpmaddwd widens them: the sums are exact. Per
 * block, row and output, w = d q + m then contributes
 *   d s sum(qw qx) + m s sum(qx),
 * so the result is the fp32 linear on exactly gguf-py's weights and on x rounded to s qx: llama.cpp's rounding
 * (2^-8 of each block's largest |x|), not the fp32 kernels' exactness; the oracle is the fp32 linear on x so
 * rounded. Every row takes the same steps at any row count and thread count, so a row's floats do not depend on
 * what it is batched with.
 *
 * Layout q4cxG (block_layout.py writes it): per (group, block of 32) q4xG's float d[G], float m[G], then the 4-bit q
 * in 4 chunks of 8 inputs, chunk c a 32-bit lane per output whose byte i holds input 8c + i (low nibble) and
 * 8c + 4 + i (high): masking a chunk gives the vpmaddubsw operand of inputs 0-3, shifting it the one of 4-7, with
 * no repacking per call (q4xG's input-major words cost ~20 instructions per 32 weights to turn into such lanes, which
 * made single-stream decode 13% slower than the fp32 kernels). A thread takes a unit of 16 outputs (two groups of
 * q4cx8, one of q4cx16), whose blocks (7-18 KB for SmolLM2's linears) stay in L1 while it multiplies every tile of
 * Q8_ROWS rows by them over all of K: per chunk two loads and three masks or shifts per 8 outputs, and per row two
 * broadcasts, four vpmaddubsw and four vpaddw, the row's int16 sums in registers. The portable build computes the
 * same integers in C. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "block_layouts.h"
#include "kernels.h"
#include "vector_math.h"

enum { Q8_ROWS = 4, UNIT = 16 }; /* rows per tile; outputs per unit */

typedef int16_t i16x16 __attribute__((vector_size(32)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

/* acc + u's unsigned bytes times s's signed ones, added in pairs into int16 lanes (vpmaddubsw, vpaddw). */
static inline i16x16 add_products(i16x16 acc, i32x8 u, i32x8 s) {
#if defined(__AVX2__)
    return (i16x16)_mm256_add_epi16((__m256i)acc, _mm256_maddubs_epi16((__m256i)u, (__m256i)s));
#else
    const i16x16 uu = (i16x16)u, ss = (i16x16)s;
    return acc + (uu & 255) * ((i16x16)((u16x16)ss << 8) >> 8) + (i16x16)((u16x16)uu >> 8) * (ss >> 8);
#endif
}

/* The int16 lanes added in pairs into int32 (vpmaddwd by ones). */
static inline i32x8 pair_sums(i16x16 v) {
#if defined(__AVX2__)
    return (i32x8)_mm256_madd_epi16((__m256i)v, _mm256_set1_epi16(1));
#else
    return (((i32x8)v << 16) >> 16) + ((i32x8)v >> 16);
#endif
}

/* x's rows rounded, in the linear's scratch (tokens * k floats; this takes 1.25 bytes an input): per row int8 q[k],
 * and per block of 32 the scale s and s sum(q). */
typedef struct {
    const int8_t *q;
    const float *scales, *sums;
    int64_t k;
} rounded_rows;

/* Row t rounded: s = max |x| / 127 per block of 32, q = rint(x / s) (divided, not multiplied by 1 / s, so subnormal
 * scales stay exact enough). A block with a NaN or infinity gets NaN as its scale and zero q, so that row's outputs
 * are NaN as fp32's would be; a block of zeros (or of values whose max / 127 underflows) gets 0. */
static void round_row(const float *x, int64_t k, int8_t *q, float *scales, float *sums) {
    for (int64_t b = 0; b < k / QK; ++b) {
        const float *v = x + QK * b;
        const float scale = int8_scale(v, QK);
        int32_t total = 0;
        for (int i = 0; i < QK; ++i) {
            const int8_t r = scale > 0.0f ? (int8_t)rintf(v[i] / scale) : 0; /* NaN > 0 is false */
            q[QK * b + i] = r;
            total += r;
        }
        scales[b] = scale;
        sums[b] = scale * (float)total;
    }
}

/* Four bytes of x's q in every lane. */
static inline i32x8 broadcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, sizeof(v));
    return (i32x8){} + v;
}

/* Where a unit's half h (outputs 8h .. 8h + 7) has block b: its d at at[h] + b step[h], m at m_at bytes after its
 * d, chunk c's lanes at lanes_at + c chunk_bytes after it. */
typedef struct {
    const uint8_t *at[2];
    int64_t step[2];
    int m_at, lanes_at, chunk_bytes;
} unit_blocks;

/* An absent half (the odd last group of q4cx8): zero scales and q, its outputs computed and never stored. */
static const uint8_t NO_HALF[Q4CX8_BLOCK];

static inline unit_blocks q4cx8_unit(const uint8_t *w, int64_t blocks, int64_t groups, int64_t u) {
    const int64_t g = 2 * u;
    const int second = g + 1 < groups;
    return (unit_blocks){{w + g * blocks * Q4CX8_BLOCK, second ? w + (g + 1) * blocks * Q4CX8_BLOCK : NO_HALF},
                         {Q4CX8_BLOCK, second ? Q4CX8_BLOCK : 0}, 32, 64, 32};
}

static inline unit_blocks q4cx16_unit(const uint8_t *w, int64_t blocks, int64_t groups, int64_t u) {
    (void)groups;
    const uint8_t *group = w + u * blocks * Q4CX16_BLOCK;
    return (unit_blocks){{group, group + 32}, {Q4CX16_BLOCK, Q4CX16_BLOCK}, 64, 128, 64};
}

/* y[rt, 16] (rows n apart, `outputs` of them stored) = rows t0.. of x times the unit's blocks (+ bias[16] when not
 * NULL). Inlined per constant rt. */
static inline __attribute__((always_inline)) void q8_tile(const rounded_rows *x, int64_t t0, const unit_blocks *unit,
                                                          float *y, int64_t n, int outputs, const float *bias,
                                                          const int rt) {
    const int64_t blocks = x->k / QK;
    f32x8 acc[Q8_ROWS][2] = {};
    for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t *half[2] = {unit->at[0] + b * unit->step[0], unit->at[1] + b * unit->step[1]};
        i16x16 sums[Q8_ROWS][2] = {};
#pragma GCC unroll 1
        for (int c = 0; c < QK / 8; ++c) {
            i32x8 low[2], high[2];
            for (int h = 0; h < 2; ++h) {
                const u32x8 raw = LOAD(u32x8, half[h] + unit->lanes_at + c * unit->chunk_bytes);
                low[h] = (i32x8)(raw & 0x0F0F0F0Fu);
                high[h] = (i32x8)((raw >> 4) & 0x0F0F0F0Fu);
            }
            for (int t = 0; t < rt; ++t) {
                const int8_t *xq = x->q + (t0 + t) * x->k + QK * b + 8 * c;
                const i32x8 first = broadcast4(xq), second = broadcast4(xq + 4);
                for (int h = 0; h < 2; ++h)
                    sums[t][h] = add_products(add_products(sums[t][h], low[h], first), high[h], second);
            }
        }
        for (int h = 0; h < 2; ++h) {
            const f32x8 d = load8((const float *)half[h]), m = load8((const float *)(half[h] + unit->m_at));
            for (int t = 0; t < rt; ++t) {
                const int64_t at = (t0 + t) * blocks + b;
                const f32x8 dots = __builtin_convertvector(pair_sums(sums[t][h]), f32x8);
                acc[t][h] += dots * (d * x->scales[at]) + m * x->sums[at];
            }
        }
    }
    for (int t = 0; t < rt; ++t)
        for (int h = 0; h < 2 && 8 * h < outputs; ++h) {
            f32x8 sum = acc[t][h];
            if (bias != NULL) sum += load8(bias + 8 * h);
            memcpy(y + t * n + 8 * h, &sum, sizeof(sum));
        }
}

/* y[T, N] = round(x)[T, K] (rows x_row apart) . w^T (+ bias[N]) for w in q4cxG (UNIT_OF: its units, G outputs a
 * group); scratch holds T * K floats. The threads round a share of the rows each, then share the units. */
#define Q8_LINEAR(NAME, UNIT_OF, G)                                                                                    \
    void NAME(const float *x, int64_t x_row, const uint8_t *w, const float *bias, float *y, int64_t tokens,           \
              int64_t n, int64_t k, float *scratch, int32_t num_threads) {                                             \
        const int64_t blocks = k / QK, groups = n / G, units = (n + UNIT - 1) / UNIT;                                 \
        int8_t *q = (int8_t *)scratch;                                                                                 \
        float *scales = (float *)(q + tokens * k), *sums = scales + tokens * blocks;                                   \
        const rounded_rows rounded = {q, scales, sums, k};                                                             \
        _Pragma("omp parallel num_threads(num_threads) if (num_threads > 1)") {                                        \
            _Pragma("omp for schedule(static)")                                                                        \
            for (int64_t t = 0; t < tokens; ++t)                                                                       \
                round_row(x + t * x_row, k, q + t * k, scales + t * blocks, sums + t * blocks);                        \
            _Pragma("omp for schedule(static)")                                                                        \
            for (int64_t u = 0; u < units; ++u) {                                                                      \
                const unit_blocks unit = UNIT_OF(w, blocks, groups, u);                                                \
                const int outputs = n - UNIT * u < UNIT ? (int)(n - UNIT * u) : UNIT;                                 \
                const float *bias_u = bias != NULL ? bias + UNIT * u : NULL;                                           \
                for (int64_t t0 = 0; t0 < tokens; t0 += Q8_ROWS) {                                                     \
                    float *yt = y + t0 * n + UNIT * u;                                                                 \
                    switch (tokens - t0 < Q8_ROWS ? tokens - t0 : Q8_ROWS) {                                           \
                    case 1: q8_tile(&rounded, t0, &unit, yt, n, outputs, bias_u, 1); break;                           \
                    case 2: q8_tile(&rounded, t0, &unit, yt, n, outputs, bias_u, 2); break;                           \
                    case 3: q8_tile(&rounded, t0, &unit, yt, n, outputs, bias_u, 3); break;                           \
                    default: q8_tile(&rounded, t0, &unit, yt, n, outputs, bias_u, Q8_ROWS); break;                    \
                    }                                                                                                  \
                }                                                                                                      \
            }                                                                                                          \
        }                                                                                                              \
    }

Q8_LINEAR(linear_q4cx8_q8, q4cx8_unit, 8)
Q8_LINEAR(linear_q4cx16_q8, q4cx16_unit, 16)
