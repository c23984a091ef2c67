"""The weights and the recurrence that sampling steps through, one character at a time.

``inference_weights`` turns a ``CharRNN`` into one ``InferenceWeights`` bundle,
built once per generation; ``Stepper`` advances streams one character per call
on that bundle. The same code runs on PyTorch tensors (any batch, any device)
and on numpy arrays (``InferenceWeights.to_numpy``: one stream on the CPU,
where numpy's BLAS computes a matrix-vector product faster than PyTorch's, see
docs/BENCHMARKS.md): both libraries share ``@``, slicing, ``+``, ``*`` and
``tanh``. The bundle differs from the module's parameters in four ways:

- the embedding is folded into the first layer's input product: a table with
  one row per character (embedding times input weights, plus the input bias),
  so that product is a row lookup;
- the matrices are transposed (``x @ w``) and stored so, row by row: read through a transposed
  view, a 16-row product took 1.6-2.5 times as long on an Intel Xeon (docs/BENCHMARKS.md);
- rows that feed a sigmoid are pre-scaled by 0.5 (exact in floating point), so
  one ``tanh`` over all the gates gives every sigmoid as 0.5 * tanh + 0.5, and
  an LSTM's gates are reordered (i, f, o, g) so the three sigmoids are adjacent;
- a tied model's projection is folded into the head.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable

import numpy as np
import torch

from .charrnn import CharRNN, Hidden, map_hidden

Array = Any  # a torch.Tensor or a numpy.ndarray: the recurrence below is written for both
LayerState = Any  # one layer's state, as ``Hidden`` holds it: (h, c) for an LSTM, h otherwise


@dataclass(frozen=True)
class LayerWeights:
    """One recurrent layer, in the gate layout of the module docstring; the first layer has no input product."""

    input_t: Array | None  # (input width, gates): None for the first layer, whose input comes from the table
    input_bias: Array | None
    hidden_t: Array  # (hidden, gates)
    hidden_bias: Array


@dataclass(frozen=True)
class InferenceWeights:
    """Everything a step reads, as PyTorch tensors on the model's device or (``to_numpy``) numpy arrays."""

    cell: str
    input_table: Array  # (vocabulary, gates): the first layer's input gates for each character
    layers: list[LayerWeights]
    head_t: Array  # (hidden, vocabulary)
    head_bias: Array

    def to_numpy(self) -> InferenceWeights:
        """The same bundle as fp32 numpy arrays on the CPU (sharing the tensors' memory where it can)."""
        return replace(self, input_table=as_array(self.input_table), head_t=as_array(self.head_t),
                       head_bias=as_array(self.head_bias),
                       layers=[LayerWeights(*(as_array(getattr(layer, f.name)) for f in fields(layer))) for layer in self.layers])


def as_array(tensor: torch.Tensor | np.ndarray | None) -> np.ndarray | None:
    if tensor is None or isinstance(tensor, np.ndarray):
        return tensor
    return tensor.detach().to("cpu", torch.float32).numpy()


def gate_layout(cell: str, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row order, row scale) turning PyTorch's gate rows into the layout ``CELL_UPDATE`` reads."""
    if cell == "lstm":  # i, f, g, o -> i, f, o, g; the first three are sigmoids
        order = torch.cat([torch.arange(0, 2 * size), torch.arange(3 * size, 4 * size), torch.arange(2 * size, 3 * size)])
        sigmoid_rows = 3 * size
    else:  # gru: r, z (sigmoids), n; rnn: one tanh
        order = torch.arange((3 if cell == "gru" else 1) * size)
        sigmoid_rows = 2 * size if cell == "gru" else 0
    scale = torch.ones(len(order))
    scale[:sigmoid_rows] = 0.5
    return order.to(device), scale.to(device)


@torch.no_grad()
def inference_weights(model: CharRNN) -> InferenceWeights:
    """The bundle of ``model``'s current weights (a copy: later training does not change it)."""
    rnn, cell = model.rnn, model.config.cell
    order, scale = gate_layout(cell, model.config.hidden_size, model.head.weight.device)

    def laid_out(name: str, layer: int) -> torch.Tensor:
        weight = getattr(rnn, f"{name}_l{layer}")[order]
        return weight * (scale[:, None] if weight.dim() == 2 else scale)

    layers = [LayerWeights(laid_out("weight_ih", layer).t().contiguous(), laid_out("bias_ih", layer),
                           laid_out("weight_hh", layer).t().contiguous(), laid_out("bias_hh", layer))
              for layer in range(model.config.layers)]
    first = layers[0]
    input_table = model.embedding.weight @ first.input_t + first.input_bias
    layers[0] = replace(first, input_t=None, input_bias=None)
    head = model.head.weight if model.projection is None else model.head.weight @ model.projection.weight
    return InferenceWeights(cell, input_table, layers, head.t().contiguous(), model.head.bias.clone())


def rnn_update(input_gates: Array, h: LayerState, weights: LayerWeights, tanh: Callable) -> tuple[Array, LayerState]:
    h = tanh(input_gates + (h @ weights.hidden_t + weights.hidden_bias))
    return h, h


def gru_update(input_gates: Array, h: LayerState, weights: LayerWeights, tanh: Callable) -> tuple[Array, LayerState]:
    n = h.shape[-1]
    hidden_gates = h @ weights.hidden_t + weights.hidden_bias
    reset_update = tanh(input_gates[..., :2 * n] + hidden_gates[..., :2 * n]) * 0.5 + 0.5
    new = tanh(input_gates[..., 2 * n:] + reset_update[..., :n] * hidden_gates[..., 2 * n:])
    h = new + reset_update[..., n:] * (h - new)
    return h, h


def lstm_update(input_gates: Array, state: LayerState, weights: LayerWeights, tanh: Callable) -> tuple[Array, LayerState]:
    h, c = state
    n = h.shape[-1]
    gates = tanh(input_gates + (h @ weights.hidden_t + weights.hidden_bias))
    in_forget_out = gates[..., :3 * n] * 0.5 + 0.5
    c = in_forget_out[..., n:2 * n] * c + in_forget_out[..., :n] * gates[..., 3 * n:]
    h = in_forget_out[..., 2 * n:] * tanh(c)
    return h, (h, c)


# One layer's step on the gate layout above: (input gates, state, weights, tanh) -> (output h, new state).
CELL_UPDATE = {"rnn": rnn_update, "gru": gru_update, "lstm": lstm_update}


def per_layer(hidden: Hidden, layers: int) -> list[LayerState]:
    """A (layers, B, H) hidden state, as ``nn.LSTM`` and the others return it, as one entry per layer."""
    return [map_hidden(lambda part: part[layer], hidden) for layer in range(layers)]


def stacked(state: list[LayerState]) -> Hidden:
    """The inverse of ``per_layer``: one entry per layer (tensors or numpy arrays) as a (layers, B, H) tensor state."""
    def stack(parts: list[Array]) -> torch.Tensor:
        return torch.stack([torch.as_tensor(part) for part in parts])

    if isinstance(state[0], tuple):
        return tuple(stack(parts) for parts in zip(*state))
    return stack(state)


class Stepper:
    """Advances B streams one character per call and holds their state.

    ``weights`` are an ``InferenceWeights`` of tensors or of numpy arrays (then
    ``hidden`` is converted to numpy too); ``stepper(ids)`` takes (B,) ids, or one
    int for a single stream, and returns (B, V) logits of the same library.
    """

    def __init__(self, weights: InferenceWeights, hidden: Hidden):
        self.weights, self.update = weights, CELL_UPDATE[weights.cell]
        numpy = isinstance(weights.head_t, np.ndarray)
        self.tanh = np.tanh if numpy else torch.tanh
        self.state = per_layer(map_hidden(as_array, hidden) if numpy else hidden, len(weights.layers))

    def __call__(self, ids: int | Array) -> Array:
        x = None
        for layer, weights in enumerate(self.weights.layers):
            input_gates = self.weights.input_table[ids] if layer == 0 else x @ weights.input_t + weights.input_bias
            x, self.state[layer] = self.update(input_gates, self.state[layer], weights, self.tanh)
        return x @ self.weights.head_t + self.weights.head_bias
