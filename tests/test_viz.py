"""grid.png tells the truth: tiles upscaled nearest-neighbour to >= 96 px, one change scale per
grid (a 10x smaller change is 10x fainter), captions from the results rows."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from disc_pl import viz


def pair(deltas: list[float], size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Gray queries at 0.2; the counterfactual of query i is brighter by deltas[i] at pixel (2, 3)."""
    q = torch.full((len(deltas), 1, size, size), 0.2)
    cf = q.clone()
    for i, d in enumerate(deltas):
        cf[i, 0, 2, 3] += d
    return q, cf


@pytest.mark.parametrize("size, factor", [(8, 12), (32, 3), (64, 2), (96, 1), (128, 1)])
def test_upscale_factor_reaches_96_px_with_an_integer_factor(size, factor):
    assert viz.upscale_factor(size) == factor and size * factor >= viz.TILE


def test_upscaling_is_nearest_neighbour():
    x = torch.zeros(1, 8, 8)
    x[0, 2, 3] = 1.0
    img = np.asarray(viz.to_pil(x))
    assert img.shape == (96, 96, 3)
    block = img[24:36, 36:48]  # pixel (2, 3) -> a 12x12 block of pure white, nothing blurred
    assert (block == 255).all() and img[23, 36:48].max() == 0 and img[24:36, 48].max() == 0


def test_heatmaps_of_a_batch_share_one_scale():
    q, cf = pair([0.6, 0.06])
    heat = viz.heatmap(cf - q)
    assert heat[0, :, 2, 3].tolist() == pytest.approx([1.0, 1.0, 1.0])  # the grid's maximum: white
    assert heat[1, :, 2, 3].tolist() == pytest.approx([0.3, 0.0, 0.0], abs=1e-6)  # 0.1 of it: dark red
    assert heat[:, :, 0, 0].abs().max() == 0  # unchanged pixels are black


def test_grid_rows_share_the_scale_and_the_bar_shows_the_maximum():
    q, cf = pair([0.6, 0.06])
    img = np.asarray(viz.render_grid(q, cf, target_prob=[0.9, 0.4], verdict=["valid", "invalid"]))
    side = 96
    row_h = side + viz.CAPTION_H + viz.PAD
    x0 = viz.PAD + 2 * (side + viz.PAD)  # the change column

    def heat_pixel(row: int) -> np.ndarray:
        return img[16 + row * row_h + 2 * 12 + 6, x0 + 3 * 12 + 6]

    assert heat_pixel(0).tolist() == [255, 255, 255]
    assert heat_pixel(1).tolist() == [round(0.3 * 255), 0, 0]
    assert img.shape[1] > 3 * (side + viz.PAD) + viz.BAR_W  # the colour bar sits right of the tiles
    assert viz.caption(0.9, "valid") == ["p(target)=0.90", "judge: valid"]
    assert viz.caption(float("nan"), None) == [] and viz.caption(0.25, "") == ["p(target)=0.25"]


def test_captions_come_from_the_rows_by_query_id():
    rows = [{"query_id": "7", "target_prob": "0.8", "judge_verdict": "valid"},
            {"query_id": "3", "target_prob": "", "judge_verdict": "invalid"}]
    assert viz.captions_from_rows(rows, [3, 7]) == ([None, 0.8], ["invalid", "valid"])
    assert viz.captions_from_rows([{"query_id": 1, "target_prob": 0.5}], [1]) == ([0.5], None)  # no judge yet


def test_save_grid_writes_a_readable_png(tmp_path):
    from PIL import Image

    q, cf = pair([0.5, 0.1, 0.2], size=32)
    path = viz.save_grid(tmp_path / "grid.png", q, cf, gt=cf, target_prob=[0.9, 0.5, 0.7])
    with Image.open(path) as img:
        w, h = img.size
    assert h >= 3 * 96 and w >= 4 * 96  # 3 rows, 4 columns (query, cf, change, ground truth) of >= 96 px
