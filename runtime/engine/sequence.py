"""A request inside the engine: its tokens, how many of them are in the KV cache, and its cache blocks.

One counter drives everything (as in vLLM v1): `num_computed_tokens`. Prefill, chunked prefill, decode, prefix-cache
hits and recompute after preemption are all "compute tokens[num_computed_tokens:]"."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from sagellm.runtime.engine.peer_prefix import PeerPrefix
from sagellm.runtime.engine.penalties import BadWords
from sagellm.runtime.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from sagellm.runtime.models.lora_adapter import LoraAdapter
    from sagellm.runtime.multimodal.media_feature import MediaFeature


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    priority: int = 0  # lower runs first under the priority scheduling policy (vLLM's convention)
    arrival_time: float = field(default_factory=time.time)  # wall clock, as every RequestMetrics stamp
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens not computed here (prefix cache hits, KV imported from prefill)
    block_table: list[int] = field(default_factory=list)
    # A model whose sliding-window layers keep blocks of their own (window_blocks.py): its table there, as long as
    # `block_table`, with the blocks no query reads any more at the null block.
    window_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    # What the sampler's penalties read besides the tokens (`penalties.TokenHistory`): the request's bad_words as
    # token ids, indexed once when it is added, and how many of the prompt's last tokens are output an earlier run of
    # this request generated (a resume).
    bad_words: BadWords | None = None
    resumed_tokens: int = 0
    # With `prompt_logprobs`, the prompt's tokens scored so far (None first: nothing comes before it), filled from
    # the prefill's logits; None when this engine does not score them (not asked, or scored before a hand-over).
    prompt_logprobs: list | None = None
    # Tokens a proposer guessed to follow `token_ids` (speculative decoding), computed with the next token this step
    # and kept only as far as the target model agrees; never in `token_ids`, so prefix hashes see accepted tokens only.
    spec_token_ids: list[int] = field(default_factory=list)
    cache_salt: str | None = None  # its prefix blocks are shared only with prompts of the same salt (vLLM's)
    # The blocks the tiers under the prefix cache loaded for it (block id -> "ram", "disk" or "peer"), and once
    # admitted, its cached tokens by where they were: "pages", "ram", "disk", "peer" (None without tiers).
    cached_by_tier_blocks: dict[int, str] = field(default_factory=dict)
    cached_by_tier: dict[str, int] | None = None
    # Another instance holds more of its prefix (the router's word): fetched from there once, as it is first looked up
    peer_prefix: PeerPrefix | None = None
    state_slot: int = -1  # a model with recurrent layers: the slot of its states while it runs (state_slots.py)
    lora_adapter: LoraAdapter | None = None  # the LoRA adapter it is generated with
    lora_slot: int = -1  # the slot of that adapter's weights while it runs (lora_slots.py); -1: none
    group: str | None = None  # the `n` choices of one request share their prompt (admission_gates.ChoiceGroups)
    # ... and the states after its prompt a prefill worker computed, written into its slot when it is admitted
    imported_states: torch.Tensor | None = None
    # A prompt's images, in prompt order: where their placeholder tokens stand and what the encoder reads for them
    mm_features: list[MediaFeature] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_start(self) -> int:
        """Where the request's output starts in `token_ids`: a resumed prompt's last tokens are output too."""
        return self.num_prompt_tokens - self.resumed_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def scores_prompt(self) -> bool:
        """Whether prompt tokens are still to score: the prefill then computes every position's logits, its cached
        prefix included."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    def prompt_scored_positions(self, num_new_tokens: int) -> range:
        """The positions among the next `num_new_tokens` computed whose logits score a prompt token not scored yet
        (position p's logits give token p + 1's logprob); a recompute after preemption scores nothing twice."""
        if not self.scores_prompt:
            return range(0)
        start = max(self.num_computed_tokens, len(self.prompt_logprobs) - 1)
        return range(start, min(self.num_computed_tokens + num_new_tokens, self.num_prompt_tokens - 1))

    def scheduled_token_ids(self, num_new_tokens: int) -> list[int]:
        """The tokens the next `num_new_tokens` computed positions hold: the sequence's, then its proposed ones."""
        start = self.num_computed_tokens
        ids = self.token_ids[start : start + num_new_tokens]
        return ids + self.spec_token_ids[: num_new_tokens - len(ids)] if len(ids) < num_new_tokens else ids

    def num_sampled_rows(self, num_new_tokens: int) -> int:
        """How many of the next `num_new_tokens` computed positions sample a token: none mid-prompt, else the last
        token's and each proposed token's."""
        return 1 + len(self.spec_token_ids) if self.num_computed_tokens + num_new_tokens >= self.num_tokens else 0

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
