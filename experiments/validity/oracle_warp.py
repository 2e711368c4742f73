"""How close can a deformation of the query get to the true counterfactual? (an oracle)

Fits ``prior=warp`` fields directly to the ground-truth counterfactuals of a finished
``disc_pl.evaluate`` / ``disc_pl.run`` job on the synthetic faces (its counterfactuals.pt gives
the queries) and prints the ground-truth recovery 1 - |x'-x_gt|^2/|x-x_gt|^2 the best warp
reaches, per grid size. It uses no classifier: it bounds what any warp-based method can reach.

    python experiments/validity/oracle_warp.py multirun/validity/<time>/0_<job>
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from disc_pl.cf.priors import WarpPrior


def main(job: Path, grids=(6, 8, 12, 16, 32), steps: int = 400) -> None:
    cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
    dm = instantiate(cfg.dataset)
    dm.setup()
    saved = torch.load(job / "counterfactuals.pt", map_location="cpu", weights_only=True)
    x = saved["query"]
    x_gt = dm.ground_truth(cfg.query.split, saved["query_id"])[0]
    den = (x_gt - x).flatten(1).square().sum(1)
    for grid in grids:
        for smooth in (0.0, 0.01):
            prior = WarpPrior(x, list(range(len(x))), grid=grid, alpha_smooth=smooth)
            opt = torch.optim.Adam([prior.flow], lr=0.05)
            for _ in range(steps):
                out = prior()
                loss = (out - x_gt).flatten(1).square().sum(1) + 100 * prior.regularizer(out)
                opt.zero_grad()
                loss.sum().backward()
                opt.step()
            with torch.no_grad():
                rec = 1 - (prior() - x_gt).flatten(1).square().sum(1) / den
            print(f"grid {grid:2d}, alpha_smooth {smooth}: GT rec. mean {rec.mean():.3f}, median "
                  f"{rec.median():.3f}, 10th percentile {rec.quantile(0.1):.3f} ({len(x)} queries)")


if __name__ == "__main__":
    torch.manual_seed(0)
    main(Path(sys.argv[1]))
