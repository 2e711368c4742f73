"""``python -m disc_pl.train model=classifier|duq|byo`` — fit and test one model.

Parse, build, call, write: the training itself is the library ``disc_pl.models.fit``
(``train_model``), which the model cache is handed too, so a model trained here and a cached
one come from the same code. Files written: see ``disc_pl.models.fit``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from disc_pl import tracking
from disc_pl.models.cache import ensure_model
from disc_pl.models.fit import (CHECKPOINT_NAME, POSTHOC_DEP_NAME, RECIPE_KEYS, SLIM_KEYS,  # noqa: F401 (re-exported)
                                build_logger, build_model, data_args, slim_checkpoint, train_model)
from disc_pl.utils import CONF_DIR, read_metrics
from disc_pl.validate import validate_train_config

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> dict[str, Any]:
    with tracking.tracked_job(cfg):  # thread limit, sweep job index, wandb.finish() even on errors
        return train_job(cfg)


def train_job(cfg: DictConfig) -> dict[str, Any]:
    """One ``python -m disc_pl.train`` job, without the tracking wrapper of :func:`main`."""
    validate_train_config(cfg)  # one ConfigError listing every bad value, before any data or training
    if cfg.get("use_cache"):
        path = ensure_model(cfg.model, cfg.dataset, cfg.trainer, cfg.seed, cfg.cache_dir, train_fn=train_model,
                            logger_cfg=cfg.logger)
        metrics = read_metrics(path.parent / "metrics.json")
        log.info("model in the cache: %s", path)
    else:
        out_dir = Path(HydraConfig.get().runtime.output_dir)
        metrics = train_model(cfg.model, cfg.dataset, cfg.trainer, cfg.seed, out_dir, logger_cfg=cfg.logger)
        log.info("model written to %s", out_dir)
    log.info("metrics: %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
    return metrics


if __name__ == "__main__":
    from disc_pl import cli

    cli.hydra_entry(main)  # a user error: its message and exit status 2
