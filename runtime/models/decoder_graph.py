"""The forward pass of a decoder-only transformer (the Llama layer and the families that vary it: Qwen2/3,
Mistral, Mixtral, Gemma 2/3/4/3n, Phi-3, gpt-oss, and Qwen3.5's hybrid of Gated DeltaNet and attention layers) as an IR
graph, built from the features ModelConfig records, never from family names.

The graph is written the way the model reads in its paper, one op per line, unfused; passes fuse it and lowering
binds it to a backend. One graph serves prefill and decode and any mix of the two in a batch: attention reads the
batch layout from its metadata input. Weights are named by their canonical Hugging Face names and bound at lowering.
A mixture of experts (Mixtral) differs only in its MLP: one `moe` op per layer, holding the router and every expert,
whose weights lowering stacks once.

Graph inputs: input_ids [T], positions [T], attn_metadata, logits_indices [N] (rows whose next token is sampled, so
the lm_head runs on N rows, not T); a model that sees images also mm_rows [M] and mm_embeds [M, H], the rows of the
step's image placeholders and their encoder's embeddings, which replace those rows' token embeddings (Qwen3-VL's
are [M, H * (1 + k)]: the first H columns replace them, the next H are added to those rows after layer 0, and so on
for its k DeepStack layers). Output: logits [N, V]. A pipeline stage's graph covers some `layers`: one that does
not start at layer 0 reads `hidden` and `residual` [T, H] instead of input_ids, and one that does not end at the
last layer gives them as its outputs instead of logits (the first stage holds every DeepStack layer). Attention
node `cache` is the layer's place among the graph's own attention layers, its index into the stage's KV caches; a
Gated DeltaNet node's `state` is its place among the graph's own linear attention layers, its index into the
stage's state caches. Gemma 4's per-layer embeddings, shared KV (a layer attends with an earlier layer's K and V
over that one's cache) and layer scalars, and Gemma 3n's AltUp streams ([T, K, H] between layers), need the whole
model in one graph: such a model is not split into pipeline stages."""

from __future__ import annotations

from sagellm.runtime.execution_graph.graph import Graph, GraphError, Value
from sagellm.runtime.models.config import ModelConfig


def build_decoder_graph(config: ModelConfig, layers: range | None = None, hidden_states: bool = False) -> Graph:
    """`hidden_states`: also output every row's final hidden state, normed ([T, H], what the MTP head reads)."""
    layers = layers if layers is not None else range(config.num_layers)
    g = Graph(attrs={"model": config.architecture, "num_layers": len(layers)})
    positions = g.add("input", id="positions", name="positions")
    meta = g.add("input", id="attn_metadata", name="attn_metadata")
    residual: Value | None = None
    if config.one_pipeline_stage and len(layers) != config.num_layers:
        raise GraphError("a model with per-layer embeddings, shared KV, layer scalars or AltUp (Gemma 4, 3n) runs "
                         "as one pipeline stage")  # fmt: skip
    deepstack = len(config.vision.deepstack_layers) if config.vision is not None else 0
    if 0 < layers.start < deepstack:
        raise GraphError(f"Qwen3-VL's DeepStack adds its pictures' rows after layers 0 to {deepstack - 1}: the first "
                         "pipeline stage must hold them all")  # fmt: skip
    per_layer = None
    if layers.start == 0:
        input_ids = g.add("input", id="input_ids", name="input_ids")
        hidden = g.add("embedding", [input_ids], weight="model.embed_tokens.weight")
        if config.embedding_scale != 1.0:
            hidden = g.add("scale", [hidden], factor=config.embedding_scale)
        ple_ids = input_ids
        if config.takes_media:  # an image's or clip's placeholder rows take its encoder's embeddings (None: none)
            rows = g.add("input", id="mm_rows", name="mm_rows")
            embeds = g.add("input", id="mm_embeds", name="mm_embeds")
            hidden = g.add("scatter_rows", [hidden, rows, embeds])
            if config.vision is not None and config.vision.per_layer_token_id is not None:
                # Gemma 4: those rows' per-layer embeddings are the pad token's, as transformers reads them
                ple_ids = g.add("replace_rows", [input_ids, rows], token=config.vision.per_layer_token_id)
        if config.per_layer_input_size:
            per_layer = _per_layer_inputs(g, config, ple_ids, hidden)
        if config.altup_num_inputs:  # Gemma 3n: the stream widened into AltUp's streams, [T, K, H]
            hidden = g.add("altup_embed", [hidden], weights=_altup_projections(config, "altup_projections"))
    else:
        hidden = g.add("input", id="hidden", name="hidden")
        residual = g.add("input", id="residual", name="residual")
    caches = _cache_indices(config, layers)
    kv: dict[int, tuple[Value, Value]] = {}  # each KV layer's K and V, for the layers that share them
    for layer in layers:
        if config.altup_num_inputs:
            assert per_layer is not None
            hidden = _altup_layer(g, config, layer, caches, kv, hidden, per_layer[layer], positions, meta)
            continue
        hidden, residual = _decoder_layer(g, config, layer, caches, kv, hidden, residual, positions, meta)
        if layer < deepstack:  # Qwen3-VL: the layer's output at the pictures' rows gains their layer'th DeepStack
            # columns (added to its branch, which the next layer joins to the residual: the stream transformers adds to)
            hidden = g.add("add_rows", [hidden, rows, embeds], first=config.hidden_size * (1 + layer),
                           width=config.hidden_size)  # fmt: skip
        if per_layer is not None:
            hidden, residual = _per_layer_block(g, config, layer, per_layer[layer], hidden, residual)
        if config.layer_scalar:  # the stream whole again, scaled: the next layer reads no residual
            stream = g.add("add", [hidden, residual])
            hidden, residual = g.add("mul_weight", [stream], weight=f"model.layers.{layer}.layer_scalar"), None
    if layers.stop < config.num_layers:
        g.add("output", [hidden], id="hidden_out", name="hidden")
        g.add("output", [residual], id="residual_out", name="residual")
        return g

    logits_indices = g.add("input", id="logits_indices", name="logits_indices")

    if hidden_states:  # every row through the final norm, the sampled ones then through the lm_head
        if config.altup_num_inputs:
            raise GraphError("AltUp's streams (Gemma 3n) have no one final hidden state per row to output")
        stream = hidden if residual is None else g.add("add", [hidden, residual])
        every = g.add("rmsnorm", [stream], weight="model.norm.weight", eps=config.rms_norm_eps)
        g.add("output", [every], id="hidden_states", name="hidden_states")
        _lm_head(g, config, g.add("index_rows", [every, logits_indices]))
        return g
    # Only the sampled rows go through the final norm and the lm_head.
    summed = g.add("index_rows", [hidden, logits_indices])
    if residual is not None:
        summed = g.add("add", [summed, g.add("index_rows", [residual, logits_indices])])
    if config.altup_num_inputs:
        summed = g.add("altup_unembed", [summed], weights=_altup_projections(config, "altup_unembed_projections"))
    _lm_head(g, config, g.add("rmsnorm", [summed], weight="model.norm.weight", eps=config.rms_norm_eps))
    return g


def build_mtp_graph(config: ModelConfig) -> Graph:
    """Qwen3.5's multi-token prediction head (mtp_head.py) as a graph of `head_config`'s one full attention layer:
    each row's token embedding and the target's final hidden state at the row before it (input `hidden` [T, H]),
    each normed, joined by `mtp.fc`, through the layer (its KV: the graph's one cache), normed by `mtp.norm` and
    scored by the target's lm_head. Outputs logits [N, V] and the sampled rows' normed hidden states [N, H] (the
    hidden state a next guess reads in place of the target's)."""
    g = Graph(attrs={"model": f"{config.architecture} mtp", "num_layers": 1})
    positions = g.add("input", id="positions", name="positions")
    meta = g.add("input", id="attn_metadata", name="attn_metadata")
    input_ids = g.add("input", id="input_ids", name="input_ids")
    target = g.add("input", id="hidden", name="hidden")
    eps = config.rms_norm_eps
    embedded = g.add("rmsnorm", [g.add("embedding", [input_ids], weight="model.embed_tokens.weight")],
                     weight="mtp.pre_fc_norm_embedding.weight", eps=eps)  # fmt: skip
    target = g.add("rmsnorm", [target], weight="mtp.pre_fc_norm_hidden.weight", eps=eps)
    joined = g.add("concat", [embedded, target])
    hidden = g.add("linear", [joined], weight="mtp.fc.weight", out_features=config.hidden_size)
    hidden, residual = _decoder_layer(g, config, 0, {0: 0}, {}, hidden, None, positions, meta)
    logits_indices = g.add("input", id="logits_indices", name="logits_indices")
    stream = g.add(
        "add", [g.add("index_rows", [hidden, logits_indices]), g.add("index_rows", [residual, logits_indices])]
    )
    normed = g.add("rmsnorm", [stream], weight="mtp.norm.weight", eps=eps)
    g.add("output", [normed], id="hidden_states", name="hidden_states")
    _lm_head(g, config, normed)
    return g


def _lm_head(g: Graph, config: ModelConfig, normed: Value) -> None:
    lm_head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    logits = g.add("linear", [normed], weight=lm_head, out_features=config.vocab_size)
    if config.final_softcap:
        logits = g.add("softcap", [logits], cap=config.final_softcap)
    g.add("output", [logits], id="logits", name="logits")


def _cache_indices(config: ModelConfig, layers: range) -> dict[int, int]:
    """Each layer's index into the stage's caches of its kind: KV caches for attention layers (a layer sharing
    another's KV takes that one's), state caches for linear attention ones."""
    counts = {True: 0, False: 0}
    indices = {}
    for layer in layers:
        linear = config.is_linear_attention(layer)
        if not linear and config.kv_source(layer) != layer:
            indices[layer] = indices[config.kv_source(layer)]
            continue
        indices[layer], counts[linear] = counts[linear], counts[linear] + 1
    return indices


def _per_layer_inputs(g: Graph, c: ModelConfig, input_ids: Value, embedded: Value) -> list[Value]:
    """Gemma 4's and 3n's per-layer embeddings: each token's row of the per-layer table (scaled by sqrt of its size;
    row 0 for a token past a table shorter than the vocabulary, Gemma 3n's) and a projection of its embedding (scaled
    by hidden^-1/2, RMS-normed per layer), averaged by 2^-1/2; one [T, P] per layer."""
    size, width = c.per_layer_input_size, c.num_layers * c.per_layer_input_size
    table = {"rows": c.per_layer_vocab_size} if c.per_layer_vocab_size < c.vocab_size else {}
    rows = g.add("embedding", [input_ids], weight="model.embed_tokens_per_layer.weight", **table)
    rows = g.add("scale", [rows], factor=size**0.5)
    projected = g.add("linear", [embedded], weight="model.per_layer_model_projection.weight", out_features=width)
    projected = g.add("scale", [projected], factor=c.hidden_size**-0.5)
    projected = g.add("head_rmsnorm", [projected], weight="model.per_layer_projection_norm.weight",
                      eps=c.rms_norm_eps, head_dim=size)  # fmt: skip
    joined = g.add("scale", [g.add("add", [projected, rows])], factor=2**-0.5)
    return g.add_multi("split", [joined], c.num_layers, sizes=[size] * c.num_layers)


def _per_layer_block(
    g: Graph, c: ModelConfig, i: int, per_layer: Value, hidden: Value, residual: Value
) -> tuple[Value, Value]:
    """After a Gemma 4 layer's MLP: its per-layer input, gated by the stream, joins the stream."""
    stream = g.add("add", [hidden, residual])
    return _gated_per_layer_input(g, c, i, per_layer, stream), stream


def _gated_per_layer_input(g: Graph, c: ModelConfig, i: int, per_layer: Value, x: Value) -> Value:
    """A layer's per-layer input [T, P] gated by a projection of x (Gemma 4: the stream; Gemma 3n: the corrected
    active stream), projected back to the hidden size and normed."""
    p = f"model.layers.{i}."
    gate = g.add("linear", [x], weight=p + "per_layer_input_gate.weight", out_features=c.per_layer_input_size)
    gated = g.add("mul", [g.add(c.activation, [gate]), per_layer])
    out = g.add("linear", [gated], weight=p + "per_layer_projection.weight", out_features=c.hidden_size)
    return g.add("rmsnorm", [out], weight=p + "post_per_layer_input_norm.weight", eps=c.rms_norm_eps)


def _mlp(g: Graph, c: ModelConfig, i: int, x: Value) -> Value:
    """The gated MLP (SwiGLU or GeGLU) of layer i's width; Gemma 3n's sparse layers cut each gate's row first."""
    p, size = f"model.layers.{i}.mlp.", c.intermediate_size_of(i)
    gate = g.add("linear", [x], weight=p + "gate_proj.weight", out_features=size)
    if c.activation_sparsity and c.activation_sparsity[i]:
        gate = g.add("gaussian_top_k", [gate], layer=i, sparsity=c.activation_sparsity[i])
    up = g.add("linear", [x], weight=p + "up_proj.weight", out_features=size)
    act = g.add("mul", [g.add(c.activation, [gate]), up])
    return g.add("linear", [act], weight=p + "down_proj.weight", out_features=c.hidden_size)


def _altup_projections(c: ModelConfig, name: str) -> list[str]:
    return [f"model.{name}.{j}.weight" for j in range(c.altup_num_inputs - 1)]


def _altup_layer(
    g: Graph,
    c: ModelConfig,
    i: int,
    caches: dict[int, int],
    kv: dict[int, tuple[Value, Value]],
    streams: Value,
    per_layer: Value,
    positions: Value,
    meta: Value,
) -> Value:
    """A Gemma 3n layer over AltUp's streams [T, K, H]: the streams predicted, the layer (attention beside a LAuReL
    branch, then its MLP) run on the active prediction, every stream corrected by the result, and the per-layer
    input, gated by the active one, added to all streams but the first."""
    p, eps = f"model.layers.{i}.", c.rms_norm_eps
    router = {"norm": p + "altup.router_norm.weight", "router": p + "altup.modality_router.weight",
              "active": c.altup_active_idx, "eps": eps}  # fmt: skip
    predictions, active = g.add_multi("altup_predict", [streams], 2, coefs=p + "altup.prediction_coefs.weight",
                                      **router)  # fmt: skip
    x = g.add("rmsnorm", [active], weight=p + "input_layernorm.weight", eps=eps)
    left = g.add("linear", [x], weight=p + "laurel.linear_left.weight", out_features=c.laurel_rank)
    right = g.add("linear", [left], weight=p + "laurel.linear_right.weight", out_features=c.hidden_size)
    laurel = g.add("add", [x, g.add("rmsnorm", [right], weight=p + "laurel.post_laurel_norm.weight", eps=eps)])
    attn = _attention(g, c, i, caches[i], kv, x, positions, meta)
    attn = g.add("rmsnorm", [attn], weight=p + "post_attention_layernorm.weight", eps=eps)
    attn = g.add("scale", [g.add("add", [g.add("add", [active, attn]), laurel])], factor=2**-0.5)
    x = g.add("rmsnorm", [attn], weight=p + "pre_feedforward_layernorm.weight", eps=eps)
    mlp = g.add("rmsnorm", [_mlp(g, c, i, x)], weight=p + "post_feedforward_layernorm.weight", eps=eps)
    scale = {"output_scale": p + "altup.correct_output_scale"} if c.altup_correct_scale else {}
    corrected, first = g.add_multi("altup_correct", [predictions, g.add("add", [attn, mlp])], 2,
                                   coefs=p + "altup.correction_coefs.weight", **router, **scale)  # fmt: skip
    return g.add("altup_add_to_others", [corrected, _gated_per_layer_input(g, c, i, per_layer, first)])


def _decoder_layer(
    g: Graph,
    c: ModelConfig,
    i: int,
    caches: dict[int, int],
    kv: dict[int, tuple[Value, Value]],
    hidden: Value,
    residual: Value | None,
    positions: Value,
    meta: Value,
) -> tuple[Value, Value]:
    p = f"model.layers.{i}."
    # In the first layer (and after a layer that joins its stream) the hidden state is the residual stream.
    residual = hidden if residual is None else g.add("add", [hidden, residual])
    x = g.add("rmsnorm", [residual], weight=p + "input_layernorm.weight", eps=c.rms_norm_eps)
    if c.is_linear_attention(i):
        hidden = _gated_delta_net(g, c, i, caches[i], x, meta)
    else:
        hidden = _attention(g, c, i, caches[i], kv, x, positions, meta)
    if c.sandwich_norms:
        hidden = g.add("rmsnorm", [hidden], weight=p + "post_attention_layernorm.weight", eps=c.rms_norm_eps)

    residual = g.add("add", [hidden, residual])
    mlp_norm = "pre_feedforward_layernorm" if c.sandwich_norms else "post_attention_layernorm"
    x = g.add("rmsnorm", [residual], weight=f"{p}{mlp_norm}.weight", eps=c.rms_norm_eps)
    if c.is_moe and not c.expert_intermediate_size:
        return _sparse_moe(g, c, i, x), residual
    hidden = _mlp(g, c, i, x)
    if c.expert_intermediate_size:
        hidden = _experts_beside(g, c, i, hidden, residual)
    if c.sandwich_norms:
        hidden = g.add("rmsnorm", [hidden], weight=p + "post_feedforward_layernorm.weight", eps=c.rms_norm_eps)
    return hidden, residual


def _attention(
    g: Graph,
    c: ModelConfig,
    i: int,
    cache: int,
    kv: dict[int, tuple[Value, Value]],
    x: Value,
    positions: Value,
    meta: Value,
) -> Value:
    """Self-attention over the paged KV cache, up to o_proj. Gated attention (Qwen3.5): q_proj also gives a gate
    per head, interleaved with its query, and the output is multiplied by its sigmoid. A layer sharing another's KV
    (Gemma 4) attends with that layer's K and V over its cache: writing them again is writing the same values."""
    p = f"model.layers.{i}."
    d, kv_heads = c.head_dim_of(i), c.num_kv_heads_of(i)
    dims = {"head_dim": d} if d != c.head_dim else {}  # a layer's own head size (Gemma 4's full attention)
    q_size, kv_size = c.num_heads * d, kv_heads * d
    bias = {"bias": True} if c.qkv_bias else {}
    gate = None
    if c.attn_output_gate:
        both = g.add("linear", [x], weight=p + "self_attn.q_proj.weight", out_features=2 * q_size, **bias)
        q, gate = g.add_multi("split_head_halves", [both], 2, head_dim=d)
    else:
        q = g.add("linear", [x], weight=p + "self_attn.q_proj.weight", out_features=q_size, **bias)
    window = c.window_of(i)
    table = "local" if window and c.local_rope_theta is not None else "global"
    heads = {"num_heads": c.num_heads, "num_kv_heads": kv_heads}
    norm = {"eps": c.rms_norm_eps, **dims}
    if c.kv_source(i) == i:
        k = g.add("linear", [x], weight=p + "self_attn.k_proj.weight", out_features=kv_size, **bias)
        if c.values_from_keys(i):
            v = k
        else:
            v = g.add("linear", [x], weight=p + "self_attn.v_proj.weight", out_features=kv_size, **bias)
        if c.qk_norm:
            q = g.add("head_rmsnorm", [q], weight=p + "self_attn.q_norm.weight", **norm)
            k = g.add("head_rmsnorm", [k], weight=p + "self_attn.k_norm.weight", **norm)
        if c.value_norm:
            v = g.add("head_rmsnorm", [v], weight=None, **norm)
        q, k = g.add_multi("rope", [q, k, positions], 2, layer=i, table=table, **heads, **dims)
        kv[i] = k, v
    else:
        if c.qk_norm:
            q = g.add("head_rmsnorm", [q], weight=p + "self_attn.q_norm.weight", **norm)
        q = g.add("rope_query", [q, positions], layer=i, table=table, num_heads=c.num_heads, **dims)
        k, v = kv[c.kv_source(i)]
    attention = {"scale": c.attention_scale or d**-0.5, "window": window, "softcap": c.attn_softcap}
    if c.attention_sinks:
        attention["sinks"] = p + "self_attn.sinks"
    attn = g.add("attention", [q, k, v, meta], layer=i, cache=cache, **heads, **attention, **dims)
    if gate is not None:
        attn = g.add("mul", [attn, g.add("sigmoid", [gate])])
    o_bias = {"bias": True} if c.o_bias else {}
    return g.add("linear", [attn], weight=p + "self_attn.o_proj.weight", out_features=c.hidden_size, **o_bias)


def _gated_delta_net(g: Graph, c: ModelConfig, i: int, state: int, x: Value, meta: Value) -> Value:
    """A Gated DeltaNet layer (Qwen3.5): q, k, v through a causal convolution, then the gated delta rule over the
    sequence's recurrent state (`state`: the layer's index into the stage's state caches), a per-head RMSNorm gated
    by z, and out_proj."""
    p = f"model.layers.{i}.linear_attn."
    hv, dv = c.linear_num_value_heads, c.linear_value_head_dim
    qkv = g.add("linear", [x], weight=p + "in_proj_qkv.weight", out_features=c.linear_conv_dim)
    z = g.add("linear", [x], weight=p + "in_proj_z.weight", out_features=hv * dv)
    b = g.add("linear", [x], weight=p + "in_proj_b.weight", out_features=hv)
    a = g.add("linear", [x], weight=p + "in_proj_a.weight", out_features=hv)
    core = g.add(
        "gated_delta_net",
        [qkv, b, a, meta],
        layer=i,
        state=state,
        conv_weight=p + "conv1d.weight",
        a_log=p + "A_log",
        dt_bias=p + "dt_bias",
        num_k_heads=c.linear_num_key_heads,
        head_k_dim=c.linear_key_head_dim,
        head_v_dim=dv,
        tiled_value_heads=c.linear_value_heads_tiled,
    )
    normed = g.add("gated_rmsnorm", [core, z], weight=p + "norm.weight", eps=c.rms_norm_eps)
    return g.add("linear", [normed], weight=p + "out_proj.weight", out_features=c.hidden_size)


def _sparse_moe(g: Graph, c: ModelConfig, i: int, x: Value) -> Value:
    """Mixtral's block: the router picks `top_k` experts per token; the output is their MLPs' weighted sum. gpt-oss's
    adds biases (`bias`: the router's and every projection's, under the weights' names) and its clamped SwiGLU."""
    experts = f"model.layers.{i}.block_sparse_moe.experts.{{}}."  # {} is an expert's number
    activation = {"activation": c.expert_activation}
    if c.expert_activation == "swiglu_oai":
        activation |= {"alpha": c.swiglu_alpha, "limit": c.swiglu_limit}
    routed = g.add(
        "moe",
        [x],
        layer=i,
        num_experts=c.num_experts,
        intermediate_size=c.intermediate_size,
        top_k=c.experts_per_token,
        normalize=c.normalize_expert_weights,
        router=f"model.layers.{i}.block_sparse_moe.gate.weight",
        gate=experts + "w1.weight",
        up=experts + "w3.weight",
        down=experts + "w2.weight",
        bias=c.expert_bias,
        **activation,
    )
    if not c.shared_expert_intermediate_size:
        return routed
    return g.add("add", [routed, _shared_expert(g, c, i, x)])


def _experts_beside(g: Graph, c: ModelConfig, i: int, dense: Value, residual: Value) -> Value:
    """Gemma 4's mixture: the dense MLP's output and the experts' (routed from their own norm of the stream, which
    the experts read through another norm) each normed, then summed."""
    p = f"model.layers.{i}."
    eps = c.rms_norm_eps
    dense = g.add("rmsnorm", [dense], weight=p + "post_feedforward_layernorm_1.weight", eps=eps)
    routing = g.add("rmsnorm", [residual], weight=p + "router.scale", eps=eps)
    routing = g.add("scale", [routing], factor=c.hidden_size**-0.5)
    x = g.add("rmsnorm", [residual], weight=p + "pre_feedforward_layernorm_2.weight", eps=eps)
    experts = f"{p}block_sparse_moe.experts.{{}}."
    routed = g.add(
        "moe",
        [x, routing],
        layer=i,
        num_experts=c.num_experts,
        top_k=c.experts_per_token,
        normalize=True,
        router=p + "block_sparse_moe.gate.weight",
        gate=experts + "w1.weight",
        up=experts + "w3.weight",
        down=experts + "w2.weight",
        bias=False,
        activation=c.expert_activation,
        expert_scale=p + "router.per_expert_scale",
    )
    routed = g.add("rmsnorm", [routed], weight=p + "post_feedforward_layernorm_2.weight", eps=eps)
    return g.add("add", [dense, routed])


def _shared_expert(g: Graph, c: ModelConfig, i: int, x: Value) -> Value:
    """Qwen3.5-MoE's shared expert: an MLP every token takes, scaled by sigmoid of its gate's one output."""
    p = f"model.layers.{i}.block_sparse_moe.shared_expert"
    size = c.shared_expert_intermediate_size
    gate = g.add("linear", [x], weight=p + ".gate_proj.weight", out_features=size)
    up = g.add("linear", [x], weight=p + ".up_proj.weight", out_features=size)
    mlp = g.add("linear", [g.add("mul", [g.add("silu", [gate]), up])], weight=p + ".down_proj.weight",
                out_features=c.hidden_size)  # fmt: skip
    weight = g.add("sigmoid", [g.add("linear", [x], weight=p + "_gate.weight", out_features=1)])  # [T, 1]
    return g.add("mul", [mlp, weight])
