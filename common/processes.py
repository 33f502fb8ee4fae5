"""How sageLLM starts a Python process of its own (a pipeline worker, a managed engine, a background gateway, pip)."""

from __future__ import annotations

import sys


def python_module(module: str, *args: str) -> list[str]:
    """`python -I -m MODULE ARGS` with this interpreter. Isolated mode (-I) keeps the working directory and
    PYTHONPATH off `sys.path`, so a `sagellm/` folder where the user happens to stand (the parent of a clone, say)
    cannot stand in for the installed package in a process we start."""
    return [sys.executable, "-I", "-m", module, *args]
