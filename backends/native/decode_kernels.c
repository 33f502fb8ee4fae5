/* Native fp32 CPU kernels for small-batch decode, called through ctypes by sagellm.backends.native.
 *
 * At a few tokens per step the arithmetic of a layer's norms, rotary embedding and SiLU is microseconds,
 * while torch pays an op dispatch per step of it and wakes its OpenMP worker for the larger ones (~50 us each once
 * the worker has gone to sleep); its linears read blocked weight layouts no faster than one core streams a
 * plain one. Each function here does one op in one call on the calling thread. They take raw pointers and element
 * strides, allocate nothing on the heap and cannot fail: the Python wrappers check dtypes, shapes and layouts
 * first. Built per instruction set (isa.py), so the `omp simd` loops use that set's widest vectors. Kernels
 * taking `num_threads` share their rows among that many OpenMP threads, for the hundreds of rows of a prefill; with
 * 1 no parallel region is entered, so no sleeping worker is woken at decode. Decode's attention: decode_attention.c. */
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
            int64_t i = 0;
            for (; i + LANES <= d; i += LANES)
                store_vec(oh + i, load_vec(xh + i) * inv * load_vec(weight + i) * silu_lanes(load_vec(zh + i)));
            for (; i < d; ++i) oh[i] = xh[i] * inv * weight[i] * silu_scalar(zh[i]);
        }
    }
}

/* out[T, I] = silu(x[:, :I]) * x[:, I:], the MLP activation on the fused gate_up output (rows `x_row` apart). */
void silu_mul_f32(const float *x, int64_t x_row, float *out, int64_t rows, int64_t inter, int32_t num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1)
    for (int64_t t = 0; t < rows; ++t) {
        const float *gate = x + t * x_row, *up = gate + inter;
        float *ot = out + t * inter;
        int64_t i = 0;
        for (; i + LANES <= inter; i += LANES) store_vec(ot + i, silu_lanes(load_vec(gate + i)) * load_vec(up + i));
        for (; i < inter; ++i) ot[i] = silu_scalar(gate[i]) * up[i];
    }
}

/* out[T, N] = sigmoid(x) (rows `x_row` apart): Qwen3.5's attention output gate, a head's gate beside its query. */
void sigmoid_f32(const float *x, int64_t x_row, float *out, int64_t rows, int64_t n, int32_t num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1)
    for (int64_t t = 0; t < rows; ++t) {
        const float *xt = x + t * x_row;
        float *ot = out + t * n;
        int64_t i = 0;
        for (; i + LANES <= n; i += LANES) store_vec(ot + i, sigmoid_lanes(load_vec(xt + i)));
        for (; i < n; ++i) ot[i] = sigmoid_scalar(xt[i]);
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
