"""The OpenAI API: the request bodies it accepts (`protocol`), the routes that turn them into pipeline requests
(`routes`), the response bodies and stream chunks built from what comes back (`replies`), and the OpenAPI document
generated from the same bodies (`openapi`)."""
