/* The q8 linears' rows in 16s on AMX's tile multiplies, where the CPU has AMX-INT8 (Sapphire Rapids and later) and
 * Linux grants the process its 8 KB of tile state (arch_prctl, asked once). TDPBSUD multiplies a tile of 16 rows of
 * x's int8 q (32 inputs each, a block; Q6_K's sub-blocks 16) by a tile of 16 outputs' unsigned q in vpdpbusd's very
 * lanes (4 inputs an output a tile row: chunk()'s vectors, stored) into 16 x 16 int32 sums, 8,192 multiply-adds an
 * instruction. The sums of a block are stored and take block_step's float steps, as q8_tile's do, so the outputs are
 * bit for bit VNNI's, and a row's floats do not depend on whether its batch reached 16. A thread takes two units at
 * once and unpacks their blocks (16 bytes an input each: 64 KB for K = 2048, in L2); per block it loads two tiles of
 * 16 rows of x (written in this order by round_row) and the two units' tiles and multiplies each by each, so a tile
 * loaded serves two multiplies. The scaling, not the multiplies, is most of the time: a tile store and per row of a
 * tile a conversion and 3-4 vector operations, for one instruction's multiply. On a Sapphire Rapids-class Xeon, two
 * threads, 512 rows of a 2048x2048 linear: Q4_K 590-660 GFLOP/s against VNNI's 420-480, Q6_K 440-470 against 320-345. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "block_q8.h"
#include "kernels.h"

#if Q8_DPBUSD && defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

enum { AMX_BLOCK_BYTES = UNIT * QK, ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18 };

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} tile_config;

static int amx_state; /* 0 not asked yet, 1 usable, -1 not */
static int amx_wanted = 1;

/* Whether the CPU has AMX-INT8 and the kernel gave this process its tile state (asked once). */
int q8_amx_usable(void) {
    if (amx_state == 0) {
        unsigned a, b, c, d;
        const int has = __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 24 & 1) && (d >> 25 & 1);
        amx_state = has && syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : -1;
    }
    return amx_state > 0 && amx_wanted;
}

/* Tiles 0-3 hold sums (rows i, unit j in tile 2 i + j), 4 and 5 two tiles of rows of x's q, 6 and 7 two units' q:
 * pieces of 32 inputs (a block), or Q6_K's of 16 (a sub-block). */
static inline int pieces_per_block(q8_layout l) { return l == Q6CX ? 2 : 1; }

__attribute__((target("amx-tile,amx-int8"))) static void configure_tiles(q8_layout l) {
    const int inputs = QK / pieces_per_block(l);
    tile_config config = {.palette = 1};
    for (int tile = 0; tile < 8; ++tile) {
        config.rows[tile] = tile < 6 ? AMX_ROWS : (uint8_t)(inputs / 4);
        config.bytes_per_row[tile] = tile < 4 || tile >= 6 ? 4 * UNIT : (uint16_t)inputs;
    }
    _tile_loadconfig(&config);
}

/* The unit's q, block b's 32 inputs as 8 tile rows of 16 outputs x 4 inputs (Q6_K's sub-blocks 4 rows each). */
static inline __attribute__((always_inline)) void unpack_unit(const unit_blocks *unit, q8_layout l, int64_t blocks,
                                                               uint8_t *w) {
    for (int64_t b = 0; b < blocks; ++b)
        for (int c = 0; c < QK / 8; ++c) {
            iv low, high;
            chunk(unit, l, b, c, 0, &low, &high);
            memcpy(w + AMX_BLOCK_BYTES * b + 128 * c, &low, sizeof(low));
            memcpy(w + AMX_BLOCK_BYTES * b + 128 * c + 64, &high, sizeof(high));
        }
}

/* What a unit's sums of x block b are scaled by (see d_of, m_of, sub_block_d), once for all its rows. */
typedef struct {
    fv d, m0, m1, d_sc0, d_sc1;
} block_factors;

static inline __attribute__((always_inline)) block_factors factors_of(const unit_blocks *unit, q8_layout l,
                                                                      int64_t b) {
    const fv d = d_of(unit, l, b, 0);
    return (block_factors){d, m_of(unit, l, b, 0, 0), m_of(unit, l, b, 1, 0),
                           l == Q6CX ? sub_block_d(unit, b, 1, 0) : d, l == Q6CX ? sub_block_d(unit, b, 3, 0) : d};
}

/* Block b's sums (16 rows of 16 int32 at `sums`; Q6_K's sub-blocks at sums and sums + 256) into acc, as q8_tile. */
static inline __attribute__((always_inline)) void add_block(const rounded_rows *x, int64_t t0, q8_layout l, int64_t b,
                                                            const block_factors *f, const int32_t *sums, fv *acc) {
    const int64_t blocks = x->k / QK;
#pragma GCC unroll 16
    for (int t = 0; t < AMX_ROWS; ++t) {
        const iv total = LOAD(iv, sums + UNIT * t);
        if (l == Q6CX) {
            const float s = x->scales[(t0 + t) * blocks + b];
            acc[t] += __builtin_convertvector(total, fv) * (f->d_sc0 * s);
            acc[t] += __builtin_convertvector(LOAD(iv, sums + UNIT * (AMX_ROWS + t)), fv) * (f->d_sc1 * s);
        }
        acc[t] = block_step(acc[t], x, t0 + t, b, l, l == Q6CX ? NULL : &total, f->d, f->m0, f->m1);
    }
}

/* A piece's sums of x's rows i (tile A) by unit j's q (tile W) into tile C, and (AMX_STORE) from it to memory. */
#define AMX_DOT(C, A, W, i, j)                                                                                         \
    do {                                                                                                               \
        if ((i) < row_tiles && (j) < count) {                                                                          \
            _tile_zero(C);                                                                                             \
            _tile_dpbsud(C, A, W);                                                                                     \
        }                                                                                                              \
    } while (0)
#define AMX_STORE(C, i, j)                                                                                             \
    do {                                                                                                               \
        if ((i) < row_tiles && (j) < count)                                                                            \
            _tile_stored(C, sums + AMX_ROWS * UNIT * ((2 * (i) + (j)) * per + part), 4 * UNIT);                        \
    } while (0)

/* y[16 row_tiles, 16 count] (rows n apart, unit j's outputs at y + 16 j, outputs[j] of them stored) = rows t0.. of x
 * times `count` units' q unpacked at w_q + room j (+ bias[j]): per piece two tiles of x's q and two of the units' q
 * loaded, four multiplied (each tile used twice: half the loads a multiply of one by one), their sums scaled. */
static inline __attribute__((always_inline, target("amx-tile,amx-int8"))) void
amx_block(const rounded_rows *x, int64_t t0, int row_tiles, const unit_blocks *units, int count, q8_layout l,
          const uint8_t *w_q, int64_t room, float *y, int64_t n, const int *outputs, const float *const *bias) {
    const int per = pieces_per_block(l);
    const int64_t blocks = x->k / QK;
    int32_t sums[4 * 2 * AMX_ROWS * UNIT] __attribute__((aligned(64)));
    fv acc[2][2][AMX_ROWS] = {};
    for (int64_t b = 0; b < blocks; ++b) {
        for (int part = 0; part < per; ++part) {
            const int8_t *a = x->tiled + t0 * x->k + AMX_ROWS * QK * b + QK / per * part;
            const uint8_t *w = w_q + AMX_BLOCK_BYTES * b + AMX_BLOCK_BYTES / per * part;
            _tile_loadd(4, a, QK);
            if (row_tiles > 1) _tile_loadd(5, a + AMX_ROWS * x->k, QK);
            _tile_loadd(6, w, 4 * UNIT);
            if (count > 1) _tile_loadd(7, w + room, 4 * UNIT);
            AMX_DOT(0, 4, 6, 0, 0);
            AMX_DOT(1, 4, 7, 0, 1);
            AMX_DOT(2, 5, 6, 1, 0);
            AMX_DOT(3, 5, 7, 1, 1);
            AMX_STORE(0, 0, 0);
            AMX_STORE(1, 0, 1);
            AMX_STORE(2, 1, 0);
            AMX_STORE(3, 1, 1);
        }
        for (int j = 0; j < count; ++j) {
            const block_factors f = factors_of(&units[j], l, b);
            for (int i = 0; i < row_tiles; ++i)
                add_block(x, t0 + AMX_ROWS * i, l, b, &f, sums + AMX_ROWS * UNIT * (2 * i + j) * per, acc[i][j]);
        }
    }
    for (int i = 0; i < row_tiles; ++i)
        for (int j = 0; j < count; ++j)
            for (int t = 0; t < AMX_ROWS; ++t)
                store_outputs(y + (AMX_ROWS * i + t) * n + UNIT * j, acc[i][j][t], bias[j], outputs[j]);
}

/* The thread's room for two units' unpacked q where the rows run on AMX (NULL where they do not). */
uint8_t *q8_amx_room(int amx, int64_t k) { return amx ? aligned_alloc(64, 2 * (k / QK) * AMX_BLOCK_BYTES) : NULL; }

/* Runs the first rows of `count` units (1 or 2) in 16s on AMX where w_q is room for it; how many it ran. */
__attribute__((target("amx-tile,amx-int8"))) int64_t q8_amx_rows(const rounded_rows *x, int64_t tokens,
                                                                 const unit_blocks *units, int count, q8_layout l,
                                                                 uint8_t *w_q, float *y, int64_t n, const int *outputs,
                                                                 const float *const *bias) {
    if (w_q == NULL) return 0;
    const int64_t rows = tokens / AMX_ROWS * AMX_ROWS, room = x->k / QK * AMX_BLOCK_BYTES;
    configure_tiles(l);
    for (int j = 0; j < count; ++j) {
        switch (l) {
        case Q4CX: unpack_unit(&units[j], Q4CX, x->k / QK, w_q + room * j); break;
        case Q4KX: unpack_unit(&units[j], Q4KX, x->k / QK, w_q + room * j); break;
        case Q5KX: unpack_unit(&units[j], Q5KX, x->k / QK, w_q + room * j); break;
        case Q6CX: unpack_unit(&units[j], Q6CX, x->k / QK, w_q + room * j); break;
        }
    }
    for (int64_t t0 = 0; t0 < rows; t0 += 2 * AMX_ROWS) {
        const int row_tiles = rows - t0 >= 2 * AMX_ROWS ? 2 : 1;
        float *out = y + t0 * n;
        switch (l) {
        case Q4CX: amx_block(x, t0, row_tiles, units, count, Q4CX, w_q, room, out, n, outputs, bias); break;
        case Q4KX: amx_block(x, t0, row_tiles, units, count, Q4KX, w_q, room, out, n, outputs, bias); break;
        case Q5KX: amx_block(x, t0, row_tiles, units, count, Q5KX, w_q, room, out, n, outputs, bias); break;
        case Q6CX: amx_block(x, t0, row_tiles, units, count, Q6CX, w_q, room, out, n, outputs, bias); break;
        }
    }
    _tile_release();
    return rows;
}

int32_t q8_amx(int32_t wanted) {
    if (wanted >= 0) amx_wanted = wanted;
    return q8_amx_usable();
}
#else
int q8_amx_usable(void) { return 0; }
uint8_t *q8_amx_room(int amx, int64_t k) {
    (void)amx, (void)k;
    return NULL;
}
int64_t q8_amx_rows(const rounded_rows *x, int64_t tokens, const unit_blocks *units, int count, q8_layout l,
                    uint8_t *w_q, float *y, int64_t n, const int *outputs, const float *const *bias) {
    (void)x, (void)tokens, (void)units, (void)count, (void)l, (void)w_q, (void)y, (void)n, (void)outputs, (void)bias;
    return 0;
}
int32_t q8_amx(int32_t wanted) {
    (void)wanted;
    return 0;
}
#endif
