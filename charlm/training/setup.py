"""Everything a training loop reads, built from a config and a corpus in one place.

The device and precision, the corpus split into training streams and validation text, the
model (fresh, or with the weights of a run it is fine-tuned from), AdamW and the batcher.
Nothing here writes to disk, so a config that cannot train is refused before a run
directory is touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import Config, TrainConfig
from ..data.batches import StreamBatcher, eval_window_count
from ..data.corpus import Corpus
from ..data.vocab import Vocab
from ..device import gradient_scaler, resolve_device, resolve_precision
from ..errors import CharlmError
from ..evaluation import EVAL_BATCH, EVAL_SEQ_LEN
from ..model.charrnn import CharRNN
from .distributed import Job, threads_per_rank
from .metrics import require_tensorboard


@dataclass
class TrainingSetup:
    config: Config
    device: torch.device
    precision: str
    corpus: Corpus
    train_chars: int
    val_data: torch.Tensor
    model: CharRNN
    optimizer: torch.optim.AdamW
    batcher: StreamBatcher
    data_generator: torch.Generator
    job: Job
    scaler: torch.amp.GradScaler | None  # fp16's loss scaler

    @property
    def vocab(self) -> Vocab:
        return self.corpus.vocab

    @property
    def final_eval_windows(self) -> int:
        return eval_window_count(len(self.val_data), EVAL_BATCH, EVAL_SEQ_LEN)


def build_optimizer(model: CharRNN, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(config.beta1, config.beta2), fused=next(model.parameters()).is_cuda,
    )


def split_corpus(corpus: Corpus, config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and validation ids, refused in one line where either is too short to use."""
    t = config.train
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
    return train_data, val_data


def build_training(config: Config, corpus: Corpus, weights: dict[str, Any] | None = None, job: Job | None = None) -> TrainingSetup:
    """Build a run from ``config`` on ``corpus`` (its ids in the model's vocabulary): fresh weights
    seeded by ``train.seed``, or ``weights`` (a state dict, when fine-tuning), and this rank's
    streams of ``job`` (every rank seeds alike, so all start from the same weights)."""
    t, job = config.train, job or Job()
    job.check_batch(t.batch_size)
    if t.tensorboard:
        require_tensorboard()
    device = resolve_device(job.device_name(t.device))
    precision = resolve_precision(t.precision, device)
    train_data, val_data = split_corpus(corpus, config)
    threads = threads_per_rank(job, t.threads)
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(t.seed)
    model = CharRNN(len(corpus.vocab), config.model)
    if weights is not None:
        model.load_state_dict({name: tensor.float() for name, tensor in weights.items()})
    model.to(device)
    generator = torch.Generator().manual_seed(t.seed)
    batcher = StreamBatcher(train_data.to(device), t.batch_size, t.seq_len, t.random_seq_len, generator, job.rows(t.batch_size))
    return TrainingSetup(config, device, precision, corpus, len(train_data), val_data.to(device), model,
                         build_optimizer(model, t), batcher, generator, job, gradient_scaler(precision))
