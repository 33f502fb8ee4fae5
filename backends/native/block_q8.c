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
 * 415, Q4_K 404, Q5_K 339, Q6_K 340 GFLOP/s, 1.6-1.8x the same CPU's vpmaddubsw path (258, 238, 193, 207). Where
 * the CPU has AMX, rows in 16s take its tiles instead (block_q8_amx.c), to the same floats. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "block_q8.h"
#include "kernels.h"

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

/* Row t rounded: s = max |x| / 127 per block of 32, q = rint(x / s) (divided, not multiplied by 1 / s, so subnormal
 * scales stay exact enough). A block with a NaN or infinity gets NaN as its scale and zero q, so that row's outputs
 * are NaN as fp32's would be; a block of zeros (or of values whose max / 127 underflows) gets 0. `tiled` is where its
 * blocks' q go in the tiles' order (block b at tiled + 512 b), or NULL. */
static void round_row(const float *x, int64_t k, int8_t *q, float *scales, float *offsets, int8_t *tiled) {
    for (int64_t b = 0; b < k / QK; ++b) {
        const float *v = x + QK * b;
        const float scale = int8_scale(v, QK);
        int32_t r[QK] = {0}; /* each loop below one the compiler vectorizes (a divide of 16 lanes, not of one) */
        if (scale > 0.0f) /* NaN > 0 is false */
            for (int i = 0; i < QK; ++i) r[i] = (int32_t)rintf(v[i] / scale);
        for (int i = 0; i < QK; ++i) q[QK * b + i] = (int8_t)r[i];
        if (tiled != NULL) memcpy(tiled + 16 * QK * b, q + QK * b, QK);
        int32_t half[2] = {0, 0};
        for (int i = 0; i < QK; ++i) half[i / X_HALF] += r[i];
        scales[b] = scale;
        offsets[OFFSETS * b] = scale * (float)(half[0] + half[1]);
        offsets[OFFSETS * b + 1] = scale * (float)half[0];
        offsets[OFFSETS * b + 2] = scale * (float)half[1];
    }
}

/* Four bytes of x's q in every lane. */
static inline iv broadcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, sizeof(v));
    return (iv){} + v;
}

/* Chunks of 8 inputs between widenings of the running sums (see the header): under VNNI once per x block, or
 * per Q6_K sub-block. */
static inline int widen_every(q8_layout l) {
    if (Q8_DPBUSD) return l == Q6CX ? 2 : QK / 8;
    return l == Q4CX || l == Q4KX ? 4 : l == Q5KX ? 2 : 1;
}


/* What vpmaddwd multiplies the int16 sums by when it widens them after chunk c (the int16 in both halves of a lane):
 * 1, or for Q6_K its sub-block's scale sc (int8), so its two sub-blocks of 16 inputs sum in one int32 per x block. */
static inline __attribute__((always_inline)) iv widen_by(const unit_blocks *unit, q8_layout l, int64_t b, int c,
                                                         int v) {
    if (l != Q6CX) return (iv){} + 0x00010001;
    const iv sc = bytes_at(unit, l, b, v, 4 * unit->g + unit->g * (2 * (int)(b % 8) + c / 2));
    return (sc & 0xFFFF) | (sc << 16);
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
            for (int t = 0; t < rt; ++t)
                acc[t][v] = block_step(acc[t][v], x, t0 + t, b, l, scaled_in_floats ? NULL : &sums[t][v], d, m0, m1);
        }
    }
    for (int t = 0; t < rt; ++t)
        for (int v = 0; v < VECS && VECTOR_OUTPUTS * v < outputs; ++v)
            store_outputs(y + t * n + VECTOR_OUTPUTS * v, acc[t][v], bias != NULL ? bias + VECTOR_OUTPUTS * v : NULL,
                          outputs - VECTOR_OUTPUTS * v);
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
    void NAME(const float *x, int64_t x_row, const uint8_t *w, const float *bias, float *y, int64_t tokens,            \
              int64_t n, int64_t k, float *scratch, int32_t num_threads) {                                             \
        const int64_t blocks = k / layout_inputs(L), groups = n / G, units = (n + UNIT - 1) / UNIT;                    \
        const int amx = tokens >= AMX_ROWS && q8_amx_usable(), width = amx ? 2 : 1; /* units a thread takes at once */ \
        int8_t *q = (int8_t *)scratch, *tiled = amx ? q + tokens * k : NULL;                                           \
        float *scales = (float *)(q + (amx ? 2 : 1) * tokens * k);                                                     \
        float *offsets = scales + tokens * (k / QK);                                                                   \
        const rounded_rows rounded = {q, tiled, scales, offsets, k};                                                   \
        _Pragma("omp parallel num_threads(num_threads) if (num_threads > 1)") {                                        \
            uint8_t *w_q = q8_amx_room(amx, k);                                                                        \
            _Pragma("omp for schedule(static)")                                                                        \
            for (int64_t t = 0; t < tokens; ++t)                                                                       \
                round_row(x + t * x_row, k, q + t * k, scales + t * (k / QK), offsets + t * (k / QK) * OFFSETS,        \
                          tiled != NULL && t < tokens / AMX_ROWS * AMX_ROWS                                            \
                              ? tiled + (t / AMX_ROWS) * AMX_ROWS * k + QK * (t % AMX_ROWS)                            \
                              : NULL);                                                                                 \
            _Pragma("omp for schedule(static)")                                                                        \
            for (int64_t first = 0; first < units; first += width) {                                                   \
                const int count = units - first < width ? (int)(units - first) : width;                                \
                unit_blocks unit[2];                                                                                   \
                int outputs[2];                                                                                        \
                const float *bias_u[2];                                                                                \
                for (int j = 0; j < count; ++j) {                                                                      \
                    const int64_t u = first + j;                                                                       \
                    unit[j] = G == 8 ? unit_of_8(w, BYTES, blocks, groups, u) : unit_of_16(w, BYTES, blocks, u);       \
                    outputs[j] = n - UNIT * u < UNIT ? (int)(n - UNIT * u) : UNIT;                                     \
                    bias_u[j] = bias != NULL ? bias + UNIT * u : NULL;                                                 \
                }                                                                                                      \
                const int64_t done = q8_amx_rows(&rounded, tokens, unit, count, L, w_q, y + UNIT * first, n, outputs,  \
                                              bias_u);                                                                 \
                for (int j = 0; j < count; ++j)                                                                        \
                    for (int64_t t0 = done; t0 < tokens; t0 += TILE_ROWS)                                              \
                        q8_tiles(&rounded, t0, &unit[j], L, y + t0 * n + UNIT * (first + j), n, outputs[j], bias_u[j], \
                                 tokens - t0 < TILE_ROWS ? tokens - t0 : TILE_ROWS);                                   \
            }                                                                                                          \
            free(w_q);                                                                                                 \
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
