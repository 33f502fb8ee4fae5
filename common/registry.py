"""Name -> class registries: operators, scheduling policies, routing strategies, hardware backends.

Each class says its own `name` and registers with the `register` decorator. A name taken by another class is an
error (two plugins must not silently replace each other); registering the same class again, as a re-imported module
does, changes nothing. Built-ins that live in modules nobody has imported yet are found by `discover`, called once
before the first lookup: the backends import their modules by name, the operators load the `sagellm.operators`
entry points, so third-party packages add operators the same way ours are found."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from sagellm.common.errors import InvalidInput

T = TypeVar("T", bound=type)


class RegistryError(InvalidInput):
    """An unknown name, or a name claimed by two classes."""


class Registry(Generic[T]):
    def __init__(
        self, kind: str, *, discover: Callable[[], object] | None = None, error: type[ValueError] = RegistryError
    ) -> None:
        """`kind` names what is registered in messages ("operator"); `error` is the exception type lookups raise."""
        self.kind = kind
        self.error = error
        self._discover = discover
        self._classes: dict[str, T] = {}

    def register(self, cls: T) -> T:
        """Class decorator: `cls` becomes `get(cls.name)`."""
        name = getattr(cls, "name", "")
        if not name:
            raise self.error(f"{cls.__qualname__} has no `name` to register as a {self.kind}")
        old = self._classes.get(name)
        if old is not None and _identity(old) != _identity(cls):
            raise self.error(f"{self.kind} {name!r} is registered twice: {_identity(old)} and {_identity(cls)}")
        self._classes[name] = cls
        return cls

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._classes[name]
        except (KeyError, TypeError):
            known = ", ".join(sorted(self._classes)) or "none"
            raise self.error(f"unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        """In registration order (which `auto` choices and listings follow)."""
        self._load()
        return list(self._classes)

    def items(self) -> dict[str, T]:
        self._load()
        return dict(self._classes)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._classes

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def _load(self) -> None:
        if self._discover is not None:
            self._discover()  # a failed import raises here, at every lookup, rather than hide as an unknown name
            self._discover = None


def load_entry_points(group: str) -> Callable[[], None]:
    """A `discover` that imports every entry point of `group` (importing a module registers its classes)."""

    def load() -> None:
        for entry in entry_points(group=group):
            entry.load()

    return load


def _identity(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
