/* Linears over GGUF-quantized weights, called through ctypes by sagellm.backends.native. Q4_K, Q5_K, Q6_K and
 * MXFP4 at up to INT8_MAX_ROWS rows go to block_int8.c's int8 dot products instead, and the 16-wide layouts but
 * MXFP4's from INT16_MIN_ROWS rows on to block_int16.c's int16 ones where the variant has AVX-512 VNNI (kernels.h
 * says why); block_readers.h reads the layouts for both.
 *
 * Decode streams every weight once per step. A Q4_1 weight is 0.75 bytes per value in the layout below where its
 * dequantized fp32 copy is 4, so these kernels read 5x less memory than the fp32 GEMMs; they dequantize in registers
 * and multiply in fp32, so the result is the fp32 linear on exactly the dequantized weights (d * q is exact in fp32:
 * an fp16 scale, or a K-quant's fp16 times its sub-block's 6- or 8-bit scale, times a 4- to 8-bit integer; only
 * the + m rounds, as it does in gguf-py), summed in another order.
 *
 * Layouts (backends/native/block_layout.py writes them from the GGUF blocks): outputs in groups of G (8 or 16), and
 * for each group and each block of 32 inputs,
 *   q4x8 (Q4_0, Q4_1):  float d[8], float m[8], then 32 uint32 words, word kk holding the eight outputs' 4-bit
 *                       q at input kk (output j in bits 4j); w = d * q + m (Q4_0: m = -8 d);
 *   q4x16:              float d[16], float m[16], then 32 uint64 words, output j's q at bits 4 (j / 2) + 32 (j % 2):
 *                       the even outputs in the low half, the odd ones in the high half, so shifting each 64-bit lane
 *                       i by 4i leaves output j's q at the bottom of 32-bit lane j;
 *   q8x8, q8x16 (Q8_0, Q5_0): float d[G], then 32 x G int8 q (input kk's G outputs side by side); w = d * q.
 * The K-quants' layouts keep a super-block of 256 inputs whole, with their sub-blocks' integer scales, and the
 * kernels form each sub-block's float scales once per group (D = d * sc is exact in fp32, as gguf-py forms it):
 *   q4kx8, q4kx16 (Q4_K): float d[G], float dmin[G], int8 sc[8][G], int8 m[8][G], then the 4-bit q in 32
 *                       chunks of 8 inputs, each a 32-bit lane per output whose byte i holds input i (low nibble)
 *                       and 4 + i (high), the operands of block_int8.c's dot products; sub-block j (32 inputs) has
 *                       w = (d sc_j) q - dmin m_j;
 *   q5kx8, q5kx16 (Q5_K): q4kxG's fields (the chunks the low 4 bits of q), then per sub-block of 32 inputs a
 *                       32-bit lane per output of their fifth bits (q5kx8_weights says in which order);
 *   q6kx8, q6kx16 (Q6_K): float d[G], int8 sc[16][G], then 256 x G int8 q (q6 - 32); w = (d sc_{kk / 16}) q;
 *   mxfp4x8, mxfp4x16 (MXFP4): per block of 32 inputs the 4-bit E2M1 codes in q4kx's 4 chunks of 8 inputs, then
 *                       uint8 e[G]; w = kvalues_mxfp4[code] * 2^(e - 128) (mxfp4.h), both factors formed here.
 * One k's weights for G outputs then dequantize into one vector, which every row's broadcast x[t, k] multiplies:
 * the dequantization is paid once per ROW_TILE rows. Rows are first copied k-major (pack_row_tiles), so one pointer
 * with constant offsets reaches every row's value at k. Groups are shared among `num_threads` OpenMP threads. From
 * PANEL_MIN_ROWS rows on the 8-wide layouts go to block_panel.c, which pays it once per call and multiplies in
 * FMA-bound tiles of 6 rows.
 *
 * G = 16 fills AVX-512's 512-bit registers (isa.py's avx512 variants load those layouts): half the instructions per
 * multiply-add of G = 8, at the FMA units' full width; the other variants read G = 8, whose 8 rows' accumulators
 * fit AVX2's sixteen registers. Every variant builds every layout (the vector extension splits a wider vector), so
 * each is tested everywhere. */
#include <stdint.h>
#include <string.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "block_layouts.h"
#include "block_readers.h"
#include "kernels.h"
#include "mxfp4.h"
#include "vector_math.h"

/* The 8 inputs of a run unrolled, so each one's offsets and shift counts are constants: ~10% faster at a few rows
 * (2048 x 8192 Q5_K, 1-2 rows, AVX-512). Only for the group width the variant reads (16 with AVX-512, 8 with AVX2):
 * unrolling the others, and the portable build's emulated vectors, would triple the compile time for nothing. */
#if defined(__AVX512F__)
#define UNROLL_IN_16 _Pragma("GCC unroll 8")
#define UNROLL_IN_8
#elif defined(__AVX2__)
#define UNROLL_IN_16
#define UNROLL_IN_8 _Pragma("GCC unroll 8")
#else
#define UNROLL_IN_16
#define UNROLL_IN_8
#endif

/* Rows sharing each dequantized weight: as many accumulators as the vector registers hold beside the weight, its
 * scales and the row's broadcast value. AVX-512's 32 registers take 16; AVX2's 16 take 8, where 16 spilled to the
 * stack: 1.2-1.5x at 16 rows with 8 (a 2-core AVX2 EPYC, Zen 3: Q4_1 576x1536 to 3072x576 53-70 -> 75-85 GFLOP/s,
 * Q4_K 2048x2048 to 2048x8192 46-63 -> 73-86), 10 and 12 no better. */
#if defined(__AVX512F__)
enum { ROW_TILE = 16 };
#else
enum { ROW_TILE = 8 };
#endif

/* y[rt, G] (rows n apart) = the packed rows xp [blocks][INPUTS][rt] times one group's weights (+ bias[G]), G the
 * width of vector type V; each block of INPUTS inputs in sub-blocks of SUB sharing their scales (S). A row's FMAs
 * form one dependency chain, so tiles of fewer than eight rows would wait on the FMA latency rather than its
 * throughput: they interleave 2 or 4 chains over consecutive k. Inlined per constant rt (the switch below), so the
 * accumulators live in registers. */
#define GROUP_TILE(NAME, V, G, S, INPUTS, SUB, SCALES, WEIGHTS, BLOCK_BYTES)                                           \
    static inline __attribute__((always_inline)) void NAME(const float *xp, const uint8_t *group, int64_t blocks,     \
                                                           const float *bias, float *y, int64_t n, const int rt) {     \
        const int chains = rt >= 8 ? 1 : (rt >= 4 ? 2 : 4);                                                           \
        V acc[4][ROW_TILE];                                                                                            \
        for (int c = 0; c < chains; ++c)                                                                               \
            for (int t = 0; t < rt; ++t) acc[c][t] = (V){};                                                            \
        for (int64_t b = 0; b < blocks; ++b) {                                                                         \
            const uint8_t *block = group + b * BLOCK_BYTES;                                                            \
            const float *xb = xp + b * INPUTS * rt;                                                                    \
            for (int s = 0; s < INPUTS; s += SUB) {                                                                    \
                const S scales = SCALES(block, s);                                                                     \
                for (int run = s; run < s + SUB; run += 8) {                                                           \
                    UNROLL_IN_##G for (int i = 0; i < 8; i += chains) {                                                \
                        for (int c = 0; c < chains; ++c) {                                                             \
                            const V w = WEIGHTS(block, scales, run, i + c);                                            \
                            for (int t = 0; t < rt; ++t) acc[c][t] += xb[(run + i + c) * rt + t] * w;                  \
                        }                                                                                              \
                    }                                                                                                  \
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

GROUP_TILE(q4x8_tile, f32x8, 8, scales8, QK, QK, q4x8_scales, q4x8_weights, Q4X8_BLOCK)
GROUP_TILE(q8x8_tile, f32x8, 8, scales8, QK, QK, q8x8_scales, q8x8_weights, Q8X8_BLOCK)
GROUP_TILE(q4x16_tile, f32x16, 16, scales16, QK, QK, q4x16_scales, q4x16_weights, Q4X16_BLOCK)
GROUP_TILE(q8x16_tile, f32x16, 16, scales16, QK, QK, q8x16_scales, q8x16_weights, Q8X16_BLOCK)
GROUP_TILE(q4kx8_tile, f32x8, 8, scales8, QK_K, QK, q4kx8_scales, q4kx8_weights, Q4KX8_BLOCK)
GROUP_TILE(q4kx16_tile, f32x16, 16, scales16, QK_K, QK, q4kx16_scales, q4kx16_weights, Q4KX16_BLOCK)
GROUP_TILE(q5kx8_tile, f32x8, 8, scales8, QK_K, QK, q5kx8_scales, q5kx8_weights, Q5KX8_BLOCK)
GROUP_TILE(q5kx16_tile, f32x16, 16, scales16, QK_K, QK, q5kx16_scales, q5kx16_weights, Q5KX16_BLOCK)
GROUP_TILE(q6kx8_tile, f32x8, 8, scales8, QK_K, 16, q6kx8_scales, q6kx8_weights, Q6KX8_BLOCK)
GROUP_TILE(q6kx16_tile, f32x16, 16, scales16, QK_K, 16, q6kx16_scales, q6kx16_weights, Q6KX16_BLOCK)
GROUP_TILE(mxfp4x8_tile, f32x8, 8, scales8, QK, QK, mxfp4x8_scales, mxfp4x8_weights, MXFP4X8_BLOCK)
GROUP_TILE(mxfp4x16_tile, f32x16, 16, scales16, QK, QK, mxfp4x16_scales, mxfp4x16_weights, MXFP4X16_BLOCK)

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
 * of G, K of the layout's INPUTS per block; scratch holds T * K floats (the packed rows). FEW_ROWS: the layout's
 * int8 linear for up to INT8_MAX_ROWS rows, or NULL; MANY_ROWS: its linear from MANY_FROM rows on (the 16-wide
 * layouts' int16 one, the 8-wide ones' panels), or NULL. */
#define BLOCK_LINEAR(NAME, TILE, G, INPUTS, BLOCK_BYTES, FEW_ROWS, MANY_ROWS, MANY_FROM)                               \
    void NAME(const float *x, int64_t x_row, const uint8_t *w, const float *bias, float *y, int64_t tokens,           \
              int64_t n, int64_t k, float *scratch, int32_t num_threads) {                                             \
        const block_linear_fn few_rows = FEW_ROWS, many_rows = MANY_ROWS;                                              \
        if (few_rows != NULL && tokens <= INT8_MAX_ROWS) {                                                             \
            few_rows(x, x_row, w, bias, y, tokens, n, k, scratch, num_threads);                                        \
            return;                                                                                                    \
        }                                                                                                              \
        if (many_rows != NULL && tokens >= MANY_FROM) {                                                                \
            many_rows(x, x_row, w, bias, y, tokens, n, k, scratch, num_threads);                                       \
            return;                                                                                                    \
        }                                                                                                              \
        const int64_t blocks = k / INPUTS;                                                                             \
        pack_row_tiles(x, x_row, scratch, tokens, k, ROW_TILE);                                                        \
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

BLOCK_LINEAR(linear_q4x8_f32, q4x8_tile, 8, QK, Q4X8_BLOCK, NULL, linear_q4x8_panel, PANEL_MIN_ROWS)
BLOCK_LINEAR(linear_q8x8_f32, q8x8_tile, 8, QK, Q8X8_BLOCK, NULL, linear_q8x8_panel, PANEL_MIN_ROWS)
BLOCK_LINEAR(linear_q4x16_f32, q4x16_tile, 16, QK, Q4X16_BLOCK, NULL, INT16_LINEAR(linear_q4x16_i16), INT16_MIN_ROWS)
BLOCK_LINEAR(linear_q8x16_f32, q8x16_tile, 16, QK, Q8X16_BLOCK, NULL, INT16_LINEAR(linear_q8x16_i16), INT16_MIN_ROWS)
BLOCK_LINEAR(linear_q4kx8_f32, q4kx8_tile, 8, QK_K, Q4KX8_BLOCK, linear_q4kx8_i8, linear_q4kx8_panel,
             PANEL_MIN_ROWS)
BLOCK_LINEAR(linear_q4kx16_f32, q4kx16_tile, 16, QK_K, Q4KX16_BLOCK, linear_q4kx16_i8, INT16_LINEAR(linear_q4kx16_i16),
             INT16_MIN_ROWS)
BLOCK_LINEAR(linear_q5kx8_f32, q5kx8_tile, 8, QK_K, Q5KX8_BLOCK, linear_q5kx8_i8, linear_q5kx8_panel,
             PANEL_MIN_ROWS)
BLOCK_LINEAR(linear_q5kx16_f32, q5kx16_tile, 16, QK_K, Q5KX16_BLOCK, linear_q5kx16_i8, INT16_LINEAR(linear_q5kx16_i16),
             INT16_MIN_ROWS)
BLOCK_LINEAR(linear_q6kx8_f32, q6kx8_tile, 8, QK_K, Q6KX8_BLOCK, linear_q6kx8_i8, linear_q6kx8_panel,
             PANEL_MIN_ROWS)
BLOCK_LINEAR(linear_q6kx16_f32, q6kx16_tile, 16, QK_K, Q6KX16_BLOCK, linear_q6kx16_i8, INT16_LINEAR(linear_q6kx16_i16),
             INT16_MIN_ROWS)
BLOCK_LINEAR(linear_mxfp4x8_f32, mxfp4x8_tile, 8, QK, MXFP4X8_BLOCK, linear_mxfp4x8_i8, linear_mxfp4x8_panel,
             PANEL_MIN_ROWS)
BLOCK_LINEAR(linear_mxfp4x16_f32, mxfp4x16_tile, 16, QK, MXFP4X16_BLOCK, linear_mxfp4x16_i8, NULL, INT16_MIN_ROWS)

/* out[k][j] (rows groups * G floats apart) = the weight of output first_group * G + j at input k, for the outputs
 * of groups [first_group, first_group + groups): a k-major fp32 tile of the weight, for prefill-sized calls to
 * multiply by with a GEMM (ops.py's block_linear_large) rather than keep an fp32 copy of the whole weight. Each
 * input's G weights come from the layout's SCALES and WEIGHTS, the ones the linears above multiply by, as one vector
 * store: the same floats, bit for bit. The `num_threads` OpenMP threads share the blocks of inputs, each writing
 * whole rows of the tile, with ~1.5-4x the weights per second of sharing the groups, whose threads interleave their
 * stores within each row (2048 x 2048 Q4_1 in tiles of 0.5-2 MB on two AVX-512 cores: 17-19 Gweights/s against
 * 4-14). */
#define BLOCK_DEQUANTIZE(NAME, V, S, G, INPUTS, SUB, SCALES, WEIGHTS, BLOCK_BYTES)                                     \
    void NAME(const uint8_t *w, int64_t k, int64_t first_group, int64_t groups, float *out, int32_t num_threads) {    \
        const int64_t blocks = k / INPUTS, width = groups * G;                                                         \
        _Pragma("omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1)")                     \
        for (int64_t b = 0; b < blocks; ++b) {                                                                         \
            for (int64_t g = 0; g < groups; ++g) {                                                                     \
                const uint8_t *block = w + ((first_group + g) * blocks + b) * BLOCK_BYTES;                              \
                float *rows = out + b * INPUTS * width + g * G;                                                        \
                for (int s = 0; s < INPUTS; s += SUB) {                                                                \
                    const S scales = SCALES(block, s);                                                                 \
                    for (int run = s; run < s + SUB; run += 8) {                                                       \
                        UNROLL_IN_##G for (int i = 0; i < 8; ++i) {                                                    \
                            const V v = WEIGHTS(block, scales, run, i);                                                \
                            memcpy(rows + (run + i) * width, &v, sizeof(v));                                           \
                        }                                                                                              \
                    }                                                                                                  \
                }                                                                                                      \
            }                                                                                                          \
        }                                                                                                              \
    }

BLOCK_DEQUANTIZE(dequantize_q4x8_f32, f32x8, scales8, 8, QK, QK, q4x8_scales, q4x8_weights, Q4X8_BLOCK)
BLOCK_DEQUANTIZE(dequantize_q8x8_f32, f32x8, scales8, 8, QK, QK, q8x8_scales, q8x8_weights, Q8X8_BLOCK)
BLOCK_DEQUANTIZE(dequantize_q4x16_f32, f32x16, scales16, 16, QK, QK, q4x16_scales, q4x16_weights, Q4X16_BLOCK)
BLOCK_DEQUANTIZE(dequantize_q8x16_f32, f32x16, scales16, 16, QK, QK, q8x16_scales, q8x16_weights, Q8X16_BLOCK)
BLOCK_DEQUANTIZE(dequantize_q4kx8_f32, f32x8, scales8, 8, QK_K, QK, q4kx8_scales, q4kx8_weights, Q4KX8_BLOCK)
BLOCK_DEQUANTIZE(dequantize_q4kx16_f32, f32x16, scales16, 16, QK_K, QK, q4kx16_scales, q4kx16_weights, Q4KX16_BLOCK)
BLOCK_DEQUANTIZE(dequantize_q5kx8_f32, f32x8, scales8, 8, QK_K, QK, q5kx8_scales, q5kx8_weights, Q5KX8_BLOCK)
BLOCK_DEQUANTIZE(dequantize_q5kx16_f32, f32x16, scales16, 16, QK_K, QK, q5kx16_scales, q5kx16_weights, Q5KX16_BLOCK)
BLOCK_DEQUANTIZE(dequantize_q6kx8_f32, f32x8, scales8, 8, QK_K, 16, q6kx8_scales, q6kx8_weights, Q6KX8_BLOCK)
BLOCK_DEQUANTIZE(dequantize_q6kx16_f32, f32x16, scales16, 16, QK_K, 16, q6kx16_scales, q6kx16_weights, Q6KX16_BLOCK)
BLOCK_DEQUANTIZE(dequantize_mxfp4x8_f32, f32x8, scales8, 8, QK, QK, mxfp4x8_scales, mxfp4x8_weights, MXFP4X8_BLOCK)
BLOCK_DEQUANTIZE(dequantize_mxfp4x16_f32, f32x16, scales16, 16, QK, QK, mxfp4x16_scales, mxfp4x16_weights,
                 MXFP4X16_BLOCK)
