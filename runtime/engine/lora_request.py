"""vLLM's `LoRARequest`: the LoRA adapter a request is generated with, named by the caller (`LLM.generate(...,
lora_request=...)`) or by the gateway (a request's `model` naming an adapter it serves, carried as `Request.lora`).

It is both the API type and the wire form, as vLLM's is (a msgspec Struct there too): a request crosses processes
with it, and every engine that runs the request (a prefill and a decode worker alike) reads the adapter's directory
on first use into the one parsed type, `lora_adapter.LoraAdapter` (`lora_slots.LoraSlots.adapter`)."""

from __future__ import annotations

import msgspec


class LoRARequest(msgspec.Struct, frozen=True, array_like=True):
    """An adapter by its served name, an id unique to it, and its PEFT directory: `LoRARequest(name, id, path)`."""

    lora_name: str
    lora_int_id: int
    lora_path: str
