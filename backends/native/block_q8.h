/* What block_q8.c's tiles and block_q8_amx.c's share: the vectors, x's rows rounded, a unit's blocks and the
 * fields read from them, and the float step after a block's integer sums, one definition each (see block_q8.c's
 * header for the layouts and the arithmetic). */
#pragma once

#include <stdint.h>
#include <string.h>

#include "block_layouts.h"
#include "vector_math.h"

enum { UNIT = 16, X_HALF = 16 }; /* outputs per unit; inputs per sum of a row's q */

/* The layouts the kernels read (a constant of the inlined tile). */
typedef enum { Q4CX, Q4KX, Q5KX, Q6CX } q8_layout;

typedef int16_t i16x16 __attribute__((vector_size(32)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

/* The tile's vectors: under VNNI a unit's 16 outputs in one 512-bit register (iv, fv), tiles of 8 rows, a row's
 * running sums int32; elsewhere two vectors of 8 outputs, tiles of 4 rows, int16 running sums (see the header).
 * GCC's register allocator, region by region, spilled VNNI's chunks of q to the stack and back in every chunk's loop
 * with registers free; allocating over the whole function keeps them (AVX2's 16 registers spill either way, more so
 * allocated whole). */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#pragma GCC optimize("ira-region=one")
#define Q8_DPBUSD 1
enum { VECS = 1, TILE_ROWS = 8 };
typedef i32x16 iv;
typedef f32x16 fv;
typedef i32x16 products;
typedef uint32_t u32v __attribute__((vector_size(64)));
static inline iv join(i32x8 a, i32x8 b) {
    return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
#else
#define Q8_DPBUSD 0
enum { VECS = 2, TILE_ROWS = 4 };
typedef i32x8 iv;
typedef f32x8 fv;
typedef i16x16 products;
typedef u32x8 u32v;
#endif
enum { VECTOR_OUTPUTS = UNIT / VECS };

/* x's rows rounded, in the linear's scratch (tokens * k floats; this takes 2.5 bytes an input): per row int8 q[k];
 * per block of 32 the scale s and s times the sum of its q (`offsets` 0), of its first 16 and of its last 16 (1, 2:
 * Q6_K's sub-blocks), which M's term multiplies; and where AMX runs the rows, their q again in its tiles' order
 * (`tiled`: per 16 rows and block, the rows' 32 bytes one after another; else NULL). */
enum { OFFSETS = 3 };
typedef struct {
    const int8_t *q, *tiled;
    const float *scales, *offsets;
    int64_t k;
} rounded_rows;

/* A unit's halves (outputs 8h .. 8h + 7): half h's group starts at at[h], its blocks (super-blocks for the K-quants)
 * step[h] bytes apart, and in its group it is outputs 8 slot[h] .. (0 in a group of 8; 0 or 1 in one of 16), so a
 * field of 4-byte values per output sits 32 slot[h] bytes into its run, one of bytes 8 slot[h]. */
typedef struct {
    const uint8_t *at[2];
    int64_t step[2];
    int slot[2], g;
} unit_blocks;

/* An absent half (the odd last group of 8): zero scales and q from block to block (step 0), its outputs computed and
 * never stored. As large as the largest block of 8 outputs. */
static const uint8_t NO_HALF[Q6CX8_BLOCK];

static inline unit_blocks unit_of_8(const uint8_t *w, int64_t block_bytes, int64_t blocks, int64_t groups, int64_t u) {
    const int64_t g = 2 * u;
    const int second = g + 1 < groups;
    return (unit_blocks){{w + g * blocks * block_bytes, second ? w + (g + 1) * blocks * block_bytes : NO_HALF},
                         {block_bytes, second ? block_bytes : 0},
                         {0, 0},
                         8};
}

static inline unit_blocks unit_of_16(const uint8_t *w, int64_t block_bytes, int64_t blocks, int64_t u) {
    const uint8_t *group = w + u * blocks * block_bytes;
    return (unit_blocks){{group, group}, {block_bytes, block_bytes}, {0, 1}, 16};
}


/* Inputs per block of the layout (its blocks' step). */
static inline int64_t layout_inputs(q8_layout l) { return l == Q4CX ? QK : QK_K; }

/* Half h's block holding x block b (of 32 inputs). */
static inline const uint8_t *block_at(const unit_blocks *unit, q8_layout l, int64_t b, int h) {
    return unit->at[h] + b / (layout_inputs(l) / QK) * unit->step[h];
}

/* Vector v's field of 4-byte values per output (`words_at`, `floats_at`) or of int8 ones, sign-extended (`bytes_at`),
 * at `offset` into the run of its block holding x block b. Under VNNI the vector is the unit's both halves: in a group
 * of 16 one load (its two halves' runs side by side), in two groups of 8 two joined. */
static inline __attribute__((always_inline)) iv words_at(const unit_blocks *unit, q8_layout l, int64_t b, int v,
                                                         int offset) {
#if Q8_DPBUSD
    (void)v;
    if (unit->g == 16) return LOAD(iv, block_at(unit, l, b, 0) + offset);
    return join(LOAD(i32x8, block_at(unit, l, b, 0) + offset), LOAD(i32x8, block_at(unit, l, b, 1) + offset));
#else
    return LOAD(iv, block_at(unit, l, b, v) + offset + 32 * unit->slot[v]);
#endif
}

static inline __attribute__((always_inline)) fv floats_at(const unit_blocks *unit, q8_layout l, int64_t b, int v,
                                                          int offset) {
    return (fv)words_at(unit, l, b, v, offset);
}

static inline __attribute__((always_inline)) iv bytes_at(const unit_blocks *unit, q8_layout l, int64_t b, int v,
                                                         int offset) {
#if Q8_DPBUSD
    (void)v;
    if (unit->g == 16) return widen16(block_at(unit, l, b, 0) + offset);
    return join(widen8(block_at(unit, l, b, 0) + offset), widen8(block_at(unit, l, b, 1) + offset));
#else
    return widen8(block_at(unit, l, b, v) + offset + 8 * unit->slot[v]);
#endif
}

static inline __attribute__((always_inline)) fv bytes_as_floats(const unit_blocks *unit, q8_layout l, int64_t b, int v,
                                                                int offset) {
    return __builtin_convertvector(bytes_at(unit, l, b, v, offset), fv);
}

/* What x block b's integer sums are multiplied by for vector v's outputs: D (`d_of`), and M per 16 inputs p (`m_of`;
 * see the header). Q6_K's two sub-blocks' scales sc are in its sums already (`widen_by`, `sub_block_d`), so its D is
 * d and its M -32 d sc. */
static inline __attribute__((always_inline)) fv d_of(const unit_blocks *unit, q8_layout l, int64_t b, int v) {
    const fv d = floats_at(unit, l, b, v, 0);
    if (l == Q4CX || l == Q6CX) return d;
    return d * bytes_as_floats(unit, l, b, v, 8 * unit->g + unit->g * (int)(b % 8));
}

static inline __attribute__((always_inline)) fv m_of(const unit_blocks *unit, q8_layout l, int64_t b, int p, int v) {
    const int g = unit->g, j = (int)(b % 8);
    if (l == Q4CX) return floats_at(unit, l, b, v, 4 * g);
    if (l == Q6CX) return -32.0f * floats_at(unit, l, b, v, 0) * bytes_as_floats(unit, l, b, v, 4 * g + g * (2 * j + p));
    return -(floats_at(unit, l, b, v, 4 * g) * bytes_as_floats(unit, l, b, v, 16 * g + g * j));
}

/* Q6_K's d times the scale of chunk c's sub-block, for vector v's outputs: what VNNI's int32 sums of that sub-block
 * are multiplied by as floats (its scale applied in integers would take a register per row for the sums). */
static inline __attribute__((always_inline)) fv sub_block_d(const unit_blocks *unit, int64_t b, int c, int v) {
    const int g = unit->g, j = (int)(b % 8);
    return floats_at(unit, Q6CX, b, v, 0) * bytes_as_floats(unit, Q6CX, b, v, 4 * g + g * (2 * j + c / 2));
}

/* Chunk c (8 inputs) of x block b for vector v's outputs: the unsigned q of its inputs 0-3 (`low`) and 4-7 (`high`),
 * 4 a lane per output. */
static inline __attribute__((always_inline)) void chunk(const unit_blocks *unit, q8_layout l, int64_t b, int c, int v,
                                                        iv *low, iv *high) {
    const int g = unit->g, j = (int)(b % 8);
    if (l == Q6CX) {
        *low = words_at(unit, l, b, v, 20 * g + 4 * g * (8 * j + 2 * c));
        *high = words_at(unit, l, b, v, 20 * g + 4 * g * (8 * j + 2 * c + 1));
        return;
    }
    const u32v raw = (u32v)words_at(unit, l, b, v, l == Q4CX ? 8 * g + 4 * g * c : 24 * g + 4 * g * (4 * j + c));
    *low = (iv)(raw & 0x0F0F0F0Fu);
    *high = (iv)((raw >> 4) & 0x0F0F0F0Fu);
    if (l == Q5KX) { /* sub-block j's fifth bits: input 8c + i's at bit 8 (i % 4) + 4 (i / 4) + c of its lane */
        const u32v fifth = (u32v)words_at(unit, l, b, v, 152 * g + 4 * g * j);
        *low |= (iv)((fifth << (4 - c)) & 0x10101010u);
        *high |= (iv)((fifth >> c) & 0x10101010u);
    }
}

/* Row `row`'s outputs after x block b: its integer sums times D s, plus M's term (Q6_K's sums under VNNI and AMX were
 * scaled as floats already: `sums` NULL). The float steps every tile takes, in one order, so that theirs agree. */
static inline __attribute__((always_inline)) fv block_step(fv acc, const rounded_rows *x, int64_t row, int64_t b,
                                                           q8_layout l, const iv *sums, fv d, fv m0, fv m1) {
    const float s = x->scales[row * (x->k / QK) + b], *sq = x->offsets + OFFSETS * (row * (x->k / QK) + b);
    const fv offset = l == Q6CX ? m0 * sq[1] + m1 * sq[2] : m0 * sq[0];
    return sums == NULL ? acc + offset : acc + (__builtin_convertvector(*sums, fv) * (d * s) + offset);
}

/* A vector of a row's outputs stored at out (+ add's, when not NULL): all of it, or where `outputs` is fewer (under
 * VNNI, an odd last group of 8) its first half. */
static inline __attribute__((always_inline)) void store_outputs(float *out, fv sum, const float *add, int outputs) {
    if (outputs >= VECTOR_OUTPUTS) {
        if (add != NULL) sum += LOAD(fv, add);
        memcpy(out, &sum, sizeof(sum));
    } else {
        f32x8 half = __builtin_shufflevector(sum, sum, 0, 1, 2, 3, 4, 5, 6, 7);
        if (add != NULL) half += load8(add);
        memcpy(out, &half, sizeof(half));
    }
}

/* AMX's rows (block_q8_amx.c): whether the CPU and kernel allow its tiles; a thread's room for two units' q where
 * they run (NULL where not); the first rows of `count` units (1 or 2) run on them, returning how many (a multiple of
 * 16; 0 where w_q is NULL). */
enum { AMX_ROWS = 16 };
int q8_amx_usable(void);
uint8_t *q8_amx_room(int amx, int64_t k);
int64_t q8_amx_rows(const rounded_rows *x, int64_t tokens, const unit_blocks *units, int count, q8_layout l,
                    uint8_t *w_q, float *y, int64_t n, const int *outputs, const float *const *bias);
