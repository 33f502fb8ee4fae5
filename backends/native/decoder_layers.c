/* A run of whole decoder layers for a decode-only step of a few rows, in one call from Python.
 *
 * At one to a few dozen rows a layer's ten ops take microseconds each in C, while calling each through ctypes and
 * torch (allocating its output, checking its tensors, slicing views) costs a few more: SmolLM2's 30 layers paid
 * about as much in those calls as in its attention. Here the same kernels run in the same order on the same threads
 * as the op-by-op path (backends/cpu.py NativeDispatch), so the results are bit-identical to it; only the calls
 * between them are gone. Intermediates live in one caller-owned workspace (`decoder_layers_workspace` floats).
 *
 * Per layer, with R the residual stream and h the layer's input:
 *   x = rmsnorm(h + R) (R = h + R)   or, in the first layer of a model, x = rmsnorm(h) (R = h)
 *   qkv = x . Wqkv (+ b);  q, k = rope(q, k);  cache[slots] = k, v;  a = attention(q, cache)
 *   o = a . Wo;  x = rmsnorm(o + R) (R = o + R);  g = x . Wgate_up;  h = (silu(gate) * up) . Wdown */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"

/* A linear's weight: its interleaved GGUF blocks (`layout` indexes BLOCK_LINEARS), or the parts of a fused linear
 * whose blocks differ in kind (a Q4_K_M file's q/k Q4_K, v Q6_K), their outputs side by side. */
enum { MAX_PARTS = 3 };
typedef struct {
    const uint8_t *data[MAX_PARTS];
    int64_t layout[MAX_PARTS], outputs[MAX_PARTS];
    int64_t parts;
} block_weight;

/* One layer's weights and its cache. */
typedef struct {
    const float *input_norm, *post_norm;
    block_weight qkv, o_proj, gate_up, down;
    const float *qkv_bias, *o_bias, *gate_up_bias, *down_bias; /* NULL: none */
    float *k_cache, *v_cache;
} decoder_layer;

/* In the order of decoder_layers.py LAYOUTS. */
static const block_linear_fn BLOCK_LINEARS[] = {linear_q4x8_f32,   linear_q8x8_f32,   linear_q4x16_f32,
                                                linear_q8x16_f32,  linear_q5kx8_f32,  linear_q5kx16_f32,
                                                linear_q6kx8_f32,  linear_q6kx16_f32, linear_q4kx8_f32,
                                                linear_q4kx16_f32, linear_mxfp4x8_f32, linear_mxfp4x16_f32};

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* Floats of workspace `decoder_layers_f32` needs for `rows` rows. */
int64_t decoder_layers_workspace(int64_t rows, int64_t hidden, int64_t hq, int64_t hk, int64_t d, int64_t inter) {
    const int64_t widest = max64(max64(hidden, hq * d), inter), nqkv = (hq + 2 * hk) * d;
    const int64_t per_row = hidden /* x */ + nqkv /* qkv */ + (hq + hk) * d /* rotated q, k */ +
                            hq * d /* attention */ + hidden /* o */ + 2 * inter /* gate_up */ + inter /* act */ +
                            widest /* a block linear's packed rows */ +
                            max64(widest, max64(nqkv, 2 * inter)) /* any linear part's out */;
    return rows * per_row;
}

/* y [rows, n] = x . w^T (+ bias): each part into `part_out`, then its columns of y. */
static void block_linear(const block_weight *w, const float *x, int64_t x_row, const float *bias, float *y,
                         int64_t rows, int64_t n, int64_t k, float *scratch, float *part_out, int32_t threads) {
    if (w->parts == 1) {
        BLOCK_LINEARS[w->layout[0]](x, x_row, w->data[0], bias, y, rows, n, k, scratch, threads);
        return;
    }
    for (int64_t p = 0, column = 0; p < w->parts; column += w->outputs[p++]) {
        const int64_t width = w->outputs[p];
        BLOCK_LINEARS[w->layout[p]](x, x_row, w->data[p], bias != NULL ? bias + column : NULL, part_out, rows, width,
                                    k, scratch, threads);
        for (int64_t t = 0; t < rows; ++t)
            memcpy(y + t * n + column, part_out + t * width, (size_t)width * sizeof(float));
    }
}

/* hidden [T, H] (and residual [T, H], or NULL when the first layer is a model's first) through `num_layers` layers
 * into hidden_out and residual_out [T, H]. Row T is sequence T's one new token at `positions[T]`, stored at flat
 * cache slot `slots[T]`, attending over context_lens[T] cached tokens through block_tables [T, max_blocks] (the last
 * `window` of them when window > 0, scores soft-capped when softcap > 0: paged_decode_attention_f32). Linears
 * share their outputs among `linear_threads`, attention its tasks among `attention_threads`; the rest run on the
 * calling thread, as the op-by-op path runs them at these row counts. */
void decoder_layers_f32(const decoder_layer *layers, int64_t num_layers, const float *hidden, const float *residual,
                        float *hidden_out, float *residual_out, const int64_t *positions, const int64_t *slots,
                        const int32_t *block_tables, int64_t max_blocks, const int32_t *context_lens,
                        const float *cos_sin, int64_t rows, int64_t hidden_size, int64_t hq, int64_t hk, int64_t d,
                        int64_t inter, int64_t block_size, float eps, float scale, int64_t window, float softcap,
                        float *workspace, int32_t linear_threads, int32_t attention_threads) {
    const int64_t h = hidden_size, nqkv = (hq + 2 * hk) * d, nrot = (hq + hk) * d;
    float *x = workspace, *qkv = x + rows * h, *rot = qkv + rows * nqkv, *attn = rot + rows * nrot;
    float *o = attn + rows * hq * d, *gate_up = o + rows * h, *act = gate_up + rows * 2 * inter;
    float *scratch = act + rows * inter, *part_out = scratch + rows * max64(max64(h, hq * d), inter);
    for (int64_t i = 0; i < num_layers; ++i) {
        const decoder_layer *l = layers + i;
        const float *layer_in = i == 0 ? hidden : hidden_out;
        if (i == 0 && residual == NULL) { /* a model's first layer: the residual stream starts as its input */
            rmsnorm_f32(hidden, h, NULL, 0, l->input_norm, x, NULL, rows, h, eps, 1);
            residual = hidden;
        } else {
            rmsnorm_f32(layer_in, h, residual, h, l->input_norm, x, residual_out, rows, h, eps, 1);
            residual = residual_out;
        }
        block_linear(&l->qkv, x, h, l->qkv_bias, qkv, rows, nqkv, h, scratch, part_out, linear_threads);
        rope_f32(qkv, nqkv, qkv + hq * d, nqkv, positions, cos_sin, rot, rows, hq, hk, d, d, 1);
        write_kv_f32(rot + hq * d, nrot, qkv + (hq + hk) * d, nqkv, slots, l->k_cache, l->v_cache, rows, hk, d);
        paged_decode_attention_f32(rot, nrot, l->k_cache, l->v_cache, block_tables, max_blocks, context_lens, attn,
                                   rows, hq, hk, d, block_size, scale, window, softcap, NULL, attention_threads);
        block_linear(&l->o_proj, attn, hq * d, l->o_bias, o, rows, h, hq * d, scratch, part_out, linear_threads);
        rmsnorm_f32(o, h, residual, h, l->post_norm, x, residual_out, rows, h, eps, 1);
        residual = residual_out;
        block_linear(&l->gate_up, x, h, l->gate_up_bias, gate_up, rows, 2 * inter, h, scratch, part_out,
                     linear_threads);
        silu_mul_f32(gate_up, 2 * inter, act, rows, inter, 1);
        block_linear(&l->down, act, inter, l->down_bias, hidden_out, rows, h, inter, scratch, part_out,
                     linear_threads);
    }
}
