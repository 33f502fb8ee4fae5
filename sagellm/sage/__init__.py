"""sageLLM inside SAGE (PyPI `isage`, imported as `sage`), two ways:
- a whole pipeline graph (YAML, DSL or `Graph`) as one SAGE job: `from_graph(graph).run()` (`job`), every operator
  kind mapped onto SAGE and one shared pipeline context, as `sagellm run` gives them;
- single operators as SAGE function and service classes, to compose into an app's own SAGE stream (`functions`).

SAGE is imported only when one of these is called, so `sagellm` never needs it."""

from sagellm.sage.functions import engine_caller, sage_function, sage_service
from sagellm.sage.job import SageJob, from_graph

__all__ = ["SageJob", "engine_caller", "from_graph", "sage_function", "sage_service"]
