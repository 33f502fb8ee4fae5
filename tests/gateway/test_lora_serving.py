"""LoRA adapters through the gateway, as vLLM serves them (`--enable-lora --lora-modules NAME=PATH`, a request's
`model` naming the adapter), against PEFT's own model: greedy replies of an adapter given at start, one loaded at run
time and the base, sent together (one batch), equal PEFT's, colocated and through the PD graph (both workers read the
adapter); `/v1/models` lists the adapters with their parent; an unloaded or unknown adapter is a 404; an adapter of
another base or above `--max-lora-rank` is a 400 naming the problem."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from sagellm.gateway.config import GatewayConfig
from tests.engine.test_lora import ALL, _adapter, _peft_greedy
from tests.gateway.conftest import GRAPHS, REPLY_TIMEOUT_S, running_gateway, sdk_client
from tests.tiny_models import make_tiny_llama

pytestmark = pytest.mark.slow

PROMPTS = [[5, 17, 42, 9, 3], [11, 2, 77, 31, 8, 60, 4]]
TOKENS = 8
LORA = {"enable_lora": True, "max_loras": 2, "max_lora_rank": 8, "kv_cache_memory_gb": 0.05, "max_num_seqs": 4}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-serving")
    base = make_tiny_llama(root / "base")
    first = _adapter(base, root / "first", 1, r=4, lora_alpha=8, target_modules=ALL)
    second = _adapter(base, root / "second", 2, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    expected = {name: _peft_greedy(base, path, PROMPTS) for name, path in (("base", None), ("first", first),
                                                                            ("second", second))}  # fmt: skip
    return base, first, second, expected


@pytest.fixture(scope="module", params=["colocated", "pd"])
def gateway(request, models, tmp_path_factory):
    base, first, _, _ = models
    nodes = ("engine",) if request.param == "colocated" else ("prefill", "decode")
    overrides = {f"{node}.{name}": value for node in nodes for name, value in LORA.items()}
    config = GatewayConfig(host="127.0.0.1", port=0, state_dir=tmp_path_factory.mktemp("state") / "state",
                           lora_modules={"first": str(first)})  # fmt: skip
    with running_gateway(GRAPHS / f"{request.param}.yaml", config, base, **overrides) as gw:
        yield gw


def greedy_ids(client: Any, model: str, index: int) -> list[int]:
    """The token ids of `model`'s greedy reply to PROMPTS[index], through the openai SDK's `client`."""
    reply = client.completions.create(model=model, prompt=PROMPTS[index], max_tokens=TOKENS, temperature=0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})  # fmt: skip
    return reply.choices[0].token_ids


def _admin(gateway) -> httpx.Client:
    headers = {"authorization": f"Bearer {gateway.gateway.admin_key}"}
    return httpx.Client(base_url=gateway.url, headers=headers, timeout=REPLY_TIMEOUT_S)


def test_adapters_and_the_base_in_one_batch_give_peft_s_greedy_replies(gateway, models):
    _, _, second, expected = models
    with _admin(gateway) as admin:
        loaded = admin.post("/v1/load_lora_adapter", json={"lora_name": "second", "lora_path": str(second)})
        assert loaded.status_code == 200, loaded.text
    client = sdk_client(gateway)
    cards = {m.id: m for m in client.models.list().data}
    assert cards["first"].parent == cards["second"].parent == gateway.core.model_name

    def greedy(job: tuple[str, int]) -> list[int]:
        name, index = job
        return greedy_ids(client, gateway.core.model_name if name == "base" else name, index)

    jobs = [(name, i) for i in range(len(PROMPTS)) for name in ("first", "base", "second")]
    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(greedy, jobs))
    assert replies == [expected[name][i] for name, i in jobs]
    with _admin(gateway) as admin:
        assert admin.post("/v1/unload_lora_adapter", json={"lora_name": "second"}).status_code == 200
    gone = httpx.post(gateway.url + "/v1/completions", json={"model": "second", "prompt": "hi"}, timeout=30)
    assert gone.status_code == 404 and "'second'" in gone.json()["error"]["message"]


def test_adapters_the_engines_cannot_serve_are_refused_by_name(gateway, models, tmp_path):
    base, first, _, _ = models
    big = _adapter(base, tmp_path / "big", 4, r=16, lora_alpha=16, target_modules=["q_proj"])
    other = make_tiny_llama(tmp_path / "other", hidden_size=32, intermediate_size=64)
    foreign = _adapter(other, tmp_path / "foreign", 3, r=4, lora_alpha=8, target_modules=ALL)
    with _admin(gateway) as admin:

        def load(name: str, path: Path | str) -> httpx.Response:
            return admin.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})

        too_big = load("big", big)
        assert too_big.status_code == 400 and "max_lora_rank" in too_big.json()["error"]["message"]
        wrong_base = load("foreign", foreign)
        assert wrong_base.status_code == 400 and "another base model" in wrong_base.json()["error"]["message"]
        assert load("nowhere", tmp_path / "nowhere").status_code == 404
        assert load("first", first).status_code == 400  # the name is taken
        assert admin.post("/v1/unload_lora_adapter", json={"lora_name": "nope"}).status_code == 404
    assert (
        httpx.post(gateway.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "y"}).status_code == 401
    )
