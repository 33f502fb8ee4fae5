"""The Anthropic Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`), what Claude Code and the `anthropic`
SDKs speak: a message request is run as the chat it is, on the OpenAI chat's own path (admission, policy, route, PD,
failover, guided decoding, tool parsing), and its reply written in Anthropic's shapes."""
