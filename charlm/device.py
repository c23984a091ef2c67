"""Device and numeric-precision choices, made once and shared by every command."""

from __future__ import annotations

from contextlib import nullcontext

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


def cpu_has_fast_bf16() -> bool:
    """True where oneDNN has native bf16 (AVX-512 BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(name: str, device: torch.device) -> str:
    """'auto' means bf16 autocast on CUDA GPUs and CPUs that support it, fp32 elsewhere."""
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"
    if name == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
        # oneDNN has no bf16 LSTM kernel for such CPUs: the first forward would fail deep inside it.
        raise CharlmError("precision bf16 needs a CPU with native bf16 (AVX-512 BF16 or AMX) and this one has none; "
                          "use precision fp32 or auto")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise CharlmError("precision bf16 needs a GPU with bf16 support and this one has none; use precision fp32 or auto")
    return name


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()
