"""One error family: every exception the product defines is a `SageLLMError` of a kind whose exit code and HTTP
status are set once, in `common/errors.py`; the `sagellm` command prints such an error as one line and exits with
its code, and anything else as a bug, with its traceback."""

from __future__ import annotations

import ast
import builtins
import re
import sys
from pathlib import Path

import pytest

from sagellm.cli import inspect_cmd
from sagellm.common import errors
from sagellm.common.errors import (
    FieldError,
    InternalError,
    InvalidInput,
    NotFound,
    SageLLMError,
    StartFailed,
    Unavailable,
    for_status,
)
from tests.cli.in_process import in_process

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("common", "backends", "runtime", "operators", "sagellm", "benchmarks")
# Exceptions that never reach a user: control flow between a few functions, each caught by its callers.
PRIVATE = {
    ("benchmarks/raw_http.py", "ConnectionClosed"),  # a reply cut short: a measured outcome, caught by the benchmarks
    ("sagellm/gateway/http/framing.py", "Close"),  # a connection to end: caught by the connection's own task
}
BUILTIN_EXCEPTIONS = {
    name for name, value in vars(builtins).items() if isinstance(value, type) and issubclass(value, BaseException)
}
KINDS = [errors.InvalidInput, errors.NotFound, errors.Unavailable, errors.StartFailed, errors.Lost,
         errors.ProtocolError, errors.InternalError, errors.SageLLMError]  # fmt: skip


def _classes() -> list[tuple[str, ast.ClassDef]]:
    """Every class the product defines: (file, its definition)."""
    found = []
    for folder in PRODUCT:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ClassDef):
                    found.append((str(path.relative_to(ROOT)), node))
    return found


CLASSES = _classes()


def _base_names(node: ast.ClassDef) -> set[str]:
    return {ast.unparse(base).rpartition(".")[2] for base in node.bases}


def _descendants(roots: set[str]) -> set[str]:
    """The names of the product's classes that derive, through any of their bases, from one named in `roots`."""
    names = set(roots)
    while True:
        more = {node.name for _, node in CLASSES if _base_names(node) & names} - names
        if not more:
            return names
        names |= more


EXCEPTIONS = [(path, node) for path, node in CLASSES if node.name in _descendants(BUILTIN_EXCEPTIONS)]


def test_every_exception_the_product_defines_is_a_sagellm_error() -> None:
    family = _descendants({"SageLLMError"})
    outside = [f"{path}: {node.name}" for path, node in EXCEPTIONS if node.name not in family]
    assert sorted(outside) == sorted(f"{path}: {name}" for path, name in PRIVATE)
    assert len(EXCEPTIONS) > 40, "the walk found too few exception classes: is the test run from a checkout?"


def test_one_class_per_name() -> None:
    """An error has one definition, however many modules raise it (JoinRefused, BenchmarkError)."""
    seen: dict[str, list[str]] = {}
    for path, node in EXCEPTIONS:
        seen.setdefault(node.name, []).append(path)
    assert {name: paths for name, paths in seen.items() if len(paths) > 1} == {}


def test_exit_codes_and_statuses_are_set_in_the_family_module_only() -> None:
    """A class picks its kind; only an error passing on an HTTP status sets its own, per instance (`self.`)."""
    setting = [
        f"{path}: {node.name}.{target.id}"
        for path, node in CLASSES
        if path != "common/errors.py"
        for statement in node.body
        if isinstance(statement, (ast.Assign, ast.AnnAssign))
        for target in (statement.targets if isinstance(statement, ast.Assign) else [statement.target])
        if isinstance(target, ast.Name) and target.id in ("exit_code", "http_status")
    ]
    assert setting == []


def test_the_docstring_table_is_the_classes_attributes() -> None:
    rows = re.findall(r"^ {4}(\w+) +(\d) +(\d{3}) +(\w+) ", errors.__doc__ or "", re.M)
    table = {name: (int(exit_code), int(status), code) for name, exit_code, status, code in rows}
    assert table == {kind.__name__: (kind.exit_code, kind.http_status, kind.code) for kind in KINDS}


def test_kinds_keep_what_code_catches() -> None:
    """InvalidInput is a ValueError (every check that raised one raises it); kinds do not share each other's codes."""
    assert issubclass(FieldError, InvalidInput) and issubclass(InvalidInput, ValueError)
    assert FieldError("x", "x: bad").field == "x"
    from sagellm.runtime.comm.zmq_trio import AddressError
    from sagellm.runtime.executor.process import WorkerStartError

    assert issubclass(AddressError, OSError) and issubclass(WorkerStartError, (StartFailed, RuntimeError))
    assert for_status(404) is NotFound and for_status(401) is InvalidInput and for_status(503) is Unavailable
    assert for_status(500) is SageLLMError


def test_the_client_errors_are_kinds_by_status() -> None:
    from sagellm.client import APIError, BadRequestError, GatewayNotFoundError, NotFoundError, RateLimitError

    assert issubclass(GatewayNotFoundError, Unavailable) and issubclass(NotFoundError, NotFound)
    assert issubclass(BadRequestError, InvalidInput) and issubclass(RateLimitError, Unavailable)
    refused = BadRequestError(413, "too big", "too_large")
    assert (refused.status, refused.http_status, refused.code, refused.exit_code) == (413, 413, "too_large", 2)
    assert APIError(418, "teapot").code is None  # OpenAI's field as the gateway sent it


def test_the_cli_prints_a_named_failure_as_one_line(tmp_path, capsys, monkeypatch) -> None:
    missing = in_process(capsys, monkeypatch, tmp_path, "inspect", str(tmp_path / "no-model"))
    assert missing.code == 2 and missing.err.count("\n") == 1
    assert missing.err.startswith(f"sagellm inspect: error: {tmp_path / 'no-model'}: no such file or directory")
    (tmp_path / "bad.yaml").write_text("nodes: {a: {op: nonsense}}\n")
    graph = in_process(capsys, monkeypatch, tmp_path, "run", str(tmp_path / "bad.yaml"))
    assert graph.code == 2 and graph.err.count("\n") == 1 and "unknown operator 'nonsense'" in graph.err


@pytest.mark.parametrize(
    "raised, code, lines",
    [
        (StartFailed("a worker did not start"), 1, ["sagellm inspect: error: a worker did not start"]),
        (
            ExceptionGroup("nursery", [StartFailed("a worker did not start"), ExceptionGroup("", [NotFound("no x")])]),
            2,
            ["sagellm inspect: error: a worker did not start", "sagellm inspect: error: no x"],
        ),
        (BaseExceptionGroup("nursery", [KeyboardInterrupt()]), 130, []),
        (KeyboardInterrupt(), 130, []),
    ],
)
def test_the_cli_exit_code_is_the_kinds(tmp_path, capsys, monkeypatch, raised, code, lines) -> None:
    monkeypatch.setattr(inspect_cmd, "run", _raising(raised))
    ran = in_process(capsys, monkeypatch, tmp_path, "inspect", "any")
    assert (ran.code, ran.err.splitlines()) == (code, lines)


@pytest.mark.parametrize(
    "raised",
    [KeyError("a bug"), InternalError("a state never reached"), ExceptionGroup("", [InvalidInput("x"), KeyError()])],
)
def test_anything_else_is_a_bug_with_its_traceback(tmp_path, capsys, monkeypatch, raised) -> None:
    monkeypatch.setattr(inspect_cmd, "run", _raising(raised))
    ran = in_process(capsys, monkeypatch, tmp_path, "inspect", "any")
    assert ran.code == 1 and "Traceback (most recent call last)" in ran.err
    last = "sagellm inspect: internal error: a bug in sageLLM; please report it with the traceback above"
    assert ran.err.splitlines()[-1] == last


def _raising(error: BaseException):
    def run(_):
        raise error

    return run


def test_a_model_that_will_not_load_is_one_line_from_the_command(tmp_path) -> None:
    """What the console script prints, no traceback: the loader's line, raised while the run starts its graph."""
    import subprocess

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    (tmp_path / "g.yaml").write_text(
        f"model: {tmp_path / 'broken'}\nnodes:\n  src: {{op: prompt_source, params: {{prompts: [hi]}}}}\n"
        "  engine: {op: engine}\nedges:\n  - src -> engine\n"
    )
    done = subprocess.run([sys.executable, "-m", "sagellm.cli.main", "run", str(tmp_path / "g.yaml")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"sagellm run: error: {tmp_path / 'broken' / 'config.json'}: unreadable JSON"), last
