"""Independent judges: an ensemble of K classifiers that never saw the explained one's data.

A counterfactual that flips the explained classifier may be a real change of class or an
adversarial perturbation of that one network. The judges tell the two apart: ``judge.k``
``SmallCNN`` classifiers (another architecture than the explained ResNet-18), each with its own
seed, trained with augmentation (flips, shifts, pixel noise) on images the explained classifier
did not see:

- ``dataset=synthetic_faces`` (``judge_split = "seed"``): faces rendered from another dataset
  seed (``dataset.seed + judge.data_seed_offset``), so no face is shared;
- every other datamodule (``judge_split = "fraction"``): the reserved, disjoint part of the
  training split (``dataset.judge_fraction`` > 0, ``role=judge``); the explained classifier
  trains on the rest (``role=explained``). Both roles are in the datamodules' fingerprints.
- a bring-your-own classifier: its training data is unknown, so the judges train on the
  dataset's judge part (or, with ``judge_fraction=0``, the whole training split: then they may
  share images with the user's classifier; a warning says so);
- ``judge.root`` (``dataset=folder``): a second folder with the same class sub-folders, images
  a classifier trained elsewhere never saw; the judges train on its training split, and no
  image of it may be one of ``dataset.root`` (compared by content).

Judges are cached like every model (``<cache_dir>/judge-<key16>/judge.pt``, key = the judge
config + the judge data's fingerprint + the judge's seed), trained once per data and reused by
every method, classifier seed and sweep job.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor, nn

from disc_pl.errors import ConfigError
from disc_pl.models.cache import cached_net
from disc_pl.models.robust import adversarial_fit, check_robust_config
from disc_pl.nets.small_cnn import SmallCNN
from disc_pl.utils import to_plain

log = logging.getLogger(__name__)
TRAIN_KEYS = ("width", "epochs", "lr", "batch_size", "weight_decay", "hflip", "max_shift", "noise", "max_train")


def judges_enabled(cfg: DictConfig) -> bool:
    judge = cfg.get("judge")
    return judge is not None and str(judge.get("name", "none")) != "none"


def judge_dataset_config(dataset_cfg: DictConfig, datamodule: Any, judge_cfg: DictConfig,
                         byo: bool = False) -> DictConfig:
    """The dataset config the judges train on (disjoint from the explained classifier's)."""
    sub = dataset_cfg.copy()
    how = getattr(datamodule, "judge_split", "fraction")
    root = judge_cfg.get("root")
    with open_dict(sub):
        if sub.get("shortcut") is not None:  # the judges learn the task from clean images, never a planted cue
            sub.shortcut = None
        if root is not None:  # a second folder: its whole training split
            if not str(dataset_cfg.get("_target_", "")).endswith(".FolderDataModule"):
                raise ConfigError.one("judge.root", root, (
                    f"is a second image folder for dataset=folder; dataset={dataset_cfg.get('name')} gives its "
                    "judges their own images (dataset.judge_fraction or another seed): set judge.root=null"))
            sub.root, sub.role, sub.judge_fraction = str(root), "explained", 0.0
        elif how == "seed":
            sub.seed = int(dataset_cfg.seed) + int(judge_cfg.data_seed_offset)
        elif float(dataset_cfg.get("judge_fraction", 0.0) or 0.0) > 0:
            sub.role = "judge"
            if byo:
                log.warning("judge: the judges train on the reserved dataset.judge_fraction of the training split; "
                            "a classifier trained elsewhere may have seen those images (dataset=folder: give the "
                            "judges a folder it never saw, judge.root=<folder>)")
        elif byo:
            log.warning("judge: dataset.judge_fraction=0, so the judges train on the whole training split; "
                        "a bring-your-own classifier may have seen the same images (set judge_fraction > 0 "
                        "and train your classifier on the rest for independent judges)")
        else:
            raise ConfigError.one(
                "dataset.judge_fraction", dataset_cfg.get("judge_fraction", 0.0),
                "the judges need training images the explained classifier did not see: set "
                "dataset.judge_fraction=0.2 (the explained classifier then trains on the other 80 %), "
                "or judge=none")
    return sub


def check_independent(explained: Any, judge: Any) -> None:
    """Raise if the judge datamodule's training images can overlap the explained one's."""
    fe, fj = explained.fingerprint(), judge.fingerprint()
    if getattr(explained, "judge_split", "fraction") == "seed":
        if fe.get("seed") == fj.get("seed"):
            raise RuntimeError("judge data uses the explained classifier's dataset seed")
        return
    if fj.get("root") is not None and fj.get("root") != fe.get("root"):  # judge.root: another folder
        _check_disjoint_folders(explained, judge)
        return
    if fj.get("train_role") != "judge" or fe.get("train_role") != "explained":
        return  # byo with the whole split: warned in judge_dataset_config
    if set(explained.train_positions) & set(judge.train_positions):
        raise RuntimeError("judge and explained training positions overlap")


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _check_disjoint_folders(explained: Any, judge: Any) -> None:
    """``judge.root``'s training images must not be images of ``dataset.root`` (any of them: the
    queries come from there): compared by content (size first, then sha256), so a copy counts."""
    ours = explained.image_files()
    sizes = {p.stat().st_size for p in ours}
    candidates = [p for p in judge.split_files("train") if p.stat().st_size in sizes]
    if not candidates:
        return
    their_sizes = {p.stat().st_size for p in candidates}
    digests = {_digest(q): q for q in ours if q.stat().st_size in their_sizes}
    for p in candidates:
        twin = digests.get(_digest(p))
        if twin is not None:
            raise ConfigError.one("judge.root", str(judge.root), (
                f"holds images of dataset.root (e.g. {p} is {twin}): the judges must train on images the "
                "explained classifier never saw and that are not queries; remove them or point judge.root "
                "at another folder"))


def _stack_split(data: Any, limit: int | None) -> tuple[Tensor, Tensor]:
    n = len(data) if limit is None else min(int(limit), len(data))
    items = [data[i] for i in range(n)]
    return torch.stack([it["image"] for it in items]), torch.stack([torch.as_tensor(it["label"]) for it in items])


def build_judge(channels: int, image_size: int, num_classes: int, width: int) -> nn.Module:
    return SmallCNN(num_classes, in_channels=channels, image_size=image_size, width=width,
                    mean=[0.5] * channels, std=[0.25] * channels)


@torch.no_grad()
def accuracy(net: nn.Module, x: Tensor, y: Tensor, batch: int = 512) -> float:
    pred = torch.cat([net(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
    return float((pred == y).float().mean())


class _Lazy:
    """The judges' training images, stacked on first use (a cache hit never reads them)."""

    def __init__(self, jdm: Any, limit: int | None) -> None:
        self.jdm, self.limit, self.value = jdm, limit, None

    def __call__(self) -> tuple[Tensor, Tensor]:
        if self.value is None:
            self.value = _stack_split(self.jdm.dataset("train"), self.limit)
        return self.value


def judge_datamodule(cfg: DictConfig, datamodule: Any, byo: bool = False) -> Any:
    """The judges' datamodule (set up, disjoint from the explained classifier's data)."""
    jdm = instantiate(judge_dataset_config(cfg.dataset, datamodule, cfg.judge, byo))
    root = cfg.judge.get("root")
    if root is not None and not jdm.root.is_dir():
        raise ConfigError.one("judge.root", root, f"no such folder ({jdm.root}): give a folder with one sub-folder "
                              "of images per class, as dataset.root, of images the explained classifier never saw")
    if root is not None and jdm.root == getattr(datamodule, "root", None):
        raise ConfigError.one("judge.root", root, "is dataset.root itself: give a second folder of images the "
                              "explained classifier never saw, or judge.root=null (a reserved dataset.judge_fraction)")
    jdm.setup()
    if root is not None and list(jdm.class_names) != list(datamodule.class_names):
        raise ConfigError.one("judge.root", root, (
            f"has the class sub-folders {list(jdm.class_names)}, dataset.root has {list(datamodule.class_names)}: "
            "the judges' folder needs the same class names (one sub-folder per class)"))
    check_independent(datamodule, jdm)
    return jdm


def ensure_judges(cfg: DictConfig, datamodule: Any, byo: bool = False, jdm: Any = None
                  ) -> tuple[list[nn.Module], Any]:
    """The K trained judges (eval mode, frozen) and their datamodule; trains missing ones."""
    jc = cfg.judge
    k = int(jc.k)
    if k < 1:
        raise ConfigError.one("judge.k", k, "an integer >= 1 (the ensemble size), or judge=none")
    jdm = jdm if jdm is not None else judge_datamodule(cfg, datamodule, byo)
    train = {key: to_plain(jc.get(key)) for key in TRAIN_KEYS}
    data = _Lazy(jdm, train["max_train"])
    build = lambda: build_judge(jdm.channels, jdm.image_size, jdm.num_classes, int(train["width"]))  # noqa: E731
    judges = []
    for i in range(k):
        seed = int(jc.seed) + i

        def fit(net: nn.Module, seed: int = seed, i: int = i) -> None:
            x, y = data()
            log.info("training judge %d/%d (%d images)", i + 1, k, len(x))
            adversarial_fit(net, x, y, seed, train, None)  # plain: no attack
        judges.append(cached_net(Path(str(cfg.cache_dir)), "judge",
                                 {"train": train, "data": jdm.fingerprint(), "seed": seed}, build, fit))
    return judges, jdm


def robust_settings(jc: DictConfig) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """(k, training recipe, adversarial settings) of the robust judges (``judge.robust``)."""
    rc = jc.get("robust") or {}
    k = rc.get("k", 0)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ConfigError.one("judge.robust.k", k, "an integer >= 0 (robust judges; 0 = none)")
    train = {key: to_plain(rc.get(key, jc.get(key))) for key in TRAIN_KEYS}
    return int(k), train, check_robust_config("judge.robust", rc) if k else {}


def ensure_robust_judges(cfg: DictConfig, datamodule: Any, byo: bool = False, jdm: Any = None) -> list[nn.Module]:
    """The ``judge.robust.k`` adversarially trained judges (L2 PGD, ``disc_pl.models.robust``) on
    the plain judges' data, seeds ``judge.seed + 100 + i``; [] when k is 0."""
    jc = cfg.judge
    k, train, robust = robust_settings(jc)
    if not k:
        return []
    jdm = jdm if jdm is not None else judge_datamodule(cfg, datamodule, byo)
    data = _Lazy(jdm, train["max_train"])
    build = lambda: build_judge(jdm.channels, jdm.image_size, jdm.num_classes, int(train["width"]))  # noqa: E731
    out = []
    for i in range(k):
        seed = int(jc.seed) + 100 + i

        def fit(net: nn.Module, seed: int = seed, i: int = i) -> None:
            x, y = data()
            log.info("training robust judge %d/%d (%d images, L2 eps %s)", i + 1, k, len(x), robust["eps"])
            adversarial_fit(net, x, y, seed, train, robust)
        out.append(cached_net(Path(str(cfg.cache_dir)), "rjudge",
                              {"train": train, "robust": robust, "data": jdm.fingerprint(), "seed": seed}, build, fit))
    return out


def judge_config_summary(cfg: DictConfig) -> dict[str, Any]:
    return dict(OmegaConf.to_container(cfg.judge, resolve=True)) if judges_enabled(cfg) else {}
