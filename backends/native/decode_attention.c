/* Decode attention over the paged KV cache, called through ctypes by sagellm.backends.native and by
 * decoder_layers.c: one new query a sequence against its cached keys and values, read in place through its block
 * table (paged_decode_attention_f32 says how the work is split; attend how a task reads the cache). Like
 * decode_kernels.c's ops it takes raw pointers, allocates nothing on the heap and cannot fail: the Python wrappers
 * check first. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"
#include "vector_math.h"

enum { KEY_CHUNK = 32 }; /* keys scored between two softmax rescales; their scores live on the stack */
enum { PREFETCH_CHUNKS = 5 }; /* chunks of keys asked for ahead of the one being scored */
enum { MAX_HEAD_DIM = 256 };
enum { GROUP_BATCH = 3 }; /* query heads of one kv head scored and accumulated in one pass over its keys and values */

/* Where the cached tokens [start, start + n) live: rows[j] = their row of the paged cache, stepping through the
 * block table instead of dividing by block_size for every token. */
static inline void cache_rows(const int32_t *table, int64_t block_size, int64_t start, int64_t n, int64_t *rows) {
    int64_t block = start / block_size, slot = start % block_size;
    for (int64_t j = 0; j < n; ++j) {
        rows[j] = (int64_t)table[block] * block_size + slot;
        if (++slot == block_size) slot = 0, ++block;
    }
}

/* Asks for tokens [from, to)'s rows (their first `width` floats) of K and V into L2 (prefetcht2). */
static inline void prefetch_rows(const float *k_cache, const float *v_cache, const int32_t *table, int64_t block_size,
                                 int64_t token_stride, int64_t width, int64_t from, int64_t to) {
    for (int64_t pos = from; pos < to; ++pos) {
        const int64_t row = (int64_t)table[pos / block_size] * block_size + pos % block_size;
        for (int64_t i = 0; i < width; i += 16) {
            __builtin_prefetch(k_cache + row * token_stride + i, 0, 1); /* read, keep in L2 (prefetcht2) */
            __builtin_prefetch(v_cache + row * token_stride + i, 0, 1);
        }
    }
}

/* The lanes of a where mask is set, else b's (C's vector extension has no vector ?:). */
static inline f32x8 select8(i32x8 mask, f32x8 a, f32x8 b) { return (f32x8)(((i32x8)a & mask) | ((i32x8)b & ~mask)); }

/* exp_f32 on eight lanes, in vector registers on every instruction set. */
static inline f32x8 exp8(f32x8 x) { return EXP_LANES(f32x8, i32x8, x); }

/* One query head's chunk of scores ph [KEY_CHUNK] (the first n real; the rest junk, left 0 after) turned into the
 * online softmax's weights exp(s - top): soft-capped first when softcap > 0, best and total brought up to date.
 * Returns the factor that rescales the head's earlier sums to the new max. In explicit vectors: GCC's `omp simd`
 * loops here kept the max and the exp scalar. */
static inline float softmax_chunk(float *ph, int64_t n, float softcap, float *best, float *total) {
    enum { VECS = KEY_CHUNK / 8 };
    if (softcap > 0.0f) { /* lanes past n hold junk, as below: capped and then dropped */
        const float inv = 1.0f / softcap;
#pragma omp simd
        for (int64_t j = 0; j < KEY_CHUNK; ++j) ph[j] = softcap * tanh_f32(ph[j] * inv);
    }
    f32x8 s[VECS], top8 = (f32x8){0} + *best;
    i32x8 live[VECS];
    for (int c = 0; c < VECS; ++c) {
        s[c] = load8(ph + c * 8);
        live[c] = (i32x8){0, 1, 2, 3, 4, 5, 6, 7} + c * 8 < (int32_t)n;
        top8 = select8(live[c] & (s[c] > top8), s[c], top8);
    }
    float top = top8[0];
    for (int i = 1; i < 8; ++i) top = top8[i] > top ? top8[i] : top;
    const float shrink = exp_f32(*best - top);
    f32x8 e[VECS];
    for (int c = 0; c < VECS; ++c) {
        e[c] = (f32x8)((i32x8)exp8(s[c] - top) & live[c]);
        store8(ph + c * 8, e[c]);
    }
    *best = top;
    *total = *total * shrink + sum8((e[0] + e[1]) + (e[2] + e[3])); /* KEY_CHUNK = 32 */
    return shrink;
}

#if defined(__AVX512F__)
/* The g (at most GROUP_BATCH) query heads q [g, D] of one kv head against a chunk's keys (at `offset` in each key
 * row; keys padded to a multiple of 8 rows), into p [g][KEY_CHUNK]: each key vector loaded once for all g heads, 8
 * keys x g heads = 24 accumulators in AVX-512's 32 registers. */
static inline __attribute__((always_inline)) void score_group(const float *q, int g, int64_t d,
                                                              const float *const *keys, int64_t offset, int64_t n,
                                                              float scale, float *p) {
    for (int64_t j = 0; j < n; j += 8) {
        f32x16 wide[GROUP_BATCH][8];
        for (int t = 0; t < g; ++t)
            for (int u = 0; u < 8; ++u) wide[t][u] = (f32x16){0};
        for (int64_t i = 0; i < d; i += 16) {
            f32x16 qv[GROUP_BATCH];
            for (int t = 0; t < g; ++t) qv[t] = load16(q + t * d + i);
            for (int u = 0; u < 8; ++u) {
                const f32x16 k = load16(keys[j + u] + offset + i);
                for (int t = 0; t < g; ++t) wide[t][u] += qv[t] * k;
            }
        }
        for (int t = 0; t < g; ++t) {
            f32x8 lanes[8];
            for (int u = 0; u < 8; ++u) lanes[u] = low8(wide[t][u]) + high8(wide[t][u]);
            store8(p + t * KEY_CHUNK + j, sum8x8(lanes) * scale);
        }
    }
}

/* acc [g, D] = acc * shrink + p . v for the g query heads of one kv head: each value vector loaded once for all g
 * heads, their g x D / 16 sums (12 at D = 64) in registers across the chunk, enough independent FMA chains to
 * hide the FMA latency that one head's D / 16 chains do not. */
static inline __attribute__((always_inline)) void accumulate_group(float *acc, int g, int64_t d, const float *p,
                                                                   const float *const *values, int64_t offset,
                                                                   int64_t n, const float *shrink) {
    f32x16 a[GROUP_BATCH][MAX_HEAD_DIM / 16];
    for (int t = 0; t < g; ++t)
        for (int64_t c = 0; c < d / 16; ++c) a[t][c] = load16(acc + t * d + c * 16) * shrink[t];
    for (int64_t j = 0; j < n; ++j)
        for (int64_t c = 0; c < d / 16; ++c) {
            const f32x16 v = load16(values[j] + offset + c * 16);
            for (int t = 0; t < g; ++t) a[t][c] += p[t * KEY_CHUNK + j] * v;
        }
    for (int t = 0; t < g; ++t)
        for (int64_t c = 0; c < d / 16; ++c) store16(acc + t * d + c * 16, a[t][c]);
}

/* A batch of g query heads of one kv head over one chunk: scores, softmax, values (g a constant once inlined). */
static inline __attribute__((always_inline)) void attend_group(const float *q, float *acc, float *best, float *total,
                                                               int g, int64_t d, const float *const *keys,
                                                               const float *const *values, int64_t offset,
                                                               int64_t n, float scale, float softcap, float *p) {
    float shrink[GROUP_BATCH];
    score_group(q, g, d, keys, offset, n, scale, p);
    for (int t = 0; t < g; ++t) shrink[t] = softmax_chunk(p + t * KEY_CHUNK, n, softcap, best + t, total + t);
    accumulate_group(acc, g, d, p, values, offset, n, shrink);
}
#endif

/* The query heads of kv heads [h0, h0 + heads) of one sequence, q [heads * group, D], against its `ctx` cached
 * tokens, into out [heads * group, D]; k_cache / v_cache point at kv head h0 of cache row 0; D is a multiple of 8,
 * at most MAX_HEAD_DIM. Straight from the paged cache, a chunk of tokens at a time with an online softmax, so
 * nothing is gathered or padded. Tokens are visited in cache order with all the task's heads at once: the cache is
 * cold by the time a layer attends (its weights streamed through since), and whole rows read in order stream
 * better than one head's 256-byte slice of each row (320 tokens of SmolLM2's 3 kv heads, cold: 80 us against
 * 105 us a head at a time). With AVX-512 the query heads sharing a kv head (GQA) are scored and accumulated
 * GROUP_BATCH at a time, each key and value vector loaded once for all of them; AVX2's 16 registers hold one
 * head's accumulators, so it takes one head at a time (its keys then come from L1 for the group's other heads).
 * That and the vector softmax save compute only (warm cache, the first ~4% in one A/B, the softmax within noise);
 * cold, where the reads bound it, they change nothing. A chunk's key rows past ctx repeat its last one, so keys are
 * always scored eight at a time; those scores are dropped. next_table (NULL: none), next_first and next_ctx: the
 * keys of the task this thread takes next, whose first rows the prefetch below asks for near this one's end.
 * Always inlined into a switch on D, so the common head sizes get fully unrolled loops that keep the accumulators
 * in registers across the loop over values. softcap > 0 squashes each scaled score s to
 * softcap * tanh(s / softcap) before the softmax (Gemma 2); 0: none. */
static inline __attribute__((always_inline)) void attend(const float *q, float *out, const float *k_cache,
                                                         const float *v_cache, const int32_t *table, int64_t first,
                                                         int64_t ctx, int64_t heads, int64_t group, int64_t d,
                                                         int64_t block_size, int64_t token_stride, float scale,
                                                         float softcap, const float *sinks, float *part_best,
                                                         float *part_total, const int32_t *next_table,
                                                         int64_t next_first, int64_t next_ctx) {
    const int64_t nq = heads * group; /* query heads of this task */
    float acc[nq * d], best[nq], total[nq], p[nq * KEY_CHUNK];
    const float *keys[KEY_CHUNK], *values[KEY_CHUNK];
    int64_t rows[KEY_CHUNK];
    memset(acc, 0, sizeof(acc));
    for (int64_t h = 0; h < nq; ++h) best[h] = -INFINITY, total[h] = 0.0f;
    for (int64_t start = first; start < ctx; start += KEY_CHUNK) {
        const int64_t n = ctx - start < KEY_CHUNK ? ctx - start : KEY_CHUNK;
        cache_rows(table, block_size, start, n, rows);
        for (int64_t j = 0; j < KEY_CHUNK; ++j) { /* past n: the last row again, scored as junk and dropped */
            const int64_t row = rows[j < n ? j : n - 1];
            keys[j] = k_cache + row * token_stride;
            values[j] = v_cache + row * token_stride;
        }
        /* Blocks are scattered, so the hardware prefetcher loses the stream at each block's end: ask for the next
         * PREFETCH_CHUNKS chunks' rows into L2 while this one is scored. Each line is asked for again at every chunk
         * until it is reached: requests dropped by a full miss queue are made again, and a line already in L2
         * costs little (asking once, at the far end only, measured 5-10% slower). Near a task's end the window runs
         * on into the first keys of the task this thread takes next, so no task starts cold. Cold caches, 16
         * sequences x 320 tokens x 30 layers (bench kernels, avx512vnni): 8.15 ms against 9.1 ms with 3 chunks and
         * no look-ahead into the next task (6 chunks without it, or 3 with it, gain nothing; 4 with it 8.4 ms, 6 as
         * 5, 8 or more worse: the re-asking costs more than it hides); one sequence x 2048 tokens 3.15 against 3.4
         * ms; avx2 9.1 against 11.2 ms. ~29 GB/s, where a bare read of the same scattered 12 KB blocks (4 KB pages)
         * reaches 26-30 GB/s: the page walks, not this loop, bound it. The pacing matters: the same lines asked for
         * a block at a time (no per-token address math) lose the gain, as does asking every other chunk. The price:
         * with K and V already in cache (one layer, 16 x 320 tokens, warm) the re-asking costs 0.14 against 0.11 ms. */
        const int64_t ahead = start + (1 + PREFETCH_CHUNKS) * KEY_CHUNK;
        prefetch_rows(k_cache, v_cache, table, block_size, token_stride, heads * d, start + KEY_CHUNK,
                      ahead < ctx ? ahead : ctx);
        if (next_table != NULL && ahead > ctx) { /* past this task's end: the next task's first keys */
            const int64_t to = next_first + (ahead - ctx);
            prefetch_rows(k_cache, v_cache, next_table, block_size, token_stride, heads * d,
                          next_first + (start + KEY_CHUNK > ctx ? start + KEY_CHUNK - ctx : 0),
                          to < next_ctx ? to : next_ctx);
        }
#if defined(__AVX512F__)
        if (d % 16 == 0) {
            for (int64_t h = 0; h < nq; h += GROUP_BATCH) { /* batches of one kv head's query heads */
                const int64_t in_group = h % group, left = group - in_group;
                const int g = left < GROUP_BATCH ? (int)left : GROUP_BATCH;
                const int64_t offset = (h / group) * d;
                float *ph = p + h * KEY_CHUNK;
                if (g == 3)
                    attend_group(q + h * d, acc + h * d, best + h, total + h, 3, d, keys, values, offset, n, scale,
                                 softcap, ph);
                else if (g == 2)
                    attend_group(q + h * d, acc + h * d, best + h, total + h, 2, d, keys, values, offset, n, scale,
                                 softcap, ph);
                else
                    attend_group(q + h * d, acc + h * d, best + h, total + h, 1, d, keys, values, offset, n, scale,
                                 softcap, ph);
                h -= GROUP_BATCH - g; /* a short batch ends its kv head: the next starts at the next one's first */
            }
            continue;
        }
#endif
        for (int64_t j = 0; j < n; j += 8) { /* p = q . k * scale, eight keys at a time: one reduction for all eight */
            for (int64_t h = 0; h < nq; ++h) {
                const float *qh = q + h * d;
                const int64_t offset = (h / group) * d;
                f32x8 lanes[8] = {{0}};
                for (int64_t i = 0; i < d; i += 8) {
                    const f32x8 qv = load8(qh + i);
                    for (int u = 0; u < 8; ++u) lanes[u] += qv * load8(keys[j + u] + offset + i);
                }
                store8(p + h * KEY_CHUNK + j, sum8x8(lanes) * scale);
            }
        }
        for (int64_t h = 0; h < nq; ++h) { /* online softmax, then acc = acc * shrink + p . v */
            float *ph = p + h * KEY_CHUNK;
            const float shrink = softmax_chunk(ph, n, softcap, best + h, total + h);
            const int64_t offset = (h / group) * d;
            f32x8 a[MAX_HEAD_DIM / 8];
            for (int64_t c = 0; c < d / 8; ++c) a[c] = load8(acc + h * d + c * 8) * shrink;
            for (int64_t j = 0; j < n; ++j) {
                const f32x8 w = {ph[j], ph[j], ph[j], ph[j], ph[j], ph[j], ph[j], ph[j]};
                for (int64_t c = 0; c < d / 8; ++c) a[c] += w * load8(values[j] + offset + c * 8);
            }
            for (int64_t c = 0; c < d / 8; ++c) store8(acc + h * d + c * 8, a[c]);
        }
    }
    if (part_best != NULL) { /* one share of the keys: the unnormalized sums, joined by join_shares */
        memcpy(out, acc, sizeof(acc));
        memcpy(part_best, best, sizeof(best));
        memcpy(part_total, total, sizeof(total));
        return;
    }
    for (int64_t h = 0; h < nq; ++h) {
        const float inv = 1.0f / (total[h] + sink_weight(sinks, h, best[h]));
        for (int64_t i = 0; i < d; ++i) out[h * d + i] = acc[h * d + i] * inv;
    }
}

/* out [hq, D] = the shares' partial attention joined: each share's sums rescaled to the overall max and divided by
 * the overall total (the online softmax across shares). acc [shares][hq][D], best and total [shares][hq]. */
static void join_shares(const float *acc, const float *best, const float *total, int64_t shares, int64_t hq,
                        int64_t d, const float *sinks, float *out) {
    for (int64_t h = 0; h < hq; ++h) {
        float top = -INFINITY, sum = 0.0f;
        for (int64_t s = 0; s < shares; ++s) top = best[s * hq + h] > top ? best[s * hq + h] : top;
        for (int64_t i = 0; i < d; ++i) out[h * d + i] = 0.0f;
        for (int64_t s = 0; s < shares; ++s) {
            if (total[s * hq + h] == 0.0f) continue; /* a share with no keys */
            const float weight = exp_f32(best[s * hq + h] - top);
            sum += total[s * hq + h] * weight;
            for (int64_t i = 0; i < d; ++i) out[h * d + i] += acc[(s * hq + h) * d + i] * weight;
        }
        sum += sink_weight(sinks, h, top);
        for (int64_t i = 0; i < d; ++i) out[h * d + i] /= sum;
    }
}

/* The keys [first, last) of task `share` of sequence b: its window's chunks split into `shares` runs of whole ones. */
static inline void task_keys(const int32_t *context_lens, int64_t window, int64_t shares, int64_t b, int64_t share,
                             int64_t *first, int64_t *last) {
    const int64_t ctx = context_lens[b], low = window > 0 && ctx > window ? ctx - window : 0;
    const int64_t chunks = (ctx - low + KEY_CHUNK - 1) / KEY_CHUNK;
    const int64_t end = shares == 1 ? ctx : low + (share + 1) * chunks / shares * KEY_CHUNK;
    *first = low + share * chunks / shares * KEY_CHUNK;
    *last = end < ctx ? end : ctx;
}

/* Decode attention: query q [B, Hq, D] (heads packed, rows `q_row` apart) of each sequence against its
 * context_lens[b] cached tokens, found through block_tables [B, max_blocks] in the paged caches
 * [num_blocks, block_size, Hk, D]; out [B, Hq, D]. Query head i reads kv head i / (Hq / Hk), as Hugging Face's
 * repeat_kv does. window > 0 (sliding-window attention): the query, token ctx - 1, sees only the last `window`
 * tokens, and only those are read (from ctx - window on, chunks counted from there), so a step costs O(window), not
 * O(ctx); 0: all. softcap: see attend. sinks [Hq] (NULL: none): each head's attention sink (sink_weight). A task is
 * one sequence, or, when there are fewer sequences than threads, a share of its keys (whole chunks; the shares'
 * partial sums are joined after, as the online softmax joins chunks): one stream's decode then reads its cache with
 * every thread. With num_threads > 1 the tasks are dealt round-robin (schedule(static, 1)) among that many OpenMP
 * threads, so each knows the task it takes next and prefetches its first keys while finishing this one (see
 * attend; dynamic scheduling without that look-ahead measured no faster, also with context lengths 256-384
 * mixed); with 1 no parallel region is entered, so no sleeping worker is woken. */
void paged_decode_attention_f32(const float *q, int64_t q_row, const float *k_cache, const float *v_cache,
                                const int32_t *block_tables, int64_t max_blocks, const int32_t *context_lens,
                                float *out, int64_t batch, int64_t hq, int64_t hk, int64_t d, int64_t block_size,
                                float scale, int64_t window, float softcap, const float *sinks,
                                int32_t num_threads) {
    const int64_t group = hq / hk;
    /* Fewer sequences than threads: each sequence's keys in `shares` ranges of whole chunks, every thread busy. */
    const int64_t shares = batch < num_threads ? (num_threads + batch - 1) / batch : 1;
    float partial[shares > 1 ? batch * shares * hq * (d + 2) : 1]; /* acc, then best, then total, per share */
    float *part_acc = partial, *part_best = partial + batch * shares * hq * d;
    float *part_total = part_best + batch * shares * hq;
    const int64_t tasks = batch * shares, step = num_threads > 1 ? num_threads : 1;
#pragma omp parallel for schedule(static, 1) num_threads(num_threads) if (num_threads > 1)
    for (int64_t task = 0; task < tasks; ++task) {
        const int64_t b = task / shares, share = task % shares;
        int64_t first, last, next_first = 0, next_last = 0;
        task_keys(context_lens, window, shares, b, share, &first, &last);
        const int64_t next = task + step; /* the task this thread takes next (schedule(static, 1)) */
        const int32_t *next_table = NULL;
        if (next < tasks) {
            task_keys(context_lens, window, shares, next / shares, next % shares, &next_first, &next_last);
            next_table = block_tables + next / shares * max_blocks;
        }
        const float *qb = q + b * q_row;
        const int32_t *table = block_tables + b * max_blocks;
        const int64_t slot = b * shares + share;
        float *ob = shares == 1 ? out + b * hq * d : part_acc + slot * hq * d;
        float *sb = shares == 1 ? NULL : part_best + slot * hq, *tb = shares == 1 ? NULL : part_total + slot * hq;
        switch (d) { /* a constant head size per case: see attend */
        case 64:
            attend(qb, ob, k_cache, v_cache, table, first, last, hk, group, 64, block_size, hk * 64, scale, softcap,
                   sinks, sb, tb, next_table, next_first, next_last);
            break;
        case 128:
            attend(qb, ob, k_cache, v_cache, table, first, last, hk, group, 128, block_size, hk * 128, scale, softcap,
                   sinks, sb, tb, next_table, next_first, next_last);
            break;
        default:
            attend(qb, ob, k_cache, v_cache, table, first, last, hk, group, d, block_size, hk * d, scale, softcap,
                   sinks, sb, tb, next_table, next_first, next_last);
        }
    }
    if (shares > 1)
        for (int64_t b = 0; b < batch; ++b)
            join_shares(part_acc + b * shares * hq * d, part_best + b * shares * hq, part_total + b * shares * hq,
                        shares, hq, d, sinks, out + b * hq * d);
}
