"""Dynamic evaluation: the model keeps learning from the text it has just been scored on.

After Krause et al. (2018), "Dynamic Evaluation of Neural Sequence Models": the text is read as
one stream, segment by segment. Each segment is scored first, with the weights adapted to the
segments before it, and only then used for a gradient step, so no character's score depends on
any character after it. The step is RMS-normalised (each weight's gradient divided by the root
of its running mean square, a causal estimate from the segments already scored) and pulled back
toward the trained weights with a decay that is stronger where the gradients are larger, so the
model follows the text without drifting from what it learned.

The model is adapted on a copy: the caller's model and the checkpoint on disk never change.
Dropout is off while adapting (cuDNN's RNN backward needs train mode, so the copy trains with
every dropout at 0).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import CharlmError
from .data.vocab import Vocab
from .evaluation import EvalResult, text_ids
from .model.charrnn import CharRNN, Hidden, map_hidden, sequence_loss


@dataclass
class DynamicSettings:
    """The update's hyperparameters; the defaults were tuned on held-out training text of the
    bundled model (docs/RESULTS.md), never on the text being scored."""

    lr: float = 3e-4  # step size of the RMS-normalised update
    decay: float = 0.01  # pull toward the trained weights, per segment, scaled by each weight's gradient RMS
    segment: int = 32  # characters scored, then learned from, at a time
    beta: float = 0.99  # averaging of the squared gradients
    epsilon: float = 1e-8

    def validate(self) -> None:
        if not (0 < self.lr < math.inf and 0 <= self.decay < math.inf and self.segment >= 1 and 0 < self.beta < 1):
            raise CharlmError("dynamic evaluation needs --dynamic-lr > 0, --dynamic-decay >= 0 and --dynamic-segment >= 1")


def dynamic_settings(**given: float | int | None) -> DynamicSettings:
    """The defaults, with the options that were given."""
    settings = DynamicSettings(**{key: value for key, value in given.items() if value is not None})
    settings.validate()
    return settings


def adaptable_copy(model: CharRNN) -> CharRNN:
    """A copy of ``model`` in train mode (for cuDNN's backward) with every dropout at 0."""
    adapted = copy.deepcopy(model).float()
    adapted.rnn.dropout = 0.0
    for module in adapted.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return adapted.train()


class DynamicEvaluator:
    """Scores text segment by segment and adapts its copy of the model after each segment."""

    def __init__(self, model: CharRNN, settings: DynamicSettings | None = None):
        self.settings = settings or DynamicSettings()
        self.settings.validate()
        self.model = adaptable_copy(model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.trained = [p.detach().clone() for p in self.params]
        self.mean_square = [torch.zeros_like(p) for p in self.params]
        self.updates = 0
        self.hidden: Hidden | None = None

    def score(self, ids: torch.Tensor, on_progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """The loss (nats) of every character after the first of ``ids`` (1-D, on the model's device),
        each scored before the weights learn from it; the state carries on to the next call.
        ``on_progress(scored, total)`` hears of each segment."""
        step, losses = self.settings.segment, []
        for start in range(0, len(ids) - 1, step):
            inputs, targets = ids[start:start + step][None], ids[start + 1:start + step + 1][None]
            inputs = inputs[:, :targets.size(1)]
            logits, hidden = self.model(inputs, self.hidden)
            loss = sequence_loss(logits, targets, reduction="none")
            losses.append(loss.detach())
            self.model.zero_grad(set_to_none=True)
            loss.mean().backward()
            self.adapt()
            self.hidden = map_hidden(torch.Tensor.detach, hidden)
            if on_progress is not None:
                on_progress(start + targets.size(1), len(ids) - 1)
        return torch.cat(losses) if losses else torch.zeros(0)

    @torch.no_grad()
    def adapt(self) -> None:
        """One RMS-normalised step on the segment just scored, then the decay toward the trained weights."""
        s = self.settings
        self.updates += 1
        correction = 1.0 - s.beta ** self.updates
        for param, trained, mean_square in zip(self.params, self.trained, self.mean_square):
            if param.grad is None:
                continue
            mean_square.mul_(s.beta).addcmul_(param.grad, param.grad, value=1.0 - s.beta)
            rms = (mean_square / correction).sqrt_()
            param.addcdiv_(param.grad, rms.add(s.epsilon), value=-s.lr)
            pull = (s.decay * rms / rms.mean().clamp_min(s.epsilon)).clamp_(max=1.0)
            param.add_(pull * (trained - param))


def dynamic_loss(model: CharRNN, ids: torch.Tensor, settings: DynamicSettings | None = None,
                 on_progress: Callable[[int, int], None] | None = None) -> tuple[EvalResult, CharRNN]:
    """Dynamic evaluation of ``ids`` (1-D, at least 2): the mean loss and the adapted copy of the model."""
    if len(ids) < 2:
        raise CharlmError("dynamic evaluation needs at least 2 known characters")
    evaluator = DynamicEvaluator(model, settings)
    device = next(evaluator.model.parameters()).device
    losses = evaluator.score(ids.to(device, torch.long), on_progress)
    mean = float(losses.double().mean())
    if not math.isfinite(mean):
        raise CharlmError("dynamic evaluation diverged (a non-finite loss); use a lower --dynamic-lr")
    return EvalResult(loss=mean, chars=len(losses)), evaluator.model.eval()


def adapted_to(model: CharRNN, vocab: Vocab, path: str | Path, settings: DynamicSettings | None = None) -> CharRNN:
    """A copy of ``model`` adapted to a text file by dynamic evaluation: sampling from it follows
    that text's style. Characters the model never saw are an error naming them."""
    ids, _ = text_ids(path, vocab, skip_unknown=False, remedy="remove them from the file to adapt to")
    return dynamic_loss(model, ids, settings)[1]
