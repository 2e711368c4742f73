"""The judges' verdict on counterfactuals (see disc_pl.models.judge for who the judges are).

For K judges and N images with target classes:

- per image: ``judge_flip`` = the share of judges whose argmax is the target, and
  ``judge_target_prob`` = their mean softmax probability of the target;
- per judge: its flip rate and mean target probability over the images; the aggregate
  figures are the mean over judges and the (population) std *across judges*, which says how
  much the verdict depends on which independent model is asked.

:class:`JudgeAgreement` is the torchmetrics form: per-judge sums, so batches and processes
accumulate exactly.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric


@torch.no_grad()
def judge_probs(judges: Sequence[nn.Module], images: Tensor, batch: int = 256) -> Tensor:
    """Softmax probabilities ``[K, N, classes]`` of each judge on ``images`` [N, C, H, W]."""
    out = []
    for judge in judges:
        out.append(torch.cat([torch.softmax(judge(images[i:i + batch]).float(), 1)
                              for i in range(0, len(images), batch)]))
    return torch.stack(out)


def verdicts(probs: Tensor, target: Tensor | int) -> tuple[Tensor, Tensor]:
    """(hit [K, N] float: judge argmax == target, p_target [K, N]) from ``judge_probs``."""
    k, n, _ = probs.shape
    tgt = torch.as_tensor(target, device=probs.device).long().expand(n)
    hit = (probs.argmax(2) == tgt).float()
    p_t = probs.gather(2, tgt.view(1, n, 1).expand(k, n, 1)).squeeze(2)
    return hit, p_t


class JudgeAgreement(Metric):
    """Per-judge flip rate and target probability; ``compute()`` -> dict of mean / std over
    judges (``flip_rate``, ``flip_rate_std``, ``target_prob``, ``target_prob_std``, ``count``)."""

    is_differentiable = False
    full_state_update = False
    higher_is_better = True

    def __init__(self, judges: Sequence[nn.Module], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not judges:
            raise ValueError("JudgeAgreement needs at least one judge")
        self.judges = nn.ModuleList(judges)
        k = len(judges)
        self.add_state("hits", default=torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("probs", default=torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: Tensor, target: Tensor | int) -> None:
        hit, p_t = verdicts(judge_probs(list(self.judges), images), target)
        self.hits += hit.double().sum(1)
        self.probs += p_t.double().sum(1)
        self.count += hit.shape[1]

    def compute(self) -> dict[str, Tensor]:
        n = self.count.clamp_min(1).double()
        flip, prob = self.hits / n, self.probs / n
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        if self.count == 0:
            flip, prob = flip + nan, prob + nan
        return {"flip_rate": flip.mean(), "flip_rate_std": flip.std(unbiased=False),
                "target_prob": prob.mean(), "target_prob_std": prob.std(unbiased=False),
                "per_judge_flip_rate": flip, "count": self.count}
