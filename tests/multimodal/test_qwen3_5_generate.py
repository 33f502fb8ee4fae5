"""Qwen3.5 generating about images, against transformers' Qwen3_5ForConditionalGeneration on the same tiny random
checkpoint (tests/tiny_qwen_vl_models.make_tiny_qwen3_5_vision): the text model's multimodal rotary positions (each
picture's tokens at their grid's (t, h, w), the text after it shifted) through every path a prompt's tokens take:
one and two pictures beside a text-only prompt in one batch, the first token's logprobs, a chunked prefill whose
chunks end inside pictures, a prefix hit ending inside a picture's run, speculative proposals verified past a
picture (n-gram's and the model's own MTP head's), and a resume whose prompt ends with the output so far; and
served as its text model alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import Qwen3_5ForConditionalGeneration

from sagellm import LLM, SamplingParams
from sagellm.common.errors import InvalidInput
from sagellm.runtime.models.loader import load_model
from sagellm.runtime.pipeline.served_model import served_model
from tests.multimodal.pictures import random_image
from tests.multimodal.qwen_vl_cases import PICTURE, greedy_references, inputs_of, prompt, tokens
from tests.tiny_qwen_vl_models import make_tiny_qwen3_5_vision, qwen3_5_processor

TOKENS = 8
GREEDY = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)


# token grids (1, 2, 3), (1, 4, 4) (the most: 128 x 128 pixels) and (1, 3, 2): 6, 16 and 6 tokens
WIDE, BIG, TALL = random_image(96, 64, 1), random_image(128, 128, 2), random_image(64, 96, 3)
ONE = f"user: {PICTURE} what is in the picture?\nassistant:"
TWO = f"user: first {PICTURE} then {PICTURE} which is brighter?\nassistant:"
TEXT = "user: a prompt without a picture\nassistant:"


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    return make_tiny_qwen3_5_vision(tmp_path_factory.mktemp("qwen3_5") / "qwen3_5")


@pytest.fixture(scope="module")
def hf(qwen):
    model = Qwen3_5ForConditionalGeneration.from_pretrained(qwen, dtype=torch.float32)
    return model.eval(), qwen3_5_processor(qwen)


@pytest.fixture(scope="module")
def reference(hf):
    return greedy_references(*hf, TOKENS)


@pytest.fixture(scope="module")
def llm(qwen) -> LLM:
    return LLM(str(qwen), max_num_seqs=4, num_kv_blocks=64, block_size=4)


CASES = [(ONE, [WIDE]), (TWO, [BIG, TALL]), (TEXT, [])]


def test_one_and_two_pictures_beside_a_text_only_prompt_give_transformers_tokens(llm, reference):
    outputs = llm.generate([prompt(text, *images) for text, images in CASES], GREEDY)
    assert tokens(outputs) == [reference(text, images) for text, images in CASES]


def test_the_first_tokens_logprobs_are_transformers_and_move_with_the_pictures_grid(llm, hf):
    """WIDE and TALL are the same count of tokens in transposed grids: the positions (and so the logprobs) differ
    between them, and each is transformers'."""
    model, processor = hf
    firsts = []
    for image in (WIDE, TALL):
        inputs = inputs_of(processor, ONE, [image])
        with torch.inference_mode():
            expected = model(**inputs).logits[0, -1].log_softmax(-1)
        out = llm.generate(prompt(ONE, image), SamplingParams(max_tokens=1, temperature=0, logprobs=5))[0]
        for token, logprob in out.outputs[0].logprobs[0].top:
            assert abs(logprob - float(expected[token])) < 1e-5, token
        firsts.append(out.outputs[0].logprobs[0].top)
    assert firsts[0] != firsts[1]


@pytest.mark.parametrize("budget", [5, 12])
def test_a_chunked_prefill_whose_chunks_end_inside_pictures_gives_the_same_tokens(qwen, reference, budget):
    chunked = LLM(str(qwen), max_num_seqs=2, num_kv_blocks=64, max_num_batched_tokens=budget,
                  enable_prefix_caching=False)  # fmt: skip
    assert tokens(chunked.generate([prompt(ONE, WIDE), prompt(TWO, BIG, TALL)], GREEDY)) == [
        reference(ONE, [WIDE]), reference(TWO, [BIG, TALL])
    ]  # fmt: skip


def test_the_same_picture_again_is_a_prefix_hit_inside_its_run_and_another_grid_is_not(llm, hf, reference):
    """4-token blocks: the hit ends inside BIG's 16 tokens; a picture of as many tokens in the transposed grid,
    after the first (neither seen before), shares only the text before it."""
    ends_soon = f"user: {PICTURE}?"
    first = llm.generate(prompt(ends_soon, BIG), GREEDY)[0]
    again = llm.generate(prompt(ends_soon, BIG), GREEDY)[0]
    pad = hf[1].tokenizer.convert_tokens_to_ids("<|image_pad|>")
    at, length = first.prompt_token_ids.index(pad), first.prompt_token_ids.count(pad)
    assert at < again.metrics.num_cached_tokens < at + length
    assert tokens([first, again]) == [reference(ends_soon, [BIG])] * 2
    wide, tall = random_image(96, 64, 4), random_image(64, 96, 5)
    llm.generate(prompt(ONE, wide), GREEDY)
    other = llm.generate(prompt(ONE, tall), GREEDY)[0]
    assert other.metrics.num_cached_tokens <= other.prompt_token_ids.index(pad)
    assert tokens([other]) == [reference(ONE, [tall])]


def test_speculative_proposals_past_a_picture_are_verified_at_its_shifted_positions(qwen, reference):
    """n-gram proposals after the prompt: each proposed token's row stands where transformers' rope_deltas put
    it, so the verified tokens are transformers'."""
    speculating = LLM(str(qwen), max_num_seqs=2, num_kv_blocks=64,
                      speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2,
                                          "prompt_lookup_min": 1})  # fmt: skip
    assert tokens(speculating.generate([prompt(ONE, WIDE), prompt(TWO, BIG, TALL)], GREEDY)) == [
        reference(ONE, [WIDE]), reference(TWO, [BIG, TALL])
    ]  # fmt: skip


def test_a_resume_whose_prompt_ends_with_the_output_so_far_continues_as_transformers(llm, hf, reference):
    """A resumed request's prompt is its own plus the tokens it wrote (`resumed_tokens`): the written ones stand
    after the picture's shift, as the uninterrupted run had them."""
    model, processor = hf
    expected = reference(ONE, [WIDE])
    ids = inputs_of(processor, ONE, [WIDE])["input_ids"][0].tolist()
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    unexpanded = ids[: ids.index(pad) + 1] + ids[ids.index(pad) + ids.count(pad) :]  # one placeholder again
    params = SamplingParams(max_tokens=TOKENS - 3, temperature=0, ignore_eos=True)
    llm.engine.add_request("resumed", unexpanded + expected[:3], params, resumed_tokens=3,
                           multi_modal_data={"image": WIDE})  # fmt: skip
    written: list[int] = []
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            if out.finished:
                written = out.outputs[0].token_ids
    assert written == expected[3:]


def test_language_model_only_serves_the_text_model_alone_and_refuses_pictures(qwen, hf):
    """vLLM's --language-model-only: the tower's weights are not read, a text prompt gets transformers' tokens, a
    picture is refused naming why, and the served model's card says text."""
    text_only = LLM(str(qwen), max_num_seqs=2, num_kv_blocks=32, language_model_only=True)
    assert text_only.engine.model.config.vision is None
    model, processor = hf
    inputs = inputs_of(processor, TEXT, [])
    with torch.inference_mode():
        expected = model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False, min_new_tokens=TOKENS)
    assert tokens(text_only.generate([prompt(TEXT)], GREEDY)) == [expected[0, inputs["input_ids"].shape[1] :].tolist()]
    with pytest.raises(InvalidInput, match="takes no images"):
        text_only.generate([prompt(ONE, WIDE)], GREEDY)
    loaded = load_model(qwen, language_model_only=True)
    assert not any(name.startswith("vision_tower.") for name in loaded.weights) and loaded.processor_files is None
    assert served_model({"model": str(qwen), "language_model_only": True}).config.vision is None


def with_mtp_head(checkpoint: Path, model) -> Path:
    """The checkpoint with a random multi-token prediction head, as the hub's Qwen3.5 carry one (tests/tiny_models
    .add_mtp_head's, its text config nested): a full attention layer, `mtp.fc` and three norms, in mtp.safetensors."""
    text = model.config.text_config
    torch.manual_seed(1)
    layer = model.model.language_model.layers[text.layer_types.index("full_attention")]
    tensors = {f"mtp.layers.0.{name}": t + 0.01 * torch.randn_like(t) for name, t in layer.state_dict().items()}
    tensors["mtp.fc.weight"] = 0.1 * torch.randn(text.hidden_size, 2 * text.hidden_size)
    tensors |= {f"mtp.{norm}.weight": 0.1 * torch.randn(text.hidden_size)
                for norm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm")}  # fmt: skip
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(checkpoint / "mtp.safetensors"))
    settings = json.loads((checkpoint / "config.json").read_text())
    settings["text_config"]["mtp_num_hidden_layers"] = 1
    (checkpoint / "config.json").write_text(json.dumps(settings))
    return checkpoint


def test_the_mtp_heads_proposals_past_pictures_are_verified_to_transformers_tokens(tmp_path, hf):
    """Qwen3.5's own head proposes (its rows turn by the same multimodal positions); the target verifies."""
    model = hf[0]
    checkpoint = with_mtp_head(make_tiny_qwen3_5_vision(tmp_path / "with_head"), model)
    llm = LLM(str(checkpoint), max_num_seqs=2, num_kv_blocks=64,
              speculative_config={"method": "mtp", "num_speculative_tokens": 2})  # fmt: skip
    cases = [(ONE, [WIDE]), (TWO, [BIG, TALL])]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outputs = llm.generate([prompt(text, *images) for text, images in cases], params)
    for (text, images), out in zip(cases, outputs):
        inputs = inputs_of(hf[1], text, images)
        with torch.inference_mode():
            expected = model.generate(**inputs, max_new_tokens=12, do_sample=False, min_new_tokens=12)
        assert out.outputs[0].token_ids == expected[0, inputs["input_ids"].shape[1] :].tolist()
