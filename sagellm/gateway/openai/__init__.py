"""The OpenAI API: the request bodies it accepts (`protocol`), the routes that turn them into pipeline requests
(`routes`), and the response bodies and stream chunks built from what comes back (`replies`)."""
