"""The generation job as a library (what ``python -m disc_pl.run`` runs; ``evaluate`` and
``bench`` call it too). From a composed run config it

1. builds the dataset and makes sure the models it needs exist (cached, trained if missing);
2. selects queries (``query.*``: source -> target class, split, count);
3. generates counterfactuals through the Lightning Trainer (``InversionModule``), persisting
   every batch at once (a rerun into the same directory skips finished queries);
4. merges the parts into ``results.csv``, ``counterfactuals.pt``, ``grid.png`` and
   ``metrics.json`` in the job's output directory.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from disc_pl import tracking
from disc_pl.errors import ConfigError
from disc_pl.cf.engine import InversionOptions, PriorFallback, prior_lambda_sem, prior_schedule
from disc_pl.cf.losses import Manifold, RobustManifoldLoss, SurrogateManifold, Surrogates
from disc_pl.cf.module import CounterfactualWriter, InversionModule, QueryDataset
from disc_pl.cf.progress import QueryProgress
from disc_pl.cf.results import (check_config_stamp, ensure_writable_dir, finished_query_ids, flatten, merge_parts,
                                remove_stale_temps, write_config_stamp, write_json, write_results_table)
from disc_pl.data.corruptions import corrupted
from disc_pl.models.byo import load_posthoc_dep
from disc_pl.models.cache import TRAINER_PRESENTATION_KEYS, ensure_model
from disc_pl.models.fit import build_model, train_model
from disc_pl.models.loading import load_classifier, load_duq
from disc_pl.models.robust import ensure_robust_model
from disc_pl.shortcut import add_shortcut_figures
from disc_pl.validity import add_validity
from disc_pl.validate import (check_model_fits_data, is_byo, training_images, validate_run_config,
                              validate_with_data)
from disc_pl.utils import CONF_DIR, to_plain
from disc_pl.viz import captions_from_rows, save_grid

log = logging.getLogger(__name__)


def optional_terms(cfg: DictConfig) -> tuple:
    """The objects of the ``term`` group (``term=[palette,change_tv]``; none by default), in the
    order chosen: optional objective terms after the paper's."""
    return tuple(instantiate(node) for node in (cfg.get("term") or {}).values())


def inversion_options(cfg: DictConfig, manifold: Manifold | None = None) -> tuple[InversionOptions, Any]:
    """Engine options and the generator factory ``(images, seeds) -> Prior`` (``prior.hparams``
    instantiated, once) from the composed config. The ``inversion`` node builds the
    ``InversionOptions`` and the groups fill what they own: ``prior`` its schedule (and its
    ``fallback`` prior's, composed by Hydra), ``space`` the semantic space and lambda1,
    ``localize`` the gate, ``manifold`` lambda2 (built here when not given), ``term`` the
    optional terms."""
    space = instantiate(cfg.space)
    manifold = manifold if manifold is not None else instantiate(cfg.manifold)
    inv = cfg.inversion
    options = instantiate(inv)(**prior_schedule(cfg.prior, inv.steps_per_stage, inv.min_steps), space=space,
                               lambda_sem=space.lambda_sem, lambda_mc=manifold.lambda_mc,
                               gate=instantiate(cfg.localize), terms=optional_terms(cfg), fallback=None)
    fallback = cfg.prior.get("fallback")
    if fallback is not None:  # its own schedule, generator and lambda1, the rest of the options as this prior's
        # lambda1: the fallback prior's own (its lambda_sem, else 1), unless space.lambda_sem is set
        # for the run (then both); the warp's 0.6 is a weight for moved pixels, not for drawn ones
        own = OmegaConf.is_interpolation(cfg.space, "lambda_sem")
        options = dataclasses.replace(options, fallback=PriorFallback(
            prior=instantiate(fallback.hparams), name=str(fallback.name), below=cfg.prior.get("fallback_below"),
            keep_smaller=cfg.prior.get("fallback_keep_smaller"), options=dataclasses.replace(
                options, lambda_sem=prior_lambda_sem(fallback) if own else options.lambda_sem,
                **prior_schedule(fallback, inv.steps_per_stage, inv.min_steps))))
    return options, instantiate(cfg.prior.hparams)


def load_run_classifier(cfg: DictConfig, dm, manifold: Manifold | None = None) -> tuple[torch.nn.Module, Path]:
    """The classifier to explain, and the file it came from.

    disc_pl classifiers are trained into the cache if missing. A bring-your-own classifier
    (``model@models.classifier=byo``) is the user's file, wrapped; when the manifold (built from
    ``cfg.manifold`` when not given) ``needs_dep`` (``manifold=dep``) and there is no
    ``models.classifier.dep_path`` its post-hoc DEP head is fitted once into the cache."""
    mcfg = cfg.models.classifier
    if not is_byo(mcfg):
        path = ensure_model(mcfg, cfg.dataset, cfg.trainer, cfg.seed, cfg.cache_dir, train_fn=train_model,
                            datamodule=dm)
        return load_classifier(path), path
    wrapper = build_model(mcfg, dm)
    manifold = manifold if manifold is not None else instantiate(cfg.manifold)
    if manifold.needs_dep and mcfg.get("dep_path") is None:
        head = ensure_model(mcfg, cfg.dataset, cfg.trainer, cfg.seed, cfg.cache_dir, train_fn=train_model,
                            datamodule=dm)
        load_posthoc_dep(wrapper, head)
    for p in wrapper.parameters():
        p.requires_grad_(False)
    return wrapper.eval(), Path(str(mcfg.path))


def surrogate_recipe(cfg: DictConfig) -> DictConfig:
    """The model config the surrogates of ``manifold=surrogates`` are trained from: the explained
    classifier's; for a bring-your-own classifier (no recipe here) disc_pl's own classifier
    recipe, ``conf/model/classifier.yaml`` (the default ``model@models.classifier=classifier``)."""
    if not is_byo(cfg.models.classifier):
        return cfg.models.classifier
    return OmegaConf.load(Path(CONF_DIR) / "model" / "classifier.yaml")


def surrogates_provenance(cfg: DictConfig, manifold: Manifold) -> dict[str, str]:
    """``manifold/surrogates_recipe`` of metrics.json where the manifold has surrogates:
    ``"explained"`` (the explained classifier's recipe) or ``"disc_pl"`` (disc_pl's own recipe,
    for a bring-your-own classifier)."""
    if not manifold.needs_surrogates:
        return {}
    return {"manifold/surrogates_recipe": "disc_pl" if is_byo(cfg.models.classifier) else "explained"}


def build_manifold(cfg: DictConfig, classifier: torch.nn.Module, manifold: Manifold | None = None,
                   datamodule: Any = None) -> torch.nn.Module | None:
    """The L_mc model of the ``manifold`` group's object (built from ``cfg.manifold`` when not
    given) for ``classifier``; a DUQ model, surrogates (``surrogate_recipe``) or robust models it
    asks for are trained into the cache or reused (robust models on ``datamodule``'s training
    split, built from ``cfg.dataset`` when not given)."""
    manifold = manifold if manifold is not None else instantiate(cfg.manifold)

    def duq() -> torch.nn.Module:
        return load_duq(ensure_model(cfg.models.duq, cfg.dataset, cfg.trainer, cfg.seed, cfg.cache_dir,
                                     train_fn=train_model))

    def surrogate(i: int) -> torch.nn.Module:
        if is_byo(cfg.models.classifier) and datamodule is not None and not training_images(datamodule):
            raise ConfigError.one("manifold", manifold.name, Surrogates.BYO_NO_TRAINING_IMAGES)
        return load_classifier(ensure_model(surrogate_recipe(cfg), cfg.dataset, cfg.trainer,
                                            int(cfg.seed) + 1000 * (i + 1), cfg.cache_dir, train_fn=train_model))

    def robust(i: int) -> torch.nn.Module:
        nonlocal datamodule
        if datamodule is None:
            datamodule = instantiate(cfg.dataset)
            datamodule.setup()
        return ensure_robust_model(manifold.recipe, datamodule, int(cfg.seed) + 3000 * (i + 1), cfg.cache_dir)
    return manifold(classifier, duq, surrogate, load_robust=robust)


def select_queries(dm, classifier: torch.nn.Module, qcfg: DictConfig) -> tuple[list[int], int, int]:
    """Indices into ``qcfg.split`` of the queries, and the source / target class indices."""
    source = dm.class_index(qcfg.source if qcfg.source is not None else dm.default_query_source)
    target = dm.class_index(qcfg.target if qcfg.target is not None else dm.default_query_target)
    if source == target:
        raise ConfigError.one("query.target", qcfg.target, f"is the same class as query.source "
                              f"({dm.class_names[source]!r}); a counterfactual needs a different target class")
    data = dm.dataset(qcfg.split)
    if qcfg.indices is not None:
        bad = [i for i in qcfg.indices if not 0 <= int(i) < len(data)]
        if bad:
            raise ConfigError.one("query.indices", bad, f"outside split {qcfg.split!r} (size {len(data)})")
        return [int(i) for i in qcfg.indices], source, target
    if int(qcfg.count) <= 0:
        raise ConfigError.one("query.count", qcfg.count, "must be > 0")
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
        correct = " that the classifier predicts correctly (or set query.require_correct=false)"
        raise ConfigError.one("query.source", qcfg.source, f"no query of class {dm.class_names[source]!r} in "
                              f"split {qcfg.split!r}" + (correct if qcfg.require_correct else ""))
    return chosen[: int(qcfg.count)], source, target


# Keys that do not change a query's result: which queries and how many (a rerun may add some),
# how they are batched and placed, where things are written, what is logged.
UNSTAMPED = ("query.count", "query.indices", "query.batch_size", "query.num_workers", "dataset.num_workers", "cache_dir",
             "threads_per_job", "cpu_allocator", "experiment_name", "logger", "output", "evaluate", "cd", "hydra")


def result_config(cfg: DictConfig) -> dict[str, Any]:
    """The flat config that determines each query's result (stamped on ``parts/``)."""
    kept = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in UNSTAMPED])  # unresolved paths stay out
    try:
        plain = to_plain(kept)
    except Exception:  # noqa: BLE001 - an interpolation into a left-out key: stamp it as written
        plain = OmegaConf.to_container(kept, resolve=False)
    flat = flatten(plain)
    trainer = {f"trainer.{k}" for k in TRAINER_PRESENTATION_KEYS}
    return {k: v for k, v in flat.items()
            if k not in trainer and not any(k == u or k.startswith(u + ".") for u in UNSTAMPED)}


# Quality of a counterfactual: averaged over the flipped queries only (a not-flipped query's
# best attempt, or a diverged query returned as itself with mse 0, is no counterfactual).
FLIPPED_FIGURES = ("mse", "concentration", "gt_distance", "in_mask", "mask_iou", "target_prob", "recon_psnr",
                   "cout", "gt_recovery", "im1", "ae_gap", "nn_margin")
# Also their median and the share above 0: a ratio whose mean a few queries with a tiny true change (|x - x_gt| near 0)
# can dominate.
MEDIAN_FIGURES = ("gt_recovery",)
# Cost and starting point: over every query (the work was spent on all of them).
ALL_FIGURES = ("initial_prob", "steps", "seconds")


def summarize(rows: list[dict]) -> dict[str, float]:
    """Aggregates of the results table: ``cf/<figure>`` mean and ``cf/<figure>_std`` over the
    flipped queries (FLIPPED_FIGURES) or all (ALL_FIGURES), and ``cf/n_<status>`` counts."""
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
    # queries left unflipped with the gate's closest attempt (no ungated retry replaced it)
    if any(isinstance(r.get("localized"), bool) for r in rows):
        out["cf/n_not_flipped_localized"] = sum(r["status"] == "not_flipped" and r["localized"] is True for r in rows)
    # share of the flipped counterfactuals made by the fallback prior (prior.fallback), by a search
    # confined to their main region (prior.refine) and by the prior's relaxation (prior.retry_hparams);
    # a column is "" where that second search cannot run
    for flag in ("fallback", "refined", "relaxed"):
        made = [r[flag] for r in rows if r["flipped"] and isinstance(r.get(flag), bool)]
        if made:
            out[f"cf/{flag}_rate"] = sum(made) / len(made)
    flipped_rows = [r for r in rows if r["status"] == "flipped"]
    for key in (*FLIPPED_FIGURES, *ALL_FIGURES):
        among = flipped_rows if key in FLIPPED_FIGURES else rows
        vals = [float(r[key]) for r in among if key in r and not math.isnan(float(r[key]))]
        if vals:
            out[f"cf/{key}"] = statistics.fmean(vals)
            out[f"cf/{key}_std"] = statistics.pstdev(vals)
            if key in MEDIAN_FIGURES:
                out[f"cf/{key}_median"] = statistics.median(vals)
                out[f"cf/{key}_positive"] = sum(v > 0 for v in vals) / len(vals)
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
    stamp = result_config(cfg)
    check_config_stamp(out_dir, stamp)  # parts made under other values are refused, before any work
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    manifold_choice = instantiate(cfg.manifold)  # the manifold group's factory
    options, prior_factory = inversion_options(cfg, manifold_choice)
    dm = instantiate(cfg.dataset)
    dm.setup()
    validate_with_data(cfg, dm)  # query classes / indices, before any model is trained
    # Test-time corruption of the queries only (paper Figure 8); validated before any training.
    query_data = corrupted(dm.dataset(cfg.query.split), cfg.query.get("corruption"), int(cfg.seed))
    classifier, classifier_path = load_run_classifier(cfg, dm, manifold_choice)
    check_model_fits_data(classifier, dm, "models.classifier", classifier_path)
    manifold = build_manifold(cfg, classifier, manifold_choice, dm)
    indices, source, target = select_queries(dm, classifier, cfg.query)

    remove_stale_temps(out_dir)  # a killed run's half-written part (never read as a part)
    done = finished_query_ids(out_dir)
    todo = [i for i in indices if i not in done]
    log.info("%d queries (%s -> %s); %d already done in %s", len(indices), dm.class_names[source],
             dm.class_names[target], len(indices) - len(todo), out_dir)
    logger = build_logger(cfg, out_dir)
    if todo:
        write_config_stamp(out_dir, stamp)
        gt = dm.ground_truth(cfg.query.split, todo) if dm.has_ground_truth else None
        queries = QueryDataset(query_data, todo, [target] * len(todo), cfg.seed, gt)
        loader = torch.utils.data.DataLoader(queries, batch_size=int(cfg.query.batch_size),
                                             shuffle=False, num_workers=int(cfg.query.num_workers))
        fraction = cfg.query.get("memory_fraction")
        module = InversionModule(classifier, manifold, prior_factory, options, dm.class_names,
                                 prior_name=str(cfg.prior.name),
                                 memory_fraction=None if fraction is None else float(fraction))
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
    validity_metrics = add_validity(cfg, dm, classifier, rows, tensors, indices, target,  # judges, COUT, references
                                    byo=is_byo(cfg.models.classifier),
                                    surrogates=manifold.models if isinstance(manifold, SurrogateManifold) else None,
                                    robust=manifold.models if isinstance(manifold, RobustManifoldLoss) else None)
    validity_metrics.update(add_shortcut_figures(cfg, dm, classifier, rows, tensors, indices, target))  # planted cue
    write_results_table(out_dir / "results.csv", rows)
    keep = torch.isin(tensors["query_id"], torch.tensor(indices))
    if cfg.output.save_tensors and keep.any():
        torch.save({k: v[keep] for k, v in tensors.items()}, out_dir / "counterfactuals.pt")
    if keep.any():
        ids = tensors["query_id"][keep].tolist()
        gt = dm.ground_truth(cfg.query.split, ids)[0] if dm.has_ground_truth else None
        probs, verdicts = captions_from_rows(rows, ids)  # under each counterfactual
        save_grid(out_dir / "grid.png", tensors["query"][keep], tensors["counterfactual"][keep], gt,
                  max_rows=int(cfg.output.grid_max), target_prob=probs, verdict=verdicts)
    metrics = summarize(rows)
    metrics.update(validity_metrics)
    metrics.update(surrogates_provenance(cfg, manifold_choice))  # where the surrogates' recipe came from
    write_json(out_dir / "metrics.json", metrics)
    if logger is not None:
        tracking.log_job_outputs(logger, metrics, rows, {"cf/grid": out_dir / "grid.png"})
        logger.finalize("success")
    log.info("flip rate %.3f over %d queries -> %s", metrics.get("cf/flip_rate", float("nan")),
             len(rows), out_dir)
    return metrics
