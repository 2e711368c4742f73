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

import inspect
import math
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

from disc_pl import utils
from disc_pl.cf.priors import Prior
from disc_pl.cf.losses import Surrogates
from disc_pl.cf import precision as amp
from disc_pl.errors import ABSENT, MISSING, ConfigError, Problem, show  # noqa: F401 (re-exported)
from disc_pl.models.byo import is_byo  # noqa: F401 (re-exported)
from disc_pl.models.fit import RECIPE_KEYS
from disc_pl.models.judge import judge_datamodule, judges_enabled, robust_settings
from disc_pl.models.realism import ae_settings
from disc_pl.models.robust import robust_recipe

CONF_DIR = Path(utils.CONF_DIR)
SPLITS = ("train", "val", "test")


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Checks:
    """Collects problems while reading values of one composed config."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.problems: list[Problem] = []

    def add(self, key: str, value: Any, allowed: str) -> None:
        if not any(p.key == key for p in self.problems):  # one problem per key
            self.problems.append(Problem(key, value, allowed))

    def get(self, key: str) -> Any:
        """The resolved value at ``key`` (plain python): ABSENT when the key does not exist,
        MISSING when it is a mandatory value (``???``) that was never set."""
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(self.cfg, parent) if parent else self.cfg
        if not isinstance(node, DictConfig) or leaf not in node.keys():  # `in` is False for ???
            return ABSENT
        if OmegaConf.is_missing(node, leaf):
            return MISSING
        try:
            return _plain(node[leaf])
        except Exception as err:  # noqa: BLE001 - an interpolation that cannot resolve
            self.add(key, OmegaConf.to_container(node, resolve=False).get(leaf), f"cannot be resolved ({err})")
            return ABSENT

    def _unset(self, key: str, v: Any, what: str) -> bool:
        """True when there is nothing to check (absent key; a ??? value is reported)."""
        if v is MISSING:
            self.add(key, v, f"must be set ({what})")
        return v is ABSENT or v is MISSING

    def integer(self, key: str, low: int | None = None, high: int | None = None, nullable: bool = False) -> Any:
        v = self.get(key)
        what = f"an integer{_bounds(low, high)}" + (" (or null)" if nullable else "")
        if self._unset(key, v, what) or (v is None and nullable):
            return v
        if not _is_int(v) or (low is not None and v < low) or (high is not None and v > high):
            self.add(key, v, f"must be {what}")
        return v

    def number(self, key: str, low: float | None = None, high: float | None = None, low_open: bool = False,
               high_open: bool = False, nullable: bool = False) -> Any:
        v = self.get(key)
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        rng = " and ".join(s for s in (lo, hi) if s)
        what = f"a number{' ' + rng if rng else ''}" + (" (or null)" if nullable else "")
        if self._unset(key, v, what) or (v is None and nullable):
            return v
        ok = _is_num(v)
        if ok and low is not None:
            ok = v > low if low_open else v >= low
        if ok and high is not None:
            ok = v < high if high_open else v <= high
        if not ok:
            self.add(key, v, f"must be {what}")
        return v

    def boolean(self, key: str) -> Any:
        v = self.get(key)
        if not self._unset(key, v, "true or false") and not isinstance(v, bool):
            self.add(key, v, "must be true or false")
        return v

    def choice(self, key: str, options: Iterable[Any]) -> Any:
        v = self.get(key)
        allowed = f"one of {', '.join(map(str, options))}"
        if not self._unset(key, v, allowed) and v not in list(options):
            self.add(key, v, f"must be {allowed}")
        return v

    def known_keys(self, key: str, allowed: Iterable[str], what: str, hidden: Iterable[str] = ()) -> None:
        """Every key of node ``key`` must be in ``allowed`` (or ``hidden``: accepted, not listed)."""
        node = OmegaConf.select(self.cfg, key) if key else self.cfg
        if not isinstance(node, DictConfig):
            return
        allowed = sorted(set(allowed))
        for k in node.keys():
            if k not in allowed and k not in hidden:
                full = f"{key}.{k}" if key else str(k)
                self.add(full, _raw(node, k), f"unknown key (a typo?); {what}: {', '.join(allowed)}")

    def raise_if_any(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)


def _raw(node: DictConfig, key: Any) -> Any:
    try:
        return _plain(node[key])
    except Exception:  # noqa: BLE001
        return OmegaConf.to_container(node, resolve=False).get(key)


def _bounds(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f" in {low}..{high}"
    if low is not None:
        return f" >= {low}"
    return f" <= {high}" if high is not None else ""


def _reference(config_name: str) -> DictConfig:
    """The primary yaml (run / train) as written: the keys a user may set."""
    return OmegaConf.load(CONF_DIR / f"{config_name}.yaml")


def _top_level_keys(reference: DictConfig) -> set[str]:
    keys = {k for k in reference.keys() if k not in ("defaults", "hydra")}
    for entry in reference.get("defaults", []):
        if isinstance(entry, str) or entry is None:
            continue
        for group in entry.keys():
            group = str(group).replace("override ", "")
            package = group.split("@", 1)[1] if "@" in group else group.split("/")[0]
            keys.add(package.split(".")[0])
    return keys


def _allowed_top_level(config_name: str) -> set[str]:
    """Top-level keys of ``conf/<config_name>.yaml`` and of every primary config that includes
    it (``evaluate.yaml`` includes ``run`` and adds ``evaluate`` and ``cd``)."""
    keys: set[str] = set()
    for path in sorted(CONF_DIR.glob("*.yaml")):
        ref = OmegaConf.load(path)
        if path.stem == config_name or config_name in [d for d in ref.get("defaults", []) if isinstance(d, str)]:
            keys |= _top_level_keys(ref)
    return keys


def _group_keys(group: str) -> set[str]:
    """Keys any option of ``conf/<group>/`` sets (what a node of that group may hold)."""
    return {str(k) for path in (CONF_DIR / group).glob("*.yaml") for k in OmegaConf.load(path).keys()}


def _target(node: Any) -> Any:
    """The callable named by a node's ``_target_`` (None if absent or not importable)."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return None
    from hydra.utils import get_method

    try:
        return get_method(str(node._target_))
    except Exception:  # noqa: BLE001 - reported by the caller
        return None


def _parameters(fn: Any) -> tuple[set[str], bool]:
    """(named parameters, takes **kwargs) of a callable or class constructor."""
    sig = inspect.signature(fn.__init__ if inspect.isclass(fn) else fn)
    names = {n for n, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return names - {"self"}, any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())


def _check_target_keys(ch: _Checks, key: str, extra: Iterable[str] = ()) -> None:
    """Every key of node ``key`` (with ``_target_``) must be an argument of its target."""
    node = OmegaConf.select(ch.cfg, key)
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return
    fn = _target(node)
    if fn is None:
        ch.add(f"{key}._target_", node._target_, "must name an importable class or function")
        return
    names, var_kw = _parameters(fn)
    if not var_kw:
        hydra_keys = {"_convert_", "_recursive_", "_partial_", "_args_"}
        ch.known_keys(key, names | {"_target_"} | set(extra), f"arguments of {node._target_}", hidden=hydra_keys)


# --------------------------------------------------------------------------- sections
def _check_top_level(ch: _Checks) -> None:
    ch.integer("seed", 0, 2**32 - 1)  # Lightning silently replaces seeds outside this range
    ch.integer("threads_per_job", 1, nullable=True)
    ch.choice("cpu_allocator", ["retain", "system"])


def _check_dataset(ch: _Checks) -> None:
    if OmegaConf.select(ch.cfg, "dataset") is None:
        ch.add("dataset", ABSENT, "choose a dataset (dataset=synthetic_faces|celeba|isic2018|folder)")
        return
    _check_target_keys(ch, "dataset")
    ch.integer("dataset.image_size", 8)
    ch.choice("dataset.channels", [1, 3])
    ch.integer("dataset.batch_size", 1)
    ch.integer("dataset.num_workers", 0)
    for key in ("dataset.val_fraction", "dataset.test_fraction"):
        ch.number(key, 0, 1, high_open=True)


def dataset_channels(cfg: DictConfig) -> int:
    value = OmegaConf.select(cfg, "dataset.channels", default=3)
    return value if _is_int(value) else 3


def _check_model(ch: _Checks, key: str) -> None:
    """A model node (``models.classifier``, ``models.duq`` or train's ``model``)."""

    node = OmegaConf.select(ch.cfg, key)
    if not isinstance(node, DictConfig):
        return
    _check_target_keys(ch, key, extra=RECIPE_KEYS)
    channels = dataset_channels(ch.cfg)
    for stat in ("mean", "std"):
        v = ch.get(f"{key}.{stat}")
        if v in (ABSENT, MISSING, None):
            continue
        if not isinstance(v, list) or not all(_is_num(x) for x in v) or len(v) not in (1, channels):
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


def _check_byo(ch: _Checks, key: str) -> None:
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


def _check_trainer(ch: _Checks) -> None:
    node = OmegaConf.select(ch.cfg, "trainer")
    if not isinstance(node, DictConfig):
        return
    _check_target_keys(ch, "trainer")
    accelerator = ch.get("trainer.accelerator")
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            ch.add("trainer.accelerator", accelerator, "no CUDA GPU is visible to this process; use "
                   "trainer=cpu (or run where a GPU is available)")
        else:
            devices = ch.get("trainer.devices")
            if _is_int(devices) and devices > torch.cuda.device_count():
                ch.add("trainer.devices", devices, f"at most {torch.cuda.device_count()} GPU(s) are visible "
                       "(or -1 / 'auto' for all)")


def _check_query(ch: _Checks) -> None:
    ch.choice("query.split", SPLITS)
    indices = ch.get("query.indices")
    if indices not in (ABSENT, MISSING, None):
        if not isinstance(indices, list) or not indices or not all(_is_int(i) and i >= 0 for i in indices):
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
        if v not in (ABSENT, MISSING, None) and not (isinstance(v, str) or _is_int(v)):
            ch.add(key, v, "must be a class name, a class index, or null (the dataset's default)")
    if source not in (ABSENT, MISSING, None) and source == target:
        ch.add("query.target", target, f"must differ from query.source={source!r}: a counterfactual "
               "needs another target class")


def _check_inversion(ch: _Checks) -> None:
    ch.number("inversion.lambda_fc", 0, low_open=True)
    ch.number("inversion.relax", 0, 1, low_open=True)
    ch.number("inversion.target_margin", 0, 1, high_open=True)
    confidence, margin = ch.get("inversion.target_confidence"), ch.get("inversion.target_margin")
    if confidence not in (ABSENT, MISSING, None):
        if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 <= confidence < 1:
            ch.add("inversion.target_confidence", confidence, "must be null or a number in [0, 1): the margin "
                   "p_target - max p_other a query optimises towards")
        elif isinstance(margin, (int, float)) and confidence < margin:
            ch.add("inversion.target_confidence", confidence, f"must be >= inversion.target_margin={margin} "
                   "(the margin that counts as flipped), or null")
    ch.integer("inversion.steps_per_stage", 1)
    ch.integer("inversion.min_steps", 0)
    ch.integer("inversion.log_every", 0)
    ch.integer("inversion.eot_views", 0)
    ch.number("inversion.eot_shift", 0)
    ch.number("inversion.eot_noise", 0)
    ch.boolean("inversion.eot_hflip")
    ch.number("inversion.lambda_palette", 0)
    ch.number("inversion.lambda_change_tv", 0)
    precision = ch.get("inversion.precision")
    if precision not in (ABSENT, MISSING):
        try:
            precision = amp.normalize(precision)
        except ValueError:
            ch.add("inversion.precision", precision, f"must be one of {', '.join(amp.CHOICES)} (auto: bf16-mixed "
                   "where the device computes bf16 natively, else 32)")
        else:
            if precision == "16-mixed" and ch.get("trainer.accelerator") == "cpu":
                ch.add("inversion.precision", precision, "needs a CUDA device (trainer.accelerator=cpu here): "
                       "use bf16-mixed, 32 or auto on a CPU")


def _check_output(ch: _Checks) -> None:
    ch.integer("output.grid_max", 0)
    ch.boolean("output.save_tensors")


def _build_part(ch: _Checks, key: str) -> Any:
    """The object config group ``key`` builds (as the job builds it), or None when it cannot be
    built: its keys must be arguments of its ``_target_``, and the problems its constructor
    raises (a ConfigError naming the key and the fix) join the others."""
    node = OmegaConf.select(ch.cfg, key)
    if not isinstance(node, DictConfig) or "_target_" not in node:
        ch.add(key, _plain(node) if node is not None else ABSENT,
               f"must be an option of conf/{key}/ (an object: _target_ + its arguments)")
        return None
    before = len(ch.problems)
    _check_target_keys(ch, key)
    if len(ch.problems) > before:
        return None
    from hydra.utils import instantiate

    try:
        return instantiate(node)
    except Exception as err:  # noqa: BLE001 - hydra wraps what the constructor raised
        cause = err if isinstance(err, ConfigError) else err.__cause__
        if isinstance(cause, ConfigError):
            for p in cause.problems:
                ch.add(p.key, p.value, p.allowed)
        else:
            ch.add(key, _plain(node), f"cannot be built: {cause or err}")
        return None


def _check_parts(ch: _Checks) -> None:
    """The ``space``, ``manifold`` and ``localize`` objects (each checks its own options), and
    what they need from the rest of the config."""
    space, manifold = _build_part(ch, "space"), _build_part(ch, "manifold")
    gate = _build_part(ch, "localize")
    clf = OmegaConf.select(ch.cfg, "models.classifier")
    ours = isinstance(clf, DictConfig) and not is_byo(clf)
    if space is not None and ours:
        try:
            space.check_feature_maps(4)  # the ResNet-18 taps
        except ConfigError as err:
            ch.add(err.key, err.value, err.allowed)
    size = ch.get("dataset.image_size")
    if gate is not None and _is_int(size):
        try:
            gate.check_image(size)
        except ConfigError as err:
            ch.add(err.key, err.value, err.allowed)
    if manifold is None:
        return
    if getattr(manifold, "needs_robust", 0):
        _collect(ch, lambda: robust_recipe(manifold.recipe))
    if manifold.needs_dep and ours and ch.get("models.classifier.use_dep") is False:
        ch.add("models.classifier.use_dep", False, f"manifold={manifold.name} needs the classifier's DEP loss "
               "predictor: set models.classifier.use_dep=true (the default), or choose manifold=duq "
               "or manifold=none")
    if manifold.needs_duq:
        duq = OmegaConf.select(ch.cfg, "models.duq")
        if not isinstance(duq, DictConfig) or "_target_" not in duq:
            byo = " (it is trained on the dataset, also for a bring-your-own classifier)" if is_byo(clf) else ""
            ch.add("models.duq", _plain(duq) if duq is not None else ABSENT,
                   f"manifold={manifold.name} needs a DUQ model to train{byo}: keep the default "
                   "model@models.duq=duq, or choose manifold=dep or manifold=none")
        else:
            _check_model(ch, "models.duq")  # models.duq is only trained when a manifold needs it


def _collect(ch: _Checks, check: Any) -> None:
    """Run a builder's own check; its ConfigError's problems join the others."""
    try:
        check()
    except ConfigError as err:
        for p in err.problems:
            ch.add(p.key, p.value, p.allowed)


def _check_judges(ch: _Checks) -> None:
    """The robust judges' and the realism autoencoders' settings (judge=ensemble), before any
    work: they are only used after the counterfactuals are made."""
    if not judges_enabled(ch.cfg):
        return
    judge = ch.cfg.judge
    _collect(ch, lambda: robust_settings(judge))
    realism = judge.get("realism")
    if realism and bool(realism.get("enabled", True)):
        _collect(ch, lambda: ae_settings(realism))


def _check_prior(ch: _Checks) -> None:
    """Prior name, schedule and generator hparams, against the dataset's image size: a probe
    generator for one blank image of that size is built (cheap), so what the engine will build
    after training is known to work now."""
    import torch

    name = ch.get("prior.name")
    if not isinstance(name, str) or not name:
        ch.add("prior.name", name, "must be the prior's name (a label: tv, dip, inr, ...)")
    ch.number("prior.lr", 0, low_open=True)
    ch.number("prior.lambda_sem_scale", 0)
    fallback = ch.get("prior.fallback")
    if fallback is not ABSENT and fallback is not None:
        names = sorted(p.stem for p in (CONF_DIR / "prior").glob("*.yaml"))
        if not (isinstance(fallback, str) and fallback in names and fallback != name):
            ch.add("prior.fallback", fallback, f"must be null or the name of another prior "
                   f"({', '.join(n for n in names if n != name)}): the one that takes over the queries "
                   f"prior={name} cannot flip (e.g. prior=warp prior.fallback=inr)")
    ch.integer("prior.recon.max_steps", 0)
    ch.number("prior.recon.psnr_target", 0, low_open=True)
    ch.number("prior.recon.lr", 0, low_open=True, nullable=True)
    stages = ch.get("prior.stages")
    if not isinstance(stages, list) or not stages or not all(
            isinstance(s, list) and s and all(isinstance(g, str) for g in s) for s in stages):
        ch.add("prior.stages", stages, "must be a non-empty list of non-empty lists of layer-group names, "
               "e.g. [[out],[hidden2,out],[all]]")
        stages = None
    prefix = "prior.hparams"
    hparams = ch.get(prefix)
    if not isinstance(hparams, dict) or "_target_" not in hparams:
        ch.add(prefix, hparams, "must be the generator factory: {_target_: disc_pl.cf.priors.INRPrior, "
               "_partial_: true, <constructor arguments>} (see conf/prior/*.yaml)")
        return
    cls = _target(OmegaConf.create({"_target_": hparams["_target_"]}))
    if not (isinstance(cls, type) and issubclass(cls, Prior)):
        ch.add(f"{prefix}._target_", hparams["_target_"], "must name a subclass of disc_pl.cf.priors.Prior")
        return
    if hparams.get("_partial_") is not True:
        ch.add(f"{prefix}._partial_", hparams.get("_partial_", ABSENT),
               "must be true: the run builds one generator set per batch of queries")
    hparams = {k: v for k, v in hparams.items() if not k.startswith("_")}
    allowed, _ = _parameters(cls)
    allowed -= {"images", "seeds"}
    unknown = sorted(set(hparams) - allowed)
    for k in unknown:
        ch.add(f"{prefix}.{k}", hparams[k], f"not a parameter of prior={name}; allowed: {', '.join(sorted(allowed))}")
    size, channels = ch.get("dataset.image_size"), dataset_channels(ch.cfg)
    if unknown or not _is_int(size) or size < 8:
        return

    def given(key: str) -> Any:
        value = ch.get(key)
        return None if value is ABSENT else value
    try:  # the prior checks its own hparams (constructor) and schedule (check_schedule)
        probe = cls(torch.zeros(1, channels, size, size), [0], **hparams)
        probe.check_schedule(stages, given("prior.sizes"), given("prior.recon.sizes"), given("prior.early_size"))
    except ConfigError as err:
        for p in err.problems:
            ch.add(p.key, p.value, p.allowed)
    except (TypeError, ValueError) as err:
        ch.add(prefix, hparams, f"prior={name} cannot be built for {size}x{size} images: {err}")


# --------------------------------------------------------------------------- entry points
def validate_run_config(cfg: DictConfig) -> None:
    """Everything about a ``disc_pl.run`` config that can be checked without data or models."""
    ch = _Checks(cfg)
    ref = _reference("run")
    ch.known_keys("", _allowed_top_level("run"), "top-level keys of conf/run.yaml")
    for section in ("query", "inversion", "output"):
        ch.known_keys(section, ref[section].keys(), f"keys of {section}")
    ch.known_keys("prior", _group_keys("prior"), "keys of the prior options")
    _check_top_level(ch)
    _check_dataset(ch)
    _check_model(ch, "models.classifier")
    _check_trainer(ch)
    _check_query(ch)
    _check_inversion(ch)
    _check_output(ch)
    _check_parts(ch)
    _check_prior(ch)
    _check_judges(ch)
    if OmegaConf.select(cfg, "logger") is not None:
        _check_target_keys(ch, "logger")
    ch.raise_if_any()


def validate_train_config(cfg: DictConfig) -> None:
    """Everything about a ``disc_pl.train`` config that can be checked without data."""
    ch = _Checks(cfg)
    ch.known_keys("", _allowed_top_level("train"), "top-level keys of conf/train.yaml")
    _check_top_level(ch)
    _check_dataset(ch)
    _check_model(ch, "model")
    _check_trainer(ch)
    ch.boolean("use_cache")
    if OmegaConf.select(cfg, "logger") is not None:
        _check_target_keys(ch, "logger")
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
