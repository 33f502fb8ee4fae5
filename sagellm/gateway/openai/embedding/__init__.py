"""`POST /v1/embeddings`: the embedding body and its route."""
