"""Memory of the inversion: peak-memory windows, what the device has free, and the first guess
of how many queries fit in one batch (``query.memory_fraction``; ``disc_pl.cf.module``).

On CUDA the figures are ``torch.cuda`` allocator bytes. On a CPU (Linux) they are the process's
resident set: ``VmRSS`` now, ``VmHWM`` its peak since the last reset (writing ``5`` to
``/proc/self/clear_refs`` resets it), and ``MemAvailable`` from ``/proc/meminfo``.
"""
from __future__ import annotations

import dataclasses
import math
import resource
from pathlib import Path
from typing import Callable

import torch

from disc_pl.allocator import release_free_heap


def _proc_fields(path: str, fields: tuple[str, ...]) -> dict[str, float]:
    """The named ``kB`` fields of a ``/proc`` file, in MB (missing ones left out)."""
    out: dict[str, float] = {}
    try:
        for line in Path(path).read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in fields:
                out[name] = int(rest.split()[0]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return out


def _proc_mb(path: str, field: str) -> float | None:
    return _proc_fields(path, (field,)).get(field)


_RESET_SLACK_MB = 2.0  # what the process may touch between the reset and reading it back
_CALIBRATION_MB = 48  # above glibc's largest mmap threshold (32 MB): always fresh, resident pages
_cpu_window: bool | None = None  # whether this process's VmHWM window works (checked once)


def _reset_cpu_peak() -> bool:
    release_free_heap()  # memory the allocator kept (``retained_heap``) would hide new allocations
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS
    except OSError:
        return False
    # Some kernels and sandboxes accept the write but keep the old peak: then the window is not
    # new, and a measurement inside it would see only what rises above the old peak.
    status = _proc_fields("/proc/self/status", ("VmHWM", "VmRSS"))  # one read: one moment
    hwm, rss = status.get("VmHWM"), status.get("VmRSS")
    return hwm is not None and rss is not None and hwm - rss <= _RESET_SLACK_MB


def _cpu_window_works() -> bool:
    """Once per process: reset the peak, touch a known allocation, and check the peak saw it
    (a sandbox may emulate the files without tracking the peak)."""
    global _cpu_window
    if _cpu_window is None:
        ok = _reset_cpu_peak()
        if ok:
            before = _proc_mb("/proc/self/status", "VmRSS") or 0.0
            block = torch.ones(_CALIBRATION_MB * 2**18)  # float32: 4 bytes each, every page written
            del block
            ok = (_proc_mb("/proc/self/status", "VmHWM") or 0.0) - before >= 0.9 * _CALIBRATION_MB
        _cpu_window = ok
    return _cpu_window


def reset_peak(device: torch.device) -> bool:
    """Start a new peak-memory window; False where the CPU peak cannot be reset, the reset does
    not take, or the peak does not follow allocations (then ``peak_mb`` is the process's peak so
    far, and ``measure_mb`` returns None)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    return _cpu_window_works() and _reset_cpu_peak()


def current_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return _proc_mb("/proc/self/status", "VmRSS") or 0.0


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _proc_mb("/proc/self/status", "VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def available_mb(device: torch.device) -> float | None:
    """Memory free for new tensors on ``device`` (None where unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**20
    return _proc_mb("/proc/meminfo", "MemAvailable")


def measure_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory ``fn()`` adds over what is held before it (None where the peak cannot be
    windowed). The global RNG is restored afterwards, so a probe leaves the run unchanged."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if not reset_peak(device):  # first: the reset may hand kept memory back (retained_heap)
            return None
        before = current_mb(device)
        fn()
        return max(peak_mb(device) - before, 0.0)


def probe_options(options):
    """``options`` cut to one step per stage (and per reconstruction phase), no early stop, no
    gate or prior fallback: the same tensors as the real run at its largest (full-size, all-groups)
    stage, for the price of a few steps."""
    stages = [dataclasses.replace(s, steps=1, min_steps=2) for s in options.stages]
    gate = dataclasses.replace(options.gate, fallback=False) if options.gate is not None else None
    return dataclasses.replace(options, stages=stages, recon_steps=min(options.recon_steps, 1), gate=gate,
                               log_every=0, fallback=None)


def queries_that_fit(per_query_mb: float, available: float, fraction: float) -> int:
    """How many queries of ``per_query_mb`` fit in ``fraction`` of ``available`` MB (>= 1)."""
    if per_query_mb <= 0:
        return 2**31 - 1
    return max(1, math.floor(fraction * available / per_query_mb))
