"""Presets: the built-in files are valid, a bad file is refused with FILE:field messages before anything starts,
and `sagellm preset list|show|apply --dry-run` work without a gateway (applying for real and without a gateway:
test_gateway_cli.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sagellm.gateway.control.engine_spec import EngineSpec
from sagellm.presets import PresetError, builtin_presets, find_preset, load_preset
from tests.cli.in_process import in_process

GOOD_ENGINE = "{name: a, kind: llm, model: m, tensor_parallel: 1, label: x, max_concurrent: 4, use_gpu: no}"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "preset.yaml"
    path.write_text(text)
    return path


def test_builtin_presets_are_valid_and_name_the_local_models():
    presets = builtin_presets()
    assert {"smollm2-cpu", "smollm2-embed"} <= set(presets)
    embed = load_preset(presets["smollm2-embed"])
    assert [(e.kind, e.model) for e in embed.engines] == [
        ("llm", "smollm2-135m-instruct"),
        ("embedding", "all-minilm-l6-v2"),
    ]
    spec = load_preset(find_preset("smollm2-cpu")).engines[0].spec()
    assert spec == EngineSpec(model="smollm2-135m-instruct", kind="llm", tensor_parallel=1, label="cpu",
                              max_concurrent=16, served_model_name="smollm2")  # fmt: skip


def test_an_engine_without_label_is_labelled_by_its_name(tmp_path):
    preset = load_preset(write(tmp_path, "version: 1\nname: p\nengines:\n  - {name: chat, model: m}\n"))
    assert preset.engines[0].spec().label == "chat"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("version: 1\nname: p\nengines:\n  - {name: a, model: m, tensor_parallel: two}\n",
         "engines[0].tensor_parallel: Expected `int`, got `str`"),
        ("version: 1\nname: p\nengines:\n  - {name: a, model: m, tensor_parallel: 0}\n",
         "engines[0].tensor_parallel: tensor_parallel must be >= 1"),
        ("version: 1\nname: p\nengines:\n  - {name: a, model: m, engine: {max_num_seqs: 0}}\n",
         "engines[0].engine.max_num_seqs: max_num_seqs must be >= 1"),
        ("version: 1\nname: p\nengines:\n  - " + GOOD_ENGINE + "\n  - {name: b, model: m, kind: gpu}\n",
         "engines[1].kind: Invalid enum value 'gpu'"),
        ("version: 1\nname: p\nengines:\n  - {name: a}\n", "engines[0]: Object missing required field `model`"),
        ("version: 1\nname: p\nengines:\n  - {name: a, model: m, replicas: 2}\n",
         "engines[0]: Object contains unknown field `replicas`"),
        ("version: 1\nname: p\nengines:\n  - {name: a, model: m}\n  - {name: a, model: n}\n",
         "engines[1].name: 'a' is also engines[0]"),
        ("version: 1\nname: p\nengines:\n  - {name: a, model: m, kind: openai}\n", "engines[0].url: an openai engine"),
        ("version: 1\nname: p\nengines:\n  - {name: a, model: m, port: 1}\n", "engines[0]: Object contains unknown"),
        ("version: 2\nname: p\nengines: []\n", "version: expected 1, got 2"),
        ("version: 1\nname: p\nengines: []\n", "engines: a preset needs at least one engine"),
        ("version: 1\nengines: []\n", "Object missing required field `name`"),
        ("- just a list\n", "expected a mapping"),
        ("name: [unclosed\n", "not valid YAML"),
    ],
)  # fmt: skip
def test_invalid_presets_name_the_file_and_field(tmp_path, text, error):
    path = write(tmp_path, text)
    with pytest.raises(PresetError) as raised:
        load_preset(path)
    assert str(raised.value).startswith(f"{path}: ") and error in str(raised.value)


def test_unknown_builtin_lists_the_known_ones():
    with pytest.raises(PresetError, match="no built-in preset 'nope' \\(built-in: smollm2-cpu, smollm2-embed"):
        find_preset("nope")


def test_cli_list_show_and_dry_run(tmp_path, capsys, monkeypatch):
    listed = in_process(capsys, monkeypatch, tmp_path, "preset", "list")
    assert listed.code == 0 and "smollm2-cpu" in listed.out and "smollm2-embed" in listed.out
    shown = in_process(capsys, monkeypatch, tmp_path, "preset", "show", "--name", "smollm2-embed")
    assert shown.code == 0 and "all-minilm-l6-v2" in shown.out and "smollm2-135m-instruct" in shown.out
    plan = in_process(capsys, monkeypatch, tmp_path, "preset", "apply", "--name", "smollm2-embed", "--dry-run")
    assert plan.code == 0 and "dry run: nothing started" in plan.out and "minilm" in plan.out


def test_cli_apply_refuses_a_bad_file_before_anything(tmp_path, capsys, monkeypatch):
    bad = write(tmp_path, "version: 1\nname: p\nengines:\n  - {name: a, model: m, tensor_parallel: 0}\n")
    refused = in_process(capsys, monkeypatch, tmp_path, "preset", "apply", "--file", str(bad), "-y")
    assert refused.code == 2 and f"{bad}: engines[0].tensor_parallel" in refused.err


def test_cli_show_needs_a_name_or_a_file(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as usage:
        in_process(capsys, monkeypatch, tmp_path, "preset", "show")
    assert usage.value.code == 2 and "one of the arguments --name --file is required" in capsys.readouterr().err
