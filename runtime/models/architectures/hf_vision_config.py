"""The vision encoder of a multimodal config.json as a VisionConfig: LLaVA's (a CLIP tower, its two-layer projector),
Idefics3's, which SmolVLM shares (a SigLIP-style tower read per tile, a pixel shuffle and one linear), Gemma 3's
(a SigLIP tower, its patches pooled into soft tokens), Gemma 4's (its own tower on pictures of any shape, pooled
by patch positions and projected), Qwen3.5's (a ViT on pictures of any shape, its patches merged in squares),
Qwen3-VL's (the same with DeepStack's mergers) and Qwen2.5-VL's (the same with window attention).

Hub configs leave out the keys transformers defaults, so each family's defaults fill them as its config class
would; a setting the encoder graph does not implement is refused naming its key."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sagellm.runtime.models.loaded import ModelLoadError, ProcessorFiles
from sagellm.runtime.models.vision_config import VisionConfig

GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")  # transformers' names of the tanh-approximated GELU
# transformers' activation names -> the graph's ops
_VISION_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", **dict.fromkeys(GELU_TANH, "gelu_tanh"),
                       "silu": "silu"}  # fmt: skip
# transformers' CLIPVisionConfig defaults, for the keys a hub config leaves out of `vision_config`
_CLIP_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                  "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu",
                  "layer_norm_eps": 1e-5}  # fmt: skip
# LlavaConfig's tower when config.json gives none: CLIP ViT-L/14 at 336 pixels
_LLAVA_TOWER = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                "image_size": 336, "patch_size": 14}  # fmt: skip
# transformers' Idefics3VisionConfig defaults (SmolVLMVisionConfig's differ only in hidden_size and image_size, which
# every hub config gives)
_IDEFICS3_DEFAULTS = {"hidden_size": 1152, "intermediate_size": 3072, "num_hidden_layers": 12,
                      "num_attention_heads": 16, "num_channels": 3, "image_size": 224, "patch_size": 32,
                      "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}  # fmt: skip
_IDEFICS3 = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
# transformers' SiglipVisionConfig defaults (Gemma 3's tower; hub configs give its sizes: 27 layers of 1152 at 896
# pixels in 14-pixel patches)
_SIGLIP_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                    "num_channels": 3, "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh",
                    "layer_norm_eps": 1e-6}  # fmt: skip
# transformers' Gemma4VisionConfig defaults
_GEMMA4_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 16, "num_attention_heads": 12,
                    "num_key_value_heads": 12, "head_dim": 64, "hidden_activation": "gelu_pytorch_tanh",
                    "rms_norm_eps": 1e-6, "pooling_kernel_size": 3, "patch_size": 16,
                    "position_embedding_size": 10 * 1024, "use_clipped_linears": False, "standardize": False,
                    "rope_parameters": None}  # fmt: skip
GEMMA4_MAX_SOFT_TOKENS = 1120  # the most Gemma4ImageProcessor's max_soft_tokens may be (70, 140, 280, 560, 1120)
GEMMA4_DEFAULT_SOFT_TOKENS = 280  # its default
# transformers' Qwen3_5VisionConfig defaults (Qwen3_5MoeVisionConfig's are the same)
_QWEN3_5_DEFAULTS = {"depth": 27, "hidden_size": 1152, "hidden_act": "gelu_pytorch_tanh", "intermediate_size": 4304,
                     "num_heads": 16, "in_channels": 3, "patch_size": 16, "spatial_merge_size": 2,
                     "temporal_patch_size": 2, "out_hidden_size": 3584, "num_position_embeddings": 2304,
                     "rope_parameters": None}  # fmt: skip
_QWEN3_5 = ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration")
# transformers' Qwen3VLVisionConfig defaults: Qwen3.5's and the tower layers DeepStack reads
_QWEN3_VL_DEFAULTS = _QWEN3_5_DEFAULTS | {"deepstack_visual_indexes": (8, 16, 24)}
# transformers' Qwen2_5_VLVisionConfig defaults (hub configs give the sizes, spelling in_channels `in_chans`)
_QWEN2_5_VL_DEFAULTS = {"depth": 32, "hidden_size": 3584, "hidden_act": "silu", "intermediate_size": 3420,
                        "num_heads": 16, "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2,
                        "temporal_patch_size": 2, "window_size": 112, "out_hidden_size": 3584,
                        "fullatt_block_indexes": (7, 15, 23, 31), "rope_parameters": None}  # fmt: skip
QWEN2_VL_MAX_PIXELS = 28 * 28 * 1280  # Qwen2VLImageProcessor's default max_pixels, where a checkpoint gives none
QWEN_VL_MAX_PIXELS = 16_777_216  # Qwen3.5's preprocessor_config.json's size.longest_edge, where a checkpoint has none
QWEN_VL_LAYER_NORM_EPS = 1e-6  # its tower's and merger's LayerNorms (fixed in transformers, not in the config)


def vision_from_hf(
    hf_config: Mapping[str, Any], text_hidden_size: int, source: Path = Path("config.json")
) -> VisionConfig | None:
    """The vision encoder of a LLaVA, Idefics3, SmolVLM, Gemma 3, Gemma 4, Qwen3.5, Qwen3-VL or Qwen2.5-VL
    config.json, None for a checkpoint served text only (every other class; a Gemma 4 or Qwen3.5 without a
    vision_config; any, with the engine's language_model_only, which drops it). `text_hidden_size`: its text model's
    width."""
    classes = hf_config.get("architectures") or []
    if "LlavaForConditionalGeneration" in classes:
        return _llava(hf_config, text_hidden_size, source)
    if any(c in _IDEFICS3 for c in classes):
        return _idefics3(hf_config, text_hidden_size, source)
    if "Gemma3ForConditionalGeneration" in classes:
        return _gemma3(hf_config, text_hidden_size, source)
    if "Gemma4ForConditionalGeneration" in classes and hf_config.get("vision_config") is not None:
        return _gemma4(hf_config, text_hidden_size, source)
    if any(c in _QWEN3_5 for c in classes) and hf_config.get("vision_config") is not None:
        return _qwen3_5(hf_config, text_hidden_size, source)
    if "Qwen2_5_VLForConditionalGeneration" in classes:
        return _qwen2_5_vl(hf_config, text_hidden_size, source)
    if "Qwen3VLForConditionalGeneration" in classes:
        return _qwen3_vl(hf_config, text_hidden_size, source)
    return None


def _llava(hf_config: Mapping[str, Any], text_hidden_size: int, source: Path) -> VisionConfig:
    given = hf_config.get("vision_config")
    tower = _CLIP_DEFAULTS | (_LLAVA_TOWER if given is None else _given(given))
    if tower.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ModelLoadError(f"{source}: vision_config.model_type {tower['model_type']!r} is not supported (LLaVA's "
                             "tower: clip_vision_model)")  # fmt: skip
    layers = int(tower["num_hidden_layers"])
    given_layer = hf_config.get("vision_feature_layer", -2)
    chosen = given_layer if isinstance(given_layer, list) else [given_layer]
    feature_layers = tuple(int(j) + (layers + 1 if int(j) < 0 else 0) for j in chosen)  # of layers + 1 states
    if not chosen or not all(0 <= j <= layers for j in feature_layers):
        raise ModelLoadError(f"{source}: vision_feature_layer {given_layer!r} names no hidden state of the "
                             f"{layers}-layer vision tower")  # fmt: skip
    strategy = hf_config.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ModelLoadError(f"{source}: vision_feature_select_strategy {strategy!r} is not 'default' or 'full'")
    return VisionConfig(
        tower="clip",
        **_tower_sizes(tower, source),
        feature_layers=feature_layers,
        drop_class=strategy == "default",
        projector="llava_mlp",
        projector_activation=_activation(hf_config.get("projector_hidden_act", "gelu"), "projector_hidden_act", source),
        projector_bias=bool(hf_config.get("multimodal_projector_bias", True)),
        text_hidden_size=text_hidden_size,
        image_token_id=int(hf_config.get("image_token_index", hf_config.get("image_token_id", 32000))),
    )


def _idefics3(hf_config: Mapping[str, Any], text_hidden_size: int, source: Path) -> VisionConfig:
    """Its tower's last hidden state, post-normed, each scale_factor x scale_factor square of patches joined
    (Idefics3Connector.pixel_shuffle) and projected by one linear without a bias."""
    tower = _IDEFICS3_DEFAULTS | _given(hf_config.get("vision_config") or {})
    sizes = _tower_sizes(tower, source)
    scale = int(hf_config.get("scale_factor", 2))
    grid = sizes["image_size"] // sizes["patch_size"]
    if scale < 1 or grid % scale:
        raise ModelLoadError(f"{source}: scale_factor {scale} does not divide the tower's {grid} x {grid} patches")
    return VisionConfig(
        tower="siglip",
        **sizes,
        feature_layers=(sizes["num_layers"],),
        drop_class=False,
        projector="pixel_shuffle",
        projector_activation="",
        projector_bias=False,
        text_hidden_size=text_hidden_size,
        image_token_id=int(hf_config.get("image_token_id", 128257)),
        scale_factor=scale,
    )


def _gemma3(hf_config: Mapping[str, Any], text_hidden_size: int, source: Path) -> VisionConfig:
    """A SigLIP tower's post-normed last hidden state, each square of patches averaged into one of
    mm_tokens_per_image soft tokens, RMS-normed and projected (Gemma3MultiModalProjector); the prompt's
    <start_of_image> expanded around them, which attend to each other both ways in a prefill."""
    tower = _SIGLIP_DEFAULTS | _given(hf_config.get("vision_config") or {})
    sizes = _tower_sizes(tower, source)
    grid = sizes["image_size"] // sizes["patch_size"]
    tokens = int(hf_config.get("mm_tokens_per_image", 256))
    side = math.isqrt(tokens)
    if side * side != tokens or grid % side:
        raise ModelLoadError(f"{source}: mm_tokens_per_image {tokens} is not a square whose side divides the tower's "
                             f"{grid} x {grid} patches")  # fmt: skip
    return VisionConfig(
        tower="siglip",
        **sizes,
        feature_layers=(sizes["num_layers"],),
        drop_class=False,
        projector="pooled",
        projector_activation="",
        projector_bias=False,
        text_hidden_size=text_hidden_size,
        image_token_id=int(hf_config.get("image_token_index", 262_144)),
        pooled_side=side,
        placeholder_token_id=int(hf_config.get("boi_token_index", 255_999)),
        bidirectional=True,
    )


def _gemma4(hf_config: Mapping[str, Any], text_hidden_size: int, source: Path) -> VisionConfig:
    """Gemma 4's tower (Gemma4VisionModel: patches placed by learned (x, y) rows and a 2-D rope, q/k/v RMS-normed,
    four norms a layer, pooled by patch positions and scaled by sqrt(hidden)) and its embedder (an RMSNorm without a
    scale, one linear). The prompt's image token becomes <boi>, a picture's soft tokens, <eoi>; they attend causally
    (use_bidirectional_attention null: E2B, E4B), or both ways in the sliding layers alone ("vision": 26B-A4B, 31B).
    A picture gives at most the image processor's max_soft_tokens (its preprocessor_config.json beside `source`)."""
    tower = _GEMMA4_DEFAULTS | _given(hf_config["vision_config"])
    text = hf_config.get("text_config") or {}
    both_ways = text.get("use_bidirectional_attention")
    if both_ways not in (None, "vision"):
        raise ModelLoadError(f"{source}: text_config.use_bidirectional_attention {both_ways!r} is not supported")
    heads, head_dim, hidden = int(tower["num_attention_heads"]), int(tower["head_dim"]), int(tower["hidden_size"])
    if int(tower["num_key_value_heads"]) != heads or heads * head_dim != hidden:
        raise ModelLoadError(f"{source}: vision_config: a tower of {heads} heads of {head_dim} over {hidden} with "
                             f"{tower['num_key_value_heads']} KV heads; we run heads * head_dim == hidden_size, one "
                             "KV head per head")  # fmt: skip
    rope = tower["rope_parameters"] or {}
    if rope.get("rope_type", "axial") != "axial":
        raise ModelLoadError(f"{source}: vision_config.rope_parameters.rope_type {rope['rope_type']!r}: the tower "
                             "takes axial rope only")  # fmt: skip
    return VisionConfig(
        tower="gemma4",
        hidden_size=hidden,
        intermediate_size=int(tower["intermediate_size"]),
        num_layers=int(tower["num_hidden_layers"]),
        num_heads=heads,
        num_channels=3,
        patch_size=int(tower["patch_size"]),
        image_size=0,
        layer_norm_eps=float(tower["rms_norm_eps"]),
        activation=_activation(tower["hidden_activation"], "vision_config.hidden_activation", source),
        feature_layers=(int(tower["num_hidden_layers"]),),
        drop_class=False,
        projector="gemma4_embedder",
        projector_activation="",
        projector_bias=False,
        text_hidden_size=text_hidden_size,
        image_token_id=int(hf_config.get("image_token_id", 258_880)),
        pooling_kernel=int(tower["pooling_kernel_size"]),
        max_soft_tokens=_gemma4_max_soft_tokens(source),
        position_embedding_size=int(tower["position_embedding_size"]),
        rope_theta=float(rope.get("rope_theta", 100.0)),
        clipped_linears=bool(tower["use_clipped_linears"]),
        standardize=bool(tower["standardize"]),
        per_layer_token_id=_per_layer_token(text),
        around_image=(int(hf_config.get("boi_token_id", 255_999)), int(hf_config.get("eoi_token_id", 258_882))),
        bidirectional=both_ways == "vision",
        bidirectional_sliding_only=both_ways == "vision",
    )


def _gemma4_max_soft_tokens(source: Path) -> int:
    """The most soft tokens a picture gives: the image processor's max_soft_tokens (preprocessor_config.json, or
    processor_config.json's image_processor, beside config.json; 280, its default, where they leave it out), or the
    most any may say where there is neither."""
    files = ProcessorFiles.read(source.parent)
    for settings in (files.preprocessor, files.processor.get("image_processor") or {}):
        if settings.get("max_soft_tokens") is not None:
            return int(settings["max_soft_tokens"])
        if settings.get("image_processor_type"):
            return GEMMA4_DEFAULT_SOFT_TOKENS
    return GEMMA4_MAX_SOFT_TOKENS


def _per_layer_token(text: Mapping[str, Any]) -> int | None:
    """The token whose per-layer embedding Gemma 4 reads at an image's rows (transformers' pad_token_id, 0 by
    default); None for a text model without per-layer embeddings (26B-A4B, 31B)."""
    if not text.get("hidden_size_per_layer_input", 256):
        return None
    return int(text.get("pad_token_id") or 0)


def _qwen3_5(hf_config: Mapping[str, Any], text_hidden_size: int, source: Path) -> VisionConfig:
    """Qwen3.5's tower (Qwen3_5VisionModel: patches of temporal_patch_size frames embedded by a Conv3d, learned
    positions interpolated to the picture's grid, a 2-D rope, LayerNorm blocks with a fused qkv and an MLP) and its
    merger (a LayerNorm, then each spatial_merge_size^2 square of patches joined and through two linears with a GELU
    between) into the text model's width. The prompt's <|image_pad|> becomes one per merged square; a picture gives
    at most what the image processor's largest size does (its preprocessor_config.json beside `source`)."""
    tower = _QWEN3_5_DEFAULTS | _given(hf_config["vision_config"])
    return VisionConfig(
        tower="qwen3_5",
        **_qwen_vl_tower(tower, text_hidden_size, source, QWEN_VL_MAX_PIXELS),
        image_token_id=int(hf_config.get("image_token_id", 248_056)),
        num_position_embeddings=int(tower["num_position_embeddings"]),
    )


def _qwen3_vl(hf_config: Mapping[str, Any], text_hidden_size: int, source: Path) -> VisionConfig:
    """Qwen3-VL's tower (Qwen3VLVisionModel: Qwen3.5's, which took it whole) with DeepStack: the outputs of the
    layers deepstack_visual_indexes names each through a merger of their own (deepstack_merger_list: the LayerNorm
    over the joined merge^2 rows), added to the text model's hidden states after its first layers."""
    tower = _QWEN3_VL_DEFAULTS | _given(hf_config.get("vision_config") or {})
    common = _qwen_vl_tower(tower, text_hidden_size, source, QWEN_VL_MAX_PIXELS)
    deepstack = tuple(int(i) for i in tower["deepstack_visual_indexes"])
    if not all(0 <= i < common["num_layers"] for i in deepstack):
        raise ModelLoadError(f"{source}: vision_config.deepstack_visual_indexes {list(deepstack)} names no layer of "
                             f"the {common['num_layers']}-layer tower")  # fmt: skip
    return VisionConfig(
        tower="qwen3_5",
        **common,
        image_token_id=int(hf_config.get("image_token_id", 151_655)),
        num_position_embeddings=int(tower["num_position_embeddings"]),
        deepstack_layers=deepstack,
    )


def _qwen2_5_vl(hf_config: Mapping[str, Any], text_hidden_size: int, source: Path) -> VisionConfig:
    """Qwen2.5-VL's tower (Qwen2_5_VisionTransformerPretrainedModel: Qwen3.5's without a bias on its Conv3d nor
    learned positions, in RMSNorm blocks with a gated MLP, attending within windows of window_size pixels but in
    fullatt_block_indexes' layers) and its merger (Qwen3.5's with an RMSNorm). A picture gives at most what the image
    processor's max_pixels does (its preprocessor_config.json beside `source`, else Qwen2VLImageProcessor's
    default)."""
    given = _given(hf_config.get("vision_config") or {})
    if "in_chans" in given:  # the hub's spelling
        given.setdefault("in_channels", given.pop("in_chans"))
    tower = _QWEN2_5_VL_DEFAULTS | given
    common = _qwen_vl_tower(tower, text_hidden_size, source, QWEN2_VL_MAX_PIXELS)
    square, depth = common["spatial_merge_size"] * common["patch_size"], common["num_layers"]
    window, full = int(tower["window_size"]), tuple(int(i) for i in tower["fullatt_block_indexes"])
    if window < square or window % square:
        raise ModelLoadError(f"{source}: vision_config.window_size {window} is not a multiple of the tower's merged "
                             f"squares of {square} pixels")  # fmt: skip
    if not all(0 <= i < depth for i in full):
        raise ModelLoadError(f"{source}: vision_config.fullatt_block_indexes {list(full)} names no layer of the "
                             f"{depth}-layer tower")  # fmt: skip
    return VisionConfig(
        tower="qwen2_5_vl",
        **common,
        image_token_id=int(hf_config.get("image_token_id", 151_655)),
        window_size=window,
        full_attention_layers=full,
    )


def _qwen_vl_tower(
    tower: Mapping[str, Any], text_hidden_size: int, source: Path, default_pixels: int
) -> dict[str, Any]:
    """The VisionConfig fields Qwen-VL's `vision_config`s give alike (Qwen3.5's, Qwen2.5-VL's): the tower's sizes, its
    2-D rope, its merger of spatial_merge_size^2 squares into the text model's width, and the most tokens a picture
    gives (`_qwen_vl_max_tokens`)."""
    hidden, heads, out = int(tower["hidden_size"]), int(tower["num_heads"]), int(tower["out_hidden_size"])
    patch, temporal = tower["patch_size"], tower["temporal_patch_size"]
    if not isinstance(patch, int) or not isinstance(temporal, int):
        raise ModelLoadError(f"{source}: vision_config: patch_size {patch!r} and temporal_patch_size {temporal!r} "
                             "must be single numbers (the tower's patches are square)")  # fmt: skip
    if hidden % heads or (hidden // heads) % 4:
        raise ModelLoadError(f"{source}: vision_config: {heads} heads over {hidden}: each head's width must divide "
                             "into four (its 2-D rope turns a quarter of it by each axis, twice)")  # fmt: skip
    if out != text_hidden_size:
        raise ModelLoadError(f"{source}: vision_config.out_hidden_size {out} is not the text model's width "
                             f"{text_hidden_size}")  # fmt: skip
    rope = tower["rope_parameters"] or {}
    if rope.get("rope_type", "axial") != "axial":
        raise ModelLoadError(f"{source}: vision_config.rope_parameters.rope_type {rope['rope_type']!r}: the tower "
                             "takes axial rope only")  # fmt: skip
    merge, depth = int(tower["spatial_merge_size"]), int(tower["depth"])
    return dict(
        hidden_size=hidden,
        intermediate_size=int(tower["intermediate_size"]),
        num_layers=depth,
        num_heads=heads,
        num_channels=int(tower["in_channels"]),
        patch_size=patch,
        image_size=0,
        layer_norm_eps=QWEN_VL_LAYER_NORM_EPS,
        activation=_activation(tower["hidden_act"], "vision_config.hidden_act", source),
        feature_layers=(depth,),
        drop_class=False,
        projector="qwen_merger",
        projector_activation="gelu",
        projector_bias=True,
        text_hidden_size=out,
        max_soft_tokens=_qwen_vl_max_tokens(source, patch * merge, default_pixels),
        rope_theta=float(rope.get("rope_theta", 10_000.0)),
        spatial_merge_size=merge,
        temporal_patch_size=temporal,
    )


def _qwen_vl_max_tokens(source: Path, factor: int, default_pixels: int) -> int:
    """The most image tokens a picture gives: the image processor's largest area (max_pixels, or size's longest_edge,
    in preprocessor_config.json or processor_config.json's image_processor beside config.json) in squares of `factor`
    (patch_size * merge_size) pixels; `default_pixels`' (the processor's default) where neither says."""
    files = ProcessorFiles.read(source.parent)
    for settings in (files.preprocessor, files.processor.get("image_processor") or {}):
        largest = settings.get("max_pixels") or (settings.get("size") or {}).get("longest_edge")
        if largest:
            return int(largest) // factor**2
    return default_pixels // factor**2


def _given(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if v is not None}


def _tower_sizes(tower: Mapping[str, Any], source: Path) -> dict[str, Any]:
    """The VisionConfig fields a `vision_config` gives alike in every family."""
    return dict(
        hidden_size=int(tower["hidden_size"]),
        intermediate_size=int(tower["intermediate_size"]),
        num_layers=int(tower["num_hidden_layers"]),
        num_heads=int(tower["num_attention_heads"]),
        num_channels=int(tower["num_channels"]),
        patch_size=int(tower["patch_size"]),
        image_size=int(tower["image_size"]),
        layer_norm_eps=float(tower["layer_norm_eps"]),
        activation=_activation(tower["hidden_act"], "vision_config.hidden_act", source),
    )


def _activation(name: str, key: str, source: Path) -> str:
    if name not in _VISION_ACTIVATIONS:
        raise ModelLoadError(f"{source}: {key} {name!r} is not supported (have {', '.join(_VISION_ACTIVATIONS)})")
    return _VISION_ACTIVATIONS[name]
