"""What a model's vision encoder is, as the encoder graph (encoder_graph.py) reads it: the tower's sizes, which of
its hidden states the projector reads, and the projector that maps them into the text model's embedding space.

Loaders translate a checkpoint's own settings into this one record (Hugging Face's LLaVA, Idefics3 / SmolVLM and
Gemma 3 configs: architectures/hf_vision_config.py), so the graph builder never looks at a family's spelling. A model
served text only has none (`ModelConfig.vision` is None).

The encoder reads one square picture at a time, `image_size` pixels a side: a whole image (LLaVA) or one tile of an
image cut into tiles (Idefics3, which adds the whole image shrunk to a tile), and gives it `tokens_per_image`
embeddings, one per placeholder token of a run of them in the prompt."""

from __future__ import annotations

from dataclasses import dataclass


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
        return self.rows_per_image - (1 if self.drop_class else 0)
