"""Retrieval-augmented answers as SAGE jobs (PyPI `isage`), on our embedding engine and our serving pipeline.

1. Index: the documents are cut into chunks the embedding model takes whole, a SAGE job embeds them (our
   `embedding` engine node, all-MiniLM-L6-v2, batching the chunks on its own thread), and the vectors go into a
   FAISS index (`runtime.rag.VectorIndex`), saved under $SAGELLM_HOME/indexes/NAME.
2. Answer: `graphs/rag.yaml` runs as a SAGE job (`sagellm.sage.from_graph`): rag_retrieve puts each question's
   nearest chunks in front of it as numbered sources, then admission, the policy queue, route and the engine
   (SmolLM2-135M-Instruct) answer it; each answer is printed with its sources.

    python examples/sage_rag.py                          # indexes sageLLM's design and benchmark notes, asks
    python examples/sage_rag.py DIR "question" ...        # your own Markdown/text files, your questions
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from sagellm import graphs
from sagellm.common.home import indexes_dir
from sagellm.dsl import Pipeline
from sagellm.operators.replay_source import ReplaySource
from sagellm.runtime.models.model_cache import DEFAULT_EMBEDDING_MODEL, resolve_model
from sagellm.runtime.pipeline.messages import Request
from sagellm.runtime.pipeline.yaml_io import load_pipeline
from sagellm.runtime.rag import Chunk, VectorIndex, chunk_document
from sagellm.sage import from_graph

ROOT = Path(__file__).resolve().parents[1]
# The architecture notes and the benchmarks' README (not docs/sage.md, which shows this example's own output)
DOCS = [ROOT / "docs" / "architecture.md", ROOT / "benchmarks" / "README.md"]
QUESTIONS = [
    "Which folder holds the code that runs a graph across processes?",
    "How fast does the KV cache move between two processes over ipc?",
    "How many simulated requests a second does the cluster simulator run?",
]


def index_documents(name: str, documents: dict[str, str], embedding_model: str = DEFAULT_EMBEDDING_MODEL) -> Path:
    """Chunks `documents` (id -> text), embeds the chunks in a SAGE job (replay_source -> embedding -> metrics_sink,
    the embedding engine batching them on its own thread) and indexes them; -> the saved index's folder."""
    from transformers import AutoTokenizer

    model = str(resolve_model(embedding_model))
    tokenizer = AutoTokenizer.from_pretrained(model)
    chunks: dict[str, Chunk] = {}
    for doc_id, text in documents.items():
        for chunk in chunk_document(doc_id, text, lambda t: len(tokenizer(t)["input_ids"])):
            chunks[f"{doc_id}#{chunk.ordinal}"] = chunk
    requests = [Request(request_id=key, prompt=chunk.text, phase="embed") for key, chunk in chunks.items()]
    p = Pipeline("rag-index")
    p.chain(p.add("replay_source", "source"), p.add("embedding", model=model, max_batch=32), p.add("metrics_sink"))
    result = from_graph(p.graph(), operators={"source": ReplaySource(requests)}).run()
    failed = [o.error.message for o in result.outcomes.values() if o.error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} chunks could not be embedded, e.g. {failed[0]}")

    index = VectorIndex(name, len(next(iter(result.outcomes.values())).embedding))
    for doc_id in documents:
        keys = [key for key, chunk in chunks.items() if chunk.document_id == doc_id]
        if keys:
            vectors = np.array([result.outcomes[k].embedding for k in keys], dtype=np.float32)
            index.add(doc_id, [chunks[k] for k in keys], vectors)
    folder = indexes_dir() / name
    index.save(folder)
    return folder


def answer(index: str | Path, questions: list[str], max_tokens: int = 64) -> list[dict[str, Any]]:
    """`graphs/rag.yaml` over `index` as a SAGE job, greedy: each question's answer and the sources it was given."""
    graph = load_pipeline(graphs.find("rag"))
    graph.nodes["retrieve"].params["index"] = str(index)
    graph.nodes["source"].params.update(prompts=questions, max_tokens=max_tokens, temperature=0.0)
    del graph.nodes["stdout"]
    graph.edges = [e for e in graph.edges if "stdout" not in (e.src, e.dst)]
    result = from_graph(graph).run()
    cited = result.operators["retrieve"].cited
    return [
        {"question": q, "answer": result.outcomes[f"req-{i}"].text, "sources": cited.get(f"req-{i}", [])}
        for i, q in enumerate(questions)
    ]


def main(argv: list[str]) -> None:
    paths = sorted(Path(argv[0]).glob("*.md")) + sorted(Path(argv[0]).glob("*.txt")) if argv else DOCS
    questions = argv[1:] or QUESTIONS
    documents = {path.stem if argv else str(path.relative_to(ROOT)): path.read_text() for path in paths}
    folder = index_documents("sagellm-docs" if not argv else Path(argv[0]).name, documents)
    print(f"indexed {len(documents)} documents into {folder}", file=sys.stderr)
    for reply in answer(folder, questions):
        print(f"Q: {reply['question']}\nA: {reply['answer'].strip()}")
        for s in reply["sources"]:
            print(f"   [{s['number']}] {s['document_id']} (chunk {s['ordinal']}, score {s['score']:.2f})")
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
