"""The graph's model as its front reads it: loaded by the operators that need it, from the graph's `model` as
written, once per process; the executor that runs them knows nothing of models."""

from __future__ import annotations

import ast
from pathlib import Path

from sagellm.runtime.execution_graph.graph import Graph
from sagellm.runtime.models.loader import load_model
from sagellm.runtime.pipeline.served_model import GIVEN, ServedModel, context_limit, served_context, served_model
from tests.tiny_models import make_tiny_llama

ROOT = Path(__file__).resolve().parents[2]


def test_the_served_model_is_loaded_once_per_process_without_weights(tmp_path: Path) -> None:
    path = make_tiny_llama(tmp_path / "tiny")
    served = served_model({"model": str(path)})
    assert served is not None and served.path == str(path)
    reference = load_model(path, load_weights=False)
    assert served.tokenizer.encode("hello") == reference.tokenizer.encode("hello")
    assert served.vocab_size == reference.config.vocab_size
    assert served.max_model_len == reference.config.max_position_embeddings
    assert served_model({"model": str(path)}) is served  # every reader in the process shares it
    limited = served_model({"model": str(path), "max_model_len": 64})
    assert limited is not served and limited.max_model_len == 64 and limited.tokenizer is not None


def test_no_model_is_none_and_a_given_one_is_taken_as_it_is() -> None:
    assert served_model({}) is None
    given = ServedModel("m", tokenizer=None, config=None, sampling_defaults={"temperature": 0.3})
    assert served_model({"model": "not-loaded", GIVEN: given}) is given


def test_the_context_is_the_smallest_the_engines_set_and_never_over_the_models() -> None:
    graph = Graph()
    graph.add("engine", id="a", max_model_len=512)
    graph.add("engine", id="b", max_model_len=256)
    graph.add("route", id="r")
    assert context_limit(graph) == 256
    assert context_limit(Graph()) is None

    class Config:
        max_position_embeddings = 2048

    assert served_context(256, Config()) == 256
    assert served_context(4096, Config()) == 2048
    assert served_context(None, Config()) == 2048
    assert served_context(None, None) is None


def test_the_executor_imports_nothing_of_models() -> None:
    """Model names are resolved, and tokenizers loaded, by the operators that need them (docs/architecture.md)."""
    for path in sorted((ROOT / "runtime" / "executor").glob("*.py")):
        tree = ast.parse(path.read_text())
        imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        bad = [m for m in imported if m.startswith("sagellm.runtime.models")]
        assert bad == [], f"{path.name} imports {bad}"
