"""A sageLLM pipeline run by SAGE (PyPI `isage`): SAGE's LocalEnvironment drives the stream, sageLLM's operators do
the serving work, on the default model (smollm2-135m-instruct, downloaded on first use).

    prompt_source -> admission -> engine (a SAGE service) -> stdout_sink
                                                           -> metrics_sink (printed when SAGE closes it)

`sage_function` turns a sageLLM operator into a real SAGE function class; the engine, a Step operator, becomes a
SAGE service (`sage_service`) whose `generate(request)` returns the request's replies, and `engine_caller` is the
SAGE function that calls it. Requests that SAGE has in flight at once share the engine's batches.

    pip install isage
    python examples/sage_pipeline.py "What is a dataflow?" "Name three rivers."
"""

from __future__ import annotations

import sys

from rich.console import Console
from sage.runtime import LocalEnvironment

from sagellm.runtime.models.model_cache import DEFAULT_MODEL
from sagellm.runtime.pipeline.metrics import render_metrics_table
from sagellm.sage import engine_caller, sage_function, sage_service


class MetricsReport(sage_function("metrics_sink", sink=True)):
    """SAGE calls `close()` on sinks at the end of a batch run: the moment to print the run's metrics."""

    def close(self) -> None:
        Console().print(render_metrics_table(self.operator.get_metrics()))
        super().close()


def main(prompts: list[str]) -> None:
    # The graph's attributes, as sageLLM's executor gives them to operators: the engine loads the model, and admission
    # its tokenizer and config (without the weights), each resolving the name on this host.
    attrs = {"model": DEFAULT_MODEL}

    env = LocalEnvironment("sagellm")
    env.register_service("engine", sage_service("engine", graph_attrs=attrs, max_num_seqs=4))
    replies = (
        env.from_source(sage_function("prompt_source", prompts=prompts, max_tokens=48))
        .map(sage_function("admission", graph_attrs=attrs))
        .flatmap(engine_caller("engine"))  # each request's TokenDeltas (or its RequestError)
    )
    replies.sink(sage_function("stdout_sink", sink=True), show_ids=True)
    replies.sink(MetricsReport)
    env.submit(autostop=True)  # returns when the source is exhausted, after closing the sinks and the engine


if __name__ == "__main__":
    main(sys.argv[1:] or ["What is a dataflow pipeline?", "Name three rivers in Europe.", ""])
