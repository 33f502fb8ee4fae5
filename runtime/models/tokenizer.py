"""Tokenizer and chat-template loading for both model formats, through `transformers`.

A Hugging Face directory carries tokenizer.json / tokenizer_config.json; a GGUF file carries the vocabulary,
merges and chat template in its metadata, which transformers turns into a fast tokenizer. Building one from GGUF
metadata takes seconds (transformers re-reads the whole file), so a GGUF that sits alone in a directory next to
saved tokenizer files (as the model cache leaves it) loads its tokenizer from those files instead."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from sagellm.runtime.models.loaded import ModelLoadError, describe

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def load_hf_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a Hugging Face model directory."""
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"{model_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    return _auto_tokenizer(model_dir, model_dir)


def load_gguf_tokenizer(gguf_path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a GGUF file: from saved tokenizer files beside it when it is the only .gguf in its
    directory, else built from the file's own metadata."""
    if _has_sidecar_tokenizer(gguf_path):
        return _auto_tokenizer(gguf_path.parent, gguf_path)
    try:
        return _auto_tokenizer(gguf_path.parent, gguf_path, gguf_file=gguf_path.name)
    except ModelLoadError:
        # AutoTokenizer reads the model's whole config to choose a tokenizer class, and transformers' reader of it
        # fails on some families' metadata (gpt-oss's rope scaling keys); the tokenizer itself needs none of it.
        return _fast_tokenizer(gguf_path)


def _fast_tokenizer(gguf_path: Path) -> PreTrainedTokenizerBase:
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
        )
    except Exception as e:  # as in _auto_tokenizer
        raise ModelLoadError(f"{gguf_path}: cannot load tokenizer: {describe(e)}") from e


def _has_sidecar_tokenizer(gguf_path: Path) -> bool:
    directory = gguf_path.parent
    alone = [p.name for p in directory.glob("*.gguf")] == [gguf_path.name]
    return alone and (directory / "tokenizer.json").is_file()


def read_hf_chat_template(model_dir: Path) -> str | None:
    """The chat template of a Hugging Face directory without building its tokenizer: chat_template.jinja, else
    tokenizer_config.json's `chat_template` (a string, or a list of named templates of which we take "default")."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config_path = model_dir / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    try:
        template = json.loads(config_path.read_text(encoding="utf-8")).get("chat_template")
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{config_path}: invalid JSON: {e}") from e
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def _auto_tokenizer(directory: Path, source: Path, **kwargs: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, **kwargs)
    except Exception as e:  # transformers raises many unrelated types for a bad tokenizer; report them all alike
        raise ModelLoadError(f"{source}: cannot load tokenizer: {describe(e)}") from e


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """A prompt's token ids, the model's special tokens added: `tokenizer.encode(text)`. A fast tokenizer's Rust
    encoder is called directly, which gives the same ids without the Python wrapper's per-call work (a third of the
    cost of a chat-sized prompt, paid on the gateway's event loop for every request), and without the character
    offsets a prompt's ids never need (`encode_batch_fast`, where the installed `tokenizers` has it)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return tokenizer.encode(text, add_special_tokens=True)
    if hasattr(backend, "encode_batch_fast"):
        return backend.encode_batch_fast([text], add_special_tokens=True)[0].ids
    return backend.encode(text, add_special_tokens=True).ids
