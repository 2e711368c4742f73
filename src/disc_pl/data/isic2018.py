"""``dataset=isic2018``: ISIC 2018 Task 3 dermoscopy, 7 diagnostic classes.

The paper's medical benchmark (section 4): 10,015 images, classes MEL, NV, BCC, AKIEC, BKL,
DF, VASC (the CSV's column order), a stratified 90/10 train/test split, images resized to 96.
Here the validation split is carved, stratified, from the training part. Reads the challenge
release as distributed; nothing is downloaded. Items: FloatTensor [3, image_size, image_size].
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from disc_pl.errors import DatasetError
from .base import ImageDataModule, derived_seed, require_path, resolve_root, stratified_holdout
from .imageio import file_dataset

log = logging.getLogger(__name__)

IMAGE_DIR = "ISIC2018_Task3_Training_Input"
CSV_PATH = "ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv"
CLASS_NAMES = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
LAYOUT = f"""  <root>/
    {IMAGE_DIR}/ISIC_0024306.jpg ...
    {CSV_PATH}
        header 'image,{",".join(CLASS_NAMES)}', then one row per image:
        '<image id>,<7 one-hot values 0.0|1.0>'"""
ENV = "ISIC2018_ROOT"  # the config default reads the root from this variable
SOURCE = ("the ISIC 2018 challenge, https://challenge.isic-archive.com/data/#2018 "
          "(Task 3 training input and ground truth)")


def read_ground_truth(path: Path) -> tuple[list[str], list[str], list[int]]:
    """Parse the Task 3 CSV -> (class names from the header, image ids, labels)."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.reader(fh) if r]
    if not rows or rows[0][0].strip() != "image" or len(rows[0]) < 3:
        raise DatasetError(f"{path}: expected a header 'image,{','.join(CLASS_NAMES)}', "
                           f"got {','.join(rows[0]) if rows else 'an empty file'!r}")
    class_names = [c.strip() for c in rows[0][1:]]
    ids, labels = [], []
    for lineno, row in enumerate(rows[1:], start=2):
        try:
            values = [float(v) for v in row[1:]]
        except ValueError:
            values = []
        hot = [i for i, v in enumerate(values) if v == 1.0]
        if len(values) != len(class_names) or len(hot) != 1 or sum(values) != 1.0:
            raise DatasetError(f"{path}, line {lineno}: expected an image id and a one-hot row of "
                               f"{len(class_names)} values 0.0|1.0, got {','.join(row)[:120]!r}")
        ids.append(row[0].strip())
        labels.append(hot[0])
    return class_names, ids, labels


class ISIC2018DataModule(ImageDataModule):
    """ISIC 2018 Task 3 with a seeded, stratified train / val / test split.

    Args:
        name: dataset name. root: folder with the challenge layout (see ``LAYOUT``).
        image_size: output side (96 as in the paper).
        test_fraction: share of each class held out for test (0.1: the paper's 90/10 split).
        val_fraction: share of each class's remaining training images used for validation.
        seed: seed of both splits. skip_corrupt: verify every image at setup and drop
            unreadable ones (logged; the split assignment does not change).
        batch_size, num_workers: see base class. default_query_source / target: MEL -> NV.
    """

    def __init__(self, name: str = "isic2018", root: str = "data/isic2018", image_size: int = 96,
                 test_fraction: float = 0.1, val_fraction: float = 0.1, seed: int = 0,
                 skip_corrupt: bool = False, batch_size: int = 128, num_workers: int = 0,
                 default_query_source: str | int | None = "MEL",
                 default_query_target: str | int | None = "NV",
                 role: str = "explained", judge_fraction: float = 0.0) -> None:
        super().__init__(name, image_size, batch_size, num_workers, default_query_source,
                         default_query_target, channels=3)
        self.save_hyperparameters()
        self.configure_role(role, judge_fraction)  # a disjoint part of train for the judges
        self.root = resolve_root(root)
        self.test_fraction, self.val_fraction = float(test_fraction), float(val_fraction)
        self.seed, self.skip_corrupt = int(seed), bool(skip_corrupt)

    def _load_splits(self) -> tuple[list[str], dict[str, Dataset]]:
        require_path(self.root, "ISIC 2018 root folder", LAYOUT, SOURCE, ENV)
        img_dir = require_path(self.root / IMAGE_DIR, "ISIC 2018 Task 3 image folder", LAYOUT, SOURCE, ENV)
        csv_file = require_path(self.root / CSV_PATH, "ISIC 2018 Task 3 ground-truth CSV", LAYOUT, SOURCE, ENV,
                                is_dir=False)
        class_names, ids, labels = read_ground_truth(csv_file)
        if not ids:
            raise DatasetError(f"{csv_file} lists no images")
        # test first (the paper's 90/10 split), then validation from the training part
        rest, test = stratified_holdout(labels, self.test_fraction, derived_seed(self.seed, 1))
        keep, held = stratified_holdout([labels[i] for i in rest], self.val_fraction, derived_seed(self.seed, 2))
        members = {"train": [rest[i] for i in keep], "val": [rest[i] for i in held], "test": test}
        splits: dict[str, Dataset] = {}
        for split, pos in members.items():
            if not pos:
                raise DatasetError(f"ISIC 2018 split {split!r} is empty ({len(ids)} images, "
                                   f"test_fraction={self.test_fraction}, val_fraction={self.val_fraction})")
            splits[split] = file_dataset([img_dir / f"{ids[i]}.jpg" for i in pos], [labels[i] for i in pos],
                                         channels=3, image_size=self.image_size,
                                         skip_corrupt=self.skip_corrupt, where=f"ISIC 2018 {split} ({img_dir})")
        log.info("ISIC 2018: %s", {s: len(d) for s, d in splits.items()})  # type: ignore[arg-type]
        return class_names, splits

    def _fingerprint_args(self) -> dict[str, Any]:
        return {"root": str(self.root), "test_fraction": self.test_fraction, "val_fraction": self.val_fraction,
                "seed": self.seed, "skip_corrupt": self.skip_corrupt}
