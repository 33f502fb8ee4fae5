/* The 8-wide layouts' linears for more rows than one register tile holds (AVX2's 8): what block_linear.c's
 * BLOCK_LINEAR runs from PANEL_MIN_ROWS rows on (decode steps of many streams, prompt chunks below the GEMM's rows).
 *
 * block_linear.c dequantizes each weight in registers once per tile of 8 rows, so 16 rows pay for it twice and each
 * FMA waits on the dequantizing's shifts, converts and scale FMAs. Here a thread dequantizes two groups (16 outputs)
 * of a chunk of PANEL_INPUTS inputs once into a buffer that stays in L1 (16 KB), then multiplies every row by it in
 * tiles of 6 rows x 16 outputs: 12 accumulators, two weight loads and six broadcasts per input, the FMA-bound shape
 * of an AVX2 GEMM's micro-kernel. The weights are block_readers.h's, the ones block_linear.c multiplies by, and each
 * row's sums run over the inputs in order from zero, bias last, as block_linear.c's tiles of 8 rows do: the same
 * floats, bit for bit (the accumulators' trip through y between chunks is exact). */
#include <stdint.h>
#include <string.h>

#include "block_layouts.h"
#include "block_readers.h"
#include "kernels.h"
#include "mxfp4.h"
#include "vector_math.h"

enum { PANEL_ROWS = 6, PANEL_INPUTS = 256, PANEL_GROUPS = 2, PANEL_ROW_BLOCK = 32 * PANEL_ROWS };

/* The 8 inputs of a run unrolled where the variant reads the 8-wide layouts (AVX2), as block_linear.c does. */
#if defined(__AVX2__) && !defined(__AVX512F__)
#define UNROLL_RUN _Pragma("GCC unroll 8")
#else
#define UNROLL_RUN
#endif

/* y[rt, 8 * ng] (rows n apart) += xp[inputs][rt] . w[inputs][8 * ng] (the buffer, rows 16 floats apart), starting
 * from zero when `first`, adding bias[8 * ng] when it is not NULL (the last chunk). Inlined per constant rt and ng. */
static inline __attribute__((always_inline)) void panel_tile(const float *xp, const float *w, int64_t inputs,
                                                             float *y, int64_t n, int first, const float *bias,
                                                             const int rt, const int ng) {
    f32x8 acc[PANEL_ROWS][PANEL_GROUPS];
    for (int t = 0; t < rt; ++t)
        for (int g = 0; g < ng; ++g) acc[t][g] = first ? (f32x8){} : load8(y + t * n + 8 * g);
    for (int64_t i = 0; i < inputs; ++i) {
        f32x8 wv[PANEL_GROUPS];
        for (int g = 0; g < ng; ++g) wv[g] = load8(w + i * 8 * PANEL_GROUPS + 8 * g);
        for (int t = 0; t < rt; ++t)
            for (int g = 0; g < ng; ++g) acc[t][g] += xp[i * rt + t] * wv[g];
    }
    for (int t = 0; t < rt; ++t)
        for (int g = 0; g < ng; ++g) {
            f32x8 sum = acc[t][g];
            if (bias != NULL) sum += load8(bias + 8 * g);
            memcpy(y + t * n + 8 * g, &sum, sizeof(sum));
        }
}

#define EACH_PANEL_TILE(NG)                                                                                            \
    switch (rt) {                                                                                                      \
    case 1: panel_tile(xt, buffer, inputs, yt, n, first, bias_now, 1, NG); break;                                     \
    case 2: panel_tile(xt, buffer, inputs, yt, n, first, bias_now, 2, NG); break;                                     \
    case 3: panel_tile(xt, buffer, inputs, yt, n, first, bias_now, 3, NG); break;                                     \
    case 4: panel_tile(xt, buffer, inputs, yt, n, first, bias_now, 4, NG); break;                                     \
    case 5: panel_tile(xt, buffer, inputs, yt, n, first, bias_now, 5, NG); break;                                     \
    default: panel_tile(xt, buffer, inputs, yt, n, first, bias_now, PANEL_ROWS, NG); break;                           \
    }

/* y[T, N] = x[T, K] (rows x_row apart) . w^T (+ bias[N]) for w in an 8-wide layout (SCALES and WEIGHTS its
 * readers, INPUTS per block in sub-blocks of SUB); scratch holds T * K floats (the packed rows, which the threads
 * pack a tile each). Rows go in blocks of PANEL_ROW_BLOCK, and each block's inputs in chunks of PANEL_INPUTS: a
 * chunk of packed rows (192 x 256 floats, 192 KB) stays in L2 while every pair of groups of the thread reads it. The
 * `num_threads` OpenMP threads share the pairs, each the same ones in every chunk (static schedule), so none waits on
 * another. Taking every chunk of a pair before the next pair re-read each pair's whole row block (K = 1536: 1.2 MB)
 * from L3, ~10 GB/s a core: on two cores of an AVX2 EPYC (Zen 3), SmolLM2's Q4_1 layer linears at 256 rows took
 * ~18 ms where this order takes ~16.5, and a 256-token prefill 573 ms (median of 10) where it takes 524. */
#define PANEL_LINEAR(NAME, INPUTS, SUB, SCALES, WEIGHTS, BLOCK_BYTES)                                                  \
    void NAME(const float *x, int64_t x_row, const uint8_t *w, const float *bias, float *y, int64_t tokens,            \
              int64_t n, int64_t k, float *scratch, int32_t num_threads) {                                             \
        const int64_t blocks = k / INPUTS, groups = n / 8, chunk_blocks = PANEL_INPUTS / INPUTS;                       \
        _Pragma("omp parallel num_threads(num_threads) if (num_threads > 1)") {                                        \
            _Pragma("omp for schedule(static)")                                                                        \
            for (int64_t t0 = 0; t0 < tokens; t0 += PANEL_ROWS)                                                        \
                pack_row_tile(x, x_row, scratch, tokens, k, PANEL_ROWS, t0);                                           \
            float buffer[PANEL_INPUTS * 8 * PANEL_GROUPS] __attribute__((aligned(64)));                                \
            for (int64_t r0 = 0; r0 < tokens; r0 += PANEL_ROW_BLOCK) {                                                 \
                const int64_t r1 = r0 + PANEL_ROW_BLOCK < tokens ? r0 + PANEL_ROW_BLOCK : tokens;                      \
                for (int64_t b0 = 0; b0 < blocks; b0 += chunk_blocks) {                                                \
                    const int64_t b1 = b0 + chunk_blocks < blocks ? b0 + chunk_blocks : blocks;                        \
                    const int64_t inputs = (b1 - b0) * INPUTS;                                                         \
                    _Pragma("omp for schedule(static) nowait")                                                         \
                    for (int64_t pair = 0; pair < (groups + 1) / PANEL_GROUPS; ++pair) {                               \
                        const int64_t g0 = pair * PANEL_GROUPS;                                                        \
                        const int ng = groups - g0 < PANEL_GROUPS ? (int)(groups - g0) : PANEL_GROUPS;                 \
                        for (int g = 0; g < ng; ++g)                                                                   \
                            for (int64_t b = b0; b < b1; ++b) {                                                        \
                                const uint8_t *block = w + ((g0 + g) * blocks + b) * BLOCK_BYTES;                      \
                                float *rows = buffer + (b - b0) * INPUTS * 8 * PANEL_GROUPS + 8 * g;                   \
                                for (int s = 0; s < INPUTS; s += SUB) {                                                \
                                    const scales8 scales = SCALES(block, s);                                           \
                                    for (int run = s; run < s + SUB; run += 8)                                         \
                                        UNROLL_RUN for (int i = 0; i < 8; ++i) {                                       \
                                            const f32x8 v = WEIGHTS(block, scales, run, i);                            \
                                            memcpy(rows + (run + i) * 8 * PANEL_GROUPS, &v, sizeof(v));                \
                                        }                                                                              \
                                }                                                                                      \
                            }                                                                                          \
                        const int first = b0 == 0;                                                                     \
                        const float *bias_now = b1 == blocks && bias != NULL ? bias + g0 * 8 : NULL;                   \
                        for (int64_t t0 = r0; t0 < r1; t0 += PANEL_ROWS) {                                             \
                            const int rt = tokens - t0 < PANEL_ROWS ? (int)(tokens - t0) : PANEL_ROWS;                 \
                            const float *xt = scratch + t0 * k + b0 * INPUTS * rt;                                     \
                            float *yt = y + t0 * n + g0 * 8;                                                           \
                            if (ng == PANEL_GROUPS) {                                                                  \
                                EACH_PANEL_TILE(PANEL_GROUPS)                                                          \
                            } else {                                                                                   \
                                EACH_PANEL_TILE(1)                                                                     \
                            }                                                                                          \
                        }                                                                                              \
                    }                                                                                                  \
                }                                                                                                      \
            }                                                                                                          \
        }                                                                                                              \
    }

PANEL_LINEAR(linear_q4x8_panel, QK, QK, q4x8_scales, q4x8_weights, Q4X8_BLOCK)
PANEL_LINEAR(linear_q8x8_panel, QK, QK, q8x8_scales, q8x8_weights, Q8X8_BLOCK)
PANEL_LINEAR(linear_q4kx8_panel, QK_K, QK, q4kx8_scales, q4kx8_weights, Q4KX8_BLOCK)
PANEL_LINEAR(linear_q5kx8_panel, QK_K, QK, q5kx8_scales, q5kx8_weights, Q5KX8_BLOCK)
PANEL_LINEAR(linear_q6kx8_panel, QK_K, 16, q6kx8_scales, q6kx8_weights, Q6KX8_BLOCK)
PANEL_LINEAR(linear_mxfp4x8_panel, QK, QK, mxfp4x8_scales, mxfp4x8_weights, MXFP4X8_BLOCK)
