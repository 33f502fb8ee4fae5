"""A graph's `cluster:` block: the Ray cluster its `ray:GROUP` process groups run on, and what each group needs there.

    cluster:
      ray: auto                                   # the cluster's address (auto: the one `ray start` made here)
      groups:
        prefill: {num_cpus: 1, resources: {node_a: 0.1}}
        decode: {num_cpus: 1, resources: {node_b: 0.1}}

A group's settings place its worker (Ray's scheduler puts it on a node that has them); a group the block does not
name takes one CPU anywhere. A lost worker is started again by the run under the graph's `restart:` policy, not by
Ray. Only the settings are read here: Ray itself is imported where groups are launched
(`runtime.executor.ray_placement`), so a graph is checked on a host without Ray."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sagellm.common.errors import FieldError, check_known


@dataclass(frozen=True)
class RayGroup:
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory: int | None = None  # bytes the actor reserves
    resources: dict[str, float] = field(default_factory=dict)  # custom resources, as `ray start --resources` names

    def options(self) -> dict[str, Any]:
        """The actor's Ray options."""
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                                   "resources": dict(self.resources)}  # fmt: skip
        if self.memory is not None:
            options["memory"] = self.memory
        return options


@dataclass(frozen=True)
class RayCluster:
    address: str = "auto"
    groups: dict[str, RayGroup] = field(default_factory=dict)

    def group(self, name: str) -> RayGroup:
        return self.groups.get(name, RayGroup())

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any] | None) -> RayCluster:
        """The cluster a graph's `cluster:` mapping describes; FieldError names a bad key (`groups.decode.num_cpus`)."""
        settings = dict(settings or {})
        check_known(settings, ["ray", "groups"], "cluster setting")
        address = settings.get("ray", "auto")
        if not isinstance(address, str) or not address:
            raise FieldError("ray", f"ray: expected the Ray cluster's address (or auto), got {address!r}")
        groups = settings.get("groups") or {}
        if not isinstance(groups, Mapping):
            raise FieldError("groups", "groups: expected a mapping of process group -> its settings")
        return cls(address, {str(name): _group(str(name), value) for name, value in groups.items()})


def _group(name: str, value: Any) -> RayGroup:
    if not isinstance(value, Mapping):
        raise FieldError(f"groups.{name}", f"groups.{name}: expected a mapping of settings")
    if "max_restarts" in value:
        at = f"groups.{name}.max_restarts"
        raise FieldError(at, f"{at}: the run restarts its workers itself, under the graph's `restart:` policy "
                             "(max_restart_attempts and backoff); remove it")  # fmt: skip
    check_known(value, list(RayGroup.__dataclass_fields__), "setting", at=f"groups.{name}.")
    for key, item in value.items():
        at = f"groups.{name}.{key}"
        if key == "resources":
            if not isinstance(item, Mapping) or not all(_number(v) and v >= 0 for v in item.values()):
                raise FieldError(at, f"{at}: expected a mapping of resource name -> an amount >= 0")
        elif key == "memory":
            if isinstance(item, bool) or not isinstance(item, int) or item < 1:
                raise FieldError(at, f"{at}: expected a whole number of bytes")
        elif not _number(item) or item < 0:
            raise FieldError(at, f"{at}: expected a number >= 0, got {item!r}")
    return RayGroup(**{k: dict(v) if k == "resources" else v for k, v in value.items()})


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
