"""Training loops, fine-tuning phases, checkpoints and the DDP worker."""
