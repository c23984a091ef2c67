"""Text generation: temperature, top-k and nucleus (top-p) sampling, streamed as it is made.

The prime goes through the full recurrent layer once, as one stream, and every
stream starts from its state; every further character takes one step of
``model.inference.Stepper``: on numpy arrays for a single stream on the CPU,
on PyTorch tensors otherwise. Random numbers come from one seeded CPU
generator, a chunk of characters at a time, so the same seed gives the same
text on any device, batch layout and length, and the GPU never waits on the
host per step. ``stream`` yields the text as it is made and holds nothing that
grows with the length; ``generate`` collects it. Both refuse up front a batch
(or, for ``generate``, texts) too large for the memory available.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from .data.vocab import Vocab, describe_chars
from .errors import CharlmError
from .model.charrnn import GATES, CharRNN, Hidden, map_hidden
from .model.inference import InferenceWeights, Stepper, inference_weights, stacked

SHORT_PRIME = 64  # a one-stream CPU prime up to this long steps through numpy (``primed``)
CHUNK = 16  # characters per draw of uniforms, per copy of picked ids off the device, per piece of text
# The memory estimate of ``memory_pools``:
GATE_BUFFERS = 6
CHOICE_BUFFERS = 12
CHUNK_CHAR_BYTES = 64  # per stream and chunk character: its draw (4), its id on the device and stacked (8 + 8), in a Python list (8 + 28), decoded (4), rounded up
POINTER_BYTES = 8


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
        if not 0 <= self.temperature < math.inf:
            raise CharlmError(f"--temperature must be a finite number, 0 (greedy) or more, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise CharlmError(f"--top-k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise CharlmError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.num_samples < 1:
            raise CharlmError(f"--num-samples must be at least 1, got {self.num_samples}")


@dataclass(frozen=True)
class RowSettings:
    """Each stream's own temperature, top-k and top-p, as (B, 1) columns on the device: a batch whose
    streams sample differently (a server's requests). What no row uses is None, so it costs nothing."""

    temperature: torch.Tensor  # (B, 1); a greedy row holds 1 (its pick is the argmax either way)
    greedy: torch.Tensor | None  # (B,) True for the rows at temperature 0; None where none is
    all_greedy: bool
    top_k: torch.Tensor | None  # (B, 1) k per row, the vocabulary size where a row keeps all; None where none filters
    widest_k: int  # the largest k of any row
    top_p: torch.Tensor | None  # (B, 1) p per row, 1 where a row keeps all; None where none filters

    @classmethod
    def of(cls, rows: list[SampleSettings], vocab_size: int, device: torch.device | str = "cpu") -> RowSettings:
        def column(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device).unsqueeze(-1)

        greedy = [row.temperature == 0 for row in rows]
        top_k = [vocab_size if row.top_k is None else min(row.top_k, vocab_size) for row in rows]
        top_p = [1.0 if row.top_p is None else row.top_p for row in rows]
        return cls(temperature=column([1.0 if g else row.temperature for g, row in zip(greedy, rows)], torch.float32),
                   greedy=column(greedy, torch.bool).squeeze(-1) if any(greedy) else None, all_greedy=all(greedy),
                   top_k=column(top_k, torch.long) if min(top_k) < vocab_size else None, widest_k=max(top_k),
                   top_p=column(top_p, torch.float32) if min(top_p) < 1.0 else None)


def filter_rows(probs: torch.Tensor, rows: RowSettings) -> torch.Tensor:
    """Zero out, in each row, all but its top-k and/or the smallest set whose mass reaches its top-p."""
    if rows.top_k is not None:
        k = rows.top_k.expand(len(probs), 1)
        kth = probs.topk(rows.widest_k, dim=-1).values.gather(-1, k - 1)
        probs = probs.masked_fill(probs < kth, 0.0)
    if rows.top_p is not None:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        limit = torch.where(rows.top_p < 1.0, rows.top_p * sorted_probs.sum(-1, keepdim=True), torch.inf)
        sorted_probs = sorted_probs.masked_fill(mass_before >= limit, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs


def filter_probs(probs: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """``filter_rows`` with one top-k and top-p for every row."""
    return filter_rows(probs, RowSettings.of([SampleSettings(top_k=top_k, top_p=top_p)], probs.size(-1), probs.device))


def choose_rows(logits: torch.Tensor, uniform: torch.Tensor, rows: RowSettings) -> torch.Tensor:
    """Pick one id per row by inverse-CDF sampling with the given uniform draws, each row with its own settings."""
    if rows.all_greedy:
        return logits.argmax(-1)
    probs = filter_rows(torch.softmax(logits.float() / rows.temperature, dim=-1), rows)
    cdf = probs.cumsum(-1)
    picks = torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(-1)).squeeze(-1).clamp_(max=logits.size(-1) - 1)
    return picks if rows.greedy is None else torch.where(rows.greedy, logits.argmax(-1), picks)


def choose(logits: torch.Tensor, uniform: torch.Tensor, settings: SampleSettings) -> torch.Tensor:
    """``choose_rows`` with one setting for every row."""
    return choose_rows(logits, uniform, RowSettings.of([settings], logits.size(-1), logits.device))


def choose_one(logits: np.ndarray, uniform: float, settings: SampleSettings, rows: RowSettings) -> int:
    """``choose`` for a single stream's numpy logits (V,), in numpy: a few microseconds where
    PyTorch's small-tensor calls cost tens. The filtered cases go through ``choose_rows`` with
    ``rows``, the same settings built once for the stream."""
    if settings.top_k is not None or settings.top_p is not None:
        return int(choose_rows(torch.from_numpy(logits)[None], torch.tensor([uniform]), rows))
    if settings.temperature == 0:
        return int(logits.argmax())
    cdf = np.cumsum(np.exp((logits - logits.max()) / settings.temperature))
    return min(int(np.searchsorted(cdf, uniform * cdf[-1])), len(cdf) - 1)


class TorchSampler:
    """Any batch on any device: ``Stepper`` on the bundle's tensors, and ``choose``.

    Tokens stay on the device; ``run`` copies a chunk's ids out once, so a GPU is not
    synchronised per character."""

    def __init__(self, weights: InferenceWeights, hidden: Hidden, tokens: torch.Tensor, settings: SampleSettings):
        self.step, self.tokens = Stepper(weights, hidden), tokens
        self.rows = RowSettings.of([settings], weights.head_t.shape[-1], tokens.device)

    def run(self, uniforms: torch.Tensor) -> list[list[int]]:
        """Advance one character per row of ``uniforms`` (n, B); the chosen ids, per stream."""
        picked = []
        for uniform in uniforms:
            self.tokens = choose_rows(self.step(self.tokens), uniform, self.rows)
            picked.append(self.tokens)
        return torch.stack(picked, 1).tolist()


class NumpySampler:
    """One stream on the CPU: ``Stepper`` on the bundle's numpy arrays and ``choose_one``, with no
    PyTorch call per character."""

    def __init__(self, weights: InferenceWeights, hidden: Hidden, tokens: torch.Tensor, settings: SampleSettings):
        self.step, self.token, self.settings = Stepper(weights.to_numpy(), hidden), int(tokens[0]), settings
        self.rows = RowSettings.of([settings], weights.head_t.shape[-1])

    def run(self, uniforms: torch.Tensor) -> list[list[int]]:
        picked = []
        for uniform in uniforms[:, 0].tolist():
            self.token = choose_one(self.step(self.token)[0], uniform, self.settings, self.rows)
            picked.append(self.token)
        return [picked]


def sampler(weights: InferenceWeights, hidden: Hidden, tokens: torch.Tensor,
            settings: SampleSettings) -> TorchSampler | NumpySampler:
    """The faster path from ``hidden`` and the last ``tokens`` on: numpy for one stream on the
    CPU (its matrix-vector products are faster there), PyTorch otherwise."""
    if tokens.device.type == "cpu" and len(tokens) == 1:
        return NumpySampler(weights, hidden, tokens, settings)
    return TorchSampler(weights, hidden, tokens, settings)


def prime_ids(vocab: Vocab, prime: str) -> list[int]:
    """The prime's ids; an empty prime starts from a line break, as a text would, without printing it."""
    surrogates = [] if prime.isascii() else [char for char in dict.fromkeys(prime) if "\ud800" <= char <= "\udfff"]
    if surrogates:
        raise CharlmError(f"the prime text holds lone surrogates, which are not characters: {describe_chars(surrogates)}; remove them")
    missing = vocab.unknown(prime)
    if missing:
        raise CharlmError(f"the prime text has characters the model never saw: {describe_chars(missing)}; remove them")
    if not prime:
        return [int(vocab.encode("\n")[0])] if "\n" in vocab else [0]
    return vocab.encode(prime).tolist()


def steps_on_numpy(device: torch.device, ids: list[int]) -> bool:
    """Whether ``primed`` steps this prime through numpy: a short one on the CPU."""
    return device.type == "cpu" and len(ids) <= SHORT_PRIME


def primed(model: CharRNN, ids: list[int], batch: int, weights: InferenceWeights) -> tuple[Hidden, torch.Tensor]:
    """The state after all but the last prime character and that last character, for ``batch`` streams.

    The prime runs once, as one stream, and every stream starts from its state (a broadcast view:
    nothing is copied per stream). On the CPU a prime of up to ``SHORT_PRIME`` characters steps
    through ``weights`` (``model``'s ``inference_weights``) on numpy, as one stream samples; a longer
    one, or one on another device, goes through the full recurrent layer, which costs milliseconds
    to set up on the CPU but reads a long text far faster.
    """
    device = model.head.weight.device
    context = torch.tensor([ids], device=device)
    if len(ids) == 1:
        hidden = model.init_hidden(1, device)
    elif steps_on_numpy(device, ids):
        step = Stepper(weights.to_numpy(), model.init_hidden(1, device))
        for token in ids[:-1]:
            step(token)
        hidden = stacked(step.state)
    else:
        hidden = model(context[:, :-1])[1]
    return map_hidden(lambda part: part.expand(-1, batch, -1), hidden), context[0, -1:].expand(batch)


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new allocations on ``device`` (its host's for the CPU and MPS), None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass(frozen=True)
class MemoryPool:
    """Memory one kind of allocation draws from, and what one stream takes of it."""

    name: str
    available: int
    per_stream: int  # bytes a stream holds while it runs
    per_char: int  # bytes each character of held text adds to a stream (0 where nothing is held)

    def streams_that_fit(self, length: int) -> int:
        return self.available // (self.per_stream + length * self.per_char)


def memory_pools(model: CharRNN, vocab: Vocab, hold_text: bool) -> list[MemoryPool]:
    """What one stream needs, an estimate kept simple and a little generous.

    On the device, a stream holds its recurrent state (twice: the old and the new during a step),
    its gate activations (``GATE_BUFFERS`` vectors as wide as all gates of one layer: the table row,
    the hidden product and its bias, their sum, its tanh, the sigmoids), ``CHOICE_BUFFERS`` vectors
    as wide as the vocabulary for the logits and the probabilities the choice derives from them, and
    a chunk's draws and picked ids. On the host, the chunk again as Python objects (ids in lists,
    decoded pieces) and, when the texts are held to be returned, every character twice (as
    ``CHUNK``-long pieces with their string headers, then joined). The weights are not counted: they
    are already in memory, and a stream does not grow them. On the CPU the two pools are one.
    """
    config, item = model.config, model.head.weight.element_size()
    state_parts = 2 if config.cell == "lstm" else 1
    state = 2 * config.layers * state_parts * config.hidden_size * item
    gates = GATE_BUFFERS * GATES[config.cell] * config.hidden_size * item
    choice = CHOICE_BUFFERS * len(vocab) * item
    chunk = CHUNK * CHUNK_CHAR_BYTES
    widest = max(vocab.chars)  # the highest code point sets how wide a Python string stores each character
    char_bytes = sys.getsizeof(widest * 2) - sys.getsizeof(widest)
    held = char_bytes + -(-(sys.getsizeof(widest * CHUNK) + POINTER_BYTES) // CHUNK) if hold_text else 0
    device = model.head.weight.device
    host = available_memory(torch.device("cpu"))
    if device.type != "cuda":
        return [] if host is None else [MemoryPool("memory", host, state + gates + choice + chunk, held)]
    pools = [MemoryPool(f"{device} memory", available_memory(device), state + gates + choice + chunk, 0)]
    return pools + ([] if host is None else [MemoryPool("host memory", host, chunk, held)])


def check_memory(model: CharRNN, vocab: Vocab, settings: SampleSettings, hold_text: bool) -> None:
    """Refuse, before anything is allocated, a batch or held text that cannot fit in memory.

    The error names the most samples of this length that fit or, where not even one does, the
    longest length that fits.
    """
    pools = memory_pools(model, vocab, hold_text)
    batch, length = settings.num_samples, settings.length
    for pool in pools:
        need = batch * (pool.per_stream + length * pool.per_char)
        if need <= pool.available:
            continue
        asked = (f"{batch:,} sample{'s' if batch > 1 else ''} of {length:,} characters need about "
                 f"{describe_bytes(need)} of {pool.name} and {describe_bytes(pool.available)} is available")
        most = min(other.streams_that_fit(length) for other in pools)
        raise CharlmError(f"{asked}: {largest_that_fits(pools, settings, most)}")


def largest_that_fits(pools: list[MemoryPool], settings: SampleSettings, most: int) -> str:
    """The limit to name in a refusal: the most samples of the asked length, else the longest length."""
    if most >= 1:
        return f"at most {most:,} samples of {settings.length:,} characters fit (--num-samples)"
    streams = settings.num_samples if all(settings.num_samples * pool.per_stream < pool.available for pool in pools) else 1
    longest = min((pool.available // streams - pool.per_stream) // pool.per_char for pool in pools if pool.per_char)
    return (f"at most {max(longest, 0):,} characters a sample fit for {streams:,} sample{'s' if streams > 1 else ''} "
            f"(--length); several samples are held until they end, while one sample streams in constant memory")


def describe_bytes(size: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:,.0f} {unit}" if unit == "bytes" else f"{size:,.1f} {unit}"
        size /= 1000
    return f"{size:,.1f} TB"


def checked(model: CharRNN, vocab: Vocab, prime: str, settings: SampleSettings | None,
            hold_text: bool) -> tuple[list[int], SampleSettings]:
    """The prime's ids and the settings, once both are valid and the batch fits in memory."""
    settings = settings or SampleSettings()
    settings.validate()
    ids = prime_ids(vocab, prime)
    check_memory(model, vocab, settings, hold_text)
    return ids, settings


@torch.no_grad()
def pieces(model: CharRNN, vocab: Vocab, ids: list[int], settings: SampleSettings) -> Iterator[list[str]]:
    """Every ``CHUNK`` characters, the next piece of text of each stream: nothing grows with the length.

    The uniform draws come ``CHUNK`` rows at a time from one seeded CPU generator, which gives the
    same numbers as one draw of the whole length would.
    """
    model.eval()
    batch, device = settings.num_samples, model.head.weight.device
    generator = torch.Generator().manual_seed(settings.seed if settings.seed is not None else torch.seed())
    weights = inference_weights(model)
    hidden, tokens = primed(model, ids, batch, weights)
    chunks = sampler(weights, hidden, tokens, settings)
    decoders = [vocab.stream_decoder() for _ in range(batch)]  # a byte model's character may span two chunks
    for start in range(0, settings.length, CHUNK):
        uniforms = torch.rand(min(CHUNK, settings.length - start), batch, generator=generator)
        last = start + CHUNK >= settings.length
        yield [decode(row, last) for decode, row in zip(decoders, chunks.run(uniforms.to(device)))]


def stream(model: CharRNN, vocab: Vocab, prime: str = "", settings: SampleSettings | None = None) -> Iterator[list[str]]:
    """``settings.num_samples`` continuations of ``prime`` (without it), as they are made: an iterator of
    lists holding each stream's next piece. Bad settings, an unknown prime character and a batch that
    cannot fit in memory are refused here, before the first piece; the length has no limit."""
    ids, settings = checked(model, vocab, prime, settings, hold_text=False)
    return pieces(model, vocab, ids, settings)


def generate(model: CharRNN, vocab: Vocab, prime: str = "", settings: SampleSettings | None = None,
             on_text: Callable[[int, str], None] | None = None) -> list[str]:
    """Generate ``settings.num_samples`` continuations of ``prime`` (returned without the prime).

    ``on_text(sample_index, text)`` receives the text as it is produced. The texts are held to be
    returned, so a length or batch whose texts cannot fit in memory is refused up front.
    """
    ids, settings = checked(model, vocab, prime, settings, hold_text=True)
    held: list[list[str]] = [[] for _ in range(settings.num_samples)]
    for chunk in pieces(model, vocab, ids, settings):
        for index, piece in enumerate(chunk):
            held[index].append(piece)
            if on_text is not None:
                on_text(index, piece)
    return ["".join(texts) for texts in held]
