"""Validity figures of a finished query job: independent judges, COUT, ground-truth recovery,
reference rows and the machine. One entry point, :func:`add_validity`, called by
``disc_pl.run`` after the results are merged; it adds columns to the rows and returns metrics.

Per query (``results.csv``): ``judge_flip`` (share of judges predicting the target),
``judge_target_prob``, ``cout`` (explained classifier), ``gt_recovery`` (ground truth only).
Metrics (``metrics.json``, W&B): ``cf/judge_flip_rate`` / ``cf/judge_target_prob`` (mean over
judges, ``_std`` across judges), ``judge/acc`` (clean test accuracy, mean and ``judge/acc_<i>``; ``judge/pair_acc`` on the
source / target test images, between those two classes),
``judge/query_flip_rate`` (the judges on the unchanged queries: a sanity line, near 0),
``reference/pgd/*`` (targeted PGD on pixels, same success criterion) and ``reference/gt/*``
(the true counterfactuals, synthetic data), ``env/cpu``. ``cf/cout`` and ``cf/gt_recovery``
come from ``run.summarize`` over the new columns.
"""
from __future__ import annotations

import logging
import platform
from typing import Any, Sequence

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from disc_pl.cf.engine import is_flipped
from disc_pl.cf.pgd import targeted_pgd
from disc_pl.data.corruptions import blur
from disc_pl.metrics import functional as FM
from disc_pl.metrics.judge import JudgeAgreement, judge_probs, verdicts
from disc_pl.metrics.validity import cout, gt_recovery
from disc_pl.models.judge import accuracy, ensure_judges, ensure_robust_judges, judge_datamodule, judges_enabled
from disc_pl.models.realism import RealismScore, ensure_realism, recon_error
from disc_pl.models.robust import l2_pgd

log = logging.getLogger(__name__)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _test_accuracy(judges: list[nn.Module], dm: Any, pair: tuple[int, int], limit: int = 2000
                   ) -> tuple[list[float], list[float]]:
    """Per judge: accuracy on the first ``limit`` test images (all classes), and on the test
    images of the query pair alone, deciding between the pair's two logits."""
    data = dm.dataset("test")
    n = min(limit, len(data))
    x = torch.stack([data[i]["image"] for i in range(n)])
    y = torch.stack([torch.as_tensor(data[i]["label"]) for i in range(n)]).long()
    in_pair = (y == pair[0]) | (y == pair[1])
    cols = torch.tensor(pair)
    pair_acc = []
    with torch.no_grad():
        for j in judges:
            if not in_pair.any():
                pair_acc.append(float("nan"))
                continue
            pred = cols[j(x[in_pair])[:, cols].argmax(1)]
            pair_acc.append(float((pred == y[in_pair]).float().mean()))
    return [accuracy(j, x, y) for j in judges], pair_acc


def _batched(fn, *tensors: Tensor, batch: int = 64) -> Tensor:
    return torch.cat([fn(*(t[i:i + batch] for t in tensors)) for i in range(0, len(tensors[0]), batch)])


# judge panel -> its key prefix: the plain judges, the adversarially trained ones
PANELS = {"plain": "judge", "robust": "judge_robust"}


def figures(classifier: nn.Module, panels: dict[str, list[nn.Module]], x: Tensor, x_cf: Tensor,
            source: int, target: int, margin: float, x_gt: Tensor | None, cout_steps: int,
            realism: RealismScore | None = None) -> dict[str, Any]:
    """Per-sample figures of counterfactuals ``x_cf`` of ``x``: dict of [N] tensors, plus, per
    judge panel (``PANELS``) with judges, ``<prefix>`` (the JudgeAgreement result)."""
    with torch.no_grad():
        logits = torch.cat([classifier(x_cf[i:i + 256]) for i in range(0, len(x_cf), 256)])
    tgt = torch.full((len(x),), target, dtype=torch.long)
    out: dict[str, Any] = {
        "flipped": is_flipped(logits, tgt, margin).float(), "mse": FM.mse(x, x_cf),
        "cout": _batched(lambda a, b: cout(classifier, a, b, source, target, cout_steps), x, x_cf)}
    if x_gt is not None:
        out["gt_recovery"] = gt_recovery(x, x_cf, x_gt)
    if realism is not None:
        out["im1"] = realism(x_cf)
        out["ae_gap"] = realism.gap(x, x_cf)
        if realism.has_nn:
            out["nn_margin"] = realism.nn(x_cf)
    for panel, judges in panels.items():
        if not judges:
            continue
        prefix = PANELS[panel]
        hit, p_t = verdicts(judge_probs(judges, x_cf), target)
        out[f"{prefix}_flip"], out[f"{prefix}_target_prob"] = hit.mean(0), p_t.mean(0)
        agreement = JudgeAgreement(judges)
        agreement.update(x_cf, target)
        out[prefix] = agreement.compute()
    return out


ROW_FIGURES = ("judge_flip", "judge_target_prob", "judge_robust_flip", "judge_robust_target_prob", "cout",
               "gt_recovery", "im1", "ae_gap", "nn_margin")


def _aggregate(prefix: str, figs: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in ("flipped", "mse", "cout", "gt_recovery", "im1", "ae_gap", "nn_margin"):
        if key in figs:
            v = figs[key][~torch.isnan(figs[key])]
            name = "flip_rate" if key == "flipped" else key
            out[f"{prefix}{name}"] = float(v.mean()) if len(v) else float("nan")
            if key != "flipped":
                out[f"{prefix}{name}_std"] = float(v.std(unbiased=False)) if len(v) else float("nan")
            if key == "gt_recovery":
                out[f"{prefix}{name}_median"] = float(v.median()) if len(v) else float("nan")
                out[f"{prefix}{name}_positive"] = float((v > 0).float().mean()) if len(v) else float("nan")
    for panel in PANELS.values():
        if panel in figs:
            out.update(_judge_keys(prefix, figs[panel], panel))
    return out


def _judge_keys(prefix: str, j: dict[str, Tensor], panel: str = "judge") -> dict[str, float]:
    return {f"{prefix}{panel}_flip_rate": float(j["flip_rate"]), f"{prefix}{panel}_flip_rate_std": float(j["flip_rate_std"]),
            f"{prefix}{panel}_target_prob": float(j["target_prob"]),
            f"{prefix}{panel}_target_prob_std": float(j["target_prob_std"])}


def noise_control(realism: RealismScore, x: Tensor, x_cf: Tensor, seed: int = 0) -> dict[str, float]:
    """The realism scores of two changes with no content, each as large (mean squared) as the
    counterfactuals' mean MSE: the queries plus Gaussian noise (seeded; ``realism/*_noise``) and
    the queries blurred by a Gaussian whose width is found to match that MSE (``realism/*_blur``,
    with ``realism/blur_sigma`` in pixels; the widest tried, 8 px, where the blur cannot reach it).
    A counterfactual that scores no better than these has not been shown realistic by the score."""
    xf = x.float()
    mse = float(FM.mse(xf, x_cf.float()).mean())
    blur_mse = lambda sigma: float(FM.mse(xf, blur(xf, sigma, "replicate")).mean())  # noqa: E731
    gen = torch.Generator().manual_seed(int(seed))
    controls = {"noise": (xf + mse ** 0.5 * torch.randn(x.shape, generator=gen)).clamp(0, 1)}
    lo, hi = 0.05, 8.0
    if blur_mse(hi) <= mse:
        lo = hi
    else:
        for _ in range(20):  # the blur's MSE grows with its width: bisect on it
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if blur_mse(mid) < mse else (lo, mid)
    controls["blur"] = blur(xf, lo, "replicate").clamp(0, 1)
    out = {"realism/blur_sigma": lo}
    for name, v in controls.items():
        v = v.to(x.dtype)
        out[f"realism/im1_{name}"] = float(realism(v).mean())
        if realism.has_nn:
            out[f"realism/nn_margin_{name}"] = float(realism.nn(v).mean())
    return out


def _real_target_images(dm: Any, target: int, n: int = 256) -> Tensor | None:
    """The first ``n`` test images of the target class (the judges' ceiling, IM1's calibration)."""
    data = dm.dataset("test")
    imgs = []
    for i in range(len(data)):
        item = data[i]
        if int(item["label"]) == target:
            imgs.append(item["image"])
            if len(imgs) >= n:
                break
    return torch.stack(imgs) if imgs else None


def _panel_metrics(name: str, judges: list[nn.Module], dm: Any, pair: tuple[int, int], x: Tensor,
                   real: Tensor | None, target: int, min_acc: float | None) -> tuple[dict[str, float], bool]:
    """Clean accuracy, floor (verdict on the unchanged queries) and ceiling (on real target-class
    test images) of one judge panel; False when a judge is below ``min_acc`` (a failed panel)."""
    accs, pair_accs = _test_accuracy(judges, dm, pair)
    key = "judge" if name == "plain" else "judge_robust"
    out = {f"{key}/acc_{i}": a for i, a in enumerate(accs)}
    out[f"{key}/acc"] = sum(accs) / len(accs)
    out[f"{key}/pair_acc"] = sum(pair_accs) / len(pair_accs)  # source vs target test images only
    out[f"{key}/k"] = len(judges)
    q = JudgeAgreement(judges)
    q.update(x, target)
    out[f"{key}/query_flip_rate"] = float(q.compute()["flip_rate"])  # the floor
    if real is not None:
        c = JudgeAgreement(judges)
        c.update(real, target)
        out[f"{key}/ceiling_real"] = float(c.compute()["flip_rate"])
    ok = min_acc is None or min(accs) >= min_acc
    if not ok:
        out[f"{key}/failed"] = 1.0
        log.error("robust judges: clean test accuracy %s is below judge.robust.min_acc=%.2f: a failed judge, its "
                  "verdicts are not reported (train longer: judge.robust.epochs, or a smaller judge.robust.eps)",
                  ", ".join(f"{a:.3f}" for a in accs), min_acc)
    return out, ok


class MeanLogits(nn.Module):
    """The mean logits of ``models`` (an ensemble for the surrogate PGD reference)."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([m(x) for m in self.models]).mean(0)


def add_validity(cfg: DictConfig, dm: Any, classifier: nn.Module, rows: list[dict], tensors: dict[str, Tensor],
                 indices: list[int], target: int, byo: bool = False,
                 surrogates: Sequence[nn.Module] | None = None,
                 robust: Sequence[nn.Module] | None = None) -> dict[str, Any]:
    """Adds ``judge_flip``, ``judge_target_prob``, ``cout``, ``gt_recovery`` to ``rows`` (in
    place; rows and the tensors are in query-id order) and returns the validity metrics.

    With ``surrogates`` (``manifold=surrogates``) and the PGD reference on, a third reference
    ``reference/pgd_surrogates/*``: the same PGD against the mean logits of the explained
    classifier and the surrogates, run to the method's own goal (``target_confidence``, else
    ``target_margin``): how far the surrogates alone carry a perturbation with no prior.
    With ``robust`` models (``manifold=robust``), ``reference/pgd_robust/*``: targeted L2 PGD
    against their mean logits alone, radius ``validity.pgd_robust.eps`` (no prior, no explained
    classifier): what the robust models' gradients draw by themselves."""
    metrics: dict[str, Any] = {"env/cpu": cpu_model()}
    if "query_id" not in tensors or not rows:
        return metrics
    keep = torch.isin(tensors["query_id"], torch.tensor(indices))
    ids, x, x_cf = tensors["query_id"][keep].tolist(), tensors["query"][keep], tensors["counterfactual"][keep]
    by_id = {int(r["query_id"]): r for r in rows}
    source = dm.class_index(rows[0]["source"])
    margin, steps = float(cfg.inversion.target_margin), int(cfg.validity.cout_steps)
    x_gt = dm.ground_truth(cfg.query.split, ids)[0] if dm.has_ground_truth else None
    panels, realism = {}, None
    if judges_enabled(cfg):
        # IM1 compares the queries' own class with the target (``source`` is what the classifier
        # predicted, which with query.require_correct=false may already be the target)
        label = int(rows[0].get("label", source))
        panels, realism = _judges(cfg, dm, byo, (source, target), x, label, metrics)
    figs = figures(classifier, panels, x, x_cf, source, target, margin, x_gt, steps, realism)
    if realism is not None:
        metrics.update(noise_control(realism, x, x_cf))
    for n, qid in enumerate(ids):
        row = by_id[qid]
        for key in ROW_FIGURES:
            if key in figs:
                row[key] = float(figs[key][n])
    for panel in PANELS.values():
        if panel in figs:
            metrics.update(_judge_keys("cf/", figs[panel], panel))
    references = _references(cfg, classifier, x, x_gt, target, surrogates, robust)
    for name, ref in references.items():
        metrics.update(_aggregate(f"reference/{name}/", figures(classifier, panels, x, ref, source, target,
                                                                margin, x_gt, steps, realism)))
    shown = [f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float) and ("judge" in k or "reference" in k)]
    if shown:
        log.info("validity: %s", ", ".join(shown))
    return metrics


def _judges(cfg: DictConfig, dm: Any, byo: bool, classes: tuple[int, int], x: Tensor, label: int,
            metrics: dict[str, Any]) -> tuple[dict[str, list[nn.Module]], Any]:
    """The judge panels that passed their accuracy bar (plain, robust) and the realism model,
    after adding each panel's accuracy, ceiling and floor and the realism calibration rows to
    ``metrics``."""
    source, target = classes
    jdm = judge_datamodule(cfg, dm, byo)
    real = _real_target_images(dm, target)
    panels: dict[str, list[nn.Module]] = {}
    panels["plain"], _ = ensure_judges(cfg, dm, byo, jdm)
    robust = ensure_robust_judges(cfg, dm, byo, jdm)
    for name, judges in (("plain", panels["plain"]), ("robust", robust)):
        if not judges:
            continue
        min_acc = float(cfg.judge.robust.min_acc) if name == "robust" else None
        found, ok = _panel_metrics(name, judges, dm, (source, target), x, real, target, min_acc)
        metrics.update(found)
        if ok and name == "robust":
            panels["robust"] = judges
    realism = ensure_realism(cfg, jdm, label, target) if label != target else None
    if realism is not None:  # its calibration: real target-class images and the unchanged queries
        metrics["realism/im1_queries"] = float(realism(x).mean())
        if realism.has_nn:
            metrics["realism/nn_margin_queries"] = float(realism.nn(x).mean())
        if real is not None:
            metrics["realism/im1_real_target"] = float(realism(real).mean())
            if realism.has_nn:
                metrics["realism/nn_margin_real_target"] = float(realism.nn(real).mean())
            # real target images against the real queries: the gap of an edit that lands on real images
            metrics["realism/ae_gap_real_target"] = float(recon_error(realism.ae_all, real).mean()
                                                          - recon_error(realism.ae_all, x).mean())
    return panels, realism


def _references(cfg: DictConfig, classifier: nn.Module, x: Tensor, x_gt: Tensor | None, target: int,
                surrogates: Sequence[nn.Module] | None, robust: Sequence[nn.Module] | None) -> dict[str, Tensor]:
    """The reference rows switched on (``validity.reference``): name -> the reference images."""
    vcfg, margin = cfg.validity, float(cfg.inversion.target_margin)
    on = vcfg.reference

    def pgd(model: nn.Module, goal: float) -> Tensor:
        p = vcfg.pgd
        return torch.cat([targeted_pgd(model, x[i:i + 64], target, goal, float(p.eps), float(p.alpha), int(p.steps))[0]
                          for i in range(0, len(x), 64)])

    refs: dict[str, Tensor] = {}
    if on.pgd:
        refs["pgd"] = pgd(classifier, margin)
    if on.gt and x_gt is not None:
        refs["gt"] = x_gt
    if on.pgd and surrogates:  # the ensemble, to the method's own goal
        goal = cfg.inversion.target_confidence
        refs["pgd_surrogates"] = pgd(MeanLogits([classifier, *surrogates]), margin if goal is None else float(goal))
    if on.pgd and robust:  # the robust models alone, L2
        tgt = torch.full((len(x),), target, dtype=torch.long)
        refs["pgd_robust"] = l2_pgd(MeanLogits(list(robust)), x, tgt, float(vcfg.pgd_robust.eps),
                                    int(vcfg.pgd_robust.steps), targeted=True, random_start=False)
    return refs
