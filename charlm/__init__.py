"""charlm: character-level recurrent language models, from the command line or from Python.

The public names are imported on first use, so ``charlm --help`` does not wait for PyTorch.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "CharRNN": "model.charrnn", "CharlmError": "errors", "Config": "config", "SampleSettings": "sampling",
    "evaluate": "evaluation", "generate": "sampling", "load_config": "config", "load_model": "model.checkpoint", "train": "training.loop",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'charlm' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
