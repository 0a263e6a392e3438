"""What every stage shares: artifacts, rows, config, constants, image keys, token sequences, the
text tokenizer and the shared figures. Nothing here imports a stage or a model."""
