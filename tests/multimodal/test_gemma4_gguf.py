"""Gemma 4 from GGUF with llama.cpp's mmproj file (`--mmproj`, projector "gemma4v"): the tiny checkpoint
(make_tiny_gemma4_vision, with llama.cpp's 3 x 3 pooling, which the file does not record, clipped linears and
standardization) as the text GGUF and the mmproj llama.cpp's converter writes (tests/tiny_gguf_gemma4.py: f32, the
converter's own mmproj where it is on this machine). Greedy tokens and first logprobs equal transformers' on the same
weights with one and two pictures beside a text prompt: the tower is read back whole (the patch embedding a linear
again, the bounds scalars), its soft tokens attend both ways in the sliding layers (llama.cpp's rule for a width
other than E2B's and E4B's; the checkpoint says use_bidirectional_attention "vision"), and pictures are resized as
Gemma4ImageProcessor does at its default 280 soft tokens (the checkpoint's processor is saved with the same)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import Gemma4ForConditionalGeneration, Gemma4ImageProcessorPil

from sagellm import LLM, SamplingParams
from sagellm.runtime.models.gguf_file import read_gguf
from sagellm.runtime.models.loaded import ModelLoadError
from sagellm.runtime.models.loader import load_model
from sagellm.runtime.models.mmproj.gemma4 import gemma4_graph_weights, gemma4_vision
from tests.llama_cpp_converter import CONVERTER_HERE, assert_same_gguf, convert
from tests.multimodal.pictures import random_image
from tests.tiny_gguf_gemma4 import write_tiny_gemma4_gguf, write_tiny_gemma4_mmproj
from tests.tiny_models import make_tiny_llama, write_tiny_gguf
from tests.tiny_vision_models import gemma4_processor, make_tiny_gemma4_vision

TOKENS = 6
GREEDY = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)
IMAGE = "<|image|>"
ONE = f"the words before the picture come first {IMAGE} and then what it shows is said"
TWO = f"first {IMAGE} a picture, and second\n\n{IMAGE}\nanother one"


NOISE, TALL = random_image(37, 23, 1), random_image(30, 90, 2)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(the Hugging Face checkpoint, its text model as a GGUF, its mmproj)."""
    root = tmp_path_factory.mktemp("gemma4gguf")
    checkpoint = make_tiny_gemma4_vision(root / "hf", text_settings={"use_bidirectional_attention": "vision"},
                                         pooling_kernel_size=3, use_clipped_linears=True, standardize=True)  # fmt: skip
    Gemma4ImageProcessorPil(patch_size=4, pooling_kernel_size=3, max_soft_tokens=280).save_pretrained(checkpoint)
    gguf_file = write_tiny_gemma4_gguf(root / "gemma4.gguf", checkpoint)
    return checkpoint, gguf_file, write_tiny_gemma4_mmproj(root / "mmproj-gemma4.gguf", checkpoint)


@pytest.fixture(scope="module")
def hf(files):
    model = Gemma4ForConditionalGeneration.from_pretrained(files[0], dtype=torch.float32, attn_implementation="eager")
    return model.eval(), gemma4_processor(files[0])


def inputs_of(processor, text: str, images: list[Image.Image]):
    return processor(text=text, images=images, return_tensors="pt", add_special_tokens=False)


def reference(hf, text: str, images: list[Image.Image]) -> list[int]:
    model, processor = hf
    inputs = inputs_of(processor, text, images)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False, min_new_tokens=TOKENS)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def test_the_gguf_with_its_mmproj_sees_one_and_two_pictures_as_transformers(files, hf):
    _, gguf_file, mmproj = files
    llm = LLM(str(gguf_file), mmproj=str(mmproj), max_num_seqs=2, num_kv_blocks=128)
    cases = [(ONE, [NOISE]), (TWO, [TALL, NOISE])]
    outputs = llm.generate([{"prompt": text, "multi_modal_data": {"image": images}} for text, images in cases], GREEDY)
    assert [o.outputs[0].token_ids for o in outputs] == [reference(hf, text, images) for text, images in cases]
    model, processor = hf
    with torch.inference_mode():
        expected = model(**inputs_of(processor, ONE, [TALL])).logits[0, -1].log_softmax(-1)
    first = llm.generate({"prompt": ONE, "multi_modal_data": {"image": [TALL]}},
                         SamplingParams(max_tokens=1, temperature=0, logprobs=5))[0]  # fmt: skip
    for token, logprob in first.outputs[0].logprobs[0].top:
        assert abs(logprob - float(expected[token])) < 1e-5, token


def test_the_files_give_the_checkpoints_tower(files):
    """The same VisionConfig as the checkpoint's and the same tower and embedder weights."""
    checkpoint, gguf_file, mmproj = files
    ours, theirs = load_model(gguf_file, mmproj=mmproj), load_model(checkpoint)
    assert ours.config.vision == theirs.config.vision
    tower = sorted(name for name in theirs.weights if name.startswith(("vision_tower.", "multi_modal_projector.")))
    assert len(tower) > 80 and tower == sorted(
        name for name in ours.weights if name.startswith(("vision_tower.", "multi_modal_projector."))
    )
    assert all(torch.equal(ours.weights[name], theirs.weights[name]) for name in tower)
    assert ours.processor_files.preprocessor["max_soft_tokens"] == 280


@pytest.mark.parametrize(("width", "both_ways"), [(1536, False), (2560, False), (2048, True)])
def test_e2b_and_e4b_widths_attend_causally_as_llama_cpp_decides(files, width, both_ways):
    checkpoint, gguf_file, mmproj = files
    text = load_model(gguf_file, load_weights=False)
    file = read_gguf(mmproj)
    file = replace(file, metadata=file.metadata | {"clip.vision.projection_dim": width})
    vision, _ = gemma4_vision(mmproj, file, replace(text.config, hidden_size=width), text.tokenizer)
    assert (vision.bidirectional, vision.bidirectional_sliding_only) == (both_ways, both_ways)


def test_a_scale_factor_in_the_file_is_the_pooling_kernel(files):
    _, gguf_file, mmproj = files
    text = load_model(gguf_file, load_weights=False)
    file = read_gguf(mmproj)
    file = replace(file, metadata=file.metadata | {"clip.vision.projector.scale_factor": 2})
    vision, processor = gemma4_vision(mmproj, file, text.config, text.tokenizer)
    assert vision.pooling_kernel == processor.preprocessor["pooling_kernel_size"] == 2


def test_the_audio_towers_tensors_of_an_e2b_file_are_left_and_others_refused(files):
    """E2B's and E4B's mmproj hold their audio tower too (`a.*`, `mm.a.*`), which is not run."""
    one = torch.ones(2)
    kept = gemma4_graph_weights(files[2], {"v.std_bias": one, "a.blk.0.ln1.weight": one, "mm.a.fc.weight": one})
    assert list(kept) == ["vision_tower.std_bias"]
    with pytest.raises(ModelLoadError, match="tensor v.blk.0.ffn_gate.bias is not one a Gemma 4 mmproj holds"):
        gemma4_graph_weights(files[2], {"v.blk.0.ffn_gate.bias": one})


def test_a_gemma4_mmproj_beside_another_model_is_refused(files, tmp_path):
    llama = write_tiny_gguf(tmp_path / "llama.gguf", make_tiny_llama(tmp_path / "llama"))
    with pytest.raises(ModelLoadError, match="Gemma 4 mmproj beside a llama model"):
        load_model(llama, mmproj=files[2])


@pytest.mark.skipif(not CONVERTER_HERE, reason="llama.cpp's converter is not here")
def test_llama_cpps_converter_writes_what_the_writer_does(files, tmp_path):
    checkpoint, _, mmproj = files
    convert(checkpoint, tmp_path / "mmproj.gguf", "--mmproj")
    assert_same_gguf(tmp_path / "mmproj.gguf", mmproj)
