"""What completions and chat completions share: the sampling and scheduling fields of their bodies, structured
output, vLLM's fields refused by name, `n` choices, the work before requests enter the graph, and the reply bodies
and event stream built from what comes back."""
