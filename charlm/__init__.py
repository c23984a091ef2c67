"""charlm: character-level recurrent language models, from the command line or from Python."""

from .checkpoint import load_model
from .config import Config, load_config
from .errors import CharlmError
from .evaluate import evaluate
from .model import CharRNN
from .sample import SampleSettings, generate
from .train import train

__version__ = "0.1.0"
__all__ = ["CharRNN", "CharlmError", "Config", "SampleSettings", "evaluate", "generate", "load_config", "load_model", "train"]
