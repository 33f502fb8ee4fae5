/* Native fp32 CPU kernels for small-batch decode, called through ctypes by sagellm.backends.native.
 *
 * At a few tokens per step the arithmetic of a layer's norms, rotary embedding, SiLU and attention is microseconds,
 * while torch pays an op dispatch per step of it and wakes its OpenMP worker for the larger ones (~50 us each once
 * the worker has gone to sleep); its linears read blocked weight layouts no faster than one core streams a
 * plain one. Each function here does one op in one call on the calling thread. They take raw pointers and element
 * strides, allocate nothing on the heap and cannot fail: the Python wrappers check dtypes, shapes and layouts
 * first. Built per instruction set (isa.py), so the `omp simd` loops use that set's widest vectors. Kernels
 * taking `num_threads` share their rows (attention: its tasks) among that many OpenMP threads, for the hundreds of
 * rows of a prefill; with 1 no parallel region is entered, so no sleeping worker is woken at decode. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"
#include "vector_math.h"

/* normed = s / sqrt(mean(s^2) + eps) * weight with s = x + residual (also stored to `summed`), or s = x when residual
 * is NULL: the pre-attention and pre-MLP norms with the residual add folded into the same pass over the row. */
void rmsnorm_f32(const float *x, int64_t x_row, const float *residual, int64_t residual_row, const float *weight,
                 float *normed, float *summed, int64_t rows, int64_t hidden, float eps, int32_t num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1)
    for (int64_t t = 0; t < rows; ++t) {
        const float *xt = x + t * x_row;
        const float *src = xt;
        float squares = 0.0f;
        if (residual != NULL) {
            const float *rt = residual + t * residual_row;
            float *st = summed + t * hidden;
#pragma omp simd reduction(+ : squares)
            for (int64_t i = 0; i < hidden; ++i) {
                const float s = xt[i] + rt[i];
                st[i] = s;
                squares += s * s;
            }
            src = st;
        } else {
#pragma omp simd reduction(+ : squares)
            for (int64_t i = 0; i < hidden; ++i) squares += xt[i] * xt[i];
        }
        const float inv = 1.0f / sqrtf(squares / (float)hidden + eps);
        float *nt = normed + t * hidden;
#pragma omp simd
        for (int64_t i = 0; i < hidden; ++i) nt[i] = src[i] * inv * weight[i];
    }
}

/* out[T, H, D] = each head of x normed (rmsnorm_f32 on each, the weight [D] shared): x's tokens `x_row` apart, its
 * heads `head_stride` apart within a token (Qwen3's q/k norms on views of the fused qkv output, Qwen3.5's queries
 * beside their gates). */
void head_rmsnorm_f32(const float *x, int64_t x_row, int64_t head_stride, const float *weight, float *out,
                      int64_t tokens, int64_t heads, int64_t d, float eps, int32_t num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1)
    for (int64_t t = 0; t < tokens; ++t)
        rmsnorm_f32(x + t * x_row, head_stride, NULL, 0, weight, out + t * heads * d, NULL, heads, d, eps, 1);
}

/* Rotate-half rotary embedding of q [T, Hq, D] and k [T, Hk, D] (heads packed, rows `q_row` / `k_row` apart: views
 * of the fused qkv output) into out [T, Hq + Hk, D], one pass over both. cos_sin [max_pos, R] holds cos in its first
 * half and sin in its second; each head's first R dims turn, the rest (partial rotary, R < D) are copied. Positions
 * must lie inside the table (the runner's are below max_model_len, its size). */
void rope_f32(const float *q, int64_t q_row, const float *k, int64_t k_row, const int64_t *positions,
              const float *cos_sin, float *out, int64_t tokens, int64_t hq, int64_t hk, int64_t d, int64_t rot,
              int32_t num_threads) {
    const int64_t half = rot / 2;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1)
    for (int64_t t = 0; t < tokens; ++t) {
        const float *cos = cos_sin + positions[t] * rot, *sin = cos + half;
        for (int64_t h = 0; h < hq + hk; ++h) {
            const float *src = h < hq ? q + t * q_row + h * d : k + t * k_row + (h - hq) * d;
            float *dst = out + (t * (hq + hk) + h) * d;
#pragma omp simd
            for (int64_t i = 0; i < half; ++i) {
                const float x1 = src[i], x2 = src[half + i];
                dst[i] = x1 * cos[i] - x2 * sin[i];
                dst[half + i] = x2 * cos[i] + x1 * sin[i];
            }
            if (rot < d) memcpy(dst + rot, src + rot, sizeof(float) * (size_t)(d - rot));
        }
    }
}

/* out[T, H * D] = rmsnorm(x) * silu(z) per head of D, weight [D] shared by the heads: the Gated DeltaNet's output
 * norm and gate (x its core's output, z a view of the fused input projection; rows `x_row` / `z_row` apart). */
void gated_rmsnorm_f32(const float *x, int64_t x_row, const float *z, int64_t z_row, const float *weight, float *out,
                       int64_t tokens, int64_t heads, int64_t d, float eps, int32_t num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1)
    for (int64_t t = 0; t < tokens; ++t) {
        for (int64_t h = 0; h < heads; ++h) {
            const float *xh = x + t * x_row + h * d, *zh = z + t * z_row + h * d;
            float *oh = out + (t * heads + h) * d;
            float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
            for (int64_t i = 0; i < d; ++i) squares += xh[i] * xh[i];
            const float inv = 1.0f / sqrtf(squares / (float)d + eps);
#pragma omp simd
            for (int64_t i = 0; i < d; ++i) oh[i] = xh[i] * inv * weight[i] * (zh[i] / (1.0f + exp_f32(-zh[i])));
        }
    }
}

/* out[T, I] = silu(x[:, :I]) * x[:, I:], the MLP activation on the fused gate_up output (rows `x_row` apart). */
void silu_mul_f32(const float *x, int64_t x_row, float *out, int64_t rows, int64_t inter, int32_t num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1)
    for (int64_t t = 0; t < rows; ++t) {
        const float *gate = x + t * x_row, *up = gate + inter;
        float *ot = out + t * inter;
#pragma omp simd
        for (int64_t i = 0; i < inter; ++i) ot[i] = gate[i] / (1.0f + exp_f32(-gate[i])) * up[i];
    }
}

/* out[T, N] = sigmoid(x) (rows `x_row` apart): Qwen3.5's attention output gate, a head's gate beside its query. */
void sigmoid_f32(const float *x, int64_t x_row, float *out, int64_t rows, int64_t n, int32_t num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1)
    for (int64_t t = 0; t < rows; ++t) {
        const float *xt = x + t * x_row;
        float *ot = out + t * n;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) ot[i] = 1.0f / (1.0f + exp_f32(-xt[i]));
    }
}

/* Stores each new token's k and v [T, Hk, D] (heads packed, rows `k_row` / `v_row` apart) at its flat slot of the
 * paged caches [num_blocks * block_size, Hk, D]: the decode step's cache write without two torch index_copy_ calls. */
void write_kv_f32(const float *k, int64_t k_row, const float *v, int64_t v_row, const int64_t *slots, float *k_cache,
                  float *v_cache, int64_t tokens, int64_t hk, int64_t d) {
    const int64_t width = hk * d;
    for (int64_t t = 0; t < tokens; ++t) {
        memcpy(k_cache + slots[t] * width, k + t * k_row, sizeof(float) * width);
        memcpy(v_cache + slots[t] * width, v + t * v_row, sizeof(float) * width);
    }
}

static inline f32x8 low8(f32x16 v) { return (f32x8){v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]}; }

static inline f32x8 high8(f32x16 v) { return (f32x8){v[8], v[9], v[10], v[11], v[12], v[13], v[14], v[15]}; }

static inline float sum8(f32x8 v) { return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7])); }

/* Lanes of a and b (b's numbered 8-15) picked into one vector; clang and GCC before 12 each know only one spelling. */
#if defined(__clang__)
#define SHUFFLE8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE8(a, b, ...) __builtin_shuffle(a, b, (i32x8){__VA_ARGS__})
#endif

/* The eight lane sums of v[0..7] as one vector: a transposing tree of shuffles and adds, three levels for all eight
 * where eight sum8 calls take three levels each, their lanes extracted one by one. */
static inline f32x8 sum8x8(const f32x8 v[8]) {
    f32x8 pairs[4], quads[2];
    for (int i = 0; i < 4; ++i) /* lanes 2m, 2m+1: v[2i] and v[2i+1] summed over their lanes 2m..2m+1 */
        pairs[i] = SHUFFLE8(v[2 * i], v[2 * i + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
                   SHUFFLE8(v[2 * i], v[2 * i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
    for (int i = 0; i < 2; ++i) /* lanes 0-3: four vectors over lanes 0..3; lanes 4-7: the same over lanes 4..7 */
        quads[i] = SHUFFLE8(pairs[2 * i], pairs[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
                   SHUFFLE8(pairs[2 * i], pairs[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
    return SHUFFLE8(quads[0], quads[1], 0, 1, 2, 3, 8, 9, 10, 11) +
           SHUFFLE8(quads[0], quads[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

/* y[T, N] = x[T, K] . w[N, K]^T (+ bias[N]), x's rows `x_row` apart: a linear over a few rows (decode), on the
 * calling thread. It reads the weight once, row after row, which one core streams at this machine's full memory
 * bandwidth (measured ~20 GB/s, the same as two threads), while the GEMM libraries' small-batch paths read blocked
 * layouts more slowly and wake a second thread per call. */
void linear_f32(const float *x, int64_t x_row, const float *w, const float *bias, float *y, int64_t tokens,
                int64_t n, int64_t k) {
    const int64_t k32 = k - k % 32;
    for (int64_t r = 0; r < n; ++r) {
        const float *wr = w + r * k;
        for (int64_t t = 0; t < tokens; ++t) {
            const float *xt = x + t * x_row;
            f32x8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}; /* four chains, so the FMAs' latency is hidden */
            for (int64_t i = 0; i < k32; i += 32) {
                a0 += load8(xt + i) * load8(wr + i);
                a1 += load8(xt + i + 8) * load8(wr + i + 8);
                a2 += load8(xt + i + 16) * load8(wr + i + 16);
                a3 += load8(xt + i + 24) * load8(wr + i + 24);
            }
            float dot = sum8((a0 + a1) + (a2 + a3));
            for (int64_t i = k32; i < k; ++i) dot += xt[i] * wr[i];
            y[t * n + r] = bias != NULL ? dot + bias[r] : dot;
        }
    }
}

enum { KEY_CHUNK = 32 }; /* keys scored between two softmax rescales; their scores live on the stack */
enum { PREFETCH_CHUNKS = 3 }; /* chunks of keys asked for ahead of the one being scored */
enum { MAX_HEAD_DIM = 256 };

/* The query heads of kv heads [h0, h0 + heads) of one sequence, q [heads * group, D], against its `ctx` cached
 * tokens, into out [heads * group, D]; k_cache / v_cache point at kv head h0 of cache row 0; D is a multiple of 8,
 * at most MAX_HEAD_DIM. Each cached token's keys are read once for every query head sharing them (GQA), straight
 * from the paged cache, a chunk of tokens at a time with an online softmax, so nothing is gathered or padded.
 * Tokens are visited in cache order with all the task's heads at once: the cache is cold by the time a layer
 * attends (its weights streamed through since), and whole rows read in order stream better than one head's
 * 256-byte slice of each row (320 tokens of SmolLM2's 3 kv heads, cold: 80 us against 105 us a head at a time).
 * Always inlined into a switch on D, so the common head sizes get fully unrolled loops that keep a head's
 * accumulator in registers across the loop over values. softcap > 0 squashes each scaled score s to
 * softcap * tanh(s / softcap) before the softmax (Gemma 2); 0: none. */
static inline __attribute__((always_inline)) void attend(const float *q, float *out, const float *k_cache,
                                                         const float *v_cache, const int32_t *table, int64_t first,
                                                         int64_t ctx, int64_t heads, int64_t group, int64_t d,
                                                         int64_t block_size, int64_t token_stride, float scale,
                                                         float softcap, const float *sinks, float *part_best,
                                                         float *part_total) {
    const int64_t nq = heads * group; /* query heads of this task */
    float acc[nq * d], best[nq], total[nq], p[nq * KEY_CHUNK];
    const float *keys[KEY_CHUNK], *values[KEY_CHUNK];
    memset(acc, 0, sizeof(acc));
    for (int64_t h = 0; h < nq; ++h) best[h] = -INFINITY, total[h] = 0.0f;
    for (int64_t start = first; start < ctx; start += KEY_CHUNK) {
        const int64_t n = ctx - start < KEY_CHUNK ? ctx - start : KEY_CHUNK;
        for (int64_t j = 0; j < n; ++j) { /* where the chunk's tokens live in the cache */
            const int64_t pos = start + j;
            const int64_t row = (int64_t)table[pos / block_size] * block_size + pos % block_size;
            keys[j] = k_cache + row * token_stride;
            values[j] = v_cache + row * token_stride;
        }
        /* Blocks are scattered, so the hardware prefetcher loses the stream at each block's end: ask for the next
         * PREFETCH_CHUNKS chunks' rows into L2 while this one is scored. Each line is asked for again at every chunk
         * until it is reached: requests dropped by a full miss queue are made again, and a line already in L2
         * costs little. Cold caches, 16 sequences x 272 tokens x 30 layers: 11.6 ms against 16.5 ms asking for
         * the next chunk only, into L1 (a chunk's K and V, 48 KB, overflow L1 while the current one is used); 2048
         * tokens of one sequence 8.4 against 13.3 ms. */
        for (int64_t pos = start + KEY_CHUNK; pos < ctx && pos < start + (1 + PREFETCH_CHUNKS) * KEY_CHUNK; ++pos) {
            const int64_t row = (int64_t)table[pos / block_size] * block_size + pos % block_size;
            for (int64_t i = 0; i < heads * d; i += 16) {
                __builtin_prefetch(k_cache + row * token_stride + i, 0, 1); /* read, keep in L2 (prefetcht2) */
                __builtin_prefetch(v_cache + row * token_stride + i, 0, 1);
            }
        }
        int64_t j = 0;
        for (; j + 8 <= n; j += 8) { /* p = q . k * scale, eight keys at a time: one reduction for all eight */
            for (int64_t h = 0; h < nq; ++h) {
                const float *qh = q + h * d;
                const int64_t offset = (h / group) * d;
                f32x8 lanes[8] = {{0}};
#if defined(__AVX512F__)
                if (d % 16 == 0) { /* 16 floats at a time in AVX-512's registers, folded to 8 lanes at the end */
                    f32x16 wide[8] = {{0}};
                    for (int64_t i = 0; i < d; i += 16) {
                        const f32x16 qv = load16(qh + i);
                        for (int u = 0; u < 8; ++u) wide[u] += qv * load16(keys[j + u] + offset + i);
                    }
                    for (int u = 0; u < 8; ++u) lanes[u] = low8(wide[u]) + high8(wide[u]);
                } else
#endif
                    for (int64_t i = 0; i < d; i += 8) {
                        const f32x8 qv = load8(qh + i);
                        for (int u = 0; u < 8; ++u) lanes[u] += qv * load8(keys[j + u] + offset + i);
                    }
                store8(p + h * KEY_CHUNK + j, sum8x8(lanes) * scale);
            }
        }
        for (; j < n; ++j) { /* the chunk's last keys, one at a time */
            for (int64_t h = 0; h < nq; ++h) {
                const float *qh = q + h * d, *key = keys[j] + (h / group) * d;
                f32x8 lanes = {0};
                for (int64_t i = 0; i < d; i += 8) lanes += load8(qh + i) * load8(key + i);
                p[h * KEY_CHUNK + j] = sum8(lanes) * scale;
            }
        }
        for (int64_t h = 0; h < nq; ++h) { /* online softmax, then acc = acc * shrink + p . v */
            float *ph = p + h * KEY_CHUNK;
            if (softcap > 0.0f) { /* lanes past n hold junk, as below: capped and then dropped */
                const float inv = 1.0f / softcap;
#pragma omp simd
                for (int64_t j = 0; j < KEY_CHUNK; ++j) ph[j] = softcap * tanh_f32(ph[j] * inv);
            }
            float top = best[h];
            for (int64_t j = 0; j < n; ++j) top = ph[j] > top ? ph[j] : top;
            const float shrink = exp_f32(best[h] - top);
#pragma omp simd
            for (int64_t j = 0; j < KEY_CHUNK; ++j) ph[j] = j < n ? exp_f32(ph[j] - top) : 0.0f;
            const f32x8 sum = (load8(ph) + load8(ph + 8)) + (load8(ph + 16) + load8(ph + 24)); /* KEY_CHUNK = 32 */
            best[h] = top;
            total[h] = total[h] * shrink + sum8(sum);
            const int64_t offset = (h / group) * d;
#if defined(__AVX512F__)
            if (d % 16 == 0) {
                f32x16 a[MAX_HEAD_DIM / 16];
                for (int64_t c = 0; c < d / 16; ++c) a[c] = load16(acc + h * d + c * 16) * shrink;
                for (int64_t j = 0; j < n; ++j)
                    for (int64_t c = 0; c < d / 16; ++c) a[c] += ph[j] * load16(values[j] + offset + c * 16);
                for (int64_t c = 0; c < d / 16; ++c) store16(acc + h * d + c * 16, a[c]);
                continue;
            }
#endif
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

/* Decode attention: query q [B, Hq, D] (heads packed, rows `q_row` apart) of each sequence against its
 * context_lens[b] cached tokens, found through block_tables [B, max_blocks] in the paged caches
 * [num_blocks, block_size, Hk, D]; out [B, Hq, D]. Query head i reads kv head i / (Hq / Hk), as Hugging Face's
 * repeat_kv does. window > 0 (sliding-window attention): the query, token ctx - 1, sees only the last `window`
 * tokens, and only those are read (from ctx - window on, chunks counted from there), so a step costs O(window), not
 * O(ctx); 0: all. softcap: see attend. sinks [Hq] (NULL: none): each head's attention sink (sink_weight). A task is one sequence, or, when there are fewer sequences than threads, a
 * share of its keys (whole chunks; the shares' partial sums are joined after, as the online softmax joins chunks):
 * one stream's decode then reads its cache with every thread.
 * With num_threads > 1 the tasks are shared among that many OpenMP threads; with 1 no parallel region is entered,
 * so no sleeping worker is woken. */
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
#pragma omp parallel for collapse(2) schedule(dynamic) num_threads(num_threads) if (num_threads > 1)
    for (int64_t b = 0; b < batch; ++b) {
        for (int64_t share = 0; share < shares; ++share) {
            const int64_t ctx = context_lens[b], low = window > 0 && ctx > window ? ctx - window : 0;
            const int64_t chunks = (ctx - low + KEY_CHUNK - 1) / KEY_CHUNK;
            const int64_t first = low + share * chunks / shares * KEY_CHUNK;
            const int64_t end = shares == 1 ? ctx : low + (share + 1) * chunks / shares * KEY_CHUNK;
            const int64_t last = end < ctx ? end : ctx;
            const float *qb = q + b * q_row;
            const int32_t *table = block_tables + b * max_blocks;
            const int64_t slot = b * shares + share;
            float *ob = shares == 1 ? out + b * hq * d : part_acc + slot * hq * d;
            float *sb = shares == 1 ? NULL : part_best + slot * hq, *tb = shares == 1 ? NULL : part_total + slot * hq;
            switch (d) { /* a constant head size per case: see attend */
            case 64:
                attend(qb, ob, k_cache, v_cache, table, first, last, hk, group, 64, block_size, hk * 64, scale, softcap,
                       sinks, sb, tb);
                break;
            case 128:
                attend(qb, ob, k_cache, v_cache, table, first, last, hk, group, 128, block_size, hk * 128, scale,
                       softcap, sinks, sb, tb);
                break;
            default:
                attend(qb, ob, k_cache, v_cache, table, first, last, hk, group, d, block_size, hk * d, scale, softcap,
                       sinks, sb, tb);
            }
        }
    }
    if (shares > 1)
        for (int64_t b = 0; b < batch; ++b)
            join_shares(part_acc + b * shares * hq * d, part_best + b * shares * hq, part_total + b * shares * hq,
                        shares, hq, d, sinks, out + b * hq * d);
}
