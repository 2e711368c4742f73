"""How much of each counterfactual's change does the explained classifier's own gradient account for?

    python experiments/realism/gradient_share.py <job dir> [<job dir> ...]

For every query x with counterfactual x' (the job's counterfactuals.pt), the change d = x' - x
is compared with the descent direction of the cross entropy to the target at the query,
-grad_x CE(F(x), target), of the explained classifier F and, where the job's manifold has them,
of the robust models: the cosine between d and that direction, and the first-order share of
F's margin change, <grad_x m(x), d> / (m(x') - m(x)) with m = logit_target - logit_source
(1: the change moves F exactly as its own linear approximation predicts). Prints the mean ± std
over the queries, and the same for the ground-truth counterfactual where the dataset has one.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from finished_job import load_job

from disc_pl.job import build_manifold


def _grad(model, x, target):
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), target, reduction="sum")
    g, = torch.autograd.grad(loss, x)
    return -g


def _margin(model, x, source, target):
    logits = model(x)
    return logits.gather(1, target[:, None]).squeeze(1) - logits.gather(1, source[:, None]).squeeze(1)


def _cos(a, b):
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


def _fmt(v: torch.Tensor) -> str:
    vals = [float(t) for t in v if torch.isfinite(t)]
    return f"{statistics.fmean(vals):.3f} ± {statistics.pstdev(vals):.3f}" if vals else "–"


def analyse(job: Path) -> None:
    cfg, dm, classifier, saved = load_job(job)
    manifold = build_manifold(cfg, classifier, None, dm)
    x, x_cf = saved["query"].float(), saved["counterfactual"].float()
    target = torch.full((len(x),), dm.class_index(cfg.query.target or dm.default_query_target), dtype=torch.long)
    source = torch.full((len(x),), dm.class_index(cfg.query.source or dm.default_query_source), dtype=torch.long)
    changes = {"counterfactual": x_cf - x}
    if dm.has_ground_truth:
        changes["ground truth"] = dm.ground_truth(cfg.query.split, saved["query_id"].tolist())[0] - x
    g_f = _grad(classifier, x, target)
    robust = getattr(manifold, "models", None)
    g_r = None
    if robust:
        g_r = torch.stack([_grad(m, x, target) for m in robust]).mean(0)
    with torch.enable_grad():
        xm = x.detach().requires_grad_(True)
        gm, = torch.autograd.grad(_margin(classifier, xm, source, target).sum(), xm)
    print(f"## {job}")
    for name, d in changes.items():
        with torch.no_grad():
            dm_true = _margin(classifier, x + d, source, target) - _margin(classifier, x, source, target)
        share = (gm * d).flatten(1).sum(1) / dm_true
        line = (f"- {name}: cos(change, -grad CE of F) {_fmt(_cos(d, g_f))}; "
                f"first-order share of F's margin change {_fmt(share)}")
        if g_r is not None:
            line += f"; cos(change, -grad CE of the robust models) {_fmt(_cos(d, g_r))}"
        print(line)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for arg in sys.argv[1:]:
        analyse(Path(arg))
