/* The linears on x rounded to int8 as llama.cpp rounds it: what `--int8-activations` runs at every row count, for
 * the engine's linears on Q4_0 / Q4_1 blocks (packed then as q4cxG), Q4_K (q4kxG), Q5_K (q5kxG) and Q6_K (q6cxG).
 *
 * Prefill's linears are bound by multiply-adds, and fp32's cost one FMA lane each. With x rounded per 32 inputs to a
 * scale s and int8 q (|q| <= 127; llama.cpp's Q8_1, and finer than its Q8_K's one scale per 256), a sub-block's dot
 * product with the weights' unsigned q is an integer: vpmaddubsw multiplies 32 byte pairs and adds them in pairs
 * into int16 in one instruction, 1.6x the multiply-adds of two FMAs on a Zen 3 core (82 against 51 G a second). The
 * int16 lanes are widened (one vpmaddwd) before they can saturate: a lane gains 4 products per chunk of 8 inputs, so
 * after 4 chunks for 4-bit q (16 x 15 x 127 = 30,480 < 32,767), 2 for Q5_K's 5 bits (8 x 31 x 127), 1 for Q6_K's 6
 * (4 x 63 x 127): the sums are exact. Per sub-block, row and output, w = D q + M then contributes
 *   D s sum(qw qx) + M s sum(qx)
 * (Q4_0 / Q4_1: D = d, M = m; Q4_K / Q5_K: D = d sc_j, M = -dmin m_j, as gguf-py forms them; Q6_K: D = d sc_j over 16
 * inputs, M = -32 D for its q stored plus 32), so the result is the fp32 linear on exactly gguf-py's weights and on x
 * rounded to s qx: llama.cpp's rounding (2^-8 of each block's largest |x|), not the fp32 kernels' exactness; the
 * oracle is the fp32 linear on x so rounded. Every row takes the same steps at any row count and thread count, so a
 * row's floats do not depend on what it is batched with.
 *
 * The weights' q sit in chunks of 8 inputs, a 32-bit lane per output whose byte i holds input i (low nibble) and
 * 4 + i (high): masking a chunk gives the vpmaddubsw operand of inputs 0-3, shifting it the one of 4-7 (q4cx, q4kx,
 * q5kx, whose fifth bits are shifted in; block_layout.py writes them), with no repacking per call (repacking q4x's
 * input-major words per call made single-stream decode 13% slower than the fp32 kernels). q6cxG holds Q6_K's q + 32
 * as bytes, 4 inputs a lane per output. A thread takes a unit of 16 outputs (two groups of 8, one of 16), whose
 * blocks (7-18 KB for SmolLM2's linears) stay in L1 while it multiplies every tile of 4 rows by them over all of K:
 * per chunk two loads and a few masks or shifts per 8 outputs, and per row two broadcasts, four vpmaddubsw and four
 * vpaddw, the row's int16 sums in registers. With AVX-512 VNNI the unit's 16 outputs are one 512-bit register and a
 * tile is 8 rows: vpdpbusd multiplies the byte pairs and adds them by 4 straight into int32 lanes, one instruction
 * for vpmaddubsw's and vpaddw's two and nothing to widen (Q6_K's two sub-blocks' sums are converted each and
 * multiplied by d sc as floats: in integers they would take a register per row more). Every path sums the same
 * integers, so the outputs are bit for bit the same, but for Q6_K's under VNNI; the portable build computes them in
 * C. On an Emerald Rapids Xeon (VNNI, its AMX hidden by the VM), two threads, 512 rows of a 2048x2048 linear: Q4_1
 * 415, Q4_K 404, Q5_K 339, Q6_K 340 GFLOP/s, 1.6-1.8x the same CPU's vpmaddubsw path (258, 238, 193, 207). */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "block_layouts.h"
#include "kernels.h"
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

/* acc + u's unsigned bytes times s's signed ones, added in fours into int32 lanes (vpdpbusd), or in pairs into int16
 * lanes (vpmaddubsw, vpaddw). */
static inline products add_products(products acc, iv u, iv s) {
#if Q8_DPBUSD
    return (products)_mm512_dpbusd_epi32((__m512i)acc, (__m512i)u, (__m512i)s);
#elif defined(__AVX2__)
    return (i16x16)_mm256_add_epi16((__m256i)acc, _mm256_maddubs_epi16((__m256i)u, (__m256i)s));
#else
    const i16x16 uu = (i16x16)u, ss = (i16x16)s;
    return acc + (uu & 255) * ((i16x16)((u16x16)ss << 8) >> 8) + (i16x16)((u16x16)uu >> 8) * (ss >> 8);
#endif
}

/* x's rows rounded, in the linear's scratch (tokens * k floats; this takes 1.375 bytes an input): per row int8 q[k],
 * per block of 32 the scale s, and per 16 inputs the sum of their q (Q6_K's sub-blocks are 16 inputs). */
typedef struct {
    const int8_t *q;
    const float *scales;
    const int32_t *sums;
    int64_t k;
} rounded_rows;

/* Row t rounded: s = max |x| / 127 per block of 32, q = rint(x / s) (divided, not multiplied by 1 / s, so subnormal
 * scales stay exact enough). A block with a NaN or infinity gets NaN as its scale and zero q, so that row's outputs
 * are NaN as fp32's would be; a block of zeros (or of values whose max / 127 underflows) gets 0. */
static void round_row(const float *x, int64_t k, int8_t *q, float *scales, int32_t *sums) {
    for (int64_t b = 0; b < k / QK; ++b) {
        const float *v = x + QK * b;
        const float scale = int8_scale(v, QK);
        for (int half = 0; half < QK / X_HALF; ++half) {
            int32_t total = 0;
            for (int i = X_HALF * half; i < X_HALF * (half + 1); ++i) {
                const int8_t r = scale > 0.0f ? (int8_t)rintf(v[i] / scale) : 0; /* NaN > 0 is false */
                q[QK * b + i] = r;
                total += r;
            }
            sums[2 * b + half] = total;
        }
        scales[b] = scale;
    }
}

/* Four bytes of x's q in every lane. */
static inline iv broadcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, sizeof(v));
    return (iv){} + v;
}

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

/* Inputs per block of the layout (its blocks' step); chunks of 8 inputs between widenings of the running sums (see
 * the header): under VNNI once per x block, or per Q6_K sub-block. */
static inline int64_t layout_inputs(q8_layout l) { return l == Q4CX ? QK : QK_K; }
static inline int widen_every(q8_layout l) {
    if (Q8_DPBUSD) return l == Q6CX ? 2 : QK / 8;
    return l == Q4CX || l == Q4KX ? 4 : l == Q5KX ? 2 : 1;
}

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

/* What vpmaddwd multiplies the int16 sums by when it widens them after chunk c (the int16 in both halves of a lane):
 * 1, or for Q6_K its sub-block's scale sc (int8), so its two sub-blocks of 16 inputs sum in one int32 per x block. */
static inline __attribute__((always_inline)) iv widen_by(const unit_blocks *unit, q8_layout l, int64_t b, int c,
                                                         int v) {
    if (l != Q6CX) return (iv){} + 0x00010001;
    const iv sc = bytes_at(unit, l, b, v, 4 * unit->g + unit->g * (2 * (int)(b % 8) + c / 2));
    return (sc & 0xFFFF) | (sc << 16);
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

/* The running sums as int32: under VNNI the lanes themselves; elsewhere the int16 lanes added in pairs, each times
 * w's int16 (vpmaddwd; see widen_by). */
static inline __attribute__((always_inline)) iv widened(products v, iv w) {
#if Q8_DPBUSD
    (void)w;
    return v;
#elif defined(__AVX2__)
    return (i32x8)_mm256_madd_epi16((__m256i)v, (__m256i)w);
#else
    return ((((i32x8)v << 16) >> 16) + ((i32x8)v >> 16)) * ((w << 16) >> 16);
#endif
}

/* y[rt, 16] (rows n apart, `outputs` of them stored) = rows t0.. of x times the unit's blocks (+ bias[16] when not
 * NULL). Inlined per constant layout and rt. */
static inline __attribute__((always_inline)) void q8_tile(const rounded_rows *x, int64_t t0, const unit_blocks *unit,
                                                          q8_layout l, float *y, int64_t n, int outputs,
                                                          const float *bias, const int rt) {
    const int64_t blocks = x->k / QK;
    const int widen = widen_every(l), scaled_in_floats = Q8_DPBUSD && l == Q6CX;
    fv acc[TILE_ROWS][VECS] = {};
    for (int64_t b = 0; b < blocks; ++b) {
        iv sums[TILE_ROWS][VECS] = {};
        products pairs[TILE_ROWS][VECS] = {};
#pragma GCC unroll 1
        for (int c = 0; c < QK / 8; ++c) {
            iv low[VECS], high[VECS];
            for (int v = 0; v < VECS; ++v) chunk(unit, l, b, c, v, &low[v], &high[v]);
            for (int t = 0; t < rt; ++t) {
                const int8_t *xq = x->q + (t0 + t) * x->k + QK * b + 8 * c;
                const iv first = broadcast4(xq), second = broadcast4(xq + 4);
                for (int v = 0; v < VECS; ++v)
                    pairs[t][v] = add_products(add_products(pairs[t][v], low[v], first), high[v], second);
            }
            if ((c + 1) % widen == 0 && scaled_in_floats)
                for (int v = 0; v < VECS; ++v) {
                    const fv d_sc = sub_block_d(unit, b, c, v);
                    for (int t = 0; t < rt; ++t) {
                        const float s = x->scales[(t0 + t) * blocks + b];
                        acc[t][v] += __builtin_convertvector((iv)pairs[t][v], fv) * (d_sc * s); /* VNNI only */
                        pairs[t][v] = (products){};
                    }
                }
            else if ((c + 1) % widen == 0)
                for (int v = 0; v < VECS; ++v) {
                    const iv by = widen_by(unit, l, b, c, v);
                    for (int t = 0; t < rt; ++t) {
                        sums[t][v] += widened(pairs[t][v], by);
                        pairs[t][v] = (products){};
                    }
                }
        }
        for (int v = 0; v < VECS; ++v) {
            const fv d = d_of(unit, l, b, v), m0 = m_of(unit, l, b, 0, v), m1 = m_of(unit, l, b, 1, v);
            for (int t = 0; t < rt; ++t) {
                const int64_t row = t0 + t;
                const float s = x->scales[row * blocks + b];
                const int32_t *q_sums = x->sums + row * (x->k / X_HALF) + 2 * b;
                const fv offset = l == Q6CX ? m0 * (s * (float)q_sums[0]) + m1 * (s * (float)q_sums[1])
                                            : m0 * (s * (float)(q_sums[0] + q_sums[1]));
                acc[t][v] += scaled_in_floats ? offset : __builtin_convertvector(sums[t][v], fv) * (d * s) + offset;
            }
        }
    }
    for (int t = 0; t < rt; ++t)
        for (int v = 0; v < VECS && VECTOR_OUTPUTS * v < outputs; ++v) {
            float *out = y + t * n + VECTOR_OUTPUTS * v;
            const float *add = bias != NULL ? bias + VECTOR_OUTPUTS * v : NULL;
            if (outputs - VECTOR_OUTPUTS * v >= VECTOR_OUTPUTS) {
                const fv sum = add != NULL ? acc[t][v] + LOAD(fv, add) : acc[t][v];
                memcpy(out, &sum, sizeof(sum));
            } else { /* under VNNI, an odd last group of 8: the vector's first half */
                f32x8 sum = __builtin_shufflevector(acc[t][v], acc[t][v], 0, 1, 2, 3, 4, 5, 6, 7);
                if (add != NULL) sum += load8(add);
                memcpy(out, &sum, sizeof(sum));
            }
        }
}

/* The tile for `rows` rows (at most TILE_ROWS), each height its own inlined copy. */
static inline __attribute__((always_inline)) void q8_tiles(const rounded_rows *x, int64_t t0, const unit_blocks *unit,
                                                           q8_layout l, float *y, int64_t n, int outputs,
                                                           const float *bias, int64_t rows) {
    switch (rows) {
    case 1: q8_tile(x, t0, unit, l, y, n, outputs, bias, 1); break;
    case 2: q8_tile(x, t0, unit, l, y, n, outputs, bias, 2); break;
    case 3: q8_tile(x, t0, unit, l, y, n, outputs, bias, 3); break;
#if Q8_DPBUSD
    case 4: q8_tile(x, t0, unit, l, y, n, outputs, bias, 4); break;
    case 5: q8_tile(x, t0, unit, l, y, n, outputs, bias, 5); break;
    case 6: q8_tile(x, t0, unit, l, y, n, outputs, bias, 6); break;
    case 7: q8_tile(x, t0, unit, l, y, n, outputs, bias, 7); break;
#endif
    default: q8_tile(x, t0, unit, l, y, n, outputs, bias, TILE_ROWS); break;
    }
}

/* y[T, N] = round(x)[T, K] (rows x_row apart) . w^T (+ bias[N]) for w in layout L of G outputs a group, BYTES a
 * block; scratch holds T * K floats. The threads round a share of the rows each, then share the units. */
#define Q8_LINEAR(NAME, L, G, BYTES)                                                                                   \
    void NAME(const float *x, int64_t x_row, const uint8_t *w, const float *bias, float *y, int64_t tokens,           \
              int64_t n, int64_t k, float *scratch, int32_t num_threads) {                                             \
        const int64_t blocks = k / layout_inputs(L), groups = n / G, units = (n + UNIT - 1) / UNIT;                   \
        int8_t *q = (int8_t *)scratch;                                                                                 \
        float *scales = (float *)(q + tokens * k);                                                                     \
        int32_t *sums = (int32_t *)(scales + tokens * (k / QK));                                                       \
        const rounded_rows rounded = {q, scales, sums, k};                                                             \
        _Pragma("omp parallel num_threads(num_threads) if (num_threads > 1)") {                                        \
            _Pragma("omp for schedule(static)")                                                                        \
            for (int64_t t = 0; t < tokens; ++t)                                                                       \
                round_row(x + t * x_row, k, q + t * k, scales + t * (k / QK), sums + t * (k / X_HALF));                 \
            _Pragma("omp for schedule(static)")                                                                        \
            for (int64_t u = 0; u < units; ++u) {                                                                      \
                const unit_blocks unit = G == 8 ? unit_of_8(w, BYTES, blocks, groups, u)                               \
                                                : unit_of_16(w, BYTES, blocks, u);                                     \
                const int outputs = n - UNIT * u < UNIT ? (int)(n - UNIT * u) : UNIT;                                 \
                const float *bias_u = bias != NULL ? bias + UNIT * u : NULL;                                           \
                for (int64_t t0 = 0; t0 < tokens; t0 += TILE_ROWS)                                                     \
                    q8_tiles(&rounded, t0, &unit, L, y + t0 * n + UNIT * u, n, outputs, bias_u,                        \
                             tokens - t0 < TILE_ROWS ? tokens - t0 : TILE_ROWS);                                       \
            }                                                                                                          \
        }                                                                                                              \
    }

Q8_LINEAR(linear_q4cx8_q8, Q4CX, 8, Q4CX8_BLOCK)
Q8_LINEAR(linear_q4cx16_q8, Q4CX, 16, Q4CX16_BLOCK)
Q8_LINEAR(linear_q4kx8_q8, Q4KX, 8, Q4KX8_BLOCK)
Q8_LINEAR(linear_q4kx16_q8, Q4KX, 16, Q4KX16_BLOCK)
Q8_LINEAR(linear_q5kx8_q8, Q5KX, 8, Q5KX8_BLOCK)
Q8_LINEAR(linear_q5kx16_q8, Q5KX, 16, Q5KX16_BLOCK)
Q8_LINEAR(linear_q6cx8_q8, Q6CX, 8, Q6CX8_BLOCK)
Q8_LINEAR(linear_q6cx16_q8, Q6CX, 16, Q6CX16_BLOCK)
