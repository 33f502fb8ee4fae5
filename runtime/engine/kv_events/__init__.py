"""KV events: every change to the KV blocks an engine holds, published in vLLM's wire format for routers."""
