"""A user's own image folder, generated: ``<root>/<class>/<image>.png`` (ImageFolder layout).

Each class has its own pattern (a bright square in one corner per class) on seeded noise, so
a tiny classifier can tell the classes apart and no two images (of one folder or of two
folders with different seeds) have the same bytes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_own_folder(root: Path, per_class: int = 20, classes: tuple[str, ...] = ("cat", "dog"),
                    size: int = 16, seed: int = 0) -> Path:
    """``per_class`` RGB PNGs of ``size`` px per class under ``root``; returns ``root``."""
    rng = np.random.default_rng(seed)
    half = size // 2
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            img = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
            top, left = (c // 2) * half, (c % 2) * half
            img[top:top + half, left:left + half] += np.uint8(150)
            Image.fromarray(img).save(root / name / f"{name}_{seed}_{j:03d}.png")
    return root
