"""Continuous batching: one worker thread owns the model and steps every active request together.

A request joins the batch once its prime has run through the model (``sampling.primed``, in the
caller's thread, so a new request never stalls the batch) and leaves it at a character boundary: when its length is reached, when it is cancelled (its
client went away) or when its time is up. Each step is one ``Stepper`` call over all active rows and
one ``choose_rows`` with each row's own temperature, top-k and top-p. Each request draws its uniforms
``CHUNK`` at a time from its own seeded CPU generator, exactly as ``sampling.pieces`` does for one
stream, and its text is handed over as it is made: the first character at once, then a chunk at a time.

A request's text must not depend on what else is served. A matrix product's rows can round
differently with the number of rows (the BLAS picks other kernels, and splits a small product
across threads differently): measured on the 2-core test machine, products of 1-3, 5-7 and 9-11
rows each round differently from those of 4, 8 and 12 or more rows, which all agree bit for bit. So
the batch is padded to a multiple of ``ROW_BLOCK`` rows, and every row rounds as it would in any
other batch; the padding rows compute on zeros and are ignored. A test checks this on the machine
it runs on (tests/test_serve.py), so a BLAS that behaves otherwise is caught, not hidden.
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

import torch

from ..data.vocab import Vocab
from ..model.charrnn import CharRNN, Hidden, map_hidden
from ..model.inference import LayerState, Stepper, inference_weights, per_layer
from ..sampling import CHUNK, RowSettings, SampleSettings, choose_rows, primed, prime_ids

ROW_BLOCK = 4  # the batch's row count is a multiple of this
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

    start: tuple[Hidden, torch.Tensor]  # the state after the prime, and its last character (``sampling.primed``)
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


def batch_rows(count: int) -> int:
    """The rows a batch of ``count`` slots is computed with: the next multiple of ``ROW_BLOCK`` (at least one block)."""
    return max(1, -(-count // ROW_BLOCK)) * ROW_BLOCK


def layer_parts(layer: LayerState) -> tuple[torch.Tensor, ...]:
    """One layer's state tensors: (h, c) for an LSTM, (h,) otherwise."""
    return layer if isinstance(layer, tuple) else (layer,)


def resized(part: torch.Tensor, rows: int) -> torch.Tensor:
    """``part`` (B, H) cut or padded with zero rows to ``rows`` rows."""
    if rows <= len(part):
        return part[:rows]
    return torch.cat([part, part.new_zeros(rows - len(part), part.shape[-1])])


class Engine:
    """Serves many generation requests at once from one model, in one batch, on one thread.

    ``submit`` queues a request (refusing bad input with ``CharlmError`` and a full queue with
    ``EngineBusy``); ``stream`` is the same for Python callers, as an iterator of text pieces.
    The batch runs in a thread of its own, or with ``in_thread=False`` wherever ``run`` is called:
    ``charlm serve`` runs it on the main thread, where PyTorch's CPU products run up to twice as
    fast as on another thread (measured on the 2-core test machine, docs/BENCHMARKS.md).
    """

    def __init__(self, model: CharRNN, vocab: Vocab, max_slots: int = 64, max_waiting: int = 64, in_thread: bool = True):
        self.model, self.vocab = model.eval(), vocab
        self.max_slots, self.max_waiting = max_slots, max_waiting
        self.weights = inference_weights(model)
        self.device = model.head.weight.device
        self.condition = threading.Condition()
        self.waiting: deque[Job] = deque()
        self.slots: list[Slot] = []
        self.stepper: Stepper | None = None
        self.tokens = torch.zeros(0, dtype=torch.long, device=self.device)
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
        with torch.no_grad():
            start = primed(self.model, ids, 1)
        now = time.monotonic()
        job = Job(start, replace(settings, seed=seed, num_samples=1), on_text, on_end, now + time_limit, now + queue_timeout)
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
        hidden, token = job.start
        row = len(self.slots)
        self.fit(row + 1)
        for layer, fresh in zip(self.stepper.state, per_layer(hidden, len(self.weights.layers))):
            for part, value in zip(layer_parts(layer), layer_parts(fresh)):
                part[row] = value[0]
        self.tokens[row] = token[0]
        self.slots.append(Slot(job, time.monotonic(), self.vocab.stream_decoder()))
        self.rows = None

    def fit(self, count: int) -> None:
        """Size the batch for ``count`` slots: the next multiple of ``ROW_BLOCK`` rows."""
        width = batch_rows(count)
        if width == len(self.tokens):
            return
        if self.stepper is None:
            self.stepper = Stepper(self.weights, self.model.init_hidden(width, self.device))
        else:
            self.stepper.state = [map_hidden(lambda part: resized(part, width), layer) for layer in self.stepper.state]
        self.tokens = resized(self.tokens[:, None], width)[:, 0].contiguous()

    def step(self) -> None:
        """One character for every active slot; the finished ones leave."""
        for slot in [slot for slot in self.slots if slot.job.cancelled]:
            self.finish(slot, "cancelled")
        if not self.slots:
            return
        width, count = len(self.tokens), len(self.slots)
        if self.rows is None:
            self.rows = RowSettings.of([slot.job.settings for slot in self.slots] + [PADDING] * (width - count),
                                       len(self.vocab), self.device)
        uniform = torch.tensor([slot.next_uniform() for slot in self.slots] + [0.5] * (width - count))
        self.tokens = choose_rows(self.stepper(self.tokens), uniform.to(self.device), self.rows)
        now = time.monotonic()
        ended = []
        for slot, token in zip(self.slots, self.tokens[:count].tolist()):
            if slot.take(token):
                ended.append((slot, "length"))
            elif now > slot.job.deadline:
                ended.append((slot, "time"))
        for slot, reason in ended:
            self.finish(slot, reason)

    def fail_all(self) -> None:
        for slot in self.slots:
            slot.job.on_end(Ending("error", slot.made, time.monotonic() - slot.started))
        self.slots, self.stepper, self.rows = [], None, None
        self.tokens = self.tokens[:0]

    def finish(self, slot: Slot, reason: str) -> None:
        """Hand over the slot's last characters and its ending; its row goes to the last slot's."""
        slot.flush(final=True)
        slot.job.on_end(Ending(reason, slot.made, time.monotonic() - slot.started))
        row, last = self.slots.index(slot), len(self.slots) - 1
        if row != last:
            for layer in self.stepper.state:
                for part in layer_parts(layer):
                    part[row] = part[last]
            self.tokens[row] = self.tokens[last]
            self.slots[row] = self.slots[last]
        self.slots.pop()
        self.fit(len(self.slots))
        self.rows = None

