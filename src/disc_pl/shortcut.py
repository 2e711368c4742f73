"""The planted-shortcut figures of a finished query job (issue 28), beside the validity figures
(:mod:`disc_pl.validity`): one entry point, :func:`add_shortcut_figures`, the one call of
``disc_pl.job.run`` after ``add_validity``. The figures themselves are
:mod:`disc_pl.metrics.shortcut`.

On a dataset with a planted cue (``dataset.shortcut.kind`` set), or with
``evaluate.shortcut=true`` (the clean arm of ``experiment=shortcut``: a classifier trained
without the cue, measured on the same region), it adds ``on_cue`` / ``cue_added`` / ``cue_corr``
to the rows of results.csv and returns the reliance figures ``shortcut/*`` with
``shortcut/cue_area_share``, ``cf/on_cue``, ``cf/cue_added``, ``cf/cue_corr`` (mean and ``_std``
over the flipped queries, as every quality figure) and, with the reference rows on
(``validity.reference``), ``reference/{pgd,gt}/{on_cue,cue_added,cue_corr,in_mask}``.
"""
from __future__ import annotations

import logging
import statistics
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from disc_pl.cf.pgd import targeted_pgd
from disc_pl.errors import ConfigError
from disc_pl.metrics import functional as FM
from disc_pl.metrics.shortcut import KEYS, cue_figures, reliance

log = logging.getLogger(__name__)


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v == v]
    return (statistics.fmean(values), statistics.pstdev(values)) if values else (float("nan"), float("nan"))


def wanted(cfg: DictConfig, dm: Any) -> bool:
    """Shortcut figures for this run: the dataset plants a cue, or ``evaluate.shortcut=true``
    (which then needs a dataset that can draw one)."""
    asked = bool(OmegaConf.select(cfg, "evaluate.shortcut", default=False))
    if asked and not hasattr(dm, "cue_mask"):
        raise ConfigError.one("evaluate.shortcut", True, f"dataset {dm.name!r} has no cue to measure; "
                              "use dataset=synthetic_faces or evaluate.shortcut=false")
    return bool(getattr(dm, "has_shortcut", False)) or asked


def add_shortcut_figures(cfg: DictConfig, dm: Any, classifier: nn.Module, rows: list[dict],
                         tensors: dict[str, Tensor], indices: list[int], target: int) -> dict[str, Any]:
    """Adds ``on_cue``, ``cue_added``, ``cue_corr`` to ``rows`` (in place) and returns the
    ``shortcut/*``, ``cf/*`` and reference figures (module docstring); {} when not
    :func:`wanted`."""
    if not wanted(cfg, dm):
        return {}
    mask = dm.cue_mask()
    metrics: dict[str, Any] = {**reliance(classifier, dm), "shortcut/cue_area_share": float(mask.float().mean())}
    if "query_id" not in tensors or not rows:
        return metrics
    keep = torch.isin(tensors["query_id"], torch.tensor(indices))
    ids = tensors["query_id"][keep].tolist()
    x, x_cf = tensors["query"][keep].float(), tensors["counterfactual"][keep].float()
    split, margin = cfg.query.split, float(cfg.inversion.target_margin)
    cue_change = dm.with_cue(split, ids, True) - dm.with_cue(split, ids, False)
    figs = cue_figures(classifier, x, x_cf, cue_change, mask, target, margin)
    by_id = {int(r["query_id"]): r for r in rows}
    for n, qid in enumerate(ids):
        by_id[qid].update({"on_cue": float(figs["on_cue"][n]), "cue_added": float(figs["cue_added"][n]),
                           "cue_corr": float(figs["cue_corr"][n])})
    flipped = [r for r in rows if r.get("status") == "flipped" and "on_cue" in r]
    for key in KEYS:  # over the flipped queries, as every quality figure (job.summarize)
        metrics[f"cf/{key}"], metrics[f"cf/{key}_std"] = _mean_std([float(r[key]) for r in flipped])
    metrics.update(_references(cfg, dm, classifier, x, ids, cue_change, mask, target, margin))
    log.info("shortcut: %s", ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()
                                       if isinstance(v, float) and not k.endswith("_std")))
    return metrics


def _references(cfg: DictConfig, dm: Any, classifier: nn.Module, x: Tensor, ids: list[int], cue_change: Tensor,
                mask: Tensor, target: int, margin: float) -> dict[str, float]:
    """The cue figures (and ``in_mask``) of the reference rows of ``disc_pl.validity``: targeted
    PGD (recomputed with the same settings: it is deterministic) and the true counterfactuals,
    over all queries as the other reference figures."""
    vcfg = cfg.get("validity") or {}
    switches, pcfg = vcfg.get("reference") or {}, vcfg.get("pgd") or {}
    gt = dm.ground_truth(cfg.query.split, ids) if dm.has_ground_truth else None
    refs: dict[str, Tensor] = {}
    if switches.get("pgd", False):
        refs["pgd"] = torch.cat([targeted_pgd(classifier, x[i:i + 64], target, margin, float(pcfg.get("eps", 8 / 255)),
                                              float(pcfg.get("alpha", 1 / 255)), int(pcfg.get("steps", 100)))[0]
                                 for i in range(0, len(x), 64)])
    if switches.get("gt", False) and gt is not None:
        refs["gt"] = gt[0]
    out: dict[str, float] = {}
    for name, ref in refs.items():
        figs = cue_figures(classifier, x, ref, cue_change, mask, target, margin)
        if gt is not None:
            figs["in_mask"] = FM.in_mask_fraction(x, ref, gt[1])
        for key, v in figs.items():
            out[f"reference/{name}/{key}"], out[f"reference/{name}/{key}_std"] = _mean_std(v.float().tolist())
    return out
