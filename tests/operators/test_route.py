"""route and its strategies on real InstanceStats: determinism, distribution, consistent-hashing movement, prefix
locality, cache-aware trade-off, pinning, health and role filtering, the no-candidate errors; and the PrefixIndex."""

import os
import random
import subprocess
import sys
from collections import Counter

import pytest

from sagellm.common.errors import FieldError
from sagellm.operators.prefix_index import PrefixIndex
from sagellm.operators.route import Route
from sagellm.operators.routing import STRATEGIES
from sagellm.runtime.engine.prefix_hash import block_hashes
from sagellm.runtime.engine.sampling_params import EXPECTED_OUTPUT_TOKENS, SamplingParams
from sagellm.runtime.pipeline.messages import Request, RequestError
from sagellm.runtime.pipeline.operator import (
    Emit,
    InstanceStats,
    OperatorContext,
    get_operator,
    parameter_types,
)


def make_route(instances: list[InstanceStats], outputs: list[str] | None = None, **params) -> Route:
    route = Route(**params)
    ctx = OperatorContext(
        node_id="route",
        outputs=outputs if outputs is not None else [s.name for s in instances],
        instances={s.name: s for s in instances},
    )
    route.open(ctx)
    return route


def make_request(i: int, tokens: list[int] | None = None, **fields) -> Request:
    if tokens is None:
        tokens = random.Random(i).choices(range(1000), k=40)
    return Request(request_id=f"r{i}", prompt_token_ids=tokens, **fields)


def pool(n: int, role: str = "colocated") -> list[InstanceStats]:
    return [InstanceStats(name=f"e{i}", role=role, max_running=10_000) for i in range(n)]


def send(route: Route, request: Request) -> str:
    out = route.execute(request)
    assert isinstance(out, Emit) and out.item is request and request.instance == out.to
    return out.to


def test_registered_with_typed_params_and_validates_strategy():
    assert get_operator("route") is Route and Route.multi_output
    assert parameter_types(Route) == {"strategy": (str, False), "seed": (int | None, False), "block_size": (int, False),
                                      "kv_events": (bool, False)}  # fmt: skip
    with pytest.raises(FieldError, match=r"'fastest'.*cache_aware.*round_robin") as raised:
        Route(strategy="fastest")
    assert raised.value.field == "strategy"


@pytest.mark.parametrize("strategy", sorted(STRATEGIES.names()))
def test_same_inputs_give_same_choices(strategy):
    def run() -> list[str]:
        route = make_route(pool(3), strategy=strategy, seed=3)
        return [send(route, make_request(i, user=f"u{i % 7}")) for i in range(60)]

    assert run() == run()


def test_round_robin_is_exact():
    route = make_route(pool(3), strategy="round_robin")
    choices = [send(route, make_request(i)) for i in range(300)]
    assert choices[:4] == ["e0", "e1", "e2", "e0"]
    assert Counter(choices) == {"e0": 100, "e1": 100, "e2": 100}


def test_random_is_seeded_and_uniform():
    def run(seed: int) -> list[str]:
        route = make_route(pool(3), strategy="random", seed=seed)
        return [send(route, make_request(i, tokens=[i])) for i in range(3000)]

    first = run(11)
    assert first == run(11) and first != run(12)
    assert all(abs(n - 1000) < 100 for n in Counter(first).values())  # about 4 standard deviations


def test_load_balanced_evens_out_uneven_start():
    instances = pool(3)
    instances[0].queued_prefill_tokens = 1000
    route = make_route(instances, strategy="load_balanced")
    choices = [send(route, make_request(i, sampling=SamplingParams(max_tokens=10))) for i in range(60)]
    assert "e0" not in choices[:10]  # 50 tokens a request: e1 and e2 absorb e0's head start first
    works = [s.predicted_work for s in instances]
    assert max(works) - min(works) <= 50


def test_load_balanced_sends_to_a_free_slot_before_a_shorter_queue():
    full = InstanceStats(name="engine", max_running=2, running=2, queued_decode_tokens=20)  # 2 running, nearly done
    replica = InstanceStats(name="replica", max_running=2, running=1, queued_decode_tokens=100)  # a slot free
    route = make_route([full, replica], strategy="load_balanced")
    assert send(route, make_request(0, sampling=SamplingParams(max_tokens=10))) == "replica"
    assert replica.saturated  # both full now: the shorter queue
    assert send(route, make_request(1, sampling=SamplingParams(max_tokens=10))) == "engine"


def test_unhealthy_and_wrong_role_instances_are_never_chosen():
    instances = pool(3) + [InstanceStats(name="p0", role="prefill")]
    instances[1].healthy = False
    for strategy in STRATEGIES:
        route = make_route(instances, strategy=strategy, seed=0)
        chosen = {send(route, make_request(i, user=f"u{i}")) for i in range(200)}
        assert chosen == {"e0", "e2"}, strategy


def test_phase_selects_roles_and_non_engine_outputs_are_ignored():
    instances = [
        InstanceStats(name="c0"),
        InstanceStats(name="d0", role="decode"),
        InstanceStats(name="p0", role="prefill"),
    ]
    route = make_route(instances, outputs=["metrics", "c0", "d0", "p0"], strategy="round_robin")
    assert {send(route, make_request(i)) for i in range(6)} == {"c0", "d0"}
    assert {send(route, make_request(i, phase="prefill")) for i in range(6)} == {"p0"}


def test_pinned_instance_is_honored_only_when_it_is_a_candidate():
    instances = pool(3)
    route = make_route(instances, strategy="round_robin")
    assert [send(route, make_request(i, instance="e2")) for i in range(3)] == ["e2"] * 3
    instances[2].healthy = False
    assert send(route, make_request(9, instance="e2")) != "e2"


def test_logprobs_go_to_the_graphs_own_engines_while_one_is_healthy():
    from sagellm.runtime.engine.sampling_params import SamplingParams

    own = InstanceStats(name="engine", role="colocated", max_running=10_000)
    replica = InstanceStats(name="joined", role="colocated", node="remote", max_running=10_000)
    route = make_route([own, replica], outputs=["engine", "remote"], strategy="round_robin")

    def chosen(request: Request) -> str:
        out = route.execute(request)
        assert isinstance(out, Emit)
        return request.instance

    wants = SamplingParams(logprobs=2)
    assert [chosen(make_request(i, sampling=wants)) for i in range(3)] == ["engine"] * 3
    assert {chosen(make_request(i)) for i in range(4)} == {"engine", "joined"}  # the others go to both
    own.healthy = False
    assert chosen(make_request(9, sampling=wants)) == "joined"  # its server refuses them itself, saying why


def test_no_candidate_errors_name_the_phase():
    instances = pool(2)
    for s in instances:
        s.healthy = False
    error = make_route(instances).execute(make_request(1))
    assert isinstance(error, RequestError) and error.code == "unavailable" and error.retryable
    assert "colocated" in error.message and "e0" in error.message
    error = make_route(pool(2)).execute(make_request(2, phase="prefill"))
    assert isinstance(error, RequestError) and error.code == "internal" and not error.retryable
    assert "prefill request" in error.message and "e0 (colocated)" in error.message


def test_charges_the_chosen_instance_optimistically():
    instances = [InstanceStats(name="d0", role="decode"), InstanceStats(name="p0", role="prefill")]
    route = make_route(instances)
    prompt = list(range(40))  # two full blocks of 16 and a partial one
    send(route, make_request(1, tokens=prompt, sampling=SamplingParams(max_tokens=30)))
    assert (instances[0].queued_prefill_tokens, instances[0].queued_decode_tokens, instances[0].running) == (40, 30, 1)
    send(route, make_request(2, tokens=prompt, sampling=SamplingParams(max_tokens=None)))
    assert instances[0].queued_prefill_tokens == 40 + 8  # the two cached blocks are not charged again
    assert instances[0].queued_decode_tokens == 30 + EXPECTED_OUTPUT_TOKENS
    send(route, make_request(3, tokens=prompt, phase="prefill"))
    assert (instances[1].queued_prefill_tokens, instances[1].queued_decode_tokens, instances[1].running) == (40, 0, 1)


def test_affinity_keeps_users_and_moves_about_one_nth_of_them():
    instances = pool(4)
    route = make_route(instances, strategy="affinity")
    users = [f"user-{i}" for i in range(2000)]

    def assign() -> dict[str, str]:
        return {u: send(route, make_request(i, user=u)) for i, u in enumerate(users)}

    before = assign()
    assert before == assign()  # stable whatever the load
    assert all(abs(n / len(users) - 1 / 4) < 0.06 for n in Counter(before.values()).values())
    instances[3].healthy = False
    after_removal = assign()
    moved = {u for u in users if after_removal[u] != before[u]}
    assert moved == {u for u in users if before[u] == "e3"} and 0.19 < len(moved) / len(users) < 0.31
    route.ctx.instances["e4"] = InstanceStats(name="e4", max_running=10_000)
    route.ctx.outputs.append("e4")
    instances[3].healthy = True
    after_add = assign()
    moved = {u for u in users if after_add[u] != before[u]}
    assert {after_add[u] for u in moved} == {"e4"} and 0.14 < len(moved) / len(users) < 0.26
    anonymous = [send(route, make_request(7, user=None)) for _ in range(3)]
    assert len(set(anonymous)) == 1  # keyed by request id


def test_locality_sends_a_shared_prefix_to_one_instance():
    route = make_route(pool(3), strategy="locality")
    system = list(range(500, 532))
    chosen = {send(route, make_request(i, tokens=system + [i, i + 1])) for i in range(50)}
    assert len(chosen) == 1
    spread = {send(route, make_request(i, tokens=[i] * 16 + system)) for i in range(50)}
    assert len(spread) == 3  # different first blocks spread over the instances
    short = [send(route, make_request(i, tokens=[1, 2, 3])) for i in range(5)]
    assert len(set(short)) == 1


def test_cache_aware_prefers_cached_prefix_until_load_outweighs_it():
    instances = pool(2)
    route = make_route(instances, strategy="cache_aware")
    shared = list(range(512))
    instances[0].healthy = False
    assert send(route, make_request(0, tokens=shared)) == "e1"  # now e1 has the 512-token prefix cached
    instances[0].healthy = True

    def follow(i: int, e1_load: int) -> str:
        """A new 16-token question after the shared prefix: costs 16 + load on e1, 528 on an idle e0."""
        for s in instances:
            s.queued_prefill_tokens = s.queued_decode_tokens = 0
        instances[1].queued_decode_tokens = e1_load
        return send(route, make_request(i, tokens=shared + list(range(1000 + 16 * i, 1016 + 16 * i))))

    assert follow(1, 0) == "e1"  # e1 is second in order, so the cache decides
    assert follow(2, 500) == "e1"  # 516 < 528: still worth waiting for
    assert follow(3, 512) == "e0"  # 528 = 528: a tie goes to the first candidate
    assert follow(4, 520) == "e0"  # 536 > 528: the queue outweighs the saved prefill


def test_prefix_index_hashes_chain_and_evict_tails_first():
    a, b = list(range(48)), list(range(32)) + [7] * 16
    assert block_hashes(a)[:2] == block_hashes(b)[:2] and block_hashes(a)[2] != block_hashes(b)[2]
    assert len(block_hashes(list(range(47)))) == 2  # a partial block is not hashed
    index = PrefixIndex(block_size=16, max_blocks_per_instance=4)
    index.record("x", a)
    assert index.cached_tokens("x", b) == 32 and index.cached_tokens("y", a) == 0
    index.record("x", list(range(100, 148)))
    assert index.num_blocks("x") == 4 and index.cached_tokens("x", a) == 16  # a kept its root, lost its tail


def test_block_hashes_are_the_same_in_another_process():
    code = "from sagellm.runtime.engine.prefix_hash import block_hashes; print(block_hashes(list(range(40)), 8))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(block_hashes(list(range(40)), 8))
