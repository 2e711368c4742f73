"""A toolkit for checking a composed config: read values by dotted key, collect every problem
(``key=value: what is allowed``) and raise them together as one :class:`ConfigError`.

``disc_pl.validate`` uses it for the checks that span several groups; a config part that builds
an object (``_target_``) is checked by building it (:func:`build_part`): its constructor
validates its own arguments once (``disc_pl.errors.require``).
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

from pathlib import Path

from disc_pl import utils
from disc_pl.errors import ABSENT, MISSING, ConfigError, Problem

CONF_DIR = Path(utils.CONF_DIR)


def plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class Checks:
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
            return plain(node[leaf])
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
        if not is_int(v) or (low is not None and v < low) or (high is not None and v > high):
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
        ok = is_num(v)
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
        return plain(node[key])
    except Exception:  # noqa: BLE001
        return OmegaConf.to_container(node, resolve=False).get(key)


def _bounds(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f" in {low}..{high}"
    if low is not None:
        return f" >= {low}"
    return f" <= {high}" if high is not None else ""


def target_of(node: Any) -> Any:
    """The callable named by a node's ``_target_`` (None if absent or not importable)."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return None
    from hydra.utils import get_method

    try:
        return get_method(str(node._target_))
    except Exception:  # noqa: BLE001 - reported by the caller
        return None


def parameters(fn: Any) -> tuple[set[str], bool]:
    """(named parameters, takes **kwargs) of a callable or class constructor."""
    sig = inspect.signature(fn.__init__ if inspect.isclass(fn) else fn)
    names = {n for n, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return names - {"self"}, any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())


def check_target_keys(ch: Checks, key: str, extra: Iterable[str] = ()) -> None:
    """Every key of node ``key`` (with ``_target_``) must be an argument of its target."""
    node = OmegaConf.select(ch.cfg, key)
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return
    fn = target_of(node)
    if fn is None:
        ch.add(f"{key}._target_", node._target_, "must name an importable class or function")
        return
    names, var_kw = parameters(fn)
    if not var_kw:
        hydra_keys = {"_convert_", "_recursive_", "_partial_", "_args_"}
        ch.known_keys(key, names | {"_target_"} | set(extra), f"arguments of {node._target_}", hidden=hydra_keys)


def build_part(ch: Checks, key: str, missing: str | None = None) -> Any:
    """The object config node ``key`` builds (as the job builds it), or None when it cannot be
    built: its keys must be arguments of its ``_target_``, and the problems its constructor
    raises (a ConfigError naming the key and the fix) join the others. ``missing``: what to
    say where the node is no object."""
    node = OmegaConf.select(ch.cfg, key)
    if not isinstance(node, DictConfig) or "_target_" not in node:
        ch.add(key, plain(node) if node is not None else ABSENT,
               missing or f"must be an option of conf/{key}/ (an object: _target_ + its arguments)")
        return None
    check_target_keys(ch, key)
    if any(p.key.startswith(key + ".") for p in ch.problems):  # e.g. an unknown key, already reported
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
            ch.add(key, plain(node), f"cannot be built: {cause or err}")
        return None


def collect(ch: Checks, check: Any) -> None:
    """Run a builder's own check; its ConfigError's problems join the others."""
    try:
        check()
    except ConfigError as err:
        for p in err.problems:
            ch.add(p.key, p.value, p.allowed)


def dataset_channels(cfg: DictConfig) -> int:
    value = OmegaConf.select(cfg, "dataset.channels", default=3)
    return value if is_int(value) else 3


def conf_reference(config_name: str) -> DictConfig:
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


def allowed_top_level(config_name: str) -> set[str]:
    """Top-level keys of ``conf/<config_name>.yaml`` and of every primary config that includes
    it (``evaluate.yaml`` includes ``run`` and adds ``evaluate`` and ``cd``)."""
    keys: set[str] = set()
    for path in sorted(CONF_DIR.glob("*.yaml")):
        ref = OmegaConf.load(path)
        if path.stem == config_name or config_name in [d for d in ref.get("defaults", []) if isinstance(d, str)]:
            keys |= _top_level_keys(ref)
    return keys


def group_keys(group: str) -> set[str]:
    """Keys any option of ``conf/<group>/`` sets (what a node of that group may hold)."""
    return {str(k) for path in (CONF_DIR / group).glob("*.yaml") for k in OmegaConf.load(path).keys()}
