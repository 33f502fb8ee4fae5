"""The OpenAI API, a room per endpoint as vLLM's `entrypoints/openai/` has them: `chat_completion/`, `completion/`,
`responses/`, `embedding/`, `models/`, `request_status/`, and vLLM's own routes (`tokenization/`, `lora/`,
`kv_transfer/`). Each room holds the same files: `protocol.py` (the bodies it accepts and their reading into pipeline
requests), `api_router.py` (its routes), and `serving.py` where its work serves more than its route (a chat's, which
sessions complete). What completions and chats share (the sampling and scheduling fields, structured output, vLLM's
refused fields, `n` choices, reply bodies and their event stream) is `generation/`; what every API shares about a
reply (tool and reasoning parsers, Harmony, the reply reader) is the room below, `sagellm.gateway.replies`. `api`
builds the endpoints over one serving core."""
