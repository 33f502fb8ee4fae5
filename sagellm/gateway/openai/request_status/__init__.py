"""`GET /v1/requests/{request_id}`: a request's status."""
