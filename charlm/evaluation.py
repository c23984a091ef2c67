"""Evaluation: loss in nats per character, bits per character and perplexity."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from .config import load_config
from .data.batches import eval_windows
from .data.corpus import iter_text_chunks
from .data.vocab import Vocab, unknown_characters
from .device import autocast, resolve_device, resolve_precision
from .errors import CharlmError
from .model.charrnn import CharRNN, sequence_loss
from .model.checkpoint import LoadedModel, load_model, training_corpus

if TYPE_CHECKING:
    from .dynamic import DynamicSettings

# The validation text is read as 16 contiguous streams, the hidden state carried through each:
# every stream starts cold once, so fewer streams measure the model more truly but run slower
# (docs/RESULTS.md has the measured difference).
EVAL_BATCH = 16
EVAL_SEQ_LEN = 256


SPLIT_NAMES = {"train": "training", "valid": "validation", "test": "test"}


@dataclass
class EvalResult:
    loss: float
    chars: int

    @property
    def bits_per_char(self) -> float:
        return self.loss / math.log(2)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def to_dict(self) -> dict:
        return {**asdict(self), "bits_per_char": self.bits_per_char, "perplexity": self.perplexity}


@torch.no_grad()
def mean_loss(model: CharRNN, data: torch.Tensor, device: torch.device, precision: str = "fp32",
              max_batches: int | None = None, batch_size: int = EVAL_BATCH, seq_len: int = EVAL_SEQ_LEN) -> EvalResult:
    """Mean loss over contiguous windows of ``data`` (at least 2 ids), the hidden state carried from window to window."""
    was_training = model.training
    model.eval()
    total, count, hidden = torch.zeros((), device=device), 0, None
    for inputs, targets in eval_windows(data, batch_size, seq_len, max_batches):
        inputs, targets = inputs.to(device, torch.long), targets.to(device, torch.long)
        with autocast(device, precision):
            logits, hidden = model(inputs, hidden)
        total += sequence_loss(logits, targets, reduction="sum")
        count += targets.numel()
    model.train(was_training)
    return EvalResult(loss=float(total) / count, chars=count)


@dataclass
class TextEvaluation:
    """What ``charlm eval`` reports: the result, which checkpoint, on what text, and what was left out."""

    result: EvalResult
    checkpoint: str
    step: int | None
    source: str
    skipped: int


def text_ids(path: str | Path, vocab: Vocab, skip_unknown: bool,
             remedy: str = "pass --skip-unknown to leave them out") -> tuple[torch.Tensor, int]:
    """A whole text file as ids of ``vocab``, and how many characters were left out as unknown
    (``remedy``: what the error for unknown characters tells the user to do)."""
    path = Path(path)
    text = "".join(iter_text_chunks(path, "strict"))
    missing = vocab.unknown(text)
    if missing and not skip_unknown:
        raise unknown_characters(str(path), missing, remedy)
    encoded = vocab.encode(text, skip_unknown=True)
    return torch.from_numpy(encoded), len(vocab.units(text)) - len(encoded)


def evaluate(checkpoint: str | Path | LoadedModel | None = None, data: str | Path | None = None, *,
             device: str = "auto", data_dir: str | None = None, skip_unknown: bool = False, split: str = "valid",
             dynamic: "DynamicSettings | None" = None, on_progress: Callable[[int, int], None] | None = None) -> TextEvaluation:
    """Loss of a checkpoint (a file, a run directory, 'pretrained' or None for the bundled model, or a
    ``load_model`` result) on ``data`` (a whole text file) or, without it, on the ``split`` ('valid',
    'test' for a named dataset, or 'train') of the corpus it was trained on (found under ``data_dir`` when given). With ``dynamic`` settings the
    text is read as one stream by dynamic evaluation (``charlm.dynamic``); ``on_progress(done, total)``
    then hears of each segment."""
    loaded = checkpoint if isinstance(checkpoint, LoadedModel) else load_model(checkpoint, resolve_device(device))
    target = next(loaded.model.parameters()).device
    if data is None:
        config = loaded.config if data_dir is None else load_config(base=loaded.config.to_dict(), overrides={"data.dir": data_dir})
        corpus = training_corpus(config, loaded.checkpoint, loaded.checkpoint["path"], "pass --data FILE to evaluate on another text")
        ids, source, skipped = corpus.part(split, config.data.val_fraction), f"{corpus.path} ({SPLIT_NAMES[split]} split)", 0
    else:
        if split != "valid":
            raise CharlmError("--split chooses a split of the training corpus; it takes no --data FILE")
        (ids, skipped), source = text_ids(data, loaded.vocab, skip_unknown), str(data)
    if len(ids) < 2:
        raise CharlmError(f"{source} is too short to evaluate (it needs at least 2 known characters)")
    if dynamic is None:
        result = mean_loss(loaded.model, ids.to(target), target, resolve_precision("auto", target))
    else:
        from .dynamic import dynamic_loss
        result, _ = dynamic_loss(loaded.model, ids, dynamic, on_progress)
    return TextEvaluation(result, loaded.checkpoint["path"], loaded.checkpoint.get("step"), source, skipped)
