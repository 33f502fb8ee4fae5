"""Where an engine runs: on its own devices (`device_ids`: on the cpu backend a lone engine's threads are pinned to its
cores, and a tensor parallel group shares them out, one core per rank here), with the planner's parallel sizes when
none are given. Each engine runs in a subprocess of its own,
since pinning is for the life of a process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sagellm.common.errors import FieldError
from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.models.loader import load_model
from sagellm.runtime.parallel.devices import Devices
from sagellm.runtime.parallel.engine import planned, stored_bytes_per_param
from sagellm.runtime.parallel.planner import ParallelismOptimizer
from tests.tiny_models import make_tiny_llama, write_tiny_gguf

PLACED = """
import json, os, sys, torch
from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.parallel.engine import start_engine
engine = start_engine(EngineConfig(model=sys.argv[1], backend="cpu", num_kv_blocks=16, **json.loads(sys.argv[2])))
ranks = [sorted(os.sched_getaffinity(r.pid)) for r in getattr(engine.runner, "ranks", [])]
print(json.dumps({"cores": sorted(os.sched_getaffinity(0)), "threads": torch.get_num_threads(), "ranks": ranks}))
engine.close()
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("placed") / "llama")


def placed(model, **settings) -> dict:
    ran = subprocess.run([sys.executable, "-c", PLACED, str(model), json.dumps(settings)], capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    return json.loads(ran.stdout.splitlines()[-1])  # after the engine's log lines (structlog's default: stdout)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_an_engine_runs_on_its_cores_and_a_group_shares_them_out(model):
    first, second = sorted(os.sched_getaffinity(0))[:2]
    assert placed(model, device_ids=[second]) == {"cores": [second], "threads": 1, "ranks": []}
    group = placed(model, device_ids=[first, second], tensor_parallel_size=2)
    assert group == {"cores": [first], "threads": 1, "ranks": [[second]]}


def test_devices_it_cannot_have_are_refused_with_the_reason(model):
    with pytest.raises(FieldError, match="device_ids must be device numbers"):
        EngineConfig(device_ids=[])
    ran = subprocess.run([sys.executable, "-c", PLACED, str(model), json.dumps({"device_ids": [4096]})],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert ran.returncode != 0 and "cannot run on cores [4096]" in ran.stderr


def test_unset_sizes_are_the_planners_and_given_ones_are_kept(model, tmp_path):
    """On this CPU a tiny model is one process; sizes given are never second-guessed; a model the planner finds
    fits nowhere (a context of 10^9 tokens' KV) still starts, in one process."""
    assert planned(EngineConfig(model=str(model), backend="cpu")).world_size == 1
    chosen = planned(EngineConfig(model=str(model), backend="cpu", tensor_parallel_size=2))
    assert (chosen.tensor_parallel_size, chosen.pipeline_parallel_size) == (2, 1)
    huge = make_tiny_llama(tmp_path / "huge", max_position_embeddings=10**9)
    assert planned(EngineConfig(model=str(huge), backend="cpu")).world_size == 1


def test_a_gguf_is_sized_as_the_blocks_the_cpu_keeps(model, tmp_path):
    """A Q4_K_M file's weights take its blocks' bytes on the CPU, not 4 bytes a parameter: the planner sizes what the
    engine will hold (a 7B Q4_K_M would otherwise be 28 GB and fit nowhere on this machine) and says so."""
    wide = make_tiny_llama(tmp_path / "wide", hidden_size=256, intermediate_size=512)
    gguf = load_model(write_tiny_gguf(tmp_path / "wide.gguf", wide, "Q4_K_M"), load_tokenizer=False)
    per_param = stored_bytes_per_param(gguf)
    assert per_param is not None and 0.55 < per_param < 1.0  # ~4.5-6.6 bits a weight, norms at 32
    assert stored_bytes_per_param(load_model(str(model), load_tokenizer=False)) is None  # safetensors: the dtype's
    devices = Devices("cpu", 1, 24.0, 1, "CPU")
    fp32 = ParallelismOptimizer(kv_tokens=64).recommend_strategy(gguf.config, devices)
    stored = ParallelismOptimizer(kv_tokens=64, weight_bytes_per_param=per_param).recommend_strategy(
        gguf.config, devices
    )
    assert stored.choice.weights_gib == pytest.approx(fp32.choice.weights_gib * per_param / 4, rel=1e-3)
    assert f"as stored ({8 * per_param:.2f} bits a parameter)" in stored.explanation
