"""vLLM's `LoRARequest`: the LoRA adapter a request is generated with, named by the caller (`LLM.generate(...,
lora_request=...)`) or by the gateway (a request's `model` naming an adapter it serves, carried as `Request.lora`).

It is both the API type and the wire form, as vLLM's is (a msgspec Struct there too): a request crosses processes
with it, and every engine that runs the request (a prefill and a decode worker alike) reads the adapter's directory
on first use into the one parsed type, `lora_adapter.LoraAdapter` (`lora_slots.LoraSlots.adapter`).

`lora_digest` is the adapter's `lora_digest.adapter_digest` as the gateway computed it when it added the adapter: the
router (route, pd_split) hashes the request's prompt under it to predict the blocks the engine will name, having no
weights of its own to digest. The engine never trusts it: it hashes under the digest of the weights it read itself."""

from __future__ import annotations

import msgspec


class LoRARequest(msgspec.Struct, frozen=True, array_like=True):
    """An adapter by its served name, an id unique to it, and its PEFT directory: `LoRARequest(name, id, path)`;
    the gateway's also carry the digest of its weights (None where the sender has none)."""

    lora_name: str
    lora_int_id: int
    lora_path: str
    lora_digest: str | None = None
