/* Causal attention of one prefill chunk over its sequence in the paged KV cache, called through ctypes by
 * sagellm.backends.native.
 *
 * A chunk's n queries sit at positions ctx - n .. ctx - 1 of a sequence whose first ctx tokens (the chunk's own
 * included) are already in the cache; query i sees keys 0 .. ctx - n + i. torch's scaled_dot_product_attention
 * needs those keys gathered out of the paged cache first, and with a mask (any chunk after the first) it leaves
 * its flash kernel: 32 queries over a cached 512-token prefix take ~0.7 ms a layer, as long as the linears of the
 * whole layer. Here the keys and values are read in place.
 *
 * First every kv head's keys are copied transposed, a chunk of KEY_CHUNK tokens at a time, into the caller's
 * scratch kt[Hk][chunks][D][KEY_CHUNK] (SmolLM2, 544 tokens: 0.4 MB, in L2), so a query's scores are D broadcast
 * multiply-adds on vectors of keys, no horizontal sums. A task is then one kv head and a tile of query rows, every
 * query head sharing that kv head (GQA) at once: M query vectors (rows x group, at most MAX_QUERIES). They go through
 * the keys a step of two chunks (KEY_STEP) at a time, BLOCK queries together: scored (BLOCK x 4 independent FMA
 * chains), the online softmax (running max and sum per query) in registers with a vector exp, then acc += p . v
 * with each value vector loaded once for the BLOCK queries (BLOCK x 4 accumulators). Vectors are one register of the
 * variant's instruction set (16 floats with AVX-512, 8 below it) and BLOCK follows (4, 3 with AVX2, 2), so every
 * variant keeps its accumulators in its registers: a 16-float vector on AVX2 is two registers, and code written for
 * 16 spilled there (512 queries over 512 tokens 63 ms a layer, against 5.6 for torch's SDPA). On a 2-core Zen 5
 * (SmolLM2, 512-query chunks, 2 threads) the six chunks of a 3,072-token prompt took 46-50 ms (~225 GFLOP/s) with
 * one query per p . v pass, scalar horizontal max and sum and 32-key steps; now 27-29 ms (~390 GFLOP/s of a ~540
 * peak), AVX2 104-112 -> 52-58 ms.
 * Tasks are shared among `num_threads` OpenMP threads, the ones seeing the most keys first.
 *
 * Sliding-window attention (window > 0): query i also sees no key below ctx - n + i - window + 1. Only the chunks from
 * the one holding the chunk's first query's lowest key are transposed, a task starts at the chunk holding its first
 * row's, and a row is scored against a step only while its window reaches into it, so a chunk costs
 * O(n x window), not O(n x ctx). The soft cap (softcap > 0: s -> softcap * tanh(s / softcap), Gemma 2) applies to
 * the scaled scores before the mask. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "vector_math.h"

/* Queries scored, softmaxed and summed together: BLOCK x 4 accumulators, plus 4 key or value vectors, fit the
 * registers (AVX-512's 32; AVX2's 16; SSE2's 16 hold 8 of these 2-register vectors). */
#if defined(__AVX512F__)
enum { BLOCK = 4 };
#elif defined(__AVX2__)
enum { BLOCK = 3 };
#else
enum { BLOCK = 2 };
#endif

enum {
    KEY_CHUNK = 32,              /* keys per transposed chunk of the scratch (tensor_fits.py's KEY_CHUNK) */
    KEY_STEP = 2 * KEY_CHUNK,    /* keys per softmax step: two chunks, half the per-step costs of one */
    HALF_VECS = KEY_CHUNK / LANES,
    KEY_VECS = KEY_STEP / LANES, /* vectors of a query's scores for a step */
    KEY_GROUP = 4,               /* key vectors scored at once: BLOCK x KEY_GROUP accumulators */
    SLICES = 4,                  /* output vectors per pass over a step's values: BLOCK x SLICES accumulators */
    MAX_HEAD_DIM = 256,
    MAX_QUERIES = 48,
};

/* The lane-wise max (a select by mask: C's vector extension has no vector ?:). */
static inline vec max_vec(vec a, vec b) { return select_lanes(a > b, a, b); }

/* The largest lane: a shuffle tree, not LANES dependent scalar steps (once per query and step). */
static inline float max_lane(vec x) {
#if defined(__AVX512F__)
    return _mm512_reduce_max_ps((__m512)x);
#elif defined(__AVX2__)
    __m128 h = _mm_max_ps(_mm256_castps256_ps128((__m256)x), _mm256_extractf128_ps((__m256)x, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
#else
    float top = x[0];
    for (int i = 1; i < LANES; ++i) top = x[i] > top ? x[i] : top;
    return top;
#endif
}

/* exp_f32 (vector_math.h) of x <= 0 (scores less their max, here) on a vector, so the softmax stays in registers:
 * the same clamp at -87, range reduction and polynomial; AVX-512 clamps, rounds and multiplies by 2^n with one
 * instruction each. */
static inline vec exp_nonpositive(vec x) {
#if defined(__AVX512F__)
    x = (vec)_mm512_max_ps((__m512)x, _mm512_set1_ps(-87.0f));
    const vec n = (vec)_mm512_roundscale_ps((__m512)(x * 1.44269504088896341f), _MM_FROUND_TO_NEAREST_INT);
#else
    x = max_vec(x, (vec){0} - 87.0f);
    const vec n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest: 1.5 * 2^23 */
#endif
    const vec p = EXP_OF_REDUCED(vec, x, n);
#if defined(__AVX512F__)
    return (vec)_mm512_scalef_ps((__m512)p, (__m512)n);
#else
    return p * (vec)((__builtin_convertvector(n, ivec) + 127) << 23);
#endif
}

/* count (<= BLOCK) queries against a step's transposed keys (its two chunks at kt[0], kt[1]), KEY_GROUP key vectors
 * at a time (count x KEY_GROUP independent chains, so the FMA latency is hidden): the scaled scores
 * s[m][0 .. KEY_STEP) and their max tops[m]. */
static inline __attribute__((always_inline)) void score(const float *const *qs, const float *const *kt, int64_t d,
                                                        int count, float scale, float *s, float *tops) {
    for (int g = 0; g < KEY_VECS; g += KEY_GROUP) {
        vec acc[BLOCK][KEY_GROUP] = {{{0}}};
        for (int64_t i = 0; i < d; ++i) {
            vec k[KEY_GROUP];
            for (int c = 0; c < KEY_GROUP; ++c)
                k[c] = load_vec(kt[(g + c) / HALF_VECS] + i * KEY_CHUNK + (g + c) % HALF_VECS * LANES);
            for (int m = 0; m < count; ++m)
                for (int c = 0; c < KEY_GROUP; ++c) acc[m][c] += qs[m][i] * k[c];
        }
        for (int m = 0; m < count; ++m) {
            vec top = acc[m][0] * scale;
            for (int c = 0; c < KEY_GROUP; ++c) {
                store_vec(s + m * KEY_STEP + (g + c) * LANES, acc[m][c] * scale);
                top = max_vec(top, acc[m][c] * scale);
            }
            const float group_top = max_lane(top);
            if (g == 0 || group_top > tops[m]) tops[m] = group_top;
        }
    }
}

/* The scaled scores of one query for a step, capped when softcap > 0, the keys outside [from, to) masked. */
static inline __attribute__((always_inline)) void cap_and_mask(float *sm, float softcap, int from, int to) {
    if (softcap > 0.0f) { /* capped before the mask: a masked -inf would come out of tanh as -softcap */
        const float inv = 1.0f / softcap;
#pragma omp simd
        for (int j = 0; j < KEY_STEP; ++j) sm[j] = j >= from && j < to ? softcap * tanh_f32(sm[j] * inv) : -INFINITY;
        return;
    }
#pragma omp simd
    for (int j = 0; j < KEY_STEP; ++j) sm[j] = j >= from && j < to ? sm[j] : -INFINITY;
}

/* acc rows am[0 .. count) = acc * shrink + p . v over the step's keys [j0, j1), output vectors [c0, c0 + vecs):
 * a value vector loaded once feeds count multiply-adds, count x vecs accumulators in registers. */
static inline __attribute__((always_inline)) void add_values(float *const *am, const float *p, const float *shrink,
                                                             const float *const *values, int64_t j0, int64_t j1,
                                                             int64_t c0, int count, int vecs) {
    vec a[BLOCK][SLICES];
    for (int m = 0; m < count; ++m)
        for (int c = 0; c < vecs; ++c) a[m][c] = load_vec(am[m] + c0 + c * LANES) * shrink[m];
    for (int64_t j = j0; j < j1; ++j) {
        const float *vj = values[j] + c0;
        for (int c = 0; c < vecs; ++c) {
            const vec x = load_vec(vj + c * LANES);
            for (int m = 0; m < count; ++m) a[m][c] += p[m * KEY_STEP + j] * x;
        }
    }
    for (int m = 0; m < count; ++m)
        for (int c = 0; c < vecs; ++c) store_vec(am[m] + c0 + c * LANES, a[m][c]);
}

/* Queries m .. m + count - 1 of a task (see attend_rows) against one step: scores, the online softmax (the running
 * max best[] and the lane-wise running sums total[], added up at the end), then acc = acc * shrink + p . v. The
 * block's rescale factors are one vector exp: a scalar one is a chain of ~15 dependent operations per query. */
static inline __attribute__((always_inline)) void attend_block(const float *const *qs, const float *const *kt,
                                                               const float *const *values, int64_t d, int count,
                                                               int64_t m, int64_t group, int64_t pos0, int64_t start,
                                                               int64_t n, float scale, int64_t window, float softcap,
                                                               float *s, float *best, vec *total, float *acc) {
    float shrink[BLOCK], top[BLOCK] = {0}, *am[BLOCK]; /* top: score sets it (zeroed: GCC cannot tell) */
    int from[BLOCK], visible[BLOCK];
    score(qs + m, kt, d, count, scale, s, top);
    for (int b = 0; b < count; ++b) {
        const int64_t pos = pos0 + (m + b) / group, seen = pos + 1 - start; /* keys of this step it sees: */
        visible[b] = seen < n ? (int)seen : (int)n;                         /* [from, visible) */
        from[b] = window > 0 && pos - window + 1 > start ? (int)(pos - window + 1 - start) : 0;
        if (softcap > 0.0f || from[b] > 0 || visible[b] < KEY_STEP) { /* then score's max is not theirs */
            float *sm = s + b * KEY_STEP;
            cap_and_mask(sm, softcap, from[b], visible[b]);
            vec tops = load_vec(sm);
            for (int c = 1; c < KEY_VECS; ++c) tops = max_vec(tops, load_vec(sm + c * LANES));
            top[b] = max_lane(tops);
        }
        top[b] = best[m + b] > top[b] ? best[m + b] : top[b];
    }
#pragma omp simd
    for (int b = 0; b < BLOCK; ++b) shrink[b] = exp_f32(b < count ? best[m + b] - top[b] : 0.0f);
    for (int b = 0; b < count; ++b) {
        float *sm = s + b * KEY_STEP;
        const int masked = from[b] > 0 || visible[b] < KEY_STEP;
        vec sums = (vec){0};
        for (int c = 0; c < KEY_VECS; ++c) {
            vec p = exp_nonpositive(load_vec(sm + c * LANES) - top[b]);
            if (masked) { /* exactly 0 outside [from, visible): the clamped exp of -inf is not */
                ivec j;
                for (int i = 0; i < LANES; ++i) j[i] = c * LANES + i;
                p = (vec)((ivec)p & ((j >= from[b]) & (j < visible[b])));
            }
            store_vec(sm + c * LANES, p);
            sums += p;
        }
        best[m + b] = top[b];
        total[m + b] = total[m + b] * shrink[b] + sums;
        am[b] = acc + (m + b) * d;
    }
    const int64_t j0 = from[0], j1 = visible[count - 1]; /* rows in position order; p is 0 outside each's range */
    int64_t c0 = 0;
    for (; c0 + SLICES * LANES <= d; c0 += SLICES * LANES) add_values(am, s, shrink, values, j0, j1, c0, count, SLICES);
    for (; c0 < d; c0 += LANES) add_values(am, s, shrink, values, j0, j1, c0, count, 1);
}

/* One task: query rows [r0, r0 + rows) of the chunk, query heads h * group .. (h + 1) * group - 1. kt_head holds
 * the transposed keys from position key0 (a multiple of KEY_CHUNK) on. */
static inline __attribute__((always_inline)) void attend_rows(const float *q, int64_t q_row, const float *kt_head,
                                                              int64_t key0, const float *v_cache, const int32_t *table,
                                                              int64_t first, int64_t r0, int64_t rows, int64_t h,
                                                              int64_t group, int64_t hq, int64_t hk, int64_t d,
                                                              int64_t block_size, float scale, int64_t window,
                                                              float softcap, const float *sinks, float *out) {
    const int64_t nq = rows * group, stride = hk * d, end = first + r0 + rows; /* the last row sees keys < end */
    const int64_t low = window > 0 && first + r0 - window + 1 > 0 ? first + r0 - window + 1 : 0; /* row r0's lowest */
    float s[BLOCK * KEY_STEP], acc[MAX_QUERIES * MAX_HEAD_DIM], best[MAX_QUERIES];
    vec total[MAX_QUERIES];
    const float *qs[MAX_QUERIES];
    const float *values[KEY_STEP];
    for (int64_t m = 0; m < nq; ++m) {
        qs[m] = q + (r0 + m / group) * q_row + (h * group + m % group) * d;
        best[m] = -INFINITY, total[m] = (vec){0};
    }
    memset(acc, 0, sizeof(float) * nq * d);
    for (int64_t start = low - low % KEY_CHUNK; start < end; start += KEY_STEP) {
        const int64_t n = end - start < KEY_STEP ? end - start : KEY_STEP;
        /* This step's two chunks of transposed keys; with n <= KEY_CHUNK the second may lie past the scratch's end,
         * so it reads the first again: those scores are masked. */
        const float *kt[2] = {kt_head + (start - key0) * d, kt_head + (start - key0 + (n > KEY_CHUNK) * KEY_CHUNK) * d};
        int64_t block = start / block_size, offset = start % block_size; /* one division per step, not per key */
        for (int64_t j = 0; j < n; ++j) {
            values[j] = v_cache + ((int64_t)table[block] * block_size + offset) * stride + h * d;
            if (++offset == block_size) offset = 0, ++block;
        }
        /* Rows are in position order: the first that sees any of this step, and with a window the first whose
         * window starts past it (m_end); those between, BLOCK at a time. Each of them sees a key of the step. */
        const int64_t m_first = (start > first + r0 ? start - first - r0 : 0) * group;
        int64_t m_end = nq, m = m_first;
        if (window > 0) {
            const int64_t reach = (start + n + window - 1 - first - r0) * group;
            m_end = reach < m_end ? (reach > 0 ? reach : 0) : m_end;
        }
        for (; m + BLOCK <= m_end; m += BLOCK)
            attend_block(qs, kt, values, d, BLOCK, m, group, first + r0, start, n, scale, window, softcap, s, best,
                         total, acc);
        for (; m < m_end; ++m)
            attend_block(qs, kt, values, d, 1, m, group, first + r0, start, n, scale, window, softcap, s, best, total,
                         acc);
    }
    for (int64_t m = 0; m < nq; ++m) {
        float sum = 0.0f;
        for (int i = 0; i < LANES; ++i) sum += total[m][i];
        const float inv = 1.0f / (sum + sink_weight(sinks, h * group + m % group, best[m]));
        float *om = out + (r0 + m / group) * hq * d + (h * group + m % group) * d;
        for (int64_t i = 0; i < d; ++i) om[i] = acc[m * d + i] * inv;
    }
}

/* Chunk c0 + c of kv head h's keys, transposed: kt[(h * chunks + c) * D * KEY_CHUNK + i * KEY_CHUNK + j] is element
 * i of key (c0 + c) * KEY_CHUNK + j; zeros past the sequence (their scores are masked). */
static void transpose_keys(const float *k_cache, const int32_t *table, int64_t c0, int64_t ctx, int64_t hk, int64_t d,
                           int64_t block_size, float *kt, int32_t num_threads) {
    const int64_t chunks = (ctx + KEY_CHUNK - 1) / KEY_CHUNK - c0;
#pragma omp parallel for collapse(2) schedule(static) num_threads(num_threads) if (num_threads > 1)
    for (int64_t h = 0; h < hk; ++h) {
        for (int64_t c = 0; c < chunks; ++c) {
            float *chunk = kt + (h * chunks + c) * d * KEY_CHUNK;
            for (int64_t j = 0; j < KEY_CHUNK; ++j) {
                const int64_t pos = (c0 + c) * KEY_CHUNK + j;
                if (pos < ctx) {
                    const int64_t row = (int64_t)table[pos / block_size] * block_size + pos % block_size;
                    const float *key = k_cache + (row * hk + h) * d;
                    for (int64_t i = 0; i < d; ++i) chunk[i * KEY_CHUNK + j] = key[i];
                } else {
                    for (int64_t i = 0; i < d; ++i) chunk[i * KEY_CHUNK + j] = 0.0f;
                }
            }
        }
    }
}

/* q [n, Hq, D] (heads packed, rows q_row apart) of a chunk whose last query is the sequence's token ctx - 1, against
 * the sequence's keys in the paged caches [num_blocks, block_size, Hk, D] through its block table; out [n, Hq, D].
 * D a multiple of 16, at most MAX_HEAD_DIM; Hq / Hk at most MAX_QUERIES. Query head i reads kv head i / (Hq / Hk).
 * window > 0: query i sees keys from ctx - n + i - window + 1 on; 0: all; softcap > 0 caps the scores (see the top);
 * sinks [Hq] (NULL: none): a logit per query head joining its softmax's denominator (gpt-oss's attention sinks).
 * scratch holds Hk * (ceil(ctx / KEY_CHUNK) - c0) * KEY_CHUNK * D floats (the transposed keys), c0 the chunk of the
 * first query's lowest key: 0 without a window, else max(0, ctx - n - window + 1) / KEY_CHUNK. */
void paged_prefill_attention_f32(const float *q, int64_t q_row, const float *k_cache, const float *v_cache,
                                 const int32_t *table, int64_t ctx, int64_t n, float *out, int64_t hq, int64_t hk,
                                 int64_t d, int64_t block_size, float scale, int64_t window, float softcap,
                                 const float *sinks, float *scratch, int32_t num_threads) {
    const int64_t group = hq / hk, tile = MAX_QUERIES / group, tiles = (n + tile - 1) / tile;
    const int64_t low = window > 0 && ctx - n - window + 1 > 0 ? ctx - n - window + 1 : 0, c0 = low / KEY_CHUNK;
    const int64_t chunks = (ctx + KEY_CHUNK - 1) / KEY_CHUNK - c0, key0 = c0 * KEY_CHUNK;
    transpose_keys(k_cache, table, c0, ctx, hk, d, block_size, scratch, num_threads);
#pragma omp parallel for collapse(2) schedule(dynamic) num_threads(num_threads) if (num_threads > 1)
    for (int64_t t = 0; t < tiles; ++t) {
        for (int64_t h = 0; h < hk; ++h) {
            const int64_t r0 = (tiles - 1 - t) * tile, rows = n - r0 < tile ? n - r0 : tile; /* longest first */
            const float *kt_head = scratch + h * chunks * d * KEY_CHUNK;
            if (d == 64)
                attend_rows(q, q_row, kt_head, key0, v_cache, table, ctx - n, r0, rows, h, group, hq, hk, 64,
                            block_size, scale, window, softcap, sinks, out);
            else
                attend_rows(q, q_row, kt_head, key0, v_cache, table, ctx - n, r0, rows, h, group, hq, hk, d,
                            block_size, scale, window, softcap, sinks, out);
        }
    }
}
