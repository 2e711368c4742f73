"""``dataset=fashion_mnist``: Zalando's Fashion-MNIST from local IDX files (offline).

The files are those of Debian's ``dataset-fashion-mnist`` package
(``apt-get install dataset-fashion-mnist`` puts them in ``/usr/share/datasets/fashion-mnist``),
or any folder holding the four IDX files of the original release, gzipped or plain::

    <root>/train-images-idx3-ubyte(.gz)   <root>/train-labels-idx1-ubyte(.gz)
    <root>/t10k-images-idx3-ubyte(.gz)    <root>/t10k-labels-idx1-ubyte(.gz)

Nothing is downloaded. Items are 1-channel images in [0, 1]; the 28 x 28 originals are
zero-padded to ``image_size=32`` (the default: the background is black, and 32 is divisible by
the 8 the judges' CNN and the priors' up-sampling need) or resized bilinearly to any other size.
Splits: ``max_train`` images of the official training set (a stratified, seeded subset; null =
all 60000), of which a stratified ``val_fraction`` is ``val`` and the rest ``train``; ``test`` the official test
set (its first
``max_test`` images). ``judge_fraction`` reserves a disjoint part of ``train`` for the
independent judges (``ImageDataModule.configure_role``).
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .base import DatasetError, ImageDataModule, derived_seed, require_path, resolve_root, stratified_holdout

#: As in the dataset's documentation (github.com/zalandoresearch/fashion-mnist, "Labels").
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]
DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
LAYOUT = "\n".join(f"  <root>/{name}[.gz]" for pair in FILES.values() for name in pair)
SOURCE = ("Debian's dataset-fashion-mnist package: apt-get update && apt-get install -y dataset-fashion-mnist "
          f"(files in {DEBIAN_ROOT}), or the original release's IDX files")
ENV = "FASHION_MNIST_ROOT"
_IDX_TYPES = {0x08: np.uint8}


def idx_path(root: Path, name: str) -> Path:
    """``root/name.gz`` or ``root/name`` (gz first); a DatasetNotFoundError naming the fix."""
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    return require_path(root / f"{name}.gz", f"Fashion-MNIST file {name}(.gz)", LAYOUT, SOURCE, ENV, is_dir=False)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or plain) as a uint8 array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise DatasetError(f"cannot read IDX file {path}: {err}; reinstall dataset-fashion-mnist") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise DatasetError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path} is truncated (header of {ndim} dimensions)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != int(np.prod(shape)):
        raise DatasetError(f"{path}: {len(data) - header} data bytes, but its header declares shape {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


class TensorImageDataset(Dataset):
    """uint8 images [N, 1, H, W] kept in memory, labels [N]; items follow the dict contract."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index].float() / 255.0, "label": self.labels[index], "index": int(index)}


def _to_size(images: np.ndarray, size: int) -> torch.Tensor:
    x = torch.from_numpy(images.copy())[:, None]  # [N, 1, 28, 28] uint8
    h = x.shape[-1]
    if size == h:
        return x
    if size > h and (size - h) % 2 == 0:
        pad = (size - h) // 2
        return F.pad(x, (pad, pad, pad, pad))
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8)


class FashionMNISTDataModule(ImageDataModule):
    """Fashion-MNIST (10 classes, 1 channel) from IDX files; see the module docstring.

    Args:
        root: folder with the IDX files. image_size: 32 (zero padding) or any size >= 8.
        max_train: the training pool (stratified seeded subset of the 60000); val_fraction: its
            per-class share held out as ``val``. max_test: the first test images;
            null = all. seed: seed of the val / max_train / judge partitions.
        role, judge_fraction: see ``ImageDataModule.configure_role``.
    """

    def __init__(self, name: str = "fashion_mnist", root: str = DEBIAN_ROOT, image_size: int = 32,
                 val_fraction: float = 0.1, max_train: int | None = None, max_test: int | None = None,
                 seed: int = 0, role: str = "explained", judge_fraction: float = 0.0, batch_size: int = 128,
                 num_workers: int = 0, default_query_source: str | int | None = "Pullover",
                 default_query_target: str | int | None = "Coat") -> None:
        super().__init__(name, image_size, batch_size, num_workers, default_query_source,
                         default_query_target, channels=1)
        self.save_hyperparameters()
        for key, cap in (("max_train", max_train), ("max_test", max_test)):
            if cap is not None and int(cap) < 2:
                raise ValueError(f"dataset.{key}={cap} must be >= 2 or null (all)")
        self.root = resolve_root(root)
        self.val_fraction, self.seed = float(val_fraction), int(seed)
        self.max_train = None if max_train is None else int(max_train)
        self.max_test = None if max_test is None else int(max_test)
        self._class_names = list(CLASS_NAMES)
        self.configure_role(role, judge_fraction)

    def _read(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        require_path(self.root, "Fashion-MNIST folder", LAYOUT, SOURCE, ENV)
        img_name, lab_name = FILES[split]
        images, labels = read_idx(idx_path(self.root, img_name)), read_idx(idx_path(self.root, lab_name))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(f"{self.root}: {split} images of shape {images.shape} do not match labels "
                               f"of shape {labels.shape} (expected [N, 28, 28] and [N])")
        if labels.size and int(labels.max()) >= len(CLASS_NAMES):
            raise DatasetError(f"{self.root}: {split} label {int(labels.max())} is not a Fashion-MNIST class (0..9)")
        return _to_size(images, self.image_size), torch.from_numpy(labels.astype(np.int64))

    def _load_splits(self) -> tuple[list[str], dict[str, Dataset]]:
        x_train, y_train = self._read("train")
        x_test, y_test = self._read("test")
        pool = list(range(len(y_train)))
        if self.max_train is not None and self.max_train < len(pool):  # a stratified subset first
            _, pool = stratified_holdout(y_train.tolist(), self.max_train / len(pool), derived_seed(self.seed, 2))
        keep, held = stratified_holdout(y_train[pool].tolist(), self.val_fraction, derived_seed(self.seed, 1))
        keep, held = [pool[i] for i in keep], [pool[i] for i in held]
        splits: dict[str, Dataset] = {"train": TensorImageDataset(x_train[keep], y_train[keep]),
                                      "val": TensorImageDataset(x_train[held], y_train[held])}
        n_test = len(y_test) if self.max_test is None else min(self.max_test, len(y_test))
        splits["test"] = TensorImageDataset(x_test[:n_test], y_test[:n_test])
        return list(CLASS_NAMES), splits

    def _fingerprint_args(self) -> dict[str, Any]:
        return {"root": str(self.root), "val_fraction": self.val_fraction, "max_train": self.max_train,
                "max_test": self.max_test, "seed": self.seed}
