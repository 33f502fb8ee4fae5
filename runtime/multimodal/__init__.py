"""Images (and, later, audio) turned into what a vision-language model's encoder takes: pixel values in the layout
the Hugging Face processor gives, and how many placeholder tokens each image gets in the prompt. The entry point is
`image_processing.image_processor_for(preprocessor_config)`; a file per family holds what sets that family apart,
and `pixel_steps` the steps they share."""
