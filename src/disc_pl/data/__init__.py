"""Datamodules: the embedded synthetic faces (with ground truth) and on-disk datasets.

Every one is an :class:`ImageDataModule` (contract in docs/ARCHITECTURE.md, "DataModules"),
built by Hydra from ``conf/dataset/<name>.yaml``.
"""

from disc_pl.errors import CorruptImageError, DatasetError, DatasetNotFoundError
from .base import ImageDataModule
from .celeba import CelebADataModule
from .folder import FolderDataModule
from .isic2018 import ISIC2018DataModule
from .synthetic import SyntheticFacesDataModule, attribute_mask, render_faces, sample_params, sample_smile

__all__ = [
    "CelebADataModule",
    "CorruptImageError",
    "DatasetError",
    "DatasetNotFoundError",
    "FolderDataModule",
    "ISIC2018DataModule",
    "ImageDataModule",
    "SyntheticFacesDataModule",
    "attribute_mask",
    "render_faces",
    "sample_params",
    "sample_smile",
]
