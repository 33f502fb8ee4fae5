"""The numerical oracle for engine tests: plain greedy decoding with a Hugging Face model's own forward.

A hand-written loop rather than `generate`, so nothing (EOS suppression by min_new_tokens, generation-config
defaults) changes which token is the argmax: it is exactly what `ignore_eos` greedy decoding must produce. Beside it,
what the engine tests compare with it share: random prompts, and an engine stepped until its requests end."""

from __future__ import annotations

import os

import pytest
import torch

# The backend the oracle tests run our engine on: cpu here and in CI; scripts/gpu_check.sh sets cuda to run the same
# comparisons (transformers on the CPU as here) on a GPU; cuda-interpreted runs the CUDA backend's kernel table on the
# CPU (with TRITON_INTERPRET=1), to find here what the GPU run found.
ENGINE_BACKEND = os.environ.get("SAGELLM_TEST_BACKEND", "cpu")


def register_interpreted_cuda() -> None:
    """Registers `cuda-interpreted`: the CUDA backend's kernels (its triton ones under TRITON_INTERPRET=1) on the CPU's
    tensors."""
    from sagellm.backends.base import Availability
    from sagellm.backends.cuda import CudaBackend
    from sagellm.backends.registry import BACKENDS, register_backend

    if "cuda-interpreted" in BACKENDS:
        return

    @register_backend
    class CudaBackendInterpreted(CudaBackend):
        name = "cuda-interpreted"
        device_type = "cpu"

        @classmethod
        def availability(cls) -> Availability:
            return Availability(True, "the CUDA backend's kernels in triton's interpreter, on the CPU")


if ENGINE_BACKEND == "cuda-interpreted":
    register_interpreted_cuda()
# The ways an engine runs the same prompts (block size 4, sequences of up to 42 tokens): each path the oracle checks.
STEP_SHAPES = {
    "whole": dict(max_num_batched_tokens=512),  # whole prompts in one step
    "chunked": dict(max_num_batched_tokens=8),  # chunked prefill: every prompt over several steps, mixed with decodes
    "preempted": dict(num_kv_blocks=12, max_num_batched_tokens=16),  # 48 slots for up to 42 tokens: preemption
}
step_shapes = pytest.mark.parametrize("engine_args", list(STEP_SHAPES.values()), ids=list(STEP_SHAPES))


@torch.no_grad()
def hf_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    ids = torch.tensor([prompt], device=model.device)  # the model's device: the GPU check runs it on CUDA
    past, out = None, []
    for _ in range(num_tokens):
        result = model(ids if past is None else ids[:, -1:], past_key_values=past, use_cache=True)
        past = result.past_key_values
        token = int(result.logits[0, -1].argmax())
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]], device=model.device)], dim=1)
    return out


def assert_last_logits_match(engine, model, prompts: list[list[int]], tolerance: float = 1e-4) -> None:
    """One prefill step of `prompts` as a batch through `engine`'s runner: each prompt's last-position logits equal
    the Hugging Face `model`'s within fp32 tolerance (`tolerance`, relative and of the largest logit, wider where
    the linears round x). The blocks are freed after, so the engine can go on."""
    from sagellm import SamplingParams
    from sagellm.runtime.engine.scheduler import ScheduledBatch
    from sagellm.runtime.engine.sequence import Sequence

    batch = ScheduledBatch()
    slots = engine.scheduler.state_slots  # a model with recurrent layers: each sequence's states need a slot
    for i, prompt in enumerate(prompts):
        seq = Sequence(f"logits-{i}", prompt, SamplingParams(max_tokens=1))
        assert engine.scheduler.block_manager.allocate(seq, len(prompt))
        if slots is not None:
            slots.seat(seq)
        batch.seqs.append(seq)
        batch.num_new_tokens.append(len(prompt))
    ours = engine.runner.execute(batch)  # [N, V]: each prompt's last position
    for seq in batch.seqs:
        engine.scheduler.block_manager.free(seq)
        if slots is not None:
            slots.unseat(seq)
    for row, prompt in zip(ours, prompts):
        with torch.no_grad():
            ref = model(torch.tensor([prompt], device=model.device)).logits[0, -1].to(row.device)
        allowed = tolerance * ref.abs().max().item()
        assert torch.allclose(row, ref, rtol=tolerance, atol=allowed), (row - ref).abs().max()


def random_prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Prompts of random token ids (never the special ids 0-2), one per length, the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def run_to_end(engine, first_outputs=()) -> dict[str, list[int]]:
    """Steps `engine` until every request ends: each request's tokens, after those of `first_outputs`."""
    tokens: dict[str, list[int]] = {o.request_id: list(o.outputs[0].token_ids_delta) for o in first_outputs}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.outputs[0].token_ids_delta)
    return tokens


def finished_outputs(engine) -> list:
    """Steps `engine` until every request ends: the outputs that ended them, in the order they came."""
    done = []
    while engine.has_unfinished_requests():
        done += [o for o in engine.step() if o.finished]
    return done


def assert_greedy_through_a_prefix_hit_and_proposals(engine, model, params) -> list[list[int]]:
    """A recurrent model's hardest greedy run: a repetitive prompt alone (its states checkpointed at block
    boundaries), then one more and one starting with the first in a batch (a prefix hit restoring a checkpoint),
    under an n-gram proposer the engine was given (proposals mostly rejected, states rolled back). Every request's
    tokens are transformers'; a hit and proposals are counted. Returns the three prompts."""
    a, b = random_prompts(model.config.vocab_size, [6, 9], seed=3)
    batch = [a * 3, b + b[:5], a * 3 + b[:3]]
    engine.add_request("greedy-0", batch[0], params)
    tokens = run_to_end(engine)  # the first alone: its states are checkpointed before the third comes
    for i, p in enumerate(batch[1:], start=1):
        engine.add_request(f"greedy-{i}", p, params)
    tokens |= run_to_end(engine)
    for i, p in enumerate(batch):
        assert tokens[f"greedy-{i}"] == hf_greedy(model, p, params.max_tokens)
    stats = engine.stats()
    assert stats.prefix_cache_hits > 0 and stats.spec_decode_num_draft_tokens > 0
    return batch


def round_to_int8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x with each 32 values of a row rounded as llama.cpp's Q8_1 rounds them: a scale s = max |x| / 127 and
    q = round(x / s) (ties to even), x ~ s q; a block of zeros stays zeros. What `--int8-activations`' linears
    (backends/native/block_q8.c) multiply by, so the oracle of an engine run with it rounds each such linear's input
    this way (a forward pre-hook) and multiplies in fp32."""
    blocks = x.float().reshape(*x.shape[:-1], -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.where(scale > 0, torch.round(blocks / scale), torch.zeros_like(blocks))
    return (q * scale).reshape(x.shape).to(x.dtype)


def round_int8_linears_inputs(reference, quantized: dict) -> None:
    """Make `reference` (transformers, holding a GGUF's dequantized weights) the oracle of `--int8-activations`: each
    linear whose weight the engine keeps in blocks it multiplies on x rounded to int8 (Q8_X_KINDS; `quantized`: the
    load's blocks by name, the tied lm_head's under the embedding's) takes its input rounded by round_to_int8_blocks,
    through a forward pre-hook."""
    from sagellm.backends.native.block_layout import Q8_X_KINDS

    tied = reference.config.tie_word_embeddings
    for name, module in reference.named_modules():
        weight = "model.embed_tokens.weight" if tied and name == "lm_head" else f"{name}.weight"
        if isinstance(module, torch.nn.Linear) and getattr(quantized.get(weight), "kind", None) in Q8_X_KINDS:
            module.register_forward_pre_hook(lambda _, args: (round_to_int8_blocks(args[0]),))
