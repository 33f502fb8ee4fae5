"""The benchmark workloads of benchmarks/README.md (W1, W2) as data, and their prompts: seeded random token ids.

Random ids (special tokens excluded, exactly `input_len` of them) give every engine bit-identical inputs with no
text round trip, and no two prompts share a prefix block, so a prefix cache cannot turn a throughput run into a
cache-hit run. The serving benchmarks draw their prompts from here too, so offline and online numbers compare."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sagellm.common.errors import InvalidInput

if TYPE_CHECKING:  # `sagellm --help` and every command import this module; transformers is slow to import
    from transformers import PreTrainedTokenizerBase

W1_NUM_PROMPTS = 64
W1_C1_NUM_PROMPTS = 8
W2_BATCH_SIZES = (16, 64)
WORKLOAD_GROUPS = ("w1-c16", "w1-c1", "w2")


@dataclass(frozen=True)
class Workload:
    """One measured shape. `max_concurrency` is how many requests an engine may run at once: our engine's
    `max_num_seqs` and transformers' batch size. With `one_at_a_time` the client submits a request only when the
    previous one has finished (TTFT then has no queueing in it); otherwise every request arrives at the start."""

    name: str
    num_prompts: int
    input_len: int
    output_len: int
    max_concurrency: int
    one_at_a_time: bool = False

    def __post_init__(self) -> None:
        for field_name in ("num_prompts", "input_len", "output_len", "max_concurrency"):
            if getattr(self, field_name) < 1:
                raise InvalidInput(f"workload {self.name}: {field_name} must be >= 1, got {getattr(self, field_name)}")

    @property
    def batch_size(self) -> int:
        """The most requests actually in flight together."""
        return min(self.max_concurrency, self.num_prompts)


def standard_workloads(
    groups: Sequence[str] = WORKLOAD_GROUPS,
    *,
    input_len: int = 256,
    output_len: int = 128,
    max_num_prompts: int | None = None,
) -> list[Workload]:
    """W1-c16, W1-c1 and W2 (one workload per W2 batch size) for the named groups. `max_num_prompts` caps every
    workload's prompt count (quick runs); W2 sizes that collapse to the same count after the cap are kept once."""
    unknown = [g for g in groups if g not in WORKLOAD_GROUPS]
    if unknown:
        raise InvalidInput(f"unknown workload(s) {unknown}; choose from {', '.join(WORKLOAD_GROUPS)}")

    def cap(n: int) -> int:
        return n if max_num_prompts is None else min(n, max_num_prompts)

    workloads: list[Workload] = []
    for group in groups:
        if group == "w1-c16":
            workloads.append(Workload("w1-c16", cap(W1_NUM_PROMPTS), input_len, output_len, max_concurrency=16))
        elif group == "w1-c1":
            n = cap(W1_C1_NUM_PROMPTS)
            workloads.append(Workload("w1-c1", n, input_len, output_len, max_concurrency=1, one_at_a_time=True))
        else:
            for n in dict.fromkeys(cap(size) for size in W2_BATCH_SIZES):
                workloads.append(Workload(f"w2-{n}", n, input_len, output_len, max_concurrency=n))
    return workloads


def offline_w1_c16(llm, num_prompts: int = W1_NUM_PROMPTS, seed: int = 0) -> tuple[int, float]:
    """W1-c16 through `llm.generate` (an `LLM` whose max_num_seqs is 16): random 256-token prompts, 128 tokens each,
    EOS ignored, greedy. Returns (output tokens, seconds)."""
    import time

    from sagellm import SamplingParams

    prompts = random_token_prompts(llm.tokenizer, num_prompts, 256, seed)
    start = time.perf_counter()
    outputs = llm.generate(prompts, SamplingParams(max_tokens=128, temperature=0, ignore_eos=True))
    return sum(len(o.outputs[0].token_ids) for o in outputs), time.perf_counter() - start


def random_token_prompts(
    tokenizer: PreTrainedTokenizerBase, num_prompts: int, input_len: int, seed: int | Sequence[int]
) -> list[list[int]]:
    """`num_prompts` lists of exactly `input_len` token ids, uniform over the vocabulary minus special and added
    tokens (a stray <|im_end|> would change what the model does). `seed` may be a tuple, e.g. (seed, workload,
    repeat), so every run gets fresh prompts that are still reproducible."""
    excluded = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    allowed = np.array([i for i in range(len(tokenizer)) if i not in excluded], dtype=np.int64)
    if allowed.size == 0:
        raise InvalidInput("the tokenizer has no ordinary (non-special) tokens to draw prompts from")
    rng = np.random.default_rng(list(seed) if isinstance(seed, Sequence) else seed)
    picks = rng.integers(0, allowed.size, size=(num_prompts, input_len))  # [N, L] indices into `allowed`
    return allowed[picks].tolist()
