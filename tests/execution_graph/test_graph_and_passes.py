"""The IR: building, ordering, errors, and each optimization pass on a real model graph."""

import pytest

from sagellm.runtime.execution_graph.graph import Graph, GraphError, Value
from sagellm.runtime.execution_graph.passes import (
    fuse_add_rmsnorm,
    fuse_gated_activation,
    fuse_sibling_linears,
    optimize,
    plan_buffers,
)
from sagellm.runtime.models.decoder_graph import build_decoder_graph
from tests.tiny_models import tiny_model_config

CONFIG = tiny_model_config(vocab_size=100)


def test_duplicate_and_unknown_nodes_are_errors():
    g = Graph()
    x = g.add("input", id="x", name="x")
    with pytest.raises(GraphError, match="duplicate node id 'x'"):
        g.add("input", id="x")
    with pytest.raises(GraphError, match="unknown node 'nope'"):
        g.add("relu", [Value("nope")])
    g.add("relu", [x])


def test_cycle_is_reported_with_its_nodes():
    g = Graph()
    a = g.add("input", id="a")
    b = g.add("relu", [a], id="b")
    c = g.add("relu", [b], id="c")
    g.redirect(a, c)  # b now reads c, which reads b
    with pytest.raises(GraphError, match="cycle through b, c"):
        g.topological_order()


def test_decoder_graph_shape():
    g = build_decoder_graph(CONFIG)
    counts = g.op_counts()
    assert counts["linear"] == 7 * 3 + 1  # q k v o gate up down per layer, plus lm_head
    assert counts["attention"] == 3 and counts["rope"] == 3
    assert names(g, "input") == {"input_ids", "positions", "attn_metadata", "logits_indices"}
    assert names(g, "output") == {"logits"}


def names(g, op: str) -> set[str]:
    return {n.params["name"] for n in g.nodes.values() if n.op == op}


def test_pipeline_stage_graphs_carry_the_hidden_state_and_index_their_own_caches():
    first, last = build_decoder_graph(CONFIG, range(0, 2)), build_decoder_graph(CONFIG, range(2, 3))
    assert names(first, "input") == {"input_ids", "positions", "attn_metadata"}
    assert names(first, "output") == {"hidden", "residual"} and first.op_counts()["linear"] == 7 * 2  # no lm_head
    assert names(last, "input") == {"hidden", "residual", "positions", "attn_metadata", "logits_indices"}
    assert names(last, "output") == {"logits"} and "embedding" not in last.op_counts()
    caches = [(n.params["layer"], n.params["cache"]) for n in last.nodes.values() if n.op == "attention"]
    assert caches == [(2, 0)]  # model layer 2 is the stage's first, its KV in the stage's cache 0


def test_qwen2_graph_asks_for_qkv_biases():
    from dataclasses import replace

    g = build_decoder_graph(replace(CONFIG, architecture="qwen2", qkv_bias=True))
    biased = [n for n in g.nodes.values() if n.op == "linear" and n.params.get("bias")]
    assert len(biased) == 3 * 3


def test_the_graph_follows_the_configs_features_not_its_name():
    """Gemma 3's features: q/k norms, sandwich norms, GeGLU, a scaled embedding, soft-capped logits, and a window
    and its own rope table on the sliding layers only (the first two of every three)."""
    from dataclasses import replace

    gemma = replace(
        CONFIG, qk_norm=True, sandwich_norms=True, activation="gelu_tanh", embedding_scale=8.0, final_softcap=30.0,
        sliding_window=4, layer_types=("sliding_attention", "sliding_attention", "full_attention"),
        local_rope_theta=1e4,
    )  # fmt: skip
    g = optimize(build_decoder_graph(gemma))
    counts = g.op_counts()
    assert (counts["head_rmsnorm"], counts["gelu_tanh_mul"], counts["scale"], counts["softcap"]) == (6, 3, 1, 1)
    assert counts["silu_mul"] == 0 and counts["rmsnorm"] == 1 + 3 * 2  # the first norm, and 2 sandwich norms a layer
    attention = [n.params for n in g.topological_order() if n.op == "attention"]
    assert [(a["window"], a["softcap"]) for a in attention] == [(4, 0.0), (4, 0.0), (0, 0.0)]
    assert [n.params["table"] for n in g.topological_order() if n.op == "rope"] == ["local", "local", "global"]


def test_fuse_sibling_linears_makes_qkv_and_gate_up():
    g = fuse_sibling_linears(build_decoder_graph(CONFIG))
    linears = [n for n in g.nodes.values() if n.op == "linear"]
    assert len(linears) == 4 * 3 + 1  # qkv, o, gate_up, down per layer + lm_head
    qkv = [n for n in linears if isinstance(n.params["weight"], list) and len(n.params["weight"]) == 3]
    assert len(qkv) == 3 and qkv[0].params["out_features"] == 32 + 16 + 16
    assert g.op_counts()["split"] == 6


def test_fuse_gated_activation_then_add_rmsnorm():
    g = fuse_gated_activation(fuse_sibling_linears(build_decoder_graph(CONFIG)))
    counts = g.op_counts()
    assert counts["silu_mul"] == 3 and counts["silu"] == 0 and counts["mul"] == 0
    assert counts["split"] == 3  # only the qkv splits remain
    g = fuse_add_rmsnorm(g)
    counts = g.op_counts()
    # layer 0's first norm reads the embedding (no add); every other norm, and the final one, fuses
    assert counts["add_rmsnorm"] == 2 * 3 - 1 + 1
    assert counts["rmsnorm"] == 1 and counts["add"] == 0


def test_fusion_keeps_every_reader_connected():
    g = optimize(build_decoder_graph(CONFIG))
    order = g.topological_order()
    assert {n.op for n in order} >= {"linear", "split", "silu_mul", "add_rmsnorm", "attention", "output"}
    for edge in g.edges:
        assert edge.src_port < g.nodes[edge.src].num_outputs


def test_plan_buffers_never_shares_a_slot_between_live_values():
    g = plan_buffers(optimize(build_decoder_graph(CONFIG)))
    plan, order = g.attrs["buffer_plan"], g.attrs["order"]
    position = {node_id: i for i, node_id in enumerate(order)}
    last_read = {}
    for e in g.edges:
        last_read[Value(e.src, e.src_port)] = max(last_read.get(Value(e.src, e.src_port), -1), position[e.dst])
    intervals = [(position[v.node], last_read.get(v, position[v.node]), slot, v) for v, slot in plan.items()]
    for start, end, slot, value in intervals:
        for start2, end2, slot2, value2 in intervals:
            if value != value2 and slot == slot2:
                assert end < start2 or end2 < start, (value, value2)
    assert g.attrs["num_slots"] < len(plan) / 4  # reuse, not one slot per value
