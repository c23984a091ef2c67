"""The training loop: truncated BPTT over contiguous streams, AdamW, warm-up then cosine (or linear) decay.

A ``Trainer`` is one sitting of a run: it trains from the state it was given (step 0, or a
checkpoint's) until the stop budget is spent or a signal arrives, checkpointing into the run
directory so that a later sitting continues bit-for-bit where the last checkpoint left off.
``charlm.training.runs`` decides what a sitting starts from.
"""

from __future__ import annotations

import math
import signal
import time
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
from ..sampling import SampleSettings, generate
from .averaging import WeightAverage
from .budget import STOP_REASONS, Position, StopBudget
from .distributed import SINGLE_PROCESS, Job, stop_signals
from .metrics import MetricsWriter
from .rundir import RunDirectory
from .setup import TrainingSetup


WATCH_SAMPLE_LENGTH, WATCH_SAMPLE_SEED = 200, 0  # the sample written at each evaluation


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
    def sampled(self, step: int, text: str) -> None: ...
    def note(self, text: str) -> None: ...
    def close(self) -> None: ...
    def finished(self, result: TrainResult) -> None: ...


def learning_rate(train: TrainConfig, step: int, progress: float | None) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine or linear decay to ``min_lr`` as progress goes 0 -> 1."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if progress is None:
        return train.lr
    done = min(progress, 1.0)
    remaining = 1.0 - done if train.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))
    return train.min_lr + (train.lr - train.min_lr) * remaining


def optimizer_step(model: CharRNN, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor,
                   hidden, precision: str, grad_clip: float, forward: Callable | None = None,
                   job: Job = SINGLE_PROCESS, scaler: torch.amp.GradScaler | None = None) -> tuple[float | None, Any]:
    """Forward, loss, backward, clipping and update for one batch; returns (loss, detached hidden).

    ``forward`` is the model as DDP wraps it in a distributed job (the gradients are then the
    whole batch's on every rank, so the clipping norm is the global one) and the loss is the mean
    over the ranks. A non-finite loss, or gradient without a ``scaler``, skips the update on
    every rank and returns (None, None): the hidden state that produced it is dropped too. With
    fp16's ``scaler`` an overflowing gradient is the scaler's to skip, as it lowers its scale.
    The loss and the gradient norm come back to the host together: one wait for a GPU per step.
    """
    device = inputs.device
    with model.weight_drop():
        with autocast(device, precision):
            logits, hidden = (forward or model)(inputs, hidden)
            loss = sequence_loss(logits, targets)
        (loss if scaler is None else scaler.scale(loss)).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    loss_value, norm_value = job.mean(torch.stack([loss.detach().float(), norm.float()])).tolist()
    finite = math.isfinite(loss_value) and (scaler is not None or math.isfinite(norm_value))
    if scaler is not None:
        if finite:
            scaler.step(optimizer)
        scaler.update()
    elif finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return (loss_value, map_hidden(torch.Tensor.detach, hidden)) if finite else (None, None)


def distributed_model(model: CharRNN, job: Job) -> Callable:
    """The model as a distributed job trains it (DDP, which averages the gradients over the ranks),
    or the model itself for one process."""
    if not job.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel
    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


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
        resume changed ({key: (saved, now)}), both shown in the summary. In a distributed job only
        rank 0 reports, writes metrics and saves; every rank trains its own streams."""
        self.setup, self.config, self.run_dir, self.job = setup, setup.config, run, setup.job
        self.model, self.optimizer, self.batcher = setup.model, setup.optimizer, setup.batcher
        self.averaging = WeightAverage(self.model, self.config.train.average_last)  # copies the model: before DDP wraps it
        self.forward = distributed_model(self.model, self.job)
        self.reporter = reporter if reporter is not None and self.job.is_main else Reporter()
        self.metrics = MetricsWriter(run.path, enabled=self.job.is_main, tensorboard=self.config.train.tensorboard)
        self.budget = StopBudget(self.config.train, setup.final_eval_windows)
        self.init_from, self.changes = init_from, changes or {}
        self.step, self.elapsed, self.best_val_loss = 0, 0.0, math.inf
        self.hidden = None
        self.stop_signal: int | None = None

    # ------------------------------------------------------------------ state

    def position(self) -> Position:
        return Position(self.step, self.batcher.epochs_done, self.elapsed)

    def state(self) -> dict[str, Any]:
        """Everything a checkpoint holds: enough to sample from, and to continue bit-for-bit.

        In a distributed job every rank takes part (the hidden states of all streams and every
        rank's RNG state are gathered); rank 0 saves it."""
        device, corpus = self.setup.device, self.setup.corpus
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        every_rng = self.job.every_rank(rng)
        return {
            "config": self.config.to_dict(),
            "vocab": self.setup.vocab.chars,
            **self.averaging.state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "elapsed": self.elapsed,
            "best_val_loss": self.best_val_loss,
            "data": self.batcher.state_dict(),
            "hidden": map_hidden(torch.Tensor.cpu, self.job.whole_batch(self.hidden)),
            "rng": {**every_rng[0], "data": self.setup.data_generator.get_state(), "ranks": every_rng},
            "corpus": {"path": str(corpus.path), "sha256": corpus.sha256, "chars": len(corpus), "skipped": corpus.skipped,
                       "unit": corpus.vocab.unit, "files": corpus.files},
            "init_from": self.init_from,
            "job": {"world_size": self.job.world_size, "backend": self.job.backend, "run_id": self.job.run_id},
            "epochs": self.batcher.epochs_done,
            "trained_on": {"device": str(device), "precision": self.setup.precision},
            "scaler": self.setup.scaler.state_dict() if self.setup.scaler else None,
        }

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Continue from ``checkpoint``: this rank's rows of its streams' hidden states and, where the
        job has the shape that saved it, this rank's RNG state (else rank 0's: every rank's is alike)."""
        self.averaging.restore(self.model, checkpoint)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.setup.scaler is not None and checkpoint.get("scaler"):
            self.setup.scaler.load_state_dict(checkpoint["scaler"])
        self.step = int(checkpoint["step"])
        self.elapsed = float(checkpoint["elapsed"])
        self.best_val_loss = float(checkpoint["best_val_loss"])
        self.init_from = checkpoint["init_from"]
        self.batcher.load_state_dict(checkpoint["data"])
        rows = self.job.rows(self.config.train.batch_size)
        self.hidden = map_hidden(lambda h: h[:, rows].to(self.setup.device), checkpoint["hidden"])
        saved_ranks = checkpoint["rng"].get("ranks") or [checkpoint["rng"]]
        rng = saved_ranks[self.job.rank] if len(saved_ranks) == self.job.world_size else saved_ranks[0]
        torch.set_rng_state(rng["torch"])
        self.setup.data_generator.set_state(checkpoint["rng"]["data"])
        if rng["cuda"] is not None and self.setup.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.setup.device)

    def checkpoint(self, best: bool, last: bool) -> None:
        if not (best or last):
            return
        state = self.state()
        if not self.job.is_main:
            return
        if last:
            save_checkpoint(state, self.run_dir.last)
        if best:
            save_checkpoint(state, self.run_dir.best)

    # ------------------------------------------------------------------ loop

    def run(self) -> TrainResult:
        """Train until the budget is spent, evaluate on the whole validation split, report."""
        if self.job.is_main:
            self.run_dir.write_config(self.config)
        self.reporter.start(self.summary())
        try:
            with stop_signals(self.on_signal):
                stopped_by = self.loop()
            final = self.final_evaluation()
        finally:
            self.reporter.close()
            self.metrics.close()
            self.forward = self.model  # DDP goes before its process group does (see Job.stop)
        result = TrainResult(self.run_dir.path, self.step, self.batcher.epochs_done, self.elapsed, stopped_by,
                             self.best_val_loss, final)
        self.reporter.finished(result)
        return result

    def loop(self) -> str:
        t = self.config.train
        window, bad_steps = LogWindow(), 0
        last_eval_step = self.step if self.step else -1
        while (stopped_by := self.agreed_stop()) is None:
            loss, chars = self.train_step()
            bad_steps = 0 if loss is not None else self.skipped(bad_steps + 1)
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

    def agreed_stop(self) -> str | None:
        """Why to stop now (None: go on), the same on every rank: the budget's verdict (any rank's
        clock may end the run) or a signal, which saves last.pt and raises ``TrainingInterrupted``."""
        reason = self.budget.stop_reason(self.position())
        code, signum = self.job.largest([STOP_REASONS.index(reason), self.stop_signal or 0], self.setup.device)
        if signum:
            self.checkpoint(best=False, last=True)
            raise TrainingInterrupted(int(signum), self.run_dir.last)
        return STOP_REASONS[int(code)]

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
                                           self.setup.precision, self.config.train.grad_clip, self.forward, self.job,
                                           self.setup.scaler)
        if loss is not None:
            self.step += 1
        self.elapsed += time.perf_counter() - started
        if loss is not None and self.averaging.update(self.model, self.budget.progress(self.position())):
            self.reporter.note(f"step {self.step}: averaging the weights from here on (--train.average-last)")
        return loss, 0 if loss is None else targets.numel() * self.job.world_size

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
        """Evaluate on part of the validation split (rank 0 alone; the others wait at their next step);
        True, on every rank, when this is the best loss so far."""
        is_best = False
        if self.job.is_main:
            started = time.perf_counter()
            result = mean_loss(self.evaluated_model, self.setup.val_data, self.setup.device, self.setup.precision,
                               max_batches=self.config.train.eval_batches)
            text = self.watch_sample()
            self.budget.evaluated(time.perf_counter() - started)  # the time left counts the sample too
            is_best = result.loss < self.best_val_loss
            self.best_val_loss = min(self.best_val_loss, result.loss)
            self.metrics.evaluation(self.step, self.elapsed, result.loss)
            self.reporter.evaluated(self.step, result.loss, is_best)
            self.metrics.sample(self.step, self.elapsed, text)
            self.reporter.sampled(self.step, text)
        return bool(self.job.from_main(float(is_best), self.setup.device))

    def watch_sample(self) -> str:
        """A short sample from a fixed prime and seed, so a run's samples show what it learned step by step.
        It draws from a generator of its own: the run's random state, and so a resume, are untouched."""
        text = generate(self.evaluated_model, self.setup.vocab, "", SampleSettings(length=WATCH_SAMPLE_LENGTH, seed=WATCH_SAMPLE_SEED))[0]
        self.model.train()
        return text

    def final_evaluation(self) -> EvalResult:
        """The whole validation split, on rank 0; its figures on every rank."""
        final = EvalResult(0.0, 0)
        if self.job.is_main:
            final = mean_loss(self.evaluated_model, self.setup.val_data, self.setup.device, self.setup.precision)
            self.metrics.final(self.step, self.elapsed, final.loss)
        return EvalResult(self.job.from_main(final.loss, self.setup.device), int(self.job.from_main(final.chars, self.setup.device)))

    @property
    def evaluated_model(self) -> CharRNN:
        """What evaluation, samples and checkpoints see: the weight average once it has begun."""
        return self.averaging.model_to_use(self.model)

    def on_signal(self, signum, frame) -> None:
        self.stop_signal = signum

    def summary(self) -> dict[str, Any]:
        m, t, corpus = self.config.model, self.config.train, self.setup.corpus
        unit = "byte" if corpus.vocab.unit == "byte" else "character"
        return {
            "run directory": str(self.run_dir.path),
            "corpus": f"{corpus.path} ({len(corpus):,} {unit}s: {self.setup.train_chars:,} train, "
                      f"{len(self.setup.val_data):,} validation)",
            "files": f"{len(corpus.files):,}, joined in sorted order" if corpus.files else None,
            "unknown characters skipped": f"{corpus.skipped:,}" if corpus.skipped else None,
            "vocabulary": f"{len(self.setup.vocab):,} {unit}s",
            "model": f"{m.layers}x{m.hidden_size} {m.cell.upper()}, embedding {m.embedding_size}"
                     + (", tied" if m.tie_weights else ""),
            "parameters": f"{self.model.num_parameters():,}",
            "initialised from": self.init_from,
            "device": str(self.setup.device),
            "precision": self.setup.precision,
            "batch": f"{t.batch_size} streams x {t.seq_len} chars"
                     + (f", {t.batch_size // self.job.world_size} per process" if self.job.distributed else ""),
            "processes": f"{self.job.world_size} ({self.job.backend}, DistributedDataParallel)" if self.job.distributed else None,
            "weight averaging": f"SWA over the last {t.average_last:.0%} of the run" if t.average_last else None,
            "resumed at step": self.step or None,
            "changed on resume": ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in self.changes.items()) or None,
        }
