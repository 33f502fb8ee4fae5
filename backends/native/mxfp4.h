/* MXFP4's numbers for the kernels that read its interleaved layout (mxfp4xG, block_linear.c's header; block_int8.c's
 * dot products): a block's E8M0 exponent as a float, a 4-bit E2M1 code as ggml's doubled value (kvalues_mxfp4), and
 * the same code as an unsigned byte for the int8 dot products. ggml reads a weight as kvalues_mxfp4[code] times
 * half the exponent's power of two (GGML_E8M0_TO_FP32_HALF), gguf-py the same: every product here is exact in fp32,
 * so the kernels dequantize to its floats bit for bit. */
#ifndef SAGELLM_MXFP4_H
#define SAGELLM_MXFP4_H

#include <stdint.h>

#include "vector_math.h"

/* Added to a code's value for the unsigned operand of vpdpbusd (0..24); a block's dot product then subtracts
 * MXFP4_OFFSET times its inputs' sum. */
enum { MXFP4_OFFSET = 12 };

#define MXFP4_VALUES 0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12
#define MXFP4_BYTES 12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0 /* MXFP4_VALUES + MXFP4_OFFSET */

/* 2^(e - 128) from an exponent e (0..255) per lane, built from its bits as ggml does: 2^-128 and 2^-127 are
 * subnormal (0x00200000 << e), the rest normal ((e - 1) << 23); 255 gives 2^127 as in ggml (the OCP format's NaN
 * is not read as one). */
#define E8M0_HALF(I, V, x)                                                                                             \
    ({                                                                                                                 \
        const I e_ = (x), small_ = e_ < 2;                                                                             \
        const I bits_ = ((((I){} + 0x00200000) << (e_ & 1)) & small_) | ((((e_ - 1) & 255) << 23) & ~small_);        \
        (V) bits_;                                                                                                     \
    })

static inline f32x8 e8m0_half8(const uint8_t *e) { return E8M0_HALF(i32x8, f32x8, widen8(e) & 255); }
static inline f32x16 e8m0_half16(const uint8_t *e) { return E8M0_HALF(i32x16, f32x16, widen16(e) & 255); }

/* Each lane's code (0..15) as its float value: vpermps over the 16-entry table with AVX-512, a two-table shuffle
 * where lanes are 8 wide. */
static inline f32x8 mxfp4_values8(i32x8 code) {
    const f32x8 positive = {0, 1, 2, 3, 4, 6, 8, 12}, negative = {0, -1, -2, -3, -4, -6, -8, -12};
    return __builtin_shuffle(positive, negative, code);
}

static inline f32x16 mxfp4_values16(i32x16 code) {
    const f32x16 values = {MXFP4_VALUES};
    return __builtin_shuffle(values, code);
}

/* Each byte's code (0..15) as MXFP4_BYTES[code]: pshufb within each 16-byte lane (the table in every one). */
typedef uint8_t mxfp4_u8x32 __attribute__((vector_size(32)));

static inline i32x8 mxfp4_bytes8(i32x8 codes) {
#if defined(__AVX2__)
    const __m256i table = _mm256_setr_epi8(MXFP4_BYTES, MXFP4_BYTES);
    return (i32x8)_mm256_shuffle_epi8(table, (__m256i)codes);
#else
    static const uint8_t table[16] = {MXFP4_BYTES};
    const mxfp4_u8x32 in = (mxfp4_u8x32)codes;
    mxfp4_u8x32 out;
    for (int i = 0; i < 32; ++i) out[i] = table[in[i]];
    return (i32x8)out;
#endif
}

static inline i32x16 mxfp4_bytes16(i32x16 codes) {
#if defined(__AVX512BW__)
    const __m512i table = _mm512_broadcast_i32x4(_mm_setr_epi8(MXFP4_BYTES));
    return (i32x16)_mm512_shuffle_epi8(table, (__m512i)codes);
#else
    i32x8 half[2];
    memcpy(half, &codes, sizeof(codes));
    half[0] = mxfp4_bytes8(half[0]);
    half[1] = mxfp4_bytes8(half[1]);
    memcpy(&codes, half, sizeof(codes));
    return codes;
#endif
}

#endif
