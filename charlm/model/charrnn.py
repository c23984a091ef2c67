"""The character-level recurrent language model.

An embedding, a stack of ``torch.nn.RNN/LSTM/GRU`` layers (so cuDNN and oneDNN
run the recurrence) and a linear read-out. Sampling steps one character at a
time through ``inference.py``, on weights rearranged from this module's.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig

RECURRENT = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
GATES = {"rnn": 1, "gru": 3, "lstm": 4}  # gate blocks per layer, each hidden_size wide

Hidden = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class CharRNN(nn.Module):
    def __init__(self, vocab_size: int, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, config.embedding_size)
        self.rnn = RECURRENT[config.cell](
            config.embedding_size, config.hidden_size, config.layers,
            dropout=config.dropout if config.layers > 1 else 0.0, batch_first=True,
        )
        self.embedding_dropout = nn.Dropout(config.embedding_dropout)
        self.output_dropout = nn.Dropout(config.output_dropout)
        # Tying needs the read-out's input to have the embedding's width.
        tied_projection = config.tie_weights and config.hidden_size != config.embedding_size
        self.projection = nn.Linear(config.hidden_size, config.embedding_size, bias=False) if tied_projection else None
        self.head = nn.Linear(config.embedding_size if config.tie_weights else config.hidden_size, vocab_size)
        if config.tie_weights:
            self.head.weight = self.embedding.weight
        nn.init.normal_(self.embedding.weight, std=0.1 if config.tie_weights else 1.0)
        if config.cell == "lstm" and config.forget_bias:
            self.set_forget_bias(config.forget_bias)

    def set_forget_bias(self, value: float) -> None:
        """Forget gates that start open keep the cell's memory early in training (Jozefowicz et al., 2015).

        PyTorch orders an LSTM's gate blocks input, forget, cell, output; the two bias vectors add up,
        so the input-side block takes the value and the hidden-side block starts at zero.
        """
        size = self.config.hidden_size
        with torch.no_grad():
            for layer in range(self.config.layers):
                getattr(self.rnn, f"bias_ih_l{layer}")[size:2 * size].fill_(value)
                getattr(self.rnn, f"bias_hh_l{layer}")[size:2 * size].zero_()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def readout(self, output: torch.Tensor) -> torch.Tensor:
        if self.projection is not None:
            output = self.projection(output)
        return self.head(output)

    def forward(self, ids: torch.Tensor, hidden: Hidden | None = None) -> tuple[torch.Tensor, Hidden]:
        """ids (B, T) -> logits (B, T, V) and the hidden state after the last step."""
        x = self.embedding_dropout(self.embedding(ids))
        output, hidden = self.rnn(x, hidden)
        return self.readout(self.output_dropout(output)), hidden

    def init_hidden(self, batch_size: int, device: torch.device | str = "cpu") -> Hidden:
        shape = (self.config.layers, batch_size, self.config.hidden_size)
        zeros = torch.zeros(shape, device=device, dtype=self.embedding.weight.dtype)
        return (zeros, zeros.clone()) if self.config.cell == "lstm" else zeros

    @contextmanager
    def weight_drop(self):
        """DropConnect on the hidden-to-hidden matrices for one forward/backward.

        The masks are applied in place to the existing parameters, so the
        recurrent layer keeps its flat, fused weight buffer (no re-flattening
        on cuDNN). After backward the raw weights come back and the gradients
        are masked, which is exactly the gradient of the dropped-out weights.
        """
        p = self.config.weight_drop
        if p == 0.0 or not self.training:
            yield
            return
        weights = [getattr(self.rnn, f"weight_hh_l{layer}") for layer in range(self.config.layers)]
        saved, masks = [], []
        with torch.no_grad():
            for w in weights:
                keep = torch.rand(w.shape, device="cpu") >= p  # the global generator: seeded, and saved in checkpoints
                mask = keep.to(w.device, w.dtype) / (1.0 - p)
                saved.append(w.detach().clone())
                masks.append(mask)
                w.mul_(mask)
        try:
            yield
        finally:
            with torch.no_grad():
                for w, raw, mask in zip(weights, saved, masks):
                    w.copy_(raw)
                    if w.grad is not None:
                        w.grad.mul_(mask)


def map_hidden(fn: Callable[[torch.Tensor], torch.Tensor], hidden: Hidden | None) -> Hidden | None:
    """``fn`` applied to every tensor of a hidden state: an LSTM's (h, c) pair or an RNN's or GRU's one tensor.

    The one place that knows the two shapes of a hidden state; None (no state yet) stays None.
    """
    if hidden is None:
        return None
    return tuple(fn(part) for part in hidden) if isinstance(hidden, tuple) else fn(hidden)


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy in nats per character, computed in fp32 whatever the autocast."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), reduction=reduction)
