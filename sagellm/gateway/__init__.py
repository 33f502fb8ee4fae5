"""The OpenAI-compatible gateway: an HTTP server (our own HTTP/1.1 on trio, a small app) in front of a pipeline graph.

`core.ServingCore` runs the graph and streams each request's items back; `openai_routes`, `admin_routes` and
`management_routes` are the HTTP face; `server.serve()` puts them together. The Python client's embedded mode uses the
core without HTTP."""
