"""Checks of the model nodes of a config (a disc_pl recipe or a bring-your-own file) and of a
loaded model against the dataset (``disc_pl.validate`` runs them before any work)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from disc_pl.checks import ABSENT, MISSING, Checks, check_target_keys, dataset_channels, is_num
from disc_pl.errors import ConfigError
from disc_pl.models.byo import is_byo
from disc_pl.models.fit import RECIPE_KEYS


def check_model(ch: Checks, key: str) -> None:
    """A model node (``models.classifier``, ``models.duq`` or train's ``model``)."""

    node = OmegaConf.select(ch.cfg, key)
    if not isinstance(node, DictConfig):
        return
    check_target_keys(ch, key, extra=RECIPE_KEYS)
    channels = dataset_channels(ch.cfg)
    for stat in ("mean", "std"):
        v = ch.get(f"{key}.{stat}")
        if v in (ABSENT, MISSING, None):
            continue
        if not isinstance(v, list) or not all(is_num(x) for x in v) or len(v) not in (1, channels):
            kind = "1 number (grayscale)" if channels == 1 else f"1 or {channels} numbers (RGB)"
            ch.add(f"{key}.{stat}", v, f"must be a list of {kind} for dataset.channels={channels}: the "
                   f"model normalises each input channel; e.g. {key}.{stat}=[{'0.5' if stat == 'mean' else '0.25'}]")
        elif stat == "std" and any(x <= 0 for x in v):
            ch.add(f"{key}.{stat}", v, "every std must be > 0")
    for name in ("width", "embedding_size", "dep_hidden"):
        ch.integer(f"{key}.{name}", 1)
    ch.number(f"{key}.lr", 0, low_open=True)
    ch.boolean(f"{key}.use_dep")
    ch.integer(f"{key}.fit.trainer.max_epochs", 1)
    if is_byo(node):
        _check_byo(ch, key)


def _check_byo(ch: Checks, key: str) -> None:
    path = ch.get(f"{key}.path")
    how = (f"the file of your trained classifier: {key}.path=/abs/weights.pt (a state dict, with "
           f"{key}.arch=<torchvision name>) or a TorchScript file (with {key}.arch=null)")
    if path in (ABSENT, MISSING, None, ""):
        ch.add(f"{key}.path", path, f"must be set to {how}")
    elif not Path(str(path)).expanduser().is_file():
        ch.add(f"{key}.path", path, f"no such file ({Path(str(path)).expanduser().resolve()}); must be {how}")
    dep = ch.get(f"{key}.dep_path")
    if dep not in (ABSENT, MISSING, None) and not Path(str(dep)).expanduser().is_file():
        ch.add(f"{key}.dep_path", dep, "no such file; must be a posthoc_dep.pt written by "
               "`python -m disc_pl.train model=byo`, or null (the post-hoc DEP head is then fitted)")


def training_images(dm: Any) -> int:
    """How many images the datamodule's training split holds (0 where it has none)."""
    try:
        return len(dm.dataset("train"))
    except (KeyError, ValueError, TypeError):
        return 0


def check_model_fits_data(model: Any, dm: Any, key: str, path: Any = None) -> None:
    """A loaded classifier / DUQ model must be one for this dataset: the same number (and
    names) of classes, input channels and image size; and it must accept the dataset's images.
    Reads ``hparams`` (disc_pl checkpoints) or attributes (bring-your-own wrappers)."""
    import torch

    hp = dict(getattr(model, "hparams", {}) or {})
    found = {k: hp.get(k, getattr(model, k, None)) for k in ("num_classes", "in_channels", "image_size")}
    expected = {"num_classes": dm.num_classes, "in_channels": dm.channels, "image_size": dm.image_size}
    where = f"dataset {dm.name!r}"
    mismatches = [f"{k}={found[k]} but {where} has {k}={v}" for k, v in expected.items()
                  if found[k] is not None and int(found[k]) != int(v)]
    names = hp.get("class_names")
    if not mismatches and names and list(names) != list(dm.class_names):
        mismatches.append(f"classes {list(names)} but {where} has {list(dm.class_names)}")
    if not mismatches:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        probe = torch.zeros(1, dm.channels, dm.image_size, dm.image_size, device=device)
        was_training = model.training
        try:
            with torch.no_grad():
                out = model.eval()(probe)
        except RuntimeError as err:
            mismatches.append(f"it does not accept the dataset's images [{dm.channels}, {dm.image_size}, "
                              f"{dm.image_size}] (dataset.channels, dataset.image_size): {err}")
        else:
            if out.dim() != 2 or out.shape[1] != dm.num_classes:
                mismatches.append(f"it returns {tuple(out.shape[1:])} outputs per image but {where} has "
                                  f"{dm.num_classes} classes")
        finally:
            model.train(was_training)
    if mismatches:
        raise ConfigError.one(key, str(path) if path is not None else type(model).__name__,
                              "the checkpoint does not fit the data: " + "; ".join(mismatches)
                              + ". Use a model trained on this dataset (or fix dataset.channels / "
                              "dataset.image_size to what the model was trained on)")
