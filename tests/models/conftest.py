"""Fixtures for the model-loading tests: tiny random Hugging Face models, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import make_tiny_llama, make_tiny_qwen2


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_qwen2(tmp_path_factory.mktemp("tiny") / "tiny-qwen2")
