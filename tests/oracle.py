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
