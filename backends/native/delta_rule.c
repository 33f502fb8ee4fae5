/* The Gated DeltaNet (Qwen3.5's linear attention layers) after its projections, called through ctypes by
 * sagellm.backends.native (ops.py `gated_delta_net`); backends/torch_ops/linear_attention.py defines the op.
 *
 * A decode token's work is its sequence's delta-rule state, S [Dk, Dv] per value head (64 KB at 128 x 128, 1 MB a
 * layer for Qwen3.5-0.8B's 16 heads), read and written once: memory-bound. The torch op reads or writes S-sized
 * tensors about a dozen times (gathering the slots, decaying, recalling, the update and its outer product, the output,
 * scattering back); here S is read twice and written once, in place in its slot: the first pass reads it for what it
 * recalls for k, the second writes S' = g S + k delta^T and sums o = S'^T q from the values it stores, while the
 * head's 64 KB are still in L2. Each pass sweeps S's rows in order with a whole row's sums in vector registers.
 * A prefill runs the same recurrence token by token: its head's state stays in L2 throughout, and this beats the
 * torch op's chunked form (matmuls and triangular solves per 64 tokens) at every length measured (backends/cpu.py). */
#include <math.h>
#include <stdint.h>

#include "kernels.h"
#include "vector_math.h"

enum { MAX_HEAD_DIM = 256 }; /* ops.py MAX_DELTA_HEAD_DIM: Dk and Dv at most this (the per-head arrays below) */
enum { MAX_WIDTH = 8 };      /* ops.py MAX_CONV_WIDTH: the convolution's K at most this */

/* Columns of S summed per sweep over its rows: a whole row of Qwen3.5's 128 (8 AVX-512 registers, 16 AVX2 ones), so
 * each pass reads S in order; on AVX2 5-15% faster than halves of 64 columns, which fit the registers better. */
enum { TILE = 128, TILE_VECTORS = TILE / LANES };

/* y[t, c] = sum_j window_t[c, j] * w[c, j] for the n channels of one task and `tokens` tokens in order (x's rows
 * x_row apart, y's y_row), window_t = [the K-1 inputs before token t, x[t]], starting from the `kept` ones [n, K-1],
 * which end as the last K-1 inputs. The weights and kept inputs are first transposed to [K, n], so each token's sums
 * are vectors over channels. */
static void convolve(const float *x, int64_t x_row, float *kept, const float *w, float *y, int64_t y_row, int64_t n,
                     int64_t tokens, int64_t width) {
    const int64_t keep = width - 1;
    float wt[MAX_WIDTH][MAX_HEAD_DIM], before[MAX_WIDTH][MAX_HEAD_DIM]; /* w^T; before[j]: input j - (K-1) */
    for (int64_t c = 0; c < n; ++c) {
        for (int64_t j = 0; j < width; ++j) wt[j][c] = w[c * width + j];
        for (int64_t j = 0; j < keep; ++j) before[j][c] = kept[c * keep + j];
    }
    const float *inputs[MAX_WIDTH]; /* each tap's input row for this token */
    for (int64_t t = 0; t < tokens; ++t) {
        for (int64_t j = 0; j < width; ++j) inputs[j] = t + j < keep ? before[t + j] : x + (t + j - keep) * x_row;
        float *yt = y + t * y_row;
#pragma omp simd
        for (int64_t c = 0; c < n; ++c) yt[c] = wt[0][c] * inputs[0][c];
        for (int64_t j = 1; j < width; ++j) {
            const float *tap = inputs[j], *wj = wt[j];
#pragma omp simd
            for (int64_t c = 0; c < n; ++c) yt[c] += wj[c] * tap[c];
        }
    }
    for (int64_t j = 0; j < keep; ++j) { /* input tokens - K + 1 + j */
        const float *input = tokens + j < keep ? before[tokens + j] : x + (tokens + j - keep) * x_row;
        for (int64_t c = 0; c < n; ++c) kept[c * keep + j] = input[c];
    }
}

/* y = silu(y) over n floats, whole vectors then one at a time. */
static void silu(float *y, int64_t n) {
    int64_t c = 0;
    for (; c + LANES <= n; c += LANES) store_vec(y + c, silu_lanes(load_vec(y + c)));
    for (; c < n; ++c) y[c] = silu_scalar(y[c]);
}

/* y *= scale / sqrt(sum(y^2) + 1e-6): q's and k's L2 norm per key head (q also scaled by Dk^-0.5). */
static void l2norm(float *y, int64_t n, float scale) {
    float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < n; ++i) squares += y[i] * y[i];
    const float inv = 1.0f / sqrtf(squares + 1e-6f) * scale;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] *= inv;
}

/* recalled[c0, c0 + LANES nvec) = sum_i key[i] s[i, c0 ..]: a tile of S's columns, its sums in registers. Inlined
 * with a constant nvec, so the compiler unrolls the tile onto registers. */
static inline __attribute__((always_inline)) void recall(const float *s, int64_t dk, int64_t dv, const float *key,
                                                         int64_t c0, int nvec, float *recalled) {
    vec acc[TILE_VECTORS];
    for (int u = 0; u < nvec; ++u) acc[u] = (vec){0};
    for (int64_t i = 0; i < dk; ++i)
        for (int u = 0; u < nvec; ++u) acc[u] += key[i] * load_vec(s + i * dv + c0 + LANES * u);
    for (int u = 0; u < nvec; ++u) store_vec(recalled + c0 + LANES * u, acc[u]);
}

/* s[i, c0 ..] = g s[i, c0 ..] + key[i] delta[c0 ..] for every row i, and o[c0, c0 + LANES nvec) = sum_i query[i] of
 * those new values: a tile of the update and the output (see recall). */
static inline __attribute__((always_inline)) void update(float *s, int64_t dk, int64_t dv, const float *key,
                                                         const float *query, const float *delta, float g, int64_t c0,
                                                         int nvec, float *o) {
    vec d[TILE_VECTORS], acc[TILE_VECTORS];
    for (int u = 0; u < nvec; ++u) d[u] = load_vec(delta + c0 + LANES * u), acc[u] = (vec){0};
    for (int64_t i = 0; i < dk; ++i) {
        float *row = s + i * dv + c0;
        const float ki = key[i], qi = query[i]; /* read once: the stores to s could alias them */
        for (int u = 0; u < nvec; ++u) {
            const vec value = g * load_vec(row + LANES * u) + ki * d[u];
            store_vec(row + LANES * u, value);
            acc[u] += qi * value;
        }
    }
    for (int u = 0; u < nvec; ++u) store_vec(o + c0 + LANES * u, acc[u]);
}

/* One value head's delta rule for one token, S [Dk, Dv] advanced in place, o [Dv] written:
 *   S <- g S;  delta = beta (v - S^T k);  S <- S + k delta^T;  o = S^T q
 * the first two steps in one read-only pass (S^T k of the undecayed S, times g), the others in one more. Columns in
 * tiles of TILE, then of one vector, then one at a time. */
static void delta_step(float *s, const float *q, const float *k, const float *v, float g, float beta, int64_t dk,
                       int64_t dv, float *o) {
    float delta[MAX_HEAD_DIM];
    const int64_t tiled = dv - dv % TILE, vectors = dv - dv % LANES;
    for (int64_t c0 = 0; c0 < tiled; c0 += TILE) recall(s, dk, dv, k, c0, TILE_VECTORS, delta);
    for (int64_t c0 = tiled; c0 < vectors; c0 += LANES) recall(s, dk, dv, k, c0, 1, delta);
    for (int64_t c = vectors; c < dv; ++c) {
        float sum = 0.0f;
        for (int64_t i = 0; i < dk; ++i) sum += k[i] * s[i * dv + c];
        delta[c] = sum;
    }
#pragma omp simd
    for (int64_t c = 0; c < dv; ++c) delta[c] = (v[c] - g * delta[c]) * beta;
    for (int64_t c0 = 0; c0 < tiled; c0 += TILE) update(s, dk, dv, k, q, delta, g, c0, TILE_VECTORS, o);
    for (int64_t c0 = tiled; c0 < vectors; c0 += LANES) update(s, dk, dv, k, q, delta, g, c0, 1, o);
    for (int64_t c = vectors; c < dv; ++c) {
        float sum = 0.0f;
        for (int64_t i = 0; i < dk; ++i) {
            const float value = g * s[i * dv + c] + k[i] * delta[c];
            s[i * dv + c] = value;
            sum += q[i] * value;
        }
        o[c] = sum;
    }
}

static float softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); } /* torch's, threshold 20 */

/* The op over `sequences` sequences, rows starts[i] .. starts[i + 1] - 1 of the inputs being sequence i's tokens in
 * order (a decode: one each), from and back into its state slot slots[i]: x [T, C] (rows `x_row` apart; C = 2 Hk Dk
 * + Hv Dv, the projected q, k, v), a and b [T, Hv] (rows `a_row`, `b_row` apart). Per slot, conv_states[slot]
 * [C, K-1] is the convolution's window and ssm_states[slot] [Hv, Dk, Dv] the delta rule's states, both advanced in
 * place; conv_weight [C, K]; a_log, dt_bias [Hv]; out [T, Hv Dv]; scratch: T * (C + 2 Hv) floats, each token's
 * convolved q, k, v, then per value head its decay factor g (exp of the op's log-space decay) and beta. Value head h
 * reads key head h / (Hv / Hk), or h % Hk when `tiled` (a GGUF's order). Slots must be distinct and inside the
 * states. Two phases, each shared among `num_threads` OpenMP threads: the convolution (and gates) by (sequence, head
 * of q, k or v), and the delta rule by (sequence, value head): a head's state stays in L2 over its sequence's tokens.
 * (Taking it 32 columns at a time through all the tokens, in L1, measured no faster.) With 1 no parallel region is
 * entered. */
void gated_delta_net_f32(const float *x, int64_t x_row, const float *a, int64_t a_row, const float *b, int64_t b_row,
                         const int64_t *starts, const int64_t *slots, int64_t sequences, float *conv_states,
                         float *ssm_states, const float *conv_weight, const float *a_log, const float *dt_bias,
                         float *out, int64_t hk, int64_t dk, int64_t hv, int64_t dv, int64_t tiled, int64_t width,
                         float *scratch, int32_t num_threads) {
    const int64_t channels = 2 * hk * dk + hv * dv, qk = 2 * hk * dk, group = hv / hk, row = channels + 2 * hv;
    const float q_scale = 1.0f / sqrtf((float)dk);
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
    {
#pragma omp for collapse(2) schedule(static)
        for (int64_t i = 0; i < sequences; ++i) {
            for (int64_t task = 0; task < 2 * hk + hv; ++task) { /* key head `task` of q, - Hk of k, value - 2 Hk */
                const int64_t c0 = task < 2 * hk ? task * dk : qk + (task - 2 * hk) * dv, n = task < 2 * hk ? dk : dv;
                const int64_t first = starts[i], tokens = starts[i + 1] - first;
                float *y = scratch + first * row;
                float *kept = conv_states + (slots[i] * channels + c0) * (width - 1);
                convolve(x + first * x_row + c0, x_row, kept, conv_weight + c0 * width, y + c0, row, n, tokens, width);
                for (int64_t t = 0; t < tokens; ++t) {
                    float *yt = y + t * row;
                    silu(yt + c0, n);
                    if (task < 2 * hk) {
                        l2norm(yt + c0, n, task < hk ? q_scale : 1.0f);
                    } else { /* value head h's gates */
                        const int64_t h = task - 2 * hk, at = first + t;
                        yt[channels + h] = expf(-expf(a_log[h]) * softplus(a[at * a_row + h] + dt_bias[h]));
                        yt[channels + hv + h] = 1.0f / (1.0f + expf(-b[at * b_row + h]));
                    }
                }
            }
        }
#pragma omp for collapse(2) schedule(static)
        for (int64_t i = 0; i < sequences; ++i) {
            for (int64_t h = 0; h < hv; ++h) {
                float *s = ssm_states + (slots[i] * hv + h) * dk * dv;
                for (int64_t t = starts[i]; t < starts[i + 1]; ++t) {
                    const float *y = scratch + t * row, *q = y + (tiled ? h % hk : h / group) * dk, *k = q + hk * dk;
                    const float g = y[channels + h], beta = y[channels + hv + h];
                    delta_step(s, q, k, y + qk + h * dv, g, beta, dk, dv, out + (t * hv + h) * dv);
                }
            }
        }
    }
}
