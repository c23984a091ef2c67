"""One training process, or one rank of a ``torchrun`` job trained with DistributedDataParallel.

torchrun starts the processes, runs the rendezvous and tells each one who it is through the
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``TORCHELASTIC_RESTART_COUNT``). A
``Job`` reads that, starts ``torch.distributed`` with the backend the device calls for (gloo on
the CPU, NCCL on CUDA) and offers the few collectives the training loop needs. Outside
torchrun (or with one process) a ``Job`` has one rank and every collective returns its input,
so the single-process loop runs exactly as before.

The global batch keeps its meaning at any scale: rank r owns the contiguous block ``rows`` of
the ``train.batch_size`` streams, so each stream's carried hidden state stays on one rank.
DDP averages the gradients of equal shards, which is the gradient of the whole batch.
"""

from __future__ import annotations

import gc
import os
import signal
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from ..errors import CharlmError
from ..model.charrnn import Hidden, map_hidden

# How long a rank waits for the others in one collective: rank 0 evaluates and saves while the
# others wait at their next step, so this bounds a periodic or final evaluation.
COLLECTIVE_TIMEOUT = timedelta(minutes=60)


class JobStopped(CharlmError):
    """Rank 0 refused to go on and says why; the other ranks stop without a word."""

    def __init__(self):
        super().__init__("rank 0 stopped the job")


@dataclass
class Job:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    restart: int = 0  # how often torchrun restarted the job (--max-restarts)
    run_id: str | None = None  # torchrun's id of the job, the same across its restarts
    backend: str | None = None  # set once the process group is up
    started: bool = field(default=False, repr=False)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one rank that prints, evaluates, writes metrics and saves checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def rows(self, batch_size: int) -> slice:
        """This rank's contiguous block of the global batch's streams."""
        per_rank = batch_size // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    # ------------------------------------------------------------------ start and stop

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise CharlmError(f"train.batch_size {batch_size} does not divide among {self.world_size} processes: "
                              f"each rank takes an equal block of streams; use a multiple of {self.world_size}")

    def device_name(self, name: str) -> str:
        """The device a rank trains on: with CUDA (asked for or picked by auto), the GPU of its LOCAL_RANK."""
        wants_cuda = name == "cuda" or (name == "auto" and torch.cuda.is_available())
        if not self.distributed or not wants_cuda:
            return name
        if not torch.cuda.is_available():
            return name  # resolve_device refuses it in one line
        if self.local_rank >= torch.cuda.device_count():
            raise self.failure(f"LOCAL_RANK {self.local_rank} but this machine has {torch.cuda.device_count()} "
                               "CUDA GPU(s); start at most that many processes per node")
        return f"cuda:{self.local_rank}"

    def backend_for(self, device: torch.device, backend: str) -> str:
        """The backend asked for, or with auto the device's: NCCL on CUDA, gloo elsewhere."""
        chosen = ("nccl" if device.type == "cuda" else "gloo") if backend == "auto" else backend
        if chosen == "nccl" and device.type != "cuda":
            raise CharlmError(f"train.backend nccl needs CUDA GPUs and this job trains on {device}; use --train.backend gloo or auto")
        return chosen

    def start(self, device: torch.device, backend: str) -> None:
        """Join the job's process group with ``backend`` (a no-op for one process)."""
        if not self.distributed:
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, store=self.store(), rank=self.rank, world_size=self.world_size,
                                timeout=COLLECTIVE_TIMEOUT)
        self.backend, self.started = backend, True

    def store(self) -> dist.Store:
        """The job's key-value store at MASTER_ADDR:MASTER_PORT, under a prefix of its own for each
        restart: a job that torchrun restarted on the same store then never reads the addresses its
        dead processes published (gloo's connections were refused without it)."""
        try:
            host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        except (KeyError, ValueError):
            raise CharlmError("RANK and WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not: start charlm with torchrun") from None
        hosted_by_torchrun = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(host, port, self.world_size, is_master=self.is_main and not hosted_by_torchrun,
                              timeout=COLLECTIVE_TIMEOUT)
        return dist.PrefixStore(f"charlm/attempt-{self.restart}", store)

    def stop(self) -> None:
        """Leave the process group. Whatever used it (DDP's reducer) must be gone first: a reducer
        freed after the group was destroyed hangs its process in gloo's destructor. SIGINT and SIGTERM
        are dropped meanwhile: a rank that lost a peer is told to stop by torchrun as torchrun notices
        the same loss, and dying then, halfway out, it would never say what happened."""
        if self.started and dist.is_initialized():
            with stop_signals(lambda signum, frame: None):
                gc.collect()
                dist.destroy_process_group()
        self.started = False

    @contextmanager
    def running(self, device: torch.device, backend: str) -> Iterator[None]:
        """The job's process group for the block; a failure inside it names the rank that met it,
        and a lost or hung rank (a collective that fails or times out) becomes one line too."""
        chosen = self.backend_for(device, backend)  # refused alike on every rank: rank 0 says why
        try:
            self.start(device, chosen)
            yield
        except CharlmError as err:
            if not self.distributed or isinstance(err, JobStopped):
                raise
            raise self.failure(str(err)) from None
        except RuntimeError as err:  # torch.distributed's errors (DistBackendError and the like)
            if not self.distributed:
                raise
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise self.failure(f"lost contact with the other processes ({reason}); last.pt holds the last checkpoint, "
                               "and torchrun --max-restarts=K restarts the job from it") from None
        finally:
            self.stop()

    def failure(self, message: str) -> CharlmError:
        """An error of this rank's, worded so that every rank that meets one reports it."""
        error = CharlmError(f"rank {self.rank}: {message}" if self.distributed else message)
        error.rank = self.rank
        return error

    def agree(self, failure: CharlmError | None, device: torch.device) -> None:
        """Rank 0's verdict on every rank: its ``failure`` raised there, ``JobStopped`` elsewhere."""
        failed = self.from_main(float(failure is not None), device)
        if failure is not None:
            raise failure
        if failed:
            raise JobStopped()

    # ------------------------------------------------------------------ collectives

    def largest(self, values: list[float], device: torch.device) -> list[float]:
        """Each value's maximum over the ranks: one agreement (stop, signal) for all."""
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.tolist()

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean over the ranks (of equal shards: the figure of the whole batch)."""
        if not self.distributed:
            return tensor
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor / self.world_size

    def from_main(self, value: float, device: torch.device) -> float:
        """Rank 0's value, on every rank."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        dist.broadcast(tensor, src=0)
        return float(tensor)

    def whole_batch(self, hidden: Hidden | None) -> Hidden | None:
        """Every rank's rows of the hidden state, joined in rank order (layers, batch, hidden)."""
        if not self.distributed or hidden is None:
            return hidden

        def gathered(part: torch.Tensor) -> torch.Tensor:
            parts = [torch.empty_like(part) for _ in range(self.world_size)]
            dist.all_gather(parts, part.contiguous())
            return torch.cat(parts, dim=1)
        return map_hidden(gathered, hidden)

    def every_rank(self, value: Any) -> list[Any]:
        """``value`` of every rank, in rank order (small Python objects: RNG states)."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values


SINGLE_PROCESS = Job()


def job_from_environment() -> Job:
    """The job torchrun describes in the environment; one process where it describes none."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return Job()
    try:
        return Job(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]), local_rank=int(env.get("LOCAL_RANK", 0)),
                   local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
                   restart=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)), run_id=env.get("TORCHELASTIC_RUN_ID"))
    except ValueError:
        raise CharlmError("RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers: start charlm with torchrun") from None


@contextmanager
def stop_signals(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """Route SIGINT and SIGTERM to ``handler`` for the block (from the main thread only)."""
    previous = {}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def is_quiet_rank() -> bool:
    """A rank other than 0 of a torchrun job, which prints nothing but its own failures."""
    return os.environ.get("RANK", "0") not in ("", "0")


def threads_per_rank(job: Job, asked: int) -> int | None:
    """CPU threads for this process: ``asked``, or with 0 (auto) under torchrun the machine's cores
    shared among its processes (torchrun sets OMP_NUM_THREADS=1); None leaves PyTorch's default."""
    if asked:
        return asked
    if job.local_world_size > 1 or job.distributed:
        return max(1, (os.cpu_count() or 1) // max(job.local_world_size, 1))
    return None
