"""The autoscaler over a model loaded on demand (`sagellm serve --model tiny=... --autoscale 1:2`): a tiny Llama, its
engine running 2 requests at a time. A burst of greedy streams of that model makes its own autoscaler start a replica
(another engine process of the model, served under its name); a second wave, sent once the replica is ready, is
spread over both; every stream ends once, beginning with the offline API's greedy tokens. Unloading the model stops
its replica with it, and /metrics labels the decisions with the model's name."""

from __future__ import annotations

import re

import httpx
import pytest

from sagellm.gateway.config import ModelsOnDemand
from tests.gateway.conftest import GRAPHS, running_gateway, tiny_config
from tests.gateway.test_autoscaler import assert_texts_begin_as_offline, burst_and_wave, wait_for
from tests.tiny_models import make_tiny_llama

pytestmark = pytest.mark.slow  # engine processes started and stopped
BURST, WAVE = 16, 6  # streams
# Down never comes by itself here (the graph's autoscaler test drains a replica): the replica leaves with its model.
AUTOSCALE = {"min_instances": 1, "max_instances": 2, "up_waiting_per_instance": 1, "up_cooldown_s": 0,
             "down_delay_s": 3600, "interval_s": 0.25}  # fmt: skip


def test_a_model_on_demand_gets_a_replica_under_load_which_leaves_with_it(tmp_path):
    model = make_tiny_llama(tmp_path / "llama", max_position_embeddings=2048)
    engine = {"max_num_seqs": 2, "kv_cache_memory_gb": 0.05}
    on_demand = ModelsOnDemand({"tiny": str(model)}, engine=engine, autoscale=AUTOSCALE)
    with running_gateway(GRAPHS / "control_plane.yaml", tiny_config(tmp_path, models_on_demand=on_demand)) as gw:
        pool = gw.gateway.models
        tiny = pool.models["tiny"]
        replica, texts, ids = burst_and_wave(gw, lambda: tiny.scaler, BURST, WAVE, "tiny")
        streams = range(BURST + WAVE)
        served_by = {httpx.get(f"{gw.url}/v1/requests/{ids[i]}").json()["instance"] for i in streams}
        assert served_by == {tiny.engine_id, replica}
        assert_texts_begin_as_offline(model, texts)
        metrics = httpx.get(gw.url + "/metrics").text
        assert re.search(r'^sagellm:autoscaler_decisions_total\{direction="up",model="tiny"\} 1\.0$', metrics, re.M)

        headers = {"authorization": f"Bearer {gw.gateway.admin_key}"}
        unloaded = httpx.post(gw.url + "/models/unload", json={"model": "tiny"}, headers=headers, timeout=30)
        assert unloaded.status_code == 200, unloaded.text
        wait_for(lambda: tiny.status == "unloaded", "the model unloaded")
        assert replica not in gw.gateway.engines.engines and not gw.core.registry.instances()
        assert tiny.scaler is None and not pool.scalers.running
