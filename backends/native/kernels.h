/* The exported kernels of the native library, declared once: decoder_layers.c calls the others' through these, and
 * build.py's PROTOTYPES gives ctypes the same argument lists. */
#ifndef SAGELLM_KERNELS_H
#define SAGELLM_KERNELS_H

#include <stdint.h>

void rmsnorm_f32(const float *x, int64_t x_row, const float *residual, int64_t residual_row, const float *weight,
                 float *normed, float *summed, int64_t rows, int64_t hidden, float eps, int32_t num_threads);
void head_rmsnorm_f32(const float *x, int64_t x_row, int64_t head_stride, const float *weight, float *out,
                      int64_t tokens, int64_t heads, int64_t d, float eps, int32_t num_threads);
void rope_f32(const float *q, int64_t q_row, const float *k, int64_t k_row, const int64_t *positions,
              const float *cos_sin, float *out, int64_t tokens, int64_t hq, int64_t hk, int64_t d, int64_t rot,
              int32_t num_threads);
void gated_rmsnorm_f32(const float *x, int64_t x_row, const float *z, int64_t z_row, const float *weight, float *out,
                       int64_t tokens, int64_t heads, int64_t d, float eps, int32_t num_threads);
void silu_mul_f32(const float *x, int64_t x_row, float *out, int64_t rows, int64_t inter, int32_t num_threads);
void linear_f32(const float *x, int64_t x_row, const float *w, const float *bias, float *y, int64_t tokens,
                int64_t n, int64_t k);
void sigmoid_f32(const float *x, int64_t x_row, float *out, int64_t rows, int64_t n, int32_t num_threads);
void write_kv_f32(const float *k, int64_t k_row, const float *v, int64_t v_row, const int64_t *slots, float *k_cache,
                  float *v_cache, int64_t tokens, int64_t hk, int64_t d);
void paged_decode_attention_f32(const float *q, int64_t q_row, const float *k_cache, const float *v_cache,
                                const int32_t *block_tables, int64_t max_blocks, const int32_t *context_lens,
                                float *out, int64_t batch, int64_t hq, int64_t hk, int64_t d, int64_t block_size,
                                float scale, int64_t window, float softcap, const float *sinks,
                                int32_t num_threads);
void gated_delta_net_f32(const float *x, int64_t x_row, const float *a, int64_t a_row, const float *b, int64_t b_row,
                         const int64_t *starts, const int64_t *slots, int64_t sequences, float *conv_states,
                         float *ssm_states, const float *conv_weight, const float *a_log, const float *dt_bias,
                         float *out, int64_t hk, int64_t dk, int64_t hv, int64_t dv, int64_t tiled, int64_t width,
                         float *scratch, int32_t num_threads);

/* One weight's LoRA adapters, stacked by slot (lora.c): A [S, R, K] and B^T [S, R, width] (rank padded to R with
 * zeros, scaling folded into B), adding to a linear's output columns begin .. begin + width. */
typedef struct {
    const float *a, *b_t;
    int64_t begin, width;
} lora_part;
void lora_add_f32(const lora_part *parts, int64_t num_parts, const float *x, int64_t x_row, int64_t k, float *y,
                  int64_t y_row, const int64_t *row_slots, int64_t rows, int64_t rank, float *shrunk,
                  int32_t num_threads);

/* y[T, N] = x[T, K] (rows x_row apart) . w^T (+ bias[N]) on interleaved GGUF blocks (block_linear.c). */
typedef void (*block_linear_fn)(const float *x, int64_t x_row, const uint8_t *w, const float *bias, float *y,
                                int64_t tokens, int64_t n, int64_t k, float *scratch, int32_t num_threads);
/* A linear of block_linear_fn's signature, declared: the int16 and panel linears below. */
#define BLOCK_LINEAR_DECLARE(NAME)                                                                                     \
    void NAME(const float *x, int64_t x_row, const uint8_t *w, const float *bias, float *y, int64_t tokens,           \
              int64_t n, int64_t k, float *scratch, int32_t num_threads);
void linear_q4x8_f32(const float *x, int64_t x_row, const uint8_t *w, const float *bias, float *y, int64_t tokens,
                     int64_t n, int64_t k, float *scratch, int32_t num_threads);
void linear_q8x8_f32(const float *x, int64_t x_row, const uint8_t *w, const float *bias, float *y, int64_t tokens,
                     int64_t n, int64_t k, float *scratch, int32_t num_threads);
void linear_q4x16_f32(const float *x, int64_t x_row, const uint8_t *w, const float *bias, float *y, int64_t tokens,
                      int64_t n, int64_t k, float *scratch, int32_t num_threads);
void linear_q8x16_f32(const float *x, int64_t x_row, const uint8_t *w, const float *bias, float *y, int64_t tokens,
                      int64_t n, int64_t k, float *scratch, int32_t num_threads);
void linear_q4kx8_f32(const float *x, int64_t x_row, const uint8_t *w, const float *bias, float *y, int64_t tokens,
                      int64_t n, int64_t k, float *scratch, int32_t num_threads);
void linear_q4kx16_f32(const float *x, int64_t x_row, const uint8_t *w, const float *bias, float *y, int64_t tokens,
                       int64_t n, int64_t k, float *scratch, int32_t num_threads);
void linear_q5kx8_f32(const float *x, int64_t x_row, const uint8_t *w, const float *bias, float *y, int64_t tokens,
                      int64_t n, int64_t k, float *scratch, int32_t num_threads);
void linear_q5kx16_f32(const float *x, int64_t x_row, const uint8_t *w, const float *bias, float *y, int64_t tokens,
                       int64_t n, int64_t k, float *scratch, int32_t num_threads);
void linear_q6kx8_f32(const float *x, int64_t x_row, const uint8_t *w, const float *bias, float *y, int64_t tokens,
                      int64_t n, int64_t k, float *scratch, int32_t num_threads);
void linear_q6kx16_f32(const float *x, int64_t x_row, const uint8_t *w, const float *bias, float *y, int64_t tokens,
                       int64_t n, int64_t k, float *scratch, int32_t num_threads);
void linear_mxfp4x8_f32(const float *x, int64_t x_row, const uint8_t *w, const float *bias, float *y, int64_t tokens,
                       int64_t n, int64_t k, float *scratch, int32_t num_threads);
void linear_mxfp4x16_f32(const float *x, int64_t x_row, const uint8_t *w, const float *bias, float *y,
                         int64_t tokens, int64_t n, int64_t k, float *scratch, int32_t num_threads);

/* The K-quant and MXFP4 linears above on int8 dot products with x split into pieces (block_int8.c): what they run
 * for up to INT8_MAX_ROWS rows (decode), where dequantizing to fp32, not memory, bounds them. Its cost grows by a
 * row's dot products per row while the fp32 kernel's dequantizing is shared by up to 16: the 1B's layer linears on two AVX-512 cores, Q4_K / Q6_K, int8 vs fp32: 1 row 36 vs 76 / 54 vs 67 ms, 4 rows 70 vs 78 /
 * 77 vs 99, 8 rows 112 vs 104 / 117 vs 118. Up to 4 rows the weights are also read once (one tile of rows). */
enum { INT8_MAX_ROWS = 4 };
void linear_q4kx8_i8(const float *x, int64_t x_row, const uint8_t *w, const float *bias, float *y, int64_t tokens,
                     int64_t n, int64_t k, float *scratch, int32_t num_threads);
void linear_q4kx16_i8(const float *x, int64_t x_row, const uint8_t *w, const float *bias, float *y, int64_t tokens,
                      int64_t n, int64_t k, float *scratch, int32_t num_threads);
void linear_q5kx8_i8(const float *x, int64_t x_row, const uint8_t *w, const float *bias, float *y, int64_t tokens,
                     int64_t n, int64_t k, float *scratch, int32_t num_threads);
void linear_q5kx16_i8(const float *x, int64_t x_row, const uint8_t *w, const float *bias, float *y, int64_t tokens,
                      int64_t n, int64_t k, float *scratch, int32_t num_threads);
void linear_q6kx8_i8(const float *x, int64_t x_row, const uint8_t *w, const float *bias, float *y, int64_t tokens,
                     int64_t n, int64_t k, float *scratch, int32_t num_threads);
void linear_q6kx16_i8(const float *x, int64_t x_row, const uint8_t *w, const float *bias, float *y, int64_t tokens,
                      int64_t n, int64_t k, float *scratch, int32_t num_threads);
void linear_mxfp4x8_i8(const float *x, int64_t x_row, const uint8_t *w, const float *bias, float *y, int64_t tokens,
                       int64_t n, int64_t k, float *scratch, int32_t num_threads);
void linear_mxfp4x16_i8(const float *x, int64_t x_row, const uint8_t *w, const float *bias, float *y, int64_t tokens,
                        int64_t n, int64_t k, float *scratch, int32_t num_threads);

/* The 16-wide layouts' linears on int16 dot products (block_int16.c): what those linears run from INT16_MIN_ROWS rows
 * on, where the fp32 kernels' multiply-adds, not memory, bound them. SmolLM2's Q4_1 layer linears x 30, each from
 * memory as in decode, two AVX-512 cores, int16 vs fp32: 8 rows 7.3 vs 6.8 ms, 16: 9.9-11.1 vs 10.3-10.8, 32: 14.4 vs
 * 18.5, 128: 42 vs 73. Built only where the compiler may use AVX-512 VNNI (the variant's flags), NULL elsewhere (and
 * for the 8-wide layouts, which no AVX-512 variant reads). */
enum { INT16_MIN_ROWS = 16 };
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
BLOCK_LINEAR_DECLARE(linear_q4x16_i16)
BLOCK_LINEAR_DECLARE(linear_q8x16_i16)
BLOCK_LINEAR_DECLARE(linear_q4kx16_i16)
BLOCK_LINEAR_DECLARE(linear_q5kx16_i16)
BLOCK_LINEAR_DECLARE(linear_q6kx16_i16)
#define INT16_LINEAR(NAME) NAME
#else
#define INT16_LINEAR(NAME) NULL
#endif

/* The 8-wide layouts' linears from PANEL_MIN_ROWS rows on (block_panel.c): each weight dequantized once into an L1
 * buffer, then multiplied by tiles of 6 rows x 16 outputs, where block_linear.c's register tiles dequantize it once
 * per 8 rows. */
enum { PANEL_MIN_ROWS = 9 };
BLOCK_LINEAR_DECLARE(linear_q4x8_panel)
BLOCK_LINEAR_DECLARE(linear_q8x8_panel)
BLOCK_LINEAR_DECLARE(linear_q4kx8_panel)
BLOCK_LINEAR_DECLARE(linear_q5kx8_panel)
BLOCK_LINEAR_DECLARE(linear_q6kx8_panel)
BLOCK_LINEAR_DECLARE(linear_mxfp4x8_panel)

/* The linears on x rounded per 32 inputs to int8 (block_q8.c), reading Q4_0 / Q4_1 as q4cx, Q4_K as q4kx, Q5_K as
 * q5kx, Q6_K as q6cx: `--int8-activations`' linears at every row count, on vpmaddubsw's int8 dot products, at
 * llama.cpp's rounding of x rather than fp32's exactness. */
BLOCK_LINEAR_DECLARE(linear_q4cx8_q8)
BLOCK_LINEAR_DECLARE(linear_q4cx16_q8)
BLOCK_LINEAR_DECLARE(linear_q4kx8_q8)
BLOCK_LINEAR_DECLARE(linear_q4kx16_q8)
BLOCK_LINEAR_DECLARE(linear_q5kx8_q8)
BLOCK_LINEAR_DECLARE(linear_q5kx16_q8)
BLOCK_LINEAR_DECLARE(linear_q6cx8_q8)
BLOCK_LINEAR_DECLARE(linear_q6cx16_q8)
/* Whether the q8 linears run their rows in 16s on AMX's tiles (a CPU with AMX-INT8 whose kernel grants the tile
 * state); `wanted` 0 or 1 turns that off or back on (-1 leaves it), so both paths can be compared. */
int32_t q8_amx(int32_t wanted);

/* out[k][j] = the weight of output first_group * G + j at input k, for `groups` groups of G outputs: a k-major fp32
 * tile [K, groups * G] of the interleaved blocks, for a GEMM to multiply by (block_linear.c). */
void dequantize_q4x8_f32(const uint8_t *w, int64_t k, int64_t first_group, int64_t groups, float *out,
                         int32_t num_threads);
void dequantize_q8x8_f32(const uint8_t *w, int64_t k, int64_t first_group, int64_t groups, float *out,
                         int32_t num_threads);
void dequantize_q4x16_f32(const uint8_t *w, int64_t k, int64_t first_group, int64_t groups, float *out,
                          int32_t num_threads);
void dequantize_q8x16_f32(const uint8_t *w, int64_t k, int64_t first_group, int64_t groups, float *out,
                          int32_t num_threads);
void dequantize_q4kx8_f32(const uint8_t *w, int64_t k, int64_t first_group, int64_t groups, float *out,
                          int32_t num_threads);
void dequantize_q4kx16_f32(const uint8_t *w, int64_t k, int64_t first_group, int64_t groups, float *out,
                           int32_t num_threads);
void dequantize_q5kx8_f32(const uint8_t *w, int64_t k, int64_t first_group, int64_t groups, float *out,
                          int32_t num_threads);
void dequantize_q5kx16_f32(const uint8_t *w, int64_t k, int64_t first_group, int64_t groups, float *out,
                           int32_t num_threads);
void dequantize_q6kx8_f32(const uint8_t *w, int64_t k, int64_t first_group, int64_t groups, float *out,
                          int32_t num_threads);
void dequantize_q6kx16_f32(const uint8_t *w, int64_t k, int64_t first_group, int64_t groups, float *out,
                           int32_t num_threads);
void dequantize_mxfp4x8_f32(const uint8_t *w, int64_t k, int64_t first_group, int64_t groups, float *out,
                            int32_t num_threads);
void dequantize_mxfp4x16_f32(const uint8_t *w, int64_t k, int64_t first_group, int64_t groups, float *out,
                             int32_t num_threads);

#endif
