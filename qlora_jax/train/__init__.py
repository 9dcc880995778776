"""Training: configuration, data pipeline, train step and loop, checkpoints."""
