"""Shared by the tests/test_hardening_*.py battery: toy configs and small helpers.

The toy classifier overrides are those of tests/test_run.py, so with the session-wide
``cache_dir`` fixture (conftest.py) the whole suite trains the toy classifier once.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from disc_pl import run as run_lib

# Data + classifier: identical to tests/test_run.py's TOY (shared cached model).
TOY_DATA = ["dataset.n_train=1200", "dataset.n_val=200", "dataset.n_test=300",
            "trainer.enable_progress_bar=false", "logger=none"]
TOY_MODEL = [*TOY_DATA, "models.classifier.width=8", "models.classifier.fit.trainer.max_epochs=3",
             "models.classifier.lr=3e-3"]
# A cheap, fixed-length generation schedule: the tv prior (nothing to reconstruct), 3 stages.
FAST_TV = ["prior=tv", "inversion.steps_per_stage=12", "inversion.min_steps=2", "prior.lr=0.02",
           "query.count=6", "query.batch_size=2"]


def compose_cfg(overrides: list[str], config_name: str = "run"):
    with initialize_config_dir(config_dir=run_lib.CONF_DIR, version_base="1.3"):
        return compose(config_name, overrides=overrides)


def entries(cache_dir: Path) -> list[str]:
    """What a model cache holds (models, temp folders, locks); [] when nothing was trained."""
    return sorted(p.name for p in Path(cache_dir).iterdir()) if Path(cache_dir).exists() else []


def read_rows(out_dir: Path) -> list[dict]:
    return list(csv.DictReader((Path(out_dir) / "results.csv").open()))


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def load_part(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Toy models on one thread: as fast as two on an idle machine, and far faster on a busy
    one (OpenMP threads of a tiny conv wait on each other). Restored after the module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def subprocess_env() -> dict[str, str]:
    """Environment of a ``python -m disc_pl...`` child: one thread, and the error output a user
    sees (no HYDRA_FULL_ERROR traceback)."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["OMP_NUM_THREADS"] = "1"
    return env

