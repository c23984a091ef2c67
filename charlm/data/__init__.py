"""Data: corpora on disk, their vocabulary, and the batches the model reads."""
