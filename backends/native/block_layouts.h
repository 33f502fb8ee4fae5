/* The interleaved GGUF layouts' sizes, shared by the kernels that read them (block_linear.c draws the layouts,
 * block_layout.py writes them). */
#ifndef SAGELLM_BLOCK_LAYOUTS_H
#define SAGELLM_BLOCK_LAYOUTS_H

enum { QK = 32, QK_K = 256 }; /* inputs per block, per K-quant super-block */
enum { Q4X8_BLOCK = 16 * 4 + QK * 4, Q8X8_BLOCK = 8 * 4 + QK * 8 };      /* bytes per (group, block) */
enum { Q4X16_BLOCK = 32 * 4 + QK * 8, Q8X16_BLOCK = 16 * 4 + QK * 16 }; /* the same for groups of 16 */
enum { Q4CX8_BLOCK = Q4X8_BLOCK, Q4CX16_BLOCK = Q4X16_BLOCK }; /* q4x's scales, its nibbles in chunks of 8 inputs */
/* Bytes per (group, super-block) of the K-quant layouts: per output 8 + 16 + 128 (q4kx), + 32 (q5kx), 4 + 16 + 256
 * (q6kx). */
enum { Q4KX8_BLOCK = 152 * 8, Q4KX16_BLOCK = 152 * 16 };
enum { Q5KX8_BLOCK = 184 * 8, Q5KX16_BLOCK = 184 * 16, Q6KX8_BLOCK = 276 * 8, Q6KX16_BLOCK = 276 * 16 };
/* q6kx's scales, then Q6_K's q + 32 as bytes, 4 inputs a 32-bit lane per output (block_q8.c's operands). */
enum { Q6CX8_BLOCK = Q6KX8_BLOCK, Q6CX16_BLOCK = Q6KX16_BLOCK };
/* MXFP4's layout per (group, block of 32): 16 bytes of 4-bit codes and an exponent byte per output. */
enum { MXFP4X8_BLOCK = 17 * 8, MXFP4X16_BLOCK = 17 * 16 };

#endif
