"""The name -> backend class registry behind `--backend NAME` and the `sagellm backends` table.

The built-in backends register themselves when their module is imported; this module imports them on first use, and
each one imports its vendor stack (triton, torch_npu, torch_mlu) only inside `availability()` or `kernels()`, so
listing backends never fails on a machine that lacks one."""

from __future__ import annotations

import importlib

from sagellm.backends.base import Availability, BackendUnavailableError, HardwareBackend
from sagellm.common.errors import InvalidInput
from sagellm.common.registry import Registry

AUTO = "auto"
AUTO_ORDER = ("cuda", "cpu")  # "auto" picks the first available
_BUILTIN_MODULES = ("cpu", "cuda", "ascend", "cambricon", "hygon")


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(f"sagellm.backends.{module}")


BACKENDS: Registry[type[HardwareBackend]] = Registry("backend", discover=_load_builtins)
register_backend = BACKENDS.register


def backend_names() -> list[str]:
    return BACKENDS.names()


def availability_of(cls: type[HardwareBackend]) -> Availability:
    """`cls.availability()`, with a detection crash reported as unavailable rather than raised."""
    try:
        return cls.availability()
    except Exception as exc:  # a broken vendor install must not take down `sagellm backends`
        return Availability(False, f"detection failed: {type(exc).__name__}: {exc}")


def list_backends() -> list[tuple[str, Availability]]:
    return [(name, availability_of(cls)) for name, cls in BACKENDS.items().items()]


def get_backend(name: str) -> HardwareBackend:
    """Instantiates the backend `name` ("auto": cuda if available, else cpu).

    Raises InvalidInput for an unknown name and BackendUnavailableError when it cannot run here."""
    if name == AUTO:
        name = next(n for n in AUTO_ORDER if availability_of(BACKENDS.get(n)).available)
    if name not in BACKENDS:
        known = ", ".join([AUTO, *BACKENDS.names()])
        raise InvalidInput(f"unknown backend {name!r}; known backends: {known}")
    cls = BACKENDS.get(name)
    status = availability_of(cls)
    if not status.available:
        raise BackendUnavailableError(f"backend {name!r} is not available: {status.reason}")
    return cls()
