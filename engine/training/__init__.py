"""Training: a run's config, the model (local, the Hub, the embedded default) and data built from it,
the loop, losses, packing, memory planning, checkpoints, adapters and samples. docs/ARCHITECTURE.md."""
