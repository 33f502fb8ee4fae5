"""`POST /v1/responses`: OpenAI's Responses API, run as the chat it is: its body read into a chat (`protocol`), its
function tools (`tools`), its typed event stream (`events`), the stored conversations `previous_response_id` continues
(`store`), and its route."""
