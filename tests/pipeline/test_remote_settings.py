"""The settings of a graph run across hosts: `bind_host`, `advertise_host`, `control_port` and `remote:GROUP`
placements are checked at load, and every mistake names its file, line and field like any other."""

from __future__ import annotations

from pathlib import Path

import pytest

import sagellm.operators  # noqa: F401  (registers the operators the shipped graphs name)
from sagellm.runtime.executor.bridge import groups_of, remote_groups
from sagellm.runtime.pipeline.cluster import RayCluster
from sagellm.runtime.pipeline.operator import MapOperator, SourceOperator, register_operator
from sagellm.runtime.pipeline.spec import PipelineError, placement_group, same_graph
from sagellm.runtime.pipeline.yaml_io import dump_pipeline, load_pipeline
from tests.pipeline.test_yaml import assert_error_at

GRAPHS = Path(__file__).resolve().parents[2] / "graphs"


@register_operator
class _Source(SourceOperator):
    name = "test_remote_source"


@register_operator
class _Map(MapOperator):
    name = "test_remote_map"


VALID = """\
name: r
transport: tcp
bind_host: 0.0.0.0
advertise_host: head.example
control_port: 5555
nodes:
  src: {op: test_remote_source}
  a: {op: test_remote_map, placement: "process:front"}
  b: {op: test_remote_map, placement: "remote:back"}
  c: {op: test_remote_map, placement: remote}
  out: {op: test_remote_map}
edges:
  - src -> a -> b -> c -> out
"""


def test_settings_and_remote_groups_load_and_round_trip() -> None:
    graph = load_pipeline(VALID)
    assert (graph.attrs["bind_host"], graph.attrs["advertise_host"], graph.attrs["control_port"]) == (
        "0.0.0.0",
        "head.example",
        5555,
    )
    assert groups_of(graph) == {"src": "main", "a": "front", "b": "back", "c": "c", "out": "main"}
    assert remote_groups(graph) == ["back", "c"]
    assert same_graph(load_pipeline(dump_pipeline(graph)), graph)
    assert load_pipeline(VALID, overrides={"control_port": "6000"}).attrs["control_port"] == 6000


@pytest.mark.parametrize(
    ("placement", "expected"),
    [
        ("task", ("task", "main")),
        ("process", ("process", "n")),
        ("process:g", ("process", "g")),
        ("remote:g", ("remote", "g")),
        ("remote", ("remote", "n")),
        ("ray:g", ("ray", "g")),
    ],
)
def test_placement_group(placement: str, expected: tuple[str, str]) -> None:
    assert placement_group("n", placement) == expected


def test_the_shipped_two_host_graph() -> None:
    graph = load_pipeline(GRAPHS / "pd_remote.yaml")
    assert graph.attrs["transport"] == "tcp" and graph.attrs["bind_host"] == "0.0.0.0"
    assert graph.attrs["control_port"] == 5555
    assert remote_groups(graph) == ["decode"]
    assert {n for n, g in groups_of(graph).items() if g == "decode"} == {"kv_transfer", "decode"}


def test_the_shipped_ray_graph() -> None:
    graph = load_pipeline(GRAPHS / "pd_ray.yaml")
    cluster = RayCluster.from_settings(graph.attrs["cluster"])
    assert cluster.address == "auto" and set(cluster.groups) == {"prefill", "decode"}
    assert cluster.group("decode").options()["resources"] == {"decode_node": 0.1}
    assert remote_groups(graph) == ["decode", "prefill"] and remote_groups(graph, ("remote",)) == []


ERRORS = {  # case: (replacements in VALID, field, text on the reported line, problem)
    "port range": ({"control_port: 5555": "control_port: 0"}, "control_port", "control_port", "port in 1..65535"),
    "port type": ({"control_port: 5555": "control_port: x"}, "control_port", "control_port", "expected int"),
    "ipv6": ({"bind_host: 0.0.0.0": 'bind_host: "::"'}, "bind_host", "bind_host", "IPv6 is not supported"),
    "bad host": ({"bind_host: 0.0.0.0": "bind_host: a_b"}, "bind_host", "bind_host", "not an IPv4 address or a host"),
    "wildcard advertised": (
        {"advertise_host: head.example": "advertise_host: 0.0.0.0"},
        "advertise_host",
        "advertise_host",
        "not the wildcard 0.0.0.0",
    ),
    "hosts need tcp": (
        {"transport: tcp": "transport: ipc", '"remote:back"': '"process:back"', "placement: remote}": "}"},
        "bind_host",
        "bind_host",
        "applies to sockets on tcp only; set transport: tcp",
    ),
    "remote needs tcp": (
        {"transport: tcp\nbind_host: 0.0.0.0\nadvertise_host: head.example\ncontrol_port: 5555": "transport: ipc"},
        "nodes.b.placement",
        "remote:back",
        "a remote worker connects over tcp; set transport: tcp",
    ),
    "unknown placement": (
        {'"remote:back"': '"host:back"'},
        "nodes.b.placement",
        "host:back",
        "must be 'task', 'process', 'process:GROUP', 'remote:GROUP' or 'ray:GROUP'",
    ),
    "ray needs tcp": (
        {
            "transport: tcp\nbind_host: 0.0.0.0\nadvertise_host: head.example\ncontrol_port: 5555": "transport: ipc",
            '"remote:back"': '"ray:back"',
            "placement: remote}": "}",
        },
        "nodes.b.placement",
        "ray:back",
        "a ray worker connects over tcp; set transport: tcp",
    ),
    "ray group setting": (
        {"control_port: 5555": "control_port: 5555\ncluster: {ray: auto, groups: {back: {num_cpus: -1}}}"},
        "cluster.groups.back.num_cpus",
        "cluster",
        "expected a number >= 0, got -1",
    ),
    "ray unknown setting": (
        {"control_port: 5555": "control_port: 5555\ncluster: {ray: auto, groups: {back: {cpus: 1}}}"},
        "cluster.groups.back.cpus",
        "cluster",
        "unknown setting; the settings are num_cpus",
    ),
    "ray restarts are the run's": (
        {"control_port: 5555": "control_port: 5555\ncluster: {ray: auto, groups: {back: {max_restarts: 3}}}"},
        "cluster.groups.back.max_restarts",
        "cluster",
        "the run restarts its workers itself, under the graph's `restart:` policy",
    ),
    "main is taken": ({'"process:front"': '"process:main"'}, "nodes.a.placement", "process:main", "pick another"),
    "process and remote": (
        {'"remote:back"': '"remote:front"'},
        "nodes.b.placement",
        "remote:front",
        "group 'front' is remote here but process on node 'a'; pick one",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_name_file_line_and_field(case: str, tmp_path: Path) -> None:
    assert_error_at(VALID, ERRORS[case], tmp_path)


def test_a_bad_override_names_the_override() -> None:
    with pytest.raises(PipelineError, match=r"^--set bind_host: '::1' is not an IPv4 address"):
        load_pipeline(VALID, overrides={"bind_host": "'::1'"})
