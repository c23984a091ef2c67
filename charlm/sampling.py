"""Text generation: temperature, top-k and nucleus (top-p) sampling, streamed as it is made.

The prime goes through the full recurrent layer in one call; every further
character takes one step: numpy's BLAS for a single stream on the CPU (see
``numpy_step``), the fused cell kernels of ``CharRNN.step`` otherwise. Random
numbers come from one seeded CPU generator, drawn up front, so the same seed
gives the same text on any device and batch layout, and the GPU never waits on
the host per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .data.vocab import Vocab, describe_chars
from .errors import CharlmError
from .model.charrnn import CharRNN, Hidden, per_layer
from .model.inference import NumpyStepper


@dataclass
class SampleSettings:
    length: int = 500
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    num_samples: int = 1

    def validate(self) -> None:
        if self.length < 0:
            raise CharlmError(f"--length must be 0 or more, got {self.length}")
        if self.temperature < 0:
            raise CharlmError(f"--temperature must be 0 (greedy) or more, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise CharlmError(f"--top-k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise CharlmError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.num_samples < 1:
            raise CharlmError(f"--num-samples must be at least 1, got {self.num_samples}")


def filter_probs(probs: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Zero out all but the top-k and/or the smallest set whose mass reaches top-p."""
    if top_k is not None and top_k < probs.size(-1):
        kth = probs.topk(top_k, dim=-1).values[:, -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p * sorted_probs.sum(-1, keepdim=True), 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs


def choose(logits: torch.Tensor, uniform: torch.Tensor, settings: SampleSettings) -> torch.Tensor:
    """Pick one id per row by inverse-CDF sampling with the given uniform draws."""
    if settings.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / settings.temperature, dim=-1)
    probs = filter_probs(probs, settings.top_k, settings.top_p)
    cdf = probs.cumsum(-1)
    picks = torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
    return picks.clamp_(max=logits.size(-1) - 1)


def choose_one(logits: np.ndarray, uniform: float, settings: SampleSettings) -> int:
    """``choose`` for a single stream's numpy logits (V,), in numpy: a few microseconds where
    PyTorch's small-tensor calls cost tens. The filtered cases go through ``choose`` itself."""
    if settings.top_k is not None or settings.top_p is not None:
        return int(choose(torch.from_numpy(logits)[None], torch.tensor([uniform]), settings))
    if settings.temperature == 0:
        return int(logits.argmax())
    cdf = np.cumsum(np.exp((logits - logits.max()) / settings.temperature))
    return min(int(np.searchsorted(cdf, uniform * cdf[-1])), len(cdf) - 1)


class TorchSampler:
    """Any batch on any device: ``CharRNN.step`` (the fused cell kernels) and ``choose``.

    Tokens stay on the device; ``run`` copies a chunk's ids out once, so a GPU is not
    synchronised per character."""

    def __init__(self, model: CharRNN, hidden: Hidden, tokens: torch.Tensor, settings: SampleSettings):
        self.model, self.state, self.weights = model, per_layer(hidden), model.step_weights()
        self.tokens, self.settings = tokens, settings

    def run(self, uniforms: torch.Tensor) -> list[list[int]]:
        """Advance one character per row of ``uniforms`` (n, B); the chosen ids, per stream."""
        picked = []
        for uniform in uniforms:
            logits, self.state = self.model.step(self.tokens, self.state, self.weights)
            self.tokens = choose(logits, uniform, self.settings)
            picked.append(self.tokens)
        return torch.stack(picked, 1).tolist()


class NumpySampler:
    """One stream on the CPU: ``NumpyStepper`` and ``choose_one``, with no PyTorch call per character."""

    def __init__(self, model: CharRNN, hidden: Hidden, tokens: torch.Tensor, settings: SampleSettings):
        self.step, self.token, self.settings = NumpyStepper(model, hidden), int(tokens[0]), settings

    def run(self, uniforms: torch.Tensor) -> list[list[int]]:
        picked = []
        for uniform in uniforms[:, 0].tolist():
            self.token = choose_one(self.step(self.token)[0], uniform, self.settings)
            picked.append(self.token)
        return [picked]


def sampler(model: CharRNN, hidden: Hidden, tokens: torch.Tensor, settings: SampleSettings) -> TorchSampler | NumpySampler:
    """The faster path from ``hidden`` and the last ``tokens`` on: numpy for one stream on the
    CPU (see ``numpy_step``), PyTorch otherwise."""
    if tokens.device.type == "cpu" and len(tokens) == 1:
        return NumpySampler(model, hidden, tokens, settings)
    return TorchSampler(model, hidden, tokens, settings)


def prime_ids(vocab: Vocab, prime: str) -> list[int]:
    missing = vocab.unknown(prime)
    if missing:
        raise CharlmError(f"the prime text has characters the model never saw: {describe_chars(missing)}; remove them")
    return vocab.encode(prime).tolist()


@torch.no_grad()
def generate(model: CharRNN, vocab: Vocab, prime: str = "", settings: SampleSettings | None = None,
             on_text: Callable[[int, str], None] | None = None, flush_every: int = 16) -> list[str]:
    """Generate ``settings.num_samples`` continuations of ``prime`` (returned without the prime).

    ``on_text(sample_index, text)`` receives the text as it is produced.
    """
    settings = settings or SampleSettings()
    settings.validate()
    device = next(model.parameters()).device
    model.eval()
    ids = prime_ids(vocab, prime)
    if not ids:  # start from a line break, as a text would, without printing it
        ids = [vocab.encode("\n")[0]] if "\n" in vocab else [0]
    batch = settings.num_samples
    generator = torch.Generator().manual_seed(settings.seed if settings.seed is not None else torch.seed())
    uniforms = torch.rand(settings.length, batch, generator=generator).to(device)

    context = torch.tensor([ids] * batch, device=device)
    hidden = None
    if len(ids) > 1:
        _, hidden = model(context[:, :-1], hidden)
    if hidden is None:
        hidden = model.init_hidden(batch, device)
    chunks = sampler(model, hidden, context[:, -1], settings)
    texts = [""] * batch
    for start in range(0, settings.length, flush_every):
        for b, row in enumerate(chunks.run(uniforms[start:start + flush_every])):
            piece = vocab.decode(row)
            texts[b] += piece
            if on_text is not None:
                on_text(b, piece)
    return texts
