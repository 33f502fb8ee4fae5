"""A model whose pictures attend both ways in a prefill (Gemma 3: each image's placeholder tokens see one another,
as transformers' block mask over token_type_ids has them): where a prefill chunk may end, and which runs of image
tokens a chunk's attention opens up.

A query inside a picture's run sees every key of that run, the ones after it included, so the whole run must be in
the cache when any of it attends: a chunk never ends strictly inside a run. The scheduler cuts a chunk before the
run it would split, or, when the chunk starts inside one (a prefix-cache hit that ended mid-picture), stretches it
to the run's end; the kernel then lets each query of a run see the run's keys (`PrefillChunk.bidirectional`).
Audio clips stay causal: only "image" features are runs here."""

from __future__ import annotations

from sagellm.runtime.engine.sequence import Sequence


def image_runs(seq: Sequence) -> list[tuple[int, int]]:
    """The sequence's runs of image placeholder tokens, [start, end) positions in prompt order."""
    return [(f.offset, f.end) for f in seq.mm_features if f.modality == "image"]


def whole_runs_chunk(seq: Sequence, computed: int, n: int, budget: int) -> int:
    """`n`, the tokens proposed for `seq`'s chunk after its first `computed`, changed so that the chunk does not end
    strictly inside a picture's run: cut to end before the run when it starts before it, else (it starts at or inside
    the run) stretched to the run's end if that fits the step's `budget`, else 0 (the sequence waits for a step with
    room). Runs wholly inside the chunk, and chunks past the prompt's pictures, are left as they are."""
    end = computed + n
    for start, stop in image_runs(seq):
        if start < end < stop:
            if start > computed:
                return start - computed
            return stop - computed if stop - computed <= budget else 0
    return n


def chunk_runs(seq: Sequence, start: int, n: int) -> list[tuple[int, int]]:
    """The picture runs that overlap the chunk of positions [start, start + n), whole (their sequence positions):
    the spans whose queries the chunk's attention lets see every key of their run."""
    return [(s, e) for s, e in image_runs(seq) if s < start + n and e > start]
