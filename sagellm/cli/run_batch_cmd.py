"""`sagellm run-batch -i requests.jsonl -o results.jsonl [MODEL_OR_GRAPH]`: a file of OpenAI batch requests run
offline (vLLM's `run-batch`), through the Batch API of a gateway started for it on a free loopback port with the
same model, graph and engine flags as `sagellm serve` (its state in a temporary directory, removed after), so each
line takes the path a served request takes. Every line of the input goes to one endpoint (`/v1/chat/completions`,
`/v1/completions`, `/v1/embeddings` or `/v1/rerank`); the output file holds one result per line in OpenAI's batch
output format (`custom_id`, `response.status_code`, `response.body`), the answered lines first, then those refused.
Progress on stderr; exit status 1 if the input file is refused (each bad line said) or any line failed."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import msgspec

from sagellm.cli.serve_flags import add_serve_arguments
from sagellm.common.errors import InvalidInput

DONE = ("completed", "failed", "cancelled")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run-batch", help="run a file of OpenAI batch requests offline",
                       description=__doc__.split("\n\n")[0])  # fmt: skip
    p.add_argument("-i", "--input-file", type=Path, required=True, help="the requests, one JSON line each")
    p.add_argument("-o", "--output-file", type=Path, required=True, help="where the results go, one JSON line each")
    add_serve_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import trio

    from sagellm.cli.serve_cmd import graph_and_config
    from sagellm.runtime.models.model_cache import DEFAULT_EMBEDDING_MODEL

    if not args.input_file.is_file():
        raise InvalidInput(f"{args.input_file}: no such file")
    data = args.input_file.read_bytes()
    embedding = None if args.no_embedding else (args.embedding_model or DEFAULT_EMBEDDING_MODEL)
    state = Path(tempfile.mkdtemp(prefix="sagellm-run-batch-"))
    try:
        graph, config = graph_and_config(args, embedding)
        config.host, config.port, config.state_dir, config.api_keys = "127.0.0.1", 0, state, []
        store, batch = trio.run(_run, graph, config, data, _endpoint(data), args.input_file.name)
        results = [store.results(batch, failed) for failed in (False, True)]
    finally:
        shutil.rmtree(state, ignore_errors=True)
    args.output_file.write_bytes(b"".join(results))
    if batch.status == "failed":
        for error in batch.errors or []:
            print(f"sagellm run-batch: line {error['line']}: {error['message']}", file=sys.stderr)
        return 1
    print(f"sagellm run-batch: {batch.completed} answered, {batch.failed} refused, written to {args.output_file}",
          file=sys.stderr)  # fmt: skip
    return 1 if batch.failed else 0


async def _run(graph: Any, config: Any, data: bytes, endpoint: str, name: str) -> tuple[Any, Any]:
    """The batch run to its end, and the store holding its results."""
    import trio

    from sagellm.gateway.server import serve

    async with trio.open_nursery() as nursery:
        gateway = await nursery.start(partial(serve, graph, config))
        runner = gateway.batches
        runner.priority = "normal"  # nobody else is served here to yield to
        file = runner.files.add("", name, "batch", data)
        batch = runner.create("", file.id, endpoint)
        shown = -1
        while batch.status not in DONE:
            if batch.completed + batch.failed != shown:
                shown = batch.completed + batch.failed
                print(f"sagellm run-batch: {shown} of {batch.total or '?'} lines done", file=sys.stderr, flush=True)
            await trio.sleep(0.5)
        gateway.stop.set()
    return runner.store, batch


def _endpoint(data: bytes) -> str:
    """The one endpoint every line names (the first line's; the batch refuses a line naming another)."""
    for raw in data.splitlines():
        if raw.strip():
            try:
                url = msgspec.json.decode(raw).get("url")
            except (msgspec.DecodeError, AttributeError):
                raise InvalidInput("the input's first line is not a JSON object") from None
            if not isinstance(url, str):
                raise InvalidInput("the input's first line names no url")
            return url
    raise InvalidInput("the input file has no request lines")
