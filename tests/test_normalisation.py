"""Input normalisation follows the data: a model yaml with mean/std null gets the per-channel
statistics of the dataset's training split, stored in its checkpoint; explicit values win."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from disc_pl.data.folder import FolderDataModule
from disc_pl.data.stats import MIN_STD, channel_stats, with_data_stats
from disc_pl.models.cache import safe_load
from disc_pl.utils import CONF_DIR

from hardening_support import subprocess_env


class Items(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": torch.tensor(0), "index": i}


def test_channel_stats_match_hand_computed_values():
    # 2 images, 2 channels, 1x2 pixels: channel 0 = {0, 1, 0, 1}, channel 1 = constant 0.25
    x = torch.tensor([[[[0.0, 1.0]], [[0.25, 0.25]]], [[[0.0, 1.0]], [[0.25, 0.25]]]])
    mean, std = channel_stats(Items(x), batch_size=1)
    assert mean == [0.5, 0.25]
    assert std == [0.5, MIN_STD]  # population std; a constant channel gets the floor, not 0


def test_any_channel_count_and_batching_do_not_change_the_statistics():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(7, 5, 3, 4, generator=g)
    mean, std = channel_stats(Items(x), batch_size=3)
    flat = x.double().transpose(0, 1).reshape(5, -1)
    assert mean == pytest.approx(flat.mean(1).tolist(), abs=1e-6)
    assert std == pytest.approx(flat.std(1, unbiased=False).tolist(), abs=1e-6)


def test_only_null_values_are_filled():
    class DM:
        calls = 0

        def channel_stats(self):
            DM.calls += 1
            return [0.1], [0.2]

    assert with_data_stats({"mean": None, "std": None, "width": 8}, DM()) == {"mean": [0.1], "std": [0.2], "width": 8}
    assert with_data_stats({"mean": [0.5], "std": None}, DM()) == {"mean": [0.5], "std": [0.2]}  # explicit wins
    assert with_data_stats({"mean": [0.5], "std": [0.3]}, DM()) == {"mean": [0.5], "std": [0.3]}
    assert DM.calls == 2  # not asked when nothing is null
    assert with_data_stats({"mean": None}, object()) == {"mean": None}  # a stand-in without data


def write_gray_folder(root: Path) -> None:
    """Grayscale PNGs: dark noisy 'cat', bright noisy 'dog' (12 each, 10x10)."""
    rng = np.random.default_rng(0)
    for name, level in (("cat", 60), ("dog", 190)):
        (root / name).mkdir(parents=True)
        for j in range(12):
            pixels = np.clip(level + rng.normal(0, 20, (10, 10)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "L").save(root / name / f"{j:02d}.png")


@pytest.mark.slow
def test_grayscale_folder_runs_with_no_normalisation_flag(tmp_path):
    """``python -m disc_pl.run dataset=folder dataset.root=<gray> dataset.channels=1`` (plus toy sizes)."""
    root, cache = tmp_path / "gray", tmp_path / "cache"
    write_gray_folder(root)
    toy = ["dataset.image_size=8", "dataset.num_workers=0", "dataset.batch_size=8", "models.classifier.width=8",
           "models.classifier.fit.trainer.max_epochs=1", "trainer.enable_progress_bar=false", "logger=none",
           "prior=tv", "inversion.steps_per_stage=4", "inversion.min_steps=1", "query.split=train", "query.count=2",
           "query.require_correct=false"]
    proc = subprocess.run([sys.executable, "-m", "disc_pl.run", "dataset=folder", f"dataset.root={root}",
                           "dataset.channels=1", *toy, f"cache_dir={cache}", f"hydra.run.dir={tmp_path / 'out'}"],
                          capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert len(rows) == 2 and (tmp_path / "out" / "grid.png").exists()
    # the checkpoint holds the training split's statistics, one value per (gray) channel
    ckpt = next(cache.glob("classifier-*/model.ckpt"))
    hparams = safe_load(ckpt)["hyper_parameters"]
    reserved = OmegaConf.load(Path(CONF_DIR) / "dataset" / "folder.yaml").judge_fraction  # the judges' part
    dm = FolderDataModule(root=str(root), image_size=8, channels=1, num_workers=0, judge_fraction=reserved)
    dm.setup()
    expected = channel_stats(dm.dataset("train"))
    assert (hparams["mean"], hparams["std"]) == expected and len(expected[0]) == 1
    assert 60 / 255 < expected[0][0] < 190 / 255
