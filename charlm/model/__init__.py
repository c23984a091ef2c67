"""The model: the recurrent network, its inference weights, and checkpoints on disk."""
