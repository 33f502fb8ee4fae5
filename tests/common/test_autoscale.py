"""The autoscaler's decision (`common.autoscale`), on a clock the test moves: up when requests wait or SLOs are missed,
down when idle for the delay, one instance at a time within the bounds, never while one starts, up after its
cool-down; settings checked as a graph file's are."""

from __future__ import annotations

import pytest

from sagellm.common.autoscale import Autoscale, AutoscaleSettings, Signals
from sagellm.common.errors import FieldError

SETTINGS = AutoscaleSettings(min_instances=1, max_instances=3, up_waiting_per_instance=2, up_slo_violation_rate=0.2,
                             down_load=0.25, up_cooldown_s=10, down_delay_s=60)  # fmt: skip


def reading(ready=1, starting=0, removable=0, waiting=0, running=0, slots=None, violations=0.0) -> Signals:
    return Signals(ready=ready, starting=starting, removable=removable, waiting=waiting, running=running,
                   slots=4 * ready if slots is None else slots, slo_violation_rate=violations)  # fmt: skip


def test_up_when_requests_wait_then_not_while_it_starts_nor_before_the_cool_down():
    scale = Autoscale(SETTINGS)
    assert scale.decide(reading(waiting=2, running=4), now=0).delta == 0  # 2 waiting each: not more than 2
    up = scale.decide(reading(waiting=3, running=4), now=1)
    assert up.delta == 1 and "3.0 requests waiting per instance" in up.reason
    assert scale.decide(reading(starting=1, waiting=9, running=4), now=2).delta == 0  # the new one has no load yet
    held = scale.decide(reading(ready=2, removable=1, waiting=9, running=8), now=5)
    assert held.delta == 0 and "cooling down" in held.reason
    assert scale.decide(reading(ready=2, removable=1, waiting=9, running=8), now=11).delta == 1


def test_up_when_slos_are_missed_even_with_nothing_waiting_but_never_past_the_maximum():
    scale = Autoscale(SETTINGS)
    up = scale.decide(reading(running=1, violations=0.5), now=0)
    assert up.delta == 1 and "SLO violation rate 0.50" in up.reason
    top = scale.decide(reading(ready=3, removable=2, waiting=50, running=12), now=100)
    assert top.delta == 0 and "at the maximum of 3" in top.reason


def test_down_when_idle_for_the_delay_one_at_a_time_and_never_below_the_minimum_or_a_graph_engine():
    scale = Autoscale(SETTINGS)
    assert scale.decide(reading(waiting=5, running=4), now=0).delta == 1
    idle = reading(ready=2, removable=1, running=1)
    assert "quiet for 0 of 60 s" in scale.decide(idle, now=30).reason  # quiet from when it was first seen idle
    assert scale.decide(idle, now=89).delta == 0
    down = scale.decide(idle, now=90)
    assert down.delta == -1 and "load 0.12, below 0.25 for 60 s" in down.reason
    assert scale.decide(reading(ready=1, removable=0), now=500).delta == 0  # the graph's own: not removable
    assert scale.decide(reading(ready=2, removable=0), now=500).delta == 0
    assert scale.decide(reading(ready=2, removable=1, running=1, violations=0.01), now=500).delta == 0  # SLOs missed


def test_a_lull_shorter_than_the_delay_or_a_replica_just_ready_after_its_burst_removes_nothing():
    scale = Autoscale(SETTINGS)
    idle, busy = reading(ready=2, removable=1), reading(ready=2, removable=1, running=4)
    assert scale.decide(idle, now=0).delta == 0
    assert scale.decide(busy, now=59).delta == 0  # a second wave: the quiet starts again after it
    assert scale.decide(idle, now=60).delta == 0
    assert scale.decide(idle, now=119).delta == 0
    assert scale.decide(idle, now=120).delta == -1
    scale = Autoscale(SETTINGS)
    assert scale.decide(reading(waiting=9, running=4), now=0).delta == 1
    assert scale.decide(reading(starting=1), now=100).delta == 0  # the burst is served while the replica starts
    assert scale.decide(idle, now=101).delta == 0  # ready at last: quiet counts from here
    assert scale.decide(idle, now=161).delta == -1


def test_below_the_minimum_an_instance_is_added_at_once():
    scale = Autoscale(AutoscaleSettings(min_instances=2, max_instances=4))
    assert scale.decide(reading(ready=1), now=0).delta == 1
    assert scale.decide(reading(ready=0, starting=0), now=1).delta == 1  # (all lost): no cool-down for the minimum


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"min_instances": 3, "max_instances": 2}, "max_instances"),
        ({"min_instances": 0}, "max_instances"),
        ({"max_instances": "two"}, "max_instances"),
        ({"down_load": 1.0}, "down_load"),
        ({"up_slo_violation_rate": 0}, "up_slo_violation_rate"),
        ({"up_cooldown_s": -1}, "up_cooldown_s"),
        ({"interval_s": 0}, "interval_s"),
        ({"max_replicas": 2}, "max_replicas"),
    ],
)
def test_bad_settings_name_their_field(settings, field):
    with pytest.raises(FieldError) as error:
        AutoscaleSettings.from_settings(settings)
    assert error.value.field == field
