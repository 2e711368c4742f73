"""Small shared helpers: seeding, atomic metrics files, config hashing, device settings."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch


# The Hydra configs: conf/ at the top of the repository (editable install, a checkout), or
# disc_pl/conf inside an installed wheel (pyproject maps conf/ there as package data).
_PACKAGED_CONF = Path(__file__).resolve().parent / "conf"
CONF_DIR = str(_PACKAGED_CONF if _PACKAGED_CONF.is_dir() else Path(__file__).resolve().parents[2] / "conf")


def seed_everything(seed: int) -> int:
    """Seed python, numpy and torch (and dataloader workers) for a reproducible run."""
    return pl.seed_everything(int(seed), workers=True, verbose=False)


def configure_matmul_precision() -> None:
    """Allow TF32 matmuls/convolutions on GPUs that support them (no effect on CPU)."""
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")


def to_plain(obj: Any) -> Any:
    """OmegaConf containers / tensors / paths -> plain python values (JSON- and pickle-safe)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            obj = OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def config_hash(obj: Any) -> str:
    """sha256 hex digest of a config, independent of key order and container type."""
    text = json.dumps(to_plain(obj), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write to a temp file in the same folder, then os.replace: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; metrics files are for everyone
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_metrics(path: str | os.PathLike, metrics: Mapping[str, Any]) -> Path:
    """metrics.json with flat `split/name` keys; values become floats (NaN/inf -> null)."""
    flat = {}
    for key, value in to_plain(dict(metrics)).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
            value = value if math.isfinite(value) else None
        flat[key] = value
    return atomic_write_text(path, json.dumps(flat, indent=2, sort_keys=True) + "\n")


def read_metrics(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
