"""Guided decoding's allowed-token masks for a step, filled in a thread while the model runs.

A grammar's mask costs ~13 us a request (grammar.py); filled one after another on the engine's thread, a step's
guided requests' masks would add to every step's time. So the engine asks for them as a future before it runs the
model (`fill`), and they are ready, or nearly, when the logits are (`apply`), as vLLM v1's structured-output manager
hands over its bitmask. A thinking budget forcing its closing tokens fills its row here too: one mask per row,
whoever constrains it."""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from sagellm.runtime.engine.grammar import mask_logits, new_masks
from sagellm.runtime.engine.request_state import RequestState
from sagellm.runtime.engine.scheduler import ScheduledBatch
from sagellm.runtime.engine.sequence import Sequence

Masks = Future[dict[str, torch.Tensor]]  # request id -> its row's bit-packed mask


class GuidedMasks:
    def __init__(self, requests: Mapping[str, RequestState], vocab_size: int) -> None:
        """`requests`: the engine's table, where each request's grammar or thinking budget is found."""
        self._requests = requests
        self._vocab = vocab_size
        self._filler: ThreadPoolExecutor | None = None  # started with the first guided step

    def fill(self, batch: ScheduledBatch) -> Masks | None:
        """Starts filling the masks of the guided requests this step samples; None when it samples none."""
        guided = [
            (seq.request_id, masker)
            for seq, n in zip(batch.seqs, batch.num_new_tokens)
            if seq.num_sampled_rows(n)
            and (state := self._requests.get(seq.request_id)) is not None
            and (masker := state.masker)
        ]
        if not guided:
            return None
        if self._filler is None:
            self._filler = ThreadPoolExecutor(1, thread_name_prefix="sagellm-guided-masks")
        vocab = self._vocab

        def fill() -> dict[str, torch.Tensor]:
            masks = new_masks(len(guided), vocab)
            for row, (_, matcher) in enumerate(guided):
                matcher.fill(masks, row)
            return {request_id: masks[row] for row, (request_id, _) in enumerate(guided)}

        return self._filler.submit(fill)

    @staticmethod
    def apply(logits: torch.Tensor, sampled: list[Sequence], masks: Masks) -> None:
        """Masks each guided sequence's row of `logits` (a guided sequence never speculates: one row each; the rows
        of the others' proposals are counted past), once the masks are filled."""
        by_request = masks.result()
        starts = [0]
        for seq in sampled:
            starts.append(starts[-1] + 1 + len(seq.spec_token_ids))
        guided = [i for i, seq in enumerate(sampled) if seq.request_id in by_request]
        rows = [starts[i] for i in guided]
        if rows:
            stacked = torch.stack([by_request[sampled[i].request_id] for i in guided])
            with torch.inference_mode():
                mask_logits(logits, stacked, rows)

    def close(self) -> None:
        if self._filler is not None:
            self._filler.shutdown(wait=False)
