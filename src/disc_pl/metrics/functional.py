"""Per-sample counterfactual metrics as pure functions (SPEC section 6, paper sections 3.5 and 5).

Every function takes batched images in [0, 1] pixel space, ``x`` (the query) and ``x_cf`` (its
counterfactual), both ``[B, C, H, W]``, and returns one value per sample, ``[B]``. Nothing is
averaged over the batch here: the ``torchmetrics`` classes in ``cf_metrics.py`` accumulate these
values across batches and processes.

Conventions shared by all functions:
- The per-pixel change is ``d = max_c |x - x_cf|`` (``change_map``), so a change in one channel
  alone counts as a change of the pixel.
- A pixel is *changed* when ``d > threshold``, strictly: a change exactly at the threshold does not
  count. This makes ``threshold=0`` mean "any change at all" and keeps float round-off in pixels
  that were not touched (e.g. ``x_cf`` saved to 8-bit and reloaded, error <= 0.5/255) from counting.
- Ratios whose denominator is zero (an undefined value, not a zero one) return NaN. The metric
  classes skip NaN samples and count them separately, so callers can ignore them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "change_map",
    "changed_pixels",
    "concentration",
    "dilate_mask",
    "flipped",
    "in_mask_fraction",
    "mask_iou",
    "mse",
    "relative_gt_distance",
]


def _check_images(**images: Tensor) -> None:
    """Raise ValueError unless all images are 4-D floating tensors of one shape."""
    shapes = {name: tuple(t.shape) for name, t in images.items()}
    for name, t in images.items():
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, C, H, W], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a float tensor in [0, 1], got {t.dtype}")
    if len(set(shapes.values())) > 1:
        raise ValueError(f"image shapes differ: {shapes}")


def _as_mask(mask: Tensor, like: Tensor) -> Tensor:
    """Mask ``[B, 1, H, W]`` or ``[B, H, W]`` (any dtype, nonzero = inside) -> bool ``[B, H, W]``."""
    if mask.dim() == 4:
        if mask.shape[1] != 1:
            raise ValueError(f"mask must have one channel, got shape {tuple(mask.shape)}")
        mask = mask[:, 0]
    b, _, h, w = like.shape
    if tuple(mask.shape) != (b, h, w):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match images {tuple(like.shape)}")
    return mask != 0


def _safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den, NaN where den == 0 (undefined, not zero)."""
    return torch.where(den == 0, torch.full_like(num, float("nan")), num / torch.where(den == 0, 1, den))


def change_map(x: Tensor, x_cf: Tensor) -> Tensor:
    """Per-pixel change ``max_c |x - x_cf|``: ``[B, C, H, W]`` x2 -> ``[B, H, W]``."""
    _check_images(x=x, x_cf=x_cf)
    return (x - x_cf).abs().amax(dim=1)


def changed_pixels(x: Tensor, x_cf: Tensor, threshold: float = 0.05) -> Tensor:
    """Bool ``[B, H, W]``: pixels whose change is strictly greater than ``threshold``."""
    return change_map(x, x_cf) > threshold


def mse(x: Tensor, x_cf: Tensor) -> Tensor:
    """Mean over channels and pixels of ``(x - x_cf)^2`` -> ``[B]``."""
    _check_images(x=x, x_cf=x_cf)
    return (x - x_cf).square().flatten(1).mean(dim=1)


def _extent(occupied: Tensor) -> Tensor:
    """Length of the span from the first to the last True along dim 1, inclusive; 0 if none.

    occupied: bool ``[B, L]`` -> long ``[B]``. Vectorised: first/last are found with masked
    min/max over an index ramp instead of a loop over the batch.
    """
    length = occupied.shape[1]
    ramp = torch.arange(length, device=occupied.device)
    first = torch.where(occupied, ramp, length).amin(dim=1)
    last = torch.where(occupied, ramp, -1).amax(dim=1)
    # No True: last - first + 1 = -length, clamped to an empty span.
    return (last - first + 1).clamp_min(0)


def concentration(x: Tensor, x_cf: Tensor, threshold: float = 0.05) -> Tensor:
    """Bounding-box area of the changed pixels, as a fraction of the image area -> ``[B]``.

    Changed pixels are ``max_c |x - x_cf| > threshold`` (strict). The box is the single
    axis-aligned box that contains all of them, measured in whole pixels:
    ``(r_max - r_min + 1) * (c_max - c_min + 1) / (H * W)``. One changed pixel gives
    ``1 / (H * W)``; nothing changed gives 0. Lower = more concentrated edit.
    """
    changed = changed_pixels(x, x_cf, threshold)  # [B, H, W]
    _, h, w = changed.shape
    height = _extent(changed.any(dim=2))  # rows holding a change, [B]
    width = _extent(changed.any(dim=1))  # columns holding a change, [B]
    return (height * width).to(x.dtype) / (h * w)


def relative_gt_distance(x: Tensor, x_cf: Tensor, x_gt: Tensor) -> Tensor:
    """``||x_cf - x_gt|| / ||x - x_gt||`` (L2 over all channels and pixels) -> ``[B]``.

    0 when the counterfactual is the ground-truth counterfactual, 1 when it is the query
    unchanged, > 1 when it moved away from the ground truth. When ``x == x_gt`` the
    denominator is 0 and the ratio is undefined (the dataset asks for no change): NaN.
    """
    _check_images(x=x, x_cf=x_cf, x_gt=x_gt)
    num = torch.linalg.vector_norm((x_cf - x_gt).flatten(1), dim=1)
    den = torch.linalg.vector_norm((x - x_gt).flatten(1), dim=1)
    return _safe_ratio(num, den)


def dilate_mask(mask: Tensor, dilate: int) -> Tensor:
    """Dilate a bool ``[B, H, W]`` mask by ``dilate`` pixels with a square structuring element.

    A pixel joins the mask when a mask pixel lies within Chebyshev distance ``dilate``
    (a ``(2*dilate+1)^2`` square), computed as a stride-1 max-pool. ``dilate=0`` is the identity.
    """
    if dilate < 0:
        raise ValueError(f"dilate must be >= 0, got {dilate}")
    if dilate == 0:
        return mask
    pooled = F.max_pool2d(mask[:, None].float(), kernel_size=2 * dilate + 1, stride=1, padding=dilate)
    return pooled[:, 0] > 0


def in_mask_fraction(x: Tensor, x_cf: Tensor, mask: Tensor, dilate: int = 1) -> Tensor:
    """Share of the total absolute change that falls inside the (dilated) attribute mask -> ``[B]``.

    change = ``sum_c |x - x_cf|`` per pixel; value = change inside mask / total change, in [0, 1].
    The mask (``[B, 1, H, W]`` or ``[B, H, W]``, nonzero = attribute) is dilated by ``dilate``
    pixels first, so edits that touch the attribute's border are not penalised.
    No change at all (0 / 0) is NaN: there is nothing to attribute.
    """
    _check_images(x=x, x_cf=x_cf)
    inside = dilate_mask(_as_mask(mask, x), dilate)  # [B, H, W]
    change = (x - x_cf).abs().sum(dim=1)  # [B, H, W]
    total = change.flatten(1).sum(dim=1)
    within = (change * inside).flatten(1).sum(dim=1)
    return _safe_ratio(within, total)


def mask_iou(x: Tensor, x_cf: Tensor, mask: Tensor, threshold: float = 0.05) -> Tensor:
    """IoU between the changed pixels (``max_c |x - x_cf| > threshold``) and the mask -> ``[B]``.

    The mask is used as given (no dilation). Both sets empty (0 / 0) is NaN.
    """
    changed = changed_pixels(x, x_cf, threshold)
    inside = _as_mask(mask, x)
    inter = (changed & inside).flatten(1).sum(dim=1).to(x.dtype)
    union = (changed | inside).flatten(1).sum(dim=1).to(x.dtype)
    return _safe_ratio(inter, union)


def flipped(logits: Tensor, target: Tensor | int, margin: float = 0.0) -> Tensor:
    """Whether each counterfactual is classified as its target -> bool ``[B]``.

    logits: ``[B, K]`` classifier logits for the counterfactuals; target: ``[B]`` class indices
    (or one int for all). With ``margin == 0``: ``argmax(logits) == target`` (ties go to the
    lowest index, as ``torch.argmax``). With ``margin > 0`` the softmax probability of the
    target must also beat every other class by at least ``margin``:
    ``p_target - max_{k != target} p_k >= margin``.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, K], got shape {tuple(logits.shape)}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    b, k = logits.shape
    target = torch.as_tensor(target, device=logits.device).long().expand(b)
    if bool(((target < 0) | (target >= k)).any()):
        raise ValueError(f"target indices must be in [0, {k}), got {target.tolist()}")
    hit = logits.argmax(dim=1) == target
    if margin == 0:
        return hit
    probs = logits.float().softmax(dim=1)
    is_target = F.one_hot(target, k).bool()
    p_target = probs.gather(1, target[:, None])[:, 0]
    p_other = probs.masked_fill(is_target, float("-inf")).amax(dim=1)
    return hit & (p_target - p_other >= margin)
