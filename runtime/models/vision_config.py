"""What a model's vision encoder is, as the encoder graph (encoder_graph.py) reads it: the tower's sizes, which of
its hidden states the projector reads, and the projector that maps them into the text model's embedding space.

Loaders translate a checkpoint's own settings into this one record (Hugging Face's LLaVA, Idefics3 / SmolVLM,
Gemma 3 and Gemma 4 configs: architectures/hf_vision_config.py), so the graph builder never looks at a family's
spelling. A model served text only has none (`ModelConfig.vision` is None).

The encoder reads one square picture at a time, `image_size` pixels a side: a whole image (LLaVA) or one tile of an
image cut into tiles (Idefics3, which adds the whole image shrunk to a tile), and gives it `tokens_per_image`
embeddings, one per placeholder token of a run of them in the prompt. Gemma 4's tower reads a picture at the size its
processor resized it to (its patches and their positions) and gives as many embeddings as that size pools into;
Qwen3.5's, Qwen3-VL's and Qwen2.5-VL's read a picture's patch rows and the grid they form, and give one embedding
per merged square of them (Qwen3-VL's with its DeepStack rows beside it: `embedding_width`)."""

from __future__ import annotations

from dataclasses import dataclass

_GRID_TOWERS = ("qwen3_5", "qwen2_5_vl")  # Qwen-VL's: see `takes_grids`


@dataclass(frozen=True)
class VisionConfig:
    # "clip": a ViT with a class row, learned positions and a pre-norm; "siglip": no class row, a bias on the patch
    # convolution, no pre-norm and a post-norm on the last layer's output (Idefics3's tower). Layernorms with biases.
    tower: str
    hidden_size: int
    intermediate_size: int
    num_layers: int  # the tower's layers in the checkpoint (those past the last one read are not loaded)
    num_heads: int
    num_channels: int
    patch_size: int
    image_size: int  # the square side every image is resized and cropped to (CLIP's positions are for this grid)
    layer_norm_eps: float
    activation: str  # the tower MLP's graph op: quick_gelu, gelu (erf) or gelu_tanh
    # Which of the tower's hidden states the projector reads (0: the embeddings after the pre-norm, i: layer i's
    # output), joined along features when several (LLaVA's vision_feature_layer, as indices from the front).
    feature_layers: tuple[int, ...]
    drop_class: bool  # the class row is not an image token (LLaVA's vision_feature_select_strategy "default")
    # "llava_mlp": linear_1, activation, linear_2; "pixel_shuffle": each scale_factor x scale_factor square of
    # patches joined along features (Idefics3's), then one linear without a bias; "pooled": each square of patches
    # averaged into one row of a pooled_side x pooled_side grid, RMS-normed, then one matrix (Gemma 3's soft tokens)
    projector: str
    projector_activation: str  # llava_mlp's graph op, as `activation`
    projector_bias: bool
    text_hidden_size: int  # the projector's output: the text model's embedding width
    image_token_id: int  # the placeholder id whose rows take the projected embeddings
    scale_factor: int = 1  # pixel_shuffle's square side
    pooled_side: int = 0  # pooled's rows along each side (Gemma 3: 16, from mm_tokens_per_image 256)
    # The token a prompt carries for each image before it is expanded, where it is not the image token itself
    # (Gemma 3's <start_of_image>, which the expansion keeps before the image tokens); None: image_token_id
    placeholder_token_id: int | None = None
    # Gemma 3: in a prefill, each picture's image tokens attend to one another both ways (transformers' block mask
    # over token_type_ids), not causally; so a prefill chunk never ends inside a picture's run.
    bidirectional: bool = False
    # Gemma 4's "vision" mode: only the sliding-window layers' pictures attend both ways, the full attention layers
    # stay causal (transformers' create_masks_for_vision_model)
    bidirectional_sliding_only: bool = False
    # Gemma 4's tower ("gemma4"; projector "gemma4_embedder"): a picture of any shape, cut into patches at its own size
    # (image_size unused), each patch placed by its (x, y) in two learned tables and a 2-D rope; the tower's output
    # pooled over pooling_kernel x pooling_kernel patches into soft tokens, at most max_soft_tokens a picture
    pooling_kernel: int = 0
    max_soft_tokens: int = 0
    position_embedding_size: int = 0  # rows of each of its two position tables
    rope_theta: float = 0.0
    clipped_linears: bool = False  # each tower linear clamps its input and output to stored bounds
    standardize: bool = False  # the pooled rows shifted and scaled by stored vectors (std_bias, std_scale)
    # Gemma 4: the token whose per-layer embedding an image token's row reads (transformers puts the text model's
    # pad_token_id there); None: the image token's own
    per_layer_token_id: int | None = None
    # The tokens an image's run of image tokens is wrapped in where its processor puts them (Gemma 4's <boi>, <eoi>)
    around_image: tuple[int, int] | None = None
    # Qwen3.5's tower ("qwen3_5"; projector "qwen_merger"): a picture of any shape as rows of patches, each
    # temporal_patch_size frames of patch_size^2 pixels (a linear: the Conv3d on its own patch), its learned
    # positions (a square of num_position_embeddings) interpolated to the picture's grid, a 2-D rope (rope_theta),
    # and each spatial_merge_size^2 square of patches merged into one token; at most max_soft_tokens a picture
    spatial_merge_size: int = 0
    temporal_patch_size: int = 0
    num_position_embeddings: int = 0
    # Qwen2.5-VL's tower ("qwen2_5_vl"; projector "qwen_merger"): Qwen3.5's rows and merged squares, without learned
    # positions, in RMSNorm blocks with a gated MLP; its layers attend within windows of window_size pixels a side
    # (squares of merged squares) but those in full_attention_layers, which attend over the whole picture
    window_size: int = 0
    full_attention_layers: tuple[int, ...] = ()
    # Qwen3-VL's DeepStack (its tower is Qwen3.5's, "qwen3_5", with these): the tower layers (from 0) whose outputs
    # each go through a merger of their own (its LayerNorm over the joined merge^2 rows) into the text width; the
    # i-th of them is added to the text model's hidden states at the picture's rows after decoder layer i. The
    # encoder gives each image token its main row and these side by side (`embedding_width`).
    deepstack_layers: tuple[int, ...] = ()

    @property
    def variable_tokens(self) -> bool:
        """Pictures give as many soft tokens as their shape does (Gemma 4's, Qwen-VL's), up to `tokens_per_image`."""
        return self.tower == "gemma4" or self.takes_grids

    @property
    def takes_grids(self) -> bool:
        """The tower reads a picture as rows of patches beside the grid they form (Qwen-VL's), which the rows cannot
        say: the encoder takes both."""
        return self.tower in _GRID_TOWERS

    @property
    def window_tokens(self) -> int:
        """The merged squares along each side of Qwen2.5-VL's attention windows."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @property
    def embedding_width(self) -> int:
        """The width of the encoder's row per image token: the text model's, once and once more per DeepStack layer
        (what the decoder adds after its first layers, carried beside the embedding wherever the embedding goes)."""
        return self.text_hidden_size * (1 + len(self.deepstack_layers))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_layers_run(self) -> int:
        """The tower layers the encoder runs: up to the last one whose output is read."""
        return max(self.feature_layers)

    @property
    def grid(self) -> int:
        """Patches along each side of an image."""
        return self.image_size // self.patch_size

    @property
    def class_row(self) -> bool:
        return self.tower == "clip"

    @property
    def rows_per_image(self) -> int:
        """The tower's rows per image: its patches and the class row."""
        return self.grid * self.grid + self.class_row

    @property
    def tokens_per_image(self) -> int:
        """The embeddings (placeholder tokens) an image or tile gives the text model."""
        if self.projector == "pixel_shuffle":
            return self.grid * self.grid // (self.scale_factor * self.scale_factor)
        if self.projector == "pooled":
            return self.pooled_side * self.pooled_side
        if self.variable_tokens:
            return self.max_soft_tokens  # the most: each picture's own count is its patches / pooling_kernel^2 (or
            # / spatial_merge_size^2)
        return self.rows_per_image - (1 if self.drop_class else 0)
