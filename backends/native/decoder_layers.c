/* A run of whole decoder layers for a decode-only step of a few rows, in one call from Python.
 *
 * At one to a few dozen rows a layer's ten to fifteen ops take microseconds each in C, while calling each through
 * ctypes and torch (allocating its output, checking its tensors, slicing views) costs a few more: SmolLM2's 30
 * layers paid about as much in those calls as in its attention, Qwen3.5-0.8B ~6 ms of a ~45 ms token. Here the same
 * kernels run in the same order on the same threads as the op-by-op path (backends/cpu.py NativeDispatch), so the
 * results are bit-identical to it; only the calls between them are gone. Intermediates live in one caller-owned
 * workspace (`decoder_layers_workspace` floats).
 *
 * Per layer, with R the residual stream and h the layer's input:
 *   x = rmsnorm(h + R) (R = h + R)   or, in the first layer of a model, x = rmsnorm(h) (R = h)
 *   m = mixer(x)
 *   x = rmsnorm(m + R) (R = m + R);  g = x . Wgate_up;  h = (silu(gate) * up) . Wdown, or h = moe(x) (moe.c)
 * where the mixer is one of
 *   attention:        qkv = x . Wqkv (+ b);  q, k = rope(q, k);  cache[slots] = k, v;  m = attention(q, cache) . Wo
 *                     (the layer's sliding window and sinks, gpt-oss's; q and k normed per head first when the
 *                     layer has q_norm and k_norm, Qwen3's)
 *   gated attention:  (q gate) k v = x . Wqkv, each head's query beside its gate (Qwen3.5); q, k = rope(rmsnorm(q),
 *                     rmsnorm(k)) per head;  cache[slots] = k, v;  m = (attention(q, cache) * sigmoid(gate)) . Wo
 *   gated delta net:  qkv z b a = x . Win;  c = gated_delta_net(qkv, b, a; the row's state slot);
 *                     m = gated_rmsnorm(c, z) . Wout */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "block_weight.h"
#include "kernels.h"

enum { ATTENTION = 0, GATED_ATTENTION = 1, GATED_DELTA_NET = 2 }; /* decoder_layers.py KINDS */

/* One layer's weights and its cache or states. A gated delta net layer's `qkv` is its input projection, `o_proj`
 * its output projection. A mixture of experts' layer (`router` set) holds its experts' projections in
 * `experts_gate_up` and `experts_down` ([held] each) and their biases in gate_up_bias [held, 2I] and down_bias
 * [held, H]; a dense one its own in gate_up and down. */
typedef struct {
    int64_t kind;
    const float *input_norm, *post_norm;
    block_weight qkv, o_proj, gate_up, down;
    const float *qkv_bias, *o_bias, *gate_up_bias, *down_bias; /* NULL: none */
    float *k_cache, *v_cache;                                  /* attention */
    const float *q_norm, *k_norm;                              /* attention's per-head norms [D], or NULL */
    float *conv_states, *ssm_states;                           /* gated delta net: [S, C, K-1], [S, Hv, Dk, Dv] */
    const float *conv_weight, *a_log, *dt_bias, *out_norm;     /* [C, K], [Hv], [Hv], [Dv] */
    const float *sinks;                                        /* attention's per-head sink logits [Hq], or NULL */
    int64_t window;                                            /* attention's sliding window (0: none) */
    const float *router, *router_bias;                         /* a mixture of experts: [E, H], [E] or NULL */
    const block_weight *experts_gate_up, *experts_down;
} decoder_layer;

/* What every layer of a run shares: its sizes, the attention layers' and the delta net layers' own, and its
 * mixtures of experts' (experts: E, 0 for dense MLPs; moe.c's routing and activation). */
typedef struct {
    int64_t hidden, inter;
    int64_t hq, hk, d, rot, block_size; /* attention; rot: the rotated dims of a head */
    float eps, scale, softcap;
    const float *cos_sin; /* [max_pos, rot] */
    int64_t lhk, ldk, lhv, ldv, conv_width; /* gated delta net: key heads and size, value heads and size */
    int64_t tiled;                          /* its value heads tiled by key head (gated_delta_net_f32's) */
    int64_t experts, top_k, normalize, first_expert, held, activation;
    float alpha, limit;
} decoder_dims;

/* One layer's LoRA adapters (lora.c): for each of its linears, the parts adapters change (none: count 0). */
typedef struct {
    lora_part parts[MAX_PARTS];
    int64_t count;
} lora_linear;
typedef struct {
    lora_linear qkv, o_proj, gate_up, down;
} layer_lora;

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* Per row: each intermediate's width. */
typedef struct {
    int64_t x, proj, heads, attn, gated, o, gate_up, act, delta, packed, part, moe;
} row_widths;

static row_widths widths(const decoder_dims *s) {
    const int64_t h = s->hidden, qd = s->hq * s->d, kvd = s->hk * s->d, vd = s->lhv * s->ldv;
    const int64_t channels = 2 * s->lhk * s->ldk + vd;
    row_widths w;
    w.x = h;
    w.proj = max64(2 * qd + 2 * kvd /* gated attention's q gate k v */, channels + vd + 2 * s->lhv /* qkv z b a */);
    w.heads = 2 * (qd + kvd); /* normed q and k, then turned */
    w.attn = max64(qd, vd);   /* the attention's or the delta rule's output */
    w.gated = max64(qd, vd);  /* sigmoid(gate), or the gated norm's output */
    w.o = h;
    w.gate_up = 2 * s->inter;
    w.act = s->inter;
    w.delta = channels + 2 * s->lhv; /* gated_delta_net_f32's scratch */
    w.packed = max64(max64(h, qd), max64(s->inter, vd)); /* a block linear's packed input rows */
    w.part = max64(max64(h, w.proj), 2 * s->inter);      /* any linear part's out */
    w.moe = s->experts ? moe_workspace(h, s->inter, s->experts, 1) : 0;
    return w;
}

/* Floats of workspace `decoder_layers_f32` needs for `rows` rows. */
int64_t decoder_layers_workspace(const decoder_dims *dims, int64_t rows) {
    const row_widths w = widths(dims);
    return rows *
           (w.x + w.proj + w.heads + w.attn + w.gated + w.o + w.gate_up + w.act + w.delta + w.packed + w.part + w.moe);
}

/* The step's own inputs, and where its intermediates go. */
typedef struct {
    const int64_t *positions, *slots;
    const int32_t *block_tables, *context_lens;
    int64_t max_blocks;
    const int64_t *state_starts, *state_slots; /* 0 .. rows, and each row's state slot */
    int64_t rows;
    const int64_t *window_slots; /* the sliding-window layers' own blocks' (NULL: they share the others') */
    const int32_t *window_tables;
    int64_t window_max_blocks;
    float *x, *proj, *heads, *attn, *gated, *o, *gate_up, *act, *delta, *packed, *part, *moe;
    int32_t linear_threads, attention_threads, delta_threads;
    const layer_lora *lora; /* this layer's adapters, NULL when no row of the step has one */
    const int64_t *row_slots; /* each row's adapter slot (-1: none) */
    int64_t rank;
    float *shrunk; /* lora_add_f32's [rows, MAX_PARTS rank] */
} step;

/* The step's rows' adapter updates of one linear's output y [rows, n] from its input x. */
static void add_lora(const lora_linear *l, const float *x, int64_t k, float *y, int64_t n, const step *st) {
    if (l->count > 0)
        lora_add_f32(l->parts, l->count, x, k, k, y, n, st->row_slots, st->rows, st->rank, st->shrunk,
                     st->linear_threads);
}

/* Attention, gated or not: x -> s->o. */
static void attention(const decoder_layer *l, const decoder_dims *s, const step *st) {
    const int64_t rows = st->rows, h = s->hidden, d = s->d, qd = s->hq * d, kvd = s->hk * d;
    const int gated = l->kind == GATED_ATTENTION;
    const int64_t nq = gated ? 2 * qd : qd, nqkv = nq + 2 * kvd, nrot = qd + kvd;
    float *qkv = st->proj, *turned = st->heads + rows * nrot;
    block_linear(&l->qkv, st->x, h, l->qkv_bias, qkv, rows, nqkv, h, st->packed, st->part, st->linear_threads);
    if (st->lora != NULL) add_lora(&st->lora->qkv, st->x, h, qkv, nqkv, st);
    const float *q = qkv, *k = qkv + nq, *v = k + kvd;
    int64_t q_row = nqkv, k_row = nqkv;
    if (l->q_norm != NULL) { /* each head's query and key normed into `heads`: [rows, Hq D], then [rows, Hk D] */
        float *qn = st->heads, *kn = qn + rows * qd;
        head_rmsnorm_f32(qkv, nqkv, gated ? 2 * d : d, l->q_norm, qn, rows, s->hq, d, s->eps, 1);
        head_rmsnorm_f32(qkv + nq, nqkv, d, l->k_norm, kn, rows, s->hk, d, s->eps, 1);
        q = qn, k = kn, q_row = qd, k_row = kvd;
    }
    rope_f32(q, q_row, k, k_row, st->positions, s->cos_sin, turned, rows, s->hq, s->hk, d, s->rot, 1);
    const int own_blocks = l->window > 0 && st->window_tables != NULL;
    const int64_t *slots = own_blocks ? st->window_slots : st->slots;
    write_kv_f32(turned + qd, nrot, v, nqkv, slots, l->k_cache, l->v_cache, rows, s->hk, d);
    paged_decode_attention_f32(turned, nrot, l->k_cache, l->v_cache, own_blocks ? st->window_tables : st->block_tables,
                               own_blocks ? st->window_max_blocks : st->max_blocks, st->context_lens, st->attn, rows, s->hq, s->hk, d, s->block_size, s->scale, l->window,
                               s->softcap, l->sinks, st->attention_threads);
    if (gated) { /* the output times the sigmoid of each head's gate */
        for (int64_t t = 0; t < rows; ++t) sigmoid_f32(qkv + t * nqkv + d, 2 * d, st->gated + t * qd, s->hq, d, 1);
        for (int64_t i = 0; i < rows * qd; ++i) st->attn[i] *= st->gated[i];
    }
    block_linear(&l->o_proj, st->attn, qd, l->o_bias, st->o, rows, h, qd, st->packed, st->part, st->linear_threads);
    if (st->lora != NULL) add_lora(&st->lora->o_proj, st->attn, qd, st->o, h, st);
}

/* A Gated DeltaNet: x -> s->o, each row's states advanced in its slot. */
static void gated_delta_net(const decoder_layer *l, const decoder_dims *s, const step *st) {
    const int64_t rows = st->rows, h = s->hidden, vd = s->lhv * s->ldv, channels = 2 * s->lhk * s->ldk + vd;
    const int64_t n = channels + vd + 2 * s->lhv;
    float *in = st->proj; /* [rows, qkv | z | b | a] */
    block_linear(&l->qkv, st->x, h, NULL, in, rows, n, h, st->packed, st->part, st->linear_threads);
    if (st->lora != NULL) add_lora(&st->lora->qkv, st->x, h, in, n, st);
    const float *z = in + channels, *b = z + vd, *a = b + s->lhv;
    gated_delta_net_f32(in, n, a, n, b, n, st->state_starts, st->state_slots, rows, l->conv_states, l->ssm_states,
                        l->conv_weight, l->a_log, l->dt_bias, st->attn, s->lhk, s->ldk, s->lhv, s->ldv, s->tiled,
                        s->conv_width, st->delta, st->delta_threads);
    gated_rmsnorm_f32(st->attn, vd, z, n, l->out_norm, st->gated, rows, s->lhv, s->ldv, s->eps, 1);
    block_linear(&l->o_proj, st->gated, vd, NULL, st->o, rows, h, vd, st->packed, st->part, st->linear_threads);
    if (st->lora != NULL) add_lora(&st->lora->o_proj, st->gated, vd, st->o, h, st);
}

/* hidden [T, H] (and residual [T, H], or NULL when the first layer is a model's first) through `num_layers` layers
 * into hidden_out and residual_out [T, H]. Row T is sequence T's one new token at `positions[T]`: an attention
 * layer stores it at flat cache slot `slots[T]` and attends over context_lens[T] cached tokens through
 * block_tables [T, max_blocks] (the last `window` of them when window > 0, scores soft-capped when softcap > 0:
 * paged_decode_attention_f32); a sliding-window layer whose cache has blocks of its own (window_tables not NULL)
 * uses window_slots and window_tables [T, window_max_blocks] instead; a delta net layer advances the states of slot state_slots[T] (state_starts: 0 .. T).
 * With `lora` ([num_layers], or NULL), each linear's output then gets the LoRA updates of the rows whose
 * row_slots[T] >= 0 (lora.c; adapters of rank `rank`, `shrunk` [T, MAX_PARTS rank] floats of scratch).
 * Linears share their outputs among `linear_threads`, attention its tasks among `attention_threads`, the delta rule
 * its heads among `delta_threads`; the rest run on the calling thread, as the op-by-op path runs them at these row
 * counts. */
void decoder_layers_f32(const decoder_layer *layers, int64_t num_layers, const decoder_dims *dims, const float *hidden,
                        const float *residual, float *hidden_out, float *residual_out, const int64_t *positions,
                        const int64_t *slots, const int32_t *block_tables, int64_t max_blocks,
                        const int32_t *context_lens, const int64_t *state_starts, const int64_t *state_slots,
                        int64_t rows, const int64_t *window_slots, const int32_t *window_tables,
                        int64_t window_max_blocks, float *workspace, int32_t linear_threads,
                        int32_t attention_threads, int32_t delta_threads, const layer_lora *lora,
                        const int64_t *row_slots, int64_t rank, float *shrunk) {
    const decoder_dims *s = dims;
    const int64_t h = s->hidden, inter = s->inter;
    const row_widths w = widths(s);
    step st = {positions,    slots, block_tables,  context_lens,  max_blocks,       state_starts,
               state_slots,  rows,  window_slots,  window_tables, window_max_blocks};
    float *next = workspace;
    float **regions[] = {&st.x,      &st.proj, &st.heads, &st.attn,  &st.gated, &st.o,
                         &st.gate_up, &st.act, &st.delta, &st.packed, &st.part, &st.moe};
    const int64_t sizes[] = {w.x,      w.proj,  w.heads,  w.attn,   w.gated, w.o,
                             w.gate_up, w.act, w.delta, w.packed, w.part,  w.moe};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; ++i) *regions[i] = next, next += rows * sizes[i];
    st.linear_threads = linear_threads, st.attention_threads = attention_threads, st.delta_threads = delta_threads;
    st.row_slots = row_slots, st.rank = rank, st.shrunk = shrunk;
    for (int64_t i = 0; i < num_layers; ++i) {
        const decoder_layer *l = layers + i;
        st.lora = lora != NULL ? lora + i : NULL;
        const float *layer_in = i == 0 ? hidden : hidden_out;
        if (i == 0 && residual == NULL) { /* a model's first layer: the residual stream starts as its input */
            rmsnorm_f32(hidden, h, NULL, 0, l->input_norm, st.x, NULL, rows, h, s->eps, 1);
            residual = hidden;
        } else {
            rmsnorm_f32(layer_in, h, residual, h, l->input_norm, st.x, residual_out, rows, h, s->eps, 1);
            residual = residual_out;
        }
        if (l->kind == GATED_DELTA_NET)
            gated_delta_net(l, s, &st);
        else
            attention(l, s, &st);
        rmsnorm_f32(st.o, h, residual, h, l->post_norm, st.x, residual_out, rows, h, s->eps, 1);
        residual = residual_out;
        if (l->router != NULL) {
            moe_f32(st.x, h, rows, l->router, l->router_bias, s->experts, s->top_k, s->normalize, s->first_expert,
                    s->held, l->experts_gate_up, l->experts_down, l->gate_up_bias, l->down_bias, h, inter,
                    s->activation, s->alpha, s->limit, hidden_out, st.moe, linear_threads);
            continue;
        }
        block_linear(&l->gate_up, st.x, h, l->gate_up_bias, st.gate_up, rows, 2 * inter, h, st.packed, st.part,
                     linear_threads);
        if (st.lora != NULL) add_lora(&st.lora->gate_up, st.x, h, st.gate_up, 2 * inter, &st);
        silu_mul_f32(st.gate_up, 2 * inter, st.act, rows, inter, 1);
        block_linear(&l->down, st.act, inter, l->down_bias, hidden_out, rows, h, inter, st.packed, st.part,
                     linear_threads);
        if (st.lora != NULL) add_lora(&st.lora->down, st.act, inter, hidden_out, h, &st);
    }
}
