"""Tiny random models on disk for tests: Hugging Face directories (safetensors + a real byte-level BPE tokenizer
with a chat template) and GGUF files holding the same weights, written the way llama.cpp's converter writes them.

Everything is built offline and deterministically (fixed seeds); a model is a few hundred KB. Import it from any
test directory as `from tests.tiny_models import make_tiny_llama, make_tiny_qwen2, write_tiny_gguf` (and
`make_tiny_mixtral`, a mixture of experts)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, TokenType
from safetensors.numpy import load_file
from safetensors.torch import save_file as save_torch_file

from sagellm.benchmarks.kquant_pack import q4_k_m_type
from sagellm.benchmarks.kquant_pack import quantize as quantize_blocks
from sagellm.runtime.models.architectures.checkpoint_names import expert_parts, fused_parts
from sagellm.runtime.models.config import ModelConfig

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2: bos, turn start, eos
BOS_ID, EOS_ID = 0, 2
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today? I am fine, thank you.",
    "sageLLM serves language models as a dataflow pipeline of streaming operators.",
    "A tokenizer splits text into tokens; the model predicts the next token.",
    "user assistant system: what is the capital of France? Paris is the capital.",
    "Numbers like 12345 and 67890 and symbols like + - * / = appear in text.",
]

_LLAMA_DEFAULTS: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
)


def tiny_model_config(**changes: Any) -> ModelConfig:
    """A small Llama-shaped `ModelConfig` for tests that need only its shapes (KV caches, model graphs), no weights."""
    values: dict[str, Any] = dict(
        architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
        num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128,
        tie_word_embeddings=True,
    )  # fmt: skip
    return ModelConfig(**{**values, **changes})


def make_tokenizer():
    """A byte-level BPE tokenizer trained on a few sentences, with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(_CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=SPECIAL_TOKENS[BOS_ID], eos_token=SPECIAL_TOKENS[EOS_ID]
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_llama(directory: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a random tiny LlamaForCausalLM (+ tokenizer) to `directory`; `overrides` go to LlamaConfig."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _save_model(Path(directory), LlamaConfig, LlamaForCausalLM, seed, overrides)


def make_tiny_qwen2(directory: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a random tiny Qwen2ForCausalLM (+ tokenizer, tied embeddings by default) to `directory`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _save_model(Path(directory), Qwen2Config, Qwen2ForCausalLM, seed, {"tie_word_embeddings": True} | overrides)


def make_tiny_mixtral(directory: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a random tiny MixtralForCausalLM (+ tokenizer) to `directory`: 4 experts per layer, 2 used per token."""
    from transformers import MixtralConfig, MixtralForCausalLM

    experts = {"num_local_experts": 4, "num_experts_per_tok": 2}
    return _save_model(Path(directory), MixtralConfig, MixtralForCausalLM, seed, experts | overrides)


def make_tiny_qwen3(directory: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a random tiny Qwen3ForCausalLM (q/k norms; tied embeddings by default) to `directory`."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    defaults = {"head_dim": 16, "tie_word_embeddings": True}
    return _save_model(Path(directory), Qwen3Config, Qwen3ForCausalLM, seed, defaults | overrides)


def make_tiny_qwen3_moe(directory: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a random tiny Qwen3MoeForCausalLM to `directory`: q/k norms, 4 experts of 32 per layer, 2 used per token,
    their weights renormalized (norm_topk_prob, as Qwen3-30B-A3B sets it)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    defaults = dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                    tie_word_embeddings=True)  # fmt: skip
    return _save_model(Path(directory), Qwen3MoeConfig, Qwen3MoeForCausalLM, seed, defaults | overrides)


def make_tiny_mistral(directory: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a random tiny MistralForCausalLM (every layer sliding over 8 positions by default) to `directory`."""
    from transformers import MistralConfig, MistralForCausalLM

    defaults = {"head_dim": 16, "sliding_window": 8}
    return _save_model(Path(directory), MistralConfig, MistralForCausalLM, seed, defaults | overrides)


def make_tiny_gemma2(directory: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a random tiny Gemma2ForCausalLM: GeGLU, sandwich norms, soft-capped scores and logits, even layers
    sliding over 8 positions. The caps are small so that they change the logits of tiny random weights."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    defaults = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8, attn_logit_softcapping=0.1,
                    final_logit_softcapping=0.3, num_hidden_layers=4, tie_word_embeddings=True)  # fmt: skip
    return _save_model(Path(directory), Gemma2Config, Gemma2ForCausalLM, seed, defaults | overrides)


def make_tiny_gemma3(directory: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a random tiny Gemma3ForCausalLM (text): Gemma 2's layer with q/k norms and no score cap; two of every
    three layers slide over 8 positions with their own rope (theta 1e4), the third turns by theta 1e6 scaled 8x."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}  # fmt: skip
    defaults = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8, num_hidden_layers=6,
                    sliding_window_pattern=3, final_logit_softcapping=0.3, rope_parameters=rope,
                    tie_word_embeddings=True)  # fmt: skip
    return _save_model(Path(directory), Gemma3TextConfig, Gemma3ForCausalLM, seed, defaults | overrides)


def make_tiny_phi3(directory: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a random tiny Phi3ForCausalLM: fused qkv and gate_up projections, rope on 3/4 of each head, LongRoPE
    (an original context of 32 positions; the short factors serve up to it, the long ones beyond)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    g = torch.Generator().manual_seed(seed + 1)
    factors = {name: (1 + 3 * torch.rand(6, generator=g)).tolist() for name in ("short_factor", "long_factor")}
    rope = {"rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.75, **factors}
    defaults = dict(rope_parameters=rope, original_max_position_embeddings=32, max_position_embeddings=256,
                    pad_token_id=EOS_ID)  # fmt: skip
    return _save_model(Path(directory), Phi3Config, Phi3ForCausalLM, seed, defaults | overrides)


def make_tiny_gpt_oss(directory: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a random tiny GptOssForCausalLM: biases on every attention projection, attention sinks, even layers
    sliding over 8 positions, YaRN (4x over an original 64 positions), 4 experts per layer with biases and the
    clamped SwiGLU, 2 used per token, stored stacked as gpt-oss ships them. The experts' gate_up weights are large
    enough that the clamp (at gpt-oss's 7, which GGUF files do not record) cuts many of their activations."""
    from transformers import GptOssConfig, GptOssForCausalLM

    rope = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "original_max_position_embeddings": 64,
            "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}  # fmt: skip
    defaults = dict(head_dim=16, sliding_window=8, num_hidden_layers=4, num_local_experts=4, num_experts_per_tok=2,
                    intermediate_size=64, rope_parameters=rope, initializer_range=0.1)  # fmt: skip

    def widen_gate_up(model: Any) -> None:
        for layer in model.model.layers:
            layer.mlp.experts.gate_up_proj.data.mul_(8.0)

    return _save_model(Path(directory), GptOssConfig, GptOssForCausalLM, seed, defaults | overrides, widen_gate_up)


def make_tiny_gemma4(directory: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a random tiny Gemma4ForCausalLM (text), shaped like Gemma 4 E2B: two of every three layers slide over 8
    positions; the full attention layers have heads twice as large, one KV head, values from their keys and
    proportional rope (a quarter of the frequencies turn); per-layer embeddings of 8; the last two layers attend
    over earlier layers' KV, with double-wide MLPs; learned layer scalars; norm weights stored as they are."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    rope = {"full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}  # fmt: skip
    layer_types = ["sliding_attention", "sliding_attention", "full_attention"] * 2
    defaults = dict(head_dim=16, global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
                    sliding_window=8, num_hidden_layers=6, layer_types=layer_types, hidden_size_per_layer_input=8,
                    vocab_size_per_layer_input=len(make_tokenizer()), num_kv_shared_layers=2,
                    use_double_wide_mlp=True, final_logit_softcapping=30.0, rope_parameters=rope,
                    initializer_range=0.1, tie_word_embeddings=True)  # fmt: skip

    def random_scales(model: Any) -> None:
        for layer in model.model.layers:
            layer.layer_scalar.uniform_(0.5, 1.5)
            if hasattr(layer, "router"):  # the mixture's routing norm and per-expert scales
                layer.router.scale.uniform_(0.5, 1.5)
                layer.router.per_expert_scale.uniform_(0.5, 1.5)

    return _save_model(Path(directory), Gemma4TextConfig, Gemma4ForCausalLM, seed, defaults | overrides,
                       random_scales)  # fmt: skip


def make_tiny_gemma4_moe(directory: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a random tiny Gemma 4 shaped like its 26B-A4B: four layers (sliding, full, in turn), no per-layer
    embeddings or shared KV, and beside each dense MLP 4 experts of 32, 2 per token, routed from their own norm of
    the stream with per-expert scales."""
    defaults = dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32,
                    hidden_size_per_layer_input=0, num_kv_shared_layers=0, use_double_wide_mlp=False,
                    num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2)  # fmt: skip
    return make_tiny_gemma4(directory, seed, **(defaults | overrides))


def make_tiny_gemma3n(directory: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a random tiny Gemma3nForCausalLM (text), shaped like Gemma 3n E2B: 4 AltUp streams, a LAuReL branch of
    rank 8, per-layer embeddings of 8 from a table shorter than the vocabulary (the other tokens read row 0), two
    of every three layers sliding over 8 positions, the last two attending over earlier layers' KV, MLP widths per
    layer, and the first two layers' gates cut to their top 5% (activation sparsity)."""
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    rope = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}  # fmt: skip
    defaults = dict(head_dim=16, sliding_window=8, num_hidden_layers=6, layer_types=["sliding_attention",
                    "sliding_attention", "full_attention"] * 2, intermediate_size=[128, 128, 96, 96, 128, 128],
                    activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0, 0.0, 0.0], hidden_size_per_layer_input=8,
                    vocab_size_per_layer_input=200, num_kv_shared_layers=2, laurel_rank=8, altup_num_inputs=4,
                    final_logit_softcapping=30.0, rope_parameters=rope, initializer_range=0.1,
                    tie_word_embeddings=True)  # fmt: skip

    def random_altup(model: Any) -> None:
        for layer in model.model.layers:
            layer.altup.correct_output_scale.uniform_(0.5, 1.5)
            layer.altup.correction_coefs.weight.normal_(0.0, 0.1)
            layer.altup.prediction_coefs.weight.normal_(0.0, 0.1)

    return _save_model(Path(directory), Gemma3nTextConfig, Gemma3nForCausalLM, seed, defaults | overrides,
                       random_altup)  # fmt: skip


def make_tiny_qwen3_5(directory: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a random tiny Qwen3_5ForCausalLM: Gated DeltaNet layers (2 key heads, 4 value heads) alternating with
    gated attention layers (partial rotary at the default quarter of a head), norms stored as offsets from 1."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    defaults = dict(head_dim=16, num_hidden_layers=4, full_attention_interval=2, linear_num_key_heads=2,
                    linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                    initializer_range=0.1)  # fmt: skip
    return _save_model(Path(directory), Qwen3_5TextConfig, Qwen3_5ForCausalLM, seed, defaults | overrides)


def make_tiny_qwen3_5_moe(directory: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a random tiny Qwen3_5MoeForCausalLM: make_tiny_qwen3_5's layers with 4 experts (2 used per token; saved
    each under its own name, as the hub's checkpoints are) and a gated shared expert in each MLP."""
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    defaults = dict(head_dim=16, num_hidden_layers=4, full_attention_interval=2, linear_num_key_heads=2,
                    linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16, num_experts=4,
                    num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                    initializer_range=0.1)  # fmt: skip
    return _save_model(Path(directory), Qwen3_5MoeTextConfig, Qwen3_5MoeForCausalLM, seed, defaults | overrides)


def make_tiny_qwen3_next(directory: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a random tiny Qwen3NextForCausalLM: make_tiny_qwen3_5_moe's model with its DeltaNet projections fused
    per key head (in_proj_qkvz, in_proj_ba)."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    defaults = dict(head_dim=16, num_hidden_layers=4, full_attention_interval=2, linear_num_key_heads=2,
                    linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16, num_experts=4,
                    num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                    initializer_range=0.1)  # fmt: skip
    return _save_model(Path(directory), Qwen3NextConfig, Qwen3NextForCausalLM, seed, defaults | overrides)


def make_tiny_gpt_oss_mxfp4(directory: str | Path, seed: int = 0) -> Path:
    """make_tiny_gpt_oss's model as gpt-oss ships: its experts in MXFP4 (`*_blocks` [E, out, in / 32, 16] and
    `*_scales` [E, out, in / 32], quantized by gguf-py's MXFP4, so a GGUF of the same model holds the same values)
    and a `quantization_config` saying so, which transformers reads (dequantizing on the CPU)."""
    directory = make_tiny_gpt_oss(directory, seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, values in load_file(directory / "model.safetensors").items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, in, out]: packed as [E, out, in]
            blocks, scales = hf_mxfp4(np.ascontiguousarray(values.transpose(0, 2, 1)))
            tensors |= {f"{name}_blocks": torch.from_numpy(blocks), f"{name}_scales": torch.from_numpy(scales)}
        else:
            tensors[name] = torch.from_numpy(values)
    save_torch_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def hf_mxfp4(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float weights [..., out, in] as Hugging Face's MXFP4 (blocks uint8 [..., out, in / 32, 16]: input 2j in byte
    j's low nibble, 2j + 1 in its high one; scales [..., out, in / 32]), from gguf-py's quantization (ggml's
    block: exponent byte, then input j low and j + 16 high)."""
    ggml = quantize(values.astype(np.float32), GGMLQuantizationType.MXFP4)
    ggml = ggml.reshape(*values.shape[:-1], -1, 17)  # [..., out, B, 17]
    scales, qs = ggml[..., 0], ggml[..., 1:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # [..., B, 32] in input order
    return np.ascontiguousarray(codes[..., 0::2] | (codes[..., 1::2] << 4)), np.ascontiguousarray(scales)


def _save_model(
    directory: Path, config_class: type, model_class: type, seed: int, overrides: dict, adjust: Any = None
) -> Path:
    """`adjust(model)`: a family's own change to its random weights, before they are made distinct and saved."""
    tokenizer = make_tokenizer()
    config = config_class(**(_LLAMA_DEFAULTS | {"vocab_size": len(tokenizer)} | overrides))
    torch.manual_seed(seed)
    model = model_class(config).eval()
    if adjust is not None:
        with torch.no_grad():
            adjust(model)
    return _randomize_and_save(directory, model, tokenizer)


def _randomize_and_save(directory: Path, model: Any, tokenizer: Any) -> Path:
    with torch.no_grad():  # HF initializes norms to 1 and biases to 0; make every tensor distinct and checkable
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
            elif name.endswith(("mlp.gate.weight", "mlp.router.weight")):  # a MoE router: decisive choices, not
                param.copy_(0.5 * torch.randn_like(param))  # near ties of tiny logits
            elif name.endswith("self_attn.sinks"):  # gpt-oss's sinks, as large as the scores they compete with
                param.copy_(torch.randn_like(param))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# ----------------------------------------------------------------------------------------------------------- GGUF

_GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
    "block_sparse_moe.experts.w1.weight": "ffn_gate_exps.weight",  # a layer's experts stacked: [E, out, in]
    "block_sparse_moe.experts.w3.weight": "ffn_up_exps.weight",
    "block_sparse_moe.experts.w2.weight": "ffn_down_exps.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.qkv_proj.weight": "attn_qkv.weight",  # Phi-3's fused projections
    "mlp.gate_up_proj.weight": "ffn_up.weight",
    "self_attn.o_proj.bias": "attn_output.bias",  # gpt-oss's
    "self_attn.sinks": "attn_sinks.weight",
    "block_sparse_moe.gate.bias": "ffn_gate_inp.bias",
    "block_sparse_moe.experts.w1.bias": "ffn_gate_exps.bias",
    "block_sparse_moe.experts.w3.bias": "ffn_up_exps.bias",
    "block_sparse_moe.experts.w2.bias": "ffn_down_exps.bias",
}
_GGUF_GEMMA = {  # Gemma's sandwich norms: its HF post_attention_layernorm follows attention, not precedes the MLP
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}
_GGUF_GEMMA4 = {  # Gemma 4's per-layer input block and layer scalar
    "per_layer_input_gate.weight": "inp_gate.weight",
    "per_layer_projection.weight": "proj.weight",
    "post_per_layer_input_norm.weight": "post_norm.weight",
    "layer_scalar": "layer_output_scale.weight",
    "router.proj.weight": "ffn_gate_inp.weight",  # its experts beside the MLP (26B-A4B), stacked as it ships them
    "router.scale": "ffn_gate_inp.scale",
    "router.per_expert_scale": "ffn_down_exps.scale",
    "experts.gate_up_proj": "ffn_gate_up_exps.weight",
    "experts.down_proj": "ffn_down_exps.weight",
    "pre_feedforward_layernorm_2.weight": "pre_ffw_norm_2.weight",
    "post_feedforward_layernorm_1.weight": "post_ffw_norm_1.weight",
    "post_feedforward_layernorm_2.weight": "post_ffw_norm_2.weight",
}
_GGUF_GEMMA3N = {  # its AltUp router and coefficients and its LAuReL branch (and Gemma 4's per-layer input block)
    "altup.correction_coefs.weight": "altup_correct_coef.weight",
    "altup.correct_output_scale": "altup_correct_scale.weight",
    "altup.prediction_coefs.weight": "altup_predict_coef.weight",
    "altup.modality_router.weight": "altup_router.weight",
    "altup.router_norm.weight": "altup_router_norm.weight",
    "laurel.linear_left.weight": "laurel_l.weight",
    "laurel.linear_right.weight": "laurel_r.weight",
    "laurel.post_laurel_norm.weight": "laurel_post_norm.weight",
}
_GGUF_GEMMA4_GLOBAL = {
    "model.embed_tokens_per_layer.weight": "per_layer_token_embd.weight",
    "model.per_layer_model_projection.weight": "per_layer_model_proj.weight",
    "model.per_layer_projection_norm.weight": "per_layer_proj_norm.weight",
}
_GGUF_GPT_OSS = {"post_attention_layernorm.weight": "post_attention_norm.weight"}  # its pre-MLP norm
_GGUF_QWEN35 = {  # its Gated DeltaNet layers' tensors and its pre-MLP norm
    "linear_attn.in_proj_qkv.weight": "attn_qkv.weight",
    "linear_attn.in_proj_z.weight": "attn_gate.weight",
    "linear_attn.in_proj_b.weight": "ssm_beta.weight",
    "linear_attn.in_proj_a.weight": "ssm_alpha.weight",
    "linear_attn.conv1d.weight": "ssm_conv1d.weight",
    "linear_attn.dt_bias": "ssm_dt.bias",
    "linear_attn.A_log": "ssm_a",
    "linear_attn.norm.weight": "ssm_norm.weight",
    "linear_attn.out_proj.weight": "ssm_out.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",  # Qwen3.5-MoE's shared expert
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
    "linear_attn.in_proj_ba.weight": "ssm_ba.weight",  # Qwen3-Next's b and a, fused per key head
}
_GGUF_ARCH = {"mixtral": "llama", "mistral": "llama", "gemma3_text": "gemma3", "gemma4_text": "gemma4",
              "gemma3n_text": "gemma3n",
              "qwen3_moe": "qwen3moe", "gpt_oss": "gpt-oss", "qwen3_5_text": "qwen35", "qwen3_5_moe_text": "qwen35moe",
              "qwen3_next": "qwen3next"}  # fmt: skip
_GGUF_HYBRID = ("qwen35", "qwen35moe", "qwen3next")  # Gated DeltaNet layers among the attention ones


def write_tiny_gguf(
    path: str | Path,
    hf_dir: str | Path,
    qtype: GGMLQuantizationType | str = "F32",
    sampling: dict | None = None,
    drop: tuple[str, ...] = (),
    beside_experts: str = "F32",
) -> Path:
    """Write the weights, config and tokenizer of the HF model in `hf_dir` as a GGUF file, like llama.cpp's
    convert_hf_to_gguf.py and llama-quantize: 2-D weights in `qtype` ("Q4_K_M": llama.cpp's mix, `q4_k_m_type`),
    norms and biases in F32, llama q/k rows permuted, no output.weight when embeddings are tied, llama3 rope scaling
    as a rope_freqs.weight tensor, Mixtral and Mistral as "llama" models (Mixtral with expert counts, each layer's
    experts stacked and its router in F32), Gemma's norms stored +1 with its window and soft-caps (Gemma 3's text
    model alone from a Gemma3ForConditionalGeneration; its tower goes to write_tiny_mmproj), Phi-3's LongRoPE
    factors as tensors, gpt-oss's gate and up experts apart with their biases and its sinks; `sampling`:
    llama.cpp's `general.sampling.*` keys (temp, top_p: float32; top_k: int32); `drop`: GGUF names left out (a bad
    file); `beside_experts`: the type of an MXFP4 file's 2-D weights other than its experts (llama.cpp's gpt-oss
    files: Q8_0)."""
    from transformers import AutoConfig, AutoTokenizer

    path, hf_dir = Path(path), Path(hf_dir)
    mixture = qtype == "Q4_K_M"  # llama.cpp's mix of types per tensor (q4_k_m_type)
    qtype = GGMLQuantizationType.Q4_K if mixture else GGMLQuantizationType[qtype] if isinstance(qtype, str) else qtype
    config = AutoConfig.from_pretrained(hf_dir)
    multimodal = config.model_type == "gemma3"  # Gemma3ForConditionalGeneration: its text model (mmproj: the tower)
    config = config.text_config if multimodal else config
    if hasattr(config, "per_layer_config"):  # Gemma 4: its heads' sizes per layer; the top level's the sliding ones'
        config.allow_global_per_layer_attribute_access = True
    arch = _GGUF_ARCH.get(config.model_type, config.model_type)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = dict(config.rope_parameters)
    local_rope = rope.pop("sliding_attention", None)  # Gemma 3: a rope per layer type
    rope = dict(rope.pop("full_attention", rope))
    rotary = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(hf_dir.name)
    for key, value in (sampling or {}).items():
        add = writer.add_int32 if isinstance(value, int) else writer.add_float32
        add(f"general.sampling.{key}", value)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    if arch == "gemma4":  # its head sizes, KV heads and MLP widths are per layer
        rope_freqs = _add_gemma4_keys(writer, config, rope)
    else:
        writer.add_feed_forward_length(config.intermediate_size)  # Gemma 3n's: one per layer
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(rotary)
    if config.model_type == "qwen3_moe":
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    if mixture:
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    if local_rope is not None:
        writer.add_rope_freq_base_swa(local_rope["rope_theta"])
    if arch.startswith("gemma"):
        writer.add_sliding_window(config.sliding_window)
        if arch in ("gemma2", "gemma3"):
            writer.add_sliding_window_pattern(config.layer_types.index("full_attention") + 1)  # every n-th global
        if config.final_logit_softcapping:
            writer.add_final_logit_softcapping(config.final_logit_softcapping)
        if arch == "gemma2" and config.attn_logit_softcapping:
            writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    if rope.get("rope_type") == "longrope":
        original = config.original_max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(original)
        scale = config.max_position_embeddings / original
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))
        for kind in ("long", "short"):
            factors = np.array(rope[f"{kind}_factor"], dtype=np.float32)
            writer.add_tensor(f"rope_factors_{kind}.weight", factors, raw_dtype=GGMLQuantizationType.F32)
    if arch == "gemma3n":
        _add_gemma3n_keys(writer, config)
    if config.model_type in ("mixtral", "gpt_oss"):
        writer.add_expert_count(config.num_local_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    if config.model_type == "gpt_oss":
        writer.add_expert_feed_forward_length(config.intermediate_size)
        writer.add_sliding_window(config.sliding_window)
    if arch in _GGUF_HYBRID:
        _add_gated_delta_net_keys(writer, config)
    if arch in ("qwen35moe", "qwen3next"):
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    if rope.get("rope_type") == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    _add_tokenizer(writer, AutoTokenizer.from_pretrained(hf_dir), config.vocab_size)

    tensors = load_file(hf_dir / "model.safetensors")
    if multimodal:
        tensors = {"model." + k.removeprefix("language_model.model."): v for k, v in tensors.items()
                   if k.startswith("language_model.model.")}  # fmt: skip
    if arch == "gemma3n":  # its streams' projections stacked, [K-1, H, H], as llama.cpp's converter writes them
        for name, stacked in (("altup_projections", "altup_proj"), ("altup_unembed_projections", "altup_unembd_proj")):
            parts = [tensors.pop(f"model.{name}.{j}.weight") for j in range(config.altup_num_inputs - 1)]
            writer.add_tensor(f"{stacked}.weight", np.stack(parts).astype(np.float32))
    if config.model_type == "gpt_oss":
        tensors = _unstack_gpt_oss_experts(tensors)
    if arch == "qwen3next":  # llama.cpp's converter splits q, k, v and z apart (b and a stay fused, as ssm_ba)
        tensors = _split_qkvz(tensors, config)
    for name, values in _stack_experts(tensors).items():
        values = values.astype(np.float32)
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if arch in ("gemma2", "gemma3") and name.endswith("norm.weight"):  # llama.cpp stores their (1 + w)
            values = values + 1
        if arch in _GGUF_HYBRID:
            values = _qwen35_values(name, values, config, tiled=arch != "qwen3next")
        if arch == "llama" and name.endswith("q_proj.weight"):  # llama.cpp's rope pairs (not for NEOX-rope families)
            values = _permute_rows(values, config.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            values = _permute_rows(values, config.num_key_value_heads)
        router = name.endswith(("block_sparse_moe.gate.weight", "router.proj.weight", "self_attn.sinks",
                                "conv1d.weight"))  # kept F32  # fmt: skip
        tensor_type = qtype if values.ndim >= 2 and not router else GGMLQuantizationType.F32
        expert = ".experts.w" in name and name.endswith(".weight")
        if qtype == GGMLQuantizationType.MXFP4 and not expert and tensor_type != GGMLQuantizationType.F32:
            tensor_type = GGMLQuantizationType[beside_experts]  # llama.cpp's gpt-oss: only experts in MXFP4
        if mixture and tensor_type != GGMLQuantizationType.F32:
            tensor_type = q4_k_m_type(name, config.num_hidden_layers, values.shape[-1], config.tie_word_embeddings)
        if _gguf_name(name, arch) not in drop:
            writer.add_tensor(_gguf_name(name, arch), quantize(values, tensor_type), raw_dtype=tensor_type)
    if rope.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_rope_freqs(rope, head_dim), raw_dtype=GGMLQuantizationType.F32)
    if arch == "gemma4":
        writer.add_tensor("rope_freqs.weight", rope_freqs, raw_dtype=GGMLQuantizationType.F32)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_gemma4_keys(writer: gguf.GGUFWriter, config: Any, rope: dict) -> np.ndarray:
    """Gemma 4's keys as llama.cpp's converter writes them: the full layers' head size as key_length and the
    sliding ones' as key_length_swa, KV heads and MLP widths per layer, which layers slide, the shared KV and
    per-layer input sizes; returns its rope_freqs tensor, 1 for the frequencies proportional rope turns and 1e30
    (stopped) for the rest."""
    full = config.layer_types.index("full_attention")
    sliding_dim, full_dim = config.head_dim, config.per_layer_config[full].head_dim
    wide = config.num_hidden_layers - config.num_kv_shared_layers
    writer.add_key_length(full_dim)
    writer.add_value_length(full_dim)
    writer.add_key_length_swa(sliding_dim)
    writer.add_value_length_swa(sliding_dim)
    writer.add_rope_dimension_count(full_dim)
    writer.add_rope_dimension_count_swa(sliding_dim)
    writer.add_head_count_kv([config.per_layer_config[i].num_key_value_heads for i in range(config.num_hidden_layers)])
    widths = [config.intermediate_size * (2 if config.use_double_wide_mlp and i >= wide else 1)
              for i in range(config.num_hidden_layers)]  # fmt: skip
    writer.add_feed_forward_length(widths)
    writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in config.layer_types])
    writer.add_shared_kv_layers(config.num_kv_shared_layers)
    writer.add_embedding_length_per_layer_input(config.hidden_size_per_layer_input)
    if config.enable_moe_block:
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.top_k_experts)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    turned = int(full_dim * rope.get("partial_rotary_factor", 1.0) / 2)
    return np.array([1.0] * turned + [1e30] * (full_dim // 2 - turned), dtype=np.float32)


def _add_gemma3n_keys(writer: gguf.GGUFWriter, config: Any) -> None:
    """Gemma 3n's keys as llama.cpp's converter writes them: AltUp's, the per-layer input and shared KV sizes,
    which layers slide, each layer's activation sparsity as its normal quantile. Its per-layer table is written as
    the checkpoint holds it (the converter pads it with zero rows to the vocabulary; either loads)."""
    writer.add_altup_active_idx(config.altup_active_idx)
    writer.add_altup_num_inputs(config.altup_num_inputs)
    writer.add_embedding_length_per_layer_input(config.hidden_size_per_layer_input)
    writer.add_shared_kv_layers(config.num_kv_shared_layers)
    normal = torch.distributions.Normal(0.0, 1.0)
    writer.add_activation_sparsity_scale(
        [normal.icdf(torch.tensor(s, dtype=torch.float32)).item() for s in config.activation_sparsity_pattern]
    )
    writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in config.layer_types])


def _add_gated_delta_net_keys(writer: gguf.GGUFWriter, config: Any) -> None:
    """Qwen3.5's keys as llama.cpp's converter writes them: the linear attention sizes as SSM keys, which layers are
    recurrent, and its (text-only: unused) multimodal rope sections."""
    writer.add_ssm_conv_kernel(config.linear_conv_kernel_dim)
    writer.add_ssm_state_size(config.linear_key_head_dim)
    writer.add_ssm_group_count(config.linear_num_key_heads)
    writer.add_ssm_time_step_rank(config.linear_num_value_heads)
    writer.add_ssm_inner_size(config.linear_value_head_dim * config.linear_num_value_heads)
    flags = [kind == "linear_attention" for kind in config.layer_types]
    writer.add_array(f"{writer.arch}.attention.recurrent_layers", flags)
    writer.add_full_attention_interval(4)  # what llama.cpp falls back to without the flags above
    writer.add_rope_dimension_sections([11, 11, 10, 0])


def _split_qkvz(tensors: dict[str, np.ndarray], config: Any) -> dict[str, np.ndarray]:
    """Qwen3-Next's in_proj_qkvz as Qwen3.5's in_proj_qkv and in_proj_z (the rows our loader's fused_parts gives)."""
    ours = ModelConfig("qwen3_next", 0, 0, 0, 0, 1, 1, 1, 0.0, 0.0, 0, False,
                       linear_num_key_heads=config.linear_num_key_heads,
                       linear_num_value_heads=config.linear_num_value_heads,
                       linear_key_head_dim=config.linear_key_head_dim,
                       linear_value_head_dim=config.linear_value_head_dim)  # fmt: skip
    out: dict[str, np.ndarray] = {}
    for name, values in tensors.items():
        parts = fused_parts(ours, name) if ".in_proj_qkvz." in name else None
        out |= {part: values[rows] for part, rows in parts} if parts else {name: values}
    return out


def _qwen35_values(name: str, values: np.ndarray, config: Any, tiled: bool) -> np.ndarray:
    """What llama.cpp's converter does to a Qwen3.5 (or Qwen3-Next) tensor: norms stored as 1 + w (but the
    DeltaNet's own), A_log as -exp(A_log), the convolution squeezed to [C, K], and (`tiled`: Qwen3.5's) value heads
    reordered from grouped by key head to tiled."""
    if name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
        values = values + 1
    elif name.endswith("A_log"):
        values = -np.exp(values)
    elif name.endswith("conv1d.weight"):
        values = values[:, 0, :]
    hk, hv, dv = config.linear_num_key_heads, config.linear_num_value_heads, config.linear_value_head_dim
    role = name.rpartition("linear_attn.")[2]
    if ".linear_attn." not in name or hk == hv or not tiled:
        return values
    qk = 2 * hk * config.linear_key_head_dim if role in ("in_proj_qkv.weight", "conv1d.weight") else 0
    per_head = dv if role in ("in_proj_qkv.weight", "conv1d.weight", "in_proj_z.weight", "out_proj.weight") else 1
    tiled = lambda v: v.reshape(hk, hv // hk, per_head, *v.shape[1:]).swapaxes(0, 1).reshape(v.shape)  # noqa: E731
    if role == "out_proj.weight":
        return tiled(np.ascontiguousarray(values.T)).T
    if role in ("norm.weight",):
        return values
    return np.concatenate([values[:qk], tiled(values[qk:])])


def _unstack_gpt_oss_experts(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """gpt-oss's stacked experts (gate and up interleaved) as each expert's Mixtral-named tensors, its router as
    Mixtral's (`block_sparse_moe.gate`): what _stack_experts stacks again the way llama.cpp's converter writes them
    (gate and up apart)."""
    out: dict[str, np.ndarray] = {}
    for name, values in tensors.items():
        name = name.replace(".mlp.router.", ".block_sparse_moe.gate.")
        name = name.replace(".mlp.experts.", ".block_sparse_moe.experts.")
        out |= expert_parts(name, values) or {name: values}
    return out


def _stack_experts(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each layer's experts.{e}.w1/w2/w3 as one [E, out, in] tensor named block_sparse_moe.experts.w1/w2/w3 (Qwen's
    mlp.experts.{e}.gate_proj/up_proj/down_proj and mlp.gate take those names too), the others as they are."""
    out: dict[str, np.ndarray] = {}
    stacks: dict[str, dict[int, np.ndarray]] = {}
    for name, values in tensors.items():
        name = name.replace(".mlp.gate.weight", ".block_sparse_moe.gate.weight")
        if ".mlp.experts." in name:
            name = name.replace(".mlp.experts.", ".block_sparse_moe.experts.")
            for qwen, mixtral in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
                name = name.replace(f".{qwen}.", f".{mixtral}.")
        head, found, tail = name.partition(".block_sparse_moe.experts.")
        if not found:
            out[name] = values
            continue
        expert, projection = tail.split(".", 1)
        stacks.setdefault(f"{head}{found}{projection}", {})[int(expert)] = values
    return out | {name: np.stack([experts[e] for e in sorted(experts)]) for name, experts in stacks.items()}


def _gguf_name(hf_name: str, arch: str) -> str:
    if hf_name == "lm_head.weight":
        return "output.weight"
    if hf_name in _GGUF_GLOBAL | _GGUF_GEMMA4_GLOBAL:
        return (_GGUF_GLOBAL | _GGUF_GEMMA4_GLOBAL)[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.{i}.{rest}
    names = _GGUF_LAYER | (_GGUF_GEMMA if arch.startswith("gemma") else _GGUF_GPT_OSS if arch == "gpt-oss" else {})
    names |= _GGUF_GEMMA4 if arch in ("gemma4", "gemma3n") else {}
    names |= _GGUF_GEMMA3N if arch == "gemma3n" else {}
    names |= _GGUF_QWEN35 if arch in _GGUF_HYBRID else {}
    return f"blk.{layer}.{names[rest]}"


def _permute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: each head's two rotate_half halves interleaved into (x0, x_{d/2}), ... pairs."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _llama3_rope_freqs(rope: dict, head_dim: int) -> np.ndarray:
    """llama.cpp's per-frequency divisors for llama3 rope scaling."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    original = rope["original_max_position_embeddings"]
    freqs = 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
    divisors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            divisors.append(1.0)
        elif wavelen > original / low:
            divisors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(divisors, dtype=np.float32)


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int) -> None:
    """llama.cpp's "gpt2" (byte-level BPE) tokenizer metadata: tokens by id, their types, merges, special ids."""
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    for token, token_id in vocab.items():
        tokens[token_id] = token
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    types = [
        TokenType.CONTROL if i in special else TokenType.NORMAL if i < len(vocab) else TokenType.UNUSED
        for i in range(vocab_size)
    ]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_add_bos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


# ------------------------------------------------------------------------------------------------ quantization


def quantize(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """`values` [rows, cols] as raw GGUF blocks: gguf-py's quantizers, and sagellm.benchmarks.kquant_pack's for the
    K-quants (varied sub-block scales and mins), which gguf-py cannot write."""
    return quantize_blocks(values, qtype)


def add_mtp_head(directory: str | Path, seed: int = 1) -> Path:
    """Give the Qwen3.5 (or Qwen3.5-MoE) checkpoint at `directory` a random multi-token prediction head, as the
    hub's carry one: `mtp.fc` [H, 2H], its three norms (offsets from 1, as the model's) and one full attention layer
    of the model's own kind (experts each under its own name), in a file of their own (`mtp.safetensors`), and
    `mtp_num_hidden_layers: 1` in config.json."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    config = AutoConfig.from_pretrained(directory)
    torch.manual_seed(seed)  # a full attention layer of another random model of the same config
    layer = AutoModelForCausalLM.from_config(config).model.layers[config.layer_types.index("full_attention")]
    h, norms = config.hidden_size, ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm")
    tensors = _per_expert({f"mtp.layers.0.{name}": t for name, t in layer.state_dict().items()})
    tensors |= {"mtp.fc.weight": torch.empty(h, 2 * h).normal_(0, config.initializer_range)}
    tensors |= {f"mtp.{norm}.weight": torch.zeros(h) for norm in norms}
    for name, t in tensors.items():  # as _randomize_and_save makes the model's: distinct norms, decisive routers
        if "norm" in name:
            t.copy_(0.1 * torch.randn_like(t))
        elif name.endswith("mlp.gate.weight"):
            t.copy_(0.5 * torch.randn_like(t))
    save_torch_file({name: t.contiguous() for name, t in tensors.items()}, str(directory / "mtp.safetensors"))
    settings = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(settings | {"mtp_num_hidden_layers": 1}, indent=2))
    return directory


def _per_expert(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' stacked experts (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]) under the
    hub's per-expert names (`experts.{e}.gate_proj.weight`, ...)."""
    out = {}
    for name, t in tensors.items():
        head, dot, stacked = name.rpartition("experts.")
        if dot and stacked == "gate_up_proj":
            for e in range(t.shape[0]):
                gate, up = t[e].chunk(2)
                out |= {f"{head}experts.{e}.gate_proj.weight": gate, f"{head}experts.{e}.up_proj.weight": up}
        elif dot and stacked == "down_proj":
            out |= {f"{head}experts.{e}.down_proj.weight": t[e] for e in range(t.shape[0])}
        else:
            out[name] = t
    return out


# ---------------------------------------------------------------------------------------------------- multimodal
