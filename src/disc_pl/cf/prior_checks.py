"""Checks of a prior node of a config (``prior`` and its ``fallback``): the schedule and the
generator factory, probed on one blank image of the dataset's size."""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from disc_pl.cf.priors import Prior
from disc_pl.checks import ABSENT, CONF_DIR, Checks, dataset_channels, is_int, parameters, plain, target_of
from disc_pl.errors import ConfigError


def check_prior(ch: Checks, key: str = "prior") -> None:
    """A prior node (``prior`` or its ``fallback``, checked the same way): its name, schedule and
    generator, against the dataset's image size. A probe generator for one blank image of that
    size is built (cheap), so what the engine builds after training is known to work now."""
    import torch

    name = ch.get(f"{key}.name")
    if not isinstance(name, str) or not name:
        ch.add(f"{key}.name", name, "must be the prior's name (a label: tv, dip, inr, ...)")
    ch.number(f"{key}.lr", 0, low_open=True)
    ch.number(f"{key}.lambda_sem", 0)
    for k in ("max_steps", "psnr_target", "lr"):
        if ch.get(f"{key}.recon.{k}") is ABSENT:
            ch.add(f"{key}.recon.{k}", ABSENT, "must be set (the reconstruction: max_steps, psnr_target, lr; "
                   "see conf/prior/*.yaml)")
    ch.integer(f"{key}.recon.max_steps", 0)
    ch.number(f"{key}.recon.psnr_target", 0, low_open=True)
    ch.number(f"{key}.recon.lr", 0, low_open=True, nullable=True)
    stages = ch.get(f"{key}.stages")
    if not isinstance(stages, list) or not stages or not all(
            isinstance(s, list) and s and all(isinstance(g, str) for g in s) for s in stages):
        ch.add(f"{key}.stages", stages, "must be a non-empty list of non-empty lists of layer-group names, "
               "e.g. [[out],[hidden2,out],[all]]")
        stages = None
    _check_fallback(ch, key)
    cls, hparams = _prior_class(ch, f"{key}.hparams", name)
    size = ch.get("dataset.image_size")
    if cls is None or not is_int(size) or size < 8:
        return

    def given(k: str) -> Any:
        value = ch.get(f"{key}.{k}")
        return None if value is ABSENT else value
    try:  # the prior checks its own hparams (constructor) and schedule (check_schedule)
        probe = cls(torch.zeros(1, dataset_channels(ch.cfg), size, size), [0], **hparams)
        probe.check_schedule(stages, given("sizes"), given("recon.sizes"), given("early_size"))
    except ConfigError as err:
        for p in err.problems:
            ch.add(p.key.replace("prior.", f"{key}.", 1), p.value, p.allowed)
    except (TypeError, ValueError) as err:
        ch.add(f"{key}.hparams", hparams, f"prior={name} cannot be built for {size}x{size} images: {err}")
    _check_retry_hparams(ch, key, cls, hparams, size)


def _check_retry_hparams(ch: Checks, key: str, cls: type[Prior], hparams: dict, size: int) -> None:
    """``<key>.retry_hparams``: absent, or a list of mappings, each a change of the prior's hparams
    that still builds it (probed like the prior)."""
    import torch

    retry = ch.get(f"{key}.retry_hparams")
    if retry is ABSENT or retry is None:
        return
    if not isinstance(retry, list) or not all(isinstance(h, dict) and h for h in retry):
        ch.add(f"{key}.retry_hparams", retry, "must be a list of non-empty mappings of the prior's hparams, "
               "e.g. [{alpha_smooth: 0.01}] (or [] for none)")
        return
    for i, change in enumerate(retry):
        try:
            cls(torch.zeros(1, dataset_channels(ch.cfg), size, size), [0], **{**hparams, **change})
        except (ConfigError, TypeError, ValueError) as err:
            ch.add(f"{key}.retry_hparams[{i}]", change, f"prior={ch.get(f'{key}.name')} cannot be built with "
                   f"this change of its hparams: {err}")


def _check_fallback(ch: Checks, key: str) -> None:
    """``<key>.fallback``: null, or a prior config composed by Hydra (checked like the prior)."""
    fallback = OmegaConf.select(ch.cfg, f"{key}.fallback")
    if fallback is None:
        return
    if not isinstance(fallback, DictConfig):
        names = sorted(p.stem for p in (CONF_DIR / "prior").glob("*.yaml"))
        ch.add(f"{key}.fallback", plain(fallback), "must be a prior config, chosen as "
               f"+prior@{key}.fallback=<{'|'.join(names)}> (prior@{key}.fallback=... where the prior has "
               f"one, e.g. prior=warp), or null: the prior that takes over the queries this one cannot flip")
    elif key != "prior":
        ch.add(f"{key}.fallback", fallback.get("name"), "a fallback prior cannot have a fallback of its own "
               f"(one level only): add {key}.fallback=null to the command line")
    else:
        check_prior(ch, f"{key}.fallback")


def _prior_class(ch: Checks, key: str, name: Any) -> tuple[Any, dict]:
    """(the Prior subclass a prior's ``hparams`` factory builds, its arguments), or (None, {})
    after reporting why it cannot be built."""
    hparams = ch.get(key)
    if not isinstance(hparams, dict) or "_target_" not in hparams:
        ch.add(key, hparams, "must be the generator factory: {_target_: disc_pl.cf.priors.INRPrior, "
               "_partial_: true, <constructor arguments>} (see conf/prior/*.yaml)")
        return None, {}
    cls = target_of(OmegaConf.create({"_target_": hparams["_target_"]}))
    if not (isinstance(cls, type) and issubclass(cls, Prior)):
        ch.add(f"{key}._target_", hparams["_target_"], "must name a subclass of disc_pl.cf.priors.Prior")
        return None, {}
    if hparams.get("_partial_") is not True:
        ch.add(f"{key}._partial_", hparams.get("_partial_", ABSENT),
               "must be true: the run builds one generator set per batch of queries")
    hparams = {k: v for k, v in hparams.items() if not k.startswith("_")}
    allowed = parameters(cls)[0] - {"images", "seeds"}
    unknown = sorted(set(hparams) - allowed)
    for k in unknown:
        ch.add(f"{key}.{k}", hparams[k], f"not a parameter of prior={name}; allowed: {', '.join(sorted(allowed))}")
    return (None, {}) if unknown else (cls, hparams)
