/* LoRA adapters' updates of a linear's output, each row its own adapter's (vLLM's multi-LoRA, on the CPU):
 *   y[t, begin + n] += sum_r (x[t] . A[s, r]) * B^T[s, r, n]    for each row t with slot s = row_slots[t] >= 0
 * for every part of the linear (a fused q/k/v or gate/up: each weight's adapters, its own columns of y). The base
 * matmul ran once for the whole batch before; rows without an adapter (slot -1) are left as they were.
 *
 * Two passes. The shrink takes each adapted row's R dot products with its own slot's A, for every part, into
 * `shrunk` [rows, parts R]; the expand adds them times its slot's B^T into y, column tile by column tile. Each row
 * reads only its own slot's weights: S adapters in a batch cost what one does, unlike a masked product over every
 * slot. The shrink's dot products and the expand's tiles are shared among `num_threads` OpenMP threads in one
 * parallel region. At decode's rows this is a few percent of the base linear's arithmetic (R is 8-64 against the
 * linear's hundreds or thousands of outputs); its cost was the op calls around it, which the fused decoder layers
 * (decoder_layers.c) do not make. */
#include <stdint.h>
#include <string.h>

#include "kernels.h"

enum { LORA_TILE = 128 }; /* the expand's columns per task: a row's partial sums stay in registers */

static int64_t tiles_of(const lora_part *part) { return (part->width + LORA_TILE - 1) / LORA_TILE; }

void lora_add_f32(const lora_part *parts, int64_t num_parts, const float *x, int64_t x_row, int64_t k, float *y,
                  int64_t y_row, const int64_t *row_slots, int64_t rows, int64_t rank, float *shrunk,
                  int32_t num_threads) {
    const int64_t width = num_parts * rank; /* a row's shrunk values: each part's R */
    int64_t adapted = 0, tiles = 0;
    for (int64_t t = 0; t < rows; ++t) adapted += row_slots[t] >= 0;
    if (adapted == 0) return;
    for (int64_t p = 0; p < num_parts; ++p) tiles += tiles_of(parts + p);
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
    {
        /* The shrink, four of a row's dot products at a time: x read once for four rows of A, four sums apart. */
        const int64_t quads = (width + 3) / 4;
#pragma omp for schedule(static)
        for (int64_t j = 0; j < rows * quads; ++j) {
            const int64_t t = j / quads, s = row_slots[t], first = (j % quads) * 4;
            if (s < 0) continue;
            const float *xt = x + t * x_row;
            const float *a[4];
            const int64_t count = width - first < 4 ? width - first : 4;
            for (int64_t q = 0; q < 4; ++q) { /* a quad may span two parts; past the last value it repeats one */
                const int64_t c = first + (q < count ? q : count - 1);
                a[q] = parts[c / rank].a + (s * rank + c % rank) * k;
            }
            const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3];
            float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
            for (int64_t i = 0; i < k; ++i) {
                const float xi = xt[i];
                s0 += xi * a0[i], s1 += xi * a1[i], s2 += xi * a2[i], s3 += xi * a3[i];
            }
            const float sums[4] = {s0, s1, s2, s3};
            for (int64_t q = 0; q < count; ++q) shrunk[t * width + first + q] = sums[q];
        }
#pragma omp for schedule(static)
        for (int64_t task = 0; task < tiles; ++task) {
            int64_t p = 0, tile = task; /* the part this tile is of, and its tile within it */
            while (tile >= tiles_of(parts + p)) tile -= tiles_of(parts + p), ++p;
            const lora_part *part = parts + p;
            const int64_t first = tile * LORA_TILE;
            const int64_t n = part->width - first < LORA_TILE ? part->width - first : LORA_TILE;
            for (int64_t t = 0; t < rows; ++t) {
                const int64_t s = row_slots[t];
                if (s < 0) continue;
                float sums[LORA_TILE], *yt = y + t * y_row + part->begin + first;
                const float *u = shrunk + t * width + p * rank, *b = part->b_t + s * rank * part->width + first;
                memcpy(sums, yt, (size_t)n * sizeof(float));
                if (n == LORA_TILE) /* a whole tile: its width known, so its sums stay in registers */
                    for (int64_t r = 0; r < rank; ++r) {
                        const float ur = u[r], *br = b + r * part->width;
#pragma omp simd
                        for (int64_t c = 0; c < LORA_TILE; ++c) sums[c] += ur * br[c];
                    }
                else
                    for (int64_t r = 0; r < rank; ++r) {
                        const float ur = u[r], *br = b + r * part->width;
#pragma omp simd
                        for (int64_t c = 0; c < n; ++c) sums[c] += ur * br[c];
                    }
                memcpy(yt, sums, (size_t)n * sizeof(float));
            }
        }
    }
}
