"""`POST /v1/chat/completions`: the chat body, a chat made ready to run (`preparation`, which the Responses and
Messages APIs run theirs through), served whole or streamed (`serving`), and its route."""
