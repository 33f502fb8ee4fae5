"""LLaVA, Idefics3 / SmolVLM and Qwen2.5-VL from GGUF with llama.cpp's mmproj file (`--mmproj`): each tiny checkpoint
as its text GGUF and the mmproj llama.cpp writes for it (tests/tiny_gguf_mmproj.py: f32, the converters' own files
where they are on this machine), served through the offline API (and LLaVA's through the gateway too). Greedy tokens
and first logprobs equal transformers' on the same weights (LLaVA's patch embedding and projector rounded to F16, as
its mmproj holds them) with one and two pictures beside a text prompt, each picture preprocessed as the Hugging Face
processor the file implies does (Qwen2.5-VL's resized to llama.cpp's 8 to 4096 merged squares, which transformers'
processor is given too)."""

from __future__ import annotations

import base64
import io
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    Idefics3ForConditionalGeneration,
    LlavaForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    SmolVLMForConditionalGeneration,
)

from sagellm import LLM, SamplingParams
from sagellm.runtime.models.architectures.gguf_config import config_from_gguf
from sagellm.runtime.models.gguf_file import read_gguf
from sagellm.runtime.models.loaded import ModelLoadError
from sagellm.runtime.models.loader import load_model
from tests.gateway.conftest import GRAPHS, running_gateway, tiny_config
from tests.llama_cpp_converter import CONVERTER_HERE, assert_same_gguf, convert, convert_legacy_llava
from tests.multimodal.pictures import random_image
from tests.tiny_gguf_mmproj import (
    write_tiny_idefics3_mmproj,
    write_tiny_llava_mmproj,
    write_tiny_qwen2_5_vl_mmproj,
    write_tiny_text_gguf,
)
from tests.tiny_models import make_tiny_llama, write_tiny_gguf
from tests.tiny_qwen_vl_models import make_tiny_qwen2_5_vl, qwen2_5_vl_processor
from tests.tiny_vision_models import IMAGE_TOKEN, make_tiny_idefics3, make_tiny_llava

TOKENS = 6
GREEDY = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)
FIRST = SamplingParams(max_tokens=1, temperature=0, logprobs=5)


SMALL, WIDE = random_image(37, 23, 1), random_image(160, 96, 2)


def greedy(hf, text: str, images: list[Image.Image]) -> list[int]:
    """transformers' greedy tokens; `hf`: (its model, its processor, the processor's inputs of (text, images))."""
    model, _, inputs_of = hf
    inputs = inputs_of(text, images)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False, min_new_tokens=TOKENS)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def check_generation(gguf_file: Path, mmproj: Path, hf, cases: list[tuple[str, list[Image.Image]]]) -> None:
    """The GGUF with its mmproj gives transformers' greedy tokens for each (prompt, pictures) in `cases`, and its
    first logprobs for the first within 1e-5."""
    model, _, inputs_of = hf
    llm = LLM(str(gguf_file), mmproj=str(mmproj), max_num_seqs=2, num_kv_blocks=64)
    outputs = llm.generate([{"prompt": text, "multi_modal_data": {"image": images}} for text, images in cases], GREEDY)
    assert [o.outputs[0].token_ids for o in outputs] == [greedy(hf, *case) for case in cases]
    text, images = cases[0]
    with torch.inference_mode():
        expected = model(**inputs_of(text, images)).logits[0, -1].log_softmax(-1)
    first = llm.generate({"prompt": text, "multi_modal_data": {"image": images}}, FIRST)[0]
    for token, logprob in first.outputs[0].logprobs[0].top:
        assert abs(logprob - float(expected[token])) < 1e-5, token


def check_the_same_tower(gguf_file: Path, mmproj: Path, checkpoint: Path, **differing) -> None:
    """The files give the checkpoint's VisionConfig (but `differing`'s fields) and the same tower weights."""
    ours, theirs = load_model(gguf_file, mmproj=mmproj), load_model(checkpoint)
    assert ours.config.vision == replace(theirs.config.vision, **differing)
    vision = sorted(name for name in theirs.weights if name.startswith(("vision_tower.", "multi_modal_projector.")))
    assert vision == sorted(n for n in ours.weights if n.startswith(("vision_tower.", "multi_modal_projector.")))
    for name in vision:
        torch.testing.assert_close(ours.weights[name], theirs.weights[name], rtol=0, atol=0, msg=name)


# LLaVA ("mlp"): the legacy converter's file


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(the checkpoint, its text model as a GGUF, its mmproj), the checkpoint's patch embedding and projector
    linears rounded to F16 (as the mmproj holds them, whatever its file type)."""
    root = tmp_path_factory.mktemp("llava_gguf")
    checkpoint = make_tiny_llava(root / "hf")
    _round_to_f16(checkpoint, ("patch_embedding.weight", "linear_1.weight", "linear_2.weight"))
    return (
        checkpoint,
        write_tiny_text_gguf(root / "llava.gguf", checkpoint),
        write_tiny_llava_mmproj(root / "mmproj-llava.gguf", checkpoint),
    )


@pytest.fixture(scope="module")
def llava_hf(llava):
    model = LlavaForConditionalGeneration.from_pretrained(llava[0], dtype=torch.float32, attn_implementation="eager")
    processor = AutoProcessor.from_pretrained(llava[0])
    return model.eval(), processor, lambda text, images: processor(text=text, images=images, return_tensors="pt")


LLAVA_ONE = f"the words before the picture come first {IMAGE_TOKEN} and then what it shows is said"
LLAVA_TWO = f"first {IMAGE_TOKEN} a picture, and second {IMAGE_TOKEN} another one"


def test_llava_from_gguf_sees_one_and_two_pictures_as_transformers(llava, llava_hf):
    check_generation(llava[1], llava[2], llava_hf, [(LLAVA_ONE, [SMALL]), (LLAVA_TWO, [WIDE, SMALL])])


def test_llavas_mmproj_gives_the_checkpoints_tower(llava):
    check_the_same_tower(llava[1], llava[2], llava[0])


@pytest.mark.parametrize("graph", ["colocated.yaml", "epd.yaml"])
def test_the_gateway_serves_llava_from_gguf_with_its_mmproj(graph, llava, llava_hf, tmp_path):
    """The openai SDK's picture, through the engines' encoder and through an encode node's."""
    _, gguf_file, mmproj = llava
    picture = io.BytesIO()
    WIDE.save(picture, "PNG")
    url = "data:image/png;base64," + base64.b64encode(picture.getvalue()).decode()
    parts = [{"type": "text", "text": "look at"}, {"type": "image_url", "image_url": {"url": url}}]
    with running_gateway(GRAPHS / graph, tiny_config(tmp_path), gguf_file,
                         attrs={"mmproj": str(mmproj)}) as gw:  # fmt: skip
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        card = client.models.list().data[0]
        reply = client.chat.completions.create(
            model=card.id, messages=[{"role": "user", "content": parts}], max_tokens=TOKENS, temperature=0,
            extra_body={"return_token_ids": True, "min_tokens": TOKENS},
        )  # fmt: skip
    assert card.model_extra["input_modalities"] == ["text", "image"]
    text = llava_hf[1].apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "look at"},
                                                                       {"type": "image"}]}],
                                         add_generation_prompt=True)  # fmt: skip
    assert reply.choices[0].token_ids == greedy(llava_hf, text, [WIDE])


def test_llava_reading_two_hidden_states_from_gguf_sees_pictures_as_transformers(tmp_path):
    """A file with `clip.vision.feature_layer` (the tower's states after its first and second layers, joined), its
    layers up to the last of them."""
    checkpoint = make_tiny_llava(tmp_path / "hf", vision_feature_layer=[-3, -2])
    _round_to_f16(checkpoint, ("patch_embedding.weight", "linear_1.weight", "linear_2.weight"))
    gguf_file = write_tiny_text_gguf(tmp_path / "llava.gguf", checkpoint)
    mmproj = write_tiny_llava_mmproj(tmp_path / "mmproj.gguf", checkpoint, feature_layers=True)
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager")
    processor = AutoProcessor.from_pretrained(checkpoint)
    hf = model.eval(), processor, lambda text, images: processor(text=text, images=images, return_tensors="pt")
    check_generation(gguf_file, mmproj, hf, [(LLAVA_ONE, [WIDE])])
    assert load_model(gguf_file, mmproj=mmproj).config.vision.feature_layers == (1, 2)
    if CONVERTER_HERE:
        assert_same_gguf(convert_legacy_llava(checkpoint, tmp_path, feature_layers=True), mmproj)


def test_an_mlp_mmproj_beside_a_text_model_it_does_not_fit_is_refused(llava, tmp_path):
    plain = write_tiny_gguf(tmp_path / "llama.gguf", make_tiny_llama(tmp_path / "llama"))
    with pytest.raises(ModelLoadError, match="vocabulary has no <image>, which LLaVA's images need"):
        load_model(plain, mmproj=llava[2])
    narrow = write_tiny_gguf(tmp_path / "narrow.gguf", make_tiny_llama(tmp_path / "narrow", hidden_size=32))
    with pytest.raises(ModelLoadError, match="projects to 64 features; the text model has 32"):
        load_model(narrow, mmproj=llava[2])


# Idefics3 and SmolVLM ("idefics3"): convert_hf_to_gguf.py --mmproj's file


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def idefics3(request, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(the checkpoint, its text model as a GGUF, its mmproj)."""
    root = tmp_path_factory.mktemp(request.param)
    checkpoint = make_tiny_idefics3(root / request.param, smolvlm=request.param == "smolvlm")
    return (
        checkpoint,
        write_tiny_text_gguf(root / "text.gguf", checkpoint),
        write_tiny_idefics3_mmproj(root / "mmproj.gguf", checkpoint),
    )


@pytest.fixture(scope="module")
def idefics3_hf(idefics3):
    checkpoint = idefics3[0]
    model_class = SmolVLMForConditionalGeneration if checkpoint.name == "smolvlm" else Idefics3ForConditionalGeneration
    model = model_class.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager")
    processor = AutoProcessor.from_pretrained(checkpoint)
    return model.eval(), processor, lambda text, images: processor(text=text, images=[images], return_tensors="pt")


IDEFICS3_ONE = f"User:{IMAGE_TOKEN}what is in the picture, said in a few words?<end_of_utterance>\nAssistant:"
IDEFICS3_TWO = f"User: first {IMAGE_TOKEN} then {IMAGE_TOKEN} and how do they differ<end_of_utterance>\nAssistant:"


def test_idefics3_from_gguf_sees_one_and_two_pictures_as_transformers(idefics3, idefics3_hf):
    """WIDE: 2 x 2 tiles and the whole picture; SMALL: 2 x 1 and the whole."""
    check_generation(idefics3[1], idefics3[2], idefics3_hf, [(IDEFICS3_ONE, [WIDE]), (IDEFICS3_TWO, [SMALL, WIDE])])


def test_idefics3s_mmproj_gives_the_checkpoints_tower(idefics3):
    check_the_same_tower(idefics3[1], idefics3[2], idefics3[0])


@pytest.mark.skipif(not CONVERTER_HERE, reason="llama.cpp's converter is not here")
def test_llama_cpps_converter_writes_what_the_idefics3_writers_do(idefics3, tmp_path):
    """Its mmproj; its text GGUF (the `llama.*` keys, the token types: the tile tags USER_DEFINED, and tensors) from
    the checkpoint with text_config.architectures VLlama3ForCausalLM, as hub SmolVLM configs have it (the converter
    takes no Idefics3 text model without)."""
    checkpoint, text_gguf, mmproj = idefics3
    convert(checkpoint, tmp_path / "mmproj.gguf", "--mmproj")
    assert_same_gguf(tmp_path / "mmproj.gguf", mmproj)
    shutil.copytree(checkpoint, tmp_path / "hub")
    config = json.loads((checkpoint / "config.json").read_text())
    config["text_config"]["architectures"] = ["VLlama3ForCausalLM"]
    (tmp_path / "hub/config.json").write_text(json.dumps(config))
    convert(tmp_path / "hub", tmp_path / "text.gguf")
    assert_same_gguf(tmp_path / "text.gguf", text_gguf, ("llama.", "tokenizer.ggml.token_type"))


# Qwen2.5-VL ("qwen2.5vl_merger"): convert_hf_to_gguf.py --mmproj's file, beside its `qwen2vl` text GGUF

QWEN_PICTURE = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_ONE = f"user: {QWEN_PICTURE} what is in the picture?\nassistant:"
QWEN_TWO = f"user: first {QWEN_PICTURE} then {QWEN_PICTURE} which is brighter?\nassistant:"
QWEN_SQUARE = 14 * 2  # the tiny tower's patch side times its merge size
LLAMA_CPP_PIXELS = {"shortest_edge": 8 * QWEN_SQUARE**2, "longest_edge": 4096 * QWEN_SQUARE**2}  # its 8 to 4096
# 9 x 7 merged squares: windows of llama.cpp's 112 pixels (4 x 4 squares) cut it 3 x 2
LARGE = random_image(250, 200, 3)


@pytest.fixture(scope="module")
def qwen2_5_vl(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(the checkpoint, with llama.cpp's 112-pixel windows, which its file cannot hold another of; its text model as
    a `qwen2vl` GGUF; its mmproj)."""
    root = tmp_path_factory.mktemp("qwen2_5_vl_gguf")
    checkpoint = make_tiny_qwen2_5_vl(root / "hf", window_size=112)
    return (
        checkpoint,
        write_tiny_text_gguf(root / "qwen2_5_vl.gguf", checkpoint),
        write_tiny_qwen2_5_vl_mmproj(root / "mmproj-qwen2_5_vl.gguf", checkpoint),
    )


@pytest.fixture(scope="module")
def qwen2_5_vl_hf(qwen2_5_vl):
    """transformers' Qwen2.5-VL on the checkpoint, its processor resizing pictures to llama.cpp's range."""
    checkpoint = qwen2_5_vl[0]
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    processor = qwen2_5_vl_processor(checkpoint)
    processor.image_processor = Qwen2VLImageProcessorPil.from_pretrained(
        checkpoint, size=LLAMA_CPP_PIXELS, min_pixels=LLAMA_CPP_PIXELS["shortest_edge"],
        max_pixels=LLAMA_CPP_PIXELS["longest_edge"]
    )  # fmt: skip
    return model.eval(), processor, lambda text, images: processor(text=text, images=images, return_tensors="pt")


def test_qwen2_5_vl_from_gguf_sees_one_and_two_pictures_as_transformers(qwen2_5_vl, qwen2_5_vl_hf):
    check_generation(qwen2_5_vl[1], qwen2_5_vl[2], qwen2_5_vl_hf, [(QWEN_ONE, [LARGE]), (QWEN_TWO, [WIDE, SMALL])])


def test_qwen2_5_vls_files_give_the_checkpoints_tower_and_rope(qwen2_5_vl):
    """The checkpoint's VisionConfig but the most tokens a picture gives (llama.cpp's), its Conv3d and fused qkvs
    whole again, and its text model's sections, in turn."""
    checkpoint, gguf_file, mmproj = qwen2_5_vl
    check_the_same_tower(gguf_file, mmproj, checkpoint, max_soft_tokens=4096)
    config = load_model(gguf_file).config
    assert (config.architecture, config.mrope_section, config.mrope_interleaved) == ("qwen2", (2, 3, 3), False)


@pytest.mark.parametrize("sections", [[2, 3, 2, 0], [2, 3, 4, 0]])
def test_qwen2vl_sections_not_covering_the_rotary_frequencies_are_refused(qwen2_5_vl, sections):
    """In turn (llama.cpp's MROPE), the sections count the rotary frequencies exactly, as transformers' do."""
    metadata = read_gguf(qwen2_5_vl[1]).metadata | {"qwen2vl.rope.dimension_sections": np.array(sections, np.int32)}
    with pytest.raises(ModelLoadError, match="dimension_sections .* adding up to 8"):
        config_from_gguf(metadata, tied=False, token_count=len(metadata["tokenizer.ggml.tokens"]), rope_freqs=None,
                         rope_factors=None, source=qwen2_5_vl[1])  # fmt: skip


def test_each_familys_mmproj_beside_another_familys_text_model_is_refused(qwen2_5_vl, llava):
    with pytest.raises(ModelLoadError, match="a Qwen2.5-VL mmproj beside a llama model"):
        load_model(llava[1], mmproj=qwen2_5_vl[2])
    with pytest.raises(ModelLoadError, match="vocabulary has no <image>, which LLaVA's images need"):
        load_model(qwen2_5_vl[1], mmproj=llava[2])  # a qwen2 text model may be LLaVA's, but not this one


@pytest.mark.skipif(not CONVERTER_HERE, reason="llama.cpp's converter is not here")
def test_llama_cpps_converter_writes_what_the_qwen2_5_vl_writers_do(qwen2_5_vl, tmp_path):
    """Its mmproj; its text GGUF: the same `qwen2vl.*` keys and tensors."""
    checkpoint, text_gguf, mmproj = qwen2_5_vl
    convert(checkpoint, tmp_path / "mmproj.gguf", "--mmproj")
    assert_same_gguf(tmp_path / "mmproj.gguf", mmproj)
    convert(checkpoint, tmp_path / "text.gguf")
    assert_same_gguf(tmp_path / "text.gguf", text_gguf, ("qwen2vl.", "general.architecture"))


@pytest.mark.skipif(not CONVERTER_HERE, reason="llama.cpp's converter is not here")
def test_llama_cpps_legacy_converter_writes_what_the_llava_writers_do(llava, tmp_path):
    """Its mmproj, made as llama.cpp's documentation has it (convert_legacy_llava); its text GGUF: the same
    `llama.*` keys, token types and tensors."""
    checkpoint, text_gguf, mmproj = llava
    assert_same_gguf(convert_legacy_llava(checkpoint, tmp_path), mmproj)
    convert(checkpoint, tmp_path / "text.gguf")  # the text model: convert_hf_to_gguf.py's, as a llama
    assert_same_gguf(tmp_path / "text.gguf", text_gguf, ("llama.", "tokenizer.ggml.token_type"))


def _round_to_f16(checkpoint: Path, endings: tuple[str, ...]) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(checkpoint / "model.safetensors")
    for name, values in tensors.items():
        if name.endswith(endings):
            tensors[name] = values.astype(np.float16).astype(np.float32)
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
