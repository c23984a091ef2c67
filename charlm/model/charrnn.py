"""The character-level recurrent language model.

An embedding, a stack of ``torch.nn.RNN/LSTM/GRU`` layers (so cuDNN and oneDNN
run the recurrence) and a linear read-out. ``step`` advances one character with
the fused single-step cell kernels: the sampling path for batches and GPUs
(one stream on the CPU goes through ``numpy_step`` instead).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig

RECURRENT = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
CELL_STEP = {"rnn": torch.rnn_tanh_cell, "lstm": torch.lstm_cell, "gru": torch.gru_cell}

Hidden = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class StepWeights(NamedTuple):
    layers: list[tuple[torch.Tensor, ...]]  # per layer: weight_ih, weight_hh, bias_ih, bias_hh
    one_hot_input: bool  # the first layer's weight_ih has the embedding folded in


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

    def layer_weights(self) -> list[tuple[torch.Tensor, ...]]:
        """Per layer: (weight_ih, weight_hh, bias_ih, bias_hh) of the recurrent module."""
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        return [tuple(getattr(self.rnn, f"{name}_l{layer}") for name in names) for layer in range(self.config.layers)]

    @torch.no_grad()
    def step_weights(self) -> StepWeights:
        """The weights ``step`` reads, computed once per generation.

        Where the vocabulary is narrower than the embedding, the embedding is folded
        into the first layer's input weights (gates x vocabulary) and a step feeds
        it a one-hot character: one step of a 2x512 LSTM with 512-wide embeddings
        then reads a quarter fewer bytes (256 streams measured 12,392-14,426 chars/s
        against 9,333-11,302 without it; docs/BENCHMARKS.md).
        """
        layers = self.layer_weights()
        if self.vocab_size >= self.config.embedding_size:
            return StepWeights(layers, one_hot_input=False)
        weight_ih, *rest = layers[0]
        folded = weight_ih @ self.embedding.weight.t()
        return StepWeights([(folded, *rest), *layers[1:]], one_hot_input=True)

    @torch.no_grad()
    def step(self, ids: torch.Tensor, state: list, weights: StepWeights | None = None) -> tuple[torch.Tensor, list]:
        """One character for each of B streams: ids (B,) -> logits (B, V) and the new per-layer state.

        Uses the fused single-step cell kernels on the recurrent layer's weights
        (as ``step_weights`` gives them; pass them in to compute them once):
        calling the full ``nn.LSTM`` per character costs far more in overhead.
        ``state`` is a list with one entry per layer (see ``per_layer``).
        """
        cell = CELL_STEP[self.config.cell]
        weights = weights or self.step_weights()
        if weights.one_hot_input:
            x = F.one_hot(ids, self.vocab_size).to(weights.layers[0][0].dtype)
        else:
            x = self.embedding(ids)
        new_state = []
        for layer_state, layer_weights in zip(state, weights.layers):
            layer_state = cell(x, layer_state, *layer_weights)
            new_state.append(layer_state)
            x = layer_state[0] if isinstance(layer_state, tuple) else layer_state
        return self.readout(x), new_state

    @contextmanager
    def weight_drop(self, generator: torch.Generator | None = None):
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
                keep = torch.rand(w.shape, generator=generator, device="cpu") >= p
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


def per_layer(hidden: Hidden) -> list:
    """(layers, B, H) hidden state -> one entry per layer, as ``CharRNN.step`` takes it."""
    if isinstance(hidden, tuple):
        return list(zip(*(h.unbind(0) for h in hidden)))
    return list(hidden.unbind(0))


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
