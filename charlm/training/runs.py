"""Starting, fine-tuning and resuming runs: what ``charlm train`` does, as library functions.

- ``train(config)`` starts a new run in ``config.train.out`` and never overwrites one.
- ``train(config, init_from=...)`` starts a new run from another run's weights (fine-tuning):
  a fresh optimizer and schedule, the source's vocabulary; ``finetune_config`` builds its config.
- ``resume(run_dir, overrides)`` continues a run from its last.pt with its saved config; an
  override may change how long and how often it trains, never what it trains.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..config import Config, ModelConfig, load_config
from ..data.corpus import open_corpus
from ..errors import CharlmError
from ..model.checkpoint import checkpoint_unit, checkpoint_vocab, load_checkpoint, resolve, training_corpus
from .loop import Reporter, Trainer, TrainResult
from .distributed import Job, job_from_environment
from .rundir import RunDirectory
from .setup import build_training

# What a resume may change: when it stops, how often it logs, evaluates and checkpoints, where it
# runs and where the corpus cache lives, and the end of the learning-rate schedule.
RESUMABLE = frozenset({
    "train.max_time", "train.max_steps", "train.max_epochs", "train.eval_interval", "train.eval_batches",
    "train.checkpoint_interval", "train.log_interval", "train.max_bad_steps", "train.min_lr",
    "train.device", "train.precision", "train.threads", "train.backend", "train.tensorboard", "data.dir",
})
# Why the other options may not change on resume.
FROZEN_BECAUSE = {
    "model": "it would change the model",
    "data": "it would change the corpus",
    "train.batch_size": "it would change the stream layout", "train.seq_len": "it would change the stream layout",
    "train.random_seq_len": "it would change the stream layout",
    "train.seed": "the run's random state continues from its checkpoint",
    "train.out": "a run continues in its own directory",
    "train": "it would change the run's training recipe partway",
}


def option(key: str) -> str:
    return "--" + key.replace("_", "-")


def frozen_reason(key: str) -> str:
    return FROZEN_BECAUSE.get(key) or FROZEN_BECAUSE[key.split(".")[0]]


def resumed_config(saved: dict[str, Any], overrides: dict[str, Any], run_dir: Path) -> tuple[Config, dict[str, tuple[Any, Any]]]:
    """The saved config with ``overrides`` applied, and what they changed ({key: (saved, now)}).

    An override of anything but ``RESUMABLE`` to a new value is refused in one line naming it."""
    before = load_config(base={**saved, "train": {**saved["train"], "out": str(run_dir)}})
    after = load_config(base=before.to_dict(), overrides=overrides)
    old, new = before.flat(), after.flat()
    changes = {key: (old[key], new[key]) for key in overrides if new[key] != old[key]}
    for key, (was, asked) in changes.items():
        if key not in RESUMABLE:
            instead = "start a new run with --out DIR" if key.startswith("model.") else \
                f"start a new run with --out DIR, or fine-tune from its weights with --init-from {run_dir} --out DIR"
            raise CharlmError(f"cannot change {option(key)} when resuming {run_dir} (saved {was!r}, asked {asked!r}): "
                              f"{frozen_reason(key)}; {instead}")
    return after, changes


def refuse_model_changes(source_model: dict[str, Any], model: ModelConfig, source: str) -> None:
    """A fine-tune keeps the shape of the weights it starts from: any other model option is refused."""
    saved = asdict(ModelConfig(**source_model))
    for key, asked in asdict(model).items():
        if asked != saved[key]:
            raise CharlmError(f"cannot change {option('model.' + key)} when fine-tuning from {source} "
                              f"(saved {saved[key]!r}, asked {asked!r}): the weights have the saved shape; "
                              "train a new model without --init-from instead")


def finetune_config(init_from: str | Path, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """The config of a fine-tune from ``init_from``: its model, then as for a new run the config file
    (a path or a bundled name) and the overrides, where a model option that differs is refused."""
    source = load_checkpoint(resolve(init_from))
    unit = checkpoint_unit(source)
    config = load_config(path, overrides, base={"model": source["config"]["model"], "data": {"unit": unit}})
    refuse_model_changes(source["config"]["model"], config.model, str(init_from))
    if config.data.unit != unit:
        raise CharlmError(f"cannot change --data.unit when fine-tuning from {init_from} (saved {unit!r}, asked "
                          f"{config.data.unit!r}): the model reads {unit}s; train a new model without --init-from instead")
    return config


@contextmanager
def one_writer(run: RunDirectory, job: Job, device: torch.device, check: Callable[[], None]) -> Iterator[None]:
    """Rank 0 (the one process of a plain run) takes the run directory's lock and runs ``check``
    under it, then signs the lock; every rank learns the verdict, the others stop quietly on a refusal."""
    failure = None
    if job.is_main:
        try:
            run.lock()
            check()
            run.sign_lock()
        except CharlmError as err:
            run.unlock()
            failure = err
    job.agree(failure, device)
    try:
        yield
    finally:
        run.unlock()


def written_by(checkpoint: Path, job: Job) -> bool:
    """Whether ``checkpoint`` was saved by an earlier attempt of this very torchrun job, which
    torchrun restarted after it lost a process (its run id stays, its restart count grows)."""
    if not (job.restart and job.run_id and checkpoint.is_file()):
        return False
    return (load_checkpoint(checkpoint).get("job") or {}).get("run_id") == job.run_id


def train(config: Config, *, init_from: str | Path | None = None, reporter: Reporter | None = None) -> TrainResult:
    """Train a new run into ``config.train.out``, from fresh weights or those of ``init_from``
    (a run directory, checkpoint file or 'pretrained'). A directory that holds a run is refused:
    continue it with ``resume``. Under torchrun every process calls this; when torchrun restarts
    the job after a lost process (--max-restarts), it continues from the run's last.pt."""
    job, run = job_from_environment(), RunDirectory(config.train.out)
    if written_by(run.last, job):
        return resume(run.path, reporter=reporter)
    check = (lambda: None) if written_by(run.best, job) else run.refuse_existing_run  # this job's first attempt
    check()
    source, source_path = None, None
    if init_from is not None:
        source_path = resolve(init_from)
        source = load_checkpoint(source_path)
        refuse_model_changes(source["config"]["model"], config.model, str(init_from))
    vocab = checkpoint_vocab(source) if source else None
    setup = build_training(config, open_corpus(config.data, vocab), source["model"] if source else None, job)
    if job.is_main:
        run.create()
    with job.running(setup.device, config.train.backend), one_writer(run, job, setup.device, check):
        trainer = Trainer(setup, run, reporter, init_from=str(source_path) if source_path else None)
        trainer.metrics.forget_after(0)  # the records of a restarted job's first attempt
        return trainer.run()


def resume(run_dir: str | Path, overrides: dict[str, Any] | None = None, *, reporter: Reporter | None = None) -> TrainResult:
    """Continue the run in ``run_dir`` exactly where its last.pt left off, with its saved config.

    ``overrides`` ({'train.max_steps': 5000}) may change the options in ``RESUMABLE``; they are
    written into config.toml and noted in metrics.jsonl. Anything else is refused before the run
    directory is touched. Under torchrun each process continues its own streams, also with another
    number of processes than the job that saved the run (the global batch stays the saved one)."""
    job, run = job_from_environment(), RunDirectory(run_dir)
    last = run.require_last()
    saved = last.stat()
    checkpoint = load_checkpoint(last)
    config, changes = resumed_config(checkpoint["config"], overrides or {}, run.path)
    corpus = training_corpus(config, checkpoint, str(run.path),
                             f"put the original back, or fine-tune on this text with --init-from {run.path} --out DIR")
    setup = build_training(config, corpus, job=job)

    def unchanged() -> None:  # the run may have gone on between reading last.pt and taking the lock
        now = last.stat()
        if (now.st_mtime_ns, now.st_size) != (saved.st_mtime_ns, saved.st_size):
            raise CharlmError(f"{last} changed while it was read (the run was training); resume again")

    with job.running(setup.device, config.train.backend), one_writer(run, job, setup.device, unchanged):
        trainer = Trainer(setup, run, reporter, changes=changes)
        trainer.restore(checkpoint)
        trainer.metrics.forget_after(trainer.step)
        if changes:
            trainer.metrics.resumed(trainer.step, trainer.elapsed, changes)
        return trainer.run()
