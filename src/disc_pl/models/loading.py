"""Safe checkpoint loading: ``torch.load(weights_only=True)`` and the disc_pl model classes.

Apart from the cache (``disc_pl.models.cache``) so that a bring-your-own wrapper or a script
can load a file without pulling in the cache or training code.
"""
from __future__ import annotations

import os
import pickle
from typing import Any

import torch

from disc_pl.errors import UnsafeCheckpointError


def safe_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """torch.load(weights_only=True), with a clear error for checkpoints holding code."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message suggests weights_only=False: keep only what it found (the GLOBAL line).
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        found = next((line for line in lines if "GLOBAL" in line), lines[-1] if lines else "")
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it holds pickled objects other than tensors and plain values, "
            "and unpickling them could run arbitrary code. Only checkpoints written by disc_pl "
            f"(Lightning weights + plain hyper-parameters) or plain state dicts are accepted. ({found})"
        ) from err


def _load_module(cls: type, path: str | os.PathLike, map_location: Any, freeze: bool):
    ckpt = safe_load(path, map_location)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(f"{path} is not a disc_pl Lightning checkpoint (no state_dict / hyper_parameters)")
    model = cls(**ckpt["hyper_parameters"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    if freeze:
        model.requires_grad_(False)
    return model


def load_classifier(path: str | os.PathLike, map_location: Any = "cpu", freeze: bool = True):
    """A trained ClassifierModule in eval mode (parameters frozen unless freeze=False)."""
    from disc_pl.models.classifier import ClassifierModule

    return _load_module(ClassifierModule, path, map_location, freeze)


def load_duq(path: str | os.PathLike, map_location: Any = "cpu", freeze: bool = True):
    """A trained DUQModule in eval mode (parameters frozen unless freeze=False)."""
    from disc_pl.models.duq import DUQModule

    return _load_module(DUQModule, path, map_location, freeze)
