"""The tiers under the prefix cache (kv_tiers/), against transformers: a prefix evicted from the KV cache by other
prompts comes back from RAM, or from the disk, or after a restart from the disk alone, and the greedy tokens after it
are transformers' own, for a Llama, a Qwen3.5 (recurrent states come back with their blocks) and models whose
layers slide over a window (gpt-oss: a group of blocks of their own; Mistral: every layer slides)."""

from __future__ import annotations

import multiprocessing

import pytest
import torch
from transformers import AutoModelForCausalLM

from sagellm import LLM, SamplingParams
from sagellm.runtime.engine.prefix_hash import block_hashes
from tests import tiny_models
from tests.oracle import ENGINE_BACKEND, hf_greedy, random_prompts

TOKENS = 8
GREEDY = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)
BS = 4
FAMILIES = {
    "llama": tiny_models.make_tiny_llama,
    "qwen3_5": tiny_models.make_tiny_qwen3_5,
    "gpt_oss": tiny_models.make_tiny_gpt_oss,
    "mistral": tiny_models.make_tiny_mistral,
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    path = FAMILIES[request.param](tmp_path_factory.mktemp(request.param) / "hf")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return request.param, path, hf


def engine(path, tmp_path, ram_gb: float = 0.0, disk: bool = False) -> LLM:
    """An engine whose KV cache holds ~2 of the test's prompts: a third evicts the first."""
    kv_dir = str(tmp_path / "kv") if disk else None
    return LLM(str(path), backend=ENGINE_BACKEND, block_size=BS, num_kv_blocks=40, max_num_seqs=2,
               kv_offload_ram_gb=ram_gb, kv_offload_dir=kv_dir)  # fmt: skip


def evict(llm: LLM, vocab: int, seed: int) -> None:
    """Runs other prompts until nothing of an earlier one is left in the KV cache."""
    for prompt in random_prompts(vocab, [60, 60, 60], seed=seed):
        llm.generate([prompt], GREEDY)


@pytest.mark.parametrize("tier", ["ram", "disk"])
def test_an_evicted_prefix_comes_back_from_a_tier_and_decodes_as_transformers(family, tier, tmp_path):
    name, path, hf = family
    vocab = hf.config.vocab_size
    (prefix,) = random_prompts(vocab, [57], seed=1)
    llm = engine(path, tmp_path, ram_gb=0.05 if tier == "ram" else 0.0, disk=tier == "disk")
    llm.generate([prefix], GREEDY)
    evict(llm, vocab, seed=2)
    if tier == "disk":  # written by now (until then a block is served from the writer's queue, as from RAM)
        assert llm.engine.scheduler.tiers.store.disk.flush(30) == 0
    prompt = prefix + random_prompts(vocab, [5], seed=3)[0]
    out = llm.generate([prompt], GREEDY)[0]
    by_tier = out.metrics.cached_tokens_by_tier
    assert by_tier[tier] >= 32, by_tier  # most of the prefix, cut at a checkpoint or a window where needed
    assert out.metrics.num_cached_tokens == sum(by_tier.values())
    assert out.outputs[0].token_ids == hf_greedy(hf, prompt, TOKENS)
    llm.engine.close()


def test_a_restart_finds_the_prefix_on_disk(family, tmp_path):
    name, path, hf = family
    vocab = hf.config.vocab_size
    (prefix,) = random_prompts(vocab, [57], seed=4)
    first = engine(path, tmp_path, disk=True)
    first.generate([prefix], GREEDY)
    first.engine.close()  # a clean exit: the cached blocks go to the disk
    again = engine(path, tmp_path, disk=True)
    prompt = prefix + random_prompts(vocab, [5], seed=5)[0]
    out = again.generate([prompt], GREEDY)[0]
    assert out.metrics.cached_tokens_by_tier["disk"] >= 32, out.metrics.cached_tokens_by_tier
    assert out.outputs[0].token_ids == hf_greedy(hf, prompt, TOKENS)
    again.engine.close()


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign"])
def test_a_damaged_block_file_is_skipped_and_what_follows_recomputed(tmp_path, damage):
    """A block file flipped, cut short, or another model's put in its place: the prefix is served up to the block
    before it, the rest computed, the tokens transformers' own; the file is set aside, never read again."""
    path = tiny_models.make_tiny_llama(tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    (prefix,) = random_prompts(hf.config.vocab_size, [57], seed=6)
    first = engine(path, tmp_path, disk=True)
    first.generate([prefix], GREEDY)
    first.engine.close()
    files = {p.stem: p for p in (tmp_path / "kv").rglob("*.kvb") if p.parent.parent.name == "f"}
    bad = files[f"{block_hashes(prefix, BS)[5]:016x}"]  # the prefix's sixth block
    data = bytearray(bad.read_bytes())
    if damage == "flip":
        data[-3] ^= 0x40
    elif damage == "truncate":
        data = data[: len(data) - 100]
    else:  # the same block of another model (other weights, same shapes), under this one's name
        other = tiny_models.make_tiny_llama(tmp_path / "other", seed=1)
        elsewhere = engine(other, tmp_path / "elsewhere", disk=True)
        elsewhere.generate([prefix], GREEDY)
        elsewhere.engine.close()
        data = next((tmp_path / "elsewhere" / "kv").rglob(bad.name)).read_bytes()
    bad.write_bytes(data)
    again = engine(path, tmp_path, disk=True)
    prompt = prefix + random_prompts(hf.config.vocab_size, [5], seed=7)[0]
    out = again.generate([prompt], GREEDY)[0]
    assert out.metrics.cached_tokens_by_tier["disk"] == 5 * BS  # the five blocks before the damaged one
    assert out.outputs[0].token_ids == hf_greedy(hf, prompt, TOKENS)
    assert not bad.exists() and list(bad.parent.glob(bad.name + ".bad.*"))
    again.engine.close()


def _serve_prompts(path: str, kv_dir: str, prompts: list[list[int]]) -> None:
    """One instance (a process of its own) running `prompts` over a shared disk tier, then exiting cleanly."""
    llm = LLM(path, backend=ENGINE_BACKEND, block_size=BS, num_kv_blocks=40, max_num_seqs=2, kv_offload_dir=kv_dir)
    for prompt in prompts:
        llm.generate([prompt], GREEDY)
    llm.engine.close()


def test_two_instances_writing_one_directory_at_once_lose_nothing(tmp_path):
    """Two engines in two processes share a disk tier and write it at once, half their prompts in common: a third
    finds every prompt's prefix there afterwards, and decodes as transformers."""
    path = tiny_models.make_tiny_llama(tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = random_prompts(hf.config.vocab_size, [57] * 6, seed=8)
    context = multiprocessing.get_context("spawn")
    kv_dir = str(tmp_path / "kv")
    workers = [context.Process(target=_serve_prompts, args=(str(path), kv_dir, share))
               for share in (prompts[:4], prompts[2:])]  # fmt: skip
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
        assert worker.exitcode == 0
    third = engine(path, tmp_path, disk=True)
    for i, prompt in enumerate(prompts):
        returning = prompt + random_prompts(hf.config.vocab_size, [5], seed=20 + i)[0]
        out = third.generate([returning], GREEDY)[0]
        assert out.metrics.cached_tokens_by_tier["disk"] == 56, (i, out.metrics.cached_tokens_by_tier)
        assert out.outputs[0].token_ids == hf_greedy(hf, returning, TOKENS)
    third.engine.close()
