"""The restart policy: exponential backoff with jitter, attempts in a row, a reset once a process proved stable, and
settings checked where they are written (a graph's `restart:`)."""

from __future__ import annotations

import random

import pytest

from sagellm.common.errors import FieldError
from sagellm.common.restart import RestartPolicy, Restarts
from sagellm.runtime.pipeline.spec import PipelineError
from sagellm.runtime.pipeline.yaml_io import load_pipeline


def test_delays_double_up_to_the_cap_and_jitter_only_shortens_them():
    exact = RestartPolicy(backoff_base_s=0.5, backoff_cap_s=5, jitter=0)
    assert [exact.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    jittered = RestartPolicy(backoff_base_s=1, backoff_cap_s=8, jitter=0.25)
    rng = random.Random(0)
    delays = [jittered.delay(3, rng) for _ in range(200)]
    assert all(3.0 <= d <= 4.0 for d in delays) and len(set(delays)) > 100  # spread, so lost processes do not stampede


def test_attempts_in_a_row_run_out_and_a_stable_process_starts_counting_again():
    restarts = Restarts(RestartPolicy(max_restart_attempts=2, jitter=0, stable_after_s=60))
    restarts.started(0)
    assert restarts.next_delay(10) == 1.0  # lost 10 s after its start: attempt 1
    restarts.started(11)
    assert restarts.next_delay(12) == 2.0  # lost again at once: attempt 2
    restarts.started(14)
    assert restarts.next_delay(15) is None  # a crash loop: given up
    stable = Restarts(RestartPolicy(max_restart_attempts=2, jitter=0, stable_after_s=60))
    for now in (0, 100, 200, 300):  # each loss comes after a minute of serving: never given up
        stable.started(now)
        assert stable.next_delay(now + 61) == 1.0
    assert stable.total == 4


def test_auto_restart_off_never_restarts():
    assert Restarts(RestartPolicy(auto_restart=False)).next_delay(0) is None


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"max_restart_attempts": -1}, "max_restart_attempts"),
        ({"max_restart_attempts": "3"}, "max_restart_attempts"),
        ({"backoff_base_s": 60}, "backoff_base_s"),  # above the cap
        ({"jitter": 1.5}, "jitter"),
        ({"auto_restart": 1}, "auto_restart"),
        ({"retries": 3}, "retries"),
    ],
)
def test_bad_settings_name_their_field(settings, field):
    with pytest.raises(FieldError) as error:
        RestartPolicy.from_settings(settings)
    assert error.value.field == field


def test_a_graph_file_points_at_the_bad_restart_setting(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(
        "model: m\nrestart:\n  backoff_base_s: 0.5\n  max_restart_attempts: -2\n"
        "nodes:\n  source: {op: prompt_source}\n  engine: {op: engine}\nedges:\n  - source -> engine\n"
    )
    with pytest.raises(PipelineError, match=r"g\.yaml:\d+: restart\.max_restart_attempts: .*0 or more"):
        load_pipeline(path)
    path.write_text(path.read_text().replace("-2", "3"))
    assert load_pipeline(path).attrs["restart"] == {"backoff_base_s": 0.5, "max_restart_attempts": 3}
