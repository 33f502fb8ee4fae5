"""Loads a pooling model from disk, offline, through `transformers`: an embedding model (an encoder, its tokenizer,
the pooling/normalization spec) or a sequence classifier (a cross-encoder reranker such as ms-marco-MiniLM, or a
text classifier: an encoder with a classification head, `*ForSequenceClassification`), and the longest input it
accepts.

Encoders (model types transformers can run as a masked LM: BERT, RoBERTa, XLM-R, MPNet, ...) embed and classify;
a decoder (`*ForCausalLM`) is a reranker scored by its yes/no tokens (causal_scorer.py); any other decoder
directory would load but pool into meaningless vectors, so it is refused with a one-line ModelLoadError.
A classifier's scores go through the activation sentence-transformers' CrossEncoder applies in `predict`: the one
its config names (`sentence_transformers.activation_fn`, or the older `sbert_ce_default_activation_function`), else
a sigmoid for one label and none for several."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from sagellm.runtime.embedding.card import Activation, PoolingCard
from sagellm.runtime.embedding.causal_scorer import CausalScoring, causal_scoring
from sagellm.runtime.embedding.spec import EncoderSpec, read_encoder_spec
from sagellm.runtime.models.loaded import ModelLoadError, describe
from sagellm.runtime.models.tokenizer import load_hf_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


_ACTIVATIONS: dict[str, Activation] = {
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
    "torch.nn.modules.activation.Softmax": "softmax",
    "torch.nn.modules.linear.Identity": "identity",
}


@dataclass
class LoadedEncoder:
    model: PreTrainedModel  # in eval mode, float32
    tokenizer: PreTrainedTokenizerBase
    spec: EncoderSpec
    card: PoolingCard
    vocab_size: int  # rows of the token embedding: token-id inputs must be below it
    causal: CausalScoring | None = None  # a decoder reranker's: how a pair is rendered and scored


@dataclass(frozen=True)
class _Described:
    spec: EncoderSpec
    config: Any  # transformers' PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    kind: Literal["embed", "classify", "causal"]
    card: PoolingCard


def read_pooling_card(model_dir: Path) -> PoolingCard:
    """The card of the pooling model in `model_dir` (a ModelLoadError as `load_encoder` raises it)."""
    return _describe(model_dir).card


def load_encoder(model_dir: Path) -> LoadedEncoder:
    """The encoder in `model_dir`, a sentence-transformers directory or a plain Hugging Face encoder directory."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    described = _describe(model_dir)
    spec, kind = described.spec, described.kind
    loader = {"causal": AutoModelForCausalLM, "classify": AutoModelForSequenceClassification, "embed": AutoModel}[kind]
    try:
        model = loader.from_pretrained(
            spec.encoder_dir, config=described.config, local_files_only=True, dtype=torch.float32
        )
    except Exception as e:
        raise ModelLoadError(f"{spec.encoder_dir}: cannot load the encoder weights: {describe(e)}") from e
    causal = None
    if kind == "causal":
        causal = causal_scoring(described.tokenizer, described.config.model_type, spec.logit_score, str(model_dir))
    vocab_size = model.get_input_embeddings().num_embeddings
    return LoadedEncoder(model.eval(), described.tokenizer, spec, described.card, vocab_size, causal)


def _describe(model_dir: Path) -> _Described:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if not model_dir.exists():
        raise ModelLoadError(f"{model_dir}: no such file or directory")
    if not model_dir.is_dir():
        raise ModelLoadError(f"{model_dir}: not a directory; pass a sentence-transformers or Hugging Face encoder")
    spec = read_encoder_spec(model_dir)
    config_path = spec.encoder_dir / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{spec.encoder_dir}: not a model directory (no config.json)")
    # transformers raises many unrelated exception types for missing or corrupt files; each is reported alike.
    try:
        config = AutoConfig.from_pretrained(spec.encoder_dir, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"{config_path}: unreadable model config: {describe(e)}") from e
    causal = spec.logit_score is not None or any(a.endswith("ForCausalLM") for a in config.architectures or ())
    if not causal and (
        config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES or getattr(config, "is_decoder", False)
    ):
        raise ModelLoadError(
            f"{spec.encoder_dir}: {config.model_type} is not an encoder model or a causal LM reranker; embeddings "
            "need a BERT-style encoder such as all-minilm-l6-v2"
        )
    classifier = any(a.endswith("ForSequenceClassification") for a in config.architectures or ())
    tokenizer = load_hf_tokenizer(spec.encoder_dir)
    max_length = _max_length(spec, tokenizer, config.max_position_embeddings)
    if causal:
        causal_scoring(tokenizer, config.model_type, spec.logit_score, str(model_dir))  # refused here, not later
        card = PoolingCard(dim=1, max_length=max_length, task="classify", labels=("LABEL_0",),
                           activation=_activation(config, labels=1))  # fmt: skip
        return _Described(spec, config, tokenizer, "causal", card)
    if not classifier:
        card = PoolingCard(dim=config.hidden_size * len(spec.pooling), max_length=max_length)
        return _Described(spec, config, tokenizer, "embed", card)
    labels = tuple(str(config.id2label.get(i, f"LABEL_{i}")) for i in range(config.num_labels))
    card = PoolingCard(dim=config.num_labels, max_length=max_length, task="classify", labels=labels,
                       activation=_activation(config))  # fmt: skip
    return _Described(spec, config, tokenizer, "classify", card)


def _activation(config: object, labels: int | None = None) -> Activation:
    """The activation sentence-transformers' CrossEncoder gives this classifier's scores: the one its config names
    where torch has it, else sigmoid for one label (a decoder reranker's one score, whatever its config's
    `num_labels`) and identity for more."""
    named = (getattr(config, "sentence_transformers", None) or {}).get("activation_fn") or getattr(
        config, "sbert_ce_default_activation_function", None
    )
    if named in _ACTIVATIONS:
        return _ACTIVATIONS[named]
    return "sigmoid" if (labels or getattr(config, "num_labels", 1)) == 1 else "identity"


def _max_length(spec: EncoderSpec, tokenizer: PreTrainedTokenizerBase, positions: int) -> int:
    """sentence_bert_config.json's max_seq_length, else the tokenizer's model_max_length (a huge sentinel when
    unset), and never more than the position table."""
    return min(spec.max_seq_length or tokenizer.model_max_length, positions)
