"""Image grids people can read: query | counterfactual | difference heatmap | ground truth."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torchvision.utils import make_grid, save_image


def heatmap(diff: Tensor) -> Tensor:
    """|x - x'| ``[B,C,H,W]`` -> RGB heat image ``[B,3,H,W]`` (black -> red -> yellow -> white).

    The scale is per image (max of the change), so small but localised changes stay visible;
    the absolute size of the change is in the results table (mse, concentration).
    """
    d = diff.abs().amax(1, keepdim=True)
    d = d / d.flatten(1).amax(1).clamp_min(1e-8)[:, None, None, None]
    r = (3 * d).clamp(0, 1)
    g = (3 * d - 1).clamp(0, 1)
    b = (3 * d - 2).clamp(0, 1)
    return torch.cat([r, g, b], 1)


def _rgb(x: Tensor) -> Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def grid_tensor(query: Tensor, cf: Tensor, gt: Tensor | None = None, max_rows: int = 16) -> Tensor:
    """A ``[3, H', W']`` grid, one query per row."""
    n = min(len(query), max_rows)
    q, c = _rgb(query[:n].float()), _rgb(cf[:n].float())
    cols = [q, c, heatmap(c - q)] + ([_rgb(gt[:n].float())] if gt is not None else [])
    tiles = torch.stack(cols, 1).flatten(0, 1)  # row-major: query i's columns together
    return make_grid(tiles, nrow=len(cols), padding=2, pad_value=1.0)


def save_grid(path: str | Path, query: Tensor, cf: Tensor, gt: Tensor | None = None,
              max_rows: int = 16) -> Path:
    path = Path(path)
    save_image(grid_tensor(query, cf, gt, max_rows), path)
    return path
