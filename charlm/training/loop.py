"""The training loop: truncated BPTT over contiguous streams, AdamW, warm-up then cosine decay.

A ``Trainer`` is one sitting of a run: it trains from the state it was given (step 0, or a
checkpoint's) until the stop budget is spent or a signal arrives, checkpointing into the run
directory so that a later sitting continues bit-for-bit where the last checkpoint left off.
``charlm.training.runs`` decides what a sitting starts from.
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..config import TrainConfig
from ..device import autocast
from ..errors import CharlmError
from ..evaluation import EvalResult, mean_loss
from ..model.charrnn import CharRNN, map_hidden, sequence_loss
from ..model.checkpoint import save_checkpoint
from .budget import Position, StopBudget
from .metrics import MetricsWriter
from .rundir import RunDirectory
from .setup import TrainingSetup


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM arrived; last.pt was saved first."""

    def __init__(self, signum: int, checkpoint: Path):
        super().__init__(f"training interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.checkpoint = checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    epochs: float
    elapsed: float
    stopped_by: str
    best_val_loss: float
    final: EvalResult


class Reporter:
    """What the trainer tells the outside world; the default tells nobody."""

    def start(self, summary: dict[str, Any]) -> None: ...
    def progress(self, step: int, total: int | None, metrics: dict[str, float], seconds_left: float | None) -> None: ...
    def evaluated(self, step: int, val_loss: float, is_best: bool) -> None: ...
    def note(self, text: str) -> None: ...
    def close(self) -> None: ...
    def finished(self, result: TrainResult) -> None: ...


def learning_rate(train: TrainConfig, step: int, progress: float | None) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr`` as progress goes 0 -> 1."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if progress is None:
        return train.lr
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def optimizer_step(model: CharRNN, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor,
                   hidden, precision: str, grad_clip: float) -> tuple[float | None, Any]:
    """Forward, loss, backward, clipping and update for one batch; returns (loss, detached hidden).

    A non-finite loss or gradient skips the update and returns (None, None): the
    hidden state that produced it is dropped too. The loss and the gradient norm
    come back to the host together: one wait for a GPU per step, not two.
    """
    device = inputs.device
    with model.weight_drop():
        with autocast(device, precision):
            logits, hidden = model(inputs, hidden)
            loss = sequence_loss(logits, targets)
        loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    loss_value, norm_value = torch.stack([loss.detach().float(), norm.float()]).tolist()
    if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
        optimizer.zero_grad(set_to_none=True)
        return None, None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, map_hidden(torch.Tensor.detach, hidden)


@contextmanager
def stop_signals(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """Route SIGINT and SIGTERM to ``handler`` while training (from the main thread only)."""
    previous = {}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


class LogWindow:
    """Training loss and throughput since the last log line."""

    def __init__(self):
        self.loss, self.steps, self.chars, self.start = 0.0, 0, 0, time.perf_counter()

    def add(self, loss: float, chars: int) -> None:
        self.loss, self.steps, self.chars = self.loss + loss, self.steps + 1, self.chars + chars

    def close(self) -> tuple[float, float]:
        """(mean loss, characters per second) of the window, and a new window begins."""
        now = time.perf_counter()
        figures = self.loss / self.steps, self.chars / max(now - self.start, 1e-9)
        self.__init__()
        return figures


class Trainer:
    def __init__(self, setup: TrainingSetup, run: RunDirectory, reporter: Reporter | None = None,
                 init_from: str | None = None, changes: dict[str, tuple[Any, Any]] | None = None):
        """``init_from``: the checkpoint a fine-tune took its weights from; ``changes``: the options a
        resume changed ({key: (saved, now)}), both shown in the summary."""
        self.setup, self.config, self.run_dir = setup, setup.config, run
        self.model, self.optimizer, self.batcher = setup.model, setup.optimizer, setup.batcher
        self.reporter = reporter or Reporter()
        self.metrics = MetricsWriter(run.path)
        self.budget = StopBudget(self.config.train, setup.final_eval_windows)
        self.init_from, self.changes = init_from, changes or {}
        self.step, self.elapsed, self.best_val_loss = 0, 0.0, math.inf
        self.hidden = None
        self.stop_signal: int | None = None

    # ------------------------------------------------------------------ state

    def position(self) -> Position:
        return Position(self.step, self.batcher.epochs_done, self.elapsed)

    def state(self) -> dict[str, Any]:
        """Everything a checkpoint holds: enough to sample from, and to continue bit-for-bit."""
        device, corpus = self.setup.device, self.setup.corpus
        return {
            "config": self.config.to_dict(),
            "vocab": self.setup.vocab.chars,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "elapsed": self.elapsed,
            "best_val_loss": self.best_val_loss,
            "data": self.batcher.state_dict(),
            "hidden": map_hidden(torch.Tensor.cpu, self.hidden),
            "rng": {
                "torch": torch.get_rng_state(),
                "data": self.setup.data_generator.get_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            },
            "corpus": {"path": str(corpus.path), "sha256": corpus.sha256, "chars": len(corpus), "skipped": corpus.skipped},
            "init_from": self.init_from,
        }

    def restore(self, checkpoint: dict[str, Any]) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.step = int(checkpoint["step"])
        self.elapsed = float(checkpoint["elapsed"])
        self.best_val_loss = float(checkpoint["best_val_loss"])
        self.init_from = checkpoint["init_from"]
        self.batcher.load_state_dict(checkpoint["data"])
        self.hidden = map_hidden(lambda h: h.to(self.setup.device), checkpoint["hidden"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        self.setup.data_generator.set_state(checkpoint["rng"]["data"])
        if checkpoint["rng"]["cuda"] is not None and self.setup.device.type == "cuda":
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], self.setup.device)

    def checkpoint(self, best: bool, last: bool) -> None:
        if not (best or last):
            return
        state = self.state()
        if last:
            save_checkpoint(state, self.run_dir.last)
        if best:
            save_checkpoint(state, self.run_dir.best)

    # ------------------------------------------------------------------ loop

    def run(self) -> TrainResult:
        """Train until the budget is spent, evaluate on the whole validation split, report."""
        self.run_dir.write_config(self.config)
        self.reporter.start(self.summary())
        try:
            with stop_signals(self.on_signal):
                stopped_by = self.loop()
            final = mean_loss(self.model, self.setup.val_data, self.setup.device, self.setup.precision)
            self.metrics.final(self.step, self.elapsed, final.loss)
        finally:
            self.reporter.close()
        result = TrainResult(self.run_dir.path, self.step, self.batcher.epochs_done, self.elapsed, stopped_by,
                             self.best_val_loss, final)
        self.reporter.finished(result)
        return result

    def loop(self) -> str:
        t = self.config.train
        window, bad_steps = LogWindow(), 0
        last_eval_step = self.step if self.step else -1
        while (stopped_by := self.budget.stop_reason(self.position())) is None:
            loss, chars = self.train_step()
            bad_steps = 0 if loss is not None else self.skipped(bad_steps + 1)
            if self.stop_signal is not None:
                self.checkpoint(best=False, last=True)
                raise TrainingInterrupted(self.stop_signal, self.run_dir.last)
            if loss is None:
                continue
            window.add(loss, chars)
            if self.step % t.log_interval == 0:
                self.log_progress(window)
            is_best = False
            if self.step % t.eval_interval == 0:
                is_best, last_eval_step = self.periodic_eval(), self.step
            self.checkpoint(is_best, self.step % t.checkpoint_interval == 0)
        self.checkpoint(last_eval_step != self.step and self.periodic_eval(), True)
        return stopped_by

    def train_step(self) -> tuple[float | None, int]:
        """One optimizer step: (loss, characters), the loss None when not finite and the step skipped."""
        started = time.perf_counter()
        inputs, targets, new_epoch = self.batcher.next()
        if new_epoch:
            self.hidden = None
        lr = learning_rate(self.config.train, self.step, self.budget.progress(self.position()))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss, self.hidden = optimizer_step(self.model, self.optimizer, inputs.long(), targets.long(), self.hidden,
                                           self.setup.precision, self.config.train.grad_clip)
        if loss is not None:
            self.step += 1
        self.elapsed += time.perf_counter() - started
        return loss, 0 if loss is None else targets.numel()

    def skipped(self, bad_steps: int) -> int:
        """Note a step skipped for a non-finite loss; stop once ``max_bad_steps`` came in a row."""
        self.reporter.note(f"step {self.step + 1}: loss is not finite, step skipped ({bad_steps} in a row)")
        if bad_steps >= self.config.train.max_bad_steps:
            raise CharlmError(
                f"training stopped: {bad_steps} consecutive steps had a non-finite loss at step {self.step + 1}; "
                f"checkpoints in {self.run_dir.path} are untouched; try a lower --train.lr or --train.grad-clip"
            )
        return bad_steps

    def log_progress(self, window: LogWindow) -> None:
        loss, chars_per_sec = window.close()
        lr, epoch = self.optimizer.param_groups[0]["lr"], self.batcher.epochs_done
        self.metrics.training(self.step, self.elapsed, loss, lr, chars_per_sec, epoch)
        at = self.position()
        self.reporter.progress(self.step, self.budget.total_steps(at),
                               {"loss": loss, "lr": lr, "chars_per_sec": chars_per_sec, "epoch": epoch},
                               self.budget.seconds_left(at))

    def periodic_eval(self) -> bool:
        """Evaluate on part of the validation split; True when this is the best loss so far."""
        started = time.perf_counter()
        result = mean_loss(self.model, self.setup.val_data, self.setup.device, self.setup.precision,
                          max_batches=self.config.train.eval_batches)
        self.budget.evaluated(time.perf_counter() - started)
        is_best = result.loss < self.best_val_loss
        if is_best:
            self.best_val_loss = result.loss
        self.metrics.evaluation(self.step, self.elapsed, result.loss)
        self.reporter.evaluated(self.step, result.loss, is_best)
        return is_best

    def on_signal(self, signum, frame) -> None:
        self.stop_signal = signum

    def summary(self) -> dict[str, Any]:
        m, t, corpus = self.config.model, self.config.train, self.setup.corpus
        return {
            "run directory": str(self.run_dir.path),
            "corpus": f"{corpus.path} ({len(corpus):,} chars: {self.setup.train_chars:,} train, "
                      f"{len(self.setup.val_data):,} validation)",
            "unknown characters skipped": f"{corpus.skipped:,}" if corpus.skipped else None,
            "vocabulary": f"{len(self.setup.vocab):,} characters",
            "model": f"{m.layers}x{m.hidden_size} {m.cell.upper()}, embedding {m.embedding_size}"
                     + (", tied" if m.tie_weights else ""),
            "parameters": f"{self.model.num_parameters():,}",
            "initialised from": self.init_from,
            "device": str(self.setup.device),
            "precision": self.setup.precision,
            "batch": f"{t.batch_size} streams x {t.seq_len} chars",
            "resumed at step": self.step or None,
            "changed on resume": ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in self.changes.items()) or None,
        }
