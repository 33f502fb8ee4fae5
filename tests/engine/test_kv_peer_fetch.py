"""A prompt's prefix fetched from another engine instance (kv_tiers/peer_blocks.py): one engine runs a prompt, a
second is told (as route tells it, `PeerPrefix`) that the first holds its prefix, fetches the blocks over ZeroMQ from
the first's pages or tiers, and decodes transformers' own tokens after them, for a Llama, a Qwen3.5 (the recurrent
states come with the blocks) and the sliding-window models. A fetch that cannot be trusted or answered costs nothing
but the wait: a wrong token, another model, a dead peer."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sagellm.runtime.engine.kv_tiers.peer_blocks import BlockServer
from sagellm.runtime.engine.peer_prefix import PeerPrefix
from tests import tiny_models
from tests.engine.test_kv_tiers import BS, FAMILIES, GREEDY, TOKENS, engine, evict
from tests.oracle import hf_greedy, random_prompts


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    path = FAMILIES[request.param](tmp_path_factory.mktemp(request.param) / "hf")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return request.param, path, hf


def serve(llm) -> BlockServer:
    """The blocks `llm`'s engine holds, served as the engine operator serves them (here no step runs meanwhile)."""
    tiers = llm.engine.scheduler.tiers
    return BlockServer("tcp://127.0.0.1:*", tiers.identity_sha, tiers.export)


def run(llm, prompt: list[int], peer: PeerPrefix | None):
    """One greedy request on `llm`'s engine, told that `peer` holds its prefix."""
    llm.engine.add_request("r", prompt, GREEDY, peer_prefix=peer)
    while True:
        for out in llm.engine.step():
            if out.finished:
                return out


@pytest.mark.parametrize("held_in", ["pages", "ram"])
def test_a_prefix_another_instance_holds_is_fetched_and_decodes_as_transformers(family, held_in, tmp_path):
    name, path, hf = family
    vocab = hf.config.vocab_size
    (prefix,) = random_prompts(vocab, [57], seed=11)
    holder = engine(path, tmp_path / "holder", ram_gb=0.05)
    holder.generate([prefix], GREEDY)
    if held_in == "ram":
        evict(holder, vocab, seed=12)
    server = serve(holder)
    fetcher = engine(path, tmp_path / "fetcher", ram_gb=0.05)
    prompt = prefix + random_prompts(vocab, [5], seed=13)[0]
    out = run(fetcher, prompt, PeerPrefix("holder", server.endpoint, server.token, len(prefix) // BS))
    by_tier = out.metrics.cached_tokens_by_tier
    assert by_tier.get("peer", 0) >= 32, by_tier  # most of the prefix, cut at a checkpoint or a window where needed
    assert out.outputs[0].token_ids == hf_greedy(hf, prompt, TOKENS)
    assert server.served_blocks >= 8 and fetcher.engine.scheduler.tiers.peers.fetched_blocks >= 8
    server.close()
    holder.engine.close()
    fetcher.engine.close()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tiny_models.make_tiny_llama(tmp_path_factory.mktemp("llama") / "hf")
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("fault", ["token", "model", "dead"])
def test_a_fetch_that_cannot_be_trusted_computes_the_prefix(llama, fault, tmp_path):
    """A wrong token, a holder of other weights (same shapes, so the same block names), or a peer that is gone:
    nothing fetched, the prompt computed, transformers' tokens; the peer is not asked again for a while."""
    path, hf = llama
    (prefix,) = random_prompts(hf.config.vocab_size, [57], seed=14)
    other = tiny_models.make_tiny_llama(tmp_path / "other", seed=1) if fault == "model" else path
    holder = engine(other, tmp_path / "holder", ram_gb=0.05)
    holder.generate([prefix], GREEDY)
    server = serve(holder)
    token = "0" * 32 if fault == "token" else server.token
    if fault == "dead":
        server.close()
    fetcher = engine(path, tmp_path / "fetcher", ram_gb=0.05)
    fetcher.engine.scheduler.tiers.peers._timeout_s = 0.5
    peer = PeerPrefix("holder", server.endpoint, token, len(prefix) // BS)
    prompt = prefix + random_prompts(hf.config.vocab_size, [5], seed=15)[0]
    out = run(fetcher, prompt, peer)
    assert out.metrics.cached_tokens_by_tier.get("peer", 0) == 0
    assert out.outputs[0].token_ids == hf_greedy(hf, prompt, TOKENS)
    client = fetcher.engine.scheduler.tiers.peers
    assert client.failures == 1 and client.fetched_blocks == 0
    assert server.refused == (0 if fault == "dead" else 1)
    fetcher.engine.add_request("again", prompt + [1], GREEDY, peer_prefix=peer)  # the peer left alone: no new ask
    while fetcher.engine.has_unfinished_requests():
        fetcher.engine.step()
    assert client.failures == 1 and server.refused == (0 if fault == "dead" else 1)
    server.close()
    holder.engine.close()
    fetcher.engine.close()
