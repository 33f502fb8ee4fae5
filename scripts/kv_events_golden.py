"""Golden KV event payloads from vLLM's own structs and encoder, and the proof that vLLM decodes ours.

Run with the pinned vLLM's interpreter (the version `runtime/engine/kv_events/wire.py` names):

    /tmp/peers/venv-vllm/bin/python scripts/kv_events_golden.py write   # tests/engine/data/kv_events/*.msgpack + .json
    /tmp/peers/venv-vllm/bin/python scripts/kv_events_golden.py verify  # vLLM decodes what our wire.py encodes

`write` encodes each batch below with vLLM's `msgspec.msgpack.Encoder` (what `ZmqEventPublisher` sends) and writes
`NAME.msgpack` (the payload) beside `NAME.json` (`{"vllm", "what", "batch"}`, the batch as JSON builtins) from which
the tests build the same batch with our structs. `verify` loads our wire.py by path (it imports only msgspec), builds
each batch with our structs, encodes it with our encoder and decodes it with vLLM's decoder, which must give what
vLLM's decoder gives for vLLM's own payload (and the bytes must be the same); it exits 1 on the first difference."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import msgspec
import vllm
from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "engine" / "data" / "kv_events"
WIRE = ROOT / "runtime" / "engine" / "kv_events" / "wire.py"

H1, H2, H3, H4 = 0x0123_4567_89AB_CDEF, 0xFFFF_FFFF_FFFF_FFFF, 7, 0x8000_0000_0000_0000  # u64 edges: msgpack uint64


def batches() -> dict[str, tuple[str, KVEventBatch]]:
    """name -> (what it covers, the batch)."""
    tokens = list(range(100, 132))
    return {
        "stored_plain": (
            "two full blocks, no parent, no LoRA, no extra keys, group 0, GPU; rank omitted (default)",
            KVEventBatch(ts=1_700_000_000.25, events=[
                BlockStored(block_hashes=[H1, H2], parent_block_hash=None, token_ids=tokens, block_size=16,
                            lora_id=None, medium="GPU", lora_name=None, group_idx=0),
            ]),
        ),
        "stored_full": (
            "every BlockStored field set: parent, LoRA, per-block extra keys (mm pairs, salt, None), sliding window",
            KVEventBatch(ts=12.5, data_parallel_rank=3, events=[
                BlockStored(block_hashes=[H3, H4, H1], parent_block_hash=H2, token_ids=list(range(12)), block_size=4,
                            lora_id=2, medium="CPU", lora_name="sql-lora",
                            extra_keys=[("sql-lora", ("ab12", 0), "salt"), None, ("sql-lora",)], group_idx=1,
                            kv_cache_spec_kind="sliding_window", kv_cache_spec_sliding_window=4096,
                            locality="LOCAL", ownership="tier-ram", session_id="s-1"),
            ]),
        ),
        "removed": (
            "removals per medium: group given and omitted, locality and ownership set; rank 0 (sent: not the default)",
            KVEventBatch(ts=0.0, data_parallel_rank=0, events=[
                BlockRemoved(block_hashes=[H1], medium="GPU", group_idx=0),
                BlockRemoved(block_hashes=[H2, H3], medium="DISK"),
                BlockRemoved(block_hashes=[H4], medium="CPU", group_idx=1, locality="REMOTE", ownership="o"),
            ]),
        ),
        "cleared_reannounce": (
            "AllBlocksCleared then the RAM and DISK blocks still held, as a snapshot and a sleep send them",
            KVEventBatch(ts=3.0, data_parallel_rank=1, events=[
                AllBlocksCleared(),
                BlockStored(block_hashes=[H1], parent_block_hash=None, token_ids=[1, 2], block_size=2, lora_id=None,
                            medium="CPU", lora_name=None, group_idx=0),
                BlockStored(block_hashes=[H2], parent_block_hash=H1, token_ids=[3, 4], block_size=2, lora_id=None,
                            medium="DISK", lora_name=None, group_idx=0),
            ]),
        ),
        "bytes_hashes": (
            "vLLM's default sha256 hash form (bytes), which a subscriber of vLLM instances must read too",
            KVEventBatch(ts=4.75, events=[
                BlockStored(block_hashes=[b"\x01" * 32], parent_block_hash=b"\x02" * 32, token_ids=[5], block_size=1,
                            lora_id=None, medium="GPU", lora_name=None, group_idx=0),
                BlockRemoved(block_hashes=[b"\x01" * 32], medium="GPU", group_idx=0),
            ]),
        ),
        "empty": ("a batch with no events", KVEventBatch(ts=5.0, events=[])),
    }  # fmt: skip


def write() -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    encoder = msgspec.msgpack.Encoder()  # what vLLM's ZmqEventPublisher encodes with
    for name, (what, batch) in batches().items():
        (DATA / f"{name}.msgpack").write_bytes(encoder.encode(batch))
        described = {"vllm": vllm.__version__, "what": what, "batch": msgspec.to_builtins(batch)}
        (DATA / f"{name}.json").write_text(json.dumps(described, indent=1) + "\n")
        print(f"wrote {name}.msgpack ({len(encoder.encode(batch))} bytes)")


def verify() -> None:
    spec = importlib.util.spec_from_file_location("sagellm_kv_wire", WIRE)
    ours = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = ours  # msgspec resolves the structs' annotations through it
    spec.loader.exec_module(ours)
    vllm_encoder, vllm_decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(KVEventBatch)
    for name, (_, theirs) in batches().items():
        our_payload = ours.encode(msgspec.convert(msgspec.to_builtins(theirs), ours.KVEventBatch))
        decoded = vllm_decoder.decode(our_payload)
        expected = vllm_decoder.decode(vllm_encoder.encode(theirs))  # inner tuples of Any decode as lists: compare so
        same = decoded == expected and our_payload == vllm_encoder.encode(theirs)
        print(f"{name}: vLLM {vllm.__version__} decodes our payload {'to its batch' if same else 'DIFFERENTLY'}")
        if not same:
            print(f"  ours decoded: {decoded}\n  expected:     {expected}")
            sys.exit(1)
    print(f"ok: all {len(batches())} batches; our wire.py pins vLLM {ours.VLLM_VERSION}")


if __name__ == "__main__":
    modes = {"write": write, "verify": verify}
    if len(sys.argv) != 2 or sys.argv[1] not in modes:
        sys.exit(f"usage: {sys.argv[0]} write|verify")
    modes[sys.argv[1]]()
