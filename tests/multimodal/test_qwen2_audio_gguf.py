"""Qwen2-Audio from GGUF with llama.cpp's mmproj file (`--mmproj`, projector "qwen2a", an audio encoder's): the tiny
checkpoint (make_tiny_qwen2_audio_for_llama_cpp) as a `qwen2` text GGUF and the mmproj llama.cpp's converter writes
(tests/tiny_gguf_audio.py: f32 but the convolutions' F16, the converter's own mmproj where it is on this machine).
Greedy tokens and first logprobs equal transformers' on the same weights (its convolutions rounded to F16, as the
mmproj holds them) with one and two clips beside a text prompt: the file attaches an audio encoder (ModelConfig.audio)
and Whisper's features with llama.cpp's settings, which are the checkpoint's feature extractor's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

from sagellm import LLM, SamplingParams
from sagellm.runtime.models.loaded import ModelLoadError
from sagellm.runtime.models.loader import load_model
from tests.llama_cpp_converter import CONVERTER_HERE, assert_same_gguf, convert
from tests.tiny_gguf_audio import (
    make_tiny_qwen2_audio_for_llama_cpp,
    write_tiny_qwen2_audio_gguf,
    write_tiny_qwen2_audio_mmproj,
)
from tests.tiny_models import make_tiny_llama, write_tiny_gguf

TOKENS = 6
GREEDY = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)
RATE = 16000
CLIP = "<|audio_bos|><|AUDIO|><|audio_eos|>"
ONE = f"Audio 1: {CLIP}\nwhat is said in the clip and who says it"
TWO = f"Audio 1: {CLIP}\nand then Audio 2: {CLIP}\nthe two clips"
CONVOLUTIONS = ("audio_tower.conv1.weight", "audio_tower.conv2.weight")  # F16 in the mmproj


def noise(seconds: float, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(RATE * seconds))).astype(np.float32)


def tone(seconds: float, hz: float) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * hz * np.arange(int(RATE * seconds)) / RATE)).astype(np.float32)


SHORT, TONE = noise(0.5, 1), tone(1.3, 440.0)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(the Hugging Face checkpoint, its text model as a GGUF, its mmproj)."""
    root = tmp_path_factory.mktemp("qwen2_audio_gguf")
    checkpoint = make_tiny_qwen2_audio_for_llama_cpp(root / "hf")
    gguf_file = write_tiny_qwen2_audio_gguf(root / "qwen2-audio.gguf", checkpoint)
    return checkpoint, gguf_file, write_tiny_qwen2_audio_mmproj(root / "mmproj-qwen2-audio.gguf", checkpoint)


@pytest.fixture(scope="module")
def hf(files):
    """transformers' Qwen2-Audio on the checkpoint, its convolutions rounded to F16 as the mmproj holds them."""
    model = Qwen2AudioForConditionalGeneration.from_pretrained(files[0], dtype=torch.float32,
                                                               attn_implementation="eager")  # fmt: skip
    for conv in (model.model.audio_tower.conv1, model.model.audio_tower.conv2):
        conv.weight.data = conv.weight.data.half().float()
    return model.eval(), AutoProcessor.from_pretrained(files[0])


def hf_inputs(processor, text: str, clips: list[np.ndarray]):
    return processor(text=text, audio=clips, sampling_rate=RATE, return_tensors="pt")


def reference(hf, text: str, clips: list[np.ndarray]) -> list[int]:
    model, processor = hf
    inputs = hf_inputs(processor, text, clips)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False, min_new_tokens=TOKENS)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def test_the_gguf_with_its_mmproj_hears_one_and_two_clips_as_transformers(files, hf):
    _, gguf_file, mmproj = files
    llm = LLM(str(gguf_file), mmproj=str(mmproj), max_num_seqs=2, num_kv_blocks=96)
    cases = [(ONE, [SHORT]), (TWO, [TONE, SHORT])]
    outputs = llm.generate([{"prompt": text, "multi_modal_data": {"audio": [(clip, RATE) for clip in clips]}}
                            for text, clips in cases], GREEDY)  # fmt: skip
    assert [o.outputs[0].token_ids for o in outputs] == [reference(hf, text, clips) for text, clips in cases]
    model, processor = hf
    with torch.inference_mode():
        expected = model(**hf_inputs(processor, ONE, [TONE])).logits[0, -1].log_softmax(-1)
    first = llm.generate({"prompt": ONE, "multi_modal_data": {"audio": [(TONE, RATE)]}},
                         SamplingParams(max_tokens=1, temperature=0, logprobs=5))[0]  # fmt: skip
    for token, logprob in first.outputs[0].logprobs[0].top:
        assert abs(logprob - float(expected[token])) < 1e-5, token


def test_the_files_give_the_checkpoints_audio_encoder(files):
    """The same AudioConfig and tower weights as the checkpoint's (its convolutions as F16 rounds them), no vision,
    and the checkpoint's feature extractor's settings."""
    checkpoint, gguf_file, mmproj = files
    ours, theirs = load_model(gguf_file, mmproj=mmproj), load_model(checkpoint)
    assert (ours.config.audio, ours.config.vision) == (theirs.config.audio, None)
    tower = sorted(name for name in theirs.weights if name.startswith(("audio_tower.", "multi_modal_projector.")))
    assert tower == sorted(name for name in ours.weights if name.startswith(("audio_tower.", "multi_modal_projector.")))
    for name in tower:
        expected = theirs.weights[name].half().float() if name in CONVOLUTIONS else theirs.weights[name]
        assert torch.equal(ours.weights[name], expected), name
    settings = theirs.processor_files.preprocessor
    assert all(settings[key] == value for key, value in ours.processor_files.preprocessor.items())


def test_a_qwen2_audio_mmproj_beside_another_model_is_refused(files, tmp_path):
    llama = write_tiny_gguf(tmp_path / "llama.gguf", make_tiny_llama(tmp_path / "llama"))
    with pytest.raises(ModelLoadError, match="Qwen2-Audio mmproj beside a llama model"):
        load_model(llama, mmproj=files[2])


@pytest.mark.skipif(not CONVERTER_HERE, reason="llama.cpp's converter is not here")
def test_llama_cpps_converter_writes_what_the_writer_does(files, tmp_path):
    checkpoint, _, mmproj = files
    convert(checkpoint, tmp_path / "mmproj.gguf", "--mmproj")
    assert_same_gguf(tmp_path / "mmproj.gguf", mmproj)
