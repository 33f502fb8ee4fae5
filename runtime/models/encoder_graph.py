"""The forward pass of a vision encoder (LLaVA's: a CLIP tower and its two-layer projector) as an IR graph, in the
same IR as the decoder's (decoder_graph.py), lowered by the same `lower` onto the backend's kernels.

The graph is written as the model reads, one op per line, unfused: the passes fuse each layer's q/k/v into one
linear, and lowering binds the ops (execution_graph/multimodal_binders.py for those a decoder lacks). Weights are
named by vision_weights.py's names. A step's images are stacked as rows, each image's rows its class row then its
patches; attention reads each image's rows alone (`encoder_metadata`, backends/torch_ops/vision.EncoderMetadata).

Graph inputs: pixel_values [N, C, H, W] (the Hugging Face processor's, float32), encoder_metadata (each image's
rows). Output: embeds [N * tokens_per_image, text hidden]: each image's embeddings, in order, one per placeholder
token."""

from __future__ import annotations

from sagellm.runtime.execution_graph.graph import Graph, GraphError, Value
from sagellm.runtime.models.architectures.vision_weights import PROJECTOR, TOWER
from sagellm.runtime.models.vision_config import VisionConfig


def build_vision_graph(vision: VisionConfig) -> Graph:
    if vision.tower != "clip" or vision.projector != "llava_mlp":
        raise GraphError(f"no encoder graph for a {vision.tower} tower with a {vision.projector} projector")
    g = Graph(attrs={"model": "clip vision tower", "num_layers": vision.num_layers_run})
    pixels = g.add("input", id="pixel_values", name="pixel_values")
    meta = g.add("input", id="encoder_metadata", name="encoder_metadata")
    e, eps = TOWER + "embeddings.", vision.layer_norm_eps
    embeddings = {"class_embedding": e + "class_embedding", "position_embedding": e + "position_embedding.weight"}
    hidden = g.add("patch_embed", [pixels], weight=e + "patch_embedding.weight", patch_size=vision.patch_size,
                   **embeddings)  # fmt: skip
    hidden = g.add("layernorm", [hidden], weight=TOWER + "pre_layrnorm.weight", eps=eps)
    states = [hidden]  # the tower's hidden states: the embeddings, then each layer's output
    for i in range(vision.num_layers_run):
        states.append(_encoder_layer(g, vision, i, states[-1], meta))
    features = [states[j] for j in vision.feature_layers]
    x = features[0] if len(features) == 1 else g.add("concat", features)
    if vision.drop_class:
        x = g.add("drop_class_rows", [x, meta])
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
