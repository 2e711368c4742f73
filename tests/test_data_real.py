"""Behavioural tests of the on-disk datamodules (celeba, isic2018, folder) on tiny fixtures
written in their exact layouts (see fixtures_data.py)."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from disc_pl.data import (CelebADataModule, CorruptImageError, DatasetError, DatasetNotFoundError,
                          FolderDataModule, ISIC2018DataModule)
from disc_pl.data.imageio import load_image

from fixtures_data import (ISIC_CLASSES, PALETTE, make_celeba, make_folder, make_isic, write_garbage,
                           write_image, write_truncated)

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset"
LUMA = [(0.299 * r + 0.587 * g + 0.114 * b) / 255 for r, g, b in PALETTE]


def colour_class(image: torch.Tensor) -> int:
    """Palette index whose luminance is nearest the (flat) image's mean luminance."""
    mean = image.mean(dim=(1, 2))
    luma = mean[0] if len(mean) == 1 else 0.299 * mean[0] + 0.587 * mean[1] + 0.114 * mean[2]
    return min(range(len(LUMA)), key=lambda c: abs(LUMA[c] - float(luma)))


def items(dm, split):
    ds = dm.dataset(split)
    return [ds[i] for i in range(len(ds))]


# --------------------------------------------------------------------------- CelebA
PARTITION = [0] * 8 + [1] * 4 + [2] * 4
SMILING = [i % 2 == 0 for i in range(16)]


@pytest.fixture
def celeba_root(tmp_path):
    make_celeba(tmp_path / "celeba", PARTITION, SMILING)
    return tmp_path / "celeba"


def test_celeba_reads_official_layout_with_center_crop(celeba_root):
    dm = CelebADataModule(root=str(celeba_root), image_size=8, crop_size=16, batch_size=4)
    dm.setup()
    assert dm.class_names == ["not_smiling", "smiling"]
    assert (dm.default_query_source, dm.default_query_target) == ("not_smiling", "smiling")
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [8, 4, 4]
    for split, offset in (("train", 0), ("val", 8), ("test", 12)):
        for it in items(dm, split):
            img, label = it["image"], int(it["label"])
            assert img.shape == (3, 8, 8) and img.dtype == torch.float32
            assert 0.0 <= img.min() and img.max() <= 1.0
            assert label == int(SMILING[offset + it["index"]])
            # the crop keeps only the white / black square: no green border left
            assert (img.mean() > 0.85) if label else (img.mean() < 0.15)
            assert float(img[1].mean() - (img[0].mean() + img[2].mean()) / 2) < 0.08
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 8, 8) and batch["label"].dtype == torch.long


def test_celeba_other_attribute_subsample_and_bad_attribute(celeba_root):
    dm = CelebADataModule(root=str(celeba_root), attribute="Bald", image_size=8, crop_size=16)
    dm.setup()
    assert dm.class_names == ["not_bald", "bald"] and dm.class_index("bald") == 1
    assert [int(it["label"]) for it in items(dm, "train")] == [int(i % 3 == 0) for i in range(8)]
    sub = CelebADataModule(root=str(celeba_root), image_size=8, crop_size=16, max_per_split=3, seed=5)
    sub.setup()
    again = CelebADataModule(root=str(celeba_root), image_size=8, crop_size=16, max_per_split=3, seed=5)
    again.setup()
    assert [len(sub.dataset(s)) for s in ("train", "val", "test")] == [3, 3, 3]
    assert sub.dataset("train").paths == again.dataset("train").paths
    assert sub.dataset("train").paths == sorted(sub.dataset("train").paths)
    assert sub.fingerprint()["max_per_split"] == 3 and json.dumps(sub.fingerprint())
    with pytest.raises(DatasetError, match="Smiling.*Young|Young.*Smiling"):
        CelebADataModule(root=str(celeba_root), attribute="Happy").setup()


def test_celeba_missing_root_and_missing_file(tmp_path, celeba_root):
    missing = tmp_path / "nowhere" / "celeba"
    with pytest.raises(DatasetNotFoundError) as err:
        CelebADataModule(root=str(missing)).setup()
    msg = str(err.value)
    assert str(missing) in msg and "dataset.root=" in msg and "mmlab.ie.cuhk.edu.hk" in msg
    assert "list_eval_partition.txt" in msg  # the expected layout
    (celeba_root / "list_eval_partition.txt").unlink()
    with pytest.raises(FileNotFoundError, match="list_eval_partition.txt"):
        CelebADataModule(root=str(celeba_root)).setup()


def test_celeba_corrupt_image_error_and_skip(celeba_root, caplog):
    bad = write_garbage(celeba_root / "img_align_celeba" / "000003.jpg")
    dm = CelebADataModule(root=str(celeba_root), image_size=8, crop_size=16)
    dm.setup()
    with pytest.raises(CorruptImageError, match=str(bad)):
        items(dm, "train")
    with caplog.at_level(logging.WARNING):
        skip = CelebADataModule(root=str(celeba_root), image_size=8, crop_size=16, skip_corrupt=True)
        skip.setup()
    assert len(skip.dataset("train")) == 7 and bad not in skip.dataset("train").paths
    assert len(items(skip, "train")) == 7
    assert "skipped 1" in caplog.text


# --------------------------------------------------------------------------- ISIC 2018
PER_CLASS = [20, 40, 10, 10, 10, 5, 5]


@pytest.fixture(scope="module")
def isic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("isic")
    make_isic(root, PER_CLASS)
    return root


def test_isic_reads_layout_with_stratified_splits(isic_root):
    dm = ISIC2018DataModule(root=str(isic_root), image_size=8)
    dm.setup()
    assert dm.class_names == ISIC_CLASSES and dm.num_classes == 7
    assert (dm.default_query_source, dm.default_query_target) == ("MEL", "NV")
    seen: list = []
    counts = {}
    for split in ("train", "val", "test"):
        its = items(dm, split)
        for it in its:
            assert it["image"].shape == (3, 8, 8) and 0 <= it["image"].min() and it["image"].max() <= 1
            assert colour_class(it["image"]) == int(it["label"])  # image paired with its own label
        counts[split] = Counter(int(it["label"]) for it in its)
        seen += dm.dataset(split).paths
    assert len(seen) == len(set(seen)) == sum(PER_CLASS)  # a partition of all images
    for c, n in enumerate(PER_CLASS):
        n_test = max(1, round(0.1 * n))
        assert counts["test"][c] == n_test
        assert counts["val"][c] == max(1, round(0.1 * (n - n_test)))
        assert counts["train"][c] == n - n_test - counts["val"][c]


def test_isic_split_depends_on_seed_only(isic_root):
    a, b, c = (ISIC2018DataModule(root=str(isic_root), image_size=8, seed=s) for s in (0, 0, 1))
    for dm in (a, b, c):
        dm.setup()
    assert a.dataset("test").paths == b.dataset("test").paths
    assert a.dataset("test").paths != c.dataset("test").paths
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_isic_missing_root_and_malformed_csv(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        ISIC2018DataModule(root=str(tmp_path / "isic_missing")).setup()
    assert str(tmp_path / "isic_missing") in str(err.value) and "challenge.isic-archive.com" in str(err.value)
    root = tmp_path / "isic"
    make_isic(root, [2, 2, 2, 2, 2, 2, 2])
    csv_path = root / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv"
    csv_path.write_text(csv_path.read_text() + "ISIC_9999999,1.0,1.0,0.0,0.0,0.0,0.0,0.0\n")
    with pytest.raises(DatasetError, match="line 16"):
        ISIC2018DataModule(root=str(root)).setup()


# --------------------------------------------------------------------------- folder
def test_folder_single_root_rgb_and_grayscale(tmp_path):
    root = tmp_path / "pets"
    index = make_folder(root, {"cat": 20, "dog": 30, "emu": 10})
    dm = FolderDataModule(root=str(root), image_size=12, val_fraction=0.2, test_fraction=0.1)
    dm.setup()
    assert dm.class_names == ["cat", "dog", "emu"] and dm.class_index("dog") == index["dog"]
    assert (dm.default_query_source, dm.default_query_target) == ("cat", "dog")
    counts = {}
    for split in ("train", "val", "test"):
        its = items(dm, split)
        assert all(it["image"].shape == (3, 12, 12) for it in its)
        assert all(colour_class(it["image"]) == int(it["label"]) for it in its)
        counts[split] = Counter(int(it["label"]) for it in its)
    assert [counts["test"][c] for c in range(3)] == [2, 3, 1]
    assert [counts["val"][c] for c in range(3)] == [4, 5, 2]  # 0.2 of what test left
    assert sum(len(dm.dataset(s)) for s in ("train", "val", "test")) == 60  # notes.txt ignored

    gray = FolderDataModule(root=str(root), image_size=12, channels=1)
    gray.setup()
    it = gray.dataset("train")[0]
    assert it["image"].shape == (1, 12, 12)
    assert all(colour_class(x["image"]) == int(x["label"]) for x in items(gray, "test"))


def test_folder_predefined_splits_and_carved_val(tmp_path):
    root = tmp_path / "digits"
    make_folder(root / "train", {"a": 6, "b": 4})
    make_folder(root / "val", {"a": 2, "b": 1})
    make_folder(root / "test", {"a": 3, "b": 2})
    dm = FolderDataModule(root=str(root), image_size=8)
    dm.setup()
    assert dm.class_names == ["a", "b"]
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [10, 3, 5]
    assert [int(x["label"]) for x in items(dm, "test")] == [0, 0, 0, 1, 1]

    no_val = tmp_path / "no_val"
    make_folder(no_val / "train", {"a": 10, "b": 10})
    make_folder(no_val / "test", {"a": 1, "b": 1})
    dm = FolderDataModule(root=str(no_val), image_size=8, val_fraction=0.2)
    dm.setup()
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [16, 4, 2]
    assert Counter(int(x["label"]) for x in items(dm, "val")) == {0: 2, 1: 2}


def test_folder_errors_name_the_path(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        FolderDataModule(root=str(tmp_path / "absent")).setup()
    assert str(tmp_path / "absent") in str(err.value) and "dataset.root=" in str(err.value)
    root = tmp_path / "imgs"
    make_folder(root, {"x": 3, "y": 3})
    (root / "z").mkdir()
    (root / "z" / "readme.md").write_text("no images here")
    with pytest.raises(DatasetError, match=str(root / "z")):
        FolderDataModule(root=str(root)).setup()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=str(empty)):
        FolderDataModule(root=str(empty)).setup()
    with pytest.raises(ValueError, match="channels"):
        FolderDataModule(root=str(root), channels=2)


def test_folder_corrupt_file_error_in_worker_and_skip(tmp_path, caplog):
    root = tmp_path / "imgs"
    make_folder(root, {"x": 6, "y": 6})
    bad = write_garbage(root / "y" / "broken.JPG")
    empty = root / "x" / "zero.png"
    empty.write_bytes(b"")
    with pytest.raises(CorruptImageError, match="zero.png"):  # 0-byte files are caught at setup
        FolderDataModule(root=str(root)).setup()
    empty.unlink()
    dm = FolderDataModule(root=str(root), image_size=8, test_fraction=0.1, val_fraction=0.1,
                          num_workers=1, batch_size=64)
    dm.setup()
    split = next(s for s in ("train", "val", "test") if bad in dm.dataset(s).paths)
    loader = dm.train_dataloader() if split == "train" else getattr(dm, f"{split}_dataloader")()
    with pytest.raises(CorruptImageError, match="broken.JPG"):  # surfaces from the worker
        list(loader)
    write_image(root / "x" / "fine.png", PALETTE[0])
    empty.write_bytes(b"")
    truncated = write_truncated(root / "x" / "cut.jpg")
    with pytest.raises(CorruptImageError, match="cut.jpg"):
        load_image(truncated, 3, 8)
    with caplog.at_level(logging.WARNING):
        skip = FolderDataModule(root=str(root), image_size=8, skip_corrupt=True)
        skip.setup()
    total = sum(len(skip.dataset(s)) for s in ("train", "val", "test"))
    skipped = sum(int(n) for n in re.findall(r"skipped (\d+) unreadable", caplog.text))
    assert total == 13 and skipped == 3  # garbage, empty and truncated files, logged per split
    assert all(x["image"].shape == (3, 8, 8) for s in ("train", "val", "test") for x in items(skip, s))


# --------------------------------------------------------------------------- configs
def test_dataset_configs_compose_and_build(tmp_path, celeba_root, isic_root, monkeypatch):
    folder = tmp_path / "own"
    make_folder(folder, {"p": 5, "q": 5})
    monkeypatch.setenv("CELEBA_ROOT", str(celeba_root))
    monkeypatch.setenv("ISIC2018_ROOT", str(isic_root))
    monkeypatch.setenv("DISC_PL_FOLDER_ROOT", str(folder))
    for name, expected in (("celeba", "not_smiling"), ("isic2018", "MEL"), ("folder", "p")):
        cfg = OmegaConf.load(CONF / f"{name}.yaml")
        assert cfg.name == name
        cfg.image_size, cfg.num_workers = 8, 0
        if name == "celeba":
            cfg.crop_size = 16
        dm = instantiate(cfg)
        dm.setup()
        assert dm.default_query_source == expected and len(dm.dataset("train")) > 0
