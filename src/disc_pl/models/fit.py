"""Training as a library: fit + test one model from its config and write its files.

``train_model`` writes into ``out_dir``: ``model.ckpt`` (the epoch with the best val/acc,
weights + hyper-parameters only, loadable with ``weights_only=True`` and without Hydra),
``metrics.json`` (flat ``split/name`` keys) and ``config.yaml`` (the resolved recipe). For a
bring-your-own model nothing is trained but the post-hoc DEP head: ``posthoc_dep.pt``.

The entry point ``python -m disc_pl.train`` and the model cache (which is handed
``train_model``) both call it, so a model trained by hand and a cached one come from the same
code.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from disc_pl import tracking
from disc_pl.errors import ConfigError, UnsafeCheckpointError
from disc_pl.data.stats import with_data_stats
from disc_pl.models.byo import fit_posthoc_dep, is_byo, save_posthoc_dep
from disc_pl.utils import atomic_write_text, seed_everything, to_plain, write_metrics

log = logging.getLogger(__name__)
# Model-yaml keys that describe the recipe / identity, not constructor arguments.
RECIPE_KEYS = ("name", "fit", "posthoc_dep")
CHECKPOINT_NAME = "model.ckpt"
POSTHOC_DEP_NAME = "posthoc_dep.pt"


def data_args(datamodule: Any) -> dict[str, Any]:
    """Constructor arguments every model takes from the data, not from its yaml."""
    return {
        "num_classes": int(datamodule.num_classes),
        "in_channels": int(datamodule.channels),
        "image_size": int(datamodule.image_size),
        "class_names": [str(c) for c in datamodule.class_names],
    }


def build_model(model_cfg: DictConfig, datamodule: Any) -> Any:
    """Instantiate model_cfg (minus the recipe) with the data-dependent arguments filled in."""
    args = {k: v for k, v in to_plain(model_cfg).items() if k not in RECIPE_KEYS}
    if not is_byo(model_cfg):  # a user's own model keeps the normalisation it was trained with
        args = with_data_stats(args, datamodule)  # mean/std null: the training split's statistics
    try:
        return instantiate(args, **data_args(datamodule), _convert_="all")
    except InstantiationException as err:  # Hydra's wrapper shows a repr(): surface our own errors
        if isinstance(err.__cause__, (ConfigError, UnsafeCheckpointError)):
            raise err.__cause__ from err.__cause__.__cause__
        raise


def build_logger(logger_cfg: DictConfig | None, out_dir: Path, default_group: str | None = None) -> Any:
    """The logger group writing under out_dir (disc_pl.tracking.build_logger); False for none."""
    logger = tracking.build_logger(logger_cfg, out_dir, default_group=default_group)
    return False if logger is None else logger


def build_trainer(trainer_cfg: DictConfig, fit_cfg: DictConfig, out_dir: Path, logger: Any) -> pl.Trainer:
    """trainer group + the recipe's trainer kwargs (fit.trainer), checkpointing on fit.checkpoint."""
    ckpt = dict(monitor="val/acc", mode="max")
    ckpt.update(to_plain(fit_cfg.get("checkpoint") or {}))
    callback = ModelCheckpoint(
        dirpath=str(out_dir / "checkpoints"), filename="best", save_top_k=1, save_weights_only=True, **ckpt
    )
    return instantiate(
        trainer_cfg,
        **to_plain(fit_cfg.get("trainer") or {}),
        logger=logger,
        callbacks=[callback, tracking.CloseGlooAtExit()],
        enable_checkpointing=True,
        default_root_dir=str(out_dir),
    )


def _fit_lightning(model_cfg, datamodule, trainer_cfg, out_dir: Path, logger) -> dict[str, Any]:
    model = build_model(model_cfg, datamodule)
    trainer = build_trainer(trainer_cfg, model_cfg.get("fit") or OmegaConf.create({}), out_dir, logger)
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    seconds = time.perf_counter() - start
    callback = trainer.checkpoint_callback
    best = callback.best_model_path if callback is not None else ""
    if not best:
        raise RuntimeError("training produced no checkpoint (did validation run? see fit.trainer)")
    results = trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False)
    metrics: dict[str, Any] = dict(results[0]) if results else {}
    metrics["train/seconds"] = seconds
    metrics["train/epochs"] = trainer.current_epoch
    if callback.best_model_score is not None:
        metrics[f"best/{callback.monitor}"] = float(callback.best_model_score)
    if trainer.is_global_zero:
        slim_checkpoint(Path(best), out_dir / CHECKPOINT_NAME)
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    return metrics


# What model.ckpt keeps of a Lightning checkpoint: enough for load_from_checkpoint, nothing that
# could hold objects other than tensors and plain values (e.g. the datamodule's hparams).
SLIM_KEYS = ("state_dict", "hyper_parameters", "pytorch-lightning_version", "epoch", "global_step")


def slim_checkpoint(src: Path, dst: Path) -> None:
    """Rewrite the best epoch's checkpoint as model.ckpt with SLIM_KEYS only (atomically)."""
    ckpt = torch.load(src, map_location="cpu", weights_only=False)  # written by this process
    tmp = dst.with_name(f".{dst.name}.tmp")
    torch.save({k: ckpt[k] for k in SLIM_KEYS if k in ckpt}, tmp)
    tmp.replace(dst)
    src.unlink()


def _fit_posthoc_dep(model_cfg, datamodule, out_dir: Path) -> dict[str, Any]:
    wrapper = build_model(model_cfg, datamodule)
    start = time.perf_counter()
    metrics = fit_posthoc_dep(wrapper, datamodule, **to_plain(model_cfg.posthoc_dep))
    metrics["train/seconds"] = time.perf_counter() - start
    save_posthoc_dep(wrapper, out_dir / POSTHOC_DEP_NAME)
    return metrics


def train_model(
    model_cfg: DictConfig,
    dataset_cfg: DictConfig,
    trainer_cfg: DictConfig,
    seed: int,
    out_dir: str | Path,
    logger_cfg: DictConfig | None = None,
    datamodule: Any = None,
) -> dict[str, Any]:
    """Fit + test the model of model_cfg on dataset_cfg; write its files into out_dir.

    Returns the metrics (also written to out_dir/metrics.json by rank 0). `datamodule` may be
    passed to reuse an already built one (it must come from dataset_cfg).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)  # numeric precision is the job's (disc_pl.tracking.tracked_job)
    if datamodule is None:
        datamodule = instantiate(dataset_cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    if "posthoc_dep" in model_cfg:
        metrics, is_zero = _fit_posthoc_dep(model_cfg, datamodule, out_dir), True
    else:
        logger = build_logger(logger_cfg, out_dir, default_group=dataset_cfg.get("name"))
        metrics = _fit_lightning(model_cfg, datamodule, trainer_cfg, out_dir, logger)
        is_zero = pl.utilities.rank_zero_only.rank == 0
    if is_zero:
        resolved = {"model": model_cfg, "dataset": dataset_cfg, "trainer": trainer_cfg, "seed": int(seed)}
        atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(to_plain(resolved))))
        write_metrics(out_dir / "metrics.json", metrics)
    return dict(to_plain(metrics))


