"""vLLM's routes that load and unload LoRA adapters at run time."""
