"""Test-time corruptions of query images (paper Figure 8): ``query.corruption={name, severity}``.

The classifier is trained on clean images; only the *queries* are corrupted, to see whether the
explanation still edits the attribute region. Four corruption families in the spirit of
ImageNet-C (Hendrycks & Dietterich 2019), with five severities each (0 = no corruption). The
per-severity values are ours, chosen for [0, 1] images at 32-96 pixels:

    gaussian_noise  x + N(0, s^2), s = 0.03 .. 0.15, clipped to [0, 1]
    gaussian_blur   Gaussian kernel, sigma = 0.5 .. 1.5 pixels at 32 px (scaled with image size)
    contrast        mean + c (x - mean), c = 0.75 .. 0.2 (mean over the image)
    jpeg            JPEG round trip at quality 80 .. 10 (PIL, in memory; 8-bit like files)

Everything random is drawn from a ``torch.Generator`` seeded with ``(seed, index)``, so a
query's corrupted version depends only on its index and the seed (stable across batches and
resumed runs).
"""
from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from disc_pl.errors import ConfigError

SEVERITIES = 5
_NOISE_STD = (0.03, 0.06, 0.09, 0.12, 0.15)
_BLUR_SIGMA_32PX = (0.5, 0.75, 1.0, 1.25, 1.5)
_CONTRAST = (0.75, 0.6, 0.45, 0.3, 0.2)
_JPEG_QUALITY = (80, 60, 40, 25, 10)


def gaussian_noise(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    std = _NOISE_STD[severity - 1]
    return (x + std * torch.randn(x.shape, generator=generator)).clamp(0, 1)


def blur(x: Tensor, sigma: float, padding: str = "reflect") -> Tensor:
    """Separable Gaussian blur of ``x [B, C, H, W]`` (std ``sigma`` pixels), the border padded by
    ``F.pad``'s ``padding`` mode (``replicate`` where the kernel may be wider than the image)."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    h = F.pad(x, (radius, radius, radius, radius), mode=padding)
    h = F.conv2d(h, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(h, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def gaussian_blur(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Separable Gaussian blur of ``x [C, H, W]`` with reflect padding."""
    return blur(x[None], _BLUR_SIGMA_32PX[severity - 1] * x.shape[-1] / 32)[0].clamp(0, 1)


def contrast(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    mean = x.mean()
    return (mean + _CONTRAST[severity - 1] * (x - mean)).clamp(0, 1)


def jpeg(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """JPEG encode/decode ``x [C, H, W]`` (C = 1 or 3) at the severity's quality."""
    pixels = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=_JPEG_QUALITY[severity - 1])
    decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert(image.mode))
    out = torch.from_numpy(decoded.copy()).float() / 255
    return out[None] if out.dim() == 2 else out.permute(2, 0, 1)


CORRUPTIONS: dict[str, Callable[[Tensor, int, torch.Generator], Tensor]] = {
    "gaussian_noise": gaussian_noise,
    "gaussian_blur": gaussian_blur,
    "contrast": contrast,
    "jpeg": jpeg,
}


def check_corruption(name: str | None, severity: int) -> None:
    """Raise ``ValueError`` naming the valid choices unless (name, severity) is usable."""
    if name is None:
        return
    if name not in CORRUPTIONS:
        raise ConfigError.one("query.corruption.name", name, f"is not known; use null or one of {sorted(CORRUPTIONS)}")
    if not 0 <= int(severity) <= SEVERITIES:
        raise ConfigError.one("query.corruption.severity", severity, f"must be in 0..{SEVERITIES}")


def corrupt(x: Tensor, name: str | None, severity: int, seed: int = 0) -> Tensor:
    """Corrupted copy of one image ``x [C, H, W]`` in [0, 1]; identity for name None / severity 0."""
    check_corruption(name, severity)
    if name is None or int(severity) == 0:
        return x
    generator = torch.Generator().manual_seed(int(seed))
    return CORRUPTIONS[name](x.float(), int(severity), generator).to(x.dtype)


class CorruptedDataset(Dataset):
    """``base`` with every item's ``"image"`` corrupted; item i uses seed ``(seed, i)``."""

    def __init__(self, base: Dataset, name: str | None, severity: int, seed: int = 0) -> None:
        check_corruption(name, severity)
        self.base, self.name, self.severity, self.seed = base, name, int(severity), int(seed)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.base[index])
        item["image"] = corrupt(item["image"], self.name, self.severity,
                                seed=self.seed * 1_000_003 + int(index))
        return item


def corrupted(base: Dataset, cfg: Any | None, seed: int = 0) -> Dataset:
    """``base`` corrupted as ``cfg`` (``{name, severity}`` or None) asks; ``base`` itself for none."""
    name = cfg.get("name") if cfg is not None else None
    severity = int(cfg.get("severity", 0)) if cfg is not None else 0
    check_corruption(name, severity)
    if name is None or severity == 0:
        return base
    return CorruptedDataset(base, name, severity, seed)
