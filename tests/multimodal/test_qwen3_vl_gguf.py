"""Qwen3-VL from GGUF with llama.cpp's mmproj file (`--mmproj`): the tiny checkpoint (make_tiny_qwen3_vl, its DeepStack
on tower layers 0 and 2, so the file's mergers are named by layers that are not their places) as the `qwen3vl` text
GGUF and the mmproj llama.cpp's converter writes (tests/tiny_gguf_qwen3_vl.py: f32 both, compared with the
converter's own files where it is on this machine), served through the offline API. Greedy tokens and first logprobs
equal transformers' on the same weights with one and two pictures beside a text prompt: the text model turns by the
file's `rope.dimension_sections` (interleaved, as llama.cpp's IMROPE), the tower and its DeepStack mergers are read
back under the checkpoint's names, and pictures are resized as the file implies (llama.cpp's 8 to 4096 merged
squares; transformers' processor is given the same range)."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import gguf
import pytest
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessorPil, Qwen3VLForConditionalGeneration

from sagellm import LLM, SamplingParams
from sagellm.runtime.models.loaded import ModelLoadError
from sagellm.runtime.models.loader import load_model
from tests.llama_cpp_converter import CONVERTER_HERE, assert_same_gguf, convert
from tests.multimodal.pictures import random_image
from tests.tiny_gguf_qwen3_vl import write_tiny_qwen3_vl_gguf, write_tiny_qwen3_vl_mmproj
from tests.tiny_models import make_tiny_llama, write_tiny_gguf
from tests.tiny_qwen_vl_models import make_tiny_qwen3_vl, qwen3_5_processor

TOKENS = 6
GREEDY = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)
PICTURE = "<|vision_start|><|image_pad|><|vision_end|>"
ONE = f"user: {PICTURE} what is in the picture?\nassistant:"
TWO = f"user: first {PICTURE} then {PICTURE} which is brighter?\nassistant:"
SQUARE = 16 * 2  # the tiny tower's patch side times its merge size
LLAMA_CPP_PIXELS = {"shortest_edge": 8 * SQUARE**2, "longest_edge": 4096 * SQUARE**2}  # its qwen3vl_merger's range
DEEPSTACK = [0, 2]  # the tower layers whose mergers' rows join the text model's after its layers 0 and 1


# Grids of (1, 3, 4) merged squares (37 x 23 pixels, resized up to llama.cpp's fewest) and (1, 3, 5) (as it is)
SMALL, WIDE = random_image(37, 23, 1), random_image(160, 96, 2)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(the Hugging Face checkpoint, its text model as a GGUF, its mmproj)."""
    root = tmp_path_factory.mktemp("qwen3_vl_gguf")
    checkpoint = make_tiny_qwen3_vl(root / "hf", deepstack_visual_indexes=DEEPSTACK)
    gguf_file = write_tiny_qwen3_vl_gguf(root / "qwen3_vl.gguf", checkpoint)
    return checkpoint, gguf_file, write_tiny_qwen3_vl_mmproj(root / "mmproj-qwen3_vl.gguf", checkpoint)


@pytest.fixture(scope="module")
def hf(files):
    """transformers' Qwen3-VL on the checkpoint, its processor resizing pictures to llama.cpp's range."""
    model = Qwen3VLForConditionalGeneration.from_pretrained(files[0], dtype=torch.float32)
    processor = qwen3_5_processor(files[0])
    processor.image_processor = Qwen2VLImageProcessorPil.from_pretrained(files[0], size=LLAMA_CPP_PIXELS)
    return model.eval(), processor


def reference(hf, text: str, images: list[Image.Image]) -> list[int]:
    model, processor = hf
    inputs = processor(text=text, images=images, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False, min_new_tokens=TOKENS)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def test_the_gguf_with_its_mmproj_sees_one_and_two_pictures_as_transformers(files, hf):
    _, gguf_file, mmproj = files
    llm = LLM(str(gguf_file), mmproj=str(mmproj), max_num_seqs=2, num_kv_blocks=64)
    cases = [(ONE, [SMALL]), (TWO, [WIDE, SMALL])]
    outputs = llm.generate([{"prompt": text, "multi_modal_data": {"image": images}} for text, images in cases], GREEDY)
    assert [o.outputs[0].token_ids for o in outputs] == [reference(hf, text, images) for text, images in cases]
    model, processor = hf
    for text, images in cases:
        inputs = processor(text=text, images=images, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            expected = model(**inputs).logits[0, -1].log_softmax(-1)
        first = llm.generate({"prompt": text, "multi_modal_data": {"image": images}},
                             SamplingParams(max_tokens=1, temperature=0, logprobs=5))[0]  # fmt: skip
        for token, logprob in first.outputs[0].logprobs[0].top:
            assert abs(logprob - float(expected[token])) < 1e-5, token


def test_the_files_give_the_checkpoints_tower_deepstack_and_rope(files):
    """The same VisionConfig as the checkpoint's (its DeepStack layers from the file's flags) but the most tokens a
    picture gives (llama.cpp's range), the same tower and merger weights (the Conv3d whole again, each DeepStack
    merger under its place in deepstack_visual_indexes), and the multimodal rope's sections, interleaved."""
    checkpoint, gguf_file, mmproj = files
    ours, theirs = load_model(gguf_file, mmproj=mmproj), load_model(checkpoint)
    assert ours.config.vision == replace(theirs.config.vision, max_soft_tokens=4096)
    assert ours.config.vision.deepstack_layers == tuple(DEEPSTACK)
    assert ours.config == replace(theirs.config, vision=ours.config.vision)
    assert (ours.config.mrope_section, ours.config.mrope_interleaved) == ((4, 2, 2), True)
    tower = [name for name in theirs.weights if name.startswith("vision_tower.")]
    assert any("deepstack_merger_list.1." in name for name in tower)
    assert sorted(tower) == sorted(name for name in ours.weights if name.startswith("vision_tower."))
    assert all(torch.equal(ours.weights[name], theirs.weights[name]) for name in tower)


def test_deepstack_flags_that_are_not_the_files_mergers_are_refused(files, tmp_path):
    """Flags naming layers 0 and 1 where the file holds layer 0's and 2's mergers."""
    _, gguf_file, mmproj = files
    flipped = shutil.copy(mmproj, tmp_path / "flipped.gguf")
    reader = gguf.GGUFReader(flipped, "r+")  # the file's own memory: what is set here is written
    field = reader.fields["clip.vision.is_deepstack_layers"]
    for layer, flag in enumerate([True, True, False]):
        field.parts[field.data[layer]][0] = flag
    reader.data.flush()
    with pytest.raises(ModelLoadError, match=r"flags tower layers \[0, 1\], but the file holds DeepStack mergers "
                                             r"for layers \[0, 2\]"):  # fmt: skip
        load_model(gguf_file, mmproj=flipped)


def test_a_qwen3_vl_mmproj_beside_another_model_is_refused(files, tmp_path):
    llama = write_tiny_gguf(tmp_path / "llama.gguf", make_tiny_llama(tmp_path / "llama"))
    with pytest.raises(ModelLoadError, match="Qwen3-VL or Qwen3.5 mmproj beside a llama model"):
        load_model(llama, mmproj=files[2])


@pytest.mark.skipif(not CONVERTER_HERE, reason="llama.cpp's converter is not here")
def test_llama_cpps_converter_writes_what_the_writers_do(files, tmp_path):
    """The converter's mmproj: the same keys and values (but the name and the parameter count's label), tensor names,
    types, shapes and values; its text GGUF: the same `qwen3vl.*` keys and tensors."""
    checkpoint, gguf_file, mmproj = files
    convert(checkpoint, tmp_path / "mmproj.gguf", "--mmproj")
    convert(checkpoint, tmp_path / "text.gguf")
    assert_same_gguf(tmp_path / "mmproj.gguf", mmproj)
    assert_same_gguf(tmp_path / "text.gguf", gguf_file, ("qwen3vl.",))
