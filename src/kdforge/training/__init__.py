"""The training loop, its objective composition and its checkpoints."""
