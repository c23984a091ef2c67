"""Training: truncated BPTT over contiguous streams, AdamW, warm-up then cosine decay.

``train(config)`` runs from start to finish and returns what happened; it
checkpoints into the run directory so that ``train(config, resume=True)``
continues bit-for-bit where the last checkpoint left off.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import Config, TrainConfig, parse_duration, to_toml
from ..data.batches import StreamBatcher
from ..data.corpus import open_corpus
from ..device import autocast, resolve_device, resolve_precision
from ..errors import CharlmError
from ..evaluation import EvalResult, evaluate
from ..model.charrnn import CharRNN, map_hidden, sequence_loss
from ..model.checkpoint import load_checkpoint, save_checkpoint


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
    def progress(self, step: int, total: int | None, metrics: dict[str, float]) -> None: ...
    def evaluated(self, step: int, val_loss: float, is_best: bool) -> None: ...
    def note(self, text: str) -> None: ...
    def close(self) -> None: ...


def learning_rate(config: Config, step: int, progress: float | None) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr`` as progress goes 0 -> 1."""
    t = config.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if progress is None:
        return t.lr
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def resume_checkpoint(run_dir: Path) -> Path:
    """The last.pt a resumed run continues from, or a clear error when there is none."""
    path = Path(run_dir) / "last.pt"
    if not path.is_file():
        raise CharlmError(f"cannot resume: {run_dir} holds no last.pt; start a new run with --out {run_dir}")
    return path


def prepare_run_dir(run_dir: Path, resume: bool) -> None:
    if resume:
        resume_checkpoint(run_dir)
        return
    if (run_dir / "last.pt").exists() or (run_dir / "best.pt").exists():
        raise CharlmError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise CharlmError(f"cannot write to the run directory {run_dir} ({err.strerror or err}); choose another --out") from None


def build_optimizer(model: CharRNN, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(config.beta1, config.beta2), fused=next(model.parameters()).is_cuda,
    )


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


class Trainer:
    def __init__(self, config: Config, resume: bool = False, reporter: Reporter | None = None,
                 checkpoint: dict[str, Any] | None = None):
        """``checkpoint``: the run's last.pt when the caller has already read it (resume only)."""
        self.config, self.reporter = config, reporter or Reporter()
        t = config.train
        self.run_dir = Path(t.out)
        self.device = resolve_device(t.device)
        self.precision = resolve_precision(t.precision, self.device)
        self.max_time = parse_duration(t.max_time)
        prepare_run_dir(self.run_dir, resume)
        if not resume:
            checkpoint = None
        elif checkpoint is None:
            checkpoint = load_checkpoint(self.run_dir / "last.pt")

        corpus = open_corpus(config.data)
        self.corpus = corpus
        self.vocab = corpus.vocab
        if checkpoint is not None and checkpoint["vocab"] != corpus.vocab.chars:
            raise CharlmError(f"{corpus.path} is not the corpus this run was trained on (its vocabulary differs)")
        train_data, val_data = corpus.split(config.data.val_fraction)
        need = t.batch_size * (t.seq_len + 1) + 1
        if len(train_data) < need:
            raise CharlmError(
                f"the training split of {corpus.path} has {len(train_data):,} characters, fewer than "
                f"batch_size x (seq_len + 1) = {need:,}; use a longer text or lower --train.batch-size/--train.seq-len"
            )
        if len(val_data) < 2:
            raise CharlmError(
                f"the validation split of {corpus.path} has {len(val_data)} characters, too few to evaluate; "
                "use a longer text or raise --data.val-fraction"
            )
        self.train_chars, self.val_chars = len(train_data), len(val_data)
        self.val_data = val_data.to(self.device)

        torch.manual_seed(t.seed)
        self.model = CharRNN(len(self.vocab), config.model).to(self.device)
        self.optimizer = build_optimizer(self.model, t)
        self.data_generator = torch.Generator().manual_seed(t.seed)
        self.batcher = StreamBatcher(train_data.to(self.device), t.batch_size, t.seq_len, t.random_seq_len, self.data_generator)
        self.step, self.elapsed, self.best_val_loss = 0, 0.0, math.inf
        self.hidden = None
        self.stop_signal: int | None = None
        if checkpoint is not None:
            self.restore(checkpoint)

    # ------------------------------------------------------------------ state

    def state(self) -> dict[str, Any]:
        cuda = self.device.type == "cuda"
        hidden = self.hidden
        return {
            "config": self.config.to_dict(),
            "vocab": self.vocab.chars,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": {"step": self.step, "elapsed": self.elapsed, "warmup_steps": self.config.train.warmup_steps},
            "step": self.step,
            "data": self.batcher.state_dict(),
            "hidden": map_hidden(torch.Tensor.cpu, hidden),
            "rng": {
                "torch": torch.get_rng_state(),
                "data": self.data_generator.get_state(),
                "cuda": torch.cuda.get_rng_state(self.device) if cuda else None,
            },
            "best_val_loss": self.best_val_loss,
        }

    def restore(self, checkpoint: dict[str, Any]) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.step = int(checkpoint["step"])
        self.elapsed = float(checkpoint["schedule"]["elapsed"])
        self.best_val_loss = float(checkpoint["best_val_loss"])
        self.batcher.load_state_dict(checkpoint["data"])
        self.hidden = map_hidden(lambda h: h.to(self.device), checkpoint["hidden"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        self.data_generator.set_state(checkpoint["rng"]["data"])
        if checkpoint["rng"]["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], self.device)
        self.trim_metrics()

    def save(self, name: str, state: dict[str, Any] | None = None) -> Path:
        return save_checkpoint(state or self.state(), self.run_dir / name)

    # ------------------------------------------------------------------ metrics

    def log(self, record: dict[str, Any]) -> None:
        with (self.run_dir / "metrics.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def trim_metrics(self) -> None:
        """On resume, forget records written after the checkpoint we continue from."""
        path = self.run_dir / "metrics.jsonl"
        if path.is_file():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= self.step]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    # ------------------------------------------------------------------ loop

    def progress(self) -> float | None:
        """Fraction of the run done by the tightest stop condition, or None if none is set."""
        t = self.config.train
        fractions = []
        if t.max_steps:
            fractions.append(self.step / t.max_steps)
        if t.max_epochs:
            fractions.append(self.batcher.epochs_done / t.max_epochs)
        if self.max_time:
            fractions.append(self.elapsed / self.max_time)
        return max(fractions) if fractions else None

    def stop_reason(self) -> str | None:
        t = self.config.train
        if t.max_steps and self.step >= t.max_steps:
            return "max_steps"
        if t.max_epochs and self.batcher.epochs_done >= t.max_epochs:
            return "max_epochs"
        if self.max_time and self.elapsed >= self.max_time:
            return "max_time"
        return None

    def total_steps(self) -> int | None:
        progress = self.progress()
        if self.config.train.max_steps:
            return self.config.train.max_steps
        if progress:
            return max(self.step, int(self.step / progress))
        return None

    def train_step(self) -> tuple[float | None, int]:
        """One optimizer step: (loss, characters), the loss None when not finite and the step skipped."""
        inputs, targets, new_epoch = self.batcher.next()
        if new_epoch:
            self.hidden = None
        lr = learning_rate(self.config, self.step, self.progress())
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss, self.hidden = optimizer_step(self.model, self.optimizer, inputs.long(), targets.long(), self.hidden,
                                           self.precision, self.config.train.grad_clip)
        if loss is None:
            return None, 0
        self.step += 1
        return loss, targets.numel()

    def periodic_eval(self) -> bool:
        result = evaluate(self.model, self.val_data, self.device, self.precision, max_batches=self.config.train.eval_batches)
        is_best = result.loss < self.best_val_loss
        if is_best:
            self.best_val_loss = result.loss
        self.log({"step": self.step, "val_loss": result.loss, "elapsed": self.elapsed})
        self.reporter.evaluated(self.step, result.loss, is_best)
        return is_best

    def on_signal(self, signum, frame) -> None:
        self.stop_signal = signum

    def run(self) -> TrainResult:
        (self.run_dir / "config.toml").write_text(to_toml(self.config), encoding="utf-8")
        self.reporter.start(self.summary())
        handlers = {}
        try:
            for signum in (signal.SIGINT, signal.SIGTERM):
                handlers[signum] = signal.signal(signum, self.on_signal)
        except ValueError:  # not the main thread: leave signals alone
            pass
        try:
            stopped_by = self.loop()
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        final = evaluate(self.model, self.val_data, self.device, self.precision)
        self.log({"step": self.step, "final_val_loss": final.loss, "elapsed": self.elapsed})
        self.reporter.close()
        return TrainResult(self.run_dir, self.step, self.batcher.epochs_done, self.elapsed, stopped_by, self.best_val_loss, final)

    def loop(self) -> str:
        t = self.config.train
        bad_steps, window_loss, window_steps, window_chars = 0, 0.0, 0, 0
        window_start = time.perf_counter()
        last_eval_step = self.step if self.step else -1
        while (stopped_by := self.stop_reason()) is None:
            started = time.perf_counter()
            loss, chars = self.train_step()
            self.elapsed += time.perf_counter() - started
            if loss is None:
                bad_steps += 1
                self.reporter.note(f"step {self.step + 1}: loss is not finite, step skipped ({bad_steps} in a row)")
                if bad_steps >= t.max_bad_steps:
                    raise CharlmError(
                        f"training stopped: {bad_steps} consecutive steps had a non-finite loss at step {self.step + 1}; "
                        f"checkpoints in {self.run_dir} are untouched; try a lower --train.lr or --train.grad-clip"
                    )
            else:
                bad_steps = 0
                window_loss += loss
                window_steps += 1
                window_chars += chars
            if self.stop_signal is not None:
                path = self.save("last.pt")
                raise TrainingInterrupted(self.stop_signal, path)
            if loss is None:
                continue
            if self.step % t.log_interval == 0:
                now = time.perf_counter()
                metrics = {"loss": window_loss / window_steps, "lr": self.optimizer.param_groups[0]["lr"],
                           "chars_per_sec": window_chars / max(now - window_start, 1e-9),
                           "epoch": self.batcher.epochs_done, "elapsed": self.elapsed}
                self.log({"step": self.step, **metrics})
                self.reporter.progress(self.step, self.total_steps(), metrics)
                window_loss, window_steps, window_chars, window_start = 0.0, 0, 0, now
            is_best = False
            if self.step % t.eval_interval == 0:
                is_best = self.periodic_eval()
                last_eval_step = self.step
            self.checkpoint(is_best, self.step % t.checkpoint_interval == 0)
        if last_eval_step != self.step:
            self.checkpoint(self.periodic_eval(), True)
        else:
            self.checkpoint(False, True)
        return stopped_by

    def checkpoint(self, best: bool, last: bool) -> None:
        if not (best or last):
            return
        state = self.state()
        if last:
            self.save("last.pt", state)
        if best:
            self.save("best.pt", state)

    def summary(self) -> dict[str, Any]:
        m = self.config.model
        return {
            "run directory": str(self.run_dir),
            "corpus": f"{self.corpus.path} ({len(self.corpus):,} chars: {self.train_chars:,} train, {self.val_chars:,} validation)",
            "vocabulary": f"{len(self.vocab):,} characters",
            "model": f"{m.layers}x{m.hidden_size} {m.cell.upper()}, embedding {m.embedding_size}"
                     + (", tied" if m.tie_weights else ""),
            "parameters": f"{self.model.num_parameters():,}",
            "device": str(self.device),
            "precision": self.precision,
            "batch": f"{self.config.train.batch_size} streams x {self.config.train.seq_len} chars",
            "resumed at step": self.step or None,
        }


def train(config: Config, resume: bool = False, reporter: Reporter | None = None,
          checkpoint: dict[str, Any] | None = None) -> TrainResult:
    """Train a model as ``config`` says, checkpointing into ``config.train.out``."""
    return Trainer(config, resume, reporter, checkpoint).run()
