"""The prompts of `sagellm bench serve`: vLLM's `random` dataset (random token ids decoded to text) or a JSONL file.

Random prompts take their token ids from `workloads.random_token_prompts` (special tokens excluded), so the serving
and offline benchmarks send the same kind of input. A server receives text, and decoding then re-encoding random ids
can merge or split tokens, so each prompt is re-encoded and trimmed or topped up until it encodes to its target
length (or as close as a few rounds get), and the length it really has is recorded. A shared prefix
(`--random-prefix-len`) is decoded once and starts every prompt as the same text, so a prefix cache can reuse it."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sagellm.benchmarks.workloads import random_token_prompts
from sagellm.common.errors import InvalidInput

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FIT_ROUNDS = 4  # decode/encode rounds to bring a prompt to its target length; random text settles in one or two


class DatasetError(InvalidInput):
    """The prompts asked for cannot be made: a bad length or ratio, or a malformed JSONL file."""


@dataclass(frozen=True)
class SampleRequest:
    prompt: str
    prompt_len: int | None  # tokens by the benchmark's tokenizer; None when none was loaded (a JSONL run)
    output_len: int  # the request's max_tokens


def load_tokenizer(name_or_path: str | None) -> PreTrainedTokenizerBase:
    """The tokenizer of a model path or cache alias (default: our default model), read without its weights."""
    from sagellm.runtime.models.loader import load_model
    from sagellm.runtime.models.model_cache import DEFAULT_MODEL, resolve_model

    meta = load_model(resolve_model(name_or_path or DEFAULT_MODEL), load_weights=False)
    if meta.tokenizer is None:
        raise DatasetError(f"{meta.source}: the model has no tokenizer; pass --tokenizer with one")
    return meta.tokenizer


def random_requests(
    tokenizer: PreTrainedTokenizerBase,
    num_prompts: int,
    input_len: int,
    output_len: int,
    *,
    range_ratio: float = 0.0,
    prefix_len: int = 0,
    seed: int | Sequence[int] = 0,
) -> list[SampleRequest]:
    """vLLM's random dataset: each prompt `prefix_len` shared tokens then a unique part of about `input_len` tokens;
    unique and output lengths uniform in [len * (1 - range_ratio), len * (1 + range_ratio)]."""
    if num_prompts < 1 or input_len < 1 or output_len < 1 or prefix_len < 0:
        raise DatasetError(
            f"need num_prompts, input_len, output_len >= 1 and prefix_len >= 0; got {num_prompts}, {input_len}, "
            f"{output_len}, {prefix_len}"
        )
    if not 0.0 <= range_ratio < 1.0:
        raise DatasetError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    seeds = list(seed) if isinstance(seed, Sequence) else [seed]
    rng = np.random.default_rng([*seeds, 0])
    input_lens, output_lens = (_lengths(rng, n, range_ratio, num_prompts) for n in (input_len, output_len))
    ids = random_token_prompts(tokenizer, num_prompts, int(input_lens.max()), [*seeds, 1])  # [N, max input len]
    prefix = _fit(tokenizer, random_token_prompts(tokenizer, 1, prefix_len, [*seeds, 2])[0]) if prefix_len else ""
    requests = []
    for row, n, out in zip(ids, input_lens.tolist(), output_lens.tolist()):
        prompt = prefix + _fit(tokenizer, row[:n])
        requests.append(SampleRequest(prompt, len(tokenizer.encode(prompt, add_special_tokens=False)), out))
    return requests


def jsonl_requests(
    path: Path, num_prompts: int | None, default_output_len: int, tokenizer: PreTrainedTokenizerBase | None = None
) -> list[SampleRequest]:
    """One request per line: {"prompt": str, "output_len" or "max_tokens": int (default `default_output_len`)}.
    `num_prompts` takes the first lines, cycling through the file again when it asks for more lines than it has."""
    requests = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            prompt, out = item["prompt"], int(item.get("output_len", item.get("max_tokens", default_output_len)))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise DatasetError(f"{path}:{number}: need a JSON object with a 'prompt' ({error!r})") from error
        if not isinstance(prompt, str) or out < 1:
            raise DatasetError(f"{path}:{number}: 'prompt' must be a string and the output length >= 1")
        prompt_len = len(tokenizer.encode(prompt, add_special_tokens=False)) if tokenizer is not None else None
        requests.append(SampleRequest(prompt, prompt_len, out))
    if not requests:
        raise DatasetError(f"{path}: no requests in the file")
    if num_prompts is None:
        return requests
    return [requests[i % len(requests)] for i in range(num_prompts)]


def _lengths(rng: np.random.Generator, length: int, ratio: float, n: int) -> np.ndarray:
    low, high = max(1, math.floor(length * (1 - ratio))), max(1, math.floor(length * (1 + ratio)))
    return rng.integers(low, high + 1, size=n)  # [N]


def _fit(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    """Text that encodes to len(ids) tokens: decode, re-encode, trim the excess or top up from `ids`, repeat."""
    target, text = len(ids), tokenizer.decode(ids)
    for _ in range(FIT_ROUNDS):
        got = tokenizer.encode(text, add_special_tokens=False)
        if len(got) == target:
            break
        text = tokenizer.decode(got[:target] if len(got) > target else got + ids[len(got) :])
    return text
