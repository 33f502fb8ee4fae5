"""Qwen3-VL seeing images, against transformers' Qwen3VLForConditionalGeneration and the Qwen3VLProcessor on the same
tiny random checkpoint (tests/tiny_qwen_vl_models.make_tiny_qwen3_vl): the prompt ids; the encoder's rows, each the
main merger's embedding and every DeepStack merger's side by side, equal to get_image_features' pooler_output and
deepstack_features; and, with the text model's DeepStack additions after its first layers and its interleaved
multimodal rotary positions, greedy tokens and first logprobs with one and two pictures beside a text-only prompt,
chunked prefills whose chunks end inside pictures, a prefix hit inside a picture, a backend fusing decoder layers,
and tensor parallel and pipeline engines (slow; the PD and EPD graphs: test_families_through_graphs.py). A pipeline
whose first stage would not hold every DeepStack layer is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Qwen3VLForConditionalGeneration

from sagellm import LLM, SamplingParams
from sagellm.backends.cpu import CpuBackend
from sagellm.common.errors import InvalidInput
from sagellm.runtime.execution_graph.fuse_layers import FusedLayers
from sagellm.runtime.execution_graph.graph import GraphError
from sagellm.runtime.models.architectures.hf_config import config_from_hf
from sagellm.runtime.models.architectures.hf_vision_config import vision_from_hf
from sagellm.runtime.models.decoder_graph import build_decoder_graph
from sagellm.runtime.models.loaded import ModelLoadError
from sagellm.runtime.models.loader import load_model
from sagellm.runtime.multimodal.encoder_runner import EncoderRunner
from sagellm.runtime.multimodal.prompt_media import PromptMedia
from tests.multimodal.pictures import random_image
from tests.multimodal.qwen_vl_cases import PICTURE, greedy_references, inputs_of, prompt, tokens
from tests.tiny_qwen_vl_models import make_tiny_qwen3_vl, qwen3_5_processor

TOKENS = 8
GREEDY = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)
HIDDEN, DEEPSTACK = 64, 2  # the tiny text model's width; its DeepStack layers (the tower's 0 and 1)


# token grids (1, 2, 3), (1, 4, 4) (the most: 128 x 128 pixels) and (1, 3, 2): 6, 16 and 6 tokens
WIDE, BIG, TALL = random_image(96, 64, 1), random_image(128, 128, 2), random_image(64, 96, 3)
ONE = f"user: {PICTURE} what is in the picture?\nassistant:"
TWO = f"user: first {PICTURE} then {PICTURE} which is brighter?\nassistant:"
TEXT = "user: a prompt without a picture\nassistant:"
CASES = [(ONE, [WIDE]), (TWO, [BIG, TALL]), (TEXT, [])]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    return make_tiny_qwen3_vl(tmp_path_factory.mktemp("qwen3_vl") / "qwen3_vl")


@pytest.fixture(scope="module")
def hf(qwen):
    model = Qwen3VLForConditionalGeneration.from_pretrained(qwen, dtype=torch.float32)
    return model.eval(), qwen3_5_processor(qwen)


@pytest.fixture(scope="module")
def reference(hf):
    return greedy_references(*hf, TOKENS)


@pytest.fixture(scope="module")
def ours(qwen):
    loaded = load_model(qwen)
    media = PromptMedia.of_model(loaded.config, loaded.processor_files, loaded.tokenizer)
    return loaded, media, EncoderRunner(loaded.config, loaded.weights, CpuBackend())


@pytest.fixture(scope="module")
def llm(qwen) -> LLM:
    return LLM(str(qwen), max_num_seqs=4, num_kv_blocks=64, block_size=4)


@pytest.mark.parametrize(("text", "images"), CASES[:2], ids=["one", "two"])
def test_prompt_ids_and_the_encoders_rows_are_transformers_main_and_deepstack_features(hf, ours, text, images):
    """Each image token's row: the main merger's embedding, then DeepStack layer 0's and layer 1's, each of the text
    width; two pictures of different shapes in one encoder run."""
    loaded, media, encoder = ours
    inputs = inputs_of(hf[1], text, images)
    ids, features = media.expand(loaded.tokenizer.encode(text, add_special_tokens=False), {"image": images})
    assert ids == inputs["input_ids"][0].tolist()
    encoded = torch.cat(encoder.encode(torch.cat([f.encoder_input for f in features]), [f.grid for f in features]))
    with torch.inference_mode():
        expected = hf[0].model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    assert encoded.shape == (sum(f.length for f in features), HIDDEN * (1 + DEEPSTACK))
    main, *deepstack = encoded.split(HIDDEN, dim=-1)
    torch.testing.assert_close(main, torch.cat(expected.pooler_output), atol=1e-5, rtol=1e-5)
    assert len(deepstack) == len(expected.deepstack_features) == DEEPSTACK
    for ours_rows, theirs in zip(deepstack, expected.deepstack_features):
        torch.testing.assert_close(ours_rows, torch.cat(theirs), atol=1e-5, rtol=1e-5)


def test_the_config_reads_deepstack_and_refuses_layers_the_tower_lacks(ours):
    config = ours[0].config
    assert (config.architecture, config.mrope_section, config.mrope_interleaved) == ("qwen3", (4, 2, 2), True)
    vision = config.vision
    assert (vision.tower, vision.deepstack_layers, vision.embedding_width) == ("qwen3_5", (0, 1), HIDDEN * 3)
    tower = {"out_hidden_size": 64}
    hub = {"architectures": ["Qwen3VLForConditionalGeneration"], "vision_config": tower}
    assert vision_from_hf(hub, 64).deepstack_layers == (8, 16, 24)  # transformers' default
    tower |= {"depth": 4, "deepstack_visual_indexes": [1, 4]}
    with pytest.raises(ModelLoadError, match=r"deepstack_visual_indexes \[1, 4\] names no layer of the 4-layer"):
        vision_from_hf(hub, 64)


def test_a_hub_config_is_a_qwen3_text_model_with_interleaved_mrope_and_deepstack(tmp_path):
    """Qwen3-VL-2B-Instruct's config.json as the hub spells it (rope_scaling beside rope_theta in text_config)."""
    rope = {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"}
    text = {"model_type": "qwen3_vl_text", "hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 8,
            "head_dim": 128, "num_hidden_layers": 28, "intermediate_size": 6144, "vocab_size": 151936,
            "rope_theta": 5_000_000, "rope_scaling": rope}  # fmt: skip
    tower = {"model_type": "qwen3_vl", "depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16,
             "out_hidden_size": 2048, "deepstack_visual_indexes": [5, 11, 17]}  # fmt: skip
    hub = {"architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": 151655,
           "tie_word_embeddings": True, "text_config": text, "vision_config": tower}  # fmt: skip
    config = config_from_hf(hub, None, tmp_path / "config.json")
    assert (config.architecture, config.qk_norm, config.rope_theta, config.rope_scaling) == ("qwen3", True, 5e6, None)
    assert (config.mrope_section, config.mrope_interleaved, config.tie_word_embeddings) == ((24, 20, 20), True, True)
    vision = config.vision
    assert (vision.deepstack_layers, vision.embedding_width, vision.image_token_id) == ((5, 11, 17), 8192, 151655)
    assert vision.tokens_per_image == 16_777_216 // 32**2  # the processor's default longest edge, in merged squares


def test_one_and_two_pictures_beside_a_text_only_prompt_give_transformers_tokens(llm, reference):
    outputs = llm.generate([prompt(text, *images) for text, images in CASES], GREEDY)
    assert tokens(outputs) == [reference(text, images) for text, images in CASES]


def test_the_first_tokens_logprobs_are_transformers_which_deepstack_moves(llm, hf, monkeypatch):
    """transformers' logprobs with DeepStack, and (so the check could fail) far from those without it."""
    model, processor = hf
    inputs = inputs_of(processor, TWO, [BIG, TALL])
    with torch.inference_mode():
        expected = model(**inputs).logits[0, -1].log_softmax(-1)
        monkeypatch.setattr(model.model.language_model, "_deepstack_process", lambda hidden, *_: hidden)
        without = model(**inputs).logits[0, -1].log_softmax(-1)
    out = llm.generate(prompt(TWO, BIG, TALL), SamplingParams(max_tokens=1, temperature=0, logprobs=5))[0]
    top = out.outputs[0].logprobs[0].top
    for token, logprob in top:
        assert abs(logprob - float(expected[token])) < 1e-5, token
    assert max(abs(float(expected[token] - without[token])) for token, _ in top) > 1e-3


@pytest.mark.parametrize("budget", [5, 12])
def test_a_chunked_prefill_whose_chunks_end_inside_pictures_gives_the_same_tokens(qwen, reference, budget):
    """Each chunk scatters and adds its slice of a picture's rows, DeepStack's columns with them."""
    chunked = LLM(str(qwen), max_num_seqs=2, num_kv_blocks=64, max_num_batched_tokens=budget,
                  enable_prefix_caching=False)  # fmt: skip
    assert tokens(chunked.generate([prompt(ONE, WIDE), prompt(TWO, BIG, TALL)], GREEDY)) == [
        reference(ONE, [WIDE]), reference(TWO, [BIG, TALL])
    ]  # fmt: skip


def test_a_prefix_hit_ending_inside_a_pictures_run_gives_the_same_tokens(llm, hf, reference):
    """4-token blocks: the hit ends inside BIG's 16 tokens; the rest of its rows, DeepStack's columns with them, are
    computed in the next step."""
    ends_soon = f"user: {PICTURE}?"
    first = llm.generate(prompt(ends_soon, BIG), GREEDY)[0]
    again = llm.generate(prompt(ends_soon, BIG), GREEDY)[0]
    pad = hf[1].tokenizer.convert_tokens_to_ids("<|image_pad|>")
    at, length = first.prompt_token_ids.index(pad), first.prompt_token_ids.count(pad)
    assert at < again.metrics.num_cached_tokens < at + length
    assert tokens([first, again]) == [reference(ends_soon, [BIG])] * 2


def test_a_backend_fusing_layers_fuses_around_each_deepstack_addition(qwen, reference, monkeypatch):
    """The runner's fused decoder layers (fuse_layers.py) end a run where DeepStack adds to a layer's output: runs of
    layer 0, of layer 1, and of layers 2 and 3, the additions between them; with a kernel that declines every step
    (its fallback, the layers' own ops, running), transformers' tokens."""
    kernels = CpuBackend.kernels
    declining = {"decoder_layers": lambda layers, shape: lambda *step: None}
    monkeypatch.setattr(CpuBackend, "kernels", lambda self: {**kernels(self), **declining})
    fusing = LLM(str(qwen), max_num_seqs=4, num_kv_blocks=64)
    instrs = fusing.engine.runner.plan.instrs
    kinds = ["fused" if isinstance(i.kernel, FusedLayers) else i.node.rsplit("_", 1)[0] for i in instrs]
    between = kinds[kinds.index("fused") : len(kinds) - kinds[::-1].index("fused")]
    assert between == ["fused", "add_rows", "fused", "add_rows", "fused"]
    first, second, rest = (len(i.kernel.fallback.instrs) for i in instrs if isinstance(i.kernel, FusedLayers))
    assert first == second and rest == 2 * first  # one layer, one layer, two layers
    outputs = fusing.generate([prompt(text, *images) for text, images in CASES], GREEDY)
    assert tokens(outputs) == [reference(text, images) for text, images in CASES]


def test_a_stage_after_the_first_holding_a_deepstack_layer_is_refused(ours, tmp_path):
    """The pictures' rows reach the first stage only: the graph of a later stage holding layer 1 is refused, and so
    is an engine whose first of two stages (layers 0 and 1) would not hold DeepStack's three."""
    config = ours[0].config
    build_decoder_graph(config, range(2, 4))  # past DeepStack's layers
    with pytest.raises(GraphError, match="first pipeline stage must hold them all"):
        build_decoder_graph(config, range(1, 4))
    three = make_tiny_qwen3_vl(tmp_path / "three", deepstack_visual_indexes=[0, 1, 2])
    with pytest.raises(InvalidInput, match="pipeline parallel: .*DeepStack.*tensor_parallel_size"):
        LLM(str(three), num_kv_blocks=64, pipeline_parallel_size=2)


@pytest.mark.slow  # each engine starts a second rank's process
@pytest.mark.parametrize("budget", [512, 5], ids=["whole", "chunked"])
@pytest.mark.parametrize("parallel", [dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)], ids=["tp2", "pp2"])
def test_two_slices_or_two_stages_give_transformers_tokens(qwen, reference, parallel, budget):
    """Rank 0 broadcasts each step's rows at their whole width (the text width times 1 + DeepStack's layers)."""
    llm = LLM(str(qwen), max_num_seqs=4, num_kv_blocks=64, max_num_batched_tokens=budget, **parallel)
    try:
        outputs = llm.generate([prompt(text, *images) for text, images in CASES], GREEDY)
    finally:
        llm.engine.close()  # its rank worker: it would live as long as the test process
    assert tokens(outputs) == [reference(text, images) for text, images in CASES]
