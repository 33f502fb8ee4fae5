/* K-quant and MXFP4 linears for decode on int8 dot products, called by block_linear.c's linears for few rows (and through
 * ctypes by the tests and benchmarks).
 *
 * Dequantizing a 4-bit weight to fp32 and multiplying costs ~5 vector instructions per 16 weights (extract, convert,
 * scale, offset, FMA): at one row that, not memory, bounds block_linear.c's Q4_K kernel (~8 GB/s on two AVX-512
 * cores; ~16 here). Here the weights stay integers: an x row is split per 32 inputs into a scale s and PIECES int8
 * pieces, x = s (p1 + p2 / 254) to within 2^-16 of the 32 inputs' largest |x| (the pieces are rounded remainders,
 * the second 254x finer than the first), and each sub-block's sum of q * piece is a u8 x s8 dot product, 64
 * multiply-adds per AVX-512 VNNI instruction (vpdpbusd; AVX-512BW and AVX2 pair vpmaddubsw with vpmaddwd, the
 * portable build multiplies bytes in C). The integer sums are exact; per sub-block and row they are converted once
 * and combined, w = D q + M contributing
 *   D s (S1 + S2 / 254) + M sum(x),
 * with sum(x) the row's own fp32 sum over the sub-block. So the result is the fp32 linear on exactly gguf-py's
 * weights with x rounded to 2^-16 of its block's largest |x|: llama.cpp's kernels round x to one int8 piece (2^-8),
 * 128x coarser. A third piece would reach fp32's own 2^-24, at a third more integer work: at one row on AVX2 that
 * is the difference between ~14 and ~19 GB/s of Q4_K, and greedy tokens agree with fp32 either way except at ties.
 *
 * The layouts are block_linear.c's: q4kxG's (and q5kxG's) 4-bit q in chunks of 8 inputs, a 32-bit lane per output
 * whose byte i holds input i (low nibble) and 4 + i (high), so masking a chunk gives one vpdpbusd operand for inputs
 * 0-3 and shifting it one for 4-7 (Q5_K's fifth bits shifted into them); q6kxG's int8 q - 32, an input's G outputs
 * side by side as the fp32 kernel widens them, regrouped 4 inputs at a time into a lane per output (q6_lanes);
 * mxfp4xG's codes in q4kx's chunks, each byte's code looked up as its value + 12 (one pshufb per half). Each
 * broadcast of 4 bytes of a piece multiplies G outputs' weights at once. Rows are taken PIECE_ROWS at a time, their
 * int32 sums (PIECES per row) and fp32 accumulators in registers, the weights' chunks loaded once per tile of rows. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "block_layouts.h"
#include "kernels.h"
#include "mxfp4.h"
#include "vector_math.h"

enum { PIECES = 2, PIECE_ROWS = 4, X_BLOCK = 32, X_SUM = 16 }; /* pieces per value; rows per tile; inputs per scale
                                                                 and per sum */
static const float PIECE_STEP = 254.0f;                        /* each piece 254x finer than the one before */

/* x's rows as pieces, in the linear's scratch of tokens * k floats: per row scales[k / 32], sums[k / 16], then
 * int8 pieces[PIECES][k]. */
typedef struct {
    const float *scales, *sums;
    const int8_t *pieces;
    int64_t k;
} pieces_t;

static inline const float *row_scales(const pieces_t *x, int64_t t) { return x->scales + t * (x->k / X_BLOCK); }
static inline const float *row_sums(const pieces_t *x, int64_t t) { return x->sums + t * (x->k / X_SUM); }
static inline const int8_t *row_piece(const pieces_t *x, int64_t t, int p) {
    return x->pieces + (t * PIECES + p) * x->k;
}

/* Splits each 32 inputs of x's rows into a scale and PIECES int8 pieces (see the header), and sums each 16. A block
 * with a NaN or infinity keeps NaN as its scale and zero pieces, so its row's outputs are NaN as fp32's would be
 * (the other rows' are untouched); a block of zeros, or of values so small that amax / 127 underflows (< 2e-43),
 * has scale 0. Dividing by the scale, not multiplying by its inverse, keeps subnormal scales exact enough. */
static pieces_t split_rows(const float *x, int64_t x_row, int64_t tokens, int64_t k, float *scratch) {
    float *scales = scratch, *sums = scratch + tokens * (k / X_BLOCK);
    int8_t *pieces = (int8_t *)(sums + tokens * (k / X_SUM));
    for (int64_t t = 0; t < tokens; ++t) {
        const float *row = x + t * x_row;
        for (int64_t s = 0; s < k / X_SUM; ++s) {
            float sum = 0.0f;
            for (int i = 0; i < X_SUM; ++i) sum += row[X_SUM * s + i];
            sums[t * (k / X_SUM) + s] = sum;
        }
        for (int64_t b = 0; b < k / X_BLOCK; ++b) {
            const float *v = row + X_BLOCK * b;
            const float scale = int8_scale(v, X_BLOCK);
            scales[t * (k / X_BLOCK) + b] = scale;
            for (int i = 0; i < X_BLOCK; ++i) {
                float rest = scale > 0.0f ? v[i] / scale : 0.0f; /* NaN > 0 is false */
                for (int p = 0; p < PIECES; ++p) {
                    const float piece = rintf(rest);
                    pieces[(t * PIECES + p) * k + X_BLOCK * b + i] = (int8_t)piece;
                    rest = (rest - piece) * PIECE_STEP;
                }
            }
        }
    }
    return (pieces_t){scales, sums, pieces, k};
}

/* acc + per 32-bit lane the dot product of u's 4 unsigned bytes with s's 4 signed ones. */
static inline i32x8 dot8(i32x8 acc, i32x8 u, i32x8 s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return (i32x8)_mm256_dpbusd_epi32((__m256i)acc, (__m256i)u, (__m256i)s);
#elif defined(__AVX2__)
    return acc + (i32x8)_mm256_madd_epi16(_mm256_maddubs_epi16((__m256i)u, (__m256i)s), _mm256_set1_epi16(1));
#else
    i32x8 sum = acc;
    for (int byte = 0; byte < 4; ++byte)
        sum += ((u >> 8 * byte) & 255) * ((s << (24 - 8 * byte)) >> 24);
    return sum;
#endif
}

static inline i32x16 dot16(i32x16 acc, i32x16 u, i32x16 s) {
#if defined(__AVX512VNNI__)
    return (i32x16)_mm512_dpbusd_epi32((__m512i)acc, (__m512i)u, (__m512i)s);
#elif defined(__AVX512BW__)
    return acc + (i32x16)_mm512_madd_epi16(_mm512_maddubs_epi16((__m512i)u, (__m512i)s), _mm512_set1_epi16(1));
#else
    i32x16 sum = acc;
    for (int byte = 0; byte < 4; ++byte)
        sum += ((u >> 8 * byte) & 255) * ((s << (24 - 8 * byte)) >> 24);
    return sum;
#endif
}

/* dot(dot(acc, u1, s1), u2, s2). Without VNNI the two vpmaddubsw results are added as int16 before the one vpmaddwd:
 * each pair sum is at most 2 x 63 x 127 (Q6_K's q; 2 x 31 x 127 for Q5_K), so two of them stay below int16's
 * 32767 and the sums are the same integers, for one instruction fewer per pair. */
static inline i32x8 dot8_pair(i32x8 acc, i32x8 u1, i32x8 s1, i32x8 u2, i32x8 s2) {
#if defined(__AVX2__) && !(defined(__AVX512VNNI__) && defined(__AVX512VL__))
    const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16((__m256i)u1, (__m256i)s1),
                                           _mm256_maddubs_epi16((__m256i)u2, (__m256i)s2));
    return acc + (i32x8)_mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
#else
    return dot8(dot8(acc, u1, s1), u2, s2);
#endif
}

static inline i32x16 dot16_pair(i32x16 acc, i32x16 u1, i32x16 s1, i32x16 u2, i32x16 s2) {
#if defined(__AVX512BW__) && !defined(__AVX512VNNI__)
    const __m512i pairs = _mm512_add_epi16(_mm512_maddubs_epi16((__m512i)u1, (__m512i)s1),
                                           _mm512_maddubs_epi16((__m512i)u2, (__m512i)s2));
    return acc + (i32x16)_mm512_madd_epi16(pairs, _mm512_set1_epi16(1));
#else
    return dot16(dot16(acc, u1, s1), u2, s2);
#endif
}

typedef uint32_t u32x8 __attribute__((vector_size(32))); /* i32x8, i32x16 unsigned: left shifts defined */
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int8_t i8x32 __attribute__((vector_size(32)));
typedef int8_t i8x64 __attribute__((vector_size(64)));

/* q6kx's 4 inputs x G outputs of int8 q - 32 (an input's G side by side, as the fp32 kernel widens them) as lanes of
 * the unsigned q (0..63): lane j's byte i from input i, output j, plus 32. GCC lowers the constant shuffle to what
 * the instruction set has (AVX-512 VBMI's vpermb, else byte shuffles and permutes). */
#define LANE_ORDER8(j) (j), 8 + (j), 16 + (j), 24 + (j)
#define LANE_ORDER16(j) (j), 16 + (j), 32 + (j), 48 + (j)
static inline i32x8 q6_lanes_8(const uint8_t *p) {
    const i8x32 order = {LANE_ORDER8(0), LANE_ORDER8(1), LANE_ORDER8(2), LANE_ORDER8(3),
                         LANE_ORDER8(4), LANE_ORDER8(5), LANE_ORDER8(6), LANE_ORDER8(7)};
    return (i32x8)(__builtin_shuffle(LOAD(i8x32, p), order) + 32);
}

static inline i32x16 q6_lanes_16(const uint8_t *p) {
    const i8x64 order = {LANE_ORDER16(0),  LANE_ORDER16(1),  LANE_ORDER16(2),  LANE_ORDER16(3),
                         LANE_ORDER16(4),  LANE_ORDER16(5),  LANE_ORDER16(6),  LANE_ORDER16(7),
                         LANE_ORDER16(8),  LANE_ORDER16(9),  LANE_ORDER16(10), LANE_ORDER16(11),
                         LANE_ORDER16(12), LANE_ORDER16(13), LANE_ORDER16(14), LANE_ORDER16(15)};
    return (i32x16)(__builtin_shuffle(LOAD(i8x64, p), order) + 32);
}

/* Four bytes of a piece in every lane. */
static inline int32_t four_bytes(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, sizeof(v));
    return v;
}

/* The pieces' int32 sums of one sub-block, converted and weighted: S1 + S2 / 254. */
#define COMBINE(V, sums)                                                                                               \
    (__builtin_convertvector((sums)[0], V) + __builtin_convertvector((sums)[1], V) * (1.0f / PIECE_STEP))

/* The tile's rows' sums gain 8 inputs from `at`: `low` (4 codes a lane) against each piece's first 4 bytes there,
 * `high` against its next 4 (a chunk's low and high nibbles). */
#define DOT_NIBBLES(DOT, I, sums, low, high, at)                                                                       \
    for (int t = 0; t < rt; ++t)                                                                                       \
        for (int p = 0; p < PIECES; ++p) {                                                                             \
            const int8_t *piece = row_piece(x, t0 + t, p) + (at);                                                      \
            sums[t][p] =                                                                                               \
                DOT##_pair(sums[t][p], low, (I){} + four_bytes(piece), high, (I){} + four_bytes(piece + 4));           \
        }

/* y[rt, G] (rows n apart) += one group's Q4_K (FIFTH 0) or Q5_K (1) weights times rows t0.. of x's pieces, over
 * `blocks` super-blocks. Q5_K's fifth bits (a lane per output per sub-block, block_linear.c's q5kx) go to bit 4 of
 * the chunk's bytes: input 8c + i's sits at bit 8i + c (low half) or 8i + 4 + c (high), so shifting the lane by
 * 4 - c up, or c down, and masking bit 4 of each byte places a chunk's. */
#define Q4K_TILE(NAME, V, I, G, DOT, BYTES, FIFTH)                                                                     \
    static inline __attribute__((always_inline)) void NAME(const pieces_t *x, int64_t t0, const uint8_t *group,       \
                                                           int64_t blocks, V *acc, const int rt) {                    \
        for (int64_t b = 0; b < blocks; ++b) {                                                                         \
            const uint8_t *block = group + b * BYTES;                                                                  \
            const V d = LOAD(V, block), dmin = LOAD(V, block + 4 * G);                                                 \
            for (int j = 0; j < 8; ++j) {                                                                              \
                const V step = d * __builtin_convertvector(widen##G(block + 8 * G + G * j), V);                       \
                const V offset = -(dmin * __builtin_convertvector(widen##G(block + 16 * G + G * j), V));              \
                I sums[PIECE_ROWS][PIECES] = {};                                                                       \
                const I fifth = FIFTH ? LOAD(I, block + 152 * G + 4 * G * j) : (I){};                                  \
                for (int c = 0; c < 4; ++c) {                                                                          \
                    const I raw = LOAD(I, block + 24 * G + 4 * G * (4 * j + c));                                       \
                    I low = raw & 0x0F0F0F0F, high = (raw >> 4) & 0x0F0F0F0F;                                          \
                    if (FIFTH) {                                                                                       \
                        low |= (I)((u32x##G)fifth << (4 - c)) & 0x10101010;                                            \
                        high |= (fifth >> c) & 0x10101010;                                                             \
                    }                                                                                                  \
                    const int64_t at = 256 * b + 32 * j + 8 * c;                                                       \
                    DOT_NIBBLES(DOT, I, sums, low, high, at);                                                          \
                }                                                                                                      \
                for (int t = 0; t < rt; ++t) {                                                                         \
                    const float *sum = row_sums(x, t0 + t) + 16 * b + 2 * j;                                           \
                    acc[t] += step * row_scales(x, t0 + t)[8 * b + j] * COMBINE(V, sums[t]) + offset * (sum[0] + sum[1]); \
                }                                                                                                      \
            }                                                                                                          \
        }                                                                                                              \
    }

/* The same for Q6_K: 16 sub-blocks of 16 inputs, w = D (q - 32) with the unsigned q (0..63) from q6_lanes, so a
 * sub-block contributes D (s S - 32 sum(x)). vpmaddubsw's int16 pairs stay below saturation: 2 x 63 x 127. */
#define Q6K_TILE(NAME, V, I, G, DOT, BYTES)                                                                            \
    static inline __attribute__((always_inline)) void NAME(const pieces_t *x, int64_t t0, const uint8_t *group,       \
                                                           int64_t blocks, V *acc, const int rt) {                    \
        for (int64_t b = 0; b < blocks; ++b) {                                                                         \
            const uint8_t *block = group + b * BYTES;                                                                  \
            const V d = LOAD(V, block);                                                                                \
            for (int j = 0; j < 16; ++j) {                                                                             \
                const V step = d * __builtin_convertvector(widen##G(block + 4 * G + G * j), V);                       \
                I sums[PIECE_ROWS][PIECES] = {};                                                                       \
                for (int c = 0; c < 4; c += 2) {                                                                       \
                    const I first = q6_lanes_##G(block + 20 * G + 4 * G * (4 * j + c));                                \
                    const I second = q6_lanes_##G(block + 20 * G + 4 * G * (4 * j + c + 1));                           \
                    const int64_t at = 256 * b + 16 * j + 4 * c;                                                      \
                    for (int t = 0; t < rt; ++t)                                                                       \
                        for (int p = 0; p < PIECES; ++p) {                                                             \
                            const int8_t *piece = row_piece(x, t0 + t, p) + at;                                        \
                            sums[t][p] = DOT##_pair(sums[t][p], first, (I){} + four_bytes(piece), second,              \
                                                    (I){} + four_bytes(piece + 4));                                    \
                        }                                                                                              \
                }                                                                                                      \
                for (int t = 0; t < rt; ++t) {                                                                         \
                    const float scale = row_scales(x, t0 + t)[(256 * b + 16 * j) / X_BLOCK];                           \
                    const float sum = row_sums(x, t0 + t)[16 * b + j];                                                 \
                    acc[t] += step * (scale * COMBINE(V, sums[t]) - 32.0f * sum);                                      \
                }                                                                                                      \
            }                                                                                                          \
        }                                                                                                              \
    }

/* The same for MXFP4 (mxfp4xG): blocks of 32 inputs in q4kx's chunks, w = d (u - 12) with the unsigned u (0..24) a
 * byte table's (mxfp4.h), so a block contributes d (s S - 12 sum(x)). */
#define MXFP4_TILE(NAME, V, I, G, DOT, BYTES)                                                                          \
    static inline __attribute__((always_inline)) void NAME(const pieces_t *x, int64_t t0, const uint8_t *group,       \
                                                           int64_t blocks, V *acc, const int rt) {                    \
        for (int64_t b = 0; b < blocks; ++b) {                                                                         \
            const uint8_t *block = group + b * BYTES;                                                                  \
            I sums[PIECE_ROWS][PIECES] = {};                                                                           \
            for (int c = 0; c < 4; ++c) {                                                                              \
                const I raw = LOAD(I, block + 4 * G * c);                                                              \
                const I low = mxfp4_bytes##G(raw & 0x0F0F0F0F), high = mxfp4_bytes##G((raw >> 4) & 0x0F0F0F0F);      \
                const int64_t at = 32 * b + 8 * c;                                                                     \
                DOT_NIBBLES(DOT, I, sums, low, high, at);                                                              \
            }                                                                                                          \
            const V d = e8m0_half##G(block + 16 * G);                                                                  \
            for (int t = 0; t < rt; ++t) {                                                                             \
                const float *sum = row_sums(x, t0 + t) + 2 * b;                                                        \
                acc[t] += d * (row_scales(x, t0 + t)[b] * COMBINE(V, sums[t]) - MXFP4_OFFSET * (sum[0] + sum[1]));     \
            }                                                                                                          \
        }                                                                                                              \
    }

Q4K_TILE(q4kx8_pieces, f32x8, i32x8, 8, dot8, Q4KX8_BLOCK, 0)
Q4K_TILE(q4kx16_pieces, f32x16, i32x16, 16, dot16, Q4KX16_BLOCK, 0)
Q4K_TILE(q5kx8_pieces, f32x8, i32x8, 8, dot8, Q5KX8_BLOCK, 1)
Q4K_TILE(q5kx16_pieces, f32x16, i32x16, 16, dot16, Q5KX16_BLOCK, 1)
Q6K_TILE(q6kx8_pieces, f32x8, i32x8, 8, dot8, Q6KX8_BLOCK)
Q6K_TILE(q6kx16_pieces, f32x16, i32x16, 16, dot16, Q6KX16_BLOCK)
MXFP4_TILE(mxfp4x8_pieces, f32x8, i32x8, 8, dot8, MXFP4X8_BLOCK)
MXFP4_TILE(mxfp4x16_pieces, f32x16, i32x16, 16, dot16, MXFP4X16_BLOCK)

/* y[T, N] = x[T, K] (rows x_row apart) . w^T (+ bias[N]) on a K-quant's or MXFP4's layout in groups of G, blocks of
 * INPUTS inputs, through int8 pieces;
 * scratch holds T * K floats (the pieces take 3.4 bytes a value). Groups are shared among the OpenMP threads. */
#define PIECE_LINEAR(NAME, TILE, V, G, INPUTS, BYTES)                                                                  \
    void NAME(const float *x, int64_t x_row, const uint8_t *w, const float *bias, float *y, int64_t tokens,           \
              int64_t n, int64_t k, float *scratch, int32_t num_threads) {                                             \
        const int64_t blocks = k / INPUTS;                                                                             \
        const pieces_t pieces = split_rows(x, x_row, tokens, k, scratch);                                              \
        _Pragma("omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1)")                     \
        for (int64_t g = 0; g < n / G; ++g) {                                                                          \
            const uint8_t *group = w + g * blocks * BYTES;                                                             \
            const V bg = bias != NULL ? LOAD(V, bias + g * G) : (V){};                                                 \
            for (int64_t t0 = 0; t0 < tokens; t0 += PIECE_ROWS) {                                                      \
                const int rt = tokens - t0 < PIECE_ROWS ? (int)(tokens - t0) : PIECE_ROWS;                             \
                V acc[PIECE_ROWS] = {};                                                                                \
                switch (rt) {                                                                                          \
                case 1: TILE(&pieces, t0, group, blocks, acc, 1); break;                                               \
                case 2: TILE(&pieces, t0, group, blocks, acc, 2); break;                                               \
                case 3: TILE(&pieces, t0, group, blocks, acc, 3); break;                                               \
                default: TILE(&pieces, t0, group, blocks, acc, PIECE_ROWS); break;                                     \
                }                                                                                                      \
                for (int t = 0; t < rt; ++t) {                                                                         \
                    const V out = acc[t] + bg;                                                                         \
                    memcpy(y + (t0 + t) * n + g * G, &out, sizeof(out));                                               \
                }                                                                                                      \
            }                                                                                                          \
        }                                                                                                              \
    }

PIECE_LINEAR(linear_q4kx8_i8, q4kx8_pieces, f32x8, 8, QK_K, Q4KX8_BLOCK)
PIECE_LINEAR(linear_q4kx16_i8, q4kx16_pieces, f32x16, 16, QK_K, Q4KX16_BLOCK)
PIECE_LINEAR(linear_q5kx8_i8, q5kx8_pieces, f32x8, 8, QK_K, Q5KX8_BLOCK)
PIECE_LINEAR(linear_q5kx16_i8, q5kx16_pieces, f32x16, 16, QK_K, Q5KX16_BLOCK)
PIECE_LINEAR(linear_q6kx8_i8, q6kx8_pieces, f32x8, 8, QK_K, Q6KX8_BLOCK)
PIECE_LINEAR(linear_q6kx16_i8, q6kx16_pieces, f32x16, 16, QK_K, Q6KX16_BLOCK)
PIECE_LINEAR(linear_mxfp4x8_i8, mxfp4x8_pieces, f32x8, 8, QK, MXFP4X8_BLOCK)
PIECE_LINEAR(linear_mxfp4x16_i8, mxfp4x16_pieces, f32x16, 16, QK, MXFP4X16_BLOCK)
