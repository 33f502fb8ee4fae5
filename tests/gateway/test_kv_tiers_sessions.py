"""Sessions survive with a disk tier under the prefix cache (`--kv-offload-dir`): a clean stop, sleep level 1 or 2,
and a model unloaded on demand write the engine's cached blocks to the directory, and the next start, wake-up or
load finds them: the returning prompt's usage counts them cached, from the disk
(`prompt_tokens_details.cached_tokens_by_tier`), and its greedy reply is the one before."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from sagellm.gateway.config import ModelsOnDemand
from tests.gateway.conftest import GRAPHS, REPLY_TIMEOUT_S, running_gateway, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.network]

PROMPT = "Count to a hundred: " + ", ".join(str(i) for i in range(1, 60))
ENGINE = {"block_size": 4, "num_kv_blocks": 256, "max_num_seqs": 2}


def _complete(url: str, model: str | None = None) -> dict:
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    if model is not None:
        body["model"] = model
    reply = httpx.post(url + "/v1/completions", json=body, timeout=REPLY_TIMEOUT_S * 2)
    assert reply.status_code == 200, reply.text
    return reply.json()


def _from_disk(reply: dict) -> int:
    details = reply["usage"]["prompt_tokens_details"]
    assert details["cached_tokens"] == sum(details["cached_tokens_by_tier"].values()), details
    return details["cached_tokens_by_tier"].get("disk", 0)


def _colocated(tiny_model: Path, tmp_path: Path, kv_dir: Path):
    overrides = {f"engine.{name}": value for name, value in ENGINE.items()}
    return running_gateway(GRAPHS / "colocated.yaml", tiny_config(tmp_path), tiny_model,
                           **overrides, **{"engine.kv_offload_dir": str(kv_dir)})  # fmt: skip


def test_a_clean_stop_keeps_the_prefix_for_the_next_start(tiny_model, tmp_path):
    with _colocated(tiny_model, tmp_path / "first", tmp_path / "kv") as gateway:
        before = _complete(gateway.url)
        assert _from_disk(before) == 0
    with _colocated(tiny_model, tmp_path / "second", tmp_path / "kv") as gateway:
        again = _complete(gateway.url)
    assert _from_disk(again) >= again["usage"]["prompt_tokens"] - 4
    assert again["choices"][0]["text"] == before["choices"][0]["text"]


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_keeps_the_prefix_for_the_wake_up(tiny_model, tmp_path, level):
    with _colocated(tiny_model, tmp_path, tmp_path / "kv") as gateway:
        admin = {"authorization": f"Bearer {gateway.gateway.admin_key}"}
        before = _complete(gateway.url)
        asleep = httpx.post(gateway.url + "/sleep", params={"level": level}, headers=admin, timeout=REPLY_TIMEOUT_S)
        assert asleep.json() == {"is_sleeping": True, "level": level}
        again = _complete(gateway.url)  # wakes it
    assert _from_disk(again) >= again["usage"]["prompt_tokens"] - 4
    assert again["choices"][0]["text"] == before["choices"][0]["text"]


def test_a_model_unloaded_on_demand_finds_its_prefix_when_loaded_again(tiny_model, tmp_path):
    engine = {**ENGINE, "kv_offload_dir": str(tmp_path / "kv")}
    models = ModelsOnDemand({"tiny": str(tiny_model)}, engine=engine, max_loaded=1)
    with running_gateway(GRAPHS / "control_plane.yaml", tiny_config(tmp_path, models_on_demand=models)) as gateway:
        admin = httpx.Client(base_url=gateway.url, timeout=REPLY_TIMEOUT_S,
                             headers={"authorization": f"Bearer {gateway.gateway.admin_key}"})  # fmt: skip
        before = _complete(gateway.url, "tiny")
        assert admin.post("/models/unload", json={"model": "tiny"}).json() == {"success": True}
        again = _complete(gateway.url, "tiny")  # loads it again
        admin.close()
    assert _from_disk(again) >= again["usage"]["prompt_tokens"] - 4
    assert again["choices"][0]["text"] == before["choices"][0]["text"]
