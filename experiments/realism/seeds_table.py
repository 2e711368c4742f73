"""Mean ± std over classifier seeds of a sweep's headline figures, one row per method.

    python experiments/realism/seeds_table.py multirun/realism/<time> [more sweep dirs ...]

The truth first (ground-truth recovery: mean, median and share > 0, per seed), then the robust
and the plain judges, the classifier-free realism scores (the nearest-real-image margin x1000:
< 0 is nearer real target-class images; IM1: < 1 is closer to the target class), the flip
rate, the change (MSE) and the engine's seconds per counterfactual. Methods are
grouped as ``disc_pl.report`` names them (the seed is not part of the name); the reference rows
(PGD, PGD on the robust models, the ground truth) follow, from the same jobs. Each figure is the
mean ± population std of the per-job values (each job: one classifier seed, its own queries).
"""
from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

from disc_pl.report import REFERENCES, find_jobs, group_methods

FIGURES = [  # (header, metrics key without prefix, digits)
    ("GT rec.", "gt_recovery", 2), ("GT rec. median", "gt_recovery_median", 2), ("GT rec. > 0", "gt_recovery_positive", 2),
    ("robust judge", "judge_robust_flip_rate", 3), ("plain judge", "judge_flip_rate", 3),
    ("NN margin x1000", "nn_margin", 2), ("IM1", "im1", 3),
    ("AE gap", "ae_gap", 2),
    ("flip rate", "flip_rate", 2), ("MSE", "mse", 4), ("s / cf", "seconds", 2),
]


def _scaled(key: str, value: float) -> float:
    """The nearest-real-image margin is a mean squared difference per pixel: shown x1000."""
    return 1000 * value if "nn_margin" in key else value


def _fmt(values: list[float], digits: int) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "–"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.pstdev(values):.{digits}f}"


def table(roots: list[Path]) -> str:
    jobs = [j for root in roots for j in find_jobs(root)]
    methods = group_methods(jobs)
    lines = ["| method | seeds | " + " | ".join(h for h, _, _ in FIGURES) + " | GT rec. per seed |",
             "|---" * (len(FIGURES) + 3) + "|"]

    def row(name: str, metrics: list[dict], prefix: str) -> str:
        cells = [_fmt([_scaled(k, float(m[f"{prefix}{k}"])) for m in metrics if f"{prefix}{k}" in m], d)
                 for _, k, d in FIGURES]
        per_seed = " / ".join(f"{float(m[f'{prefix}gt_recovery']):.2f}" for m in metrics if f"{prefix}gt_recovery" in m)
        return f"| {name} | {len(metrics)} | " + " | ".join(cells) + f" | {per_seed or '–'} |"

    for method in methods:
        lines.append(row(method.name, [j.metrics for j in method.jobs], "cf/"))
    every = [j.metrics for j in jobs]
    for prefix, name in REFERENCES.items():
        with_ref = [m for m in every if f"{prefix}flip_rate" in m]
        if with_ref:
            lines.append(row(name + f" ({len(with_ref)} jobs)", with_ref, prefix))
    cal = []
    for key, what in (("judge/acc", "plain judges' clean accuracy"), ("judge_robust/acc", "robust judges' clean accuracy"),
                      ("judge/ceiling_real", "plain judges on real target images"),
                      ("judge_robust/ceiling_real", "robust judges on real target images"),
                      ("judge/query_flip_rate", "plain judges on the unchanged queries"),
                      ("judge_robust/query_flip_rate", "robust judges on the unchanged queries"),
                      ("realism/im1_real_target", "IM1 of real target images"),
                      ("realism/im1_queries", "IM1 of the unchanged queries"),
                      ("realism/im1_noise", "IM1 of the queries + Gaussian noise at the counterfactuals' MSE"),
                      ("realism/im1_blur", "IM1 of the queries blurred to the counterfactuals' MSE"),
                      ("realism/blur_sigma", "that blur's sigma (px)"),
                      ("realism/nn_margin_real_target", "NN margin x1000 of real target images"),
                      ("realism/nn_margin_queries", "NN margin x1000 of the unchanged queries"),
                      ("realism/nn_margin_noise",
                       "NN margin x1000 of the queries + Gaussian noise at the counterfactuals' MSE"),
                      ("realism/nn_margin_blur", "NN margin x1000 of the queries blurred to the counterfactuals' MSE"),
                      ("realism/ae_gap_real_target", "AE gap of real target images (against the queries)")):
        vals = [_scaled(key, float(m[key])) for m in every if key in m]
        if vals:
            cal.append(f"- {what}: {_fmt(vals, 3)}")
    cpus = sorted({str(m.get("env/cpu")) for m in every})
    return "\n".join(lines + [""] + cal + [f"- CPU: {', '.join(cpus)}"])


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(table([Path(p) for p in sys.argv[1:]]))
