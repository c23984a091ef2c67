"""One sampling step of a single stream on the CPU, through numpy's BLAS.

Sampling one stream is a chain of matrix-vector products, and for those
PyTorch's CPU BLAS is slow on the AMD machines we measured: a 2048x1024
product took about 250 µs through ``torch.mv`` and about 85 µs through numpy's
OpenBLAS (docs/BENCHMARKS.md has the figures and commands). For batches the
gap closes and reverses, so ``sample`` uses this only for one stream.

``NumpyStepper`` runs the recurrence of ``CharRNN.step`` on rearranged numpy
copies of the weights, built once per generation:
- the first layer's input product is a row lookup in a per-character table
  (embedding times input weights, plus bias);
- a tied model's projection is folded into the head;
- rows that feed a sigmoid are pre-scaled by 0.5 (exact in floating point), so
  one ``tanh`` over all the gates gives every sigmoid as 0.5 * tanh + 0.5;
- an LSTM's gates are reordered (i, f, o, g) so the three sigmoids are adjacent.
"""

from __future__ import annotations

import numpy as np
import torch

from .charrnn import CharRNN, Hidden


def as_array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32).numpy()


def gate_layout(cell: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(row order, row scale) turning PyTorch's gate rows into the layout ``advance`` reads."""
    if cell == "lstm":  # i, f, g, o -> i, f, o, g; the first three are sigmoids
        order = np.r_[0:2 * size, 3 * size:4 * size, 2 * size:3 * size]
        sigmoid_rows = 3 * size
    else:  # gru: r, z (sigmoids), n; rnn: one tanh
        order = np.arange((3 if cell == "gru" else 1) * size)
        sigmoid_rows = 2 * size if cell == "gru" else 0
    scale = np.ones(len(order), dtype=np.float32)
    scale[:sigmoid_rows] = 0.5
    return order, scale


class NumpyStepper:
    """Advances ``B`` streams one character per call and holds their state.

    Built from a model and its hidden state (as ``nn.LSTM`` and the others
    return it); ``stepper(ids)`` takes a character id or (B,) ids and returns
    (B, V) logits, all numpy.
    """

    def __init__(self, model: CharRNN, hidden: Hidden):
        self.cell, self.size = model.config.cell, model.config.hidden_size
        order, scale = gate_layout(self.cell, self.size)
        self.layers = []
        for weights in model.layer_weights():
            w_ih, w_hh, b_ih, b_hh = (as_array(w)[order] * (scale[:, None] if w.dim() == 2 else scale) for w in weights)
            self.layers.append((w_ih.T, w_hh.T, b_ih, b_hh))  # x @ w.T: BLAS reads a transposed view in place
        w_ih0, w_hh0, b_ih0, b_hh0 = self.layers[0]
        self.input_table = as_array(model.embedding.weight) @ w_ih0 + b_ih0
        self.layers[0] = (None, w_hh0, None, b_hh0)  # the table replaces the first layer's input product
        head = as_array(model.head.weight)
        if model.projection is not None:
            head = head @ as_array(model.projection.weight)
        self.head_t, self.head_bias = head.T.copy(), as_array(model.head.bias)
        if isinstance(hidden, tuple):
            self.h, self.c = [list(as_array(part)) for part in hidden]
        else:
            self.h, self.c = list(as_array(hidden)), None

    def __call__(self, ids: int | np.ndarray) -> np.ndarray:
        x = None
        for layer, (w_ih_t, w_hh_t, b_ih, b_hh) in enumerate(self.layers):
            input_gates = self.input_table[ids] if layer == 0 else x @ w_ih_t + b_ih
            hidden_gates = self.h[layer] @ w_hh_t + b_hh
            x = self.h[layer] = self.advance(layer, input_gates, hidden_gates)
        return x @ self.head_t + self.head_bias

    def advance(self, layer: int, input_gates: np.ndarray, hidden_gates: np.ndarray) -> np.ndarray:
        """The cell's update for one layer on the gate layout above; returns the new h."""
        n, h = self.size, self.h[layer]
        if self.cell == "rnn":
            return np.tanh(input_gates + hidden_gates)
        if self.cell == "gru":
            reset_update = np.tanh(input_gates[:, :2 * n] + hidden_gates[:, :2 * n]) * 0.5 + 0.5
            new = np.tanh(input_gates[:, 2 * n:] + reset_update[:, :n] * hidden_gates[:, 2 * n:])
            return new + reset_update[:, n:] * (h - new)
        gates = np.tanh(input_gates + hidden_gates)
        in_forget_out = gates[:, :3 * n] * 0.5 + 0.5
        c = self.c[layer] = in_forget_out[:, n:2 * n] * self.c[layer] + in_forget_out[:, :n] * gates[:, 3 * n:]
        return in_forget_out[:, 2 * n:] * np.tanh(c)
