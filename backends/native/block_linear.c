/* Linears over GGUF-quantized weights for small-batch decode, called through ctypes by sagellm.backends.native.
 *
 * Decode streams every weight once per step. A Q4_1 weight is 0.75 bytes per value in the layout below where its
 * dequantized fp32 copy is 4, so these kernels read 5x less memory than the fp32 GEMMs; they dequantize in registers
 * and multiply in fp32, so the result is the fp32 linear on exactly the dequantized weights (d * q + m is exact in
 * fp32: an fp16 scale times a 4- or 8-bit integer), summed in another order.
 *
 * Layouts (backends/native/block_layout.py writes them from the GGUF blocks): outputs in groups of G (8 or 16), and
 * for each group and each block of 32 inputs,
 *   q4x8 (Q4_0, Q4_1):  float d[8], float m[8], then 32 uint32 words, word kk holding the eight outputs' 4-bit q at
 *                       input kk (output j in bits 4j); w = d * q + m (Q4_0: m = -8 d);
 *   q4x16:              float d[16], float m[16], then 32 uint64 words, output j's q at bits 4 (j / 2) + 32 (j % 2):
 *                       the even outputs in the low half, the odd ones in the high half, so shifting each 64-bit lane
 *                       i by 4i leaves output j's q at the bottom of 32-bit lane j;
 *   q8x8, q8x16 (Q8_0): float d[G], then 32 x G int8 q (input kk's G outputs side by side); w = d * q.
 * One k's weights for G outputs then dequantize into one vector, which every row's broadcast x[t, k] multiplies:
 * the dequantization is paid once per 16 rows. Rows are first copied k-major (pack_rows), so one pointer with
 * constant offsets reaches every row's value at k. Groups are shared among `num_threads` OpenMP threads.
 *
 * G = 16 fills AVX-512's 512-bit registers (isa.py's avx512 variant loads those layouts): half the instructions per
 * multiply-add of G = 8, at the FMA units' full width; the other variants read G = 8, whose accumulators fit AVX2's
 * sixteen registers. Every variant builds every layout (the vector extension splits a wider vector), so each is
 * tested everywhere. */
#include <stdint.h>
#include <string.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "kernels.h"
#include "vector_math.h"

typedef uint64_t u64x8 __attribute__((vector_size(64)));

enum { QK = 32, ROW_TILE = 16 }; /* inputs per block; rows sharing a dequantization */
enum { Q4X8_BLOCK = 16 * 4 + QK * 4, Q8X8_BLOCK = 8 * 4 + QK * 8 };      /* bytes per (group, block) */
enum { Q4X16_BLOCK = 32 * 4 + QK * 8, Q8X16_BLOCK = 16 * 4 + QK * 16 }; /* the same for groups of 16 */

/* Eight sign-extended int8s; the vector extension's own conversion is scalarized by GCC, one byte at a time. */
static inline i32x8 widen8(const uint8_t *p) {
#if defined(__AVX2__)
    return (i32x8)_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p));
#else
    int8_t q[8];
    memcpy(q, p, sizeof(q));
    return (i32x8){q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7]};
#endif
}

static inline f32x8 q4x8_weights(const uint8_t *block, int kk) {
    const float *dm = (const float *)block;
    int32_t word;
    memcpy(&word, block + 64 + 4 * kk, sizeof(word));
    const i32x8 shifts = {0, 4, 8, 12, 16, 20, 24, 28};
    const i32x8 q = (((i32x8){} + word) >> shifts) & 15;
    return __builtin_convertvector(q, f32x8) * load8(dm) + load8(dm + 8);
}

static inline f32x8 q8x8_weights(const uint8_t *block, int kk) {
    return __builtin_convertvector(widen8(block + 32 + 8 * kk), f32x8) * load8((const float *)block);
}

static inline f32x16 q4x16_weights(const uint8_t *block, int kk) {
    const float *dm = (const float *)block;
    uint64_t word;
    memcpy(&word, block + 128 + 8 * kk, sizeof(word));
    const u64x8 shifts = {0, 4, 8, 12, 16, 20, 24, 28};
    const i32x16 q = (i32x16)(((u64x8){} + word) >> shifts) & 15;
    return __builtin_convertvector(q, f32x16) * load16(dm) + load16(dm + 16);
}

/* Sixteen sign-extended int8s (see widen8). */
static inline i32x16 widen16(const uint8_t *p) {
#if defined(__AVX512F__)
    return (i32x16)_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p));
#else
    const i32x8 low = widen8(p), high = widen8(p + 8);
    return (i32x16){low[0],  low[1],  low[2],  low[3],  low[4],  low[5],  low[6],  low[7],
                    high[0], high[1], high[2], high[3], high[4], high[5], high[6], high[7]};
#endif
}

static inline f32x16 q8x16_weights(const uint8_t *block, int kk) {
    return __builtin_convertvector(widen16(block + 64 + 16 * kk), f32x16) * load16((const float *)block);
}

/* y[rt, G] (rows n apart) = the packed rows xp [blocks][QK][rt] times one group's weights (+ bias[G]), G the width
 * of vector type V. A row's FMAs
 * form one dependency chain, so tiles of fewer than eight rows would wait on the FMA latency rather than its
 * throughput: they interleave 2 or 4 chains over consecutive k. Inlined per constant rt (the switch below), so the
 * accumulators live in registers. */
#define GROUP_TILE(NAME, V, WEIGHTS, BLOCK_BYTES)                                                                      \
    static inline __attribute__((always_inline)) void NAME(const float *xp, const uint8_t *group, int64_t blocks,     \
                                                           const float *bias, float *y, int64_t n, const int rt) {     \
        const int chains = rt >= 8 ? 1 : (rt >= 4 ? 2 : 4);                                                           \
        V acc[4][ROW_TILE];                                                                                            \
        for (int c = 0; c < chains; ++c)                                                                               \
            for (int t = 0; t < rt; ++t) acc[c][t] = (V){};                                                            \
        for (int64_t b = 0; b < blocks; ++b) {                                                                         \
            const uint8_t *block = group + b * BLOCK_BYTES;                                                            \
            const float *xb = xp + b * QK * rt;                                                                        \
            for (int kk = 0; kk < QK; kk += chains) {                                                                  \
                for (int c = 0; c < chains; ++c) {                                                                     \
                    const V w = WEIGHTS(block, kk + c);                                                                \
                    for (int t = 0; t < rt; ++t) acc[c][t] += xb[(kk + c) * rt + t] * w;                               \
                }                                                                                                      \
            }                                                                                                          \
        }                                                                                                              \
        const V bg = bias != NULL ? LOAD(V, bias) : (V){};                                                             \
        for (int t = 0; t < rt; ++t) {                                                                                 \
            V sum = acc[0][t];                                                                                         \
            for (int c = 1; c < chains; ++c) sum += acc[c][t];                                                         \
            sum += bg;                                                                                                 \
            memcpy(y + t * n, &sum, sizeof(sum));                                                                      \
        }                                                                                                              \
    }

GROUP_TILE(q4x8_tile, f32x8, q4x8_weights, Q4X8_BLOCK)
GROUP_TILE(q8x8_tile, f32x8, q8x8_weights, Q8X8_BLOCK)
GROUP_TILE(q4x16_tile, f32x16, q4x16_weights, Q4X16_BLOCK)
GROUP_TILE(q8x16_tile, f32x16, q8x16_weights, Q8X16_BLOCK)

/* xp[tile][b][kk][t] = x[tile * ROW_TILE + t][b * QK + kk] for tiles of ROW_TILE rows (the last one shorter). */
static void pack_rows(const float *x, int64_t x_row, float *xp, int64_t tokens, int64_t k) {
    for (int64_t t0 = 0; t0 < tokens; t0 += ROW_TILE) {
        const int64_t rt = tokens - t0 < ROW_TILE ? tokens - t0 : ROW_TILE;
        float *tile = xp + t0 * k;
        for (int64_t t = 0; t < rt; ++t)
            for (int64_t i = 0; i < k; ++i) tile[i * rt + t] = x[(t0 + t) * x_row + i];
    }
}

#define EACH_TILE_SIZE(TILE)                                                                                           \
    switch (rt) {                                                                                                      \
    case 1: TILE(xp, group, blocks, bg, yt, n, 1); break;                                                              \
    case 2: TILE(xp, group, blocks, bg, yt, n, 2); break;                                                              \
    case 3: TILE(xp, group, blocks, bg, yt, n, 3); break;                                                              \
    case 4: TILE(xp, group, blocks, bg, yt, n, 4); break;                                                              \
    case 5: TILE(xp, group, blocks, bg, yt, n, 5); break;                                                              \
    case 6: TILE(xp, group, blocks, bg, yt, n, 6); break;                                                              \
    case 7: TILE(xp, group, blocks, bg, yt, n, 7); break;                                                              \
    case 8: TILE(xp, group, blocks, bg, yt, n, 8); break;                                                              \
    case 9: TILE(xp, group, blocks, bg, yt, n, 9); break;                                                              \
    case 10: TILE(xp, group, blocks, bg, yt, n, 10); break;                                                            \
    case 11: TILE(xp, group, blocks, bg, yt, n, 11); break;                                                            \
    case 12: TILE(xp, group, blocks, bg, yt, n, 12); break;                                                            \
    case 13: TILE(xp, group, blocks, bg, yt, n, 13); break;                                                            \
    case 14: TILE(xp, group, blocks, bg, yt, n, 14); break;                                                            \
    case 15: TILE(xp, group, blocks, bg, yt, n, 15); break;                                                            \
    default: TILE(xp, group, blocks, bg, yt, n, ROW_TILE); break;                                                      \
    }

/* y[T, N] = x[T, K] (rows x_row apart) . w^T (+ bias[N]) for w packed as `TILE`'s layout in groups of G; N a multiple
 * of G, K of 32; scratch holds T * K floats (the packed rows). */
#define BLOCK_LINEAR(NAME, TILE, G, BLOCK_BYTES)                                                                       \
    void NAME(const float *x, int64_t x_row, const uint8_t *w, const float *bias, float *y, int64_t tokens,           \
              int64_t n, int64_t k, float *scratch, int32_t num_threads) {                                             \
        const int64_t blocks = k / QK;                                                                                 \
        pack_rows(x, x_row, scratch, tokens, k);                                                                       \
        _Pragma("omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1)")                     \
        for (int64_t g = 0; g < n / G; ++g) {                                                                          \
            const uint8_t *group = w + g * blocks * BLOCK_BYTES;                                                       \
            const float *bg = bias != NULL ? bias + g * G : NULL;                                                      \
            for (int64_t t0 = 0; t0 < tokens; t0 += ROW_TILE) {                                                        \
                const int rt = tokens - t0 < ROW_TILE ? (int)(tokens - t0) : ROW_TILE;                                 \
                const float *xp = scratch + t0 * k;                                                                    \
                float *yt = y + t0 * n + g * G;                                                                        \
                EACH_TILE_SIZE(TILE)                                                                                   \
            }                                                                                                          \
        }                                                                                                              \
    }

BLOCK_LINEAR(linear_q4x8_f32, q4x8_tile, 8, Q4X8_BLOCK)
BLOCK_LINEAR(linear_q8x8_f32, q8x8_tile, 8, Q8X8_BLOCK)
BLOCK_LINEAR(linear_q4x16_f32, q4x16_tile, 16, Q4X16_BLOCK)
BLOCK_LINEAR(linear_q8x16_f32, q8x16_tile, 16, Q8X16_BLOCK)
