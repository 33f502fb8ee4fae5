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
 * scratch kt[Hk][chunks][D][KEY_CHUNK] (SmolLM2, 544 tokens: 0.4 MB, in L2), so a query's scores for a chunk are D
 * broadcast multiply-adds on KEY_CHUNK / LANES vectors, no horizontal sums. A task is then one kv head and a tile of
 * query rows, every query head sharing that kv head (GQA) at once: M query vectors (rows x group, at most MAX_QUERIES);
 * SCORE_BATCH queries are scored together, eight independent FMA chains, so the FMA latency is hidden. Then an online
 * softmax (the running max and sum per query) and acc += p . V, eight chains per output row for D = 64. Vectors are
 * one register of the variant's instruction set (16 floats with AVX-512, 8 below it), and the batch and chain counts
 * follow, so every variant keeps its accumulators in its registers: a 16-float vector on AVX2 is two registers, and
 * code written for 16 spilled there (512 queries over 512 tokens 63 ms a layer, against 5.6 for torch's SDPA).
 * Tasks are shared among `num_threads` OpenMP threads, the ones seeing the most keys first.
 *
 * Sliding-window attention (window > 0): query i also sees no key below ctx - n + i - window + 1. Only the chunks from
 * the one holding the chunk's first query's lowest key are transposed, a task starts at the chunk holding its first
 * row's, and a row is scored against a chunk only while its window reaches into it, so a chunk costs
 * O(n x window), not O(n x ctx). The soft cap (softcap > 0: s -> softcap * tanh(s / softcap), Gemma 2) applies to
 * the scaled scores before the mask. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "vector_math.h"

#if defined(__AVX512F__)
typedef f32x16 vec;
typedef i32x16 ivec;
#define load_vec load16
#define store_vec store16
enum { LANES = 16 };
#else
typedef f32x8 vec;
typedef i32x8 ivec;
#define load_vec load8
#define store_vec store8
enum { LANES = 8 };
#endif

enum {
    KEY_CHUNK = 32,
    KEY_VECS = KEY_CHUNK / LANES, /* vectors of a query's scores for a chunk */
    MAX_HEAD_DIM = 256,
    MAX_QUERIES = 48,
    SCORE_BATCH = 8 / KEY_VECS, /* queries scored at once: eight accumulators */
    VALUE_KEYS = LANES / 8,     /* keys summed at once into separate accumulators: 2 x D / 16 chains, or D / 8 */
};

/* The lane-wise max (C's vector extension has no vector ?:, so a select by mask). */
static inline vec max_vec(vec a, vec b) {
    const ivec take_a = a > b;
    return (vec)(((ivec)a & take_a) | ((ivec)b & ~take_a));
}

/* The queries [m0, m0 + count) (count <= SCORE_BATCH) against the chunk's transposed keys: s[m][0 .. KEY_CHUNK). */
static inline __attribute__((always_inline)) void score(const float *const *qs, const float *kt, int64_t d, int count,
                                                        float *s) {
    vec acc[SCORE_BATCH][KEY_VECS] = {{{0}}};
    for (int64_t i = 0; i < d; ++i) {
        vec k[KEY_VECS];
        for (int c = 0; c < KEY_VECS; ++c) k[c] = load_vec(kt + i * KEY_CHUNK + c * LANES);
        for (int m = 0; m < count; ++m)
            for (int c = 0; c < KEY_VECS; ++c) acc[m][c] += qs[m][i] * k[c];
    }
    for (int m = 0; m < count; ++m)
        for (int c = 0; c < KEY_VECS; ++c) store_vec(s + m * KEY_CHUNK + c * LANES, acc[m][c]);
}

/* The scaled scores of one query for a chunk, capped when softcap > 0, the keys outside [from, to) masked. */
static inline __attribute__((always_inline)) void scale_and_mask(float *sm, float scale, float softcap, int64_t from,
                                                                 int64_t to) {
    if (softcap > 0.0f) { /* capped before the mask: a masked -inf would come out of tanh as -softcap */
        const float inv = scale / softcap;
#pragma omp simd
        for (int64_t j = 0; j < KEY_CHUNK; ++j)
            sm[j] = j >= from && j < to ? softcap * tanh_f32(sm[j] * inv) : -INFINITY;
        return;
    }
#pragma omp simd
    for (int64_t j = 0; j < KEY_CHUNK; ++j) sm[j] = j >= from && j < to ? sm[j] * scale : -INFINITY;
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
    float s[MAX_QUERIES * KEY_CHUNK], acc[MAX_QUERIES * MAX_HEAD_DIM];
    float best[MAX_QUERIES], total[MAX_QUERIES];
    const float *qs[MAX_QUERIES];
    const float *values[KEY_CHUNK];
    for (int64_t m = 0; m < nq; ++m) {
        qs[m] = q + (r0 + m / group) * q_row + (h * group + m % group) * d;
        best[m] = -INFINITY, total[m] = 0.0f;
    }
    memset(acc, 0, sizeof(float) * nq * d);
    for (int64_t start = low - low % KEY_CHUNK; start < end; start += KEY_CHUNK) {
        const int64_t n = end - start < KEY_CHUNK ? end - start : KEY_CHUNK;
        const float *kt = kt_head + (start - key0) * d; /* this chunk's keys, transposed */
        for (int64_t j = 0; j < n; ++j) {
            const int64_t pos = start + j;
            values[j] = v_cache + ((int64_t)table[pos / block_size] * block_size + pos % block_size) * stride + h * d;
        }
        /* Rows are in position order: the first that sees any of this chunk, and with a window the first whose
         * window starts past it (m_end); score those between. Each of them sees a key of the chunk. */
        const int64_t m_first = (start > first + r0 ? start - first - r0 : 0) * group;
        int64_t m_end = nq;
        if (window > 0) {
            const int64_t reach = (start + n + window - 1 - first - r0) * group;
            m_end = reach < m_end ? (reach > 0 ? reach : 0) : m_end;
        }
        for (int64_t m = m_first; m < m_end; m += SCORE_BATCH) {
            const int count = m_end - m < SCORE_BATCH ? (int)(m_end - m) : SCORE_BATCH;
            if (count == SCORE_BATCH)
                score(qs + m, kt, d, SCORE_BATCH, s + m * KEY_CHUNK);
            else
                for (int c = 0; c < count; ++c) score(qs + m + c, kt, d, 1, s + (m + c) * KEY_CHUNK);
        }
        for (int64_t m = m_first; m < m_end; ++m) { /* online softmax, then acc = acc * shrink + p . v */
            const int64_t pos = first + r0 + m / group, seen = pos + 1 - start; /* keys of this chunk it sees: */
            const int64_t visible = seen < n ? seen : n;                          /* [from, visible) */
            const int64_t from = window > 0 && pos - window + 1 > start ? pos - window + 1 - start : 0;
            float *sm = s + m * KEY_CHUNK;
            scale_and_mask(sm, scale, softcap, from, visible);
            vec tops = load_vec(sm), sums;
            for (int c = 1; c < KEY_VECS; ++c) tops = max_vec(tops, load_vec(sm + c * LANES));
            float top = best[m];
            for (int i = 0; i < LANES; ++i) top = tops[i] > top ? tops[i] : top;
            const float shrink = exp_f32(best[m] - top);
#pragma omp simd
            for (int64_t j = 0; j < KEY_CHUNK; ++j) sm[j] = j >= from && j < visible ? exp_f32(sm[j] - top) : 0.0f;
            sums = load_vec(sm);
            for (int c = 1; c < KEY_VECS; ++c) sums += load_vec(sm + c * LANES);
            float chunk_total = 0.0f;
            for (int i = 0; i < LANES; ++i) chunk_total += sums[i];
            best[m] = top;
            total[m] = total[m] * shrink + chunk_total;
            /* Every LANES-float slice of the output row in its own accumulator, VALUE_KEYS keys at a time. */
            float *am = acc + m * d;
            const int64_t slices = d / LANES;
            vec a[VALUE_KEYS][MAX_HEAD_DIM / LANES];
            for (int64_t c = 0; c < slices; ++c) {
                a[0][c] = load_vec(am + LANES * c) * shrink;
                for (int r = 1; r < VALUE_KEYS; ++r) a[r][c] = (vec){0};
            }
            int64_t j = from;
            for (; j + VALUE_KEYS <= visible; j += VALUE_KEYS)
                for (int r = 0; r < VALUE_KEYS; ++r)
                    for (int64_t c = 0; c < slices; ++c) a[r][c] += sm[j + r] * load_vec(values[j + r] + LANES * c);
            for (; j < visible; ++j)
                for (int64_t c = 0; c < slices; ++c) a[0][c] += sm[j] * load_vec(values[j] + LANES * c);
            for (int64_t c = 0; c < slices; ++c) {
                for (int r = 1; r < VALUE_KEYS; ++r) a[0][c] += a[r][c];
                store_vec(am + LANES * c, a[0][c]);
            }
        }
    }
    for (int64_t m = 0; m < nq; ++m) {
        const float inv = 1.0f / (total[m] + sink_weight(sinks, h * group + m % group, best[m]));
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
