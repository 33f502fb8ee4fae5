"""Reads a PEFT LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`, or an older
`adapter_model.bin`) into `LoraAdapter`: each adapted base weight's A and B under the canonical name the HF loader
gives that weight, so the engine can add `scaling * B @ A` to the weight it already holds by the same name.

Only plain LoRA on a decoder layer's seven projections is read (`LORA_MODULES`). Anything in the config or the file
that would change what the adapter computes, and that we would otherwise silently drop (DoRA, biases, fully trained
`modules_to_save`, per-module ranks, an embedding or lm_head target, a base the adapter was trained against after
PEFT changed it, ...), is refused with the field it came from: serving such an adapter without it would answer
plausible but wrong tokens, which nobody would notice. `check_adapter_fits` tells an adapter of another base model.

An adapter's weights are read by the engine that serves it, and by a front end that adds it (the gateway's
`--lora-modules` and `/v1/load_lora_adapter`) for their digest, which names its requests' prefix blocks
(`lora_digest.py`). `values=False` reads the config and the weights file's header only, every check above run on
the weights' names, shapes and dtypes (tensors on the meta device), and none of their values.

The path comes from a request (`/v1/load_lora_adapter`), so the server may be asked to read a file that is not an
adapter's at all, as its own user: a symlink to a private file, say (symlinks are followed: a Hugging Face cache's
snapshot links its files into `blobs/`). Errors therefore never echo what a file holds: a config must first say it
is a LoRA config (`peft_type`), after which a setting or module is named but a value only by its JSON type; a config
is read only up to MAX_CONFIG_BYTES, and a weights file's parse error says what broke, not the header it read."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from sagellm.common.errors import FieldError, InvalidInput, NotFound
from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.models.loaded import ModelLoadError, describe, read_json

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"  # PEFT's save with safe_serialization=False; read only when no safetensors is there
MAX_CONFIG_BYTES = 1 << 20  # PEFT writes about 1 KB; larger is not an adapter's config
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# PEFT's name of an adapted module's factor: `base_model.model.<module>.lora_A.weight`; older saves kept the adapter's
# name, `lora_A.default.weight`. A multimodal model's text decoder drops its prefix, as `canonical_name` drops it.
_PEFT_PREFIX = "base_model.model."
_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.default)?\.weight$")
_TEXT_MODEL_PREFIXES = ("language_model.model.", "model.language_model.")
_DECODER_MODULE = re.compile(
    r"^model\.layers\.(?P<layer>\d+)\.(?:self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)$"
)

# adapter_config.json's settings that do not change what a saved adapter computes at inference (training-only,
# bookkeeping, or the initialization of weights the file then overrides); any other setting with a value set must
# be one this module reads or refuses, so a newer PEFT's feature is never dropped silently.
_INERT = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules", "lora_dropout", "layers_to_transform",
    "layers_pattern", "init_lora_weights", "megatron_config", "megatron_core", "qalora_group_size", "loftq_config",
    "eva_config", "corda_config", "lora_ga_config", "ensure_weight_tying", "runtime_config",
})  # fmt: skip
# Settings that change the computation, with why we refuse them when set (a bias other than "none" is checked alone).
_REFUSED = {
    "use_dora": "DoRA (a magnitude vector rescales the adapted weight)",
    "use_qalora": "QA-LoRA (A reads the input pooled in groups)",
    "lora_bias": "a bias on LoRA's B",
    "fan_in_fan_out": "weights stored transposed (a Conv1D base such as GPT-2's)",
    "modules_to_save": "fully trained copies of modules beside the LoRA weights",
    "layer_replication": "layers the adapter duplicates",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "trainable_token_indices": "trained embedding rows",
    "target_parameters": "LoRA on parameters (mixture-of-experts weights) rather than modules",
    "alora_invocation_tokens": "activated LoRA (applied only after its invocation tokens)",
    "velora_config": "the VeLoRA variant",
    "monteclora_config": "the MonteCLoRA variant",
    "use_bdlora": "the block-diagonal LoRA variant",
    "arrow_config": "Arrow routing among adapters",
    "kasa_config": "the KaSA variant (changes the base weights)",
}
# Initializations that change the base weights themselves: the adapter is right only on that changed base, unless
# PEFT converted it to plain LoRA when saving (which writes init_lora_weights true).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


# eq=False: two adapters are the same only if they are the same object (comparing tensors has no single truth value).
@dataclass(frozen=True, eq=False)
class LoraAdapter:
    name: str
    path: Path
    rank: int  # r
    alpha: float  # lora_alpha
    scaling: float  # alpha / r, or alpha / sqrt(r) with use_rslora: what B @ A is multiplied by
    base_model: str | None  # base_model_name_or_path: what it was trained on, as the trainer named it
    # canonical base weight name ("model.layers.0.self_attn.q_proj.weight") -> (A [r, in], B [out, r]), float32 on the
    # CPU (on the meta device when read without values), scaling not folded in; in layer order, then LORA_MODULES'.
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(repr=False)

    @property
    def target_modules(self) -> set[str]:
        """The projections it adapts in at least one layer, e.g. {"q_proj", "v_proj"}."""
        return {name.split(".")[-2] for name in self.weights}


def read_lora_adapter(path: str | Path, name: str, *, max_rank: int | None = None, values: bool = True) -> LoraAdapter:
    """The adapter in PEFT's directory `path`, served as `name`. `max_rank` (the engine's `max_lora_rank`, None for
    no limit) refuses an adapter of a higher rank with a FieldError on that field. `values=False`: its weights as
    the file's header describes them (meta tensors), checked as the engine will check them, none of them read."""
    directory = Path(path).expanduser()
    config_path = _config_file(directory, name)
    config = read_json(config_path, max_bytes=MAX_CONFIG_BYTES)
    rank, alpha, use_rslora = _check_config(config, config_path)
    if max_rank is not None and rank > max_rank:
        raise FieldError("max_lora_rank", f"max_lora_rank: LoRA adapter {name} ({directory}) has rank {rank}, above "
                         f"the limit max_lora_rank={max_rank}; raise max_lora_rank to at least {rank}")  # fmt: skip
    weights_path = _weights_file(directory, name)
    weights = _pair_factors(_read_tensors(weights_path, values), rank, weights_path)
    _check_listed_targets(config.get("target_modules"), weights, config_path)
    base_model = config.get("base_model_name_or_path")
    return LoraAdapter(
        name=name,
        path=directory,
        rank=rank,
        alpha=alpha,
        scaling=alpha / math.sqrt(rank) if use_rslora else alpha / rank,
        base_model=base_model if isinstance(base_model, str) and base_model else None,
        weights=weights,
    )


def check_adapter_fits(adapter: LoraAdapter, weight_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raises InvalidInput naming the first weight `adapter` changes that the base model (its weights' shapes by
    canonical name, [out, in]) lacks or has in another shape: the adapter was trained on another base model."""
    made_for = f" (made for {adapter.base_model})" if adapter.base_model else ""
    for weight, (a, b) in adapter.weights.items():
        shape = weight_shapes.get(weight)
        if shape is None:
            raise InvalidInput(f"LoRA adapter {adapter.name}: this adapter was made for another base model{made_for}: "
                               f"it changes {weight}, which this model does not have")  # fmt: skip
        wanted = (b.shape[0], a.shape[1])
        if tuple(shape) != wanted:
            raise InvalidInput(
                f"LoRA adapter {adapter.name}: this adapter was made for another base model{made_for}: it changes "
                f"{weight} as [{wanted[0]}, {wanted[1]}] (out, in), but this model's is {list(shape)}"
            )


def _check_config(config: dict[str, Any], config_path: Path) -> tuple[int, float, bool]:
    """The rank, alpha and use_rslora of a plain LoRA config, after refusing every setting that would change what
    the adapter computes beyond `scaling * B @ A` on LORA_MODULES."""
    if config.get("peft_type") != "LORA":  # first: nothing of a file that is not a LoRA config is named
        raise ModelLoadError(f'{config_path}: peft_type: not "LORA"; only PEFT LoRA adapters are supported')
    for key, what in _REFUSED.items():
        if config.get(key):
            raise ModelLoadError(f"{config_path}: {key}: {what} is not supported")
    if config.get("bias", "none") != "none":
        raise ModelLoadError(f'{config_path}: bias: trained biases are not supported; only "none"')
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.startswith(_BASE_CHANGING_INITS):
        method = next(m for m in _BASE_CHANGING_INITS if init.startswith(m))
        raise ModelLoadError(f"{config_path}: init_lora_weights: {method!r} changes the base model's weights, which "
                             "an adapter cannot carry; convert it to plain LoRA with PEFT first "
                             "(save_pretrained(..., path_initial_model_for_weight_conversion=...))")  # fmt: skip
    for key, value in config.items():
        if key not in _INERT and key not in _REFUSED and key != "bias" and value:
            raise ModelLoadError(f"{config_path}: {_named(key)}: a setting this reader does not know; it may "
                                 "change what the adapter computes, so the adapter is not served")  # fmt: skip
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        got = "an integer below 1" if isinstance(rank, int) and not isinstance(rank, bool) else _kind(rank)
        raise ModelLoadError(f"{config_path}: r: must be an integer >= 1, got {got}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise ModelLoadError(f"{config_path}: lora_alpha: must be a number, got {_kind(alpha)}")
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise ModelLoadError(f"{config_path}: use_rslora: must be true or false, got {_kind(use_rslora)}")
    _check_target_list(config.get("target_modules"), config_path)
    return rank, float(alpha), use_rslora


def _check_target_list(targets: object, config_path: Path) -> None:
    """A target_modules list names only LORA_MODULES (PEFT matches an entry against a module's name or its dotted
    tail, so an entry's last part names the module). A string (a regex, or "all-linear") or none is judged by the
    weights it produced instead."""
    if targets is None or isinstance(targets, str):
        return
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise ModelLoadError(f"{config_path}: target_modules: must be a list of module names or a regex, "
                             f"got {_kind(targets)}")  # fmt: skip
    for target in targets:
        if target.rsplit(".", 1)[-1] not in LORA_MODULES:
            raise ModelLoadError(f"{config_path}: target_modules: {_named(target)!r} is not supported; LoRA is "
                                 f"applied to a decoder layer's {', '.join(LORA_MODULES)} only")  # fmt: skip


def _check_listed_targets(targets: object, weights: Mapping[str, object], config_path: Path) -> None:
    """The weights adapt only modules a target_modules list names: a file that disagrees with its config is one of
    another adapter, or a damaged one."""
    if not isinstance(targets, list):
        return
    listed = {target.rsplit(".", 1)[-1] for target in targets}
    for weight in weights:
        if weight.split(".")[-2] not in listed:
            raise ModelLoadError(f"{config_path}: target_modules: {sorted(listed)} does not name {weight}, which the "
                                 "weights file adapts; the config and the weights disagree")  # fmt: skip


def _config_file(directory: Path, name: str) -> Path:
    """PEFT's adapter directory's config, a regular file (a device or a pipe, which reading would never finish, is
    not one)."""
    try:
        if not directory.exists():
            raise NotFound(f"LoRA adapter {name}: {directory}: no such directory")
        if not directory.is_dir():
            raise ModelLoadError(f"LoRA adapter {name}: {directory}: not a directory; pass PEFT's adapter directory "
                                 f"(with {CONFIG_FILE} and {SAFETENSORS_FILE})")  # fmt: skip
        if not (directory / CONFIG_FILE).is_file():
            raise NotFound(f"LoRA adapter {name}: {directory}: no {CONFIG_FILE}; not a PEFT adapter directory")
    except OSError as e:  # a directory the server may not look into (EACCES)
        raise _unreadable(name, directory, e) from e
    return directory / CONFIG_FILE


def _weights_file(directory: Path, name: str) -> Path:
    try:
        for file in (SAFETENSORS_FILE, BIN_FILE):
            if (directory / file).is_file():
                return directory / file
    except OSError as e:  # a link to where the server may not look (EACCES)
        raise _unreadable(name, directory, e) from e
    raise NotFound(f"LoRA adapter {name}: {directory}: no {SAFETENSORS_FILE} (nor {BIN_FILE})")


def _unreadable(name: str, directory: Path, error: OSError) -> ModelLoadError:
    return ModelLoadError(f"LoRA adapter {name}: {directory}: cannot be read ({error.strerror})")


def _read_tensors(path: Path, values: bool) -> dict[str, torch.Tensor]:
    """The file's tensors by PEFT's names, as stored (without `values`: on the meta device, their shapes and dtypes
    only, from the safetensors header or the checkpoint's pickle)."""
    if path.name == BIN_FILE:
        try:  # weights_only: a pickle that would run code is refused, not run
            state = torch.load(path, map_location="cpu" if values else "meta", weights_only=True)
        except Exception as e:  # torch.load raises whatever an unpickler or its archive reader can
            raise ModelLoadError(f"{path}: unreadable PyTorch checkpoint: {describe(e)}") from e
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise ModelLoadError(f"{path}: expected a mapping of tensor names to tensors")
        return state
    try:
        with safe_open(str(path), framework="pt") as f:
            read = f.get_tensor if values else lambda key: _described(f, key)
            return {key: read(key) for key in f.keys()}  # noqa: SIM118 -- safe_open is not a Mapping
    except (SafetensorError, OSError, RuntimeError) as e:  # its detail quotes the header: what broke, not where
        cause = ": ".join(describe(e).split(": ")[:3])
        raise ModelLoadError(f"{path}: corrupt or truncated safetensors file: {cause}") from e


def _described(file: Any, key: str) -> torch.Tensor:
    """What an open safetensors file stores under `key`, as its header describes it: a meta tensor of its shape and
    dtype (the dtype torch reads it as, taken from a read of none of its rows, or of a scalar's few bytes)."""
    stored = file.get_slice(key)
    shape = stored.get_shape()
    dtype = (stored[:0] if shape else file.get_tensor(key)).dtype
    return torch.empty(shape, dtype=dtype, device="meta")


def _pair_factors(
    tensors: Mapping[str, torch.Tensor], rank: int, path: Path
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's A and B tensors paired under the canonical name of the weight they adapt, checked: every tensor is a
    factor of a LORA_MODULES projection, each has its partner, and A [r, in], B [out, r] agree with `rank`."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    matches = {stored: _FACTOR.match(stored.removeprefix(_PEFT_PREFIX)) for stored in tensors}
    # Factors first: an lm_head target is named as one (PEFT saves the whole lm_head beside its A and B).
    for stored, match in sorted(matches.items(), key=lambda item: item[1] is None):
        if match is None:
            raise ModelLoadError(f"{path}: {stored}: not a LoRA A or B weight; only plain LoRA on a decoder layer's "
                                 f"{', '.join(LORA_MODULES)} is supported")  # fmt: skip
        module = _decoder_module(match["module"])
        if module is None:
            raise ModelLoadError(f"{path}: {stored}: adapts {match['module']}; LoRA is supported only on a decoder "
                                 f"layer's {', '.join(LORA_MODULES)}")  # fmt: skip
        pair = factors.setdefault(f"{module}.weight", {})
        if match["factor"] in pair:
            raise ModelLoadError(f"{path}: {stored}: a second lora_{match['factor']} for {module}")
        pair[match["factor"]] = tensors[stored]
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for weight in sorted(factors, key=_weight_order):
        pair = factors[weight]
        for have, missing in (("A", "B"), ("B", "A")):
            if missing not in pair:
                raise ModelLoadError(f"{path}: {weight.removesuffix('.weight')} has lora_{have} but no lora_{missing}")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or not a.is_floating_point() or not b.is_floating_point():
            raise ModelLoadError(f"{path}: {weight}: LoRA A and B must be 2-D float tensors, got {a.dtype} "
                                 f"{list(a.shape)} and {b.dtype} {list(b.shape)}")  # fmt: skip
        if a.shape[0] != rank or b.shape[1] != rank:
            raise ModelLoadError(f"{path}: {weight}: A {list(a.shape)} and B {list(b.shape)} do not have the rank "
                                 f"r={rank} of {CONFIG_FILE} (A is [r, in], B [out, r])")  # fmt: skip
        weights[weight] = (a.to(torch.float32).contiguous(), b.to(torch.float32).contiguous())
    if not weights:
        raise ModelLoadError(f"{path}: holds no LoRA weights")
    return weights


def lora_target_shapes(config: ModelConfig) -> dict[str, tuple[int, int]] | None:
    """The weights adapters may change, [out, in] by canonical name, as a dense decoder of full attention layers
    sizes them from its config (what a front end checks an adapter against without the weights); None for a model
    of another kind, whose engine checks against its loaded weights."""
    plain = not (config.num_experts or config.num_linear_layers or config.attn_output_gate
                 or config.num_kv_shared_layers or config.altup_num_inputs or config.per_layer_input_size)  # fmt: skip
    if not plain:
        return None
    hidden, shapes = config.hidden_size, {}
    for i in range(config.num_layers):
        queries, keys = config.num_heads * config.head_dim_of(i), config.num_kv_heads_of(i) * config.head_dim_of(i)
        mlp = config.intermediate_size_of(i)
        attention = {"q_proj": (queries, hidden), "k_proj": (keys, hidden), "v_proj": (keys, hidden),
                     "o_proj": (hidden, queries)}  # fmt: skip
        shapes |= {f"model.layers.{i}.self_attn.{m}.weight": shape for m, shape in attention.items()}
        mlps = {"gate_proj": (mlp, hidden), "up_proj": (mlp, hidden), "down_proj": (hidden, mlp)}
        shapes |= {f"model.layers.{i}.mlp.{m}.weight": shape for m, shape in mlps.items()}
    return shapes


def is_lora_target(weight: str) -> bool:
    """Whether a base weight (its canonical name) is one LoRA adapters may change: a decoder layer's projection."""
    return weight.endswith(".weight") and _DECODER_MODULE.match(weight.removesuffix(".weight")) is not None


def _decoder_module(module: str) -> str | None:
    """A PEFT module path's canonical name ("model.layers.0.self_attn.q_proj"), None if it is not one of a decoder
    layer's LORA_MODULES."""
    for prefix in _TEXT_MODEL_PREFIXES:
        if module.startswith(prefix):
            module = "model." + module.removeprefix(prefix)
            break
    return module if _DECODER_MODULE.match(module) else None


def _kind(value: object) -> str:
    """A config value as an error names it: by its JSON type, never its text."""
    names = {bool: "true or false", str: "a string", list: "a list", dict: "an object", type(None): "null"}
    return names.get(type(value), "a number")


def _named(name: str) -> str:
    """A setting or module name from a LoRA config as an error shows it: bounded, so a config cannot fill the error."""
    return name if len(name) <= 64 else name[:64] + "..."


def _weight_order(weight: str) -> tuple[int, int]:
    parts = weight.split(".")  # model.layers.{i}.{block}.{module}.weight
    return int(parts[2]), LORA_MODULES.index(parts[4])
