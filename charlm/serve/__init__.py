"""Serving a model to many users at once: ``engine`` batches their requests through one model
(no HTTP in it, usable from Python), ``app`` puts it behind HTTP (``pip install "charlm[serve]"``)."""
