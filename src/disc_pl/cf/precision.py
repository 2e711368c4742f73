"""Numeric precision of the inversion (``inversion.precision``).

``32``          float32 everywhere (TF32 matmuls on CUDA, set per job by ``disc_pl.tracking``).
``bf16-mixed``  generator and classifier forward passes under ``torch.autocast`` in bfloat16:
                matmuls and convolutions run in bf16 with float32 accumulation; parameters,
                optimiser state, losses, probabilities and the success test stay float32. The
                INR's sine arguments are accumulated in float32 and rounded once (``disc_pl.nets.siren``);
                its Fourier features and sigmoid output are float32.
``16-mixed``    the same in float16, CUDA only (CPUs have no fast float16 matmul). The objective
                is scaled by a constant before the backward pass and the gradients unscaled
                (``LOSS_SCALE``), so small gradients do not underflow in float16.
``auto``        ``bf16-mixed`` where the device computes bf16 natively (CUDA with bf16 support;
                a CPU with AVX512-BF16 or AMX), else ``32`` (16-mixed on a CUDA device without
                bf16). The run config's default is ``auto`` (docs/PERFORMANCE.md, "Mixed precision").
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

PRECISIONS = ("32", "bf16-mixed", "16-mixed")
CHOICES = ("auto", *PRECISIONS)
LOSS_SCALE = 1024.0  # 16-mixed: the objective's static scale before backward


def normalize(value: object) -> str:
    """``inversion.precision`` as one of CHOICES (an int 32 from YAML is "32"); else ValueError."""
    text = str(value).strip()
    if text in ("32", "32-true", "fp32"):
        return "32"
    if text not in CHOICES:
        raise ValueError(f"inversion.precision={value!r} is not one of {', '.join(CHOICES)} "
                         "(auto: bf16-mixed where the device computes bf16 natively, else 32)")
    return text


def cpu_has_native_bf16() -> bool:
    """True on CPUs whose oneDNN kernels compute bf16 natively (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve(value: object, device: torch.device | str) -> str:
    """The precision a job runs in on ``device``: ``auto`` chosen once, the others checked."""
    choice, device = normalize(value), torch.device(device)
    if choice == "auto":
        if device.type == "cuda":
            return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        return "bf16-mixed" if device.type == "cpu" and cpu_has_native_bf16() else "32"
    if choice == "16-mixed" and device.type != "cuda":
        raise ValueError(f"inversion.precision=16-mixed needs a CUDA device (this job runs on {device.type}); "
                         "use bf16-mixed or 32 on a CPU")
    return choice


def dtype_of(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None for 32)."""
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)


def autocast(precision: str, device: torch.device | str) -> ContextManager:
    """The autocast context of a resolved precision on ``device`` (a no-op for 32)."""
    dtype, device = dtype_of(precision), torch.device(device)
    if dtype is None:
        return contextlib.nullcontext()
    # No weight-cast cache: the engine and the reconstruction update the parameters inside one
    # autocast region, and a cached low-precision copy would go stale after the first step.
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=False)


def loss_scale(precision: str) -> float:
    return LOSS_SCALE if precision == "16-mixed" else 1.0


def scaled_backward(loss: torch.Tensor, params, scale: float = 1.0) -> None:
    """``(loss * scale).backward()``, then the gradients of ``params`` divided by ``scale``
    (16-mixed: small gradients survive float16; 1.0: a plain backward)."""
    if scale == 1.0:
        loss.backward()
        return
    (loss * scale).backward()
    for p in params:
        if p.grad is not None:
            p.grad.div_(scale)
