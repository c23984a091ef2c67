"""Device and numeric-precision choices, made once and shared by every command."""

from __future__ import annotations

import time
from contextlib import nullcontext
from functools import cache
from typing import Callable

import torch

from .errors import CharlmError


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA, then MPS, then the CPU; an unavailable device is a clear error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CharlmError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CharlmError(f"device '{name}' is not available: this machine has no usable CUDA GPU; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CharlmError(f"device '{name}' is not available: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise CharlmError(f"device '{name}' is not available on this machine; use --device cpu or auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise CharlmError(f"unsupported device '{name}'; use auto, cpu, cuda, cuda:N or mps")
    return device


def cpu_has_native_bf16() -> bool:
    """True where oneDNN has native bf16 (AVX-512 BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


BF16_MARGIN = 1.3  # bf16 must be this much faster than fp32 for 'auto' to take it


@cache
def cpu_bf16_pays() -> bool:
    """Whether bf16 products run clearly faster than fp32 on this CPU, measured once (about 0.1 s).

    Native bf16 instructions are not enough: on an Intel Xeon VM with AVX-512 BF16 but no AMX,
    bf16 products ran at 132 GFLOP/s against 179 for fp32, and training at 0.6-0.75x fp32's speed
    (docs/BENCHMARKS.md), where other CPUs run bf16 products at about twice fp32's rate.
    """
    if not cpu_has_native_bf16():
        return False
    a, b = torch.randn(256, 1024), torch.randn(1024, 2048)
    a16, b16 = a.bfloat16(), b.bfloat16()
    bf16_seconds, fp32_seconds = fastest([lambda: a16 @ b16, lambda: a @ b])
    return bf16_seconds * BF16_MARGIN < fp32_seconds


def fastest(calls: list[Callable[[], object]], repeats: int = 7) -> list[float]:
    """Each call's fastest time in seconds, the calls taken in turn so that a change of load hits them alike."""
    for call in calls:
        call()  # the first call picks and prepares its kernels
    best = [float("inf")] * len(calls)
    for _ in range(repeats):
        for i, call in enumerate(calls):
            start = time.perf_counter()
            call()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def resolve_precision(name: str, device: torch.device) -> str:
    """'auto' means bf16 autocast on a CPU where bf16 pays, fp32 elsewhere (TF32 products on CUDA).

    bf16 on a CPU without native bf16 is refused: oneDNN has no bf16 LSTM kernel for it, so the
    first forward would fail deep inside it. bf16 on CUDA is refused too: PyTorch's autocast
    wrapper for cuDNN's recurrent layers (``_cudnn_rnn``, aten/src/ATen/cudnn/AutocastRNN.cpp)
    casts the input, weights and states to fp16 whatever dtype autocast was given, so "bf16" would
    train in fp16 without a gradient scaler. fp16 is that path done right: autocast with a
    ``GradScaler``, on CUDA only.
    """
    if name == "auto":
        return "bf16" if device.type == "cpu" and cpu_bf16_pays() else "fp32"
    if name == "bf16" and device.type == "cuda":
        raise CharlmError("precision bf16 on CUDA would run the recurrent layers in fp16 (PyTorch's autocast casts "
                          "cuDNN RNNs to fp16 whatever dtype it is given); use precision fp16, which adds a gradient "
                          "scaler, or fp32")
    if name == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        raise CharlmError("precision bf16 needs a CPU with native bf16 (AVX-512 BF16 or AMX) and this one has none; "
                          "use precision fp32 or auto")
    if name == "fp16" and device.type != "cuda":
        raise CharlmError(f"precision fp16 is for CUDA GPUs (cuDNN with a gradient scaler) and this run is on {device}; "
                          "use precision auto or fp32")
    return name


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    if precision in AUTOCAST_DTYPES:
        return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])
    return nullcontext()


def gradient_scaler(precision: str) -> torch.amp.GradScaler | None:
    """fp16 training's loss scaler (its gradients would underflow without one); None otherwise."""
    return torch.amp.GradScaler("cuda") if precision == "fp16" else None
