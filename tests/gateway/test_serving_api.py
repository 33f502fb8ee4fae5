"""The serving core's declared interface (`serving.interface.ServingApi`) holds for both cores the routes run
against: the gateway's `ServingCore` and an API server's `RemoteCore` have every member, methods with the protocol's
parameters (names, kinds, defaults and annotations) and coroutines where it has them, and so do their readiness
objects (`interface.Readiness`: `ModelReadiness`, `RemoteReadiness`); both request-stream types are one `ItemStream`;
the control room's gates fit the protocols they are registered as."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest

from sagellm.gateway.api_servers.remote_core import RemoteCore, RemoteReadiness, RemoteStream
from sagellm.gateway.control.model_pool import ModelPool
from sagellm.gateway.control.pooled_model import PooledModel
from sagellm.gateway.control.sleep_mode import SleepMode
from sagellm.gateway.serving.core import ServingCore
from sagellm.gateway.serving.interface import Readiness, ServingApi
from sagellm.gateway.serving.item_stream import ItemStream
from sagellm.gateway.serving.readiness import ModelReadiness, ModelsOnDemand, OnDemandModel, SleepGate
from sagellm.gateway.serving.request_stream import RequestStream


def _members(protocol: type) -> dict[str, Any]:
    """The protocol's own members: methods and properties by their definition, data members by their annotation."""
    own = {name: value for name, value in vars(protocol).items() if not name.startswith("_")}
    data = {name: None for name in protocol.__annotations__}
    return {**data, **own}


def _parameters(function: Any) -> list[tuple[str, Any, Any, Any]]:
    return [(p.name, p.kind, p.default, p.annotation) for p in inspect.signature(function).parameters.values()]


def _has_attribute(cls: type, name: str) -> bool:
    """A property, a declared field, or an attribute its methods set."""
    declared = any(name in getattr(base, "__annotations__", {}) for base in cls.__mro__)
    return isinstance(getattr(cls, name, None), property) or declared or f"self.{name} =" in inspect.getsource(cls)


def _check(cls: type, protocol: type) -> None:
    for name, member in _members(protocol).items():
        if member is None or isinstance(member, property):
            assert _has_attribute(cls, name), f"{cls.__name__} has no attribute {name}"
            continue
        implementation = getattr(cls, name, None)
        assert callable(implementation), f"{cls.__name__} has no method {name}"
        assert _parameters(implementation) == _parameters(member), f"{cls.__name__}.{name}: another signature"
        assert inspect.iscoroutinefunction(implementation) == inspect.iscoroutinefunction(member), f"{name}: async?"


@pytest.mark.parametrize("core", [ServingCore, RemoteCore])
def test_both_cores_answer_the_serving_api(core: type) -> None:
    _check(core, ServingApi)


@pytest.mark.parametrize("readiness", [ModelReadiness, RemoteReadiness])
def test_both_cores_readiness_answers_the_readiness_protocol(readiness: type) -> None:
    _check(readiness, Readiness)


def test_the_protocol_lists_what_the_routes_call() -> None:
    """Each member is one the routes use: a member nobody calls would be a promise both cores keep for nothing."""
    routes = Path(__file__).resolve().parents[2] / "sagellm" / "gateway"
    rooms = ("openai", "anthropic", "sessions", "indexes")
    code = "".join(path.read_text() for room in rooms for path in (routes / room).rglob("*.py"))
    for name in _members(ServingApi):
        assert f"core.{name}" in code, f"ServingApi.{name} is called by no route"
    for name in _members(Readiness):
        assert f"core.readiness.{name}" in code, f"Readiness.{name} is called by no route"


def test_one_request_stream_type() -> None:
    assert issubclass(RequestStream, ItemStream) and issubclass(RemoteStream, ItemStream)
    for cls in (RequestStream, RemoteStream):  # what a stream restated of another would show as its own
        assert not {"__aiter__", "has_ready", "watch"} & set(vars(cls)), cls.__name__


def test_the_control_rooms_gates_fit_their_protocols() -> None:
    _check(SleepMode, SleepGate)
    _check(ModelPool, ModelsOnDemand)
    _check(PooledModel, OnDemandModel)
