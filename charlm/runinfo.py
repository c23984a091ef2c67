"""What a checkpoint is and what runs a directory holds, read without building a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomllib

from .config import Config
from .errors import CharlmError
from .model.checkpoint import load_checkpoint, resolve
from .model.export import TIED_HEAD
from .training.metrics import METRICS_FILE, read_metrics
from .training.rundir import BEST, CONFIG, LAST, RunDirectory

PREVIEW_CHARS = 60


def parameter_count(state: dict[str, Any], tied: bool) -> int:
    """Parameters of a model's state dict; a tied read-out shares the embedding, so it counts once."""
    return sum(tensor.numel() for name, tensor in state.items() if not (tied and name == TIED_HEAD))


def printable(char: str) -> str:
    """A character as it can be seen: the space as ␠, a control character as its escape (\\n)."""
    if char == " ":
        return "␠"
    return char if char.isprintable() else repr(char)[1:-1]


def vocabulary_preview(chars: str) -> str:
    """The first characters of a vocabulary, each visible."""
    return "".join(map(printable, chars[:PREVIEW_CHARS])) + (" ..." if len(chars) > PREVIEW_CHARS else "")


def checkpoint_info(path: str | Path | None, payload: dict[str, Any] | None = None) -> dict[str, Any]:
    """The facts ``charlm info`` shows about a checkpoint, a run directory (its best.pt) or the bundled model;
    ``payload`` is the checkpoint already loaded from ``path``, if it was (then it is not read again)."""
    resolved = resolve(path)
    payload = payload if payload is not None else load_checkpoint(resolved)
    config = Config.from_dict(payload["config"], str(resolved))
    m, corpus, trained_on = config.model, payload.get("corpus") or {}, payload.get("trained_on") or {}
    return {
        "checkpoint": str(resolved),
        "cell": m.cell, "layers": m.layers, "hidden_size": m.hidden_size, "embedding_size": m.embedding_size,
        "tied": m.tie_weights, "parameters": parameter_count(payload["model"], m.tie_weights),
        "vocabulary_size": len(payload["vocab"]), "vocabulary": vocabulary_preview(payload["vocab"]),
        "step": payload.get("step"), "epochs": payload.get("epochs"), "best_val_loss": payload.get("best_val_loss"),
        "corpus": corpus.get("path") or config.data.path or "Tiny Shakespeare", "corpus_chars": corpus.get("chars"),
        "corpus_sha256": corpus.get("sha256"), "unit": config.data.unit,
        "corpus_files": [file["name"] for file in corpus.get("files") or []], "precision": trained_on.get("precision"), "device": trained_on.get("device"),
        "world_size": (payload.get("job") or {}).get("world_size", 1),
        "torch_version": payload.get("torch_version"), "charlm_version": payload.get("charlm_version"),
        "format_version": payload["version"], "init_from": payload.get("init_from"),
        "averaged_steps": payload.get("averaged_steps") or 0,
    }


def run_summary(run: Path, directory: Path) -> dict[str, Any]:
    """One run's line in ``charlm runs``, from its config.toml and metrics.jsonl (no checkpoint is loaded)."""
    try:
        config = Config.from_dict(tomllib.loads((run / CONFIG).read_text(encoding="utf-8")), str(run / CONFIG))
    except (OSError, tomllib.TOMLDecodeError, CharlmError):
        config = None
    metrics = read_metrics(run) if (run / METRICS_FILE).is_file() else None
    records = (metrics.train + metrics.val) if metrics else []
    last = max(records, key=lambda record: record["step"], default=None)
    if RunDirectory(run).in_use():
        status = "training"
    elif not (run / LAST).is_file():
        status = "no last.pt"
    else:  # finished: its last sitting reached its budget and the final evaluation; resumable: stopped before
        status = "finished" if metrics and metrics.final_val_loss is not None else "resumable"
    m = config.model if config else None
    return {
        "run": str(run), "name": str(run.relative_to(directory)), "model": f"{m.layers}x{m.hidden_size} {m.cell.upper()}" if m else None,
        "steps": last["step"] if last else 0, "training_seconds": last["elapsed"] if last else 0.0,
        "best_val_loss": min((record["val_loss"] for record in metrics.val), default=None) if metrics else None,
        "final_val_loss": metrics.final_val_loss if metrics else None, "status": status,
    }


def list_runs(directory: str | Path = "runs") -> list[dict[str, Any]]:
    """Every run directory under ``directory`` (any depth), best validation loss first."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CharlmError(f"{directory} is not a directory; give the folder that holds your runs (default: runs)")
    runs = sorted({path.parent for path in directory.rglob("*") if path.name in (LAST, BEST, CONFIG)})  # one walk
    summaries = [run_summary(run, directory) for run in runs]
    return sorted(summaries, key=lambda s: (s["best_val_loss"] is None, s["best_val_loss"] or 0.0, s["run"]))
