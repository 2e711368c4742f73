"""Does the explained classifier need the cue in its place, or anywhere? (issue 28)

    python experiments/shortcut/paste_cue.py outputs/model_cache/classifier-<hash>/model.ckpt \
        multirun/shortcut/<sweep>/<job> [...]

For each job (a `dataset.shortcut.kind=mark` run at 32 px with counterfactuals.pt), the
classifier's target probability on the job's queries with the planted mark pasted in (the
dataset's own coverage and colour): in its place, mirrored left-right (the top-left corner),
moved 4 px down / left, at half opacity, and on the query as it is. The share of queries it
predicts as the target and the median probability. No counterfactual is involved: this says what
an ideal counterfactual of this classifier could be (the mark alone, in its place), against which
the engine's change (`where_change.py`) is read. The classifier checkpoint is the one the job's
evaluate.log names ("reusing cached classifier model ...").
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from disc_pl.data.synthetic import MARK_RGB, cue_alpha
from disc_pl.models.loading import load_classifier


def variants(query: torch.Tensor) -> dict[str, torch.Tensor]:
    size = query.shape[-1]
    alpha = cue_alpha(size).view(1, 1, size, size)
    colour = torch.tensor(MARK_RGB).view(1, 3, 1, 1)

    def paste(a: torch.Tensor) -> torch.Tensor:
        return query * (1 - a) + colour * a

    return {"query as it is": query, "mark in its place": paste(alpha), "mirrored (top left)": paste(alpha.flip(-1)),
            "4 px down": paste(alpha.roll(4, -2)), "4 px left": paste(alpha.roll(-4, -1)),
            "half opacity": paste(0.5 * alpha)}


def main(checkpoint: str, jobs: list[str]) -> None:
    classifier = load_classifier(checkpoint).eval()
    print("| job | pasted | predicted target | median p(target) |")
    print("|---|---|---|---|")
    for job in jobs:
        query = torch.load(Path(job) / "counterfactuals.pt", weights_only=True)["query"]
        for name, x in variants(query).items():
            with torch.no_grad():
                p = torch.softmax(classifier(x), 1)[:, 1]  # the smiling class (CUE_CLASS)
            print(f"| {Path(job).name} | {name} | {float((p > 0.5).float().mean()):.2f} | {float(p.median()):.3f} |")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
