/* Readers of the interleaved GGUF layouts (block_linear.c draws them): a group's scales per sub-block, and each
 * input's weights for the group's outputs, as integers (the `_q` readers) and dequantized (`_weights`), shared by
 * block_linear.c's fp32 kernels and block_int16.c's int16 ones so the two read one layout one way; and the rows'
 * packing the fp32 kernels multiply from. */
#ifndef SAGELLM_BLOCK_READERS_H
#define SAGELLM_BLOCK_READERS_H

#include <stdint.h>
#include <string.h>

#include "block_layouts.h"
#include "mxfp4.h"
#include "vector_math.h"

typedef uint64_t u64x8 __attribute__((vector_size(64)));

/* xp[tile][i][t] = x[tile * rows + t][i] for tiles of `rows` rows (the last one shorter): k-major, so one tile's
 * values at any input, and its inputs of any block, are contiguous. The fp32 kernels multiply from it (block_linear.c's
 * register tiles, block_panel.c's panels), each with its own tile height. pack_row_tile packs the tile of rows
 * t0 .. t0 + rows - 1, so the panels' threads can share the tiles. */
static inline void pack_row_tile(const float *x, int64_t x_row, float *xp, int64_t tokens, int64_t k, int64_t rows,
                                 int64_t t0) {
    const int64_t rt = tokens - t0 < rows ? tokens - t0 : rows;
    float *tile = xp + t0 * k;
    for (int64_t t = 0; t < rt; ++t)
        for (int64_t i = 0; i < k; ++i) tile[i * rt + t] = x[(t0 + t) * x_row + i];
}

static inline void pack_row_tiles(const float *x, int64_t x_row, float *xp, int64_t tokens, int64_t k, int64_t rows) {
    for (int64_t t0 = 0; t0 < tokens; t0 += rows) pack_row_tile(x, x_row, xp, tokens, k, rows, t0);
}

/* A group's float scales for one sub-block of inputs, formed once and read by each input's WEIGHTS: w = d * q + m
 * (m unused where the layout has no min). */
typedef struct {
    f32x8 d, m;
} scales8;
typedef struct {
    f32x16 d, m;
} scales16;

static inline f32x8 float8(i32x8 q) { return __builtin_convertvector(q, f32x8); }
static inline f32x16 float16(i32x16 q) { return __builtin_convertvector(q, f32x16); }

/* Input kk's 4-bit q of a group of 8 from its q4x8 word (output j in bits 4j). */
static inline i32x8 nibbles8(const uint8_t *words, int kk) {
    int32_t word;
    memcpy(&word, words + 4 * kk, sizeof(word));
    const i32x8 shifts = {0, 4, 8, 12, 16, 20, 24, 28};
    return (((i32x8){} + word) >> shifts) & 15;
}

/* The same for a q4x16 word (output j at bits 4 (j / 2) + 32 (j % 2)): 64-bit lane i shifted by 4i leaves outputs
 * 2i and 2i + 1 at the bottom of its two 32-bit halves. */
static inline i32x16 nibbles16(const uint8_t *words, int kk) {
    uint64_t word;
    memcpy(&word, words + 8 * kk, sizeof(word));
    const u64x8 shifts = {0, 4, 8, 12, 16, 20, 24, 28};
    return (i32x16)(((u64x8){} + word) >> shifts) & 15;
}

static inline i32x8 load_i32x8(const uint8_t *p) {
    i32x8 v;
    memcpy(&v, p, sizeof(v));
    return v;
}

static inline i32x16 load_i32x16(const uint8_t *p) {
    i32x16 v;
    memcpy(&v, p, sizeof(v));
    return v;
}

/* Input run + i's 4-bit q of a group from q4kx's chunks of 8 inputs (a 32-bit lane per output, byte i holding
 * input i low and 4 + i high; `run` a multiple of 8): the chunk shifted by input i's count, a vector from a table
 * (one variable-shift instruction with its count loaded, where a scalar count costs moves and, on Intel, a second
 * micro-op per shift). */
#define SPLAT8(c) {c, c, c, c, c, c, c, c}
#define SPLAT16(c) {c, c, c, c, c, c, c, c, c, c, c, c, c, c, c, c}
#define NIBBLE_COUNTS(SPLAT) {SPLAT(0), SPLAT(8), SPLAT(16), SPLAT(24), SPLAT(4), SPLAT(12), SPLAT(20), SPLAT(28)}
static const i32x8 NIBBLE_SHIFTS8[8] = NIBBLE_COUNTS(SPLAT8);
static const i32x16 NIBBLE_SHIFTS16[8] = NIBBLE_COUNTS(SPLAT16);

static inline i32x8 chunk_nibbles8(const uint8_t *chunks, int run, int i) {
    return (load_i32x8(chunks + 4 * run) >> NIBBLE_SHIFTS8[i]) & 15;
}

static inline i32x16 chunk_nibbles16(const uint8_t *chunks, int run, int i) {
    return (load_i32x16(chunks + 8 * run) >> NIBBLE_SHIFTS16[i]) & 15;
}

static inline scales8 q4x8_scales(const uint8_t *block, int s) {
    (void)s;
    return (scales8){load8((const float *)block), load8((const float *)block + 8)};
}

static inline f32x8 q4x8_weights(const uint8_t *block, scales8 sc, int run, int i) {
    const int kk = run + i;
    return float8(nibbles8(block + 64, kk)) * sc.d + sc.m;
}

static inline scales8 q8x8_scales(const uint8_t *block, int s) {
    (void)s;
    return (scales8){load8((const float *)block), (f32x8){}};
}

static inline f32x8 q8x8_weights(const uint8_t *block, scales8 sc, int run, int i) {
    const int kk = run + i;
    return float8(widen8(block + 32 + 8 * kk)) * sc.d;
}

static inline scales16 q4x16_scales(const uint8_t *block, int s) {
    (void)s;
    return (scales16){load16((const float *)block), load16((const float *)block + 16)};
}

/* Input run + i's integer q of a group of 16 (w = d * q + m with its sub-block's scales): the 16-wide layouts'
 * readers, which block_int16.c's int16 dot products read as they are. */
static inline i32x16 q4x16_q(const uint8_t *block, int run, int i) { return nibbles16(block + 128, run + i); }

static inline f32x16 q4x16_weights(const uint8_t *block, scales16 sc, int run, int i) {
    return float16(q4x16_q(block, run, i)) * sc.d + sc.m;
}

static inline scales16 q8x16_scales(const uint8_t *block, int s) {
    (void)s;
    return (scales16){load16((const float *)block), (f32x16){}};
}

static inline i32x16 q8x16_q(const uint8_t *block, int run, int i) { return widen16(block + 64 + 16 * (run + i)); }

static inline f32x16 q8x16_weights(const uint8_t *block, scales16 sc, int run, int i) {
    return float16(q8x16_q(block, run, i)) * sc.d;
}

/* Sub-block s / 32's D = d * sc and M = -(dmin * m): each product exact (an fp16 times a 6-bit integer). */
static inline scales8 q5kx8_scales(const uint8_t *block, int s) {
    const float *dm = (const float *)block;
    const int j = s / QK;
    return (scales8){load8(dm) * float8(widen8(block + 64 + 8 * j)),
                     -(load8(dm + 8) * float8(widen8(block + 128 + 8 * j)))};
}

/* q = the chunk's nibble | the input's fifth bit << 4. Sub-block j's fifth bits follow the 32 chunks of nibbles, a
 * 32-bit lane per output holding input 8c + i's (c < 4, i < 8) at bit 8 (i % 4) + 4 (i / 4) + c: shifted down by c,
 * the chunk's bits sit where its nibbles' shifts find them (NIBBLE_SHIFTS), and block_int8.c moves a chunk's into
 * its bytes' bit 4 with one shift and mask per half. */
static inline f32x8 q5kx8_weights(const uint8_t *block, scales8 sc, int run, int i) {
    const i32x8 fifth = load_i32x8(block + 192 + 1024 + 32 * (run >> 5)) >> ((run >> 3) & 3);
    const i32x8 q5 = chunk_nibbles8(block + 192, run, i) | (((fifth >> NIBBLE_SHIFTS8[i]) & 1) << 4);
    return float8(q5) * sc.d + sc.m;
}

static inline scales16 q5kx16_scales(const uint8_t *block, int s) {
    const float *dm = (const float *)block;
    const int j = s / QK;
    return (scales16){load16(dm) * float16(widen16(block + 128 + 16 * j)),
                      -(load16(dm + 16) * float16(widen16(block + 256 + 16 * j)))};
}

static inline i32x16 q5kx16_q(const uint8_t *block, int run, int i) {
    const i32x16 fifth = load_i32x16(block + 384 + 2048 + 64 * (run >> 5)) >> ((run >> 3) & 3);
    return chunk_nibbles16(block + 384, run, i) | (((fifth >> NIBBLE_SHIFTS16[i]) & 1) << 4);
}

static inline f32x16 q5kx16_weights(const uint8_t *block, scales16 sc, int run, int i) {
    return float16(q5kx16_q(block, run, i)) * sc.d + sc.m;
}

/* q4kx is q5kx without the fifth bits: per weight q4x's convert and FMA, the sub-block's
 * D, M formed once per 32 inputs (the same floats q4x would store for Q4_K, at 4.75 bits a weight rather than 6: 21%
 * less memory). Not faster per call on two AVX-512 cores (2048 x 2048, 1 row: within ~10% of q4x16 either way, from
 * cache or DRAM; the cost is not the scales: with them cut to q4x's two loads it times the same). */
static inline scales8 q4kx8_scales(const uint8_t *block, int s) { return q5kx8_scales(block, s); }

static inline f32x8 q4kx8_weights(const uint8_t *block, scales8 sc, int run, int i) {
    return float8(chunk_nibbles8(block + 192, run, i)) * sc.d + sc.m;
}

static inline scales16 q4kx16_scales(const uint8_t *block, int s) { return q5kx16_scales(block, s); }

static inline i32x16 q4kx16_q(const uint8_t *block, int run, int i) { return chunk_nibbles16(block + 384, run, i); }

static inline f32x16 q4kx16_weights(const uint8_t *block, scales16 sc, int run, int i) {
    return float16(q4kx16_q(block, run, i)) * sc.d + sc.m;
}

/* Sub-block s / 16's D = d * sc (exact: an fp16 times an 8-bit integer). */
static inline scales8 q6kx8_scales(const uint8_t *block, int s) {
    return (scales8){load8((const float *)block) * float8(widen8(block + 32 + 8 * (s / 16))), (f32x8){}};
}

static inline f32x8 q6kx8_weights(const uint8_t *block, scales8 sc, int run, int i) {
    return float8(widen8(block + 32 + 8 * 16 + 8 * (run + i))) * sc.d;
}

static inline scales16 q6kx16_scales(const uint8_t *block, int s) {
    return (scales16){load16((const float *)block) * float16(widen16(block + 64 + 16 * (s / 16))), (f32x16){}};
}

static inline i32x16 q6kx16_q(const uint8_t *block, int run, int i) {
    return widen16(block + 64 + 16 * 16 + 16 * (run + i));
}

static inline f32x16 q6kx16_weights(const uint8_t *block, scales16 sc, int run, int i) {
    return float16(q6kx16_q(block, run, i)) * sc.d;
}

/* MXFP4: the block's 2^(e - 128) per output, and each input's code (q4kx's chunks) looked up as its value. */
static inline scales8 mxfp4x8_scales(const uint8_t *block, int s) {
    (void)s;
    return (scales8){e8m0_half8(block + 16 * 8), (f32x8){}};
}

static inline f32x8 mxfp4x8_weights(const uint8_t *block, scales8 sc, int run, int i) {
    return mxfp4_values8(chunk_nibbles8(block, run, i)) * sc.d;
}

static inline scales16 mxfp4x16_scales(const uint8_t *block, int s) {
    (void)s;
    return (scales16){e8m0_half16(block + 16 * 16), (f32x16){}};
}

static inline f32x16 mxfp4x16_weights(const uint8_t *block, scales16 sc, int run, int i) {
    return mxfp4_values16(chunk_nibbles16(block, run, i)) * sc.d;
}

#endif
