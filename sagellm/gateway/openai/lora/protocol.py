"""The bodies of vLLM's `POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter`, in vLLM's shapes; a field
neither names is a 400 rather than ignored."""

from __future__ import annotations

import msgspec


class LoadLoraAdapter(msgspec.Struct, forbid_unknown_fields=True):
    lora_name: str
    lora_path: str
    base_model_name: str | None = None  # a model loaded on demand (None: the graph's)


class UnloadLoraAdapter(msgspec.Struct, forbid_unknown_fields=True):
    lora_name: str
    lora_int_id: int | None = None  # vLLM's body may carry it; the name says which
