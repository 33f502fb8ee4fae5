"""The name -> backend class registry behind `--backend NAME` and the `sagellm backends` table.

The built-in backends register themselves when their module is imported; this module imports them on first use, and
each one imports its vendor stack (triton, torch_npu, torch_mlu) only inside `availability()` or `kernels()`, so
listing backends never fails on a machine that lacks one."""

from __future__ import annotations

import importlib

from sagellm.backends.base import Availability, BackendUnavailableError, HardwareBackend

AUTO = "auto"
AUTO_ORDER = ("cuda", "cpu")  # "auto" picks the first available
_BUILTIN_MODULES = ("cpu", "cuda", "ascend", "cambricon", "hygon")

_REGISTRY: dict[str, type[HardwareBackend]] = {}


def register_backend(cls: type[HardwareBackend]) -> type[HardwareBackend]:
    """Class decorator: makes `cls` reachable as `get_backend(cls.name)`."""
    if cls.name in _REGISTRY:
        raise ValueError(f"backend {cls.name!r} is already registered by {_REGISTRY[cls.name].__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(f"sagellm.backends.{module}")  # a no-op after the first time


def backend_names() -> list[str]:
    _load_builtins()
    return list(_REGISTRY)


def availability_of(cls: type[HardwareBackend]) -> Availability:
    """`cls.availability()`, with a detection crash reported as unavailable rather than raised."""
    try:
        return cls.availability()
    except Exception as exc:  # a broken vendor install must not take down `sagellm backends`
        return Availability(False, f"detection failed: {type(exc).__name__}: {exc}")


def list_backends() -> list[tuple[str, Availability]]:
    _load_builtins()
    return [(name, availability_of(cls)) for name, cls in _REGISTRY.items()]


def get_backend(name: str) -> HardwareBackend:
    """Instantiates the backend `name` ("auto": cuda if available, else cpu).

    Raises ValueError for an unknown name and BackendUnavailableError when it cannot run here."""
    _load_builtins()
    if name == AUTO:
        name = next(n for n in AUTO_ORDER if availability_of(_REGISTRY[n]).available)
    cls = _REGISTRY.get(name)
    if cls is None:
        known = ", ".join([AUTO, *_REGISTRY])
        raise ValueError(f"unknown backend {name!r}; known backends: {known}")
    status = availability_of(cls)
    if not status.available:
        raise BackendUnavailableError(f"backend {name!r} is not available: {status.reason}")
    return cls()
