"""Continuous batching: one worker thread owns the model and steps every active request together.

A request joins the batch once its prime has run through the model (``sampling.primed``) and leaves
it at a character boundary: when its length is reached, when it is cancelled (its client went away)
or when its time is up. A short prime on the CPU runs in the batch's thread as the request joins
(about a millisecond of numpy steps; numpy's BLAS called from many request threads at once stalled
the batch), a longer one in the caller's thread, so the full recurrent layer's milliseconds never
stall it. Each step is one ``Blocks.step`` over all active rows and one ``choose_rows`` with each
row's own temperature, top-k and top-p. Each request draws its uniforms
``CHUNK`` at a time from its own seeded CPU generator, exactly as ``sampling.pieces`` does for one
stream, and its text is handed over as it is made: the first character at once, then a chunk at a time.

A request's text must not depend on what else is served. A matrix product's rows can round
differently with the number of rows and with their place among them (the BLAS picks its kernels and
splits the rows between threads by the product's size). So the batch is kept in blocks of a fixed
number of rows, each block goes through the model in product calls of its own, always of that
shape, and a row rounds alike in any batch and at any place in its block; the rows a block holds
beyond the active slots compute on stale or zero states and are ignored. On the CPU the blocks are
``CPU_BLOCK`` rows, stepped on numpy arrays or on PyTorch tensors, whichever the engine measures
faster as it starts (``numpy_steps_faster``: it differs from CPU to CPU); with either library,
blocks of 16 rows gave every place the same bits on the 2-core test machines (docs/BENCHMARKS.md;
a test checks both on the machine it runs on, tests/test_serve.py, so a BLAS that behaves
otherwise is caught, not hidden). On a GPU the batch is one block of ``max_slots``
rows: a step there costs about the same for any number of rows.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import numpy as np
import torch

from ..data.vocab import Vocab
from ..device import fastest
from ..model.charrnn import CharRNN, Hidden
from ..model.inference import Array, InferenceWeights, LayerState, Stepper, as_array, inference_weights, per_layer
from ..sampling import CHUNK, RowSettings, SampleSettings, choose_rows, primed, prime_ids, steps_on_numpy
from .limits import MAX_SLOTS, MAX_WAITING

CPU_BLOCK = 16  # rows per block (per product call) on the CPU
NUMPY_MARGIN = 1.15  # numpy must step a block this much faster than PyTorch to be chosen
PADDING = SampleSettings()  # the settings of the ignored padding rows


class EngineBusy(Exception):
    """Every slot is taken and the queue is full (or a request waited past its queue timeout)."""


@dataclass(frozen=True)
class Ending:
    """How a request ended, the characters made and the seconds it was stepped. ``reason``: "length" (all
    made), "time" (its time limit), "cancelled" (its client went away), "busy" (no slot in time),
    "stopped" (the engine stopped) or "error"."""

    reason: str
    length: int
    seconds: float

    @property
    def chars_per_second(self) -> float:
        return self.length / self.seconds if self.seconds > 0 else 0.0


@dataclass(eq=False)
class Job:
    """One request: its prime's ids, its settings (with the seed fixed), and where its text goes.

    ``on_text`` and ``on_end`` are called from the engine's thread; ``on_end`` exactly once."""

    ids: list[int]  # the prime's
    start: tuple[Hidden, torch.Tensor] | None  # the state after a long prime, and its last character (``sampling.primed``)
    settings: SampleSettings
    on_text: Callable[[str], None]
    on_end: Callable[[Ending], None]
    deadline: float  # time.monotonic() by which it must be done
    queue_deadline: float  # time.monotonic() after which, still waiting for a slot, it is refused as busy
    cancelled: bool = False

    def cancel(self) -> None:
        """Leave the batch (or the queue) at the next character boundary; thread-safe."""
        self.cancelled = True


@dataclass(eq=False)
class Slot:
    """A job in the batch: its generator, the current chunk's draws and the ids picked with them.

    ``decode`` is the vocabulary's stream decoder, so a byte model's character split between two
    pieces comes out whole, as ``sampling.pieces`` gives it."""

    job: Job
    started: float
    decode: Callable[[list[int], bool], str]
    generator: torch.Generator = field(init=False)
    uniforms: list[float] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    made: int = 0

    def __post_init__(self):
        self.generator = torch.Generator().manual_seed(self.job.settings.seed)

    def next_uniform(self) -> float:
        if not self.uniforms:  # the chunk is used up (``take`` handed it over): the next one, as sampling.pieces draws it
            self.uniforms = torch.rand(min(CHUNK, self.job.settings.length - self.made), 1, generator=self.generator)[:, 0].tolist()
        return self.uniforms[len(self.ids)]

    def take(self, token: int) -> bool:
        """Add the picked id; hand over the first character at once, then each completed chunk; True once
        the length is reached."""
        self.ids.append(token)
        if len(self.ids) == len(self.uniforms) or self.made == 0:
            self.flush()
        return self.made == self.job.settings.length

    def flush(self, final: bool = False) -> None:
        """Hand over the ids picked so far as text; ``final``: the request ends, nothing is held back."""
        text = self.decode(self.ids, final) if self.ids or final else ""
        if text:
            self.job.on_text(text)
        self.made += len(self.ids)
        self.ids, self.uniforms = [], self.uniforms[len(self.ids):]


def layer_parts(layer: LayerState) -> tuple[Array, ...]:
    """One layer's state arrays: (h, c) for an LSTM, (h,) otherwise."""
    return layer if isinstance(layer, tuple) else (layer,)


class Blocks:
    """The batch's rows in blocks of ``size`` rows, each stepped by a ``Stepper`` of its own (the module
    docstring says why). Row i of the batch is row i % size of block i // size."""

    def __init__(self, weights: InferenceWeights, model: CharRNN, size: int):
        self.weights, self.model, self.size = weights, model, size
        self.numpy = isinstance(weights.head_t, np.ndarray)
        self.steppers: list[Stepper] = []
        self.tokens: list[Array] = []  # each block's last ids, (size,)

    @property
    def rows(self) -> int:
        return len(self.steppers) * self.size

    def fit(self, count: int) -> None:
        """Just enough blocks for ``count`` rows: new ones start from zero states, emptied ones at the end go."""
        wanted = -(-count // self.size)
        del self.steppers[wanted:], self.tokens[wanted:]
        while len(self.steppers) < wanted:
            self.steppers.append(Stepper(self.weights, self.model.init_hidden(self.size, self.model.head.weight.device)))
            zeros = torch.zeros(self.size, dtype=torch.long, device=self.model.head.weight.device)
            self.tokens.append(zeros.numpy() if self.numpy else zeros)

    def parts(self, row: int) -> tuple[int, list[tuple[Array, ...]]]:
        """Where ``row`` lives: its place in its block, and the block's state arrays layer by layer."""
        block, place = divmod(row, self.size)
        return place, [layer_parts(layer) for layer in self.steppers[block].state]

    def put(self, row: int, hidden: Hidden, token: torch.Tensor) -> None:
        """Start ``row`` from a (layers, 1, H) state and its last id (``sampling.primed`` for one stream)."""
        place, layers = self.parts(row)
        for parts, fresh in zip(layers, per_layer(hidden, len(layers))):
            for part, value in zip(parts, layer_parts(fresh)):
                part[place] = as_array(value[0]) if self.numpy else value[0]
        self.tokens[row // self.size][place] = int(token[0])

    def copy(self, source: int, target: int) -> None:
        """Give row ``target`` the state and last id of row ``source``."""
        (source_place, source_layers), (target_place, target_layers) = self.parts(source), self.parts(target)
        for source_parts, target_parts in zip(source_layers, target_layers):
            for source_part, target_part in zip(source_parts, target_parts):
                target_part[target_place] = source_part[source_place]
        self.tokens[target // self.size][target_place] = self.tokens[source // self.size][source_place]

    def step(self) -> torch.Tensor:
        """Every row's logits for its next character, (rows, V), as a tensor on the model's device."""
        logits = [stepper(tokens) for stepper, tokens in zip(self.steppers, self.tokens)]
        if self.numpy:
            return torch.from_numpy(np.concatenate(logits) if len(logits) > 1 else logits[0])
        return torch.cat(logits) if len(logits) > 1 else logits[0]

    def advance(self, tokens: torch.Tensor) -> None:
        """Take the ids picked for every row as each block's last ones."""
        tokens = tokens.numpy() if self.numpy else tokens
        self.tokens = [tokens[start:start + self.size] for start in range(0, len(tokens), self.size)]


def numpy_steps_faster(weights: InferenceWeights, model: CharRNN) -> bool:
    """Whether a block steps clearly faster on numpy's BLAS than on PyTorch's here, measured once (about 0.2 s).

    Which is faster depends on the CPU: on an AMD EPYC a 64-row step took 3.0 ms on numpy (OpenBLAS)
    and 5.3 ms on PyTorch, on an Intel Xeon a 16-row step 1.3-1.5 ms on numpy and 0.7-1.0 ms on
    PyTorch (MKL; docs/BENCHMARKS.md). numpy is timed with PyTorch held to one thread, as the engine
    would then run it, and PyTorch on its own threads.
    """
    on_numpy, on_torch = Blocks(weights.to_numpy(), model, CPU_BLOCK), Blocks(weights, model, CPU_BLOCK)
    on_numpy.fit(CPU_BLOCK)
    on_torch.fit(CPU_BLOCK)
    threads, numpy_seconds, torch_seconds = torch.get_num_threads(), float("inf"), float("inf")
    try:
        for _ in range(3):  # in turns, so that a change of load hits both alike
            torch.set_num_threads(1)
            numpy_seconds = min(numpy_seconds, *fastest([on_numpy.step], 5))
            torch.set_num_threads(threads)
            torch_seconds = min(torch_seconds, *fastest([on_torch.step], 5))
    finally:
        torch.set_num_threads(threads)
    return numpy_seconds * NUMPY_MARGIN < torch_seconds


class Engine:
    """Serves many generation requests at once from one model, in one batch, on one thread.

    ``submit`` queues a request (refusing bad input with ``CharlmError`` and a full queue with
    ``EngineBusy``); ``stream`` is the same for Python callers, as an iterator of text pieces.
    The batch runs in a thread of its own, or with ``in_thread=False`` wherever ``run`` is called:
    ``charlm serve`` runs it on the main thread, where PyTorch's CPU products ran up to twice as
    fast as on another thread (measured on the 2-core test machine, docs/BENCHMARKS.md).

    Where the blocks step on numpy, PyTorch is held to one thread from here to ``stop``: numpy's
    BLAS keeps its own threads, and two pools of threads waiting on the same cores made each step
    three times slower (docs/BENCHMARKS.md); PyTorch is left only the small per-step choice.
    """

    def __init__(self, model: CharRNN, vocab: Vocab, max_slots: int = MAX_SLOTS, max_waiting: int = MAX_WAITING, in_thread: bool = True):
        self.model, self.vocab = model.eval(), vocab
        self.max_slots, self.max_waiting = max_slots, max_waiting
        self.device = model.head.weight.device
        on_cpu = self.device.type == "cpu"
        weights = inference_weights(model)
        self.torch_threads = torch.get_num_threads()
        if on_cpu and numpy_steps_faster(weights, model):
            weights = weights.to_numpy()
            torch.set_num_threads(1)
        self.blocks = Blocks(weights, model, CPU_BLOCK if on_cpu else max_slots)
        self.condition = threading.Condition()
        self.waiting: deque[Job] = deque()
        self.slots: list[Slot] = []
        self.rows: RowSettings | None = None  # rebuilt when a slot joins or leaves
        self.stopping = False
        self.thread = threading.Thread(target=self.run, name="charlm-engine", daemon=True) if in_thread else None
        if self.thread is not None:
            self.thread.start()

    # --- the callers' side (any thread) ---

    def submit(self, prime: str, settings: SampleSettings, on_text: Callable[[str], None],
               on_end: Callable[[Ending], None], time_limit: float = 600.0, queue_timeout: float = 30.0) -> Job:
        """Run the prime (in this thread) and queue the request. A missing seed is drawn here, so
        ``job.settings.seed`` reproduces the text."""
        settings.validate()
        ids = prime_ids(self.vocab, prime)
        seed = settings.seed if settings.seed is not None else secrets.randbits(63)
        self.check_room()  # before the prime's work, and again after it
        start = None
        if not steps_on_numpy(self.device, ids):  # the full recurrent layer's milliseconds run here
            with torch.no_grad():
                start = primed(self.model, ids, 1, self.blocks.weights)
        now = time.monotonic()
        job = Job(ids, start, replace(settings, seed=seed, num_samples=1), on_text, on_end, now + time_limit, now + queue_timeout)
        with self.condition:
            self.check_room()
            self.waiting.append(job)
            self.condition.notify()
        return job

    def check_room(self) -> None:
        if self.stopping:
            raise EngineBusy("the engine is stopping")
        if len(self.waiting) >= self.max_waiting + self.max_slots - len(self.slots):
            raise EngineBusy(f"all {self.max_slots} slots are taken and {len(self.waiting)} requests wait")

    def stream(self, prime: str = "", settings: SampleSettings | None = None, time_limit: float = 600.0) -> Iterator[str]:
        """The continuation of ``prime`` as it is made, served in the batch like any other request."""
        pieces: queue.Queue[str | Ending] = queue.Queue()
        job = self.submit(prime, settings or SampleSettings(), pieces.put, pieces.put, time_limit)
        try:
            while not isinstance(piece := pieces.get(), Ending):
                yield piece
            if piece.reason == "busy":
                raise EngineBusy("no slot became free in time")
        finally:
            job.cancel()

    def load(self) -> dict[str, int]:
        """How busy the engine is: active slots and queued requests, and their limits."""
        return {"active": len(self.slots), "waiting": len(self.waiting), "max_slots": self.max_slots,
                "max_waiting": self.max_waiting}

    def stop(self) -> None:
        """End every request (reason 'stopped') and ``run``; safe from a signal handler."""
        with self.condition:
            self.stopping = True
            self.condition.notify()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()
        torch.set_num_threads(self.torch_threads)

    # --- the batch's thread ---

    def run(self) -> None:
        """Step the batch until ``stop``."""
        with torch.no_grad():  # grad mode is per thread
            while (arrivals := self.next_arrivals()) is not None:
                for job in arrivals:
                    self.admit(job)
                if self.slots:
                    try:
                        self.step()
                    except RuntimeError:  # a failure of the device: these requests fail, later ones start afresh
                        logging.getLogger(__name__).exception("a batch of %d slots failed", len(self.slots))
                        self.fail_all()
        for slot in list(self.slots):
            self.finish(slot, "stopped")
        for job in self.waiting:
            job.on_end(Ending("stopped", 0, 0.0))

    def next_arrivals(self) -> list[Job] | None:
        """The queued jobs that get a slot now (waiting while idle); the expired ones are refused. None once stopping."""
        with self.condition:
            while not (self.stopping or self.slots or self.waiting):
                self.condition.wait()
            if self.stopping:
                return None
            now, arrivals, kept = time.monotonic(), [], deque()
            for job in self.waiting:
                if job.cancelled:
                    job.on_end(Ending("cancelled", 0, 0.0))
                elif len(self.slots) + len(arrivals) < self.max_slots:
                    arrivals.append(job)
                elif now > job.queue_deadline:
                    job.on_end(Ending("busy", 0, 0.0))
                else:
                    kept.append(job)
            self.waiting = kept
            return arrivals

    def admit(self, job: Job) -> None:
        """Put the job's primed state in a new row of the batch."""
        if job.settings.length == 0:
            job.on_end(Ending("length", 0, 0.0))
            return
        self.blocks.fit(len(self.slots) + 1)
        self.blocks.put(len(self.slots), *(job.start or primed(self.model, job.ids, 1, self.blocks.weights)))
        self.slots.append(Slot(job, time.monotonic(), self.vocab.stream_decoder()))
        self.rows = None

    def step(self) -> None:
        """One character for every active slot; the finished ones leave."""
        for slot in [slot for slot in self.slots if slot.job.cancelled]:
            self.finish(slot, "cancelled")
        if not self.slots:
            return
        width, count = self.blocks.rows, len(self.slots)
        if self.rows is None:
            self.rows = RowSettings.of([slot.job.settings for slot in self.slots] + [PADDING] * (width - count),
                                       len(self.vocab), self.device)
        uniform = torch.tensor([slot.next_uniform() for slot in self.slots] + [0.5] * (width - count))
        tokens = choose_rows(self.blocks.step(), uniform.to(self.device), self.rows)
        self.blocks.advance(tokens)
        now = time.monotonic()
        ended = []
        for slot, token in zip(self.slots, tokens[:count].tolist()):
            if slot.take(token):
                ended.append((slot, "length"))
            elif now > slot.job.deadline:
                ended.append((slot, "time"))
        for slot, reason in ended:
            self.finish(slot, reason)

    def fail_all(self) -> None:
        for slot in self.slots:
            slot.job.on_end(Ending("error", slot.made, time.monotonic() - slot.started))
        self.slots, self.rows = [], None
        self.blocks.fit(0)

    def finish(self, slot: Slot, reason: str) -> None:
        """Hand over the slot's last characters and its ending; its row goes to the last slot's."""
        slot.flush(final=True)
        slot.job.on_end(Ending(reason, slot.made, time.monotonic() - slot.started))
        row, last = self.slots.index(slot), len(self.slots) - 1
        if row != last:
            self.blocks.copy(last, row)
            self.slots[row] = self.slots[last]
        self.slots.pop()
        self.blocks.fit(len(self.slots))
        self.rows = None

