"""A run's ``metrics.jsonl``: the one module that writes and reads its records.

One JSON object per line, each with the optimizer ``step`` and ``elapsed`` training seconds:
- training:   ``loss`` (mean over the log interval), ``lr``, ``chars_per_sec``, ``epoch``
- evaluation: ``val_loss`` (periodic, on part of the validation split)
- final:      ``final_val_loss`` (the whole validation split, at the end of a sitting)
- resumed:    ``resumed`` ({key: {"saved": old, "now": new}} for the options a resume changed)
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import CharlmError
from ..files import atomic_write

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsWriter:
    """Appends records to ``run_dir/metrics.jsonl``, one line each, flushed as they come; writes
    nothing where not ``enabled`` (the ranks of a distributed job other than 0)."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = False):
        """``tensorboard``: also write every record as TensorBoard scalars and text, into ``run_dir/tensorboard``."""
        self.path = Path(run_dir) / METRICS_FILE
        self.samples_path = Path(run_dir) / SAMPLES_FILE
        self.enabled = enabled
        self.board = summary_writer(Path(run_dir) / TENSORBOARD_DIR) if tensorboard and enabled else None

    def training(self, step: int, elapsed: float, loss: float, lr: float, chars_per_sec: float, epoch: float) -> None:
        self.append({"step": step, "elapsed": elapsed, "loss": loss, "lr": lr, "chars_per_sec": chars_per_sec, "epoch": epoch})

    def evaluation(self, step: int, elapsed: float, val_loss: float) -> None:
        self.append({"step": step, "elapsed": elapsed, "val_loss": val_loss})

    def final(self, step: int, elapsed: float, val_loss: float) -> None:
        self.append({"step": step, "elapsed": elapsed, "final_val_loss": val_loss})

    def resumed(self, step: int, elapsed: float, changes: dict[str, tuple[Any, Any]]) -> None:
        self.append({"step": step, "elapsed": elapsed,
                     "resumed": {key: {"saved": old, "now": new} for key, (old, new) in changes.items()}})

    def sample(self, step: int, elapsed: float, text: str) -> None:
        self.append({"step": step, "elapsed": elapsed, "text": text}, self.samples_path)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()

    def forget_after(self, step: int) -> None:
        """Drop the records of steps after ``step``: a resumed run repeats them from its checkpoint."""
        if not self.enabled:  # another rank of the job: rank 0 keeps the records
            return
        for path in (self.path, self.samples_path):
            if not path.is_file():
                continue
            lines = path.read_text(encoding="utf-8").splitlines()
            kept = [line for line in lines if (record := parse(line)) is not None and record["step"] <= step]
            if kept != lines:
                self.write(lambda: atomic_write(path, lambda fh: fh.write("".join(line + "\n" for line in kept).encode("utf-8"))))

    def append(self, record: dict[str, Any], path: Path | None = None) -> None:
        def append_line() -> None:
            with (path or self.path).open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.write(append_line)
        if self.board is not None:
            self.write(lambda: to_board(self.board, record))

    def write(self, action: Callable[[], Any]) -> None:
        """Run a write, turning a failure (a full disk, say) into one line."""
        if not self.enabled:
            return
        try:
            action()
        except OSError as err:
            raise CharlmError(f"cannot write {self.path} ({err.strerror or err}); free some space and resume the run") from None


def summary_writer(log_dir: Path) -> Any:
    """torch.utils.tensorboard's writer, or one line saying how to install it."""
    require_tensorboard()
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(log_dir=str(log_dir))


def require_tensorboard() -> None:
    if importlib.util.find_spec("tensorboard") is None:
        raise CharlmError("--train.tensorboard needs the tensorboard package; install it with: pip install 'charlm[tensorboard]'")


def to_board(board: Any, record: dict[str, Any]) -> None:
    """One metrics or samples record as TensorBoard scalars (by their key) or text, at its step."""
    for key, value in record.items():
        if key in ("step", "elapsed"):
            continue
        if isinstance(value, (int, float)):
            board.add_scalar(key, value, record["step"])
        elif key == "text":
            board.add_text("sample", value, record["step"])
    board.flush()


def parse(line: str) -> dict[str, Any] | None:
    """One record, or None for a line cut short by a crash (or anything else that is not a record)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict) or "step" not in record or "elapsed" not in record:
        return None
    return record


@dataclass
class RunMetrics:
    """What a run logged: training records, periodic evaluations, the last final loss, the resumes."""

    name: str
    train: list[dict[str, Any]] = field(default_factory=list)
    val: list[dict[str, Any]] = field(default_factory=list)
    final_val_loss: float | None = None
    resumes: list[dict[str, Any]] = field(default_factory=list)


def read_metrics(run_dir: str | Path) -> RunMetrics:
    """Parse a run directory's metrics.jsonl (or that file itself); damaged lines are skipped, not fatal."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise CharlmError(f"{run_dir} has no {METRICS_FILE}; give a run directory made by charlm train")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise CharlmError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}") from None
    metrics = RunMetrics(name=(path.parent if path.name == METRICS_FILE else path).name)
    for record in filter(None, map(parse, lines)):
        if "loss" in record:
            metrics.train.append(record)
        elif "val_loss" in record:
            metrics.val.append(record)
        elif "final_val_loss" in record:
            metrics.final_val_loss = record["final_val_loss"]
        elif "resumed" in record:
            metrics.resumes.append(record)
    return metrics
