"""Training utilities: data formats and masking, the training loop, chunked loss, checkpoints."""
