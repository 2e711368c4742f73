"""Does the method's own objective prefer the true counterfactual to the one it found?

    python experiments/realism/objective_at_truth.py <job dir> [<job dir> ...]

For a finished ``disc_pl.evaluate`` job on the synthetic faces (its counterfactuals.pt and
.hydra/config.yaml), every term of the job's objective that depends on the image alone
(semantic, manifold, the robust / surrogate ensemble, functional, optional terms) is evaluated
at three images per query: the query, the counterfactual the search found, and the ground-truth
counterfactual. The terms are weighted as in the last stage of the schedule (lambda1 relaxed
once per earlier stage). The prior's regulariser and the gate's area are left out: they belong to
a generator, and the truth has none.

If the search were only an optimisation problem, the truth would score lower than what was
found. The script prints, per term, mean / median at the three images, the share of queries on
which the truth scores lower in total, and that share with each term left out (which term
tips the balance).
"""
from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate
from finished_job import load_job

from disc_pl.cf.objective import Step, default_objective
from disc_pl.job import build_manifold, inversion_options

GENERATOR_TERMS = ("prior", "area")  # need a generator / gate: not defined at the true image


def _terms_at(classifier, terms, states, query, image, source, target) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        logits, feats = classifier.forward_features(image)
        step = Step(x=image, logits=logits, feats=feats, query=query, source=source, target=target,
                    idx=torch.arange(len(image)), prior=None, mask=None, classifier=classifier)
        return {t.name: t(step, states[t.name]).float() for t in terms}


def analyse(job: Path) -> dict[str, float]:
    cfg, dm, classifier, saved = load_job(job, need_truth=True)
    manifold_cfg = instantiate(cfg.manifold)
    options, _ = inversion_options(cfg, manifold_cfg)
    manifold = build_manifold(cfg, classifier, manifold_cfg, dm)
    terms = [t for t in default_objective(options, manifold) if t.name not in GENERATOR_TERMS]
    x, found = saved["query"].float(), saved["counterfactual"].float()
    truth = dm.ground_truth(cfg.query.split, saved["query_id"].tolist())[0].float()
    target = torch.full((len(x),), dm.class_index(cfg.query.target or dm.default_query_target), dtype=torch.long)
    source = torch.full((len(x),), dm.class_index(cfg.query.source or dm.default_query_source), dtype=torch.long)
    with torch.no_grad():
        states = {t.name: t.prepare(x, classifier.forward_features(x)[1]) for t in terms}
    weight = {t.name: t.weight_at(len(options.stages) - 1) for t in terms}
    at = {name: _terms_at(classifier, terms, states, x, img, source, target)
          for name, img in (("query", x), ("found", found), ("truth", truth))}
    total = {name: sum(weight[k] * v for k, v in vals.items()) for name, vals in at.items()}
    print(f"## {job}\n")
    print("| term (weight at the last stage) | query | found | truth |")
    print("|---|---|---|---|")
    for t in terms:
        cells = " | ".join(f"{at[n][t.name].mean():.3f} / {at[n][t.name].median():.3f}" for n in at)
        print(f"| {t.name} ({weight[t.name]:.3g}) | {cells} |")
    print(f"| weighted total | {' | '.join(f'{total[n].mean():.3f} / {total[n].median():.3f}' for n in at)} |")
    figures = {"truth_preferred": float((total["truth"] < total["found"]).float().mean())}
    print(f"\ntruth scores lower than the found counterfactual on {figures['truth_preferred']:.2f} of the queries")
    for t in terms:
        f = total["found"] - weight[t.name] * at["found"][t.name]
        g = total["truth"] - weight[t.name] * at["truth"][t.name]
        figures[f"without_{t.name}"] = float((g < f).float().mean())
        print(f"- without the {t.name} term: {figures[f'without_{t.name}']:.2f}")
    print()
    return figures


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    runs = [analyse(Path(p)) for p in sys.argv[1:]]
    if len(runs) > 1:
        print("## over the jobs (mean ± population std)\n")
        for key in runs[0]:
            vals = [r[key] for r in runs]
            print(f"- {key}: {statistics.fmean(vals):.2f} ± {statistics.pstdev(vals):.2f} "
                  f"({' / '.join(f'{v:.2f}' for v in vals)})")
