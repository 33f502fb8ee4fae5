"""Reads how a sentence-transformers directory turns token states into one sentence vector: where the encoder
lives, which pooling, whether the vector is L2-normalized, and the longest input the model was trained for.

sentence-transformers describes a model as a chain of modules in modules.json (Transformer -> Pooling ->
optional Normalize), each configured by a JSON file in its own sub-directory. We support exactly that chain, and a
decoder reranker's (Transformer -> LogitScore: the scores of a "yes" and a "no" token at the last position);
anything else (a Dense projection, a router, weighted-mean or last-token pooling) is refused at load time rather
than served with silently different vectors. A plain Hugging Face encoder directory (no modules.json) gets what
sentence-transformers gives it: mean pooling, no normalization."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from sagellm.runtime.models.loaded import ModelLoadError, describe

PoolingMode = Literal["cls", "max", "mean", "mean_sqrt_len_tokens"]
POOLING_MODES: tuple[PoolingMode, ...] = ("cls", "max", "mean", "mean_sqrt_len_tokens")
# The legacy boolean keys of 1_Pooling/config.json, in the order sentence-transformers concatenates the modes.
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_CHAIN = ("Transformer", "Pooling")  # then an optional Normalize
_LOGIT_CHAIN = ("Transformer", "LogitScore")  # a decoder reranker's


@dataclass(frozen=True)
class EncoderSpec:
    encoder_dir: Path  # the Hugging Face model (config.json, weights, tokenizer) the Transformer module points at
    pooling: tuple[PoolingMode, ...]  # several modes are concatenated, in this order
    normalize: bool  # L2-normalize the pooled vector
    max_seq_length: int | None  # sentence_bert_config.json's limit; None: the tokenizer's and positions' limit
    lowercase: bool  # sentence_bert_config.json's do_lower_case: lowercase text before tokenizing
    # LogitScore's token ids (true, false or None): a decoder's score is logit(true) - logit(false) at its last token
    logit_score: tuple[int, int | None] | None = None


def read_encoder_spec(model_dir: Path) -> EncoderSpec:
    """The spec of a sentence-transformers directory, or the defaults for a plain Hugging Face encoder."""
    modules_path = model_dir / "modules.json"
    if not modules_path.is_file():
        return _with_bert_config(model_dir, ("mean",), normalize=False)
    modules = _read_json(modules_path)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ModelLoadError(f"{modules_path}: expected a JSON list of modules")
    kinds = tuple(str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules)
    if kinds not in (_CHAIN, (*_CHAIN, "Normalize"), _LOGIT_CHAIN):
        raise ModelLoadError(
            f"{modules_path}: modules {', '.join(kinds)} are not supported; expected Transformer, Pooling[, Normalize]"
            " or Transformer, LogitScore"
        )
    encoder_dir = model_dir / modules[0].get("path", "")
    if kinds == _LOGIT_CHAIN:
        spec = _with_bert_config(encoder_dir, (), normalize=False)
        return replace(spec, logit_score=_logit_score_tokens(model_dir / modules[1].get("path", "") / "config.json"))
    pooling = _pooling_modes(model_dir / modules[1].get("path", "") / "config.json")
    return _with_bert_config(encoder_dir, pooling, normalize=len(kinds) == 3)


def is_pooling_model(source: str) -> bool:
    """Whether `source` (a path, or a model cache name) is a pooling model rather than a generation model: the
    built-in embedding model, a sentence-transformers directory (modules.json), or a Hugging Face directory of an
    encoder (embeddings, or a classifier: a reranker). Read from its files without its weights or tokenizer. A
    decoder reranker looks like a chat model here (a causal LM): it is served as a pooling model when named one
    (an engine of `kind: embedding`, or --pooling-model)."""
    from sagellm.runtime.models.model_cache import DEFAULT_EMBEDDING_MODEL

    path = Path(source).expanduser()
    if source == DEFAULT_EMBEDDING_MODEL or (path / "modules.json").is_file():
        return True
    config = path / "config.json"
    if not config.is_file():
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    read = _read_json(config)
    return isinstance(read, dict) and read.get("model_type") in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _with_bert_config(encoder_dir: Path, pooling: tuple[PoolingMode, ...], *, normalize: bool) -> EncoderSpec:
    path = encoder_dir / "sentence_bert_config.json"
    config = _read_json(path) if path.is_file() else {}
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    max_seq_length = config.get("max_seq_length")
    if max_seq_length is not None and (not isinstance(max_seq_length, int) or max_seq_length < 1):
        raise ModelLoadError(f"{path}: max_seq_length must be a positive integer, not {max_seq_length!r}")
    return EncoderSpec(encoder_dir, pooling, normalize, max_seq_length, bool(config.get("do_lower_case", False)))


def _logit_score_tokens(path: Path) -> tuple[int, int | None]:
    config = _read_json(path) if path.is_file() else None
    true_id = config.get("true_token_id") if isinstance(config, dict) else None
    false_id = config.get("false_token_id") if isinstance(config, dict) else None
    if not isinstance(true_id, int) or not (false_id is None or isinstance(false_id, int)):
        raise ModelLoadError(f"{path}: LogitScore needs an integer true_token_id (and false_token_id or null)")
    return true_id, false_id


def _pooling_modes(path: Path) -> tuple[PoolingMode, ...]:
    """Pooling modes from either format sentence-transformers writes: `pooling_mode` (a name or a list) or the
    legacy `pooling_mode_*` booleans (none set means mean)."""
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing; the Pooling module needs its config.json")
    config = _read_json(path)
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    else:
        modes = tuple(name for key, name in _LEGACY_POOLING_KEYS.items() if config.get(key)) or ("mean",)
    unsupported = [m for m in modes if m not in POOLING_MODES]
    if unsupported or not modes:
        raise ModelLoadError(
            f"{path}: pooling {', '.join(map(str, unsupported)) or 'none'} is not supported "
            f"(supported: {', '.join(POOLING_MODES)})"
        )
    return modes


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: unreadable JSON: {describe(e)}") from e
