"""charlm: character-level recurrent language models, from the command line or from Python.

The public names are imported on first use, so ``charlm --help`` does not wait for PyTorch.
"""

import importlib

__version__ = "0.2.0"

# Public name -> the module that defines it. No submodule shares a public name, so importing
# charlm.training or charlm.evaluation never hides the function charlm.train or charlm.evaluate.
_EXPORTS = {
    "CharRNN": "model.charrnn", "CharlmError": "errors", "Config": "config", "SampleSettings": "sampling",
    "evaluate": "evaluation", "finetune_config": "training.runs", "generate": "sampling", "load_config": "config",
    "load_model": "model.checkpoint", "resume": "training.runs", "train": "training.runs",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'charlm' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
