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
from disc_pl.metrics import functional as FM
from disc_pl.metrics.judge import JudgeAgreement, judge_probs, verdicts
from disc_pl.metrics.validity import cout, gt_recovery
from disc_pl.models.judge import accuracy, ensure_judges, judges_enabled

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


def figures(classifier: nn.Module, judges: list[nn.Module] | None, x: Tensor, x_cf: Tensor,
            source: int, target: int, margin: float, x_gt: Tensor | None, cout_steps: int) -> dict[str, Any]:
    """Per-sample figures of counterfactuals ``x_cf`` of ``x``: dict of [N] tensors, plus
    ``judge`` (the JudgeAgreement result) when there are judges."""
    with torch.no_grad():
        logits = torch.cat([classifier(x_cf[i:i + 256]) for i in range(0, len(x_cf), 256)])
    tgt = torch.full((len(x),), target, dtype=torch.long)
    out: dict[str, Any] = {
        "flipped": is_flipped(logits, tgt, margin).float(), "mse": FM.mse(x, x_cf),
        "cout": _batched(lambda a, b: cout(classifier, a, b, source, target, cout_steps), x, x_cf)}
    if x_gt is not None:
        out["gt_recovery"] = gt_recovery(x, x_cf, x_gt)
    if judges:
        hit, p_t = verdicts(judge_probs(judges, x_cf), target)
        out["judge_flip"], out["judge_target_prob"] = hit.mean(0), p_t.mean(0)
        agreement = JudgeAgreement(judges)
        agreement.update(x_cf, target)
        out["judge"] = agreement.compute()
    return out


def _aggregate(prefix: str, figs: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in ("flipped", "mse", "cout", "gt_recovery"):
        if key in figs:
            v = figs[key][~torch.isnan(figs[key])]
            name = "flip_rate" if key == "flipped" else key
            out[f"{prefix}{name}"] = float(v.mean()) if len(v) else float("nan")
            if key != "flipped":
                out[f"{prefix}{name}_std"] = float(v.std(unbiased=False)) if len(v) else float("nan")
    if "judge" in figs:
        out.update(_judge_keys(prefix, figs["judge"]))
    return out


def _judge_keys(prefix: str, j: dict[str, Tensor]) -> dict[str, float]:
    return {f"{prefix}judge_flip_rate": float(j["flip_rate"]), f"{prefix}judge_flip_rate_std": float(j["flip_rate_std"]),
            f"{prefix}judge_target_prob": float(j["target_prob"]),
            f"{prefix}judge_target_prob_std": float(j["target_prob_std"])}


class MeanLogits(nn.Module):
    """The mean logits of ``models`` (an ensemble for the surrogate PGD reference)."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([m(x) for m in self.models]).mean(0)


def add_validity(cfg: DictConfig, dm: Any, classifier: nn.Module, rows: list[dict], tensors: dict[str, Tensor],
                 indices: list[int], target: int, byo: bool = False,
                 surrogates: Sequence[nn.Module] | None = None) -> dict[str, Any]:
    """Adds ``judge_flip``, ``judge_target_prob``, ``cout``, ``gt_recovery`` to ``rows`` (in
    place; rows and the tensors are in query-id order) and returns the validity metrics.

    With ``surrogates`` (``manifold=surrogates``) and the PGD reference on, a third reference
    ``reference/pgd_surrogates/*``: the same PGD against the mean logits of the explained
    classifier and the surrogates, run to the method's own goal (``target_confidence``, else
    ``target_margin``): how far the surrogates alone carry a perturbation with no prior."""
    metrics: dict[str, Any] = {"env/cpu": cpu_model()}
    if "query_id" not in tensors or not rows:
        return metrics
    keep = torch.isin(tensors["query_id"], torch.tensor(indices))
    ids, x, x_cf = tensors["query_id"][keep].tolist(), tensors["query"][keep], tensors["counterfactual"][keep]
    by_id = {int(r["query_id"]): r for r in rows}
    source = dm.class_index(rows[0]["source"])
    vcfg = cfg.get("validity") or {}
    margin = float(cfg.inversion.target_margin)
    steps = int(vcfg.get("cout_steps", 20))
    x_gt = dm.ground_truth(cfg.query.split, ids)[0] if dm.has_ground_truth else None
    judges = None
    if judges_enabled(cfg):
        judges, _ = ensure_judges(cfg, dm, byo)
        accs, pair_accs = _test_accuracy(judges, dm, (source, target))
        metrics.update({f"judge/acc_{i}": a for i, a in enumerate(accs)})
        metrics["judge/acc"] = sum(accs) / len(accs)
        metrics["judge/pair_acc"] = sum(pair_accs) / len(pair_accs)  # source vs target test images only
        metrics["judge/k"] = len(judges)
        q = JudgeAgreement(judges)
        q.update(x, target)
        metrics["judge/query_flip_rate"] = float(q.compute()["flip_rate"])
    figs = figures(classifier, judges, x, x_cf, source, target, margin, x_gt, steps)
    for n, qid in enumerate(ids):
        row = by_id[qid]
        for key in ("judge_flip", "judge_target_prob", "cout", "gt_recovery"):
            if key in figs:
                row[key] = float(figs[key][n])
    if "judge" in figs:
        metrics.update(_judge_keys("cf/", figs["judge"]))
    pcfg = vcfg.get("pgd") or {}

    def pgd(model: nn.Module, goal: float) -> Tensor:
        return torch.cat([targeted_pgd(model, x[i:i + 64], target, goal, float(pcfg.get("eps", 8 / 255)),
                                       float(pcfg.get("alpha", 1 / 255)), int(pcfg.get("steps", 100)))[0]
                          for i in range(0, len(x), 64)])

    # reference row -> the validity.reference switch that turns it on
    refs = {"pgd": "pgd", "gt": "gt", **({"pgd_surrogates": "pgd"} if surrogates else {})}
    for name, switch in refs.items():
        if not bool((vcfg.get("reference") or {}).get(switch, False)):
            continue
        if name == "gt":
            if x_gt is None:
                continue
            ref = x_gt
        elif name == "pgd":
            ref = pgd(classifier, margin)
        else:  # the ensemble, to the method's own goal
            goal = cfg.inversion.get("target_confidence")
            ref = pgd(MeanLogits([classifier, *surrogates]), margin if goal is None else float(goal))
        metrics.update(_aggregate(f"reference/{name}/", figures(classifier, judges, x, ref, source, target,
                                                                margin, x_gt, steps)))
    log.info("validity: %s", ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()
                                       if isinstance(v, float) and ("judge" in k or "reference" in k)))
    return metrics
