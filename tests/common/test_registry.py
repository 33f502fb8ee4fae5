"""The one registry helper behind operators, policies, routing strategies and backends."""

from __future__ import annotations

import pytest

from sagellm.common.registry import Registry, RegistryError


class Alpha:
    name = "alpha"


class Beta:
    name = "beta"


def test_lookup_listing_and_unknown_names() -> None:
    registry: Registry[type] = Registry("widget")
    registry.register(Beta)
    registry.register(Alpha)
    assert registry.get("alpha") is Alpha and "beta" in registry and "gamma" not in registry
    assert registry.names() == ["beta", "alpha"]  # registration order
    with pytest.raises(RegistryError, match="unknown widget 'gamma'; known: alpha, beta"):
        registry.get("gamma")


def test_a_name_belongs_to_one_class() -> None:
    registry: Registry[type] = Registry("widget")
    registry.register(Alpha)
    registry.register(Alpha)  # a re-imported module registers its class again: nothing changes
    impostor = type("Impostor", (), {"name": "alpha"})
    with pytest.raises(RegistryError, match="widget 'alpha' is registered twice"):
        registry.register(impostor)
    with pytest.raises(RegistryError, match="has no `name`"):
        registry.register(type("Nameless", (), {}))


def test_discovery_runs_once_before_the_first_lookup_and_a_failure_surfaces() -> None:
    calls: list[int] = []

    def discover() -> None:
        calls.append(1)
        registry.register(Alpha)

    registry: Registry[type] = Registry("widget", discover=discover)
    assert calls == []
    assert registry.get("alpha") is Alpha and registry.names() == ["alpha"] and calls == [1]

    def broken() -> None:
        raise ImportError("plugin module is broken")

    failing: Registry[type] = Registry("widget", discover=broken)
    for _ in range(2):  # every lookup says why, instead of a misleading "unknown widget"
        with pytest.raises(ImportError, match="plugin module is broken"):
            failing.get("alpha")


def test_lookups_raise_the_registry_s_own_error_type() -> None:
    class WidgetError(ValueError):
        pass

    registry: Registry[type] = Registry("widget", error=WidgetError)
    with pytest.raises(WidgetError):
        registry.get("alpha")
