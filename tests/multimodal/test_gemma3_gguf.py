"""Gemma 3 from GGUF with llama.cpp's mmproj file (`--mmproj`): the tiny checkpoint's text model written as a GGUF
and its tower and projector as the mmproj llama.cpp's converter writes (tests/tiny_vision_models.write_tiny_mmproj,
the same file byte for byte), served through the offline API and the gateway; greedy tokens and first logprobs
equal transformers' on the same weights (its projection rounded to F16, as the mmproj holds it). An mmproj beside a
model that is not Gemma 3, or beside a Hugging Face checkpoint, is refused naming the file."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import openai
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, Gemma3ForConditionalGeneration

from sagellm import LLM, SamplingParams
from sagellm.runtime.models.loaded import ModelLoadError
from sagellm.runtime.models.loader import load_model
from tests.gateway.conftest import GRAPHS, running_gateway, tiny_config
from tests.multimodal.pictures import random_image
from tests.tiny_models import make_tiny_llama, write_tiny_gguf
from tests.tiny_vision_models import make_tiny_gemma3_vision, write_tiny_mmproj

TOKENS = 6
GREEDY = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)
BOI = "<start_of_image>"
PROMPT = f"the words before the picture come first\n{BOI}and then what it shows is said"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


NOISE, OTHER = random_image(37, 23, 1), random_image(50, 64, 2)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(the Hugging Face checkpoint, its text model as a GGUF with the tokenizer's files beside it, its mmproj)."""
    root = tmp_path_factory.mktemp("gemma3gguf")
    checkpoint = make_tiny_gemma3_vision(root / "hf")
    (root / "gguf").mkdir()
    gguf = write_tiny_gguf(root / "gguf" / "gemma3.gguf", checkpoint)
    for name in TOKENIZER_FILES:  # its tokenizer as the checkpoint's (the GGUF's own knows no added newline runs)
        shutil.copy(checkpoint / name, root / "gguf" / name)
    return checkpoint, gguf, write_tiny_mmproj(root / "mmproj-gemma3.gguf", checkpoint)


@pytest.fixture(scope="module")
def hf(files):
    """transformers' Gemma 3 on the checkpoint, its projection rounded to F16 as the mmproj holds it."""
    model = Gemma3ForConditionalGeneration.from_pretrained(files[0], dtype=torch.float32, attn_implementation="eager")
    projection = model.model.multi_modal_projector.mm_input_projection_weight
    projection.data = projection.data.half().float()
    return model.eval(), AutoProcessor.from_pretrained(files[0])


def reference(hf, text: str, images: list[Image.Image]) -> list[int]:
    model, processor = hf
    inputs = processor(text=text, images=images, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False, min_new_tokens=TOKENS)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def test_the_gguf_with_its_mmproj_sees_images_as_transformers(files, hf):
    _, gguf, mmproj = files
    llm = LLM(str(gguf), mmproj=str(mmproj), max_num_seqs=2, num_kv_blocks=64)
    outputs = llm.generate([{"prompt": PROMPT, "multi_modal_data": {"image": [image]}} for image in (NOISE, OTHER)],
                           GREEDY)  # fmt: skip
    assert [o.outputs[0].token_ids for o in outputs] == [reference(hf, PROMPT, [i]) for i in (NOISE, OTHER)]
    model, processor = hf
    inputs = processor(text=PROMPT, images=[NOISE], return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        expected = model(**inputs).logits[0, -1].log_softmax(-1)
    first = llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": [NOISE]}},
                         SamplingParams(max_tokens=1, temperature=0, logprobs=5))[0]  # fmt: skip
    for token, logprob in first.outputs[0].logprobs[0].top:
        assert abs(logprob - float(expected[token])) < 1e-4, token


@pytest.mark.parametrize("graph", ["colocated.yaml", "epd.yaml"])
def test_the_gateway_serves_the_mmproj_given_as_the_graphs(graph, files, hf, tmp_path):
    """The graph's `mmproj` (serve's --mmproj) reaches the model card, the engines and the encode node."""
    _, gguf, mmproj = files
    picture = io.BytesIO()
    OTHER.save(picture, "PNG")
    url = "data:image/png;base64," + base64.b64encode(picture.getvalue()).decode()
    parts = [{"type": "text", "text": "look at"}, {"type": "image_url", "image_url": {"url": url}}]
    with running_gateway(GRAPHS / graph, tiny_config(tmp_path), gguf, attrs={"mmproj": str(mmproj)}) as gw:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        card = client.models.list().data[0]
        reply = client.chat.completions.create(
            model=card.id, messages=[{"role": "user", "content": parts}], max_tokens=TOKENS, temperature=0,
            extra_body={"return_token_ids": True, "min_tokens": TOKENS},
        )  # fmt: skip
    assert card.model_extra["input_modalities"] == ["text", "image"]
    hf_parts = [{"type": "text", "text": "look at"}, {"type": "image"}]
    text = hf[1].apply_chat_template([{"role": "user", "content": hf_parts}], add_generation_prompt=True)
    assert reply.choices[0].token_ids == reference(hf, text, [OTHER])


def test_an_mmproj_beside_another_model_or_a_checkpoint_is_refused(files, tmp_path):
    checkpoint, _, mmproj = files
    llama = write_tiny_gguf(tmp_path / "llama.gguf", make_tiny_llama(tmp_path / "llama"))
    with pytest.raises(ModelLoadError, match="Gemma 3 mmproj beside a llama model"):
        load_model(llama, mmproj=mmproj)
    with pytest.raises(ModelLoadError, match="goes with a GGUF model"):
        load_model(checkpoint, mmproj=mmproj)
    with pytest.raises(ModelLoadError, match="not an mmproj file"):
        load_model(llama, mmproj=llama)
