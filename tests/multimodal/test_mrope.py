"""Qwen-VL's multimodal rope against transformers: where a prompt's tokens stand (get_rope_index) for every chunk a
prefill may cut it into, and the rope table rows composed for a picture's tokens (the text models' rotary
embeddings, interleaved as Qwen3.5's and in sections as Qwen2-VL's)."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2VLTextConfig, Qwen3_5TextConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5Model, Qwen3_5TextRotaryEmbedding

from sagellm.backends.torch_ops.token_ops import rope
from sagellm.runtime.models.architectures.hf_config import config_from_hf
from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.models.loaded import ModelLoadError
from sagellm.runtime.models.mrope import StepRopeRows
from sagellm.runtime.models.rope import rope_tables
from sagellm.runtime.multimodal.media_feature import MediaFeature
from sagellm.runtime.multimodal.mrope_positions import shift, token_positions

MERGE = 2
TEXT, PICTURE = 1, 9


def _hf_rope_index(ids: list[int], grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, int]:
    """transformers' Qwen3.5 get_rope_index on one prompt: [3, T] positions and the delta after the prompt."""
    model = Qwen3_5Model.__new__(Qwen3_5Model)
    torch.nn.Module.__init__(model)
    model.config = type("Config", (), {"vision_config": type("Vision", (), {"spatial_merge_size": MERGE})()})()
    types = torch.tensor([[int(t == PICTURE) for t in ids]])
    patches = torch.tensor([(t, h * MERGE, w * MERGE) for t, h, w in grids])
    positions, delta = model.get_rope_index(torch.tensor([ids]), types, image_grid_thw=patches)
    return positions[:, 0], int(delta)


def _ours(features: list[MediaFeature], start: int, n: int) -> torch.Tensor:
    positions, pictures = token_positions(features, start, n)
    out = torch.tensor([positions] * 3).reshape(3, n)
    for i, *thw in pictures:
        out[:, i] = torch.tensor(thw)
    return out


def _prompt(layout: list[int | tuple[int, int, int]]) -> tuple[list[int], list[MediaFeature]]:
    """Text runs (their lengths) and pictures (their grids) in turn, as ids and features."""
    ids: list[int] = []
    features = []
    for part in layout:
        if isinstance(part, int):
            ids += [TEXT] * part
            continue
        n = part[0] * part[1] * part[2]
        features.append(MediaFeature("image", bytes([len(features)]), len(ids), n, None, grid=part))
        ids += [PICTURE] * n
    return ids, features


@pytest.mark.parametrize(
    "layout",
    [[5, (1, 2, 3), 3, (1, 2, 2), 7], [(1, 3, 2), 4], [2, (1, 1, 1), 1, (1, 4, 1), 3], [6]],
    ids=["two pictures", "picture first", "thin pictures", "text only"],
)
def test_positions_equal_get_rope_index_for_every_chunk(layout: list) -> None:
    ids, features = _prompt(layout)
    expected, delta = _hf_rope_index(ids, [f.grid for f in features])
    assert torch.equal(_ours(features, 0, len(ids)), expected)
    for start in range(len(ids)):
        for end in range(start + 1, len(ids) + 1):
            assert torch.equal(_ours(features, start, end - start), expected[:, start:end]), (start, end)
    # generated tokens go on from the prompt's last position, shifted as transformers' rope_deltas shift them
    assert shift(features, len(ids)) == delta
    assert _ours(features, len(ids) + 4, 1).tolist() == [[len(ids) + 4 + delta]] * 3


def _config(**settings: object) -> ModelConfig:
    return ModelConfig(architecture="qwen3_5", vocab_size=8, hidden_size=64, intermediate_size=8, num_layers=1,
                       num_heads=2, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-6, rope_theta=1e4,
                       max_position_embeddings=64, tie_word_embeddings=False, **settings)  # fmt: skip


def _table_rows(settings: dict, positions: torch.Tensor) -> torch.Tensor:
    """Our composed rows for [3, n] positions, from the table of a config with those settings."""
    config = _config(**settings)
    table = rope_tables(config, 64, step_rows=positions.shape[1])["global"]
    rows = StepRopeRows(config, table, 64)
    rows.write(positions)
    return table[64:]


@pytest.mark.parametrize("interleaved", [True, False], ids=["Qwen3.5 interleaved", "Qwen2-VL sections"])
def test_composed_rows_turn_as_transformers_rotary_embedding(interleaved: bool) -> None:
    torch.manual_seed(0)
    positions = torch.randint(0, 60, (3, 9))
    if interleaved:  # a quarter of each 32-wide head turns (Qwen3.5's partial rotary): 4 frequencies
        hf = Qwen3_5TextRotaryEmbedding(Qwen3_5TextConfig(head_dim=32, rope_parameters={
            "rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25, "mrope_section": [2, 1, 1],
            "mrope_interleaved": True}))  # fmt: skip
        ours = _table_rows({"rotary_dim": 8, "mrope_section": (2, 1, 1), "mrope_interleaved": True}, positions)
    else:
        hf = Qwen2VLRotaryEmbedding(Qwen2VLTextConfig(hidden_size=64, num_attention_heads=2, rope_parameters={
            "rope_type": "default", "rope_theta": 1e4, "mrope_section": [6, 5, 5]}))  # fmt: skip
        ours = _table_rows({"mrope_section": (6, 5, 5)}, positions)
    cos, sin = hf(torch.zeros(1), positions[:, None, :])  # [1, n, R]
    half = ours.shape[1] // 2
    torch.testing.assert_close(ours[:, :half], cos[0, :, :half], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[:, half:], sin[0, :, :half], rtol=0, atol=1e-6)
    # and the rope kernel reading those rows turns q and k as transformers' apply_rotary_pos_emb does
    q, k = torch.randn(9, 2, ours.shape[1]), torch.randn(9, 1, ours.shape[1])
    turned_q, _ = rope(q, k, torch.arange(9), ours)
    hf_q = q * cos[0, :, None] + torch.cat([-q[..., half:], q[..., :half]], -1) * sin[0, :, None]
    torch.testing.assert_close(turned_q, hf_q, rtol=1e-5, atol=1e-5)


def test_a_text_token_reads_the_plain_row_of_its_position() -> None:
    positions = torch.tensor([[7, 3], [7, 3], [7, 3]])
    ours = _table_rows({"mrope_section": (6, 5, 5)}, positions)
    plain = rope_tables(_config(), 64)["global"]
    assert torch.equal(ours, plain[[7, 3]])


def test_config_reads_the_sections_and_refuses_ones_that_do_not_cover_the_rotary_half(tmp_path) -> None:
    base = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 8, "hidden_size": 64,
            "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
            "rope_scaling": {"type": "mrope", "mrope_section": [6, 5, 5]}}  # fmt: skip
    config = config_from_hf(base, None, tmp_path)
    assert (config.mrope_section, config.mrope_interleaved, config.rope_scaling) == ((6, 5, 5), False, None)
    with pytest.raises(ModelLoadError, match="mrope_section"):
        config_from_hf({**base, "rope_scaling": {"type": "mrope", "mrope_section": [6, 5, 4]}}, None, tmp_path)


def test_qwen3_vl_and_qwen3_5_classes_interleave_whatever_the_config_says(tmp_path) -> None:
    """transformers turns their text models by interleaved sections unconditionally, its defaults where the config
    has none."""
    text = {"model_type": "qwen3_vl_text", "vocab_size": 8, "hidden_size": 256, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2, "head_dim": 128}  # fmt: skip
    base = {"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", "text_config": text,
            "vision_config": {"out_hidden_size": 256}}  # fmt: skip
    config = config_from_hf(base, None, tmp_path)
    assert (config.mrope_section, config.mrope_interleaved) == ((24, 20, 20), True)
    given = {**text, "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24]}}
    config = config_from_hf({**base, "text_config": given}, None, tmp_path)
    assert (config.mrope_section, config.mrope_interleaved) == ((16, 24, 24), True)
