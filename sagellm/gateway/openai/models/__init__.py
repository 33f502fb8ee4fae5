"""`GET /v1/models`: the model cards."""
