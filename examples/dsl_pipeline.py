"""A sageLLM pipeline written in Python instead of YAML: the SAGE-shaped DSL, then a branching PD graph.

    .venv/bin/python examples/dsl_pipeline.py

Both build the same IR the YAML files load into; `execute()` runs it (nodes placed in processes start there)."""

from sagellm.dsl import Environment, Pipeline
from sagellm.runtime.executor.run import run_pipeline

# A straight pipeline, one engine: source -> admission -> priority queue -> engine -> metrics -> stdout.
env = Environment("dsl-demo", model="smollm2-135m-instruct")
(
    env.from_source("prompt_source", prompts=["What is the capital of France?", "Name three colors."], max_tokens=48)
    .map("admission", max_queue=64)
    .map("policy_sort", policy="priority")
    .map("route")
    .map("engine", max_num_seqs=4)
    .map("metrics_sink")
    .sink("stdout_sink")
)
result = env.execute()
print(result.metrics())

# A branching graph: prefill and decode in two worker processes, like graphs/pd.yaml.
p = Pipeline("dsl-pd", model="smollm2-135m-instruct")
source = p.add("prompt_source", prompts=["Tell me a fact about Paris."], max_tokens=32)
route = p.add("route")
prefill = p.add("prefill", placement="process:prefill")
kv = p.add("kv_transfer", placement="process:decode")
decode = p.add("decode", placement="process:decode")
p.chain(source, p.add("admission"), p.add("policy_sort"), p.add("pd_split", threshold_tokens=1), route)
p.connect(route, prefill, decode)
p.chain(prefill, kv, decode, p.add("metrics_sink"), p.add("stdout_sink"))
run_pipeline(p.graph())
