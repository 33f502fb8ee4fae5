"""Loads an embedding model from disk, offline: the encoder and its tokenizer through `transformers`, plus the
pooling/normalization spec and the longest input it accepts.

Only encoders (model types transformers can run as a masked LM: BERT, RoBERTa, MPNet, ...) are accepted: a
decoder directory would load but pool into meaningless vectors, so it is refused with a one-line ModelLoadError."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sagellm.runtime.embedding.spec import EncoderSpec, read_encoder_spec
from sagellm.runtime.models.loaded import ModelLoadError, describe
from sagellm.runtime.models.tokenizer import load_hf_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class LoadedEncoder:
    model: PreTrainedModel  # in eval mode, float32
    tokenizer: PreTrainedTokenizerBase
    spec: EncoderSpec
    max_length: int  # longest input in tokens, special tokens included
    dim: int  # length of the pooled vector
    vocab_size: int  # rows of the token embedding: token-id inputs must be below it


def load_encoder(model_dir: Path) -> LoadedEncoder:
    """The encoder in `model_dir`, a sentence-transformers directory or a plain Hugging Face encoder directory."""
    from transformers import AutoConfig, AutoModel
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
    if config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES or getattr(config, "is_decoder", False):
        raise ModelLoadError(
            f"{spec.encoder_dir}: {config.model_type} is not an encoder model; embeddings need a BERT-style encoder "
            "such as all-minilm-l6-v2"
        )
    try:
        model = AutoModel.from_pretrained(spec.encoder_dir, config=config, local_files_only=True, dtype=torch.float32)
    except Exception as e:
        raise ModelLoadError(f"{spec.encoder_dir}: cannot load the encoder weights: {describe(e)}") from e
    tokenizer = load_hf_tokenizer(spec.encoder_dir)
    return LoadedEncoder(
        model=model.eval(),
        tokenizer=tokenizer,
        spec=spec,
        max_length=_max_length(spec, tokenizer, config.max_position_embeddings),
        dim=config.hidden_size * len(spec.pooling),
        vocab_size=model.get_input_embeddings().num_embeddings,
    )


def _max_length(spec: EncoderSpec, tokenizer: PreTrainedTokenizerBase, positions: int) -> int:
    """sentence_bert_config.json's max_seq_length, else the tokenizer's model_max_length (a huge sentinel when
    unset), and never more than the position table."""
    return min(spec.max_seq_length or tokenizer.model_max_length, positions)
