"""llama.cpp's multimodal projector files (`--mmproj`): the vision or audio encoder of a GGUF model, as llama.cpp's
converters write it. `reader` tells the projector apart and reads the file into the VisionConfig (AudioConfig) and
weights a Hugging Face checkpoint of the same model gives; each family's own names, sizes and preprocessing live in
a module of their own (`llava`, `idefics3`, `gemma4`, `qwen` for Qwen3.5, `qwen2_5_vl`, `qwen3_vl`, `audio` for
Qwen2-Audio), `vit` the CLIP/SigLIP tower names LLaVA's and Idefics3's share, `keys` the metadata readers all use."""
