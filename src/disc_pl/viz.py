"""Image grids people can read: query | counterfactual | difference heatmap | ground truth.

What the picture must not hide:

- tiles are upscaled by an integer factor, nearest neighbour, to at least ``TILE`` (96) px, so
  a 32 px image shows its pixels instead of a blur or a stamp;
- the difference heatmaps of one grid share **one** scale, ``|x' - x|`` (max over channels)
  from 0 to the largest change in the grid, drawn as a colour bar labelled with that maximum:
  a change of 0.01 looks ten times fainter than one of 0.1;
- under each counterfactual: the classifier's probability of the target class and, when the
  results carry one, the judge's verdict.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

TILE = 96        # minimum pixels per tile side
PAD = 4
CAPTION_H = 26   # two text lines under a tile
BAR_W = 14


def font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def upscale_factor(size: int, tile: int = TILE) -> int:
    """The integer nearest-neighbour factor that brings ``size`` px to at least ``tile`` px."""
    return max(1, math.ceil(tile / max(1, int(size))))


def change(query: Tensor, cf: Tensor) -> Tensor:
    """``|x' - x|`` max over channels: ``[B, C, H, W]`` pairs -> ``[B, 1, H, W]``."""
    return (cf.float() - query.float()).abs().amax(1, keepdim=True)


def colormap(t: Tensor) -> Tensor:
    """Values in [0, 1] ``[B, 1, H, W]`` -> RGB ``[B, 3, H, W]`` (black -> red -> yellow -> white)."""
    t = t.clamp(0, 1)
    return torch.cat([(3 * t).clamp(0, 1), (3 * t - 1).clamp(0, 1), (3 * t - 2).clamp(0, 1)], 1)


def heatmap(diff: Tensor, vmax: float | None = None) -> Tensor:
    """A change ``[B, C, H, W]`` (signed or not) -> RGB heat image ``[B, 3, H, W]`` on one scale
    from 0 to ``vmax`` (default: the largest change in the batch, so the whole batch shares it)."""
    d = diff.float().abs().amax(1, keepdim=True)
    vmax = float(d.max()) if vmax is None else float(vmax)
    return colormap(d / max(vmax, 1e-8))


def to_pil(x: Tensor, tile: int = TILE) -> Image.Image:
    """``[C, H, W]`` in [0, 1] (1 or 3 channels; others: the first three / the mean) -> RGB PIL
    image upscaled nearest-neighbour by :func:`upscale_factor`."""
    x = x.float().clamp(0, 1)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    elif x.shape[0] != 3:
        x = x[:3] if x.shape[0] > 3 else x.mean(0, keepdim=True).expand(3, -1, -1)
    k = upscale_factor(max(x.shape[1:]), tile)
    x = F.interpolate(x[None], scale_factor=k, mode="nearest")[0]
    return Image.fromarray((x * 255).round().byte().permute(1, 2, 0).numpy(), "RGB")


def colour_bar(height: int, vmax: float, label: str = "|x'-x|") -> Image.Image:
    """A vertical colour bar ``height`` px tall: 0 at the bottom, ``vmax`` at the top (both written)."""
    f = font()
    width = BAR_W + 70
    bar = Image.new("RGB", (width, height), "white")
    inner = max(2, height - 40)
    ramp = torch.linspace(1, 0, inner).view(1, 1, inner, 1).expand(1, 1, inner, BAR_W)
    rgb = (colormap(ramp)[0] * 255).round().byte().permute(1, 2, 0).numpy()
    bar.paste(Image.fromarray(rgb, "RGB"), (2, 20))
    draw = ImageDraw.Draw(bar)
    draw.rectangle([2, 20, 2 + BAR_W, 20 + inner - 1], outline="black")
    draw.text((0, 2), label, fill="black", font=f)
    draw.text((BAR_W + 6, 20), f"max {vmax:.3g}", fill="black", font=f)
    draw.text((BAR_W + 6, 20 + inner - 10), "0", fill="black", font=f)
    return bar


def caption(target_prob: float | None = None, verdict: Any = None) -> list[str]:
    """The text under a counterfactual: ``p(target)=0.93`` and ``judge: <verdict>``."""
    lines = []
    if target_prob is not None and not (isinstance(target_prob, float) and math.isnan(target_prob)):
        lines.append(f"p(target)={float(target_prob):.2f}")
    if verdict is not None and verdict != "":
        lines.append(f"judge: {verdict}")
    return lines


def captions_from_rows(rows: Sequence[Mapping[str, Any]], ids: Sequence[int],
                       verdict_key: str | None = None) -> tuple[list[float | None], list[Any] | None]:
    """Per query id (in ``ids`` order): ``target_prob`` and the judge's verdict from results rows.
    The verdict column is ``verdict_key``, else the first column whose name contains "verdict";
    None when the rows have none."""
    by_id = {int(r["query_id"]): r for r in rows}
    if verdict_key is None:
        verdict_key = next((k for r in rows for k in r if "verdict" in str(k)), None)

    def prob(r: Mapping[str, Any] | None) -> float | None:
        try:
            return float(r["target_prob"]) if r is not None and r.get("target_prob") not in (None, "") else None
        except (TypeError, ValueError):
            return None

    probs = [prob(by_id.get(int(i))) for i in ids]
    verdicts = [by_id.get(int(i), {}).get(verdict_key) for i in ids] if verdict_key else None
    return probs, verdicts


def render_grid(query: Tensor, cf: Tensor, gt: Tensor | None = None, max_rows: int = 16,
                target_prob: Sequence[float | None] | None = None, verdict: Sequence[Any] | None = None,
                tile: int = TILE) -> Image.Image:
    """One query per row: query | counterfactual (+ caption) | change | ground truth, and the
    grid's one colour bar on the right."""
    n = min(len(query), max_rows)
    q, c = query[:n].float(), cf[:n].float()
    d = change(q, c)
    vmax = float(d.max()) if n else 0.0
    heat = colormap(d / max(vmax, 1e-8))
    side = upscale_factor(max(q.shape[-2:]), tile) * max(q.shape[-2:])
    titles = ["query", "counterfactual", "change (shared scale)"] + (["ground truth"] if gt is not None else [])
    header_h, row_h = 16, side + CAPTION_H + PAD
    bar = colour_bar(max(80, min(n * row_h, 3 * row_h)), vmax)
    width = PAD + len(titles) * (side + PAD) + bar.width + PAD
    canvas = Image.new("RGB", (width, header_h + max(n * row_h, bar.height) + PAD), "white")
    draw = ImageDraw.Draw(canvas)
    f = font()
    for col, title in enumerate(titles):
        draw.text((PAD + col * (side + PAD), 2), title, fill="black", font=f)
    for r in range(n):
        y = header_h + r * row_h
        tiles = [q[r], c[r], heat[r]] + ([gt[r].float()] if gt is not None else [])
        for col, t in enumerate(tiles):
            canvas.paste(to_pil(t, tile).resize((side, side), Image.NEAREST), (PAD + col * (side + PAD), y))
        text = caption(target_prob[r] if target_prob is not None else None,
                       verdict[r] if verdict is not None else None)
        for k, line in enumerate(text):
            draw.text((PAD + side + PAD, y + side + 2 + 11 * k), line, fill="black", font=f)
    canvas.paste(bar, (PAD + len(titles) * (side + PAD), header_h))
    return canvas


def save_grid(path: str | Path, query: Tensor, cf: Tensor, gt: Tensor | None = None, max_rows: int = 16,
              target_prob: Sequence[float | None] | None = None, verdict: Sequence[Any] | None = None) -> Path:
    path = Path(path)
    render_grid(query, cf, gt, max_rows, target_prob, verdict).save(path)
    return path
