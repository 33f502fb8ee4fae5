"""The serving core: the gateway's pipeline graph, run for as long as the server lives (`core.ServingCore`), and one
client request's stream kept whole across the instances that serve it, failover and resume included
(`request_stream`). Everything above it (the OpenAI routes, the control plane, API servers) submits through it; the
routes that run requests see it as `interface.ServingApi`, which an API server's remote core answers too."""
