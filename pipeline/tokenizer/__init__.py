"""The tokenizer: its params, training, perceptual loss and checkpoint file."""
