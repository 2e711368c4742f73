"""Validity metrics from the literature, per sample and as torchmetrics (SPEC section 6 style).

- :func:`cout`: COUT, the counterfactual transition score of Khorram & Fuxin (CVPR 2022, C3LT).
  The query ``x`` is turned into the counterfactual ``x'`` in ``steps`` equal insertion steps:
  pixel locations are ranked by the change ``sum_c |x'-x|`` (largest first, ties by position)
  and at step ``t`` the first ``t/steps`` of them carry the counterfactual's values. With the
  explained classifier's probabilities ``p_target`` and ``p_source`` along the path,
  ``COUT = AUPC(p_target) - AUPC(p_source)`` where AUPC is the trapezoid area over the
  ``steps + 1`` points (x axis: inserted share, 0..1). In [-1, 1]; 1: the change moves all
  probability from source to target from the very first pixels on.
- :func:`gt_recovery`: on data with ground truth, ``1 - |x'-x_gt|^2 / |x-x_gt|^2`` (1: the
  true counterfactual; 0: no closer than the query; negative: further away). NaN where the
  query equals its ground truth.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from disc_pl.metrics.cf_metrics import SampleMeanStd


def insertion_path(x: Tensor, x_cf: Tensor, steps: int) -> Tensor:
    """``[steps + 1, B, C, H, W]``: x with the first ``t / steps`` of its pixel locations, in
    order of decreasing ``sum_c |x'-x|``, replaced by those of ``x_cf`` (t = 0..steps)."""
    if steps < 1:
        raise ValueError(f"COUT needs steps >= 1, got {steps}")
    if x.shape != x_cf.shape or x.dim() != 4:
        raise ValueError(f"x and x_cf must be [B, C, H, W] of one shape, got {tuple(x.shape)}, {tuple(x_cf.shape)}")
    b, _, h, w = x.shape
    change = (x_cf - x).abs().sum(1).reshape(b, -1)  # [B, HW]
    # stable sort: equal changes keep raster order, so the path is deterministic
    order = torch.sort(change, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w, device=x.device).expand(b, -1))
    path = []
    for t in range(steps + 1):
        k = round(t * h * w / steps)
        take = (rank < k).reshape(b, 1, h, w)
        path.append(torch.where(take, x_cf, x))
    return torch.stack(path)


@torch.no_grad()
def cout(classifier: nn.Module, x: Tensor, x_cf: Tensor, source: Tensor | int, target: Tensor | int,
         steps: int = 20) -> Tensor:
    """COUT per sample ``[B]`` (see the module docstring); ``classifier`` maps images to logits."""
    path = insertion_path(x, x_cf, steps)  # [T, B, C, H, W]
    t, b = path.shape[:2]
    probs = torch.softmax(classifier(path.reshape(t * b, *x.shape[1:])).float(), dim=1).reshape(t, b, -1)
    src = torch.as_tensor(source, device=probs.device).long().expand(b)
    tgt = torch.as_tensor(target, device=probs.device).long().expand(b)
    p_t = probs.gather(2, tgt.view(1, b, 1).expand(t, b, 1)).squeeze(2)  # [T, B]
    p_s = probs.gather(2, src.view(1, b, 1).expand(t, b, 1)).squeeze(2)
    diff = p_t - p_s
    return ((diff[1:] + diff[:-1]) / 2).mean(0)  # trapezoid over [0, 1] in `steps` equal parts


def gt_recovery(x: Tensor, x_cf: Tensor, x_gt: Tensor) -> Tensor:
    """``1 - |x'-x_gt|^2 / |x-x_gt|^2`` per sample ``[B]``; NaN where ``x == x_gt``."""
    if not (x.shape == x_cf.shape == x_gt.shape):
        raise ValueError(f"x, x_cf and x_gt must have one shape, got {tuple(x.shape)}, {tuple(x_cf.shape)}, "
                         f"{tuple(x_gt.shape)}")
    num = (x_cf - x_gt).flatten(1).double().square().sum(1)
    den = (x - x_gt).flatten(1).double().square().sum(1)
    out = 1.0 - num / den.clamp_min(1e-300)
    return torch.where(den > 0, out, torch.full_like(out, float("nan"))).float()


class COUT(SampleMeanStd):
    """Mean / std of :func:`cout` over the samples seen; needs the explained classifier."""

    higher_is_better = True

    def __init__(self, classifier: nn.Module, steps: int = 20, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.classifier, self.steps = classifier, int(steps)

    def update(self, x: Tensor, x_cf: Tensor, source: Tensor | int, target: Tensor | int) -> None:
        self._accumulate(cout(self.classifier, x, x_cf, source, target, self.steps))


class GTRecovery(SampleMeanStd):
    """Mean / std of :func:`gt_recovery` (NaN samples skipped and counted)."""

    higher_is_better = True

    def update(self, x: Tensor, x_cf: Tensor, x_gt: Tensor) -> None:
        self._accumulate(gt_recovery(x, x_cf, x_gt))
