"""HTTP without LLMs: our HTTP/1.1 server on trio (`server`), the small application it serves (`app`: routes, JSON
bodies nested at most `json_depth.MAX_BODY_DEPTH` deep, Server-Sent Events), API keys (`auth`) and the OpenAI-shaped
error every route raises (`errors`)."""
