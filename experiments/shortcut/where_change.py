"""Where a shortcut run's change went, by the prior that made it (issue 28).

    python experiments/shortcut/where_change.py multirun/shortcut/<sweep>/<job> [...]

For each job (a folder with counterfactuals.pt and results.csv of a `dataset.shortcut.kind=mark`
run at 32 px), the share of sum|x' - x| per counterfactual, averaged over the queries of each
group (the warp's flips, the INR fallback's flips, the INR fallback's unflipped attempts), in:
the mark's mask (`cf/on_cue`'s region), a 3 px ring around it, the rest of the top-right quadrant,
the top-left quadrant, and the mark's mirror image (inside the top-left quadrant).
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from disc_pl.data.synthetic import attribute_mask, cue_alpha


def regions(size: int = 32, dilation: int = 1) -> dict[str, torch.Tensor]:
    """bool [H, W] regions; ``mask`` as the datamodule's ``cue_mask`` (dilation 1 by default)."""
    alpha = cue_alpha(size)[None] > 0
    mask = attribute_mask(alpha.float(), torch.zeros_like(alpha, dtype=torch.float32), dilation)[0, 0]
    ring = F.max_pool2d(mask[None, None].float(), 7, 1, 3)[0, 0].bool() & ~mask
    half = size // 2
    tr = torch.zeros(size, size, dtype=torch.bool)
    tr[:half, half:] = True
    tl = torch.zeros(size, size, dtype=torch.bool)
    tl[:half, :half] = True
    return {"mark": mask, "ring": ring, "top-right rest": tr & ~mask & ~ring, "top-left": tl,
            "mirror": mask.flip(-1)}


def shares(job: Path) -> list[tuple[str, int, dict[str, float]]]:
    d = torch.load(job / "counterfactuals.pt", weights_only=True)
    rows = {int(r["query_id"]): r for r in csv.DictReader(open(job / "results.csv"))}
    change = (d["counterfactual"] - d["query"]).abs().sum(1)  # [B, H, W]
    total = change.sum((1, 2)).clamp_min(1e-12)
    fallback = torch.tensor([rows[int(q)]["fallback"] == "True" for q in d["query_id"]])
    flipped = torch.tensor([rows[int(q)]["flipped"] == "True" for q in d["query_id"]])
    reg = regions(change.shape[-1])
    out = []
    for name, sel in (("warp, flipped", ~fallback & flipped), ("INR, flipped", fallback & flipped),
                      ("INR, not flipped", fallback & ~flipped)):
        if sel.any():
            out.append((name, int(sel.sum()),
                        {k: float(((change * m).sum((1, 2)) / total)[sel].mean()) for k, m in reg.items()}))
    return out


def main(jobs: list[str]) -> None:
    names = list(regions())
    print("| job | counterfactuals | n | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for job in jobs:
        for group, n, s in shares(Path(job)):
            print(f"| {Path(job).name} | {group} | {n} | " + " | ".join(f"{s[k]:.2f}" for k in names) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
