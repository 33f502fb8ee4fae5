"""Tiny random sentence-transformers models for the embedding tests: a BERT encoder (safetensors + a WordPiece
tokenizer) saved with `transformers`, plus the modules.json / 1_Pooling / sentence_bert_config.json files that
sentence-transformers writes; and a decoder reranker (a tiny Qwen3 with "yes", "no" and Qwen3-Reranker's prompt as
its chat template). Built offline and deterministically; a model is about 100 KB."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch

from tests.tiny_models import make_tiny_qwen3, make_tokenizer

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world", "café", "你", "好", ".", "!"]
MAX_SEQ_LENGTH = 24  # sentence_bert_config.json's limit, below the 64 positions so the test can hit it cheaply


def make_tiny_bert(directory: Path, seed: int = 0, num_labels: int | None = None, **config_extra: object) -> Path:
    """A random 2-layer BertModel and its uncased WordPiece tokenizer (any ASCII word splits into letters); with
    `num_labels`, a BertForSequenceClassification (a cross-encoder with one label, a classifier with more), its
    `config_extra` in its config.json."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizer

    pieces = list(string.ascii_lowercase) + [f"##{c}" for c in string.ascii_lowercase + string.digits]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + WORDS + pieces + list(string.digits))}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
        **({} if num_labels is None else {"num_labels": num_labels}),
        **config_extra,
    )
    torch.manual_seed(seed)
    model = (BertModel if num_labels is None else BertForSequenceClassification)(config).eval()
    with torch.no_grad():  # BERT initializes weights tiny; larger ones make tokens' states differ visibly
        for param in model.parameters():
            param.normal_(0, 0.5)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_sentence_transformers_files(
    directory: Path, pooling: str | list[str] = "mean", *, normalize: bool = True, legacy: bool = True
) -> Path:
    """modules.json (Transformer, Pooling[, Normalize]), 1_Pooling/config.json (the legacy `pooling_mode_*`
    booleans or the newer `pooling_mode`) and sentence_bert_config.json, as sentence-transformers saves them."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (directory / "modules.json").write_text(json.dumps(modules))
    modes = [pooling] if isinstance(pooling, str) else pooling
    legacy_keys = {
        "cls": "cls_token",
        "max": "max_tokens",
        "mean": "mean_tokens",
        "mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    }
    config: dict[str, object] = {"word_embedding_dimension": 32}
    if legacy:
        config |= {f"pooling_mode_{key}": mode in modes for mode, key in legacy_keys.items()}
    else:
        config["pooling_mode"] = pooling
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(config))
    bert_config = {"max_seq_length": MAX_SEQ_LENGTH, "do_lower_case": False}
    (directory / "sentence_bert_config.json").write_text(json.dumps(bert_config))
    return directory


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain Hugging Face encoder directory (no sentence-transformers files)."""
    return make_tiny_bert(tmp_path_factory.mktemp("embedding") / "tiny-bert")


@pytest.fixture(scope="session")
def tiny_st_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT as a sentence-transformers model: mean pooling, normalized, at most 24 tokens."""
    directory = make_tiny_bert(tmp_path_factory.mktemp("embedding") / "tiny-st")
    return write_sentence_transformers_files(directory)


@pytest.fixture(scope="session")
def tiny_cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-label BertForSequenceClassification: a reranker as sentence-transformers' CrossEncoder loads it."""
    return make_tiny_bert(tmp_path_factory.mktemp("pooling") / "tiny-reranker", seed=1, num_labels=1)


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A three-label text classifier with named labels."""
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    return make_tiny_bert(
        tmp_path_factory.mktemp("pooling") / "tiny-classifier", seed=2, num_labels=3, id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )  # fmt: skip


RERANKER_TEMPLATE = (  # Qwen3-Reranker's prompt, with sentence-transformers' query and document roles
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n<Instruct>: Given a '
    "web search query, retrieve relevant passages that answer the query\n<Query>: "
    '{{ messages | selectattr("role", "eq", "query") | map(attribute="content") | first }}\n<Document>: '
    '{{ messages | selectattr("role", "eq", "document") | map(attribute="content") | first }}<|im_end|>\n'
    "<|im_start|>assistant\n<think>\n\n</think>\n\n"
)


def make_tiny_reranker(directory: Path, template: str | None = RERANKER_TEMPLATE) -> Path:
    """A tiny random Qwen3ForCausalLM with "yes" and "no" in its vocabulary and `template` as its chat template."""
    tokenizer = make_tokenizer()
    tokenizer.add_tokens(["yes", "no"])
    tokenizer.pad_token = "<|endoftext|>"  # as Qwen3-Reranker's
    make_tiny_qwen3(directory, vocab_size=len(tokenizer), max_position_embeddings=512)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(directory)
    if template is None:
        (directory / "chat_template.jinja").unlink(missing_ok=True)
    return directory
