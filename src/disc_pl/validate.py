"""Start-up validation: a bad config fails in a second, not after an hour of training.

``python -m disc_pl.run`` and ``python -m disc_pl.train`` call these before anything expensive:

- :func:`validate_run_config` / :func:`validate_train_config`: the composed config alone (types,
  ranges, unknown keys, option combinations, files that must exist, the prior against the image
  size), before data or models are built;
- :func:`validate_with_data`: what needs the dataset's class names (``query.source`` /
  ``query.target``, ``query.indices``), after ``dm.setup()`` and before any model is trained;
- :func:`check_model_fits_data`: a loaded checkpoint against the dataset (classes, channels,
  image size), before it is used.

Each raises one :class:`ConfigError` listing every problem found as ``key=value`` and what is
allowed. Hydra already rejects an unknown group option (``prior=gan`` lists the available
ones) and an unknown key without ``+`` (the composed config is in struct mode); the checks here
cover what Hydra cannot know: values, and keys added with ``+``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from disc_pl import utils
from disc_pl.cf.prior_checks import check_prior
from disc_pl.checks import (Checks, allowed_top_level, build_part, check_target_keys, collect, conf_reference,
                            group_keys, is_int, plain)
from disc_pl.models.checks import check_model, check_model_fits_data, training_images  # noqa: F401 (re-exported)
from disc_pl.cf.losses import Surrogates
from disc_pl.errors import ABSENT, MISSING, ConfigError, Problem, show  # noqa: F401 (re-exported)
from disc_pl.models.byo import is_byo  # noqa: F401 (re-exported)
from disc_pl.models.judge import judge_datamodule, judges_enabled, robust_settings
from disc_pl.models.realism import ae_settings, nn_settings
from disc_pl.models.robust import robust_recipe

CONF_DIR = Path(utils.CONF_DIR)
SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------- sections
def _check_top_level(ch: Checks) -> None:
    ch.integer("seed", 0, 2**32 - 1)  # Lightning silently replaces seeds outside this range
    ch.integer("threads_per_job", 1, nullable=True)
    ch.choice("cpu_allocator", ["retain", "system"])


def _check_dataset(ch: Checks) -> None:
    if OmegaConf.select(ch.cfg, "dataset") is None:
        ch.add("dataset", ABSENT, "choose a dataset (dataset=synthetic_faces|celeba|isic2018|folder)")
        return
    check_target_keys(ch, "dataset")
    ch.integer("dataset.image_size", 8)
    ch.choice("dataset.channels", [1, 3])
    ch.integer("dataset.batch_size", 1)
    ch.integer("dataset.num_workers", 0)
    for key in ("dataset.val_fraction", "dataset.test_fraction"):
        ch.number(key, 0, 1, high_open=True)


def _check_trainer(ch: Checks) -> None:
    node = OmegaConf.select(ch.cfg, "trainer")
    if not isinstance(node, DictConfig):
        return
    check_target_keys(ch, "trainer")
    accelerator = ch.get("trainer.accelerator")
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            ch.add("trainer.accelerator", accelerator, "no CUDA GPU is visible to this process; use "
                   "trainer=cpu (or run where a GPU is available)")
        else:
            devices = ch.get("trainer.devices")
            if is_int(devices) and devices > torch.cuda.device_count():
                ch.add("trainer.devices", devices, f"at most {torch.cuda.device_count()} GPU(s) are visible "
                       "(or -1 / 'auto' for all)")


def _check_query(ch: Checks) -> None:
    ch.choice("query.split", SPLITS)
    indices = ch.get("query.indices")
    if indices not in (ABSENT, MISSING, None):
        if not isinstance(indices, list) or not indices or not all(is_int(i) and i >= 0 for i in indices):
            ch.add("query.indices", indices, "must be null or a non-empty list of integers >= 0 "
                   "(indices into query.split)")
    else:
        ch.integer("query.count", 1)
    ch.integer("query.batch_size", 1)
    ch.number("query.memory_fraction", 0, 1, low_open=True, nullable=True)
    ch.integer("query.num_workers", 0)
    ch.boolean("query.require_correct")
    source, target = ch.get("query.source"), ch.get("query.target")
    for key, v in (("query.source", source), ("query.target", target)):
        if v not in (ABSENT, MISSING, None) and not (isinstance(v, str) or is_int(v)):
            ch.add(key, v, "must be a class name, a class index, or null (the dataset's default)")
    if source not in (ABSENT, MISSING, None) and source == target:
        ch.add("query.target", target, f"must differ from query.source={source!r}: a counterfactual "
               "needs another target class")


def _check_inversion(ch: Checks) -> None:
    """The ``inversion`` node builds ``InversionOptions``, which checks its own values; and the
    one rule that spans groups: 16-mixed needs CUDA."""
    factory = build_part(ch, "inversion")
    if factory is not None:
        collect(ch, factory)
    if ch.get("inversion.precision") == "16-mixed" and ch.get("trainer.accelerator") == "cpu":
        ch.add("inversion.precision", "16-mixed", "needs a CUDA device (trainer.accelerator=cpu here): "
               "use bf16-mixed, 32 or auto on a CPU")


def _check_terms(ch: Checks) -> None:
    """Each optional objective term (``term=[...]``) is built: its class checks its arguments."""
    for name in OmegaConf.select(ch.cfg, "term") or {}:
        build_part(ch, f"term.{name}", f"must be an option of conf/term/ ({name}: _target_ + its arguments)")


def _check_output(ch: Checks) -> None:
    ch.integer("output.grid_max", 0)
    ch.boolean("output.save_tensors")


def _check_parts(ch: Checks) -> None:
    """The ``space``, ``manifold`` and ``localize`` objects (each checks its own options), and
    what they need from the rest of the config."""
    space, manifold = build_part(ch, "space"), build_part(ch, "manifold")
    gate = build_part(ch, "localize")
    clf = OmegaConf.select(ch.cfg, "models.classifier")
    ours = isinstance(clf, DictConfig) and not is_byo(clf)
    if space is not None and ours:
        try:
            space.check_feature_maps(4)  # the ResNet-18 taps
        except ConfigError as err:
            ch.add(err.key, err.value, err.allowed)
    size = ch.get("dataset.image_size")
    if gate is not None and is_int(size):
        try:
            gate.check_image(size)
        except ConfigError as err:
            ch.add(err.key, err.value, err.allowed)
    if manifold is None:
        return
    if manifold.needs_robust:
        collect(ch, lambda: robust_recipe(manifold.recipe))
    if manifold.needs_dep and ours and ch.get("models.classifier.use_dep") is False:
        ch.add("models.classifier.use_dep", False, f"manifold={manifold.name} needs the classifier's DEP loss "
               "predictor: set models.classifier.use_dep=true (the default), or choose manifold=duq "
               "or manifold=none")
    if manifold.needs_duq:
        duq = OmegaConf.select(ch.cfg, "models.duq")
        if not isinstance(duq, DictConfig) or "_target_" not in duq:
            byo = " (it is trained on the dataset, also for a bring-your-own classifier)" if is_byo(clf) else ""
            ch.add("models.duq", plain(duq) if duq is not None else ABSENT,
                   f"manifold={manifold.name} needs a DUQ model to train{byo}: keep the default "
                   "model@models.duq=duq, or choose manifold=dep or manifold=none")
        else:
            check_model(ch, "models.duq")  # models.duq is only trained when a manifold needs it


def _check_judges(ch: Checks) -> None:
    """The robust judges' and the realism autoencoders' settings (judge=ensemble), before any
    work: they are only used after the counterfactuals are made."""
    if not judges_enabled(ch.cfg):
        return
    judge = ch.cfg.judge
    collect(ch, lambda: robust_settings(judge))
    realism = judge.get("realism")
    if realism and bool(realism.get("enabled", True)):
        collect(ch, lambda: ae_settings(realism))
        collect(ch, lambda: nn_settings(realism))


# --------------------------------------------------------------------------- entry points
def validate_run_config(cfg: DictConfig) -> None:
    """Everything about a ``disc_pl.run`` config that can be checked without data or models."""
    ch = Checks(cfg)
    ref = conf_reference("run")
    ch.known_keys("", allowed_top_level("run"), "top-level keys of conf/run.yaml")
    for section in ("query", "inversion", "output"):
        ch.known_keys(section, ref[section].keys(), f"keys of {section}")
    for key in ("prior", "prior.fallback"):
        ch.known_keys(key, group_keys("prior") | {"fallback"}, "keys of the prior options", hidden=["defaults"])
    _check_top_level(ch)
    _check_dataset(ch)
    check_model(ch, "models.classifier")
    _check_trainer(ch)
    _check_query(ch)
    _check_inversion(ch)
    _check_output(ch)
    _check_parts(ch)
    check_prior(ch)
    _check_terms(ch)
    _check_judges(ch)
    if OmegaConf.select(cfg, "logger") is not None:
        check_target_keys(ch, "logger")
    ch.raise_if_any()


def validate_train_config(cfg: DictConfig) -> None:
    """Everything about a ``disc_pl.train`` config that can be checked without data."""
    ch = Checks(cfg)
    ch.known_keys("", allowed_top_level("train"), "top-level keys of conf/train.yaml")
    _check_top_level(ch)
    _check_dataset(ch)
    check_model(ch, "model")
    _check_trainer(ch)
    ch.boolean("use_cache")
    if OmegaConf.select(cfg, "logger") is not None:
        check_target_keys(ch, "logger")
    ch.raise_if_any()


def _class_problem(dm: Any, key: str, value: Any) -> Problem:
    names = ", ".join(f"{i}={n}" for i, n in enumerate(dm.class_names))
    return Problem(key, value, f"not a class of dataset {dm.name!r}; allowed: {names} (name or index)")


def validate_with_data(cfg: DictConfig, dm: Any) -> tuple[int, int]:
    """Query settings against the built dataset (class names, split sizes), before any model
    is trained. Returns (source, target) class indices."""
    q = cfg.query
    problems: list[Problem] = []
    resolved: dict[str, int] = {}
    for key in ("source", "target"):
        value = q.get(key)
        given = value if value is not None else getattr(dm, f"default_query_{key}")
        try:
            resolved[key] = dm.class_index(given)
        except (ValueError, IndexError):
            problems.append(_class_problem(dm, f"query.{key}" if value is not None else
                                           f"dataset.default_query_{key}", given))
    if len(resolved) == 2 and resolved["source"] == resolved["target"]:
        name = dm.class_names[resolved["source"]]
        problems.append(Problem("query.target", q.get("target") if q.get("target") is not None else name,
                                f"is the same class as query.source ({name!r}); a counterfactual needs a "
                                f"different target class: one of {[n for n in dm.class_names if n != name]}"))
    if q.get("indices") is not None:
        size = len(dm.dataset(q.split))
        bad = [int(i) for i in q.indices if not 0 <= int(i) < size]
        if bad:
            problems.append(Problem("query.indices", bad, f"indices into split {q.split!r} must be in "
                                    f"0..{size - 1} (it has {size} items)"))
    manifold = cfg.get("manifold")
    if (is_byo(OmegaConf.select(cfg, "models.classifier")) and isinstance(manifold, DictConfig)
            and str(manifold.get("_target_", "")).endswith(".Surrogates") and not training_images(dm)):
        # a bring-your-own classifier's surrogates are trained by disc_pl's recipe on the training split
        problems.append(Problem("manifold", "surrogates", Surrogates.BYO_NO_TRAINING_IMAGES))
    if judges_enabled(cfg) and cfg.judge.get("root") is not None:
        try:  # judge.root's folder (classes, disjointness), before any model is trained
            judge_datamodule(cfg, dm, is_byo(OmegaConf.select(cfg, "models.classifier")))
        except ConfigError as err:
            problems += err.problems
    if problems:
        raise ConfigError(problems)
    return resolved["source"], resolved["target"]


