/* Vectors and math shared by the native kernels' C files: included, so each inlines them. */
#ifndef SAGELLM_VECTOR_MATH_H
#define SAGELLM_VECTOR_MATH_H

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

/* Eight and sixteen floats (GCC/Clang vector extension: one AVX2 or AVX-512 register, split into narrower ones by
 * the compiler where the instruction set has none so wide). The kernels work on them explicitly because the
 * compiler's own `omp simd` reductions spill the lanes and add them one by one, and it will not keep an accumulator
 * in registers across a loop over keys (both measured 4-5x slower for attention). */
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

/* A vector of type V from unaligned memory (a statement expression: one definition for every width). */
#define LOAD(V, p)                                                                                                     \
    ({                                                                                                                 \
        V v_;                                                                                                          \
        memcpy(&v_, (p), sizeof(v_));                                                                                  \
        v_;                                                                                                            \
    })

/* The scale that rounds a block of n inputs to int8 (|q| <= 127): its largest |x| / 127, NaN where one is NaN or
 * infinite (so its row's outputs turn NaN, as fp32's would); 0 for zeros or values whose largest / 127 underflows.
 * block_int8.c's pieces and block_q8.c's one int8 both start from it. */
static inline float int8_scale(const float *v, int n) {
    /* Eight lanes at a time, no branch on the data (a mispredicted one a value was two thirds of a q8 linear's time
     * rounding its rows): the largest |x| of each lane, and whether one was NaN or infinite (not <= FLT_MAX). */
    f32x8 amax = {};
    i32x8 non_finite = {};
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const f32x8 a = (f32x8)(LOAD(i32x8, v + i) & 0x7FFFFFFF);
        const i32x8 larger = a > amax;
        amax = (f32x8)((larger & (i32x8)a) | (~larger & (i32x8)amax));
        non_finite |= ~(a <= FLT_MAX);
    }
    float largest = 0.0f;
    int finite = 1;
    for (int lane = 0; lane < 8; ++lane) {
        largest = amax[lane] > largest ? amax[lane] : largest;
        finite &= non_finite[lane] == 0;
    }
    for (; i < n; ++i) {
        largest = fabsf(v[i]) > largest ? fabsf(v[i]) : largest;
        finite &= isfinite(v[i]) != 0;
    }
    return finite ? largest / 127.0f : NAN;
}

static inline f32x8 load8(const float *p) { return LOAD(f32x8, p); }
static inline f32x16 load16(const float *p) { return LOAD(f32x16, p); }
static inline void store8(float *p, f32x8 v) { memcpy(p, &v, sizeof(v)); }
static inline void store16(float *p, f32x16 v) { memcpy(p, &v, sizeof(v)); }

/* Eight sign-extended int8s; the vector extension's own conversion is scalarized by GCC, one byte at a time. */
static inline i32x8 widen8(const uint8_t *p) {
#if defined(__AVX2__)
    return (i32x8)_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p));
#else
    int8_t q[8];
    memcpy(q, p, sizeof(q));
    return (i32x8){q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7]};
#endif
}

/* Sixteen sign-extended int8s (see widen8). */
static inline i32x16 widen16(const uint8_t *p) {
#if defined(__AVX512F__)
    return (i32x16)_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p));
#else
    const i32x8 low = widen8(p), high = widen8(p + 8);
    return (i32x16){low[0],  low[1],  low[2],  low[3],  low[4],  low[5],  low[6],  low[7],
                    high[0], high[1], high[2], high[3], high[4], high[5], high[6], high[7]};
#endif
}

/* exp(x) for the softmax and SiLU loops. glibc's vector expf is only declared under -ffast-math, which would also
 * let the compiler reorder every other float expression here; this branch-free version vectorizes inside
 * `omp simd` loops instead. exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln(2) / 2; exp(r) is Cephes' degree-6
 * polynomial (about 1 ulp). x is clamped to [-87, 88], where 2^n stays a normal float; below that the true result
 * is < 2e-38, negligible next to the 1-sized terms it is summed with. */
/* exp(r) of r = x - n ln 2 (ln 2 in two parts), n = round(x / ln 2): Cephes' degree-6 polynomial, for a float or a
 * vector of them (type T): exp_f32's, and the kernels' vector exps', which clamp, round and scale by 2^n their own
 * ways. */
#define EXP_OF_REDUCED(T, x, n)                                                                                        \
    ({                                                                                                                 \
        const T r_ = (x) - (n) * 0.693359375f + (n) * 2.12194440e-4f;                                                  \
        T p_ = r_ * 1.9875691500e-4f + 1.3981999507e-3f;                                                               \
        p_ = p_ * r_ + 8.3334519073e-3f;                                                                               \
        p_ = p_ * r_ + 4.1665795894e-2f;                                                                               \
        p_ = p_ * r_ + 1.6666665459e-1f;                                                                               \
        p_ = p_ * r_ + 5.0000001201e-1f;                                                                               \
        p_ * r_ * r_ + r_ + 1.0f;                                                                                      \
    })

/* exp_f32 on every lane of x, a vector of type V whose int32 lanes are IV: the clamp as selects of lanes, not a branch
 * (GCC 12 keeps a loop calling exp_f32 scalar under its default -ftrapping-math, "control flow in loop"), the same
 * rounding and polynomial, 2^n built from the exponent bits. */
#define EXP_LANES(V, IV, x)                                                                                            \
    ({                                                                                                                 \
        V x_ = (x);                                                                                                    \
        const IV low_ = x_ < -87.0f, high_ = x_ > 88.0f;                                                               \
        x_ = (V)(((IV)x_ & ~low_) | ((IV)((V){0} - 87.0f) & low_));                                                    \
        x_ = (V)(((IV)x_ & ~high_) | ((IV)((V){0} + 88.0f) & high_));                                                  \
        const V n_ = (x_ * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest: 1.5 * 2^23 */       \
        EXP_OF_REDUCED(V, x_, n_) * (V)((__builtin_convertvector(n_, IV) + 127) << 23);                               \
    })

static inline float exp_f32(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x); /* not fminf/fmaxf: their NaN rules stop vectorizing */
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest: 1.5 * 2^23 */
    const float p = EXP_OF_REDUCED(float, x, n);
    const int32_t bits = ((int32_t)n + 127) << 23; /* the float 2^n */
    float scale;
    memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}

/* One register of floats, the widest the instruction set has (f32x16 with AVX-512, f32x8 otherwise), for the loops
 * over a row's channels. Not f32x16 everywhere: GCC splits a vector wider than the instruction set's through the
 * stack, which made the delta-rule kernel 2.5x slower on AVX2. */
#if defined(__AVX512F__)
typedef f32x16 vec;
typedef i32x16 ivec;
#define load_vec load16
#define store_vec store16
#else
typedef f32x8 vec;
typedef i32x8 ivec;
#define load_vec load8
#define store_vec store8
#endif
enum { LANES = sizeof(vec) / sizeof(float) };

/* exp_f32 on a register's lanes: a loop of exp_f32 calls stays scalar (GCC 12, EXP_LANES), which made SiLU over a
 * prefill's 256 x 1536 activations 4x slower than torch's. */
static inline vec exp_lanes(vec x) { return EXP_LANES(vec, ivec, x); }

/* SiLU, x sigmoid(x), on one float and on a register: the MLPs' activation (the same floats either way). */
static inline float silu_scalar(float x) { return x / (1.0f + exp_f32(-x)); }
static inline vec silu_lanes(vec x) { return x / (1.0f + exp_lanes(-x)); }

/* The lanes of a where mask is set, else b's (C's vector extension has no vector ?:). */
static inline vec select_lanes(ivec mask, vec a, vec b) { return (vec)(((ivec)a & mask) | ((ivec)b & ~mask)); }

/* sigmoid(x) on one float and on a register. */
static inline float sigmoid_scalar(float x) { return 1.0f / (1.0f + exp_f32(-x)); }
static inline vec sigmoid_lanes(vec x) { return 1.0f / (1.0f + exp_lanes(-x)); }

/* tanh(x) for the attention logits' soft cap (Gemma 2), branch-free like exp_f32 so `omp simd` loops vectorize it:
 * Cephes' tanhf. From |x| = 0.625 up, 1 - 2 / (exp(2|x|) + 1), signed back: exp_f32's clamp keeps it finite, so a
 * huge |x| gives exactly +-1 (no inf / inf). Below, its odd polynomial, where that form loses the small result's
 * digits to cancellation (an absolute error of ~1e-7, 5e-6 on a score once multiplied by a cap of 50). */
static inline float tanh_f32(float x) {
    const float a = x < 0.0f ? -x : x, z = x * x;
    float p = -5.70498872745e-3f;
    p = p * z + 2.06390887954e-2f;
    p = p * z - 5.37397155531e-2f;
    p = p * z + 1.33314422036e-1f;
    p = p * z - 3.33332819422e-1f;
    const float small = p * z * x + x;
    const float large = 1.0f - 2.0f / (exp_f32(a + a) + 1.0f);
    return a < 0.625f ? small : (x < 0.0f ? -large : large);
}

/* What query head h's attention sink adds to its softmax's denominator, in the units of a running sum whose max is
 * `best` (exp(sink - best)); 0 without sinks. gpt-oss's sinks are logits that take no value: a head may attend to
 * nothing. The exponent is capped (a sink 80 above every score already leaves the output ~0). */
static inline float sink_weight(const float *sinks, int64_t h, float best) {
    if (sinks == NULL) return 0.0f;
    const float x = sinks[h] - best;
    return exp_f32(x < 80.0f ? x : 80.0f);
}

/* Lane sums and halves of the 8- and 16-float vectors, for the kernels' horizontal reductions. */
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

#endif
