"""The numerical oracle for engine tests: plain greedy decoding with a Hugging Face model's own forward.

A hand-written loop rather than `generate`, so nothing (EOS suppression by min_new_tokens, generation-config
defaults) changes which token is the argmax: it is exactly what `ignore_eos` greedy decoding must produce."""

from __future__ import annotations

import torch


@torch.no_grad()
def hf_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    past, out = None, []
    for _ in range(num_tokens):
        result = model(ids if past is None else ids[:, -1:], past_key_values=past, use_cache=True)
        past = result.past_key_values
        token = int(result.logits[0, -1].argmax())
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def assert_last_logits_match(engine, model, prompts: list[list[int]]) -> None:
    """One prefill step of `prompts` as a batch through `engine`'s runner: each prompt's last-position logits equal
    the Hugging Face `model`'s within fp32 tolerance. The blocks are freed after, so the engine can go on."""
    from sagellm import SamplingParams
    from sagellm.runtime.engine.scheduler import ScheduledBatch
    from sagellm.runtime.engine.sequence import Sequence

    batch = ScheduledBatch()
    for i, prompt in enumerate(prompts):
        seq = Sequence(f"logits-{i}", prompt, SamplingParams(max_tokens=1))
        assert engine.scheduler.block_manager.allocate(seq, len(prompt))
        batch.seqs.append(seq)
        batch.num_new_tokens.append(len(prompt))
    ours = engine.runner.execute(batch)  # [N, V]: each prompt's last position
    for seq in batch.seqs:
        engine.scheduler.block_manager.free(seq)
    for row, prompt in zip(ours, prompts):
        with torch.no_grad():
            ref = model(torch.tensor([prompt])).logits[0, -1]
        assert torch.allclose(row, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item()), (row - ref).abs().max()
