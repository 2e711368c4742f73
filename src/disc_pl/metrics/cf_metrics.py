"""Counterfactual metrics as ``torchmetrics.Metric`` classes (SPEC section 6).

Each metric turns a batch into per-sample values with ``disc_pl.metrics.functional`` and keeps
four summed states, so accumulation over batches and across processes is exact:

    total      sum of the values          (float64, dist_reduce_fx="sum")
    total_sq   sum of the squared values  (float64, dist_reduce_fx="sum")
    count      number of finite samples   (long,    dist_reduce_fx="sum")
    nan_count  number of NaN samples      (long,    dist_reduce_fx="sum")

Convention:
- ``compute()`` returns the **mean** over all non-NaN samples seen (scalar tensor; NaN if none).
- ``compute_std()`` returns the **population** standard deviation over the same samples, i.e.
  ``torch.std(values, unbiased=False)`` (``correction=0``): it is defined for one sample and
  describes the spread of the evaluated set rather than estimating a larger population.
- ``compute_stats()`` returns ``{"mean", "std", "count", "nan_count"}`` from one sync.
NaN samples (undefined ratios, see ``functional``) are skipped and counted in ``nan_count``.
Sums are kept in float64 so that ``E[v^2] - E[v]^2`` keeps its precision over many samples.

``CounterfactualMetrics`` bundles them and returns the flat ``cf/...`` keys used in the logs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from disc_pl.metrics import functional as FM

class SampleMeanStd(Metric):
    """Base class: mean and std of per-sample values, NaN samples skipped.

    Subclasses implement ``update`` by calling ``self._accumulate(values)`` with a ``[B]`` tensor.
    """

    is_differentiable = False
    full_state_update = False
    higher_is_better: bool | None = None

    total: Tensor
    total_sq: Tensor
    count: Tensor
    nan_count: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_sq", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("nan_count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _accumulate(self, values: Tensor) -> None:
        values = values.detach().flatten().to(torch.float64)
        nan = torch.isnan(values)
        kept = values.masked_fill(nan, 0.0)  # no boolean indexing: avoids a host sync on GPU
        self.total += kept.sum()
        self.total_sq += kept.square().sum()
        self.count += (~nan).sum()
        self.nan_count += nan.sum()

    def _mean(self) -> Tensor:
        if self.count == 0:
            return torch.tensor(float("nan"), dtype=torch.float64, device=self.total.device)
        return self.total / self.count

    def _std(self) -> Tensor:
        mean = self._mean()
        var = self.total_sq / self.count.clamp_min(1) - mean.square()
        return var.clamp_min(0.0).sqrt()  # clamp: round-off can make a zero variance negative

    def compute(self) -> Tensor:
        """Mean over all non-NaN samples (synced across processes by torchmetrics)."""
        return self._mean()

    def compute_stats(self) -> dict[str, Tensor]:
        """``{"mean", "std" (population), "count", "nan_count"}``, synced across processes once."""
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn,
            should_sync=self._to_sync,
            should_unsync=self._should_unsync,
        ):
            return {
                "mean": self._mean().clone(),
                "std": self._std().clone(),
                "count": self.count.clone(),
                "nan_count": self.nan_count.clone(),
            }

    def compute_std(self) -> Tensor:
        """Population std (``unbiased=False``) over all non-NaN samples, synced across processes."""
        return self.compute_stats()["std"]


class CounterfactualMSE(SampleMeanStd):
    """Mean squared pixel difference between query and counterfactual; ``update(x, x_cf)``."""

    higher_is_better = False

    def update(self, x: Tensor, x_cf: Tensor) -> None:
        self._accumulate(FM.mse(x, x_cf))


class Concentration(SampleMeanStd):
    """Bounding-box area fraction of the changed pixels; ``update(x, x_cf)``."""

    higher_is_better = False

    def __init__(self, threshold: float = 0.05, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold

    def update(self, x: Tensor, x_cf: Tensor) -> None:
        self._accumulate(FM.concentration(x, x_cf, self.threshold))


class FlipRate(SampleMeanStd):
    """Fraction of counterfactuals classified as their target; ``update(logits_cf, target)``."""

    higher_is_better = True

    def __init__(self, margin: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.margin = margin

    def update(self, logits_cf: Tensor, target: Tensor | int) -> None:
        self._accumulate(FM.flipped(logits_cf, target, self.margin).float())


class RelativeGTDistance(SampleMeanStd):
    """``||x_cf - x_gt|| / ||x - x_gt||``; ``update(x, x_cf, x_gt)``."""

    higher_is_better = False

    def update(self, x: Tensor, x_cf: Tensor, x_gt: Tensor) -> None:
        self._accumulate(FM.relative_gt_distance(x, x_cf, x_gt))


class InMaskFraction(SampleMeanStd):
    """Share of the absolute change inside the dilated attribute mask; ``update(x, x_cf, mask)``."""

    higher_is_better = True

    def __init__(self, dilate: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dilate = dilate

    def update(self, x: Tensor, x_cf: Tensor, mask: Tensor) -> None:
        self._accumulate(FM.in_mask_fraction(x, x_cf, mask, self.dilate))


class MaskIoU(SampleMeanStd):
    """IoU of the thresholded change with the attribute mask; ``update(x, x_cf, mask)``."""

    higher_is_better = True

    def __init__(self, threshold: float = 0.05, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold

    def update(self, x: Tensor, x_cf: Tensor, mask: Tensor) -> None:
        self._accumulate(FM.mask_iou(x, x_cf, mask, self.threshold))


class CounterfactualMetrics(nn.Module):
    """All counterfactual metrics of one evaluation, updated together, reported as flat keys.

    Keys (``prefix`` defaults to ``"cf/"``):
        always:             cf/flip_rate, cf/mse, cf/mse_std, cf/concentration, cf/concentration_std
        ground_truth=True:  cf/gt_distance, cf/gt_distance_std, cf/in_mask, cf/in_mask_std,
                            cf/mask_iou, cf/mask_iou_std
    Means and population stds as in ``SampleMeanStd``. It is an ``nn.Module``, so ``.to(device)``
    moves all states; each metric syncs across processes on its own.
    """

    def __init__(
        self,
        ground_truth: bool,
        threshold: float = 0.05,
        margin: float = 0.0,
        dilate: int = 1,
        prefix: str = "cf/",
    ) -> None:
        super().__init__()
        self.ground_truth = ground_truth
        self.prefix = prefix
        # Key stem -> metric; insertion order is the order of the returned keys.
        self.metrics = nn.ModuleDict(
            {
                "flip_rate": FlipRate(margin=margin),
                "mse": CounterfactualMSE(),
                "concentration": Concentration(threshold=threshold),
            }
        )
        if ground_truth:
            self.metrics.update(
                {
                    "gt_distance": RelativeGTDistance(),
                    "in_mask": InMaskFraction(dilate=dilate),
                    "mask_iou": MaskIoU(threshold=threshold),
                }
            )

    def update(
        self,
        x: Tensor,
        x_cf: Tensor,
        logits_cf: Tensor,
        target: Tensor | int,
        x_gt: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> None:
        """x, x_cf, x_gt: ``[B, C, H, W]`` in [0, 1]; logits_cf: ``[B, K]``; target: ``[B]``;
        mask: ``[B, 1, H, W]`` bool. ``x_gt`` and ``mask`` are required iff ``ground_truth``."""
        has_gt = x_gt is not None or mask is not None
        if self.ground_truth and (x_gt is None or mask is None):
            raise ValueError("CounterfactualMetrics(ground_truth=True) needs both x_gt and mask")
        if not self.ground_truth and has_gt:
            raise ValueError("x_gt/mask given but CounterfactualMetrics was built with ground_truth=False")
        m = self.metrics
        m["flip_rate"].update(logits_cf, target)
        m["mse"].update(x, x_cf)
        m["concentration"].update(x, x_cf)
        if self.ground_truth:
            m["gt_distance"].update(x, x_cf, x_gt)
            m["in_mask"].update(x, x_cf, mask)
            m["mask_iou"].update(x, x_cf, mask)

    def compute(self) -> dict[str, Tensor]:
        """Flat ``{prefix + name: scalar}``; the flip rate has no ``_std`` (it is a proportion)."""
        out: dict[str, Tensor] = {}
        for name, metric in self.metrics.items():
            stats = metric.compute_stats()
            out[self.prefix + name] = stats["mean"]
            if name != "flip_rate":
                out[self.prefix + name + "_std"] = stats["std"]
        return out

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()
