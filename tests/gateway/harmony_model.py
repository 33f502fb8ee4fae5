"""A tiny random model that speaks Harmony's markers, for the gpt-oss tests: tests/tiny_models.py's tokenizer with
Harmony's seven markers added as special tokens (as gpt-oss's tokenizer has them), and `<|return|>` and `<|call|>`
its end-of-reply tokens (gpt-oss's generation_config lists them as EOS). Its weights are a random tiny gpt-oss's,
sized to the larger vocabulary; what it says is forced into a Harmony shape by a grammar in the tests."""

from __future__ import annotations

import json
from pathlib import Path

from tests.tiny_models import make_tiny_gpt_oss, make_tokenizer

HARMONY_TOKENS = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>")


def make_harmony_tokenizer(chat_template: str | None = None):
    """The tiny tokenizer with Harmony's markers as special tokens; `chat_template` its own (None: it has none)."""
    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(HARMONY_TOKENS)})
    tokenizer.chat_template = chat_template
    return tokenizer


def make_tiny_harmony(directory: Path, chat_template: str | None = None) -> Path:
    """A random tiny gpt-oss whose tokenizer speaks Harmony (`make_harmony_tokenizer`) and whose replies end at
    `<|return|>` or `<|call|>`."""
    tokenizer = make_harmony_tokenizer(chat_template)
    ends = tokenizer.convert_tokens_to_ids(["<|return|>", "<|call|>"])
    rope = {"rope_type": "default", "rope_theta": 150000.0}
    make_tiny_gpt_oss(directory, vocab_size=len(tokenizer), eos_token_id=ends, max_position_embeddings=2048,
                      rope_parameters=rope)  # fmt: skip
    (directory / "chat_template.jinja").unlink(missing_ok=True)  # the ChatML template of the tiny models: not this
    tokenizer.save_pretrained(directory)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": ends}), encoding="utf-8")
    return directory
