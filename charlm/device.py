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


def has_native_bf16(device: torch.device) -> bool:
    """Whether bf16 runs fast and through the fused kernels on ``device``."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_fast_bf16()


def resolve_precision(name: str, device: torch.device) -> str:
    """'auto' means bf16 autocast where the device has native bf16, fp32 elsewhere. bf16 asked for on
    a CPU or GPU without it is refused: oneDNN has no bf16 LSTM kernel for such CPUs, so the first
    forward would fail deep inside it."""
    if name == "auto":
        return "bf16" if has_native_bf16(device) else "fp32"
    if name == "bf16" and device.type in ("cpu", "cuda") and not has_native_bf16(device):
        needs = "a CPU with native bf16 (AVX-512 BF16 or AMX)" if device.type == "cpu" else f"a {device.type} device with bf16 support"
        raise CharlmError(f"precision bf16 needs {needs} and this one has none; use precision fp32 or auto")
    return name


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()
