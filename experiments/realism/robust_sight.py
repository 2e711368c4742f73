"""Do the robust manifold models see the true change? (synthetic faces)

    python experiments/realism/robust_sight.py <job dir> [<job dir> ...]

For a finished ``disc_pl.evaluate`` / ``disc_pl.run`` job with ``manifold=robust`` (its
counterfactuals.pt and .hydra/config.yaml), the queries are binned by the L2 norm of their true
change |x_gt - x| and, per bin, the script prints the robust models' mean target probability at
the query and at the true counterfactual, the explained classifier's at the truth, and the
ground-truth recovery of the counterfactual the job found.

An adversarially trained model cannot be moved by a change of L2 norm below its training radius
``eps``: where the true change is smaller, the robust models give the query and the truth the
same probability, and their gradient cannot guide the search towards the truth.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate
from finished_job import load_job

from disc_pl.job import build_manifold

BINS = (0.0, 0.5, 1.0, 1.5, float("inf"))


def analyse(job: Path) -> None:
    cfg, dm, classifier, saved = load_job(job, need_truth=True)
    if cfg.manifold.get("name") != "robust":
        raise SystemExit(f"{job}: not a manifold=robust job")
    robust = build_manifold(cfg, classifier, instantiate(cfg.manifold), dm).models
    x, found = saved["query"].float(), saved["counterfactual"].float()
    truth = dm.ground_truth(cfg.query.split, saved["query_id"].tolist())[0].float()
    target = dm.class_index(cfg.query.target or dm.default_query_target)
    norm = (truth - x).flatten(1).norm(dim=1)
    rec = 1 - (found - truth).flatten(1).square().sum(1) / norm.square()
    with torch.no_grad():
        p_rob = {k: torch.stack([m(im).softmax(1)[:, target] for m in robust]).mean(0)
                 for k, im in (("query", x), ("truth", truth))}
        p_clf = classifier(truth).softmax(1)[:, target]
    print(f"## {job} (robust models' eps {cfg.manifold.recipe.eps})\n")
    print("| true change L2 | queries | robust p(target): query -> truth | explained p(target) at the truth "
          "| GT rec. of the found (mean / median) |")
    print("|---|---|---|---|---|")
    for lo, hi in zip(BINS[:-1], BINS[1:]):
        sel = (norm >= lo) & (norm < hi)
        if not sel.any():
            continue
        print(f"| {lo:g}-{hi:g} | {int(sel.sum())} | {p_rob['query'][sel].mean():.3f} -> {p_rob['truth'][sel].mean():.3f} "
              f"| {p_clf[sel].mean():.3f} | {rec[sel].mean():.2f} / {rec[sel].median():.2f} |")
    print()


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    for p in sys.argv[1:]:
        analyse(Path(p))
