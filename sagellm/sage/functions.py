"""Single sageLLM operators as SAGE function and service classes, for an app that builds its own SAGE stream around
them (a whole graph, queues and routing included, runs as one SAGE job through `sagellm.sage.job`).

SAGE builds pipelines from function *classes* (`env.from_source(Cls).map(Cls).sink(Cls)`, constructor arguments
passed through), so every builder here returns a class whose keyword arguments are the operator's parameters:
- Source operator -> `sage.foundation.SourceFunction` (`poll()` batches are handed out one item per `execute()`;
  an exhausted source returns SAGE's `StopSignal`, an empty poll returns None, which SAGE treats as idle);
- Map operator -> `MapFunction`, or `FlatMapFunction` with `flat=True` for operators that may return lists, or
  `SinkFunction` with `sink=True` (the operator's output is dropped);
- Step operator (an engine) -> `sage.runtime.BaseService` with a synchronous `generate(request) -> list[items]`.

The adapters keep the operator contract the sageLLM executor keeps: items outside `accepts` pass through unchanged,
an exception raised for an item becomes that request's `internal` RequestError, and logic never runs on two
threads at once (SAGE's batch path calls one function instance from a thread pool). Queue operators (popped only
when an engine has room) and multi-output operators (addressed outputs) need the graph around them: they are refused
here, and run in `from_graph`'s jobs. Each class built here opens its operator with a context of its own, so
operators that read the shared load (admission, the adaptive policy) see an idle pipeline; `from_graph` shares one.

SAGE is imported only when a builder is called, so `sagellm` never needs it."""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING, Any, ClassVar

from sagellm.runtime.pipeline.messages import RequestError, is_terminal
from sagellm.runtime.pipeline.operator import (
    InstanceStats,
    MapOperator,
    Operator,
    OperatorContext,
    OperatorError,
    SourceOperator,
    StepOperator,
    get_operator,
    parameter_types,
)

if TYPE_CHECKING:
    from types import ModuleType

__all__ = ["sage_function", "sage_service", "engine_caller"]


def sage_modules() -> tuple[ModuleType, ModuleType]:
    """`sage.foundation` and `sage.runtime`, or an ImportError that says how to get them."""
    try:
        import sage.foundation
        import sage.runtime
    except ImportError as e:
        raise ImportError(f"running sageLLM operators in SAGE needs SAGE: pip install isage ({e})") from e
    return sage.foundation, sage.runtime


def _resolve(operator: str | type[Operator], params: dict[str, Any]) -> type[Operator]:
    """The operator class, after checking the bound parameters by name against `parameter_types`."""
    cls = get_operator(operator) if isinstance(operator, str) else operator
    unknown = sorted(set(params) - set(parameter_types(cls)))
    if unknown:
        raise OperatorError(
            f"operator {cls.name!r} has no parameter(s) {unknown}; it takes {sorted(parameter_types(cls))}"
        )
    if cls.multi_output:
        raise OperatorError(
            f"operator {cls.name!r} addresses several outputs: run its graph as a SAGE job (sagellm.sage.from_graph)"
        )
    return cls


def _passes_through(op: Operator, item: Any) -> bool:
    return bool(op.accepts) and not isinstance(item, op.accepts)


def _internal_error(request_id: str, exc: Exception) -> RequestError:
    """What the executor makes of an operator raising: that request's terminal `internal` error."""
    return RequestError(request_id=request_id, code="internal", message=f"{type(exc).__name__}: {exc}")


class _Hosted:
    """Mixed into a SAGE function or service class: owns one operator, opened on first use (SAGE functions have no
    open hook, and SAGE instantiates function classes more than once per submit, so construction stays cheap)."""

    operator_class: ClassVar[type[Operator]]
    bound_params: ClassVar[dict[str, Any]]
    graph_attrs: ClassVar[dict[str, Any]]

    def __init__(self, **params: Any) -> None:
        super().__init__()  # SAGE's BaseFunction/BaseService: sets ctx (SAGE injects the real one later)
        self.operator = self.operator_class(**{**self.bound_params, **params})
        self._lock = threading.Lock()
        self._opened = False

    def _context(self) -> OperatorContext:
        return OperatorContext(node_id=self.name, graph_attrs=dict(self.graph_attrs))

    def _ensure_open(self) -> None:
        if not self._opened:
            self.operator.open(self._context())
            self._opened = True

    def close(self) -> None:
        """SAGE calls `close()` on sink functions at the end of a batch run (and `cleanup()` on services)."""
        if self._opened:
            self._opened = False
            self.operator.close()


class _Source(_Hosted):
    operator: SourceOperator

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._ready: deque[Any] = deque()

    def execute(self) -> Any:
        """One item, None when the poll brought none yet (SAGE polls again), `StopSignal` at the end."""
        with self._lock:  # SAGE's streaming mode may poll a source from a thread other than its own
            if not self._ready:
                self._ensure_open()
                polled = self.operator.poll()
                if polled is None:
                    return sage_modules()[1].StopSignal(self.name)
                self._ready.extend(polled)
            return self._ready.popleft() if self._ready else None


class _Map(_Hosted):
    operator: MapOperator

    def _apply(self, data: Any) -> Any | list[Any] | None:
        if _passes_through(self.operator, data):
            return data
        with self._lock:
            self._ensure_open()
            try:
                return self.operator.execute(data)
            except Exception as e:
                request_id = getattr(data, "request_id", None)
                if request_id is None:  # not a pipeline message: nothing to fail but the run
                    raise
                return _internal_error(request_id, e)


class _OneToOne(_Map):
    def execute(self, data: Any) -> Any:
        out = self._apply(data)
        if isinstance(out, list):
            raise TypeError(f"operator {self.operator.name!r} returned {len(out)} items; build it with flat=True")
        return out


class _OneToMany(_Map):
    def execute(self, data: Any) -> list[Any]:
        out = self._apply(data)
        return out if isinstance(out, list) else [] if out is None else [out]


class _Sink(_Map):
    def execute(self, data: Any) -> None:
        self._apply(data)


class _Engine(_Hosted):
    """A Step operator as a SAGE service, in vLLM's engine-loop-fed-by-a-queue shape made synchronous.

    `generate(request)` queues the request and blocks until the request's terminal item, then returns all of its
    items (TokenDeltas ending with a finished one, or a RequestError). SAGE runs each service call on a worker
    thread, so concurrent callers each block in their own `generate`; one of them at a time is the stepper: it
    adds every queued request to the engine and steps it, without holding the lock, so new requests queue up
    meanwhile and join the next step's batch. When the stepper's own request ends it hands the role to a waiter."""

    operator: StepOperator

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._changed = threading.Condition(self._lock)  # guards the fields below; notified after every step
        self._arrived: list[Any] = []  # requests not yet added to the engine
        self._outputs: dict[str, list[Any]] = {}  # request id -> its items so far, until its caller takes them
        self._finished: set[str] = set()  # request ids whose terminal item is in `_outputs`
        self._stepping = False  # whether a caller is driving the engine

    def _context(self) -> OperatorContext:
        ctx = super()._context()
        ctx.instances[ctx.node_id] = InstanceStats(name=ctx.node_id)  # the engine keeps its own stats current
        return ctx

    def setup(self) -> None:
        """SAGE calls it once, before the first call: loads the engine (the operator's `open`)."""
        with self._lock:
            self._ensure_open()

    def cleanup(self) -> None:
        with self._lock:
            self.close()

    def generate(self, request: Any) -> list[Any]:
        if _passes_through(self.operator, request):
            return [request]
        request_id = request.request_id
        with self._changed:
            self._arrived.append(request)
            while self._stepping and request_id not in self._finished:
                self._changed.wait()
            if request_id in self._finished:
                return self._take(request_id)
            self._stepping = True
        try:
            return self._step_until(request_id)
        finally:
            with self._changed:
                self._stepping = False
                self._changed.notify_all()

    def _step_until(self, request_id: str) -> list[Any]:
        """The stepper's loop; the engine is touched only here, by one thread at a time."""
        while True:
            with self._changed:
                arrived, self._arrived = self._arrived, []
            items = [out for r in arrived for out in self.operator.add(r)]
            if self.operator.has_work():
                try:
                    items += self.operator.step()
                except Exception as e:  # the executor's rule: a failed step fails the requests it held
                    items += [_internal_error(rid, e) for rid in self.operator.in_flight() or [request_id]]
            with self._changed:
                self._keep(items)
                self._changed.notify_all()
                if request_id in self._finished:
                    return self._take(request_id)
                if not self.operator.has_work() and not self._arrived:
                    raise RuntimeError(f"engine {self.name!r} went idle before request {request_id!r} finished")

    def _keep(self, items: list[Any]) -> None:
        for item in items:
            if item.request_id not in self._finished:  # nothing follows a request's terminal item
                self._outputs.setdefault(item.request_id, []).append(item)
                if is_terminal(item):
                    self._finished.add(item.request_id)

    def _take(self, request_id: str) -> list[Any]:
        self._finished.remove(request_id)
        return self._outputs.pop(request_id)


def _build(
    base: type, mixin: type[_Hosted], cls: type[Operator], params: dict[str, Any], graph_attrs: dict[str, Any] | None
) -> type:
    attrs = {
        "operator_class": cls,
        "bound_params": dict(params),
        "graph_attrs": dict(graph_attrs or {}),
        "__module__": __name__,
        "__doc__": f"SAGE {base.__name__} running the sageLLM operator {cls.name!r}.\n\n{cls.__doc__ or ''}",
    }
    return type(f"{cls.__name__}{base.__name__}", (mixin, base), attrs)


def sage_function(
    operator: str | type[Operator],
    *,
    sink: bool = False,
    flat: bool = False,
    graph_attrs: dict[str, Any] | None = None,
    **params: Any,
) -> type:
    """A SAGE function class running a Source or Map operator (registry name or class); `params` are bound as the
    operator's defaults, and the class's own keyword arguments (`.map(Cls, x=1)`) override them."""
    foundation, _ = sage_modules()
    cls = _resolve(operator, params)
    if issubclass(cls, SourceOperator):
        if sink or flat:
            raise OperatorError(f"operator {cls.name!r} is a source: sink= and flat= apply to Map operators")
        return _build(foundation.SourceFunction, _Source, cls, params, graph_attrs)
    if not issubclass(cls, MapOperator):
        hint = "; use sage_service() for Step operators" if issubclass(cls, StepOperator) else ""
        hint = hint or "; run its graph as a SAGE job (sagellm.sage.from_graph)"
        raise OperatorError(f"operator {cls.name!r} is a {cls.kind or '?'} operator, not a SAGE function{hint}")
    if sink and flat:
        raise OperatorError("a sink emits nothing: pass sink=True or flat=True, not both")
    if sink:
        return _build(foundation.SinkFunction, _Sink, cls, params, graph_attrs)
    if flat:
        return _build(foundation.FlatMapFunction, _OneToMany, cls, params, graph_attrs)
    return _build(foundation.MapFunction, _OneToOne, cls, params, graph_attrs)


def sage_service(operator: str | type[Operator], *, graph_attrs: dict[str, Any] | None = None, **params: Any) -> type:
    """A SAGE service class running a Step operator: `env.register_service("engine", sage_service("engine"))`,
    then a function calls `self.call_service("engine", request, method="generate")` (or uses `engine_caller`)."""
    _, runtime = sage_modules()
    cls = _resolve(operator, params)
    if not issubclass(cls, StepOperator):
        raise OperatorError(f"operator {cls.name!r} is a {cls.kind or '?'} operator; a SAGE service needs a Step one")
    return _build(runtime.BaseService, _Engine, cls, params, graph_attrs)


def engine_caller(service: str = "engine") -> type:
    """A SAGE FlatMapFunction class that sends each item to the named engine service and emits what comes back."""
    foundation, _ = sage_modules()

    def execute(self: Any, data: Any) -> list[Any]:
        return self.call_service(service, data, method="generate")

    doc = f"Sends each item to SAGE service {service!r} (`generate`) and emits the request's items."
    return type(f"Call_{service}", (foundation.FlatMapFunction,), {"execute": execute, "__doc__": doc})
