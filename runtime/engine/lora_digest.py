"""The digest that names a LoRA adapter by what it computes: its scaling and its A and B of each weight it adapts.

A prompt's KV under an adapter depends on exactly these, so the prefix blocks of its requests are hashed under this
digest (`prefix_hash.effective_salt`), not under the adapter's name or path: an adapter file replaced at the same
path then finds none of the old file's KV (which would otherwise be served as the new one's once KV persists across
restarts), and equal weights find each other's under any name. Both sides compute it from the same parsed adapter
(`lora_adapter.read_lora_adapter`), so it is the same number whichever file format stored the weights: the engine
once when it reads an adapter (`lora_slots.LoraSlots`), the gateway once when it adds one (it carries the digest to
the router on `LoRARequest.lora_digest`)."""

from __future__ import annotations

import hashlib
import struct

import torch

from sagellm.runtime.models.lora_adapter import LoraAdapter


def adapter_digest(adapter: LoraAdapter) -> str:
    """32 hex digits of blake2b over the adapter's scaling and, in its weights' order, each weight's name, A and B
    (float32, as read): a pass over the adapter's bytes, read with values (a `values=False` read has none)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(struct.pack("<d", adapter.scaling))
    for name, factors in adapter.weights.items():
        digest.update(name.encode() + b"\x00")
        for factor in factors:  # A [r, in], B [out, r]
            if factor.is_meta:
                raise ValueError(f"LoRA adapter {adapter.name}: read without its weights' values; read it with them")
            digest.update(struct.pack("<2q", *factor.shape))
            digest.update(factor.detach().to("cpu", torch.float32).contiguous().numpy())
    return digest.hexdigest()
