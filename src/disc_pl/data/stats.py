"""Input normalisation that follows the data: per-channel mean / std of a training split.

A model yaml with ``mean: null`` / ``std: null`` (the default of ``model=classifier`` and
``model=duq``) gets these statistics when it is built (:func:`with_data_stats`); they become
the model's hyper-parameters, so they are stored in its checkpoint and a cached model never
recomputes them. The statistics are a function of the data, which the model-cache key already
holds (the datamodule's fingerprint), so ``mean: null`` keys the cache correctly. Any channel
count works: there is one value per channel of the images the split yields.
"""
from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader, Dataset

# A channel that is constant over the training split has std 0; its normalised value is 0 for
# every training image whatever the std, so any positive floor is exact there.
MIN_STD = 1e-2


def channel_stats(data: Dataset, batch_size: int = 256, num_workers: int = 0) -> tuple[list[float], list[float]]:
    """(mean, std) per channel over every pixel of every image of ``data`` (population std),
    accumulated in float64 in one pass. Items are ``{"image": [C, H, W], ...}`` dicts."""
    total = total_sq = None
    count = 0
    for batch in DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers):
        x = batch["image"].double()  # [B, C, H, W]
        s, sq = x.sum(dim=(0, 2, 3)), x.pow(2).sum(dim=(0, 2, 3))
        total, total_sq = (s, sq) if total is None else (total + s, total_sq + sq)
        count += x.shape[0] * x.shape[2] * x.shape[3]
    if total is None:
        raise ValueError("channel_stats of an empty dataset")
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(0).sqrt().clamp_min(MIN_STD)
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def with_data_stats(args: dict[str, Any], datamodule: Any) -> dict[str, Any]:
    """``args`` (a model's constructor arguments) with a null ``mean`` / ``std`` replaced by the
    datamodule's training-split statistics. Arguments the model does not have, explicit values
    and datamodules without ``channel_stats`` (a stand-in object) are left as they are."""
    wanted = [k for k in ("mean", "std") if k in args and args[k] is None]
    stats = getattr(datamodule, "channel_stats", None)
    if not wanted or stats is None:
        return args
    mean, std = stats()
    return {**args, **{k: v for k, v in (("mean", mean), ("std", std)) if k in wanted}}
