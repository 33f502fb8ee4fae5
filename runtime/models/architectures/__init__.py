"""The architectures the runtime can run, and what each format's files say about them.

A Hugging Face config.json names its class in `architectures`; a GGUF file names its graph in
`general.architecture`. Both map to a row of `families.ARCHITECTURES`, which says what the family adds to the Llama
layer (the features ModelConfig records for the one graph builder), and anything else is refused at load time with
the list of what is supported, instead of failing later inside the model graph. One module per job: the families
(`families`), config.json translated (`hf_config`), GGUF metadata translated (`gguf_config`), the tensors a config
implies, which every loader checks its weights against (`weight_shapes`), a checkpoint's tensor names and fused
or stacked tensors mapped to the graph's (`checkpoint_names`), and a vision encoder's names and shapes
(`vision_weights`)."""
