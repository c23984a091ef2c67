"""Stochastic weight averaging (SWA) over the last part of a run.

An equal average of the weights after every step of the run's last ``train.average_last``
fraction (by the tightest of its step, epoch and time budgets) can generalise better than the
weights of any one step, above all after a fine-tune at a constant learning rate from a trained
model (docs/RESULTS.md has what it gained here). Once averaging has begun, the average is what
the run evaluates, samples from and saves as its checkpoints' ``model``; the raw weights, which
go on training, are saved beside it for a resume. ``validate`` makes sure such a run has a budget,
so its progress is always known.
"""

from __future__ import annotations

from typing import Any

from torch.optim.swa_utils import AveragedModel

from ..model.charrnn import CharRNN


class WeightAverage:
    def __init__(self, model: CharRNN, last_fraction: float):
        self.last_fraction = last_fraction
        self.average = AveragedModel(model) if last_fraction > 0 else None
        self.count = 0  # steps averaged so far (0: not begun, or off), kept here so a GPU is never waited for

    def update(self, model: CharRNN, progress: float | None) -> bool:
        """Average in the weights after a step (``progress``: the run's, None only when averaging is
        off); True at the step that begins the average.

        Before the window (a resume that lengthened the run moves it later) the average starts over."""
        if self.average is None:
            return False
        if progress < 1.0 - self.last_fraction:
            if self.count:
                self.average.n_averaged.zero_()
                self.count = 0
            return False
        self.average.update_parameters(model)
        self.count += 1
        return self.count == 1

    def model_to_use(self, model: CharRNN) -> CharRNN:
        """The weights to evaluate, sample and save: the average once begun, else ``model``'s own."""
        return self.average.module if self.count else model

    def state(self, model: CharRNN) -> dict[str, Any]:
        """The checkpoint's weights: ``model`` as evaluated, and the raw ones while they differ."""
        return {"model": self.model_to_use(model).state_dict(),
                "training_model": model.state_dict() if self.count else None,
                "averaged_steps": self.count}

    def restore(self, model: CharRNN, checkpoint: dict[str, Any]) -> None:
        """Load the raw weights into ``model`` and the average, where one was saved, into this."""
        raw = checkpoint.get("training_model")
        model.load_state_dict(raw if raw is not None else checkpoint["model"])
        if self.average is not None and checkpoint.get("averaged_steps"):
            self.average.module.load_state_dict(checkpoint["model"])
            self.count = int(checkpoint["averaged_steps"])
            self.average.n_averaged.fill_(self.count)
