"""The engine flags every engine-starting command shares, made from EngineConfig's fields."""

from __future__ import annotations

import argparse

import pytest

from sagellm.cli.engine_flags import add_engine_arguments, engine_settings
from sagellm.runtime.engine.config import ENGINE_FIELDS, EngineConfig


def parse(*argv: str, defaults: dict | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")  # a command's own model flag is not an engine setting
    add_engine_arguments(parser, defaults=defaults)
    return parser.parse_args(argv)


def test_one_flag_per_setting_and_only_the_given_ones_are_chosen() -> None:
    args = parse("--model", "m", "--max-num-seqs", "8", "--kv-cache-memory-gb", "0.5", "--no-enable-prefix-caching")
    assert engine_settings(args) == {"max_num_seqs": 8, "kv_cache_memory_gb": 0.5, "enable_prefix_caching": False}
    assert engine_settings(parse()) == {}
    assert {name for name in ENGINE_FIELDS if name != "model"} <= set(vars(parse()))
    EngineConfig(**engine_settings(args))  # what the flags give, the config takes


def test_a_command_s_own_defaults_apply_unless_a_flag_says_otherwise() -> None:
    assert engine_settings(parse(defaults={"backend": "cpu"})) == {"backend": "cpu"}
    assert engine_settings(parse("--backend", "cuda", defaults={"backend": "cpu"})) == {"backend": "cuda"}


def test_a_flag_the_command_has_keeps_its_meaning_there() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int)  # `generate --seed`: the request's seed, not the engine's
    add_engine_arguments(parser)
    args = parser.parse_args(["--seed", "7", "--max-num-seqs", "2"])
    assert engine_settings(args) == {"max_num_seqs": 2} and args.seed == 7
    assert engine_settings(parse("--seed", "3")) == {"seed": 3}  # where the command has none: vLLM's engine seed


def test_a_bad_value_is_refused_by_argparse() -> None:
    with pytest.raises(SystemExit):
        parse("--max-num-seqs", "many")


def test_a_json_setting_takes_vllm_s_json_and_refuses_what_is_not_an_object(capsys) -> None:
    raw = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}'
    args = parse("--speculative-config", raw)
    assert engine_settings(args) == {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3,
                                                            "prompt_lookup_max": 4}}  # fmt: skip
    EngineConfig(**engine_settings(args))
    for bad in ('{"method":', "[1, 2]"):
        with pytest.raises(SystemExit):
            parse("--speculative-config", bad)
    assert "is not a JSON object" in capsys.readouterr().err
