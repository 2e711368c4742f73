"""The shared base class of every datamodule, its error types and split helpers.

Every dataset in disc_pl, synthetic or on disk, is an :class:`ImageDataModule`. The rest of the
code base (training, the counterfactual engine, metrics) only ever talks to this interface
(see docs/ARCHITECTURE.md, "DataModules"):

- items are dicts ``{"image": FloatTensor[C, H, W] in [0, 1], "label": LongTensor[], "index": int}``
  where ``index`` is the item's position in its split (stable: it is the query id);
- class names travel with the data, so queries and targets can be given by name;
- ``fingerprint()`` is a JSON-able dict that determines the data (part of model-cache keys).

Subclasses implement ``_load_splits()`` (called once by ``setup()``) and ``_fingerprint_args()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from disc_pl.errors import ConfigError, CorruptImageError, DatasetError, DatasetNotFoundError  # noqa: F401 (re-exported)

SPLITS = ("train", "val", "test")
TRAIN_ROLES = ("explained", "judge")
JUDGE_STREAM = 7  # derived-seed stream of the explained / judge partition of the training split


def missing_data_message(what: str, path: Path, layout: str, source: str, env: str | None = None) -> str:
    """One readable message for a missing root / file: path, layout, origin, config key."""
    alt = f" (or the environment variable {env})" if env else ""
    return (f"{what} not found: {path}\n"
            f"Expected layout:\n{layout}\n"
            f"Data source: {source}. Nothing is downloaded automatically: put the data there or "
            f"point the config at it with dataset.root=/path/to/data{alt}")


def derived_seed(seed: int, *stream: int) -> int:
    """A well-mixed 63-bit seed for an independent random stream ``(seed, *stream)``.

    Splits and stages use different streams, so e.g. the train and test faces never share a
    random sequence, whatever the user's seed.
    """
    state = np.random.SeedSequence([int(seed), *map(int, stream)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def stratified_holdout(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split positions ``0..len(labels)-1`` into (kept, held) with ``fraction`` of each class held.

    Each class with at least 2 items holds out ``max(1, round(fraction * n))`` of them when
    ``fraction > 0`` (so small classes still appear in every split) and always keeps one.
    Both lists are sorted, so item order (and hence ``index``) follows the source order.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"split fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels, dtype=np.int64)
    held: list[int] = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n_held = 0
        if fraction > 0 and len(members) >= 2:
            n_held = min(len(members) - 1, max(1, int(round(fraction * len(members)))))
        held += rng.permutation(members)[:n_held].tolist()
    held_set = set(held)
    kept = [i for i in range(len(labels)) if i not in held_set]
    return kept, sorted(held)


class ImageDataModule(pl.LightningDataModule):
    """Base datamodule: splits, loaders, class-name lookup, ground truth hook, fingerprint.

    Args:
        name: the dataset's name (``dataset=<name>`` in Hydra; part of the fingerprint).
        image_size: side of the square images produced, in pixels.
        batch_size, num_workers: for the three dataloaders.
        default_query_source / default_query_target: class names (or indices) used by
            ``disc_pl.run`` when ``query.source`` / ``query.target`` are null. ``None`` means the
            subclass default (``_default_query()``, normally first class -> second class).
    """

    has_ground_truth: bool = False
    #: how the judges get training images the explained classifier did not see: "fraction" (a
    #: reserved part of train, see configure_role) or "seed" (another dataset seed: synthetic data)
    judge_split: str = "fraction"

    def __init__(self, name: str, image_size: int, batch_size: int = 128, num_workers: int = 0,
                 default_query_source: str | int | None = None,
                 default_query_target: str | int | None = None, channels: int = 3) -> None:
        super().__init__()
        if int(image_size) < 8:
            raise ConfigError.one("dataset.image_size", image_size, "is too small (need >= 8)")
        if int(channels) not in (1, 3):
            raise ConfigError.one("dataset.channels", channels, "must be 1 (grayscale) or 3 (RGB)")
        self.name = str(name)
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self._query_args = (default_query_source, default_query_target)
        self.role, self.judge_fraction = "explained", 0.0  # see configure_role()
        self._class_names: list[str] | None = None
        self._splits: dict[str, Dataset] | None = None
        self._channel_stats: tuple[list[float], list[float]] | None = None

    # ---- subclass hooks -------------------------------------------------------------------
    def _load_splits(self) -> tuple[list[str], dict[str, Dataset]]:
        """Read / build the data once: (class_names, {"train": ds, "val": ds, "test": ds})."""
        raise NotImplementedError

    def _fingerprint_args(self) -> dict[str, Any]:
        """The constructor values that determine the data (not batch size / workers)."""
        raise NotImplementedError

    def _default_query(self) -> tuple[str, str]:
        return self.class_names[0], self.class_names[1]

    # ---- training-data roles (independent judges, disc_pl.models.judge) -------------------
    def configure_role(self, role: str = "explained", judge_fraction: float = 0.0) -> None:
        """Reserve ``judge_fraction`` of each class of the training split for the judges.

        ``role="explained"``: the train split is the rest (what the explained classifier and
        its DUQ / DEP train on); ``role="judge"``: the train split is the reserved part only.
        The two parts are disjoint (a seeded, stratified holdout, see ``judge_positions``);
        val and test are shared. ``judge_fraction=0`` (the default) keeps the whole split.
        """
        if role not in TRAIN_ROLES:
            raise ConfigError.one("dataset.role", role, f"one of {', '.join(TRAIN_ROLES)}")
        if not 0.0 <= float(judge_fraction) < 1.0:
            raise ConfigError.one("dataset.judge_fraction", judge_fraction,
                                  "a fraction in [0, 1): the share of the training data reserved for the judges")
        if role == "judge" and float(judge_fraction) == 0.0:
            raise ConfigError.one("dataset.judge_fraction", judge_fraction,
                                  "role=judge needs a reserved part: set dataset.judge_fraction > 0, e.g. 0.2")
        self.role, self.judge_fraction = role, float(judge_fraction)

    def _role_seed(self) -> int:
        return derived_seed(int(getattr(self, "seed", 0)), JUDGE_STREAM)

    def judge_positions(self, labels: Sequence[int]) -> tuple[list[int], list[int]]:
        """(explained, judge) positions into the full training split: disjoint, sorted."""
        return stratified_holdout(labels, self.judge_fraction, self._role_seed())

    def _role_subset(self, train: Dataset) -> Dataset:
        labels = getattr(train, "labels", None)
        if labels is None:
            labels = [int(train[i]["label"]) for i in range(len(train))]  # type: ignore[arg-type]
        explained, judge = self.judge_positions([int(v) for v in labels])
        self.train_positions = explained if self.role == "explained" else judge
        return IndexedSubset(train, self.train_positions)

    # ---- lifecycle ------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Build all splits once; later calls (any stage) return immediately."""
        if self._splits is not None:
            return
        class_names, splits = self._load_splits()
        if self.judge_fraction > 0 and "train" in splits:
            splits["train"] = self._role_subset(splits["train"])
        if len(class_names) < 2:
            raise DatasetError(f"dataset {self.name!r} has {len(class_names)} class(es) "
                               f"{class_names}; a classifier needs at least 2")
        if set(splits) != set(SPLITS):
            raise RuntimeError(f"{type(self).__name__}._load_splits returned splits {sorted(splits)}")
        self._class_names = list(class_names)
        self._splits = splits
        for arg in self._query_args:  # fail at start-up, not after training, on a bad default
            if arg is not None:
                self.class_index(arg)

    @property
    def class_names(self) -> list[str]:
        if self._class_names is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before reading class_names")
        return list(self._class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def default_query_source(self) -> str:
        arg = self._query_args[0]
        return self._default_query()[0] if arg is None else self.class_names[self.class_index(arg)]

    @property
    def default_query_target(self) -> str:
        arg = self._query_args[1]
        return self._default_query()[1] if arg is None else self.class_names[self.class_index(arg)]

    # ---- data access ----------------------------------------------------------------------
    def dataset(self, split: str) -> Dataset:
        """The Dataset of ``split`` (train | val | test); items follow the dict contract."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed splits: {', '.join(SPLITS)}")
        self.setup()
        assert self._splits is not None
        return self._splits[split]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(self.dataset(split), batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def class_index(self, name_or_index: str | int) -> int:
        """Class index from a class name, an int, or a digit string.

        An exact class name wins over reading a digit string as an index (folders named
        ``0..9``); a name matching exactly one class case-insensitively is accepted too.
        """
        names = self.class_names
        valid = f"valid classes: {', '.join(f'{i}={n}' for i, n in enumerate(names))}"
        if isinstance(name_or_index, bool):
            raise ValueError(f"class {name_or_index!r} is not a class name or index; {valid}")
        if isinstance(name_or_index, (int, np.integer)) or (
                isinstance(name_or_index, torch.Tensor) and name_or_index.numel() == 1):
            idx = int(name_or_index)
            if 0 <= idx < len(names):
                return idx
            raise ValueError(f"class index {idx} is out of range 0..{len(names) - 1}; {valid}")
        text = str(name_or_index).strip()
        if text in names:
            return names.index(text)
        folded = [i for i, n in enumerate(names) if n.lower() == text.lower()]
        if len(folded) == 1:
            return folded[0]
        if text.lstrip("-").isdigit():
            return self.class_index(int(text))
        raise ValueError(f"unknown class {name_or_index!r} for dataset {self.name!r}; {valid}")

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel (mean, std) of the training split's pixels, computed once per datamodule:
        the input normalisation of a model whose yaml leaves mean / std null
        (:mod:`disc_pl.data.stats`)."""
        if self._channel_stats is None:
            from disc_pl.data.stats import channel_stats

            self._channel_stats = channel_stats(self.dataset("train"), num_workers=self.num_workers)
        return self._channel_stats

    def ground_truth(self, split: str, indices: Sequence[int] | torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(counterfactual images [N, C, H, W], attribute masks [N, 1, H, W] bool) or None."""
        return None

    def fingerprint(self) -> dict[str, Any]:
        """Plain JSON-able values that determine the data: constructor values, class names and
        split sizes (so the cache key changes if files on disk change). Calls ``setup()``."""
        self.setup()
        out = {"name": self.name, "class": type(self).__name__, "image_size": self.image_size,
               "channels": self.channels, **self._fingerprint_args()}
        out["class_names"] = self.class_names
        if self.judge_fraction > 0:  # which part of the training data this datamodule serves
            out["train_role"], out["judge_fraction"] = self.role, self.judge_fraction
        out["split_sizes"] = {s: len(self.dataset(s)) for s in SPLITS}  # type: ignore[arg-type]
        return out


def as_index_tensor(indices: Sequence[int] | torch.Tensor, size: int, split: str) -> torch.Tensor:
    """Validate query indices against a split of ``size`` items -> LongTensor [N]."""
    idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    bad = idx[(idx < 0) | (idx >= size)]
    if len(bad):
        raise IndexError(f"indices {bad.tolist()[:10]} are outside split {split!r} (size {size})")
    return idx


def resolve_root(root: str | Path) -> Path:
    """``root`` as an absolute path (relative paths are relative to the working directory)."""
    return Path(root).expanduser().resolve()


def require_path(path: Path, what: str, layout: str, source: str, env: str | None = None,
                 is_dir: bool = True) -> Path:
    """``path`` if it exists (as a directory / file), else one :class:`DatasetNotFoundError`
    naming it, the expected layout, where the data comes from and the key to set."""
    ok = path.is_dir() if is_dir else path.is_file()
    if not ok:
        raise DatasetNotFoundError(missing_data_message(what, path, layout, source, env))
    return path


class IndexedSubset(Dataset):
    """Items ``positions`` of ``base``, re-indexed ``0..len-1`` (``index`` stays the position in
    this split, the query-id contract); ``positions`` are kept for independence checks."""

    def __init__(self, base: Dataset, positions: Sequence[int]) -> None:
        self.base, self.positions = base, list(positions)
        labels = getattr(base, "labels", None)
        self.labels = None if labels is None else torch.as_tensor(labels)[self.positions]

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.base[self.positions[index]])
        item["index"] = int(index)
        return item
