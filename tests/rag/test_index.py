"""VectorIndex on real FAISS, with seeded random vectors: exact cosine search, ids that survive removal, clear
errors for what it cannot take, a save/load round trip that refuses a mismatched pair of files, and a lock that
lets threads add, remove and search at once. Importing the package does not import FAISS."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from sagellm.runtime.rag import Chunk, VectorIndex
from sagellm.runtime.rag.index import CHUNKS_FILE, INDEX_FILE

DIM = 8


def chunks_of(document_id: str, count: int) -> list[Chunk]:
    return [Chunk(document_id, i, f"{document_id} part {i}", 10 * i, 10 * i + 9) for i in range(count)]


def vectors(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, DIM)).astype(np.float32)  # [count, DIM]


@pytest.fixture
def index() -> VectorIndex:
    index = VectorIndex("docs", DIM)
    index.add("a", chunks_of("a", 3), vectors(3, seed=1))
    index.add("b", chunks_of("b", 2), vectors(2, seed=2))
    return index


def test_add_gives_ids_and_counts(index: VectorIndex) -> None:
    assert (index.name, index.dim, len(index)) == ("docs", DIM, 5)
    assert index.documents() == {"a": 3, "b": 2}
    assert index.add("c", chunks_of("c", 2), vectors(2, seed=3)) == [5, 6]


def test_search_is_exact_cosine_similarity_best_first(index: VectorIndex) -> None:
    stored = np.concatenate([vectors(3, seed=1), vectors(2, seed=2)])  # [5, DIM]
    query = stored[3] * 7.5  # its length must not matter
    hits = index.search(query, k=5)
    assert hits[0].chunk == chunks_of("b", 2)[0]
    assert hits[0].score == pytest.approx(1.0, abs=1e-6)
    unit = stored / np.linalg.norm(stored, axis=1, keepdims=True)  # [5, DIM]
    expected = sorted(unit @ (query / np.linalg.norm(query)), reverse=True)
    assert [hit.score for hit in hits] == pytest.approx(expected, abs=1e-5)
    assert [hit.chunk.text for hit in index.search(torch.from_numpy(query), k=2)] == [h.chunk.text for h in hits[:2]]


def test_search_returns_what_there_is(index: VectorIndex) -> None:
    assert len(index.search(vectors(1, seed=9), k=50)) == 5
    assert VectorIndex("empty", DIM).search(vectors(1, seed=9)[0], k=3) == []


def test_add_does_not_change_the_callers_array() -> None:
    embeddings = vectors(2, seed=4)
    before = embeddings.copy()
    VectorIndex("docs", DIM).add("a", chunks_of("a", 2), embeddings)
    np.testing.assert_array_equal(embeddings, before)


def test_remove_makes_a_document_unfindable_and_ids_are_not_reused(index: VectorIndex) -> None:
    assert index.remove("a") == 3
    assert index.remove("a") == 0
    assert index.remove("never-added") == 0
    assert (len(index), index.documents()) == (2, {"b": 2})
    assert {hit.chunk.document_id for hit in index.search(vectors(1, seed=1)[0], k=5)} == {"b"}
    assert index.add("a", chunks_of("a", 1), vectors(1, seed=5)) == [5]  # re-added after removal, a new id


@pytest.mark.parametrize(
    "document_id, chunks, embeddings, message",
    [
        ("c", chunks_of("c", 2), vectors(3, seed=0), r"takes 2 embedding\(s\) of dimension 8, given shape \(3, 8\)"),
        ("c", chunks_of("c", 1), np.ones((1, 4)), r"takes 1 embedding\(s\) of dimension 8, given shape \(1, 4\)"),
        ("c", [], np.ones((0, DIM)), r"document 'c' has no chunks; an empty document cannot be indexed"),
        ("c", chunks_of("d", 1), vectors(1, seed=0), r"chunks of document\(s\) \['d'\] given as document 'c'"),
        ("a", chunks_of("a", 1), vectors(1, seed=0), r"document 'a' is already in index 'docs'; remove it first"),
        ("c", chunks_of("c", 1), np.zeros((1, DIM)), r"an embedding is all zeros"),
        ("c", chunks_of("c", 1), np.full((1, DIM), np.nan), r"embeddings contain NaN or infinity"),
    ],
)
def test_add_refuses_what_it_cannot_index(
    index: VectorIndex, document_id: str, chunks: list[Chunk], embeddings: np.ndarray, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        index.add(document_id, chunks, embeddings)
    assert (len(index), index.documents()) == (5, {"a": 3, "b": 2})  # nothing half-added


def test_search_refuses_a_wrong_query(index: VectorIndex) -> None:
    with pytest.raises(ValueError, match=r"k must be at least 1, not 0"):
        index.search(vectors(1, seed=0)[0], k=0)
    with pytest.raises(ValueError, match=r"dimension 8, given shape \(1, 3\)"):
        index.search(np.ones(3), k=1)
    with pytest.raises(ValueError, match=r"takes 1 embedding\(s\) of dimension 8, given shape \(2, 8\)"):
        index.search(vectors(2, seed=0), k=1)


def test_a_bad_name_or_dimension_is_refused() -> None:
    with pytest.raises(ValueError, match="an index needs a name"):
        VectorIndex("", DIM)
    with pytest.raises(ValueError, match="dim must be at least 1, not 0"):
        VectorIndex("docs", 0)


def test_save_and_load_give_the_same_index(index: VectorIndex, tmp_path: Path) -> None:
    index.remove("a")
    index.add("c", chunks_of("c", 2), vectors(2, seed=3))
    index.save(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == [CHUNKS_FILE, INDEX_FILE]  # no temporaries

    loaded = VectorIndex.load(tmp_path / "saved")
    assert (loaded.name, loaded.dim, len(loaded), loaded.documents()) == ("docs", DIM, 4, {"b": 2, "c": 2})
    for seed in range(5):
        query = vectors(1, seed=seed)[0]
        assert loaded.search(query, k=4) == index.search(query, k=4)
    assert loaded.remove("b") == 2  # ids survive the round trip
    assert loaded.add("d", chunks_of("d", 1), vectors(1, seed=6)) == [7]  # and so does the next id

    index.save(tmp_path / "saved")  # saving over an earlier save replaces it
    assert VectorIndex.load(tmp_path / "saved").documents() == {"b": 2, "c": 2}


def test_load_refuses_files_from_different_saves(index: VectorIndex, tmp_path: Path) -> None:
    index.save(tmp_path / "one")
    index.remove("b")
    index.save(tmp_path / "two")
    (tmp_path / "two" / INDEX_FILE).write_bytes((tmp_path / "one" / INDEX_FILE).read_bytes())
    with pytest.raises(ValueError, match=rf"{INDEX_FILE} is not the one {CHUNKS_FILE} was saved with"):
        VectorIndex.load(tmp_path / "two")

    record = json.loads((tmp_path / "one" / CHUNKS_FILE).read_text())
    (tmp_path / "one" / CHUNKS_FILE).write_text(json.dumps(record | {"format": 99}))
    with pytest.raises(ValueError, match=r"format 99; this code reads format 1"):
        VectorIndex.load(tmp_path / "one")
    with pytest.raises(FileNotFoundError):
        VectorIndex.load(tmp_path / "missing")


def test_threads_can_add_remove_and_search_at_once() -> None:
    index = VectorIndex("shared", DIM)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for round_ in range(20):
                document_id = f"w{worker}-{round_}"
                index.add(document_id, chunks_of(document_id, 3), vectors(3, seed=worker * 100 + round_))
                assert len(index.search(vectors(1, seed=round_)[0], k=3)) == 3
                if round_ % 2:
                    assert index.remove(document_id) == 3
        except BaseException as error:  # handed to the main thread's assert
            errors.append(error)

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(index) == 4 * 10 * 3
    assert sorted(index.documents()) == sorted(f"w{w}-{r}" for w in range(4) for r in range(0, 20, 2))
    [hit] = index.search(vectors(3, seed=2 * 100 + 0)[0], k=1)  # worker 2's first document, kept
    assert (hit.chunk, hit.score) == (chunks_of("w2-0", 3)[0], pytest.approx(1.0, abs=1e-5))


def test_importing_the_package_does_not_import_faiss() -> None:
    code = "import sys, sagellm.runtime.rag; assert 'faiss' not in sys.modules, 'faiss imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_without_faiss_making_an_index_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # what Python does for a module that cannot be imported
    with pytest.raises(ImportError, match=r"pip install 'sagellm\[rag\]'"):
        VectorIndex("docs", DIM)
