"""Pipeline graphs (`sagellm.runtime.pipeline`): LLM serving written as a graph of streaming operators.

A pipeline graph is the same IR `Graph` that model graphs use, with registered operator names as ops. `spec` says
what makes one valid (and reports problems by file, line and field); `yaml_io` reads and writes the YAML form;
`sagellm.dsl` builds the same graphs from Python."""
