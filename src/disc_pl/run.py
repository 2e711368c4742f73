"""``python -m disc_pl.run prior=inr manifold=dep`` — the main job.

1. builds the dataset and makes sure the models it needs exist (cached, trained if missing);
2. selects queries (``query.*``: source -> target class, split, count);
3. generates counterfactuals through the Lightning Trainer (``InversionModule``), persisting
   every batch at once (a rerun into the same directory skips finished queries);
4. merges the parts into ``results.csv``, ``counterfactuals.pt``, ``grid.png`` and
   ``metrics.json`` in the job's output directory.
"""
from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from disc_pl import tracking
from disc_pl.cf.engine import InversionOptions, Stage
from disc_pl.cf.losses import DEPManifold, DUQManifold
from disc_pl.cf.module import CounterfactualWriter, InversionModule, QueryDataset
from disc_pl.cf.progress import QueryProgress
from disc_pl.cf.results import (ensure_writable_dir, finished_query_ids, merge_parts, remove_stale_temps,
                                write_json, write_results_table)
from disc_pl.data.corruptions import corrupted
from disc_pl.models.byo import load_posthoc_dep
from disc_pl.models.cache import ensure_model, load_classifier, load_duq
from disc_pl.train import build_model
from disc_pl.validity import add_validity
from disc_pl.validate import check_model_fits_data, is_byo, validate_run_config, validate_with_data
from disc_pl.viz import save_grid

log = logging.getLogger(__name__)
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def inversion_options(cfg: DictConfig) -> tuple[InversionOptions, str, dict]:
    """Plain engine options from the composed config: (options, prior name, prior hparams)."""
    inv, prior, space, manifold = cfg.inversion, cfg.prior, cfg.space, cfg.manifold
    stages = [Stage(groups=list(g), steps=int(inv.steps_per_stage), min_steps=int(inv.min_steps))
              for g in prior.stages]
    recon = prior.get("recon") or {}
    options = InversionOptions(
        space=space.name, layers=tuple(space.layers), lambda_sem=float(space.lambda_sem),
        lambda_mc=float(manifold.lambda_mc), lambda_fc=float(inv.lambda_fc), relax=float(inv.relax),
        lr=float(prior.lr), stages=stages, target_margin=float(inv.target_margin),
        recon_steps=int(recon.get("max_steps", 0)), psnr_target=float(recon.get("psnr_target", 35.0)),
        recon_lr=recon.get("lr"), log_every=int(inv.log_every),
        localize_grid=int(cfg.localize.grid), lambda_area=float(cfg.localize.lambda_area),
        gate_lr=float(cfg.localize.lr), gate_init=float(cfg.localize.init),
        gate_fallback=bool(cfg.localize.fallback), eot_views=int(inv.get("eot_views", 0)),
        eot_shift=float(inv.get("eot_shift", 1.0)), eot_noise=float(inv.get("eot_noise", 0.02)))
    hparams = dict(OmegaConf.to_container(prior.get("hparams") or {}, resolve=True))  # generator hparams
    return options, str(prior.name), hparams


def load_run_classifier(cfg: DictConfig, dm) -> tuple[torch.nn.Module, Path]:
    """The classifier to explain, and the file it came from.

    disc_pl classifiers are trained into the cache if missing. A bring-your-own classifier
    (``model@models.classifier=byo``) is the user's file, wrapped; with ``manifold=dep`` and no
    ``models.classifier.dep_path`` its post-hoc DEP head is fitted once into the cache."""
    mcfg = cfg.models.classifier
    if not is_byo(mcfg):
        path = ensure_model(mcfg, cfg.dataset, cfg.trainer, cfg.seed, cfg.cache_dir, datamodule=dm)
        return load_classifier(path), path
    wrapper = build_model(mcfg, dm)
    if cfg.manifold.name == "dep" and mcfg.get("dep_path") is None:
        head = ensure_model(mcfg, cfg.dataset, cfg.trainer, cfg.seed, cfg.cache_dir, datamodule=dm)
        load_posthoc_dep(wrapper, head)
    for p in wrapper.parameters():
        p.requires_grad_(False)
    return wrapper.eval(), Path(str(mcfg.path))


def build_manifold(cfg: DictConfig, classifier: torch.nn.Module) -> torch.nn.Module | None:
    name = cfg.manifold.name
    if name == "none":
        return None
    if name == "dep":
        return DEPManifold(classifier)
    if name == "duq":
        path = ensure_model(cfg.models.duq, cfg.dataset, cfg.trainer, cfg.seed, cfg.cache_dir)
        return DUQManifold(load_duq(path), margin=float(cfg.manifold.margin))
    raise ValueError(f"manifold={name!r} is not known; use none, dep or duq")


def select_queries(dm, classifier: torch.nn.Module, qcfg: DictConfig) -> tuple[list[int], int, int]:
    """Indices into ``qcfg.split`` of the queries, and the source / target class indices."""
    source = dm.class_index(qcfg.source if qcfg.source is not None else dm.default_query_source)
    target = dm.class_index(qcfg.target if qcfg.target is not None else dm.default_query_target)
    if source == target:
        raise ValueError(f"query.source and query.target are both class {dm.class_names[source]!r}; "
                         "a counterfactual needs a different target class")
    data = dm.dataset(qcfg.split)
    if qcfg.indices is not None:
        bad = [i for i in qcfg.indices if not 0 <= int(i) < len(data)]
        if bad:
            raise ValueError(f"query.indices {bad} are outside split {qcfg.split!r} (size {len(data)})")
        return [int(i) for i in qcfg.indices], source, target
    if int(qcfg.count) <= 0:
        raise ValueError(f"query.count={qcfg.count} must be > 0")
    chosen: list[int] = []
    candidates = [i for i in range(len(data)) if int(data[i]["label"]) == source]
    classifier.eval()
    for start in range(0, len(candidates), 256):
        chunk = candidates[start:start + 256]
        if qcfg.require_correct:
            with torch.no_grad():
                x = torch.stack([data[i]["image"] for i in chunk])
                pred = classifier(x).argmax(1).tolist()
            chunk = [i for i, p in zip(chunk, pred) if p == source]
        chosen += chunk
        if len(chosen) >= int(qcfg.count):
            break
    if not chosen:
        raise ValueError(f"no query of class {dm.class_names[source]!r} in split {qcfg.split!r}"
                         + (" that the classifier predicts correctly" if qcfg.require_correct else ""))
    return chosen[: int(qcfg.count)], source, target


def summarize(rows: list[dict]) -> dict[str, float]:
    """Aggregates of the results table: ``cf/<figure>`` mean and ``cf/<figure>_std``."""
    out: dict[str, float] = {"cf/queries": len(rows)}
    if not rows:
        return out
    out["cf/flip_rate"] = sum(r["flipped"] for r in rows) / len(rows)
    for status in ("flipped", "not_flipped", "diverged"):
        out[f"cf/n_{status}"] = sum(r["status"] == status for r in rows)
    # share of the flipped counterfactuals found by the gated (localized) search
    flipped = [r for r in rows if r["flipped"] and isinstance(r.get("localized"), bool)]  # "" without the gate
    if flipped:
        out["cf/localized_rate"] = sum(r["localized"] for r in flipped) / len(flipped)
    for key in ("mse", "concentration", "gt_distance", "in_mask", "mask_iou", "target_prob",
                "initial_prob", "steps", "seconds", "recon_psnr", "cout", "gt_recovery"):
        vals = [float(r[key]) for r in rows if key in r and not math.isnan(float(r[key]))]
        if vals:
            out[f"cf/{key}"] = statistics.fmean(vals)
            out[f"cf/{key}_std"] = statistics.pstdev(vals)
    return out


def build_logger(cfg: DictConfig, out_dir: Path):
    """The ``logger`` group (wandb / csv / none) writing under ``out_dir``; None for none."""
    logger = tracking.build_logger(cfg.get("logger"), out_dir, default_group=cfg.dataset.get("name"))
    if logger is not None:
        logger.log_hyperparams(tracking.loggable_config(cfg))  # so sweep runs can be compared
    return logger


def run(cfg: DictConfig, out_dir: Path | None = None) -> dict[str, Any]:
    out_dir = Path(out_dir or HydraConfig.get().runtime.output_dir)
    validate_run_config(cfg)  # one ConfigError listing every bad value, before any data or model
    ensure_writable_dir(out_dir)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    options, prior_name, prior_hparams = inversion_options(cfg)  # validates before any training
    dm = instantiate(cfg.dataset)
    dm.setup()
    validate_with_data(cfg, dm)  # query classes / indices, before any model is trained
    # Test-time corruption of the queries only (paper Figure 8); validated before any training.
    query_data = corrupted(dm.dataset(cfg.query.split), cfg.query.get("corruption"), int(cfg.seed))
    classifier, classifier_path = load_run_classifier(cfg, dm)
    check_model_fits_data(classifier, dm, "models.classifier", classifier_path)
    manifold = build_manifold(cfg, classifier)
    indices, source, target = select_queries(dm, classifier, cfg.query)

    remove_stale_temps(out_dir)  # a killed run's half-written part (never read as a part)
    done = finished_query_ids(out_dir)
    todo = [i for i in indices if i not in done]
    log.info("%d queries (%s -> %s); %d already done in %s", len(indices), dm.class_names[source],
             dm.class_names[target], len(indices) - len(todo), out_dir)
    logger = build_logger(cfg, out_dir)
    if todo:
        gt = dm.ground_truth(cfg.query.split, todo) if dm.has_ground_truth else None
        queries = QueryDataset(query_data, todo, [target] * len(todo), cfg.seed, gt)
        loader = torch.utils.data.DataLoader(queries, batch_size=int(cfg.query.batch_size),
                                             shuffle=False, num_workers=int(cfg.query.num_workers))
        module = InversionModule(classifier, manifold, prior_name, prior_hparams, options, dm.class_names)
        trainer = instantiate(cfg.trainer, inference_mode=False, logger=logger or False,
                              callbacks=[CounterfactualWriter(out_dir), tracking.CloseGlooAtExit(),
                                         QueryProgress(len(indices), already_done=len(indices) - len(todo))],
                              enable_checkpointing=False, default_root_dir=str(out_dir))
        trainer.predict(module, dataloaders=loader, return_predictions=False)
        trainer.strategy.barrier()  # every rank has written its parts
    if pl.utilities.rank_zero_only.rank != 0:  # rank 0 alone merges (also when nothing was left)
        return {}

    rows, tensors = merge_parts(out_dir)
    rows = [r for r in rows if r["query_id"] in set(indices)]
    validity_metrics = add_validity(cfg, dm, classifier, rows, tensors, indices, target,
                                    byo=is_byo(cfg.models.classifier))  # judges, COUT, references (new columns)
    write_results_table(out_dir / "results.csv", rows)
    keep = torch.isin(tensors["query_id"], torch.tensor(indices))
    if cfg.output.save_tensors and keep.any():
        torch.save({k: v[keep] for k, v in tensors.items()}, out_dir / "counterfactuals.pt")
    if keep.any():
        ids = tensors["query_id"][keep].tolist()
        gt = dm.ground_truth(cfg.query.split, ids)[0] if dm.has_ground_truth else None
        save_grid(out_dir / "grid.png", tensors["query"][keep], tensors["counterfactual"][keep], gt,
                  max_rows=int(cfg.output.grid_max))
    metrics = summarize(rows)
    metrics.update(validity_metrics)
    write_json(out_dir / "metrics.json", metrics)
    if logger is not None:
        tracking.log_job_outputs(logger, metrics, rows, {"cf/grid": out_dir / "grid.png"})
        logger.finalize("success")
    log.info("flip rate %.3f over %d queries -> %s", metrics.get("cf/flip_rate", float("nan")),
             len(rows), out_dir)
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="run")
def main(cfg: DictConfig) -> float:
    with tracking.tracked_job(cfg):  # thread limit, sweep job index, wandb.finish() even on errors
        metrics = run(cfg)
    return float(metrics.get("cf/flip_rate", float("nan")))


if __name__ == "__main__":
    main()
