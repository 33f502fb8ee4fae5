"""HTTP without LLMs: our HTTP/1.1 server on trio (`server`), the small application it serves (`app`: routes, JSON
bodies, Server-Sent Events), API keys (`auth`) and the OpenAI-shaped error every route raises (`errors`)."""
