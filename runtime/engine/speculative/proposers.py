"""Proposers: what guesses a sequence's next tokens for the target model to check. Each registers under the
`method` name of vLLM's `--speculative-config`; the engine makes one from the checked `SpeculativeConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from sagellm.backends.base import HardwareBackend
from sagellm.common.registry import Registry
from sagellm.runtime.engine.cache_geometry import CacheGeometry
from sagellm.runtime.engine.sequence import Sequence
from sagellm.runtime.engine.speculative.config import SpeculativeConfig
from sagellm.runtime.models.config import ModelConfig


@dataclass(frozen=True)
class TargetHead:
    """A head of the target model itself (its MTP head): its config and weights (the model's embeddings and lm_head
    among them), and the model's packed linears, which it binds as they are where it reads the same weights."""

    config: ModelConfig
    weights: dict[str, torch.Tensor]
    packed: dict[str, Any]


@dataclass(frozen=True)
class TargetStep:
    """A target step as a proposer may follow it (`Proposer.step_done`): each (sequence, first position, rows) it
    computed, in row order; the rows' final hidden states, where the target outputs them; and what it sampled and
    kept for each sequence, about to be appended."""

    computed: list[tuple[Sequence, int, int]]
    hidden_states: torch.Tensor | None
    new_tokens: dict[Sequence, list[int]]


@dataclass(frozen=True)
class ProposerContext:
    """What a proposer may need of the engine that runs it: a draft model runs beside the target, on its backend,
    with as many cache blocks of the same size (and, with recurrent layers, a state slot per running sequence), and
    must speak its tokenizer; an MTP head runs on the target's own block tables."""

    tokenizer: Any
    vocab_size: int
    backend: HardwareBackend
    cache: CacheGeometry  # the target's: a draft model's cache has as many blocks of the same size
    max_num_seqs: int = 256
    head: TargetHead | None = None


class Proposer:
    name: ClassVar[str]

    def __init__(self, config: SpeculativeConfig, context: ProposerContext | None = None) -> None:
        """`context`: the engine's, which a proposer running a model needs (n-gram lookup needs none)."""
        self.config = config
        self.context = context

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        """Up to `k` tokens guessed to follow `token_ids` (the prompt and the output so far); [] for no guess."""
        raise NotImplementedError

    def propose_batch(self, requests: list[tuple[Sequence, int]]) -> list[list[int]]:
        """Each (sequence, k)'s guess, in order."""
        return [self.propose(seq.token_ids, k) for seq, k in requests]

    def step_done(self, step: TargetStep) -> None:
        """After each target step, before its tokens are appended."""

    def keep_only(self, running: list[Sequence]) -> None:
        """After each step: the sequences the engine runs now; a proposer holding state per sequence lets go of the
        others' (finished, preempted, handed over)."""

    def close(self) -> None:
        """Releases what the proposer started."""


# method -> proposer class; `methods.make_proposer` imports every built-in one's module first.
PROPOSERS: Registry[type[Proposer]] = Registry("speculative method")


@PROPOSERS.register
class NgramProposer(Proposer):
    """Prompt lookup (vLLM's `ngram`, llama.cpp's lookup decoding): the sequence's last n tokens, for the longest n
    from prompt_lookup_max down to prompt_lookup_min, are looked for earlier in the sequence, and the tokens that
    followed an earlier occurrence are the guess. Free when the text repeats what came before (code edits,
    summaries quoting their source, RAG answers); a sequence whose suffix never recurs gets no guess, so it costs a
    search and no verification."""

    name = "ngram"

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        low, high = self.config.prompt_lookup_min, self.config.prompt_lookup_max
        length = len(token_ids)
        if k <= 0 or length <= low:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)
        # Candidate ends of an earlier occurrence: where the last token recurs, before the last position.
        ends = np.flatnonzero(tokens[:-1] == tokens[-1])
        if ends.size == 0:
            return []
        matched = np.ones(ends.size, dtype=bool)  # the occurrence ending at ends[i] matches the last n tokens
        best = ends if low == 1 else ends[:0]  # the ends matching the longest n >= low seen so far
        for n in range(2, min(high, length - 1) + 1):
            starts = ends - (n - 1)
            matched &= starts >= 0
            matched[matched] &= tokens[starts[matched]] == tokens[length - n]
            if not matched.any():
                break
            if n >= low:
                best = ends[matched]
        if best.size == 0:
            return []
        # The latest occurrence followed by k tokens (the nearest text), else the earliest (the longest guess: in a
        # repeating run the latest is right before the suffix).
        whole = best[best + k < length]
        follow = int(whole[-1] if whole.size else best[0]) + 1
        return token_ids[follow : follow + k]
