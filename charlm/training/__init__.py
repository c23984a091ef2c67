"""Training: from a config (or a run to resume) to checkpoints in a run directory."""
