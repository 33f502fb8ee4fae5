"""A PEFT LoRA adapter reads back as exactly what PEFT saved, under the names our loader gives the base weights, and
computes what PEFT's module computes; whatever else an adapter may carry is refused, not dropped.

The adapters are PEFT's own: a tiny random Llama wrapped with `get_peft_model` (random non-zero LoRA weights,
`init_lora_weights=False`) and saved with `save_pretrained`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from sagellm.common.errors import FieldError, InvalidInput, NotFound
from sagellm.runtime.models.loader import load_model
from sagellm.runtime.models.lora_adapter import LORA_MODULES, LoraAdapter, check_adapter_fits, read_lora_adapter
from tests.tiny_models import make_tiny_llama

BLOCKS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}  # fmt: skip
ALL_WEIGHTS = [f"model.layers.{i}.{BLOCKS[m]}.{m}.weight" for i in range(2) for m in LORA_MODULES]  # tiny: 2 layers


def _peft_model(base: Path, **lora: Any) -> PeftModel:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = {"r": 4, "lora_alpha": 8, "target_modules": list(LORA_MODULES), "init_lora_weights": False} | lora
    return get_peft_model(model, LoraConfig(**config))


def _save(base: Path, directory: Path, **lora: Any) -> Path:
    _peft_model(base, **lora).save_pretrained(directory)
    return directory


def _module(peft_model: PeftModel, weight: str) -> torch.nn.Module:
    return peft_model.get_submodule("base_model.model." + weight.removesuffix(".weight"))


def _edited(adapter: Path, directory: Path, **settings: Any) -> Path:
    """A copy of `adapter` with adapter_config.json's `settings` changed."""
    shutil.copytree(adapter, directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps(config | settings))
    return directory


@pytest.fixture(scope="module")
def base_weights(tiny_llama: Path) -> dict[str, torch.Tensor]:
    return dict(load_model(tiny_llama, load_tokenizer=False).weights)


@pytest.fixture(scope="module")
def saved(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PeftModel]:
    peft_model = _peft_model(tiny_llama)
    directory = tmp_path_factory.mktemp("lora") / "adapter"
    peft_model.save_pretrained(directory)
    return directory, peft_model


def test_reads_what_peft_saved(saved: tuple[Path, PeftModel], tiny_llama: Path, base_weights: dict) -> None:
    directory, peft_model = saved
    adapter = read_lora_adapter(directory, "tiny-lora")
    assert (adapter.name, adapter.path, adapter.rank, adapter.alpha) == ("tiny-lora", directory, 4, 8.0)
    assert adapter.scaling == 2.0 == _module(peft_model, ALL_WEIGHTS[0]).scaling["default"]
    assert adapter.base_model == str(tiny_llama)
    assert adapter.target_modules == set(LORA_MODULES)
    assert list(adapter.weights) == ALL_WEIGHTS  # in layer order, then LORA_MODULES'
    for weight, (a, b) in adapter.weights.items():
        out_features, in_features = base_weights[weight].shape  # the name our loader gives the base weight
        assert a.shape == (4, in_features) and b.shape == (out_features, 4), weight
        assert a.dtype == b.dtype == torch.float32
        module = _module(peft_model, weight)
        assert torch.equal(a, module.lora_A["default"].weight.detach()), weight
        assert torch.equal(b, module.lora_B["default"].weight.detach()), weight
    check_adapter_fits(adapter, {name: tuple(t.shape) for name, t in base_weights.items()})
    assert "weights" not in repr(adapter)  # no tensors dumped into a log line


@pytest.mark.parametrize("weight", ["model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"])
def test_base_plus_scaled_product_is_peft_output(
    saved: tuple[Path, PeftModel], base_weights: dict[str, torch.Tensor], weight: str
) -> None:
    """The oracle: what the engine will compute, W + scaling * B @ A on our loader's W, is PEFT's module's output."""
    directory, peft_model = saved
    adapter = read_lora_adapter(directory, "tiny-lora")
    a, b = adapter.weights[weight]
    w = base_weights[weight]
    x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = _module(peft_model, weight)(x)
    ours = x @ (w + adapter.scaling * b @ a).T
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(x @ w.T, expected, atol=1e-3)  # the adapter does change the output


def test_rslora_scales_by_square_root_of_rank(tiny_llama: Path, tmp_path: Path) -> None:
    peft_model = _peft_model(tiny_llama, r=4, lora_alpha=8, use_rslora=True)
    peft_model.save_pretrained(tmp_path / "rslora")
    adapter = read_lora_adapter(tmp_path / "rslora", "rs")
    assert adapter.scaling == 4.0 == _module(peft_model, ALL_WEIGHTS[0]).scaling["default"]  # 8 / sqrt(4)


def test_older_saves_and_pytorch_checkpoints_read_the_same(saved: tuple[Path, PeftModel], tmp_path: Path) -> None:
    directory, peft_model = saved
    reference = read_lora_adapter(directory, "a").weights
    # An older save: the adapter's name in each tensor's (`lora_A.default.weight`).
    shutil.copytree(directory, tmp_path / "default")
    tensors = load_file(directory / "adapter_model.safetensors")
    renamed = {name.replace(".weight", ".default.weight"): t for name, t in tensors.items()}
    save_file(renamed, tmp_path / "default" / "adapter_model.safetensors")
    # PEFT's PyTorch checkpoint (adapter_model.bin) instead of safetensors.
    peft_model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert not (tmp_path / "bin" / "adapter_model.safetensors").exists()
    for variant in ("default", "bin"):
        weights = read_lora_adapter(tmp_path / variant, variant).weights
        assert list(weights) == list(reference), variant
        assert all(torch.equal(weights[n][i], reference[n][i]) for n in reference for i in (0, 1)), variant


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "bin"])
def test_a_check_without_values_reads_the_header_and_refuses_alike(
    tiny_llama: Path, tmp_path: Path, safe_serialization: bool
) -> None:
    """`values=False`, the gateway's check of an adapter its engines will read: the config's settings and every
    weight's name and shape, as meta tensors (no value read); what the engine's read refuses, it refuses alike."""
    _peft_model(tiny_llama).save_pretrained(tmp_path / "a", safe_serialization=safe_serialization)
    read, described = read_lora_adapter(tmp_path / "a", "a"), read_lora_adapter(tmp_path / "a", "a", values=False)
    assert (described.rank, described.scaling, list(described.weights)) == (read.rank, read.scaling, list(read.weights))
    for weight, (a, b) in described.weights.items():
        assert a.is_meta and b.is_meta and a.dtype == b.dtype == torch.float32
        assert (a.shape, b.shape) == (read.weights[weight][0].shape, read.weights[weight][1].shape)
    wrong_rank = _edited(tmp_path / "a", tmp_path / "r2", r=2)
    for values in (True, False):
        with pytest.raises(InvalidInput, match="do not have the rank r=2"):
            read_lora_adapter(wrong_rank, "bad", values=values)


def test_regex_target_takes_the_modules_in_the_weights(tiny_llama: Path, tmp_path: Path) -> None:
    adapter = read_lora_adapter(_save(tiny_llama, tmp_path / "re", target_modules=r".*\.(q_proj|v_proj)"), "re")
    assert adapter.target_modules == {"q_proj", "v_proj"}
    assert len(adapter.weights) == 4


def test_rank_over_the_limit_names_max_lora_rank(saved: tuple[Path, PeftModel]) -> None:
    directory, _ = saved
    assert read_lora_adapter(directory, "a", max_rank=4).rank == 4
    with pytest.raises(FieldError, match=r"rank 4.*max_lora_rank=2") as raised:
        read_lora_adapter(directory, "a", max_rank=2)
    assert raised.value.field == "max_lora_rank"


@pytest.mark.parametrize(
    ("lora", "field"),
    [
        ({"use_dora": True}, "use_dora"),
        ({"bias": "all"}, "bias"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"target_modules": ["q_proj", "lm_head"]}, "target_modules: 'lm_head'"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, "target_modules: 'embed_tokens'"),
        ({"target_modules": r".*\.q_proj|lm_head"}, r"base_model\.model\.lm_head\.lora_[AB]\.weight"),  # a regex
    ],
)
def test_refuses_what_plain_lora_on_decoder_projections_is_not(
    tiny_llama: Path, tmp_path: Path, lora: dict[str, Any], field: str
) -> None:
    directory = _save(tiny_llama, tmp_path / "adapter", **lora)
    with pytest.raises(InvalidInput, match=field):
        read_lora_adapter(directory, "bad")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"peft_type": "IA3"}, 'peft_type: not "LORA"'),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
        ({"alpha_pattern": {"q_proj": 16}}, "alpha_pattern"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights: 'pissa' changes the base"),
        ({"some_future_variant": {"on": True}}, "some_future_variant: .* does not know"),
        ({"r": 2}, "do not have the rank r=2"),
        ({"target_modules": ["q_proj"]}, "the config and the weights disagree"),
    ],
)
def test_refuses_settings_it_would_otherwise_ignore(
    saved: tuple[Path, PeftModel], tmp_path: Path, settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        read_lora_adapter(_edited(saved[0], tmp_path / "edited", **settings), "bad")


def test_refuses_an_a_without_its_b(saved: tuple[Path, PeftModel], tmp_path: Path) -> None:
    directory = _edited(saved[0], tmp_path / "half")
    tensors = load_file(directory / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"]
    save_file(tensors, directory / "adapter_model.safetensors")
    with pytest.raises(InvalidInput, match=r"model\.layers\.1\.mlp\.up_proj has lora_A but no lora_B"):
        read_lora_adapter(directory, "half")


def test_missing_directory_or_files_are_not_found(saved: tuple[Path, PeftModel], tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no such directory"):
        read_lora_adapter(tmp_path / "nowhere", "gone")
    no_weights = tmp_path / "config-only"
    no_weights.mkdir()
    shutil.copy(saved[0] / "adapter_config.json", no_weights)
    with pytest.raises(NotFound, match="no adapter_model.safetensors"):
        read_lora_adapter(no_weights, "config-only")
    with pytest.raises(NotFound, match="no adapter_config.json"):
        read_lora_adapter(tmp_path, "empty")


def test_an_adapter_of_another_base_does_not_fit(
    saved: tuple[Path, PeftModel], base_weights: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    adapter: LoraAdapter = read_lora_adapter(saved[0], "tiny-lora")
    other = load_model(make_tiny_llama(tmp_path / "narrow", hidden_size=32), load_tokenizer=False).weights
    with pytest.raises(InvalidInput, match=r"another base model.*model\.layers\.0\.self_attn\.q_proj\.weight as \[64"):
        check_adapter_fits(adapter, {name: tuple(t.shape) for name, t in other.items()})
    one_layer = {name: tuple(t.shape) for name, t in base_weights.items() if not name.startswith("model.layers.1.")}
    with pytest.raises(InvalidInput, match=r"model\.layers\.1\.self_attn\.q_proj\.weight, which this model does not"):
        check_adapter_fits(adapter, one_layer)
