"""``dataset=celeba``: CelebA aligned faces, any one of its 40 attributes as a binary label.

The paper's main benchmark (section 4: Smiling, also Bald and Young). Reads the official
"Align&Cropped" release as distributed; nothing is downloaded. Items are center-cropped to
``crop_size`` (178: the square face region of the 178 x 218 aligned images) and resized to
``image_size`` -> FloatTensor [3, image_size, image_size] in [0, 1].
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from disc_pl.errors import ConfigError, DatasetError

from .base import ImageDataModule, SPLITS, derived_seed, require_path, resolve_root
from .imageio import file_dataset

log = logging.getLogger(__name__)

LAYOUT = """  <root>/
    img_align_celeba/000001.jpg ...   aligned & cropped JPEGs (178 x 218)
    list_attr_celeba.txt              line 1: image count; line 2: the 40 attribute names;
                                      then '<file> <40 values -1|1>' (whitespace separated)
    list_eval_partition.txt           '<file> 0|1|2'  (0 = train, 1 = val, 2 = test)"""
ENV = "CELEBA_ROOT"  # the config default reads the root from this variable
SOURCE = ("the official CelebA site, https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html "
          "('Align&Cropped Images', 'Anno/list_attr_celeba.txt', 'Eval/list_eval_partition.txt')")


def read_attributes(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """Parse ``list_attr_celeba.txt`` -> (attribute names, file names, values int8 [N, A] in {-1, 1})."""
    with open(path, encoding="utf-8") as fh:
        lines = [ln for ln in (raw.strip() for raw in fh) if ln]
    if len(lines) < 2:
        raise DatasetError(f"{path} is too short: expected a count line and an attribute-name line")
    names = lines[1].split()
    files, rows = [], []
    for lineno, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if len(parts) != len(names) + 1 or any(v not in ("1", "-1") for v in parts[1:]):
            raise DatasetError(f"{path}, line {lineno}: expected '<file>' and {len(names)} values "
                               f"-1|1, got {line[:120]!r}")
        files.append(parts[0])
        rows.append(parts[1:])
    values = np.asarray(rows, dtype=np.int8).reshape(len(rows), len(names))
    return names, files, values


def read_partition(path: Path) -> dict[str, int]:
    """Parse ``list_eval_partition.txt`` -> {file name: 0 | 1 | 2}."""
    out: dict[str, int] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise DatasetError(f"{path}, line {lineno}: expected '<file> 0|1|2', got {line.strip()[:120]!r}")
            out[parts[0]] = int(parts[1])
    return out


class CelebADataModule(ImageDataModule):
    """CelebA with one binary attribute; class names ``not_<attr>``, ``<attr>`` (lower case).

    Args:
        name: dataset name. root: folder with the official layout (see ``LAYOUT``).
        attribute: one of the 40 CelebA attributes, e.g. Smiling (default), Bald, Young.
        image_size: output side (96 as in the paper). crop_size: center crop before resizing.
        max_per_split: keep at most this many items per split, a seeded random subset kept in
            file order (for quick experiments); None keeps all.
        seed: seed of that subset. skip_corrupt: verify every image at setup and drop
            unreadable ones (logged) instead of failing when one is read.
        batch_size, num_workers, default_query_source, default_query_target: see base class
            (default query: ``not_<attr>`` -> ``<attr>``).
    """

    def __init__(self, name: str = "celeba", root: str = "data/celeba", attribute: str = "Smiling",
                 image_size: int = 96, crop_size: int = 178, max_per_split: int | None = None,
                 seed: int = 0, skip_corrupt: bool = False, batch_size: int = 128, num_workers: int = 0,
                 default_query_source: str | int | None = None,
                 default_query_target: str | int | None = None,
                 role: str = "explained", judge_fraction: float = 0.0) -> None:
        super().__init__(name, image_size, batch_size, num_workers, default_query_source,
                         default_query_target, channels=3)
        self.save_hyperparameters()
        self.configure_role(role, judge_fraction)  # a disjoint part of train for the judges
        if max_per_split is not None and int(max_per_split) < 1:
            raise ConfigError.one("dataset.max_per_split", max_per_split, "must be >= 1 or null")
        self.root = resolve_root(root)
        self.attribute = str(attribute)
        self.crop_size = int(crop_size)
        self.max_per_split = None if max_per_split is None else int(max_per_split)
        self.seed, self.skip_corrupt = int(seed), bool(skip_corrupt)
        attr = self.attribute.lower()
        self._class_names = [f"not_{attr}", attr]  # known before setup

    def _load_splits(self) -> tuple[list[str], dict[str, Dataset]]:
        require_path(self.root, "CelebA root folder", LAYOUT, SOURCE, ENV)
        img_dir = require_path(self.root / "img_align_celeba", "CelebA image folder", LAYOUT, SOURCE, ENV)
        attr_file = require_path(self.root / "list_attr_celeba.txt", "CelebA attribute file", LAYOUT,
                                 SOURCE, ENV, is_dir=False)
        part_file = require_path(self.root / "list_eval_partition.txt", "CelebA partition file", LAYOUT,
                                 SOURCE, ENV, is_dir=False)
        names, files, values = read_attributes(attr_file)
        column = self._attribute_column(names, attr_file)
        partition = read_partition(part_file)
        missing = [f for f in files if f not in partition]
        if missing:
            raise DatasetError(f"{len(missing)} image(s) of {attr_file} have no entry in {part_file}, "
                               f"e.g. {missing[0]}")
        labels = (values[:, column] > 0).astype(np.int64)
        splits: dict[str, Dataset] = {}
        for code, split in enumerate(SPLITS):
            members = np.asarray([i for i, f in enumerate(files) if partition[f] == code], dtype=np.int64)
            if self.max_per_split is not None and len(members) > self.max_per_split:
                rng = np.random.default_rng(derived_seed(self.seed, code))
                members = np.sort(rng.choice(members, self.max_per_split, replace=False))
            if len(members) == 0:
                raise DatasetError(f"CelebA split {split!r} is empty: no line '<file> {code}' in {part_file}")
            splits[split] = file_dataset([img_dir / files[i] for i in members], labels[members].tolist(),
                                         channels=3, image_size=self.image_size, crop_size=self.crop_size,
                                         skip_corrupt=self.skip_corrupt, where=f"CelebA {split} ({img_dir})")
        log.info("CelebA %s: %s", self.attribute, {s: len(d) for s, d in splits.items()})  # type: ignore[arg-type]
        return self.class_names, splits

    def _attribute_column(self, names: list[str], attr_file: Path) -> int:
        folded = [n.lower() for n in names]
        if self.attribute.lower() not in folded:
            raise DatasetError(f"dataset.attribute={self.attribute!r} is not a CelebA attribute in "
                               f"{attr_file}; available: {', '.join(names)}")
        return folded.index(self.attribute.lower())

    def _fingerprint_args(self) -> dict[str, Any]:
        return {"root": str(self.root), "attribute": self.attribute, "crop_size": self.crop_size,
                "max_per_split": self.max_per_split, "seed": self.seed, "skip_corrupt": self.skip_corrupt}
