"""Report figures, drawn with torchvision + PIL only (no plotting library needed).

- ``save_method_grid``: the same queries (rows) through every method (columns): query |
  method 1 counterfactual, change heatmap | method 2 ... Methods whose query differs from the
  first one (a corrupted query, Figure 8) also show their own query. One change scale for the
  whole grid (colour bar with its maximum); target probability under each counterfactual.
- ``save_scatter``: per-query MSE vs concentration, one colour per method, the method mean as
  a large marker (the paper's "large MSE, low concentration" trade-off, section 5).
"""
from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from disc_pl.viz import (CAPTION_H, caption, captions_from_rows, change, colormap, colour_bar, to_pil,
                         upscale_factor)

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
PAD = 4


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def load_counterfactuals(job_dirs: Sequence[Path]) -> dict[int, tuple[Tensor, Tensor]]:
    """query id -> (query, counterfactual) from the jobs' counterfactuals.pt (first job wins)."""
    out: dict[int, tuple[Tensor, Tensor]] = {}
    for job in job_dirs:
        path = Path(job) / "counterfactuals.pt"
        if not path.exists():
            continue
        saved = torch.load(path, map_location="cpu", weights_only=True)
        for qid, q, cf in zip(saved["query_id"].tolist(), saved["query"], saved["counterfactual"]):
            out.setdefault(int(qid), (q, cf))
    return out


def load_rows(job_dirs: Sequence[Path]) -> list[dict[str, str]]:
    """The jobs' results.csv rows (first job wins per query id)."""
    rows: dict[int, dict[str, str]] = {}
    for job in job_dirs:
        path = Path(job) / "results.csv"
        if path.exists():
            for r in csv.DictReader(path.open()):
                rows.setdefault(int(r["query_id"]), r)
    return list(rows.values())


def save_method_grid(path: Path, methods: Sequence[tuple[str, Sequence[Path]]], max_queries: int = 8) -> Path | None:
    """Grid of the first ``max_queries`` query ids common to every method; None if none is.
    Every change heatmap shares one scale (the largest change in the grid, on the colour bar);
    each counterfactual has its target probability (and judge verdict, if any) under it."""
    per_method = [(name, load_counterfactuals(dirs), load_rows(dirs)) for name, dirs in methods]
    per_method = [(n, cfs, rows) for n, cfs, rows in per_method if cfs]
    if not per_method:
        return None
    common = sorted(set.intersection(*(set(cfs) for _, cfs, _ in per_method)))[:max_queries]
    if not common:
        return None
    reference = per_method[0][1]
    captions = [captions_from_rows(rows, common) for _, _, rows in per_method]
    vmax = max(float(change(cfs[q][0][None], cfs[q][1][None]).max()) for _, cfs, _ in per_method for q in common)
    # Column plan: (header, kind, method index); "query" columns show that method's query.
    columns: list[tuple[str, str, int]] = [("query", "query", 0)]
    for m, (name, cfs, _) in enumerate(per_method):
        own_query = m > 0 and any(not torch.equal(cfs[q][0], reference[q][0]) for q in common)
        if own_query:
            columns.append(("query", "query", m))
        columns += [(name, "cf", m), ("change", "change", m)]
    side = upscale_factor(max(reference[common[0]][0].shape[-2:])) * max(reference[common[0]][0].shape[-2:])
    header_h, row_h = 28, side + CAPTION_H + PAD
    bar = colour_bar(max(80, min(len(common) * row_h, 3 * row_h)), vmax)
    width = len(columns) * (side + PAD) + PAD + bar.width + PAD
    height = header_h + max(len(common) * row_h, bar.height) + PAD
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font()
    for c, (title, kind, m) in enumerate(columns):
        x0 = PAD + c * (side + PAD)
        # Method names can be wider than a tile: the cf + change pair shares one header.
        if kind != "change":
            draw.text((x0, 4 if kind == "cf" else 14), title, fill="black", font=font)
        for r, q in enumerate(common):
            query, cf = per_method[m][1][q]
            if kind == "change":
                tile = colormap(change(query[None], cf[None]) / max(vmax, 1e-8))[0]
            else:
                tile = query if kind == "query" else cf
            y0 = header_h + PAD + r * row_h
            canvas.paste(to_pil(tile).resize((side, side), Image.NEAREST), (x0, y0))
            if kind == "cf":
                probs, verdicts = captions[m]
                text = caption(probs[r], verdicts[r] if verdicts is not None else None)
                for k, line in enumerate(text):
                    draw.text((x0, y0 + side + 2 + 11 * k), line, fill="black", font=font)
    canvas.paste(bar, (PAD + len(columns) * (side + PAD), header_h + PAD))
    canvas.save(path)
    return Path(path)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def save_scatter(path: Path, methods: Sequence[tuple[str, Sequence[tuple[float, float]]]],
                 size: tuple[int, int] = (720, 480)) -> Path:
    """Scatter of (MSE, concentration) points per method. The x axis is log10(MSE) when the
    MSEs span more than two decades (weak and strong priors differ by orders of magnitude)."""
    pts = [(n, [(x, y) for x, y in p if not (math.isnan(x) or math.isnan(y))]) for n, p in methods]
    xs = [x for _, p in pts for x, _ in p]
    positive = sorted(x for x in xs if x > 0)
    # Robust floor: a query left (almost) unchanged has an MSE of ~1e-20, which would squash
    # every other point into one column; values under the 2nd percentile sit on the floor.
    floor = positive[len(positive) // 50] if positive else 0.0
    log_x = bool(positive) and positive[-1] / floor > 100
    tx = (lambda v: math.log10(max(v, floor))) if log_x else (lambda v: v)  # noqa: E731
    if xs:
        x_lo, x_hi = min(tx(x) for x in xs), max(tx(x) for x in xs)
    else:
        x_lo, x_hi = 0.0, 1.0
    if x_hi - x_lo < 1e-12:
        x_lo, x_hi = x_lo - 0.5 * (abs(x_lo) or 1), x_hi + 0.5 * (abs(x_hi) or 1)
    y_lo, y_hi = 0.0, 1.0

    w, h = size
    left, right, top, bottom = 70, 190, 20, 50
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    font = _font()

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_lo) / (x_hi - x_lo) * (w - left - right),
                h - bottom - (y - y_lo) / (y_hi - y_lo) * (h - top - bottom))

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for t in _ticks(x_lo, x_hi):
        x, _ = px(t, y_lo)
        draw.line([x, h - bottom, x, h - bottom + 4], fill="black")
        draw.text((x - 15, h - bottom + 6), f"{10 ** t:.2g}" if log_x else f"{t:.2g}", fill="black", font=font)
    for t in _ticks(y_lo, y_hi):
        _, y = px(x_lo, t)
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((left - 34, y - 5), f"{t:.2f}", fill="black", font=font)
    draw.text(((left + w - right) / 2 - 40, h - 18), "MSE" + (" (log scale)" if log_x else ""), fill="black", font=font)
    draw.text((4, top - 14), "concentration", fill="black", font=font)

    for i, (name, p) in enumerate(pts):
        colour = PALETTE[i % len(PALETTE)]
        for x, y in p:
            cx, cy = px(tx(x), y)
            draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=colour)
        if p:  # method mean (of the plotted coordinates)
            mx = sum(tx(x) for x, _ in p) / len(p)
            my = sum(y for _, y in p) / len(p)
            cx, cy = px(mx, my)
            draw.rectangle([cx - 6, cy - 6, cx + 6, cy + 6], fill=colour, outline="black")
        ly = top + 14 * i
        draw.rectangle([w - right + 10, ly + 2, w - right + 18, ly + 10], fill=colour)
        draw.text((w - right + 22, ly), name[:28], fill="black", font=font)
    canvas.save(path)
    return Path(path)
