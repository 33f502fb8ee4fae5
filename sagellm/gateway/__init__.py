"""The OpenAI-compatible gateway: an HTTP server (our own HTTP/1.1 on trio, a small app) in front of a pipeline graph.

Its rooms, bottom to top (each imports only the rooms below it; `tests/test_layers.py` holds them to it): `config` and
`state` (what every room reads), `http/` (HTTP, no LLM code), `keys/` (API keys with their limits, class, models and
cache salt: the front ends' ring, the core's enforcement), `serving/` (the core that runs the graph), `indexes/`,
`replies/` (what every API shares about a reply: tool and reasoning parsers, Harmony, the reply reader), `openai/` (a
room per endpoint), `anthropic/` (the Messages API, run as the chat it is), `sessions/` (the APIs), `control/`
(engines, their links and health checks, autoscaler, join, management and admin routes), `api_servers/` (processes in
front of the core), and `server.serve()`, which puts them together. The Python client's embedded mode uses the
serving core without HTTP."""
