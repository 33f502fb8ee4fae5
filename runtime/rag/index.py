"""`VectorIndex`: a named set of document chunks and their embeddings, searched by cosine similarity.

Built on FAISS (PyPI `faiss-cpu`): `IndexFlatIP` is an exact inner-product search, and over L2-normalized vectors an
inner product is the cosine similarity; it is wrapped in `IndexIDMap2` so each chunk keeps an id of ours and a
document's chunks can be removed by id. Exhaustive search of 5,000 chunks of 384 floats takes about 0.1 ms, so an
approximate index (IVF, HNSW) would buy nothing but lost recall and training; hnswlib ships no wheels here.
FAISS is imported only when an index is made or loaded: importing `sagellm.runtime.rag` never needs it.

The index is synchronous and knows nothing of who calls it. One lock guards every mutation and search, so the
gateway's worker threads may share an index. `save` writes the FAISS index and a JSON of the chunks (each through a
temporary file renamed into place); the JSON holds a digest of the index file, so a pair from two different saves
(a crash between the renames) is refused on `load` rather than answering with the wrong chunks."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from sagellm.common.errors import InvalidInput, NotFound
from sagellm.runtime.rag.chunking import Chunk

log = structlog.get_logger("sagellm.rag")

INDEX_FILE = "index.faiss"
CHUNKS_FILE = "chunks.json"
FORMAT_VERSION = 1


class IndexNotFound(NotFound, FileNotFoundError):  # FileNotFoundError: what callers catch a missing file as
    """No saved index where one was asked for."""


@dataclass(frozen=True)
class Hit:
    """A chunk found by a search; `score` is its cosine similarity to the query, in [-1, 1]."""

    score: float
    chunk: Chunk


class VectorIndex:
    """The chunks of some documents and their `dim`-wide embeddings. A document is added whole and removed whole;
    adding a document id already present is refused (remove it first to replace it)."""

    def __init__(self, name: str, dim: int) -> None:
        if not name:
            raise InvalidInput("an index needs a name")
        if dim < 1:
            raise InvalidInput(f"dim must be at least 1, not {dim}")
        self.name = name
        self.dim = dim
        faiss = _faiss()
        self._faiss_index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._chunks: dict[int, Chunk] = {}  # FAISS id -> chunk
        self._documents: dict[str, list[int]] = {}  # document id -> its chunks' ids, in order
        self._next_id = 0  # ids are never reused, so a stale id can never name another chunk
        self._lock = threading.Lock()

    def add(self, document_id: str, chunks: Sequence[Chunk], embeddings: Any) -> list[int]:
        """Add a document's chunks with their embeddings (an (n, dim) array, or anything numpy turns into one, such
        as a CPU torch tensor; normalized here). Returns the chunks' ids, in order."""
        if not chunks:
            raise InvalidInput(f"document {document_id!r} has no chunks; an empty document cannot be indexed")
        if strangers := sorted({c.document_id for c in chunks} - {document_id}):
            raise InvalidInput(f"chunks of document(s) {strangers} given as document {document_id!r}")
        vectors = self._normalized(embeddings, rows=len(chunks))
        with self._lock:
            if document_id in self._documents:
                raise InvalidInput(
                    f"document {document_id!r} is already in index {self.name!r}; remove it first to replace it"
                )
            ids = list(range(self._next_id, self._next_id + len(chunks)))
            self._faiss_index.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))
            self._next_id += len(chunks)
            self._chunks.update(zip(ids, chunks))
            self._documents[document_id] = ids
        return ids

    def remove(self, document_id: str) -> int:
        """Remove a document's chunks; returns how many (0 for a document not in the index)."""
        with self._lock:
            ids = self._documents.pop(document_id, [])
            if ids:
                self._faiss_index.remove_ids(np.asarray(ids, dtype=np.int64))
                for chunk_id in ids:
                    del self._chunks[chunk_id]
        return len(ids)

    def search(self, query_embedding: Any, k: int) -> list[Hit]:
        """The `k` chunks most similar to the query (a (dim,) or (1, dim) vector), best first; fewer when the index
        holds fewer."""
        if k < 1:
            raise InvalidInput(f"k must be at least 1, not {k}")
        query = np.asarray(query_embedding)
        query = self._normalized(query.reshape(1, -1) if query.ndim == 1 else query, rows=1)
        with self._lock:
            if not self._chunks:
                return []
            with _faiss_single_threaded():
                scores, ids = self._faiss_index.search(query, min(k, len(self._chunks)))
            return [
                Hit(float(score), self._chunks[int(chunk_id)])
                for score, chunk_id in zip(scores[0], ids[0])
                if chunk_id >= 0
            ]

    def documents(self) -> dict[str, int]:
        """Each document's id and its number of chunks, in the order they were added."""
        with self._lock:
            return {document_id: len(ids) for document_id, ids in self._documents.items()}

    def __len__(self) -> int:
        """The number of chunks."""
        with self._lock:
            return len(self._chunks)

    def save(self, directory: str | Path) -> None:
        """Write the index into `directory` (made if missing) as `index.faiss` and `chunks.json`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            index_bytes = _faiss().serialize_index(self._faiss_index).tobytes()
            record = {
                "format": FORMAT_VERSION,
                "name": self.name,
                "dim": self.dim,
                "next_id": self._next_id,
                "index_sha256": hashlib.sha256(index_bytes).hexdigest(),
                "documents": {
                    document_id: [asdict(self._chunks[i]) | {"id": i} for i in ids]
                    for document_id, ids in self._documents.items()
                },
            }
            # Written under the lock too, so two saves of this index cannot interleave their files.
            _write_atomically(directory / INDEX_FILE, index_bytes)
            _write_atomically(directory / CHUNKS_FILE, json.dumps(record, ensure_ascii=False).encode())
            log.info("rag.index.saved", index=self.name, directory=str(directory), chunks=len(self._chunks))

    @classmethod
    def load(cls, directory: str | Path) -> VectorIndex:
        """The index `save` wrote into `directory`. Raises IndexNotFound when a file is missing and InvalidInput
        when the two files do not belong together or were written by another format version."""
        directory = Path(directory)
        try:
            record = json.loads((directory / CHUNKS_FILE).read_text())
            index_bytes = (directory / INDEX_FILE).read_bytes()
        except FileNotFoundError as error:
            raise IndexNotFound(f"no saved index in {directory}: {error.filename} is missing") from None
        if record.get("format") != FORMAT_VERSION:
            found = record.get("format")
            raise InvalidInput(f"{directory / CHUNKS_FILE}: format {found}; this code reads format {FORMAT_VERSION}")
        if hashlib.sha256(index_bytes).hexdigest() != record["index_sha256"]:
            raise InvalidInput(
                f"{directory}: {INDEX_FILE} is not the one {CHUNKS_FILE} was saved with (interrupted save?); "
                "save the index again"
            )
        index = cls(record["name"], record["dim"])
        index._faiss_index = _faiss().deserialize_index(np.frombuffer(index_bytes, dtype=np.uint8))
        index._next_id = record["next_id"]
        for document_id, chunk_records in record["documents"].items():
            ids = [chunk_record.pop("id") for chunk_record in chunk_records]
            index._documents[document_id] = ids
            index._chunks.update(zip(ids, (Chunk(**chunk_record) for chunk_record in chunk_records)))
        if index._faiss_index.d != index.dim or index._faiss_index.ntotal != len(index._chunks):
            raise InvalidInput(f"{directory}: {INDEX_FILE} does not match the chunks in {CHUNKS_FILE}")
        log.info("rag.index.loaded", index=index.name, directory=str(directory), chunks=len(index._chunks))
        return index

    def _normalized(self, embeddings: Any, rows: int) -> np.ndarray:
        """`embeddings` as a C-contiguous float32 (rows, dim) copy with unit-length rows."""
        vectors = np.asarray(embeddings, dtype=np.float32)
        if vectors.shape != (rows, self.dim):
            raise InvalidInput(
                f"index {self.name!r} takes {rows} embedding(s) of dimension {self.dim}, given shape {vectors.shape}"
            )
        if not np.isfinite(vectors).all():
            raise InvalidInput("embeddings contain NaN or infinity")
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)  # [rows, 1]
        if (norms == 0).any():
            raise InvalidInput("an embedding is all zeros: it has no direction to compare")
        return np.ascontiguousarray(vectors / norms)  # [rows, dim]: a new array, the caller's is left as it was


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as error:
        raise ImportError("the RAG index needs FAISS: pip install 'sagellm[rag]' (or faiss-cpu)") from error
    return faiss


@contextmanager
def _faiss_single_threaded() -> Iterator[None]:
    """FAISS's OpenMP set to one thread while one query is searched: a team of threads costs more than it saves on a
    few thousand vectors (0.12 ms alone, 1.3-8 ms with two threads on a busy 2-core machine). The setting is the
    calling thread's own in OpenMP and FAISS bundles its own libgomp, so nothing else changes, and it is restored."""
    faiss = _faiss()
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


def _write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, flush it to disk, then rename it over `path`: a reader sees
    the old file or the new one, never half of one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with temporary.open("wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
