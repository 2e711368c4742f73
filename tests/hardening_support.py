"""Small helpers of the tests/test_hardening_*.py battery (the toy configs are in conftest.py)."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import torch


def entries(cache_dir: Path) -> list[str]:
    """What a model cache holds (models, temp folders, locks); [] when nothing was trained."""
    return sorted(p.name for p in Path(cache_dir).iterdir()) if Path(cache_dir).exists() else []


def read_rows(out_dir: Path) -> list[dict]:
    return list(csv.DictReader((Path(out_dir) / "results.csv").open()))


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def load_part(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def subprocess_env() -> dict[str, str]:
    """Environment of a ``python -m disc_pl...`` child: one thread, and the error output a user
    sees (no HYDRA_FULL_ERROR traceback)."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["OMP_NUM_THREADS"] = "1"
    return env
