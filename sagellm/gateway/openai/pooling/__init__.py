"""The pooling routes: rerank (Jina's and Cohere's shapes), vLLM's score, classify and pooling."""
