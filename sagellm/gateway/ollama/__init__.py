"""Ollama's API (`/api/chat`, `/api/generate`, `/api/embed`, `/api/tags`, ...), what the `ollama` libraries and CLI,
Open WebUI's and editors' Ollama connections speak: each request is run as the OpenAI chat, completion or embedding
it is, on that request's own path, and its reply written in Ollama's shapes (NDJSON lines when streamed)."""
