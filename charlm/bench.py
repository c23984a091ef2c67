"""``charlm bench``: how fast this machine runs charlm, and how close to its limits.

FLOP counts come from the model shape. A recurrent layer with G gate blocks
(RNN 1, GRU 3, LSTM 4), input width I and hidden width H does G*H*(I+H)
multiply-adds per character, i.e. 2*G*H*(I+H) FLOPs; the read-out adds
2*H*V (or 2*H*E + 2*E*V through the tying projection). A training step costs
three times the forward pass (forward, gradient with respect to the inputs,
gradient with respect to the weights). Element-wise work is not counted.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .config import Config, DataConfig, ModelConfig, bench_config
from .data.datasets import DATASETS, dataset_file
from .data.vocab import Vocab
from .device import cpu_has_native_bf16, resolve_device, resolve_precision
from .evaluation import mean_loss
from .model.charrnn import GATES, CharRNN
from .sampling import SampleSettings, generate
from .training.loop import optimizer_step
from .training.setup import build_optimizer

VOCAB_SIZE = 65  # Tiny Shakespeare's


@dataclass
class BenchSettings:
    config: Config = field(default_factory=bench_config)  # the model and batch shape to measure, device, precision
    fast: bool = False
    corpus_mb: int = 100
    profile: bool = False
    encode_only: bool = False  # only the corpus encoding (a large --corpus-mb takes minutes of its own)

    @property
    def model(self) -> ModelConfig:
        return self.config.model

    @property
    def batch_size(self) -> int:
        return self.config.train.batch_size

    @property
    def seq_len(self) -> int:
        return self.config.train.seq_len

    @property
    def precision(self) -> str:
        return self.config.train.precision

    @property
    def device(self) -> str:
        return self.config.train.device


def forward_flops_per_char(config: ModelConfig, vocab_size: int) -> int:
    gates, hidden = GATES[config.cell], config.hidden_size
    flops, width = 0, config.embedding_size
    for _ in range(config.layers):
        flops += 2 * gates * hidden * (width + hidden)
        width = hidden
    if config.tie_weights and hidden != config.embedding_size:
        return flops + 2 * hidden * config.embedding_size + 2 * config.embedding_size * vocab_size
    return flops + 2 * (config.embedding_size if config.tie_weights else hidden) * vocab_size


def timed(fn: Callable[[], Any], device: torch.device, min_seconds: float, min_repeats: int = 2,
          fastest: bool = False) -> float:
    """Seconds per call after one warm-up call, repeated until ``min_seconds`` have passed:
    the mean, or with ``fastest`` the quickest single call (a peak, free of other tenants' noise)."""
    fn()
    sync(device)
    times, start = [], time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - start < min_seconds:
        call_start = time.perf_counter()
        fn()
        if fastest:
            sync(device)
        times.append(time.perf_counter() - call_start)
    sync(device)
    return min(times) if fastest else (time.perf_counter() - start) / len(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peaks(device: torch.device, size: int, min_seconds: float) -> dict[str, float]:
    """Best matrix-multiply GFLOP/s per precision (and per CPU path for fp32)."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    flops = 2 * size ** 3
    peaks = {"fp32": flops / timed(lambda: a @ b, device, min_seconds, fastest=True) / 1e9}
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        a_dnn, b_dnn = a.to_mkldnn(), b.to_mkldnn()
        peaks["fp32 (oneDNN linear)"] = flops / timed(lambda: torch._C._nn.mkldnn_linear(a_dnn, b_dnn), device, min_seconds, fastest=True) / 1e9
    if device.type == "cuda" or cpu_has_native_bf16():
        a16, b16 = a.bfloat16(), b.bfloat16()
        peaks["bf16"] = flops / timed(lambda: a16 @ b16, device, min_seconds, fastest=True) / 1e9
    else:  # emulated bf16: measured small, so the table shows why auto avoids it
        small = 256
        a16, b16 = torch.randn(small, small).bfloat16(), torch.randn(small, small).bfloat16()
        peaks["bf16 (emulated)"] = 2 * small ** 3 / timed(lambda: a16 @ b16, device, 0.0, 1) / 1e9
    return peaks


def training_step(settings: BenchSettings, device: torch.device, precision: str) -> Callable[[], None]:
    """One whole training step (forward, loss, backward, clipping, AdamW) on random characters."""
    torch.manual_seed(0)
    model = CharRNN(VOCAB_SIZE, settings.model).to(device).train()
    optimizer = build_optimizer(model, settings.config.train)
    inputs = torch.randint(0, VOCAB_SIZE, (settings.batch_size, settings.seq_len), device=device)
    targets = torch.randint(0, VOCAB_SIZE, (settings.batch_size, settings.seq_len), device=device)
    state = {"hidden": None}

    def step():
        _, state["hidden"] = optimizer_step(model, optimizer, inputs, targets, state["hidden"], precision, 1.0)

    return step


def training_throughput(settings: BenchSettings, device: torch.device, precision: str, min_seconds: float) -> float:
    seconds = timed(training_step(settings, device, precision), device, min_seconds, min_repeats=5)
    return settings.batch_size * settings.seq_len / seconds


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2: the profiler's C++ side prints start and stop lines there that no option turns off."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "wb") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def training_profile(settings: BenchSettings, device: torch.device, precision: str, steps: int = 3,
                     rows: int = 8) -> list[dict[str, Any]]:
    """Where a training step's time goes: the operators with the most self time, by PyTorch's profiler.

    On the CPU the recurrent layers show up as oneDNN's ``mkldnn_rnn_layer`` (forward) and
    ``mkldnn_rnn_layer_backward``; on CUDA as cuDNN's kernels under ``_cudnn_rnn``."""
    from torch.profiler import ProfilerActivity, profile

    step = training_step(settings, device, precision)
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with quiet_stderr(), profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    self_times = sorted(((getattr(event, attribute), event.key) for event in prof.key_averages()), reverse=True)
    total = sum(micros for micros, _ in self_times)
    return [{"op": op, "ms_per_step": micros / steps / 1e3, "share": micros / total}
            for micros, op in self_times[:rows] if micros > 0]


def evaluation_throughput(settings: BenchSettings, device: torch.device, precision: str, min_seconds: float) -> float:
    model = CharRNN(VOCAB_SIZE, settings.model).to(device)
    streams = 64  # large batches: throughput, not the few long streams charlm eval reads for accuracy
    data = torch.randint(0, VOCAB_SIZE, (streams * 256 * (2 if settings.fast else 8) + 1,), device=device)
    seconds = timed(lambda: mean_loss(model, data, device, precision, batch_size=streams), device, min_seconds)
    return (len(data) - 1) / seconds


def sampling_throughput(settings: BenchSettings, device: torch.device, streams: int, length: int) -> float:
    torch.manual_seed(0)
    model = CharRNN(VOCAB_SIZE, settings.model).to(device).eval()
    vocab = Vocab("".join(chr(32 + i) for i in range(VOCAB_SIZE)))
    sample = SampleSettings(length=length, seed=0, num_samples=streams)
    seconds = timed(lambda: generate(model, vocab, "", sample), device, 0.0, 1)
    return streams * length / seconds


def synthetic_corpus(path: Path, megabytes: int) -> None:
    """Mixed text (ASCII words, accents, CJK, emoji) so every UTF-8 length occurs."""
    rng = random.Random(0)
    words = ["the", "and", "king", "thou", "naïve", "café", "明月", "故乡", "🌙", "✨", "zebra", "ROMEO:", "\n"]
    block = " ".join(rng.choice(words) for _ in range(200_000)).encode("utf-8")[: 1 << 20]
    block = block.decode("utf-8", errors="ignore").encode("utf-8")
    with path.open("wb") as fh:
        for _ in range(megabytes):
            fh.write(block)


ENCODE_CHILD = """
import json, sys, time
def rss(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0
from charlm.config import DataConfig
from charlm.data.corpus import open_corpus
from charlm.data.sources import find_source
config = DataConfig(**json.loads(sys.argv[1]))
base = rss('VmRSS:')
start = time.perf_counter()
corpus = open_corpus(config)
first = time.perf_counter() - start
peak = rss('VmHWM:') - base
start = time.perf_counter()
open_corpus(config)
print(first, time.perf_counter() - start, peak, len(corpus), sum(f.size for f in find_source(config).files))
"""


def encoding_benchmark(megabytes: int, data: DataConfig | None = None) -> dict[str, float]:
    """Encode a corpus in a fresh process, into a fresh cache: speed, peak memory over the process's
    baseline (PyTorch imported), cached reload. ``data`` names a real corpus (its ``path``, ``unit``,
    ``exclude``, ``encoding_errors``); without one, a generated corpus of ``megabytes``."""
    with tempfile.TemporaryDirectory() as tmp:
        if data is None or not data.path:
            path = Path(tmp) / "corpus.txt"
            synthetic_corpus(path, megabytes)
            data = replace(data or DataConfig(), path=str(path))
        elif data.path in DATASETS and not Path(data.path).exists():  # downloaded (once) outside the timing
            data = replace(data, path=str(dataset_file(DATASETS[data.path], data.dir)))
        config = replace(data, dir=str(Path(tmp) / "cache"))
        out = subprocess.run([sys.executable, "-c", ENCODE_CHILD, json.dumps(asdict(config))], capture_output=True,
                             text=True, check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
        first, cached, peak, chars, size = out.stdout.split()
    size = int(size)
    return {"corpus_mb": size / 1e6, "encode_seconds": float(first), "encode_mb_per_s": size / 1e6 / float(first),
            "cached_load_seconds": float(cached), "peak_memory_mb": int(peak) / 1e6,
            "peak_memory_x_file": int(peak) / size, "chars": int(chars)}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e6
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def run_bench(settings: BenchSettings, on_result: Callable[[str, Any], None] | None = None) -> dict[str, Any]:
    """Every measurement in one run; ``on_result(name, value)`` hears each as it is made."""
    report = on_result or (lambda name, value: None)
    device = resolve_device(settings.device)
    precision = resolve_precision(settings.precision, device)
    min_seconds = 0.2 if settings.fast else 3.0
    results: dict[str, Any] = {
        "device": str(device), "precision": precision, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "model": f"{settings.model.layers}x{settings.model.hidden_size} {settings.model.cell}",
        "batch_size": settings.batch_size, "seq_len": settings.seq_len,
    }
    if settings.encode_only:
        results["encode"] = encoding_benchmark(2 if settings.fast else settings.corpus_mb, settings.config.data)
        report("encode", results["encode"])
        results["peak_memory_mb"] = peak_memory_mb(device)
        return results
    peaks = matmul_peaks(device, 256 if settings.fast else 2048, min_seconds)
    results["matmul_gflops"] = peaks
    report("matmul_gflops", peaks)
    flops = 3 * forward_flops_per_char(settings.model, VOCAB_SIZE)
    train_cps = training_throughput(settings, device, precision, min_seconds)
    peak = max(v for k, v in peaks.items() if k.startswith(precision) and "emulated" not in k)
    results["train"] = {"chars_per_s": train_cps, "flops_per_char": flops, "gflops": train_cps * flops / 1e9,
                        "fraction_of_peak": train_cps * flops / 1e9 / peak}
    report("train", results["train"])
    if settings.profile:
        results["train_profile"] = training_profile(settings, device, precision)
        report("train_profile", results["train_profile"])
    eval_cps = evaluation_throughput(settings, device, precision, min_seconds)
    results["eval"] = {"chars_per_s": eval_cps, "x_training": eval_cps / train_cps}
    report("eval", results["eval"])
    length = 200 if settings.fast else 2000
    results["sample"] = {"one_stream_chars_per_s": sampling_throughput(settings, device, 1, length),
                         "batch_256_chars_per_s": sampling_throughput(settings, device, 256, length // 4)}
    report("sample", results["sample"])
    results["encode"] = encoding_benchmark(2 if settings.fast else settings.corpus_mb, settings.config.data)
    report("encode", results["encode"])
    results["peak_memory_mb"] = peak_memory_mb(device)
    return results


def to_json(results: dict[str, Any]) -> str:
    return json.dumps(results, indent=2)
