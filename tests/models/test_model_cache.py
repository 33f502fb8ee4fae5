"""The model cache: where it lives, how names resolve, what it lists, and how a failed download reads."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sagellm.model_cache import (
    DEFAULT_MODEL,
    CachedModel,
    ModelCacheError,
    download_model,
    list_cached_models,
    models_dir,
    resolve_model,
)
from sagellm.runtime.models.loader import ModelLoadError, load_model
from tests.tiny_models import write_tiny_gguf


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SAGELLM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_models_dir_follows_sagellm_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert models_dir() == home / "models"
    monkeypatch.delenv("SAGELLM_HOME")
    assert models_dir() == Path("~/.cache/sagellm/models").expanduser()


def test_existing_path_resolves_as_is(home: Path, tiny_llama: Path) -> None:
    assert resolve_model(tiny_llama) == tiny_llama
    assert resolve_model(str(tiny_llama)) == tiny_llama


def test_unknown_name_is_a_clear_error(home: Path) -> None:
    with pytest.raises(ModelCacheError, match=r"^no-such-model: no such file or directory, and not a model name"):
        resolve_model("no-such-model")
    with pytest.raises(ModelCacheError, match=r"^no such: unknown model"):
        download_model("no such")
    assert issubclass(ModelCacheError, ModelLoadError)


def test_hub_download_failure_is_clear_and_leaves_no_partial_entry(home: Path) -> None:
    with pytest.raises(ModelCacheError, match=r"^sagellm-tests/no-such-model: download from the Hugging Face Hub"):
        resolve_model("sagellm-tests/no-such-model")
    assert list((home / "models").iterdir()) == []


def test_cached_models_are_listed_and_resolved_without_download(home: Path, tiny_llama: Path) -> None:
    root = home / "models"
    shutil.copytree(tiny_llama, root / "org--tiny")
    (root / DEFAULT_MODEL).mkdir(parents=True)
    write_tiny_gguf(root / DEFAULT_MODEL / "tiny.gguf", tiny_llama)
    (root / ".org--tiny-partial").mkdir()  # an interrupted download's staging directory
    (root / "notes").mkdir()  # not a model

    listed = list_cached_models()
    assert [(m.name, m.format) for m in listed] == [("org/tiny", "hf"), (DEFAULT_MODEL, "gguf")]
    assert all(isinstance(m, CachedModel) and m.size_bytes > 10_000 for m in listed)
    assert listed[0].size_bytes == sum(f.stat().st_size for f in (root / "org--tiny").rglob("*") if f.is_file())

    assert resolve_model("org/tiny") == root / "org--tiny"
    assert resolve_model(DEFAULT_MODEL) == root / DEFAULT_MODEL
    loaded = load_model(resolve_model(DEFAULT_MODEL), load_tokenizer=False)
    assert loaded.name == DEFAULT_MODEL and loaded.source == root / DEFAULT_MODEL / "tiny.gguf"


def test_failed_forced_download_keeps_the_cached_copy(home: Path, tiny_llama: Path) -> None:
    shutil.copytree(tiny_llama, home / "models" / "org--tiny")
    with pytest.raises(ModelCacheError):
        download_model("org/tiny", force=True)
    assert (home / "models" / "org--tiny" / "config.json").is_file()
    assert [m.name for m in list_cached_models()] == ["org/tiny"]
