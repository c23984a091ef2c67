"""When a run stops, how far along it is, and how long is left.

A run stops at ``max_steps``, ``max_epochs`` or ``max_time`` of training, whichever comes first.
Training time excludes evaluation, so the time left on the clock also counts the evaluations
still to come, at the pace the run's own evaluations have shown.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import TrainConfig, parse_duration


# Every answer of ``StopBudget.stop_reason``, in a fixed order (ranks agree on one by its index).
STOP_REASONS = (None, "max_steps", "max_epochs", "max_time")


@dataclass
class Position:
    """Where a run is: optimizer steps, passes over the training split, seconds of training."""

    step: int
    epochs: float
    elapsed: float


class StopBudget:
    def __init__(self, train: TrainConfig, final_eval_windows: int):
        """``final_eval_windows``: windows the final evaluation reads (the periodic ones read ``eval_batches``)."""
        self.max_steps, self.max_epochs = train.max_steps, train.max_epochs
        self.max_time = parse_duration(train.max_time)
        self.eval_interval = train.eval_interval
        self.final_eval_scale = final_eval_windows / min(train.eval_batches, final_eval_windows)
        self.eval_seconds, self.evaluations = 0.0, 0

    def progress(self, at: Position) -> float | None:
        """Fraction of the run done by the tightest stop condition, or None where none is set."""
        fractions = []
        if self.max_steps:
            fractions.append(at.step / self.max_steps)
        if self.max_epochs:
            fractions.append(at.epochs / self.max_epochs)
        if self.max_time:
            fractions.append(at.elapsed / self.max_time)
        return max(fractions) if fractions else None

    def stop_reason(self, at: Position) -> str | None:
        if self.max_steps and at.step >= self.max_steps:
            return "max_steps"
        if self.max_epochs and at.epochs >= self.max_epochs:
            return "max_epochs"
        if self.max_time and at.elapsed >= self.max_time:
            return "max_time"
        return None

    def total_steps(self, at: Position) -> int | None:
        """The step the run will stop at, as far as can be told now."""
        if self.max_steps:
            return self.max_steps
        progress = self.progress(at)
        return max(at.step, round(at.step / progress)) if progress else None

    def evaluated(self, seconds: float) -> None:
        """Count a periodic evaluation's duration into the pace of those to come."""
        self.eval_seconds += seconds
        self.evaluations += 1

    def seconds_left(self, at: Position) -> float | None:
        """Wall-clock seconds to the end: the training left, the periodic evaluations left and the final one."""
        progress, total = self.progress(at), self.total_steps(at)
        if not progress or total is None:
            return None
        training = at.elapsed * (1.0 - min(progress, 1.0)) / progress
        if not self.evaluations:
            return training
        per_evaluation = self.eval_seconds / self.evaluations
        periodic_left = total // self.eval_interval - at.step // self.eval_interval
        return training + per_evaluation * (periodic_left + self.final_eval_scale)
