"""LoRA adapters of a model loaded on demand (vLLM's `--lora-modules` JSON form, whose `base_model_name` names the
model, and `/v1/load_lora_adapter` with it): the adapters are listed with the model as their parent while it is not
loaded; requests of two adapters and of the model itself, sent together, load it and get PEFT's greedy tokens; an
adapter of a base the server does not serve, or of none when the graph serves no model, is a 400 naming the problem."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from sagellm.gateway.config import FailoverPolicy, ModelsOnDemand
from tests.gateway.conftest import GRAPHS, REPLY_TIMEOUT_S, running_gateway, sdk_client, tiny_config
from tests.gateway.test_lora_serving import LORA, PROMPTS, greedy_ids, models  # noqa: F401  (models: a fixture)

pytestmark = pytest.mark.slow  # an engine process started


@pytest.fixture(scope="module")
def gateway(models, tmp_path_factory):  # noqa: F811
    base, first, _, _ = models
    on_demand = ModelsOnDemand({"tiny": str(base)}, engine=LORA)
    config = tiny_config(tmp_path_factory.mktemp("lora-on-demand"), models_on_demand=on_demand,
                         lora_modules={"first": str(first)}, lora_bases={"first": "tiny"},
                         failover=FailoverPolicy(retry_wait_s=120))  # fmt: skip
    with running_gateway(GRAPHS / "control_plane.yaml", config) as gw:
        yield gw


def _admin(gateway) -> httpx.Client:
    headers = {"authorization": f"Bearer {gateway.gateway.admin_key}"}
    return httpx.Client(base_url=gateway.url, headers=headers, timeout=REPLY_TIMEOUT_S)


def test_adapters_of_a_model_on_demand_load_it_and_give_peft_s_greedy_tokens(gateway, models):  # noqa: F811
    _, _, second, expected = models
    with _admin(gateway) as admin:
        body = {"lora_name": "second", "lora_path": str(second), "base_model_name": "tiny"}
        assert admin.post("/v1/load_lora_adapter", json=body).status_code == 200
    cards = {card["id"]: card for card in httpx.get(gateway.url + "/v1/models").json()["data"]}
    assert cards["first"]["parent"] == cards["second"]["parent"] == "tiny"
    assert cards["tiny"]["status"]["value"] == "unloaded"  # adapters load nothing until a request comes
    client = sdk_client(gateway)

    jobs = [(name, i) for i in range(len(PROMPTS)) for name in ("first", "tiny", "second")]
    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(lambda job: greedy_ids(client, *job), jobs))
    assert replies == [expected["base" if name == "tiny" else name][i] for name, i in jobs]


def test_an_adapter_of_a_base_not_served_here_is_refused_by_name(gateway, models):  # noqa: F811
    _, first, _, _ = models
    with _admin(gateway) as admin:
        elsewhere = {"lora_name": "x", "lora_path": str(first), "base_model_name": "nope"}
        refused = admin.post("/v1/load_lora_adapter", json=elsewhere)
        assert refused.status_code == 400 and "'nope'" in refused.json()["error"]["message"]
        unnamed = admin.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(first)})
        assert unnamed.status_code == 400 and "'tiny'" in unnamed.json()["error"]["message"]
