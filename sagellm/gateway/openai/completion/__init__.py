"""`POST /v1/completions`: the completion body, its `echo`, and its route."""
