/* A linear's weight as the fused kernels (decoder_layers.c, moe.c) hold it: its interleaved GGUF blocks, or the parts
 * of a fused linear whose blocks differ in kind (a Q4_K_M file's q/k Q4_K, v Q6_K), their outputs side by side; the
 * one call that multiplies by it, and the experts' MLP that reads such weights. block_weight.py builds the struct. */
#ifndef SAGELLM_BLOCK_WEIGHT_H
#define SAGELLM_BLOCK_WEIGHT_H

#include <stdint.h>
#include <string.h>

#include "kernels.h"

enum { MAX_PARTS = 3 };
typedef struct {
    const uint8_t *data[MAX_PARTS];
    int64_t linear[MAX_PARTS], outputs[MAX_PARTS]; /* `linear` indexes BLOCK_LINEARS */
    int64_t parts;
} block_weight;

/* In the order of block_weight.py LINEARS. */
static const block_linear_fn BLOCK_LINEARS[] = {
    linear_q4x8_f32,  linear_q8x8_f32,  linear_q4x16_f32,   linear_q8x16_f32,   linear_q5kx8_f32, linear_q5kx16_f32,
    linear_q6kx8_f32, linear_q6kx16_f32, linear_q4kx8_f32, linear_q4kx16_f32, linear_mxfp4x8_f32, linear_mxfp4x16_f32,
    linear_q4cx8_q8,  linear_q4cx16_q8,  linear_q4kx8_q8,  linear_q4kx16_q8,  linear_q5kx8_q8,    linear_q5kx16_q8,
    linear_q6cx8_q8,  linear_q6cx16_q8};

/* y [rows, n] = x . w^T (+ bias): each part into `part_out` [rows, its outputs], then its columns of y; `scratch`
 * holds the block linears' packed input rows (rows * k floats). */
static inline void block_linear(const block_weight *w, const float *x, int64_t x_row, const float *bias, float *y,
                                int64_t rows, int64_t n, int64_t k, float *scratch, float *part_out,
                                int32_t threads) {
    if (w->parts == 1) {
        BLOCK_LINEARS[w->linear[0]](x, x_row, w->data[0], bias, y, rows, n, k, scratch, threads);
        return;
    }
    for (int64_t p = 0, column = 0; p < w->parts; column += w->outputs[p++]) {
        const int64_t width = w->outputs[p];
        BLOCK_LINEARS[w->linear[p]](x, x_row, w->data[p], bias != NULL ? bias + column : NULL, part_out, rows, width,
                                    k, scratch, threads);
        for (int64_t t = 0; t < rows; ++t)
            memcpy(y + t * n + column, part_out + t * width, (size_t)width * sizeof(float));
    }
}

/* A mixture of experts' MLP for few rows over experts held as block weights (moe.c). */
int64_t moe_workspace(int64_t hidden, int64_t inter, int64_t experts, int64_t rows);
void moe_f32(const float *x, int64_t x_row, int64_t rows, const float *router, const float *router_bias,
             int64_t experts, int64_t top_k, int64_t normalize, int64_t first_expert, int64_t held,
             const block_weight *gate_up, const block_weight *down, const float *gate_up_bias, const float *down_bias,
             int64_t hidden, int64_t inter, int64_t activation, float alpha, float limit, float *out,
             float *workspace, int32_t threads);

#endif
