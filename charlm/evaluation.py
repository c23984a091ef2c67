"""Evaluation: loss in nats per character, bits per character and perplexity."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .data.batches import eval_windows
from .data.corpus import iter_text_chunks, open_corpus
from .data.vocab import describe_chars
from .device import autocast, resolve_precision
from .errors import CharlmError
from .model.charrnn import CharRNN, sequence_loss

# The validation text is read as 16 contiguous streams, the hidden state carried through each:
# every stream starts cold once, so fewer streams measure the model more truly (one stream reads
# ~0.001 nats lower than 16 on Tiny Shakespeare, 64 streams ~0.005 higher) but run slower.
EVAL_BATCH = 16
EVAL_SEQ_LEN = 256


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
def evaluate(model: CharRNN, data: torch.Tensor, device: torch.device, precision: str = "fp32",
             max_batches: int | None = None, batch_size: int = EVAL_BATCH, seq_len: int = EVAL_SEQ_LEN) -> EvalResult:
    """Mean loss over contiguous windows of ``data``, the hidden state carried from window to window."""
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
    if count == 0:
        raise ValueError("no evaluation windows: the text is too short")
    return EvalResult(loss=float(total) / count, chars=count)


@dataclass
class TextEvaluation:
    result: EvalResult
    source: str
    skipped: int


def evaluate_checkpoint(model: CharRNN, vocab, config, device: torch.device, data: str | Path | None = None,
                        skip_unknown: bool = False, encoding_errors: str = "strict") -> TextEvaluation:
    """Evaluate on ``data`` (a whole text file) or, without it, on the validation split of the training corpus."""
    precision = resolve_precision("auto", device)
    if data is None:
        corpus = open_corpus(config.data)
        if corpus.vocab.chars != vocab.chars:
            raise CharlmError(f"{corpus.path} is not the corpus this model was trained on; pass --data FILE")
        _, val = corpus.split(config.data.val_fraction)
        source, ids, skipped = f"{corpus.path} (validation split)", val, 0
    else:
        path = Path(data)
        text = "".join(iter_text_chunks(path, encoding_errors))
        missing = vocab.unknown(text)
        if missing and not skip_unknown:
            raise CharlmError(
                f"{path} has characters the model never saw: {describe_chars(missing)}; "
                "pass --skip-unknown to leave them out"
            )
        encoded = vocab.encode(text, skip_unknown=True)
        source, ids, skipped = str(path), torch.from_numpy(encoded), len(text) - len(encoded)
    if len(ids) < 2:
        raise CharlmError(f"{source} is too short to evaluate (it needs at least 2 known characters)")
    return TextEvaluation(evaluate(model, ids.to(device), device, precision), source, skipped)
