"""Checkpoints: atomic writes, safe loads, and models rebuilt from them.

A checkpoint is a plain dict of tensors, numbers and strings, saved with
``torch.save`` and read back only with ``torch.load(weights_only=True)``, so
a file from a stranger cannot run code. Writes go to a temporary file that is
flushed, fsynced and renamed over the old one: a crash at any moment leaves
either the old or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..data.vocab import Vocab
from ..errors import CharlmError
from ..files import atomic_write
from .charrnn import CharRNN

FORMAT = "charlm-checkpoint"
VERSION = 1
PRETRAINED_NAME = "pretrained"
PRETRAINED_PATH = Path(__file__).parent.parent / "pretrained" / "shakespeare.pt"


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` to ``path`` atomically; on failure the old file is untouched."""
    path = Path(path)
    payload = {"format": FORMAT, "version": VERSION, **payload}
    try:
        return atomic_write(path, lambda fh: torch.save(payload, fh))
    except OSError as err:
        raise CharlmError(
            f"could not write checkpoint {path} ({err.strerror or err}); the previous checkpoint is unchanged"
        ) from None


def resolve(path: str | Path | None) -> Path:
    """A run directory means its best.pt (or last.pt); 'pretrained' or None the bundled model."""
    if path is None or str(path) == PRETRAINED_NAME:
        if not PRETRAINED_PATH.is_file():
            raise CharlmError("no pretrained model is bundled with this install; pass a checkpoint or run directory")
        return PRETRAINED_PATH
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise CharlmError(f"{path} holds no checkpoint (best.pt or last.pt); train into it first")
    if not path.exists():
        raise CharlmError(f"checkpoint {path} not found")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load safely onto the CPU; any problem becomes a one-line error naming the file."""
    path = Path(path)
    try:
        with warnings.catch_warnings():  # odd pickle protocols in damaged files warn before they fail
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise CharlmError(
                f"refused to load {path}: it contains Python objects that could run code, so it is not a safe charlm checkpoint"
            ) from None
        raise CharlmError(f"{path} is corrupted or not a checkpoint ({first})") from None
    except IsADirectoryError:
        raise CharlmError(f"{path} is a directory, not a checkpoint file") from None
    except OSError as err:
        raise CharlmError(f"cannot read {path} ({err.strerror or err})") from None
    except Exception as err:  # a damaged file can fail anywhere inside the reader; the safe unpickler ran no code
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CharlmError(f"{path} is truncated or corrupted ({reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CharlmError(f"{path} is not a charlm checkpoint")
    if payload.get("version") != VERSION:
        raise CharlmError(f"{path} has checkpoint format version {payload.get('version')}; this charlm reads version {VERSION}")
    return payload


def load_model(path: str | Path | None, device: torch.device | str = "cpu") -> tuple[CharRNN, Vocab, Config, dict[str, Any]]:
    """Rebuild the model of a checkpoint (weights in fp32) with its vocabulary and config."""
    resolved = resolve(path)
    payload = load_checkpoint(resolved)
    config = Config.from_dict(payload["config"], source=str(resolved))
    vocab = Vocab(payload["vocab"])
    model = CharRNN(len(vocab), config.model)
    state = {k: v.float() if v.is_floating_point() else v for k, v in payload["model"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CharlmError(f"{resolved} does not match its own config ({str(err).splitlines()[0]})") from None
    model.to(device).eval()
    payload["path"] = str(resolved)
    return model, vocab, config, payload


def export_for_inference(source: str | Path, dest: str | Path) -> Path:
    """A small sampling-only checkpoint: fp16 weights, config and vocabulary; no optimizer or RNG state."""
    payload = load_checkpoint(resolve(source))
    slim = {key: payload[key] for key in ("config", "vocab", "step", "best_val_loss")}
    slim["model"] = {k: v.half() if v.is_floating_point() else v for k, v in payload["model"].items()}
    return save_checkpoint(slim, dest)
