"""Qwen2-Audio end to end through the offline API (vLLM's `{"prompt", "multi_modal_data": {"audio": (samples,
rate)}}`), against `Qwen2AudioForConditionalGeneration.generate` on the HF processor's inputs for the same tiny random
checkpoint (tests/tiny_audio_models.py): the audio encoder's embeddings equal to transformers', greedy tokens
identical with one and with two clips beside a text-only prompt in one batch, through a chunked prefill that splits a
clip's placeholders, through a prefix hit on the same clip (another clip shares nothing past the text before it), a
clip at 44.1 kHz as the same clip resampled; and the refusals (too long, placeholders and clips that do not pair up,
a model without an audio encoder)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

from sagellm import LLM, SamplingParams
from sagellm.backends.cpu import CpuBackend
from sagellm.common.errors import InvalidInput
from sagellm.runtime.models.loader import load_model
from sagellm.runtime.multimodal.audio_prompts import AudioPrompts
from sagellm.runtime.multimodal.encoder_runner import AudioEncoderRunner
from sagellm.runtime.multimodal.prompt_media import PromptMedia
from sagellm.runtime.multimodal.resample import resample
from tests.tiny_audio_models import make_tiny_qwen2_audio
from tests.tiny_models import make_tiny_llama

TOKENS = 8
GREEDY = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)
RATE = 16000
CLIP = "<|audio_bos|><|AUDIO|><|audio_eos|>"


def noise(seconds: float, seed: int, rate: int = RATE) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(rate * seconds))).astype(np.float32)


def tone(seconds: float, hz: float, rate: int = RATE) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * hz * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


SHORT, TONE, LONGER = noise(0.5, 1), tone(1.3, 440.0), noise(2.71, 2)
ONE = f"Audio 1: {CLIP}\nwhat is said in the clip and who says it"
TWO = f"Audio 1: {CLIP}\nand then Audio 2: {CLIP}\nthe two clips"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_tiny_qwen2_audio(tmp_path_factory.mktemp("qwen2_audio") / "qwen2-audio")


@pytest.fixture(scope="module")
def hf(checkpoint):
    model = Qwen2AudioForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32,
                                                               attn_implementation="eager")  # fmt: skip
    return model.eval(), AutoProcessor.from_pretrained(checkpoint)


def hf_inputs(processor, text: str, clips: list[np.ndarray]):
    return processor(text=text, audio=clips or None, sampling_rate=RATE, return_tensors="pt")


@pytest.fixture(scope="module")
def reference(hf):
    """Greedy tokens of transformers' Qwen2-Audio for (text, clips at 16 kHz)."""
    model, processor = hf

    def greedy(text: str, clips: list[np.ndarray]) -> list[int]:
        inputs = hf_inputs(processor, text, clips)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False, min_new_tokens=TOKENS)
        return out[0, inputs["input_ids"].shape[1] :].tolist()

    return greedy


@pytest.fixture(scope="module")
def llm(checkpoint) -> LLM:
    return LLM(str(checkpoint), max_num_seqs=4, num_kv_blocks=96)


def prompt(text: str, *clips: np.ndarray, rate: int = RATE) -> dict:
    return {"prompt": text, "multi_modal_data": {"audio": [(c, rate) for c in clips]}} if clips else {"prompt": text}


def tokens(outputs) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in outputs]


def test_the_prompt_and_the_encoders_embeddings_are_the_processors_and_transformers(checkpoint, hf):
    model, processor = hf
    loaded = load_model(checkpoint)
    media = PromptMedia.of_model(loaded.config, loaded.processor_files, loaded.tokenizer)
    encoder = AudioEncoderRunner(loaded.config, loaded.weights, CpuBackend())
    ids, features = media.expand(loaded.tokenizer.encode(TWO), {"audio": [(SHORT, RATE), (LONGER, RATE)]})
    inputs = hf_inputs(processor, TWO, [SHORT, LONGER])
    assert ids == inputs["input_ids"][0].tolist()
    with torch.inference_mode():
        tower = model.model.audio_tower
        lengths, tokens_per_clip = tower._get_feat_extract_output_lengths(inputs["feature_attention_mask"].sum(-1))
        mask = torch.zeros(2, 1, 1500, 1500)
        for i, n in enumerate(lengths.tolist()):
            mask[i, ..., n:] = float("-inf")
        hidden = tower(inputs["input_features"], attention_mask=mask).last_hidden_state
        expected = model.model.multi_modal_projector(hidden)
    for i, (feature, n) in enumerate(zip(features, tokens_per_clip.tolist())):
        assert feature.modality == "audio" and feature.length == n
        assert set(ids[feature.offset : feature.end]) == {loaded.config.audio.audio_token_id}
        (ours,) = encoder.encode(feature.encoder_input)
        assert (ours - expected[i, :n]).abs().max() < 1e-5


def test_one_and_two_clips_beside_a_text_only_prompt_give_transformers_tokens(llm, reference):
    cases = [(ONE, [TONE]), (TWO, [SHORT, LONGER]), ("a prompt without a clip", [])]
    outputs = llm.generate([prompt(text, *clips) for text, clips in cases], GREEDY)
    assert tokens(outputs) == [reference(text, clips) for text, clips in cases]


def test_a_chunked_prefill_across_a_clip_gives_the_same_tokens(checkpoint, reference):
    chunked = LLM(str(checkpoint), max_num_seqs=2, num_kv_blocks=96, max_num_batched_tokens=8,
                  enable_prefix_caching=False)  # fmt: skip
    assert tokens(chunked.generate([prompt(ONE, LONGER), prompt(TWO, TONE, SHORT)], GREEDY)) == [
        reference(ONE, [LONGER]), reference(TWO, [TONE, SHORT])
    ]  # fmt: skip


def test_the_same_clip_again_is_a_prefix_hit_and_another_one_shares_only_the_text_before_it(llm, reference):
    first = llm.generate(prompt(ONE, LONGER), GREEDY)[0]
    again = llm.generate(prompt(ONE, LONGER), GREEDY)[0]
    other = llm.generate(prompt(ONE, noise(2.71, 3)), GREEDY)[0]
    clip_at = first.prompt_token_ids.index(llm.engine.model.config.audio.audio_token_id)
    assert again.metrics.num_cached_tokens > clip_at + 16  # blocks past the clip's first were shared
    assert other.metrics.num_cached_tokens == clip_at // 16 * 16  # only the whole blocks before the clip
    assert tokens([first, again]) == [reference(ONE, [LONGER])] * 2


def test_a_clip_at_another_rate_is_the_same_clip_resampled(llm, reference):
    clip = tone(1.1, 523.0, rate=44100)
    out = llm.generate(prompt(ONE, clip, rate=44100), GREEDY)[0]
    assert tokens([out]) == [reference(ONE, [resample(clip, 44100, RATE)])]


def test_refusals(llm, tmp_path):
    with pytest.raises(InvalidInput, match="1 audio placeholder"):
        llm.generate(prompt(ONE, SHORT, TONE), GREEDY)
    with pytest.raises(InvalidInput, match=r"31\.00 s long"):
        llm.generate(prompt(ONE, noise(31.0, 4)), GREEDY)
    with pytest.raises(InvalidInput, match="takes no image"):
        llm.generate({"prompt": ONE, "multi_modal_data": {"image": [b"..."]}}, GREEDY)
    text_only = LLM(str(make_tiny_llama(tmp_path / "llama")), num_kv_blocks=16)
    with pytest.raises(InvalidInput, match="takes no images or audio"):
        text_only.generate(prompt(ONE, SHORT), GREEDY)


def test_the_audio_prompts_refuse_a_feature_extractor_that_does_not_fit(checkpoint):
    config = load_model(checkpoint, load_weights=False).config.audio
    with pytest.raises(InvalidInput, match="80 mel bins"):
        AudioPrompts.from_settings({"feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 80}, {},
                                   config)  # fmt: skip


def test_the_first_tokens_logprobs_are_transformers_for_each_clip_and_follow_the_clip(llm, hf):
    """Greedy tokens of a tiny random model barely depend on its clips: the first token's logprobs show that the
    audio reaches the model, each clip's as transformers' does."""
    model, processor = hf
    expected, ours = {}, {}
    for name, clip in (("tone", TONE), ("noise", SHORT)):
        with torch.inference_mode():
            expected[name] = model(**hf_inputs(processor, ONE, [clip])).logits[0, -1].log_softmax(-1)
        out = llm.generate(prompt(ONE, clip), SamplingParams(max_tokens=1, temperature=0, logprobs=5))[0]
        (first,) = out.outputs[0].logprobs
        ours[name] = dict(first.top)
        for token, logprob in first.top:
            assert abs(logprob - float(expected[name][token])) < 1e-5, (name, token)
    moved = max(abs(ours["tone"][t] - float(expected["noise"][t])) for t in ours["tone"])
    assert moved > 1e-3, moved
