"""The forward pass of a media encoder as an IR graph, in the same IR as the decoder's (decoder_graph.py), lowered by
the same `lower` onto the backend's kernels: LLaVA's vision encoder (a CLIP tower and its two-layer projector),
Idefics3's / SmolVLM's (a SigLIP-style tower, a pixel shuffle and one linear), Gemma 3's (a SigLIP tower, its patches
pooled into soft tokens, normed and projected), Gemma 4's (its own tower on pictures of any shape: rows of patches
and their positions, a 2-D rope, pooled by positions), Qwen3.5's (a ViT on rows of patches whose grids the metadata
carries: interpolated positions, a 2-D rope, squares of patches merged; Qwen3-VL's with its DeepStack mergers),
Qwen2.5-VL's (the same without positions, most layers attending within windows), and Qwen2-Audio's audio encoder
(Whisper's tower, its rows averaged in pairs, one linear).

The graph is written as the model reads, one op per line, unfused: the passes fuse each layer's q/k/v into one
linear, and lowering binds the ops (execution_graph/multimodal_binders.py for those a decoder lacks). Weights are
named by vision_weights.py's names. A step's pictures (images, or an image's tiles) are stacked as rows, each
picture's rows its class row (CLIP) then its patches; attention reads each picture's rows alone
(`encoder_metadata`, backends/torch_ops/vision.EncoderMetadata).

Vision graph inputs: pixel_values [N, C, H, W] (the Hugging Face processor's, float32), encoder_metadata (each
picture's rows). Output: embeds [N * tokens_per_image, text hidden]: each picture's embeddings, in order, one per
placeholder token (Qwen3-VL's: each with its DeepStack rows beside it, [tokens, text hidden * (1 + k)]). Audio
graph inputs: input_features [F, mel] (one clip's log-mel frames as rows, float32), encoder_metadata (the clip's
rows after the convolutions). Output: embeds [tokens, text hidden]."""

from __future__ import annotations

from dataclasses import dataclass

from sagellm.runtime.execution_graph.graph import Graph, GraphError, Value
from sagellm.runtime.models.architectures.audio_weights import AUDIO_PROJECTOR, AUDIO_TOWER
from sagellm.runtime.models.architectures.vision_weights import (
    CLIP_BOUNDS,
    POOLED_NORM,
    POOLED_PROJECTION,
    PROJECTOR,
    TOWER,
)
from sagellm.runtime.models.audio_config import AudioConfig
from sagellm.runtime.models.vision_config import VisionConfig


@dataclass(frozen=True)
class _Layer:
    """A pre-norm transformer encoder layer's shape and its tensors' names (CLIP / SigLIP and Whisper spell them
    differently): `prefix` holds layer i's tensors with {i} in it."""

    prefix: str
    attn_norm: str
    mlp_norm: str
    fc1: str
    fc2: str
    key_bias: bool  # Whisper's key projection has none
    hidden_size: int
    intermediate_size: int
    num_heads: int
    layer_norm_eps: float
    activation: str


def _vision_layer(v: VisionConfig) -> _Layer:
    return _Layer(TOWER + "encoder.layers.{i}.", "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2", True,
                  v.hidden_size, v.intermediate_size, v.num_heads, v.layer_norm_eps, v.activation)  # fmt: skip


def _audio_layer(a: AudioConfig) -> _Layer:
    return _Layer(AUDIO_TOWER + "layers.{i}.", "self_attn_layer_norm", "final_layer_norm", "fc1", "fc2", False,
                  a.hidden_size, a.intermediate_size, a.num_heads, a.layer_norm_eps, a.activation)  # fmt: skip


_VISION_GRAPHS = (("clip", "llava_mlp"), ("siglip", "pixel_shuffle"), ("siglip", "pooled"))  # (tower, projector)


def build_vision_graph(vision: VisionConfig) -> Graph:
    if vision.tower == "gemma4":
        return _gemma4_vision_graph(vision)
    if vision.tower == "qwen3_5":
        return _qwen3_5_vision_graph(vision)
    if vision.tower == "qwen2_5_vl":
        return _qwen2_5_vl_vision_graph(vision)
    if (vision.tower, vision.projector) not in _VISION_GRAPHS:
        raise GraphError(f"no encoder graph for a {vision.tower} tower with a {vision.projector} projector")
    g = Graph(attrs={"model": f"{vision.tower} vision tower", "num_layers": vision.num_layers_run})
    pixels = g.add("input", id="pixel_values", name="pixel_values")
    meta = g.add("input", id="encoder_metadata", name="encoder_metadata")
    e, eps = TOWER + "embeddings.", vision.layer_norm_eps
    embeddings = {"position_embedding": e + "position_embedding.weight", "grid": vision.grid}
    if vision.class_row:
        embeddings["class_embedding"] = e + "class_embedding"
    hidden = g.add("patch_embed", [pixels], weight=e + "patch_embedding.weight", patch_size=vision.patch_size,
                   bias=not vision.class_row, bucketed_positions=vision.projector == "pixel_shuffle",
                   **embeddings)  # fmt: skip
    if vision.class_row:
        hidden = g.add("layernorm", [hidden], weight=TOWER + "pre_layrnorm.weight", eps=eps)
    states = [hidden]  # the tower's hidden states: the embeddings, then each layer's output
    layer = _vision_layer(vision)
    for i in range(vision.num_layers_run):
        states.append(_encoder_layer(g, layer, i, states[-1], meta))
    if not vision.class_row:  # SigLIP's last hidden state is post-normed
        states[-1] = g.add("layernorm", [states[-1]], weight=TOWER + "post_layernorm.weight", eps=eps)
    features = [states[j] for j in vision.feature_layers]
    x = features[0] if len(features) == 1 else g.add("concat", features)
    if vision.drop_class:
        x = g.add("drop_class_rows", [x, meta])
    if vision.projector == "pooled":
        x = g.add("pool_squares", [x], grid=vision.grid, side=vision.pooled_side)
        x = g.add("rmsnorm", [x], weight=POOLED_NORM, eps=eps)
        x = g.add("transposed_linear", [x], weight=POOLED_PROJECTION, out_features=vision.text_hidden_size)
    elif vision.projector == "pixel_shuffle":
        x = g.add("pixel_shuffle", [x], grid=vision.grid, scale_factor=vision.scale_factor)
        x = g.add("linear", [x], weight=PROJECTOR + "modality_projection.proj.weight",
                  out_features=vision.text_hidden_size, bias=False)  # fmt: skip
    else:
        x = g.add("linear", [x], weight=PROJECTOR + "linear_1.weight", out_features=vision.text_hidden_size,
                  bias=vision.projector_bias)  # fmt: skip
        x = g.add(vision.projector_activation, [x])
        x = g.add("linear", [x], weight=PROJECTOR + "linear_2.weight", out_features=vision.text_hidden_size,
                  bias=vision.projector_bias)  # fmt: skip
    g.add("output", [x], id="embeds", name="embeds")
    return g


def _gemma4_vision_graph(v: VisionConfig) -> Graph:
    """Gemma 4's tower on pictures given as rows of patches and their positions (torch_ops/gemma4_vision.py): the
    patch embedder; layers of attention (q, k RMS-normed with weights and v without, the 2-D rope on q and k, scores
    unscaled) and a gated MLP, each sandwiched between two RMSNorms; each picture's patches pooled into its soft
    tokens; then the embedder: an RMSNorm without a weight and one linear into the text model's width."""
    g = Graph(attrs={"model": "gemma4 vision tower", "num_layers": v.num_layers_run})
    rows = g.add("input", id="pixel_values", name="pixel_values")  # [T, C * p * p + 2]
    meta = g.add("input", id="encoder_metadata", name="encoder_metadata")
    positions = g.add("patch_positions", [rows])
    e, eps, d, head = TOWER + "patch_embedder.", v.layer_norm_eps, v.hidden_size, v.head_dim
    hidden = g.add("gemma4_patch_embed", [rows, positions], weight=e + "input_proj.weight",
                   table=e + "position_embedding_table")  # fmt: skip
    for i in range(v.num_layers_run):
        p = f"{TOWER}encoder.layers.{i}."

        def linear(x: Value, name: str, out: int, p: str = p) -> Value:
            return _clipped_linear(g, x, f"{p}{name}", out, v.clipped_linears)

        x = g.add("rmsnorm", [hidden], weight=p + "input_layernorm.weight", eps=eps)
        q, k, val = (linear(x, f"self_attn.{name}_proj", d) for name in ("q", "k", "v"))
        q = g.add("head_rmsnorm", [q], weight=p + "self_attn.q_norm.weight", eps=eps, head_dim=head)
        k = g.add("head_rmsnorm", [k], weight=p + "self_attn.k_norm.weight", eps=eps, head_dim=head)
        val = g.add("head_rmsnorm", [val], weight=None, eps=eps, head_dim=head)
        q, k = (g.add("axial_rope", [t, positions], head_dim=head, theta=v.rope_theta) for t in (q, k))
        attn = g.add("encoder_attention", [q, k, val, meta], layer=i, num_heads=v.num_heads, head_dim=head,
                     scale=1.0)  # fmt: skip
        attn = linear(attn, "self_attn.o_proj", d)
        hidden = g.add("add", [hidden, g.add("rmsnorm", [attn], weight=p + "post_attention_layernorm.weight",
                                             eps=eps)])  # fmt: skip
        x = g.add("rmsnorm", [hidden], weight=p + "pre_feedforward_layernorm.weight", eps=eps)
        gate = g.add(v.activation, [linear(x, "mlp.gate_proj", v.intermediate_size)])
        x = linear(g.add("mul", [gate, linear(x, "mlp.up_proj", v.intermediate_size)]), "mlp.down_proj", d)
        hidden = g.add("add", [hidden, g.add("rmsnorm", [x], weight=p + "post_feedforward_layernorm.weight",
                                             eps=eps)])  # fmt: skip
    x = g.add("pool_by_positions", [hidden, positions, meta], kernel=v.pooling_kernel, scale=d**0.5)
    if v.standardize:
        x = g.add("standardize", [x], bias=TOWER + "std_bias", scale=TOWER + "std_scale")
    x = g.add("head_rmsnorm", [x], weight=None, eps=eps, head_dim=d)
    x = g.add("linear", [x], weight=PROJECTOR + "embedding_projection.weight", out_features=v.text_hidden_size)
    g.add("output", [x], id="embeds", name="embeds")
    return g


def _qwen3_5_vision_graph(v: VisionConfig) -> Graph:
    """Qwen3.5's tower on pictures given as rows of patches, each picture's grid in `encoder_metadata`
    (torch_ops/qwen_vision.GridMetadata): the Conv3d as a linear, the learned positions interpolated to each grid,
    blocks of a LayerNorm, a fused qkv with the 2-D rope on q and k, attention within each frame, the projection, a
    LayerNorm and the MLP, each added to the stream; then the merger: a LayerNorm, each square of merge^2 rows
    joined, two linears with a GELU between, into the text model's width. Qwen3-VL's tower is the same with
    DeepStack: each of `deepstack_layers`' outputs through a merger of its own (its LayerNorm after the join), its
    rows beside the main merger's, in layer order (transformers' deepstack_features)."""
    g = Graph(attrs={"model": "qwen3_5 vision tower", "num_layers": v.num_layers_run})
    rows = g.add("input", id="pixel_values", name="pixel_values")  # [T, C * t * p * p]
    meta = g.add("input", id="encoder_metadata", name="encoder_metadata")
    d, head, eps, merge = v.hidden_size, v.head_dim, v.layer_norm_eps, v.spatial_merge_size
    hidden = g.add("conv_as_linear", [rows], weight=TOWER + "patch_embed.proj.weight", bias=True)
    hidden = g.add("grid_positions", [hidden, meta], table=TOWER + "pos_embed.weight", merge=merge)
    cos, sin = g.add_multi("grid_rope", [hidden, meta], 2, head_dim=head, theta=v.rope_theta, merge=merge)

    def linear(x: Value, name: str, out: int) -> Value:
        return g.add("linear", [x], weight=f"{name}.weight", out_features=out, bias=True)

    def merger(x: Value, name: str, norm_joined: bool) -> Value:
        if not norm_joined:
            x = g.add("layernorm", [x], weight=f"{name}.norm.weight", eps=eps)
        x = g.add("join_rows", [x], group=merge**2)
        if norm_joined:
            x = g.add("layernorm", [x], weight=f"{name}.norm.weight", eps=eps)
        x = g.add(v.projector_activation, [linear(x, f"{name}.linear_fc1", d * merge**2)])
        return linear(x, f"{name}.linear_fc2", v.text_hidden_size)

    deepstack = []  # Qwen3-VL's DeepStack rows, in layer order
    for i in range(v.num_layers_run):
        p = f"{TOWER}blocks.{i}."
        x = g.add("layernorm", [hidden], weight=p + "norm1.weight", eps=eps)
        q, k, val = g.add_multi("split", [linear(x, p + "attn.qkv", 3 * d)], 3, sizes=[d, d, d])
        q, k = (g.add("rotate_heads", [t, cos, sin], head_dim=head) for t in (q, k))
        attn = g.add("encoder_attention", [q, k, val, meta], layer=i, num_heads=v.num_heads, head_dim=head,
                     scale=head**-0.5)  # fmt: skip
        hidden = g.add("add", [hidden, linear(attn, p + "attn.proj", d)])
        x = g.add("layernorm", [hidden], weight=p + "norm2.weight", eps=eps)
        x = linear(g.add(v.activation, [linear(x, p + "mlp.linear_fc1", v.intermediate_size)]), p + "mlp.linear_fc2", d)
        hidden = g.add("add", [hidden, x])
        if i in v.deepstack_layers:
            name = f"{TOWER}deepstack_merger_list.{v.deepstack_layers.index(i)}"
            deepstack.append(merger(hidden, name, norm_joined=True))
    x = merger(hidden, TOWER + "merger", norm_joined=False)
    if deepstack:  # [tokens, text hidden * (1 + k)]: VisionConfig.embedding_width
        x = g.add("concat", [x, *deepstack])
    g.add("output", [x], id="embeds", name="embeds")
    return g


def _qwen2_5_vl_vision_graph(v: VisionConfig) -> Graph:
    """Qwen2.5-VL's tower on pictures given as rows of patches, each picture's grid in `encoder_metadata`
    (torch_ops/qwen_vision.GridMetadata): the Conv3d as a linear without a bias; the rows, and the 2-D rope's angles
    for them, reordered so each window's merged squares are contiguous; blocks of an RMSNorm, a fused qkv with the
    rope on q and k, attention within each window (each frame in full_attention_layers), the projection, an RMSNorm
    and the gated MLP, each added to the stream; then the merger (an RMSNorm, each square of merge^2 rows joined, two
    linears with a GELU between, into the text model's width) and its rows back in the processor's order."""
    g = Graph(attrs={"model": "qwen2_5_vl vision tower", "num_layers": v.num_layers_run})
    rows = g.add("input", id="pixel_values", name="pixel_values")  # [T, C * t * p * p]
    frames = g.add("input", id="encoder_metadata", name="encoder_metadata")
    d, head, eps, inner = v.hidden_size, v.head_dim, v.layer_norm_eps, v.intermediate_size
    windowing = dict(merge=v.spatial_merge_size, side=v.window_tokens)
    windows = g.add("window_metadata", [frames], **windowing)
    hidden = g.add("conv_as_linear", [rows], weight=TOWER + "patch_embed.proj.weight", bias=False)
    cos, sin = g.add_multi("grid_rope", [hidden, frames], 2, head_dim=head, theta=v.rope_theta,
                           merge=v.spatial_merge_size)  # fmt: skip
    hidden, cos, sin = (g.add("window_order", [x, frames], **windowing) for x in (hidden, cos, sin))

    def linear(x: Value, name: str, out: int) -> Value:
        return g.add("linear", [x], weight=f"{name}.weight", out_features=out, bias=True)

    for i in range(v.num_layers_run):
        p = f"{TOWER}blocks.{i}."
        x = g.add("rmsnorm", [hidden], weight=p + "norm1.weight", eps=eps)
        q, k, val = g.add_multi("split", [linear(x, p + "attn.qkv", 3 * d)], 3, sizes=[d, d, d])
        q, k = (g.add("rotate_heads", [t, cos, sin], head_dim=head) for t in (q, k))
        seen = frames if i in v.full_attention_layers else windows
        attn = g.add("encoder_attention", [q, k, val, seen], layer=i, num_heads=v.num_heads, head_dim=head,
                     scale=head**-0.5)  # fmt: skip
        hidden = g.add("add", [hidden, linear(attn, p + "attn.proj", d)])
        x = g.add("rmsnorm", [hidden], weight=p + "norm2.weight", eps=eps)
        gate = g.add(v.activation, [linear(x, p + "mlp.gate_proj", inner)])
        x = linear(g.add("mul", [gate, linear(x, p + "mlp.up_proj", inner)]), p + "mlp.down_proj", d)
        hidden = g.add("add", [hidden, x])
    x = g.add("rmsnorm", [hidden], weight=TOWER + "merger.ln_q.weight", eps=eps)
    x = g.add("join_rows", [x], group=v.spatial_merge_size**2)
    x = g.add(v.projector_activation, [linear(x, TOWER + "merger.mlp.0", d * v.spatial_merge_size**2)])
    x = linear(x, TOWER + "merger.mlp.2", v.text_hidden_size)
    x = g.add("window_restore", [x, frames], **windowing)
    g.add("output", [x], id="embeds", name="embeds")
    return g


def _clipped_linear(g: Graph, x: Value, name: str, out_features: int, clipped: bool) -> Value:
    """Gemma4ClippableLinear `name`: its linear, the input and output clamped to its stored bounds where `clipped`."""
    low_in, high_in, low_out, high_out = (f"{name}.{bound}" for bound in CLIP_BOUNDS)
    if clipped:
        x = g.add("clamp", [x], low=low_in, high=high_in)
    x = g.add("linear", [x], weight=f"{name}.linear.weight", out_features=out_features)
    return g.add("clamp", [x], low=low_out, high=high_out) if clipped else x


def build_audio_graph(audio: AudioConfig) -> Graph:
    """Qwen2-Audio's encoder on one clip: the convolutions (the second of stride 2, one row per two frames), each
    with a GELU; the clip's own rows with their positions; the tower's layers; the rows averaged in pairs and
    normed; the projector."""
    g = Graph(attrs={"model": "audio tower", "num_layers": audio.num_layers})
    frames = g.add("input", id="input_features", name="input_features")
    meta = g.add("input", id="encoder_metadata", name="encoder_metadata")
    x = g.add("gelu", [g.add("conv1d", [frames], weight=AUDIO_TOWER + "conv1.weight", stride=1)])
    x = g.add("gelu", [g.add("conv1d", [x], weight=AUDIO_TOWER + "conv2.weight", stride=2)])
    hidden = g.add("positioned_rows", [x, meta], positions=AUDIO_TOWER + "embed_positions.weight")
    layer = _audio_layer(audio)
    for i in range(audio.num_layers):
        hidden = _encoder_layer(g, layer, i, hidden, meta)
    x = g.add("pool_row_pairs", [hidden, meta])
    x = g.add("layernorm", [x], weight=AUDIO_TOWER + "layer_norm.weight", eps=audio.layer_norm_eps)
    x = g.add("linear", [x], weight=AUDIO_PROJECTOR + "linear.weight", out_features=audio.text_hidden_size,
              bias=True)  # fmt: skip
    g.add("output", [x], id="embeds", name="embeds")
    return g


def _encoder_layer(g: Graph, layer: _Layer, i: int, hidden: Value, meta: Value) -> Value:
    """A pre-norm encoder layer: attention over the picture's or clip's rows, then the MLP, each added to the
    stream."""
    p, d, eps = layer.prefix.format(i=i), layer.hidden_size, layer.layer_norm_eps
    head_dim = d // layer.num_heads
    x = g.add("layernorm", [hidden], weight=f"{p}{layer.attn_norm}.weight", eps=eps)
    q, k, val = (g.add("linear", [x], weight=f"{p}self_attn.{name}_proj.weight", out_features=d,
                       bias=name != "k" or layer.key_bias) for name in ("q", "k", "v"))  # fmt: skip
    attn = g.add("encoder_attention", [q, k, val, meta], layer=i, num_heads=layer.num_heads, head_dim=head_dim,
                 scale=head_dim**-0.5)  # fmt: skip
    attn = g.add("linear", [attn], weight=p + "self_attn.out_proj.weight", out_features=d, bias=True)
    hidden = g.add("add", [hidden, attn])
    x = g.add("layernorm", [hidden], weight=f"{p}{layer.mlp_norm}.weight", eps=eps)
    x = g.add("linear", [x], weight=f"{p}{layer.fc1}.weight", out_features=layer.intermediate_size, bias=True)
    x = g.add("linear", [g.add(layer.activation, [x])], weight=f"{p}{layer.fc2}.weight", out_features=d, bias=True)
    return g.add("add", [hidden, x])
