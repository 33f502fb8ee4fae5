"""What the APIs share about a model's reply beyond its text, below all of them (OpenAI's chat and Responses API,
the Messages API): its thinking and tool calls read out as the text streams in (`reasoning_parsers`, `tool_parsers`,
Harmony's reader, and `reader`, which joins them), what the prompt must carry for them (`tools`: a chat's tool plan;
`chat_templates`), and a request's streams read into choices (`choice`). Each API shapes what is read here into its
own bodies and events."""
