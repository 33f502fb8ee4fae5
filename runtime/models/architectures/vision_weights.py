"""A vision encoder's tensors: the checkpoint's names mapped to the encoder graph's, and the shapes a VisionConfig
implies, which the loaders check the kept tensors against.

LLaVA checkpoints name the tower by the transformers version that wrote them (`vision_tower.vision_model.` in 4,
`model.vision_tower.` in 5, and `vision_tower.` as transformers 5 saves them again; Gemma 3's add `vision_model.`
after any of them) and the projector with or without `model.`; Idefics3 and SmolVLM name theirs
`model.vision_model.` and `model.connector.`; Gemma 4 its tower `model.vision_tower.` and its embedder
`model.embed_vision.` (read as the projector); Qwen3.5 and Qwen3-VL their tower and mergers `model.visual.`,
Qwen2.5-VL `visual.` (all read as the tower, its Conv3d's weight [D, C, T, p, p] kept whole: the binder reads it as
a linear's [D, C * T * p * p]). The graph reads one name each, `vision_tower.<the tower's name>` and
`multi_modal_projector.<name>`. Tower layers past the last hidden state read are not kept, nor a CLIP tower's
post-layernorm (which only its pooled output takes)."""

from __future__ import annotations

from sagellm.runtime.models.vision_config import VisionConfig

TOWER, PROJECTOR = "vision_tower.", "multi_modal_projector."
# A checkpoint's prefixes of the tower and projector, longest first, and the graph's for each
_PREFIXES = (
    ("model.vision_tower.vision_model.", TOWER),
    ("vision_tower.vision_model.", TOWER),
    ("model.vision_tower.", TOWER),
    ("model.vision_model.", TOWER),
    ("model.visual.", TOWER),
    ("visual.", TOWER),
    (TOWER, TOWER),
    ("model.multi_modal_projector.", PROJECTOR),
    ("model.connector.", PROJECTOR),
    ("model.embed_vision.", PROJECTOR),
    (PROJECTOR, PROJECTOR),
)
VISION_PREFIXES = tuple(prefix for prefix, _ in _PREFIXES)
# Each projector's linears: name -> its weight's (rows, columns) as functions of the config (a bias beside each where
# the config has them)
_PROJECTORS = {
    "llava_mlp": lambda v: {
        "linear_1": (v.text_hidden_size, v.hidden_size * len(v.feature_layers)),
        "linear_2": (v.text_hidden_size, v.text_hidden_size),
    },
    "pixel_shuffle": lambda v: {"modality_projection.proj": (v.text_hidden_size, v.hidden_size * v.scale_factor**2)},
    "pooled": lambda v: {},
}
CLIP_BOUNDS = ("input_min", "input_max", "output_min", "output_max")  # a Gemma 4 clipped linear's scalars
_GEMMA4_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)
# Gemma 3's pooled projector: an RMSNorm (stored as its offset from 1, as the text model's) and a matrix stored
# [vision hidden, text hidden], the transpose of a linear's weight
POOLED_NORM, POOLED_PROJECTION = PROJECTOR + "mm_soft_emb_norm.weight", PROJECTOR + "mm_input_projection_weight"


def vision_name(vision: VisionConfig, name: str) -> str | None:
    """The graph's name of a tower or projector tensor (one starting with a VISION_PREFIXES entry), None for one
    the encoder does not read."""
    prefix, ours = next((p, o) for p, o in _PREFIXES if name.startswith(p))
    name = ours + name.removeprefix(prefix)
    layer = name.removeprefix(TOWER + "encoder.layers.").partition(".")[0]
    if layer.isdigit() and int(layer) >= vision.num_layers_run:
        return None
    if name.startswith(TOWER + "head."):  # a SigLIP tower's pooling head (Gemma 3 reads its hidden states)
        return None
    return None if vision.class_row and name.startswith(TOWER + "post_layernorm.") else name


def vision_weight_shapes(vision: VisionConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the encoder graph reads for `vision`, under the graph's names."""
    if vision.tower == "gemma4":
        return _gemma4_shapes(vision)
    if vision.tower == "qwen3_5":
        return _qwen3_5_shapes(vision)
    if vision.tower == "qwen2_5_vl":
        return _qwen2_5_vl_shapes(vision)
    d, inner = vision.hidden_size, vision.intermediate_size
    e = TOWER + "embeddings."
    shapes: dict[str, tuple[int, ...]] = {
        e + "patch_embedding.weight": (d, vision.num_channels, vision.patch_size, vision.patch_size),
        e + "position_embedding.weight": (vision.rows_per_image, d),
    }
    # CLIP: a class row and a pre-norm; SigLIP: a patch bias and a post-norm
    norm = TOWER + ("pre_layrnorm." if vision.class_row else "post_layernorm.")
    shapes |= {norm + "weight": (d,), norm + "bias": (d,)}
    shapes |= {e + "class_embedding": (d,)} if vision.class_row else {e + "patch_embedding.bias": (d,)}
    for i in range(vision.num_layers_run):
        p = f"{TOWER}encoder.layers.{i}."
        for norm in ("layer_norm1", "layer_norm2"):
            shapes |= {f"{p}{norm}.weight": (d,), f"{p}{norm}.bias": (d,)}
        for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes |= {f"{p}self_attn.{projection}.weight": (d, d), f"{p}self_attn.{projection}.bias": (d,)}
        shapes |= {f"{p}mlp.fc1.weight": (inner, d), f"{p}mlp.fc1.bias": (inner,)}
        shapes |= {f"{p}mlp.fc2.weight": (d, inner), f"{p}mlp.fc2.bias": (d,)}
    for name, (rows, columns) in _PROJECTORS[vision.projector](vision).items():
        shapes[f"{PROJECTOR}{name}.weight"] = (rows, columns)
        if vision.projector_bias:
            shapes[f"{PROJECTOR}{name}.bias"] = (rows,)
    if vision.projector == "pooled":
        shapes |= {POOLED_NORM: (d,), POOLED_PROJECTION: (d, vision.text_hidden_size)}
    return shapes


def _gemma4_shapes(vision: VisionConfig) -> dict[str, tuple[int, ...]]:
    """Gemma 4's tower (its linears each `<name>.linear.weight`, with four scalar bounds beside where clipped) and
    its embedder's one linear (its norm has no weight)."""
    d, inner, head, p = vision.hidden_size, vision.intermediate_size, vision.head_dim, vision.patch_size
    e = TOWER + "patch_embedder."
    shapes: dict[str, tuple[int, ...]] = {
        e + "input_proj.weight": (d, vision.num_channels * p * p),
        e + "position_embedding_table": (2, vision.position_embedding_size, d),
    }
    for i in range(vision.num_layers_run):
        layer = f"{TOWER}encoder.layers.{i}."
        linears = {f"self_attn.{name}_proj": (d, d) for name in ("q", "k", "v", "o")}
        linears |= {"mlp.gate_proj": (inner, d), "mlp.up_proj": (inner, d), "mlp.down_proj": (d, inner)}
        for name, shape in linears.items():
            shapes[f"{layer}{name}.linear.weight"] = shape
            if vision.clipped_linears:
                shapes |= {f"{layer}{name}.{bound}": () for bound in CLIP_BOUNDS}
        shapes |= {f"{layer}self_attn.{norm}.weight": (head,) for norm in ("q_norm", "k_norm")}
        shapes |= {f"{layer}{norm}.weight": (d,) for norm in _GEMMA4_NORMS}
    if vision.standardize:
        shapes |= {TOWER + "std_bias": (d,), TOWER + "std_scale": (d,)}
    shapes[PROJECTOR + "embedding_projection.weight"] = (vision.text_hidden_size, d)
    return shapes


def _linear(name: str, rows: int, columns: int) -> dict[str, tuple[int, ...]]:
    """A linear's weight and bias."""
    return {f"{name}.weight": (rows, columns), f"{name}.bias": (rows,)}


def _qwen3_5_shapes(vision: VisionConfig) -> dict[str, tuple[int, ...]]:
    """Qwen3.5's tower (its Conv3d patch embedding, learned positions, blocks of LayerNorms, a fused qkv and an MLP,
    every linear with a bias) and its merger (a LayerNorm over the tower's width, two linears over the merged
    squares'), and Qwen3-VL's DeepStack mergers beside it, all under the tower's name."""
    d, inner, p, t = vision.hidden_size, vision.intermediate_size, vision.patch_size, vision.temporal_patch_size
    merged = d * vision.spatial_merge_size**2

    def norm(name: str, width: int) -> dict[str, tuple[int, ...]]:
        return {f"{name}.weight": (width,), f"{name}.bias": (width,)}

    shapes: dict[str, tuple[int, ...]] = {
        TOWER + "patch_embed.proj.weight": (d, vision.num_channels, t, p, p),
        TOWER + "patch_embed.proj.bias": (d,),
        TOWER + "pos_embed.weight": (vision.num_position_embeddings, d),
    }
    for i in range(vision.num_layers_run):
        block = f"{TOWER}blocks.{i}."
        shapes |= norm(block + "norm1", d) | norm(block + "norm2", d)
        shapes |= _linear(block + "attn.qkv", 3 * d, d) | _linear(block + "attn.proj", d, d)
        shapes |= _linear(block + "mlp.linear_fc1", inner, d) | _linear(block + "mlp.linear_fc2", d, inner)
    shapes |= norm(TOWER + "merger.norm", d)
    for j in range(len(vision.deepstack_layers)):  # Qwen3-VL's: each normed over the joined merged squares' width
        shapes |= norm(f"{TOWER}deepstack_merger_list.{j}.norm", merged)
        shapes |= _linear(f"{TOWER}deepstack_merger_list.{j}.linear_fc1", merged, merged)
        shapes |= _linear(f"{TOWER}deepstack_merger_list.{j}.linear_fc2", vision.text_hidden_size, merged)
    shapes |= _linear(TOWER + "merger.linear_fc1", merged, merged)
    return shapes | _linear(TOWER + "merger.linear_fc2", vision.text_hidden_size, merged)


def _qwen2_5_vl_shapes(vision: VisionConfig) -> dict[str, tuple[int, ...]]:
    """Qwen2.5-VL's tower (its Conv3d patch embedding without a bias, blocks of RMSNorms, a fused qkv and a gated
    MLP, every linear with a bias) and its merger (an RMSNorm over the tower's width, `mlp.0` and `mlp.2` over the
    merged squares'), all under the tower's name."""
    d, inner, p, t = vision.hidden_size, vision.intermediate_size, vision.patch_size, vision.temporal_patch_size
    merged = d * vision.spatial_merge_size**2
    shapes: dict[str, tuple[int, ...]] = {TOWER + "patch_embed.proj.weight": (d, vision.num_channels, t, p, p)}
    for i in range(vision.num_layers_run):
        block = f"{TOWER}blocks.{i}."
        shapes |= {block + "norm1.weight": (d,), block + "norm2.weight": (d,)}
        shapes |= _linear(block + "attn.qkv", 3 * d, d) | _linear(block + "attn.proj", d, d)
        shapes |= _linear(block + "mlp.gate_proj", inner, d) | _linear(block + "mlp.up_proj", inner, d)
        shapes |= _linear(block + "mlp.down_proj", d, inner)
    shapes[TOWER + "merger.ln_q.weight"] = (d,)
    shapes |= _linear(TOWER + "merger.mlp.0", merged, merged)
    return shapes | _linear(TOWER + "merger.mlp.2", vision.text_hidden_size, merged)
