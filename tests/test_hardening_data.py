"""Hardening, data: the user's own folder of images, through the user-facing entry point
(``python -m disc_pl.run dataset=folder dataset.root=...`` / ``run.run``): each problem stops
the run with an error naming the path, and nothing half-trained is left in the model cache."""
from __future__ import annotations

import subprocess
import sys

import pytest

from disc_pl import run as run_lib
from disc_pl.errors import ConfigError, CorruptImageError, DatasetError, DatasetNotFoundError
from disc_pl.validate import validate_run_config

from fixtures_data import make_folder, write_garbage, write_truncated
from conftest import compose_cfg
from hardening_support import entries, subprocess_env

pytestmark = pytest.mark.usefixtures("one_thread")  # toy models on one thread

FOLDER = ["dataset=folder", "dataset.image_size=8", "dataset.num_workers=0", "dataset.batch_size=4",
          "models.classifier.width=8", "models.classifier.fit.trainer.max_epochs=1",
          "trainer.enable_progress_bar=false", "logger=none", "prior=tv", "query.count=2",
          "query.require_correct=false"]


def run_folder(tmp_path, root, *extra: str):
    cfg = compose_cfg([*FOLDER, f"dataset.root={root}", f"cache_dir={tmp_path / 'cache'}", *extra])
    return run_lib.run(cfg, out_dir=tmp_path / "out")


def test_missing_root_names_the_path_and_the_key(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        run_folder(tmp_path, tmp_path / "absent")
    msg = str(info.value)
    assert f"image folder not found: {tmp_path / 'absent'}" in msg and "dataset.root=" in msg
    assert entries(tmp_path / "cache") == []


@pytest.mark.slow
def test_missing_root_on_the_command_line(tmp_path):
    env = subprocess_env()
    proc = subprocess.run([sys.executable, "-m", "disc_pl.run", *FOLDER, f"dataset.root={tmp_path / 'absent'}",
                           f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'out'}"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr  # a user error: one message, usage status
    assert f"image folder not found: {tmp_path / 'absent'}" in proc.stderr
    assert entries(tmp_path / "cache") == []


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=f"no class subfolders in {tmp_path / 'empty'}"):
        run_folder(tmp_path, tmp_path / "empty")
    assert entries(tmp_path / "cache") == []


def test_class_folder_without_images(tmp_path):
    root = tmp_path / "imgs"
    make_folder(root, {"cat": 4, "dog": 4})
    (root / "emu").mkdir()
    (root / "emu" / "readme.txt").write_text("no images")
    with pytest.raises(DatasetError, match=f"class folder {root / 'emu'} contains no images"):
        run_folder(tmp_path, root)
    assert entries(tmp_path / "cache") == []


@pytest.mark.parametrize("write_bad", [write_garbage, write_truncated], ids=["garbage", "truncated"])
def test_corrupt_image_names_the_file_and_leaves_no_half_model(tmp_path, write_bad):
    root = tmp_path / "imgs"
    make_folder(root, {"cat": 6, "dog": 6})
    bad = write_bad(root / "dog" / "img_bad.jpg")
    with pytest.raises(CorruptImageError) as info:
        run_folder(tmp_path, root)
    assert f"cannot read image file {bad}" in str(info.value)
    assert "dataset.skip_corrupt=true" in str(info.value)  # how to go on
    assert entries(tmp_path / "cache") == []  # the interrupted training left nothing behind


def test_grayscale_data_with_an_rgb_normalisation_fails_before_the_data_is_read(tmp_path):
    """mean/std follow the data by default (null); an explicit RGB triple on gray data is refused."""
    validate_run_config(compose_cfg([*FOLDER, "dataset.channels=1", "cache_dir=/unused"]))  # the default works
    with pytest.raises(ConfigError) as info:
        run_folder(tmp_path, tmp_path / "not-read", "dataset.channels=1", "models.classifier.mean=[0.5,0.5,0.5]",
                   "models.classifier.std=[0.25,0.25,0.25]")
    err = info.value
    assert [p.key for p in err.problems] == ["models.classifier.mean", "models.classifier.std"]
    assert "models.classifier.mean=[0.5, 0.5, 0.5]: must be a list of 1 number (grayscale) for " \
           "dataset.channels=1" in str(err)
    assert entries(tmp_path / "cache") == []
    # the fix the message suggests is accepted
    validate_run_config(compose_cfg([*FOLDER, "dataset.channels=1", "models.classifier.mean=[0.5]",
                                     "models.classifier.std=[0.25]", "cache_dir=/unused"]))
