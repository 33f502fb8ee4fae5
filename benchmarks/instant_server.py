"""The gateway in front of the W5 graph (admission → policy_sort → route → instant_engine → metrics_sink), served over
HTTP as `sagellm serve` serves a graph: what the gateway itself costs, with no model compute behind it. A benchmark
fixture, run as its own process so its event loop and CPU are apart from the load generator's:

    python -m sagellm.benchmarks.instant_server --port 8123 [--tokens 16] [--api-servers 2]

Without `--model`, requests carry token ids (there is no tokenizer: a text prompt is refused with 400, after the same
checks a real gateway makes of a long one); with it, chat and text requests are tokenized with that model's
tokenizer, as `sagellm serve` does. Each streams `--tokens` deltas, carrying `--reply`'s words as their text.
SIGINT/SIGTERM stop it."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import trio

from sagellm.benchmarks.pipeline_overhead import OverheadConfig, build_graph
from sagellm.common.logging import default_logging
from sagellm.gateway.config import GatewayConfig
from sagellm.gateway.server import serve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=16, help="deltas streamed per request (default: 16)")
    parser.add_argument("--model", default=None, help="whose tokenizer reads the requests (default: none)")
    parser.add_argument("--reply", default="", help="text the deltas stream, a word each (default: none)")
    parser.add_argument("--api-servers", type=int, default=0, help="API server processes in front (default: none)")
    args = parser.parse_args()
    default_logging()
    graph = build_graph(OverheadConfig(tokens=args.tokens), engines=1, model=args.model, reply=args.reply)
    with tempfile.TemporaryDirectory(prefix="sagellm-instant-") as state:
        config = GatewayConfig(host="127.0.0.1", port=args.port, state_dir=Path(state))
        trio.run(lambda: serve(graph, config, handle_signals=True, api_servers=args.api_servers))


if __name__ == "__main__":
    main()
