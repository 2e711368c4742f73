"""Image files -> [C, H, W] float tensors in [0, 1], and the Dataset over a list of files.

Shared by the on-disk datamodules (celeba, isic2018, folder). Why a module of its own: every
loader must fail the same clear way on a bad file (an error naming the file, raised from
``__getitem__`` so it also surfaces from a DataLoader worker with its message), and
``skip_corrupt`` must validate the same way everywhere.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from disc_pl.errors import CorruptImageError, DatasetError

log = logging.getLogger(__name__)

#: File extensions read as images (compared lower-case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def is_image_file(path: str | os.PathLike) -> bool:
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def load_image(path: str | os.PathLike, channels: int, image_size: int,
               crop_size: int | None = None) -> torch.Tensor:
    """Read one image -> FloatTensor [channels, image_size, image_size] in [0, 1].

    Converts to RGB (channels=3) or luminance (channels=1), center-crops a square of side
    ``min(crop_size, width, height)`` when ``crop_size`` is given (CelebA's 178 px face
    crop), then resizes (bilinear with anti-aliasing) to the square output size. Raises
    :class:`CorruptImageError` naming the file when it cannot be decoded.
    """
    try:
        with Image.open(path) as img:
            img = img.convert("RGB" if channels == 3 else "L")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise CorruptImageError(
            f"cannot read image file {path}: {exc}. Replace or delete the file, or set "
            "dataset.skip_corrupt=true to check all files at setup and skip unreadable ones"
        ) from None
    if crop_size is not None:
        side = min(int(crop_size), img.width, img.height)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def is_readable_image(path: str | os.PathLike) -> bool:
    """True when PIL can verify the file's structure and decode it. ``verify()`` alone passes
    truncated JPEGs, so the file is also decoded, at reduced scale (JPEG draft mode: ~1 ms)."""
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            img.draft("RGB", (16, 16))
            img.load()
        return True
    except Exception:  # noqa: BLE001 - any failure means "unreadable"; PIL raises many types
        return False


def check_files(paths: Sequence[Path], skip_corrupt: bool, where: str) -> list[int]:
    """Positions of the usable files among ``paths``.

    Always (cheap): a missing or empty (0-byte) file is an error naming it, unless
    ``skip_corrupt``. With ``skip_corrupt`` every file is also opened and verified with PIL
    (slower: one pass over the data at setup) and unusable ones are dropped and counted in
    the log.
    """
    bad: list[Path] = []
    keep: list[int] = []
    for i, p in enumerate(paths):
        try:
            ok = p.stat().st_size > 0
        except OSError:
            ok = False
        if ok and skip_corrupt:
            ok = is_readable_image(p)
        if ok:
            keep.append(i)
        else:
            bad.append(p)
    if bad and not skip_corrupt:
        shown = ", ".join(str(p) for p in bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise CorruptImageError(f"{len(bad)} image file(s) of {where} are missing or empty: {shown}. "
                                "Set dataset.skip_corrupt=true to skip unreadable files")
    if bad:
        log.warning("%s: skipped %d unreadable image file(s) of %d (skip_corrupt=true), e.g. %s",
                    where, len(bad), len(paths), bad[0])
    return keep


class ImageFileDataset(Dataset):
    """Items ``{"image": FloatTensor[C, S, S], "label": LongTensor[], "index": int}`` read
    lazily from ``paths`` (decoded on each access; use dataloader workers for throughput)."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], channels: int, image_size: int,
                 crop_size: int | None = None) -> None:
        if len(paths) != len(labels):
            raise DatasetError(f"{len(paths)} image paths but {len(labels)} labels")
        self.paths = [Path(p) for p in paths]
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.channels, self.image_size, self.crop_size = channels, image_size, crop_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = load_image(self.paths[index], self.channels, self.image_size, self.crop_size)
        return {"image": image, "label": self.labels[index], "index": int(index)}


def file_dataset(paths: Sequence[Path], labels: Sequence[int], *, channels: int, image_size: int,
                 where: str, crop_size: int | None = None, skip_corrupt: bool = False) -> ImageFileDataset:
    """An :class:`ImageFileDataset` over the usable files (see :func:`check_files`)."""
    keep = check_files(paths, skip_corrupt, where)
    return ImageFileDataset([paths[i] for i in keep], [labels[i] for i in keep], channels, image_size, crop_size)
