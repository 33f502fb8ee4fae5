"""The forward pass of a vision encoder as an IR graph, in the same IR as the decoder's (decoder_graph.py), lowered by
the same `lower` onto the backend's kernels: LLaVA's (a CLIP tower and its two-layer projector) and Idefics3's /
SmolVLM's (a SigLIP-style tower, a pixel shuffle and one linear).

The graph is written as the model reads, one op per line, unfused: the passes fuse each layer's q/k/v into one
linear, and lowering binds the ops (execution_graph/multimodal_binders.py for those a decoder lacks). Weights are
named by vision_weights.py's names. A step's pictures (images, or an image's tiles) are stacked as rows, each
picture's rows its class row (CLIP) then its patches; attention reads each picture's rows alone
(`encoder_metadata`, backends/torch_ops/vision.EncoderMetadata).

Graph inputs: pixel_values [N, C, H, W] (the Hugging Face processor's, float32), encoder_metadata (each picture's
rows). Output: embeds [N * tokens_per_image, text hidden]: each picture's embeddings, in order, one per placeholder
token."""

from __future__ import annotations

from sagellm.runtime.execution_graph.graph import Graph, GraphError, Value
from sagellm.runtime.models.architectures.vision_weights import PROJECTOR, TOWER
from sagellm.runtime.models.vision_config import VisionConfig


def build_vision_graph(vision: VisionConfig) -> Graph:
    if (vision.tower, vision.projector) not in (("clip", "llava_mlp"), ("siglip", "pixel_shuffle")):
        raise GraphError(f"no encoder graph for a {vision.tower} tower with a {vision.projector} projector")
    g = Graph(attrs={"model": f"{vision.tower} vision tower", "num_layers": vision.num_layers_run})
    pixels = g.add("input", id="pixel_values", name="pixel_values")
    meta = g.add("input", id="encoder_metadata", name="encoder_metadata")
    e, eps = TOWER + "embeddings.", vision.layer_norm_eps
    embeddings = {"position_embedding": e + "position_embedding.weight", "grid": vision.grid}
    if vision.class_row:
        embeddings["class_embedding"] = e + "class_embedding"
    hidden = g.add("patch_embed", [pixels], weight=e + "patch_embedding.weight", patch_size=vision.patch_size,
                   bias=not vision.class_row, **embeddings)  # fmt: skip
    if vision.class_row:
        hidden = g.add("layernorm", [hidden], weight=TOWER + "pre_layrnorm.weight", eps=eps)
    states = [hidden]  # the tower's hidden states: the embeddings, then each layer's output
    for i in range(vision.num_layers_run):
        states.append(_encoder_layer(g, vision, i, states[-1], meta))
    if not vision.class_row:  # SigLIP's last hidden state is post-normed
        states[-1] = g.add("layernorm", [states[-1]], weight=TOWER + "post_layernorm.weight", eps=eps)
    features = [states[j] for j in vision.feature_layers]
    x = features[0] if len(features) == 1 else g.add("concat", features)
    if vision.drop_class:
        x = g.add("drop_class_rows", [x, meta])
    if vision.projector == "pixel_shuffle":
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


def _encoder_layer(g: Graph, v: VisionConfig, i: int, hidden: Value, meta: Value) -> Value:
    """A pre-norm ViT layer: attention over the image's rows, then the MLP, each added to the stream."""
    p, d = f"{TOWER}encoder.layers.{i}.", v.hidden_size
    x = g.add("layernorm", [hidden], weight=p + "layer_norm1.weight", eps=v.layer_norm_eps)
    q, k, val = (g.add("linear", [x], weight=f"{p}self_attn.{name}_proj.weight", out_features=d, bias=True)
                 for name in ("q", "k", "v"))  # fmt: skip
    attn = g.add("encoder_attention", [q, k, val, meta], layer=i, num_heads=v.num_heads, head_dim=v.head_dim,
                 scale=v.head_dim**-0.5)  # fmt: skip
    attn = g.add("linear", [attn], weight=p + "self_attn.out_proj.weight", out_features=d, bias=True)
    hidden = g.add("add", [hidden, attn])
    x = g.add("layernorm", [hidden], weight=p + "layer_norm2.weight", eps=v.layer_norm_eps)
    x = g.add("linear", [x], weight=p + "mlp.fc1.weight", out_features=v.intermediate_size, bias=True)
    x = g.add("linear", [g.add(v.activation, [x])], weight=p + "mlp.fc2.weight", out_features=d, bias=True)
    return g.add("add", [hidden, x])
