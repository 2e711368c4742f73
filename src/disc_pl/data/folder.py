"""``dataset=folder``: any class-per-subfolder image collection (torchvision ImageFolder layout).

For bringing your own data: class names are the subfolder names (sorted), so queries and
targets can be given by name. Either predefined splits (``root/train``, optionally
``root/val`` and ``root/test``; a missing one is carved, stratified, from train) or one folder
split by seed. Items: FloatTensor [channels, image_size, image_size] in [0, 1], whatever the
files' size and mode (RGB or grayscale is converted to ``channels``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from disc_pl.errors import DatasetError
from .base import ImageDataModule, derived_seed, require_path, resolve_root, stratified_holdout
from .imageio import IMAGE_EXTENSIONS, file_dataset, is_image_file

log = logging.getLogger(__name__)

LAYOUT = f"""  <root>/<class name>/<image>              (one folder, split by seed), or
  <root>/train/<class name>/<image>        (+ optional <root>/val/..., <root>/test/...)
  image extensions: {' '.join(IMAGE_EXTENSIONS)} (any case); subfolders of a class are searched too"""
ENV = "DISC_PL_FOLDER_ROOT"  # the config default reads the root from this variable
SOURCE = "your own image collection"


def scan_classes(folder: Path) -> dict[str, list[Path]]:
    """{class name: sorted image paths} of ``folder/<class>/**``; a class with no image, or a
    folder with no class subfolder, is a :class:`DatasetError` naming the folder."""
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DatasetError(f"no class subfolders in {folder}; expected layout:\n{LAYOUT}")
    out: dict[str, list[Path]] = {}
    for name in classes:
        files = []
        for dirpath, dirnames, filenames in os.walk(folder / name):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [Path(dirpath) / f for f in sorted(filenames) if is_image_file(f)]
        if not files:
            raise DatasetError(f"class folder {folder / name} contains no images "
                               f"(extensions: {' '.join(IMAGE_EXTENSIONS)}); add images or remove it")
        out[name] = files
    return out


def _flatten(by_class: dict[str, list[Path]], class_names: list[str]) -> tuple[list[Path], list[int]]:
    paths = [p for name in class_names if name in by_class for p in by_class[name]]
    labels = [class_names.index(name) for name in class_names if name in by_class for _ in by_class[name]]
    return paths, labels


class FolderDataModule(ImageDataModule):
    """Class-per-subfolder images with predefined or seeded, stratified splits.

    Args:
        name: dataset name. root: the folder (see ``LAYOUT``). image_size: output side.
        channels: 3 (RGB) or 1 (grayscale); files are converted.
        val_fraction, test_fraction: per-class shares carved from the data (one-folder layout)
            or from ``train`` when ``val`` / ``test`` are absent (predefined layout).
        seed: seed of those splits. skip_corrupt: verify every image at setup and drop
            unreadable ones (logged) instead of failing when one is read.
        batch_size, num_workers: see base class. default_query_source / target: None means
            first class -> second class.
    """

    def __init__(self, name: str = "folder", root: str = "data/folder", image_size: int = 96,
                 channels: int = 3, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0,
                 skip_corrupt: bool = False, batch_size: int = 128, num_workers: int = 0,
                 default_query_source: str | int | None = None,
                 default_query_target: str | int | None = None,
                 role: str = "explained", judge_fraction: float = 0.0) -> None:
        super().__init__(name, image_size, batch_size, num_workers, default_query_source,
                         default_query_target, channels=channels)
        self.save_hyperparameters()
        self.configure_role(role, judge_fraction)  # a disjoint part of train for the judges
        self.root = resolve_root(root)
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.seed, self.skip_corrupt = int(seed), bool(skip_corrupt)

    def _load_splits(self) -> tuple[list[str], dict[str, Dataset]]:
        require_path(self.root, "image folder", LAYOUT, SOURCE, ENV)
        if (self.root / "train").is_dir():
            class_names, members = self._predefined_splits()
        else:
            by_class = scan_classes(self.root)
            class_names = list(by_class)
            paths, labels = _flatten(by_class, class_names)
            members = self._carve((paths, labels), {"test": self.test_fraction, "val": self.val_fraction})
        splits: dict[str, Dataset] = {}
        for split, (paths, labels) in members.items():
            if not paths:
                raise DatasetError(f"split {split!r} of {self.root} is empty; add images or raise "
                                   f"dataset.{split}_fraction")
            splits[split] = file_dataset(paths, labels, channels=self.channels, image_size=self.image_size,
                                         skip_corrupt=self.skip_corrupt, where=f"{split} split of {self.root}")
        sizes = {s: len(d) for s, d in splits.items()}  # type: ignore[arg-type]
        log.info("folder %s: classes %s, split sizes %s", self.root, class_names, sizes)
        return class_names, splits

    def _predefined_splits(self) -> tuple[list[str], dict[str, tuple[list[Path], list[int]]]]:
        train = scan_classes(self.root / "train")
        class_names = list(train)
        members = {"train": _flatten(train, class_names)}
        to_carve = {}
        for split in ("test", "val"):
            folder = self.root / split
            if not folder.is_dir():
                to_carve[split] = getattr(self, f"{split}_fraction")
                continue
            found = scan_classes(folder)
            unknown = sorted(set(found) - set(class_names))
            if unknown:
                raise DatasetError(f"class folder(s) {[str(folder / u) for u in unknown]} have no "
                                   f"counterpart in {self.root / 'train'} (classes: {class_names})")
            members[split] = _flatten(found, class_names)
        if to_carve:
            log.info("%s: no %s folder; carving it from train", self.root, " / ".join(to_carve))
            members.update(self._carve(members["train"], to_carve))
        return class_names, members

    def _carve(self, data: tuple[list[Path], list[int]], fractions: dict[str, float]
               ) -> dict[str, tuple[list[Path], list[int]]]:
        """Hold out ``fractions[split]`` of each class, in order (test before val), from ``data``;
        what remains becomes train."""
        paths, labels = data
        out = {}
        for stream, split in enumerate(fractions, start=1):
            keep, held = stratified_holdout(labels, fractions[split], derived_seed(self.seed, stream))
            out[split] = ([paths[i] for i in held], [labels[i] for i in held])
            paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
        out["train"] = (paths, labels)
        return out

    def image_files(self) -> list[Path]:
        """Every image file under ``root``, whatever its split or role (sorted)."""
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [Path(dirpath) / f for f in sorted(filenames) if is_image_file(f)]
        return found

    def split_files(self, split: str) -> list[Path]:
        """The image files of ``split`` (after the judges' part is taken out of train)."""
        data = self.dataset(split)
        positions = getattr(data, "positions", None)
        paths = getattr(getattr(data, "base", data), "paths", [])
        return [paths[i] for i in positions] if positions is not None else list(paths)

    def _fingerprint_args(self) -> dict[str, Any]:
        return {"root": str(self.root), "val_fraction": self.val_fraction, "test_fraction": self.test_fraction,
                "seed": self.seed, "skip_corrupt": self.skip_corrupt}
