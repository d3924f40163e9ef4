"""Training: a run's config, the model and data built from it, the loop, losses, checkpoints, adapters."""
