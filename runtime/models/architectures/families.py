"""The model families the runtime can run: one row each of what the family adds to the Llama layer, and the
lookups that find a checkpoint's row (or refuse it, naming what is supported).

Both translations (`hf_config`, `gguf_config`) start here, so a family is added in one place: its row, then the
features it sets in each translation."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sagellm.runtime.models.loaded import ModelLoadError


@dataclass(frozen=True)
class Architecture:
    name: str  # ModelConfig.architecture (Hugging Face's model_type)
    hf_classes: tuple[str, ...]  # config.json `architectures` entries
    gguf_arch: str | None  # GGUF `general.architecture`, the prefix of its metadata keys (None: written as another's)
    qkv_bias: bool = False
    # llama.cpp's converter reorders the rows of q/k of llama-arch models to suit its rope kernel (not for the others).
    gguf_qk_permuted: bool = False
    # Each layer's MLP is a router over experts. llama.cpp writes Mixtral as a "llama" GGUF with expert counts.
    moe: bool = False
    qk_norm: bool = False  # q/k RMSNorm per head (Qwen3, Gemma 3)
    # Gemma's layer: sandwich norms, GeGLU, embeddings scaled by sqrt(hidden), norm weights stored as offsets from 1.
    gemma: bool = False
    attn_softcap: bool = False  # reads attn_logit_softcapping (Gemma 2; Gemma 3 has the key and ignores it)
    # Which layers slide when the config does not list `layer_types`: every `sliding_pattern`-th layer is global, the
    # others slide (Gemma 2: 2, Gemma 3: `sliding_window_pattern`, 6 by default); 0: every layer slides.
    sliding_pattern: int = 0
    local_rope: bool = False  # sliding layers have their own unscaled rope (Gemma 3, theta 1e4 by default)
    fused_projections: bool = False  # q/k/v and gate/up stored as one tensor each (Phi-3), split at load
    # gpt-oss: biases on every attention projection, attention sinks, experts with biases and the clamped SwiGLU,
    # stored stacked per layer ([E, ...] tensors, gate and up interleaved), split into Mixtral's names at load.
    gpt_oss: bool = False
    # Qwen3.5: Gated DeltaNet layers (`layer_types` "linear_attention", every `full_attention_interval`-th layer full
    # attention), gated attention with partial rotary (a quarter of each head by default), and every RMSNorm but the
    # DeltaNet's own output norm stored as an offset from 1, like Gemma's.
    gated_delta_net: bool = False
    # llama.cpp's converter stores these Gated DeltaNet layers' value heads tiled by key head (gguf_layouts.py).
    gguf_tiled_value_heads: bool = False
    # Gemma 4: Gemma 3's layer with per-layer embeddings, the last layers attending over earlier layers' KV, full
    # attention layers with heads of their own size (and values from their keys), values normed, a scalar per
    # layer, scores unscaled (the q/k norms set their size), and norm weights stored as they are.
    gemma4: bool = False
    # Gemma 3n: Gemma 4's per-layer embeddings, shared KV and value norms (no layer scalars), with AltUp streams,
    # LAuReL and activation sparsity; its per-layer table reads row 0 for tokens beyond it.
    gemma3n: bool = False


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", ("LlamaForCausalLM",), "llama", gguf_qk_permuted=True),
    Architecture("mistral", ("MistralForCausalLM",), None),  # llama.cpp writes it as "llama" (with full attention)
    Architecture("qwen2", ("Qwen2ForCausalLM",), "qwen2", qkv_bias=True),
    Architecture("qwen3", ("Qwen3ForCausalLM",), "qwen3", qk_norm=True),
    Architecture("mixtral", ("MixtralForCausalLM",), "llama", gguf_qk_permuted=True, moe=True),
    Architecture("qwen3_moe", ("Qwen3MoeForCausalLM",), "qwen3moe", qk_norm=True, moe=True),
    Architecture("gemma2", ("Gemma2ForCausalLM",), "gemma2", gemma=True, attn_softcap=True, sliding_pattern=2),
    # Gemma 3 4B and up ship as Gemma3ForConditionalGeneration, served with its vision tower (MULTIMODAL).
    Architecture("gemma3_text", ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"), "gemma3", qk_norm=True,
                 gemma=True, sliding_pattern=6, local_rope=True),
    Architecture("gemma3n_text", ("Gemma3nForCausalLM", "Gemma3nForConditionalGeneration"), "gemma3n", qk_norm=True,
                 gemma=True, sliding_pattern=5, local_rope=True, gemma3n=True),
    # Gemma 4 ships as Gemma4ForConditionalGeneration: served with its vision tower (hf_vision_config._gemma4); its
    # audio tower is not read.
    Architecture("gemma4_text", ("Gemma4ForCausalLM", "Gemma4ForConditionalGeneration"), "gemma4", qk_norm=True,
                 gemma=True, sliding_pattern=6, local_rope=True, gemma4=True),
    Architecture("phi3", ("Phi3ForCausalLM",), "phi3", fused_projections=True),
    # llama.cpp slides gpt-oss's even layers (its GGUF does not say), as its config's layer_types do.
    Architecture("gpt_oss", ("GptOssForCausalLM",), "gpt-oss", qkv_bias=True, moe=True, sliding_pattern=2,
                 gpt_oss=True),
    # Qwen3.5 ships as Qwen3_5ForConditionalGeneration (Qwen3_5MoeForConditionalGeneration): served with its vision
    # tower (hf_vision_config._qwen3_5) unless its config.json has no vision_config (or the engine's
    # language_model_only drops it).
    Architecture("qwen3_5", ("Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration"), "qwen35", qk_norm=True,
                 gated_delta_net=True, gguf_tiled_value_heads=True),
    # Its mixture of experts: Qwen's experts (a checkpoint holds each under its own name) and a gated shared expert.
    Architecture("qwen3_5_moe", ("Qwen3_5MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration"), "qwen35moe",
                 qk_norm=True, moe=True, gated_delta_net=True, gguf_tiled_value_heads=True),
    # Qwen3.5-MoE's forerunner: its DeltaNet's q, k, v, z and b, a projections fused per key head (split at load).
    Architecture("qwen3_next", ("Qwen3NextForCausalLM",), "qwen3next", qk_norm=True, moe=True, gated_delta_net=True),
)  # fmt: skip
BY_NAME: dict[str, Architecture] = {arch.name: arch for arch in ARCHITECTURES}
# Checkpoints of a vision (or audio) encoder beside a text model of one of several families (config.json's `text_config`
# names it by model_type), by class: the families of text model each takes. (Gemma 3's image rows, like ours, take
# the place of embeddings already scaled by sqrt(hidden): transformers scatters them after its scaled embedding.)
MULTIMODAL: dict[str, tuple[str, ...]] = {
    "Gemma3ForConditionalGeneration": ("gemma3_text",),
    "LlavaForConditionalGeneration": ("llama", "mistral", "qwen2"),
    "Idefics3ForConditionalGeneration": ("llama",),
    "SmolVLMForConditionalGeneration": ("llama",),
    "Qwen2AudioForConditionalGeneration": ("qwen2",),  # an audio encoder beside the text model
    "Qwen2_5_VLForConditionalGeneration": ("qwen2",),  # its own vision tower (hf_vision_config._qwen2_5_vl)
    "Qwen3VLForConditionalGeneration": ("qwen3",),  # Qwen3.5's tower with DeepStack (hf_vision_config._qwen3_vl)
}
# A wrapper's text model where config.json nests none (LLaVA's default; hub Qwen2.5-VL configs keep its settings at
# the top level), and the model_types that name a family's layer under another name (Qwen2.5-VL's is Qwen2's,
# Qwen3-VL's Qwen3's).
_DEFAULT_TEXT_TYPE = {"Qwen2_5_VLForConditionalGeneration": "qwen2", "Qwen3VLForConditionalGeneration": "qwen3"}
_TEXT_TYPE_ROWS = {"qwen2_5_vl_text": "qwen2", "qwen3_vl_text": "qwen3"}
_SUPPORTED_HF = ", ".join([*(c for a in ARCHITECTURES for c in a.hf_classes), *MULTIMODAL])
_SUPPORTED_GGUF = ", ".join(dict.fromkeys(a.gguf_arch for a in ARCHITECTURES if a.gguf_arch))


def architecture_for_hf(hf_config: Mapping[str, Any], source: Path) -> Architecture:
    """The family row of a config.json; a multimodal class's (MULTIMODAL) is its text model's."""
    classes = hf_config.get("architectures") or []
    wrapper = next((c for c in classes if c in MULTIMODAL), None)
    if wrapper is not None:
        default = _DEFAULT_TEXT_TYPE.get(wrapper, "llama")
        text_type = (hf_config.get("text_config") or {}).get("model_type", default)
        text_type = _TEXT_TYPE_ROWS.get(text_type, text_type)
        if text_type not in MULTIMODAL[wrapper]:
            raise ModelLoadError(f"{source}: {wrapper} with a {text_type!r} text model is not supported (its text "
                                 f"model may be {', '.join(MULTIMODAL[wrapper])})")  # fmt: skip
        return BY_NAME[text_type]
    for arch in ARCHITECTURES:
        if any(c in arch.hf_classes for c in classes) or (not classes and hf_config.get("model_type") == arch.name):
            return arch
    found = ", ".join(classes) or hf_config.get("model_type") or "none given"
    raise ModelLoadError(f"{source}: unsupported architecture {found} (supported: {_SUPPORTED_HF})")


def architecture_for_gguf(gguf_arch: str | None, moe: bool, source: Path) -> Architecture:
    """`moe`: the metadata counts experts (a "llama" GGUF with experts is Mixtral)."""
    matches = [arch for arch in ARCHITECTURES if arch.gguf_arch == gguf_arch]
    if not matches:
        raise ModelLoadError(f"{source}: unsupported GGUF architecture {gguf_arch!r} (supported: {_SUPPORTED_GGUF})")
    for arch in matches:
        if arch.moe == moe or arch.gemma4:  # Gemma 4's experts (26B-A4B) are beside its MLP
            return arch
    raise ModelLoadError(f"{source}: a GGUF {gguf_arch!r} model with experts is not supported (only llama's: Mixtral)")


def check_experts(experts: int, per_token: int, keys: str, source: Path) -> None:
    """Refuse a mixture of experts whose tokens could not choose their experts (`keys`: the settings, as the file
    names them); both translations check their counts here."""
    if experts and not 1 <= per_token <= experts:
        raise ModelLoadError(f"{source}: {keys} = {experts}/{per_token}: a token must use 1 to {experts} experts")
