"""An engine's KV events (`kv_events_config`) over real ZeroMQ: a subscriber that follows the stream, is dropped
mid-run and comes back (healed by replay, or by the snapshot once the ring has moved on), ends holding exactly the
blocks the engine holds, per medium and group: its pages' cached blocks ("GPU"), its RAM tier's ("CPU") and the disk
files it knows ("DISK") -- after a mixed run of prompts, evictions down the tiers, a sleep and a damaged file."""

from __future__ import annotations

import pytest

from sagellm import LLM, SamplingParams
from sagellm.runtime.engine.kv_events.subscriber import KvEventSubscriber
from sagellm.runtime.engine.kv_events.wire import CPU, DISK, GPU
from sagellm.runtime.engine.kv_tiers.block_payloads import FULL, SLIDING
from tests import tiny_models
from tests.oracle import ENGINE_BACKEND, random_prompts

BS = 4
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
GROUPS = {FULL: 0, SLIDING: 1}


def events_config(buffer_steps: int) -> dict:
    return {"enable_kv_cache_events": True, "endpoint": "tcp://127.0.0.1:0", "replay_endpoint": "tcp://127.0.0.1:0",
            "buffer_steps": buffer_steps}  # fmt: skip


def engine_sets(llm: LLM) -> dict[tuple[str, int], set[int]]:
    """What the engine holds, read from its own state: the block managers' cached hashes, RAM's keys, the disk's
    files (one instance owns the directory here, so the files are what it knows)."""
    engine = llm.engine
    engine.scheduler.tiers.store.disk.flush(30)
    engine.kv_events.flush()
    blocks = engine.scheduler.block_manager
    managers = (blocks.full, blocks.sliding) if hasattr(blocks, "sliding") else (blocks,)
    sets: dict[tuple[str, int], set[int]] = {}
    for group_idx, manager in enumerate(managers):
        sets[(GPU, group_idx)] = set(manager.cached_hashes)
    store = engine.scheduler.tiers.store
    for key in store.ram.held():
        if key.group in GROUPS:
            sets.setdefault((CPU, GROUPS[key.group]), set()).add(key.block_hash)
    for key in store.disk.published():
        if key.group in GROUPS:
            sets.setdefault((DISK, GROUPS[key.group]), set()).add(key.block_hash)
    return {place: held for place, held in sets.items() if held}


@pytest.mark.parametrize("family, buffer_steps", [("llama", 10_000), ("llama", 4), ("gpt_oss", 10_000)])
def test_a_subscriber_dropped_mid_run_ends_holding_exactly_what_the_engine_holds(tmp_path, family, buffer_steps):
    make = {"llama": tiny_models.make_tiny_llama, "gpt_oss": tiny_models.make_tiny_gpt_oss}[family]
    path = make(tmp_path / "hf")
    llm = LLM(str(path), backend=ENGINE_BACKEND, block_size=BS, num_kv_blocks=40, max_num_seqs=2,
              kv_offload_ram_gb=0.0004, kv_offload_dir=str(tmp_path / "kv"),
              kv_events_config=events_config(buffer_steps))  # fmt: skip
    publisher = llm.engine.kv_events.publisher
    vocab = llm.engine.model.config.vocab_size
    subscriber = KvEventSubscriber(publisher.endpoint, publisher.replay_endpoint)
    prompts = random_prompts(vocab, [30, 45, 60, 20, 50, 37, 44, 29], seed=1)
    llm.generate(prompts[:3], GREEDY)
    subscriber.poll(0.5)
    blocks = subscriber.blocks
    subscriber.close()  # dropped: what follows it misses
    llm.generate(prompts[3:6], GREEDY)
    assert llm.engine.release_kv_cache()  # a sleep: the pages go, RAM and disk keep theirs
    llm.engine.restore_kv_cache()
    llm.generate([prompts[0] + prompts[6]], GREEDY)  # a returning prefix: loaded from the tiers
    damaged = next((tmp_path / "kv").rglob("*.kvb"))
    damaged.write_bytes(damaged.read_bytes()[:-9])
    llm.generate([prompts[1] + prompts[7], *prompts[2:4]], GREEDY)
    again = KvEventSubscriber(publisher.endpoint, publisher.replay_endpoint, blocks=blocks)
    expected = engine_sets(llm)
    llm.generate([], GREEDY)
    again.poll(0.5)
    again.sync()
    assert {place: set(held) for place, held in again.blocks.sets.items()} == expected
    assert {m for m, _ in expected} == {GPU, CPU, DISK}  # every medium took part
    assert (again.snapshots > 0) == (buffer_steps == 4)  # healed by a replay, or past the ring by the snapshot
    again.close()
    llm.engine.close()
