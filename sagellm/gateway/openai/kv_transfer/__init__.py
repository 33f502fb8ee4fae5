"""vLLM's disaggregated serving across servers (`kv_transfer_params`): the protocol, the prefill servers this one
trades KV with (`peers`), a request's part in it (`serving`), and the route a decode server fetches KV by."""
