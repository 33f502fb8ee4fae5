/* A mixture of experts' MLP for a step of a few rows (decode), in one call from Python.
 *
 * At one row gpt-oss-20b's layer runs 4 of its 32 experts: eight block linears of ~0.3-0.6 ms each, and around them
 * the routing and each expert's gather, activation, weighting and scatter, ~40 torch ops that cost ~1.2 ms a layer
 * (~28 ms of a ~200 ms token on two AVX2 cores), more than their work. Here the router (softmax over all experts, the
 * top k renormalized unless not `normalize`, as transformers does in fp32), then each held expert over the rows that
 * chose it, run in C with the block linears' own kernels on the caller's threads.
 *
 * Experts first_expert .. first_expert + held - 1 of the E the router scores are held here (an expert parallel rank's
 * share; all of them otherwise): rows routed to others add nothing, so the ranks' outputs sum to the layer's. Each
 * row's chosen experts add their weighted outputs in the order of the experts' numbers, as the torch op does. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "block_weight.h"
#include "kernels.h"
#include "vector_math.h"

enum { SILU = 0, SWIGLU_OAI = 1 }; /* experts.py ACTIVATIONS, in its order */

/* gpt-oss's clamped SwiGLU of [rows, 2I] (gate first): (up + 1) * g * sigmoid(alpha * g), g = min(gate, limit), up
 * clamped to [-limit, limit]; NaN stays NaN, as torch's clamp keeps it. */
static void swiglu_oai_f32(const float *x, float *out, int64_t rows, int64_t inter, float alpha, float limit) {
    for (int64_t t = 0; t < rows; ++t) {
        const float *gate = x + t * 2 * inter, *up = gate + inter;
        float *ot = out + t * inter;
        const vec top = (vec){0} + limit, bottom = (vec){0} - limit;
        int64_t i = 0;
        for (; i + LANES <= inter; i += LANES) { /* a NaN compares false: kept, as below */
            vec g = load_vec(gate + i), u = load_vec(up + i);
            g = select_lanes(g > top, top, g);
            u = select_lanes(u > top, top, select_lanes(u < bottom, bottom, u));
            store_vec(ot + i, (u + 1.0f) * (g / (1.0f + exp_lanes(-alpha * g))));
        }
        for (; i < inter; ++i) {
            const float g = gate[i] > limit ? limit : gate[i];
            const float u = up[i] > limit ? limit : up[i] < -limit ? -limit : up[i];
            ot[i] = (u + 1.0f) * (g / (1.0f + exp_f32(-alpha * g)));
        }
    }
}

/* Each row's top_k experts and their weights from the router's logits [rows, E]: softmax, the k largest (the lower
 * number first among equals), renormalized to sum to 1 when `normalize`. */
static void route(float *logits, int64_t rows, int64_t experts, int64_t top_k, int64_t normalize, int64_t *chosen,
                  float *weights) {
    for (int64_t t = 0; t < rows; ++t) {
        float *p = logits + t * experts;
        float best = p[0], sum = 0.0f;
        for (int64_t e = 1; e < experts; ++e) best = p[e] > best ? p[e] : best;
        for (int64_t e = 0; e < experts; ++e) sum += p[e] = expf(p[e] - best);
        for (int64_t e = 0; e < experts; ++e) p[e] /= sum;
        float kept = 0.0f;
        for (int64_t j = 0; j < top_k; ++j) {
            int64_t top = -1;
            for (int64_t e = 0; e < experts; ++e)
                if (p[e] >= 0.0f && (top < 0 || p[e] > p[top])) top = e;
            if (top < 0) { /* NaN logits: a NaN weight, so the row's output is NaN as torch's would be */
                chosen[t * top_k + j] = j, weights[t * top_k + j] = NAN;
                continue;
            }
            chosen[t * top_k + j] = top;
            weights[t * top_k + j] = p[top];
            kept += p[top];
            p[top] = -1.0f; /* taken */
        }
        if (normalize)
            for (int64_t j = 0; j < top_k; ++j) weights[t * top_k + j] /= kept;
    }
}

/* Floats of workspace `moe_f32` needs for `rows` rows. */
int64_t moe_workspace(int64_t hidden, int64_t inter, int64_t experts, int64_t rows) {
    const int64_t widest = hidden > inter ? hidden : inter;
    /* logits, a chosen expert's rows, its gate_up, activation and output, the packed input, a part's output */
    return rows * (experts + hidden + 2 * inter + inter + hidden + widest + 2 * inter);
}

/* out [rows, H] = the MLP of x [rows, H] (rows x_row apart): router [E, H] (+ router_bias [E]) dense fp32, the held
 * experts' gate_up [held] (each [2I, H], gate first) and down [held] ([H, I]) GGUF blocks, their biases gate_up_bias
 * [held, 2I] and down_bias [held, H] (NULL: none). `activation` SILU or SWIGLU_OAI (alpha, limit). The linears
 * share their outputs among `threads`; the rest runs on the calling thread. */
void moe_f32(const float *x, int64_t x_row, int64_t rows, const float *router, const float *router_bias,
             int64_t experts, int64_t top_k, int64_t normalize, int64_t first_expert, int64_t held,
             const block_weight *gate_up, const block_weight *down, const float *gate_up_bias, const float *down_bias,
             int64_t hidden, int64_t inter, int64_t activation, float alpha, float limit, float *out,
             float *workspace, int32_t threads) {
    const int64_t widest = hidden > inter ? hidden : inter;
    float *logits = workspace, *gathered = logits + rows * experts, *projected = gathered + rows * hidden;
    float *act = projected + rows * 2 * inter, *y = act + rows * inter, *packed = y + rows * hidden;
    float *part_out = packed + rows * widest;
    int64_t chosen[rows * top_k], tokens[rows];
    float weights[rows * top_k], token_weights[rows];
    linear_f32(x, x_row, router, router_bias, logits, rows, experts, hidden);
    route(logits, rows, experts, top_k, normalize, chosen, weights);
    memset(out, 0, (size_t)(rows * hidden) * sizeof(float));
    for (int64_t e = 0; e < held; ++e) {
        int64_t n = 0;
        for (int64_t t = 0; t < rows; ++t)
            for (int64_t j = 0; j < top_k; ++j)
                if (chosen[t * top_k + j] == first_expert + e) {
                    tokens[n] = t, token_weights[n] = weights[t * top_k + j];
                    memcpy(gathered + n++ * hidden, x + t * x_row, (size_t)hidden * sizeof(float));
                }
        if (n == 0) continue;
        block_linear(gate_up + e, gathered, hidden, gate_up_bias != NULL ? gate_up_bias + e * 2 * inter : NULL,
                     projected, n, 2 * inter, hidden, packed, part_out, threads);
        if (activation == SWIGLU_OAI)
            swiglu_oai_f32(projected, act, n, inter, alpha, limit);
        else
            silu_mul_f32(projected, 2 * inter, act, n, inter, 1);
        block_linear(down + e, act, inter, down_bias != NULL ? down_bias + e * hidden : NULL, y, n, hidden, inter,
                     packed, part_out, threads);
        for (int64_t i = 0; i < n; ++i) {
            float *row = out + tokens[i] * hidden;
            const float *contribution = y + i * hidden;
            const float w = token_weights[i];
            for (int64_t c = 0; c < hidden; ++c) row[c] += contribution[c] * w;
        }
    }
}
