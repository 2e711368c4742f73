"""The process's C allocator during a job (``cpu_allocator``): a lowest-layer module, so the job
wrapper (disc_pl.tracking), the bench and the memory probe (disc_pl.cf.memory) share it.

glibc serves every block above its mmap threshold (at most 32 MB) with a fresh mmap and unmaps
it on free. A 96 px batch's activations are 100+ MB each, so every step of the inversion maps,
zero-fills (one page fault per 4 KB) and unmaps gigabytes: on 2 CPU cores that kernel work was
40 % of the step. ``retained_heap`` makes glibc keep freed memory in its heap for the next step.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
from typing import Iterator

ALLOCATOR_MODES = ("retain", "system")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)
_GLIBC_MMAP_MAX, _GLIBC_TRIM_THRESHOLD = 65536, 128 * 1024  # glibc's defaults
_KEEP_UP_TO = 2**31 - 1  # bytes of free heap top kept before trimming (mallopt takes an int)
_retain_depth, _retain_active = 0, [False]  # nested blocks: the outermost one sets and restores


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (mallopt and malloc_trim exist), else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl has no mallopt tuning)
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


def release_free_heap() -> None:
    """Return the free memory glibc keeps to the system (a no-op with another C library)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def check_allocator_mode(mode: object) -> str:
    text = str(mode)
    if text not in ALLOCATOR_MODES:
        raise ValueError(f"cpu_allocator={mode!r} is not one of {', '.join(ALLOCATOR_MODES)} (retain: the C "
                         "allocator keeps freed memory for the next step instead of unmapping it; system: "
                         "its defaults)")
    return text


@contextlib.contextmanager
def retained_heap(mode: object = "retain") -> Iterator[bool]:
    """Within the block, glibc keeps freed memory for reuse (no mmap per large tensor, no trim
    of the heap top below 2 GB); afterwards its defaults return and the kept memory goes back to
    the system. Yields whether the tuning is active: False for ``mode="system"``, a C library
    that is not glibc, or an allocator preloaded in its place (jemalloc, tcmalloc: they keep
    memory themselves)."""
    mode = check_allocator_mode(mode)
    libc = _glibc() if mode == "retain" else None
    preloaded = any(name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc"))
    global _retain_depth
    if libc is None or preloaded:
        yield False
        return
    if _retain_depth == 0:
        _retain_active[0] = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_UP_TO))
    _retain_depth += 1
    try:
        yield _retain_active[0]
    finally:
        _retain_depth -= 1
        if _retain_depth == 0:  # the outermost block (a job inside a job keeps the tuning)
            libc.mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX)
            libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_TRIM_THRESHOLD)
            libc.malloc_trim(0)
