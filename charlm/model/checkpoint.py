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
from typing import Any, NamedTuple

import torch

from .. import __version__
from ..config import Config, DataConfig, load_config
from ..data.corpus import Corpus, open_corpus
from ..data.datasets import SHAKESPEARE_SHA256
from ..data.vocab import Vocab, make_vocab
from ..errors import CharlmError
from ..files import atomic_write
from .charrnn import CharRNN
from .export import is_export_folder, read_folder

FORMAT = "charlm-checkpoint"
# 1: charlm 0.1 (elapsed time inside a "schedule" entry); 2: charlm 0.2 (elapsed at the top, the
# writer's charlm version, the corpus checksum and the run a fine-tune started from).
VERSION = 2
PRETRAINED_NAME = "pretrained"
PRETRAINED_PATH = Path(__file__).parent.parent / "pretrained" / "shakespeare.pt"


class LoadedModel(NamedTuple):
    """A checkpoint's model (fp32, in eval mode, on the device asked for) with what it needs."""

    model: CharRNN
    vocab: Vocab
    config: Config
    checkpoint: dict[str, Any]


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` to ``path`` atomically; on failure the old file is untouched."""
    path = Path(path)
    payload = {"format": FORMAT, "version": VERSION, "charlm_version": __version__, "torch_version": str(torch.__version__), **payload}
    try:
        return atomic_write(path, lambda fh: torch.save(payload, fh))
    except OSError as err:
        raise CharlmError(
            f"could not write checkpoint {path} ({err.strerror or err}); the previous checkpoint is unchanged"
        ) from None


def resolve(path: str | Path | None) -> Path:
    """A run directory means its best.pt (or last.pt); an export folder itself; 'pretrained' or None the bundled model."""
    if path is None or str(path) == PRETRAINED_NAME:
        if not PRETRAINED_PATH.is_file():
            raise CharlmError("no pretrained model is bundled with this install; pass a checkpoint or run directory")
        return PRETRAINED_PATH
    path = Path(path)
    if is_export_folder(path):
        return path
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise CharlmError(f"{path} holds no checkpoint (best.pt or last.pt); train into it first")
    if not path.exists():
        raise CharlmError(f"checkpoint {path} not found")
    return path


def unpickler_reason(err: pickle.UnpicklingError) -> str:
    """The line of a safe-unpickler error that names what it met; PyTorch wraps it in a paragraph
    about ``weights_only`` that does not apply to a file that is no pickle at all."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for before, line in zip(lines, lines[1:]):
        if before.endswith("WeightsUnpickler error:"):
            return line
    return lines[0] if lines else type(err).__name__


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load safely onto the CPU (a file, or an export folder: ``model.export``); any problem becomes
    a one-line error naming the file."""
    path = Path(path)
    if is_export_folder(path):
        return read_folder(path)
    try:
        with warnings.catch_warnings():  # odd pickle protocols in damaged files warn before they fail
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" in str(err) or "allowlisted" in str(err):  # the safe unpickler met a class or function to call
            raise CharlmError(
                f"refused to load {path}: it contains Python objects that could run code, so it is not a safe charlm checkpoint"
            ) from None
        raise CharlmError(f"{path} is corrupted or not a checkpoint ({unpickler_reason(err)})") from None
    except IsADirectoryError:
        raise CharlmError(f"{path} is a directory, not a checkpoint file") from None
    except OSError as err:
        raise CharlmError(f"cannot read {path} ({err.strerror or err})") from None
    except Exception as err:  # a damaged file can fail anywhere inside the reader; the safe unpickler ran no code
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CharlmError(f"{path} is truncated or corrupted ({reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CharlmError(f"{path} is not a charlm checkpoint")
    version = payload.get("version")
    if version == 1:
        return upgrade_from_version_1(payload)
    if version != VERSION:
        writer = f"charlm {payload['charlm_version']}" if isinstance(payload.get("charlm_version"), str) else "an unknown charlm"
        raise CharlmError(f"{path} was written by {writer} in checkpoint format {version}; this charlm {__version__} "
                          f"reads formats 1 to {VERSION}: upgrade charlm to read it")
    return payload


def upgrade_from_version_1(payload: dict[str, Any]) -> dict[str, Any]:
    """A format-1 checkpoint in today's layout: its training time moves out of the unused schedule entry."""
    schedule = payload.pop("schedule", {})
    upgraded = {"charlm_version": "0.1.0", "corpus": None, "init_from": None, **payload, "version": VERSION}
    if "elapsed" in schedule:
        upgraded["elapsed"] = schedule["elapsed"]
    return upgraded


def load_model(path: str | Path | None, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the model of a checkpoint (weights in fp32) with its vocabulary and config.

    ``path``: a checkpoint file, a run directory (its best.pt) or 'pretrained' / None (the bundled model).
    The config goes through ``load_config``, so ``CHARLM_DATA_DIR`` applies to it as everywhere.
    """
    resolved = resolve(path)
    payload = load_checkpoint(resolved)
    config = load_config(base=payload["config"])
    vocab = checkpoint_vocab(payload)
    model = CharRNN(len(vocab), config.model)
    state = {k: v.float() if v.is_floating_point() else v for k, v in payload["model"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CharlmError(f"{resolved} does not match its own config ({str(err).splitlines()[0]})") from None
    model.to(device).eval()
    payload["path"] = str(resolved)
    return LoadedModel(model, vocab, config, payload)


def checkpoint_unit(payload: dict[str, Any]) -> str:
    """What a checkpoint's model reads: 'char' (code points; every checkpoint before byte mode) or 'byte'."""
    return payload["config"].get("data", {}).get("unit", "char")


def checkpoint_vocab(payload: dict[str, Any]) -> Vocab:
    return make_vocab(payload["vocab"], checkpoint_unit(payload))


def corpus_changes(recorded: list[dict], now: list[dict]) -> str:
    """Which files of a multi-file corpus differ from those a run recorded, in a few words."""
    before, after = ({f["name"]: f["sha256"] for f in files} for files in (recorded, now))
    changed = [name for name in after if name in before and before[name] != after[name]]
    added, removed = [name for name in after if name not in before], [name for name in before if name not in after]
    parts = [f"{label} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
             for label, names in (("changed", changed), ("new", added), ("missing", removed)) if names]
    return "; ".join(parts) or "the files are joined differently"


def training_corpus(config: Config, checkpoint: dict[str, Any], name: str, remedy: str) -> Corpus:
    """The corpus ``config`` names, read in the checkpoint's vocabulary, and refused in one line
    (``name``: the checkpoint or run, ``remedy``: what to do) where it is not the text the checkpoint
    was trained on: by its recorded checksum (for a directory, naming the files that differ), or
    for checkpoints that record none, by its vocabulary."""
    corpus = open_corpus(config.data)
    record = checkpoint["corpus"] or {}
    recorded = record.get("sha256")
    if corpus.sha256 != recorded if recorded else corpus.vocab.chars != checkpoint["vocab"]:
        detail = corpus_changes(record["files"], corpus.files) if record.get("files") and corpus.files else "its content differs"
        raise CharlmError(f"{corpus.path} is not the corpus {name} was trained on ({detail}); {remedy}")
    return corpus.in_vocab(checkpoint_vocab(checkpoint), config.data.skip_unknown)


def without_local_paths(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload as it should travel to another machine: Tiny Shakespeare read from a local copy
    recorded as the default corpus (found in, or downloaded to, the reader's cache), the cache folder
    as the default, and an absolute run folder as ``runs/<its name>``. A corpus of the user's own
    keeps its path, so ``--data`` can point elsewhere when it is not there."""
    config = {section: dict(values) for section, values in payload["config"].items()}
    corpus = payload.get("corpus")
    if corpus and corpus.get("sha256") == SHAKESPEARE_SHA256 and config["data"].get("unit", "char") == "char":
        config["data"]["path"], corpus = "", {**corpus, "path": ""}
    config["data"]["dir"] = DataConfig().dir
    out = Path(config["train"]["out"])
    if out.is_absolute():
        config["train"]["out"] = str(Path("runs") / out.name)
    return {**payload, "config": config, "corpus": corpus}


def shareable_payload(source: str | Path) -> dict[str, Any]:
    """What every export writes from: the checkpoint ``source`` names, ``without_local_paths``."""
    return without_local_paths(load_checkpoint(resolve(source)))


def export_for_inference(source: str | Path, dest: str | Path) -> Path:
    """A small sampling-only checkpoint: fp16 weights, config and vocabulary; no optimizer or RNG
    state, and none of the trainer's own paths."""
    payload = shareable_payload(source)
    slim = {key: payload.get(key) for key in ("config", "vocab", "step", "best_val_loss", "corpus", "init_from", "epochs", "trained_on", "averaged_steps")}
    slim["model"] = {k: v.half() if v.is_floating_point() else v for k, v in payload["model"].items()}
    return save_checkpoint(slim, dest)
