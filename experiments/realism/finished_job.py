"""What the realism scripts read from a finished ``disc_pl.evaluate`` / ``disc_pl.run`` job: its
config, dataset, explained classifier and saved counterfactuals (``counterfactuals.pt``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from disc_pl.job import load_run_classifier


def load_job(job: Path, need_truth: bool = False) -> tuple[DictConfig, Any, torch.nn.Module, dict]:
    """``(cfg, datamodule, classifier, saved)`` of ``job``; the classifier in eval mode. With
    ``need_truth``, a dataset without ground-truth counterfactuals exits with a message."""
    cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
    # run.yaml's default cache_dir interpolates hydra's cwd, which is not set here: the same path
    cfg.cache_dir = OmegaConf.select(cfg, "cache_dir", throw_on_resolution_failure=False) or os.environ.get(
        "DISC_PL_CACHE", str(Path.cwd() / "outputs" / "model_cache"))
    dm = instantiate(cfg.dataset)
    dm.setup()
    if need_truth and not dm.has_ground_truth:
        raise SystemExit(f"{job}: the dataset has no ground-truth counterfactuals (use dataset=synthetic_faces)")
    classifier, _ = load_run_classifier(cfg, dm)
    return cfg, dm, classifier, torch.load(job / "counterfactuals.pt", weights_only=True)
