"""Prompt logprobs: each prompt token's logprob given the tokens before it, scored from the rows a step computes.

A sequence whose prompt is scored (`SamplingParams.prompt_logprobs`) gets the runner's rows of its prompt positions
before its sampled row; they are scored here, between running the model and sampling, and only the sampled rows go
on to the sampler, so sampling never sees a prompt row."""

from __future__ import annotations

import torch

from sagellm.runtime.engine.sampler import token_logprobs
from sagellm.runtime.engine.scheduler import ScheduledBatch

SCORED_ROWS_AT_ONCE = 256  # prompt positions scored per log_softmax: bounds its [rows, vocab] copy on long prompts


def score_prompts(logits: torch.Tensor, batch: ScheduledBatch) -> torch.Tensor:
    """Scores the prompt tokens of the rows the runner put before each sequence's sampled rows (into
    `Sequence.prompt_logprobs`); returns the sampled rows' logits alone (`logits` itself where none were scored)."""
    scored = [seq.prompt_scored_positions(n) for seq, n in zip(batch.seqs, batch.num_new_tokens)]
    if not any(scored):
        return logits
    sampled_rows: list[int] = []
    row = 0
    for seq, n, positions in zip(batch.seqs, batch.num_new_tokens, scored):
        targets = torch.tensor([seq.token_ids[p + 1] for p in positions], device=logits.device)
        for start in range(0, len(positions), SCORED_ROWS_AT_ONCE):
            rows = slice(row + start, row + min(start + SCORED_ROWS_AT_ONCE, len(positions)))
            part = targets[start : start + SCORED_ROWS_AT_ONCE]
            top_n = [seq.params.prompt_logprobs] * len(part)
            seq.prompt_logprobs += token_logprobs(logits[rows], part, top_n, ranked=True)
        row += len(positions)
        width = seq.num_sampled_rows(n)
        sampled_rows.extend(range(row, row + width))
        row += width
    return logits[sampled_rows]
